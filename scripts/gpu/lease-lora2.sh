#!/usr/bin/env bash
# One device call (issue 20): the LoRA fixes written after the last GPU call of 2026-12-07 (the
# per-token expand with 8 columns per thread, opt-in; f32 reductions in the dense expand's GEMM):
# device tests, conformance both ways, the expand kernel bench, then the 8B base and 16-adapter
# throughput and single stream. Run from the repository root on the GPU machine after
# scripts/gpu/package.sh, with carry [".device/xz", ".device/bin/hf_peer.py",
# ".device/bin/gguf.sha256"] (copy this script to .device/bin/ or run it from scripts/gpu/).
# Output: $OUT/lease2.tgz.
set -u
export PAGODA_LORA_EXPAND_VEC8=1
bash scripts/gpu/session.sh unpack keep-bin >/dev/null 2>&1
K=.device/kbin; A=$OUT/b; mkdir -p $A
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $A/gpu.txt
$K/device --test-threads=1 --nocapture > $A/device.log 2>&1; echo "device rc=$?"
grep -E "test result|FAILED|panicked" $A/device.log | head -5
$K/conformance --test-threads=1 --nocapture > $A/conformance_dense.log 2>&1; echo "conformance dense rc=$?"
grep -E "FAIL|test result" $A/conformance_dense.log | head -5
PAGODA_LORA_DENSE_MIN_TOKENS=0 $K/conformance --test-threads=1 --nocapture > $A/conformance_pertoken.log 2>&1
echo "conformance per-token rc=$?"; grep -E "FAIL|test result" $A/conformance_pertoken.log | head -5
.device/kbench/kernels "lora expand" > $A/kernels_lora_expand.log 2>&1
grep -E "t1 r16 16 slots +[0-9]" $A/kernels_lora_expand.log | head -8
OUT=$A/engine; mkdir -p $OUT; export OUT
bash scripts/gpu/session.sh model8b 2>&1 | tail -1
LORA_COUNTS="16" bash scripts/gpu/session.sh lora8b 2>&1 | tee $OUT/lora8b.txt | grep -E "^---|throughput:|decode:|LoRA:"
for f in $OUT/lora8b_*.log; do grep -H -E "step time|decode-only|with prefill" $f; done
cd "$(dirname "$A")" && tar czf lease2.tgz b && rm -rf b
