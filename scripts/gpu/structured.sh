#!/usr/bin/env bash
# Structured outputs on the GPU (issue 17), in one device call:
#   1. the CUDA backend's device tests (among them the token masks and logit
#      constraints against the CPU reference);
#   2. the random-weight Llama-3-8B shape (hf_peer.py) and 64 requests of 512 prompt tokens;
#   3. `pagoda bench throughput` at batch 64 (all 64 at once, 256 output tokens each),
#      unconstrained and with every output under benchmarks/schemas/records.json
#      (the grammar built with SmolLM2's tokenizer: the random model has none), two rounds
#      alternating, so the ratio is read within one lease.
# Carry: .device/bin (pagoda, hf_peer.py), .device/kbin (device), .device/smollm2-tokenizer.
# Results: $OUT/structured_*.json and logs.
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
B=.device/bin
W=/tmp/pagoda-gpu; mkdir -p "$W"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
# The build's commit (the tree sent here is the session checkout, not the build's branch).
cat .device/bin/build_commit.txt 2>/dev/null | tee "$OUT/build_commit.txt"

echo "== device tests"
.device/kbin/device --test-threads=1 2>&1 | tail -25 | tee "$OUT/device_tests.log"

L8B="$W/llama3-8b-random"; WORKLOAD="$W/structured-workload.jsonl"
if [ ! -f "$L8B/config.json" ] || [ ! -f "$WORKLOAD" ]; then
  t0=$SECONDS
  python3 $B/hf_peer.py --preset llama3-8b --save-model "$L8B" --write-workload "$WORKLOAD" \
    --n 64 --input-len 512 --output-len 256 --modes none 2>&1 | grep -v -e Warning -e '"error"' | tail -5
  echo "model build $((SECONDS - t0)) s"
fi

run() { # name, extra args
  local name=$1; shift
  $B/pagoda bench throughput --device cuda --model "$L8B" --dataset "$WORKLOAD" \
    --output-json "$OUT/structured_$name.json" "$@" 2>&1 | grep -v "^\s*$" | tail -30 > "$OUT/structured_$name.log"
  grep -E "output tok|output_tokens_per_s|elapsed" "$OUT/structured_$name.log" | head -3 | sed "s/^/$name: /"
}
SCHEMA=(--json-schema benchmarks/schemas/records.json --grammar-tokenizer .device/smollm2-tokenizer)
for round in 1 2; do
  run "plain_r$round"
  run "json_r$round" "${SCHEMA[@]}"
done
python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
r = {}
for n in ["plain_r1", "json_r1", "plain_r2", "json_r2"]:
    p = os.path.join(out, f"structured_{n}.json")
    if os.path.exists(p):
        r[n] = json.load(open(p))["output_tokens_per_s"]
print("output tok/s:", r)
for k in ["1", "2"]:
    if f"plain_r{k}" in r and f"json_r{k}" in r:
        print(f"round {k}: json/plain = {r['json_r'+k] / r['plain_r'+k]:.3f}")
PY
