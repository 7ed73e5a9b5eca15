#!/usr/bin/env bash
# One device call (issue 20): the dense LoRA path's device tests and conformance (dense and
# per-token), the LoRA kernel bench both ways, then the 8B multi-LoRA engine runs (session.sh
# model8b, lora8b with 16, 1, 4 and 64 adapters). Run from the repository root on the GPU machine
# after scripts/gpu/package.sh, carry [".device/xz", ".device/bin/hf_peer.py",
# ".device/bin/gguf.sha256"]. Output: $OUT/lease.tgz (BENCHMARKS.md, Multi-LoRA).
set -u
bash scripts/gpu/session.sh unpack keep-bin >/dev/null 2>&1
K=.device/kbin; A=$OUT/a; mkdir -p $A
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $A/gpu.txt
$K/device --test-threads=1 --nocapture > $A/device.log 2>&1; echo "device rc=$?"
grep -E "test result|FAILED|panicked" $A/device.log | head -5
$K/conformance --test-threads=1 --nocapture > $A/conformance_dense.log 2>&1; echo "conformance dense rc=$?"
grep -E "FAIL|test result" $A/conformance_dense.log | head -5
PAGODA_LORA_DENSE_MIN_TOKENS=0 $K/conformance --test-threads=1 --nocapture > $A/conformance_pertoken.log 2>&1
echo "conformance per-token rc=$?"; grep -E "FAIL|test result" $A/conformance_pertoken.log | head -5
.device/kbench/kernels lora > $A/kernels_lora_dense.log 2>&1
PAGODA_LORA_DENSE_MIN_TOKENS=0 .device/kbench/kernels lora > $A/kernels_lora_pertoken.log 2>&1
grep -E "t256 r16 16 slots +[0-9]" $A/kernels_lora_dense.log | head -3
OUT=$A/engine; mkdir -p $OUT; export OUT
bash scripts/gpu/session.sh model8b 2>&1 | tail -2
LORA_COUNTS="16 1 4 64" bash scripts/gpu/session.sh lora8b 2>&1 | tee $OUT/lora8b.txt | grep -E "^---|throughput:|decode:|LoRA:"
for f in $OUT/lora8b_*.log; do grep -H -E "step time|decode-only|with prefill" $f; done
cd "$(dirname "$A")" && tar czf lease.tgz a && rm -rf a
