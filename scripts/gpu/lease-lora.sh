#!/usr/bin/env bash
# One device call for multi-LoRA (issue 20), from the repository root on the GPU machine after
# scripts/gpu/package.sh, with carry [".device/xz", ".device/bin/hf_peer.py", ".device/bin/gguf.sha256"]
# (copy this script to .device/bin/ if the working tree is too large to travel with the carry).
#   lease-lora.sh engine  the device tests, conformance with the dense path (default threshold) and
#                         token by token, the LoRA kernel bench both ways, then the 8B engine runs
#                         (session.sh model8b, lora8b with 16, 1, 4 and 64 adapters): BENCHMARKS.md,
#                         "Multi-LoRA, dense GEMMs over the slots"
#   lease-lora.sh quick   the same checks, then base and 16 adapters only (throughput and single
#                         stream)
# Output: $OUT/lease-<mode>.tgz.
set -u
MODE="${1:-engine}"
case "$MODE" in
  engine) COUNTS="16 1 4 64"; BENCH="lora" ;;
  quick) COUNTS="16"; BENCH="lora" ;;
  *) echo "lease-lora.sh: unknown mode $MODE (engine or quick)" >&2; exit 2 ;;
esac
bash scripts/gpu/session.sh unpack keep-bin >/dev/null 2>&1
K=.device/kbin; A=$OUT/$MODE; mkdir -p "$A"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$A/gpu.txt"
$K/device --test-threads=1 --nocapture > "$A/device.log" 2>&1; echo "device rc=$?"
grep -E "test result|FAILED|panicked" "$A/device.log" | head -5
$K/conformance --test-threads=1 --nocapture > "$A/conformance_dense.log" 2>&1; echo "conformance dense rc=$?"
grep -E "FAIL|test result" "$A/conformance_dense.log" | head -5
PAGODA_LORA_DENSE_MIN_TOKENS=0 $K/conformance --test-threads=1 --nocapture > "$A/conformance_pertoken.log" 2>&1
echo "conformance per-token rc=$?"; grep -E "FAIL|test result" "$A/conformance_pertoken.log" | head -5
.device/kbench/kernels "$BENCH" > "$A/kernels_lora_dense.log" 2>&1
PAGODA_LORA_DENSE_MIN_TOKENS=0 .device/kbench/kernels "$BENCH" > "$A/kernels_lora_pertoken.log" 2>&1
grep -E "lora layer (graph )?t(1|256) r16 16 slots +[0-9]" "$A/kernels_lora_dense.log" | head -8
OUT=$A/engine; mkdir -p "$OUT"; export OUT
bash scripts/gpu/session.sh model8b 2>&1 | tail -1
LORA_COUNTS="$COUNTS" bash scripts/gpu/session.sh lora8b 2>&1 | tee "$OUT/lora8b.txt" | grep -E "^---|throughput:|decode:|LoRA:"
for f in "$OUT"/lora8b_*.log; do grep -H -E "step time|decode-only|with prefill" "$f"; done
cd "$(dirname "$A")" && tar czf "lease-$MODE.tgz" "$MODE" && rm -rf "$MODE"
