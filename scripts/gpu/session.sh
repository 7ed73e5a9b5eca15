#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with what package.sh built.
# Phases (each one device call; state lives in /tmp/pagoda-gpu while the machine is warm):
#   stash-a      keep the first half of the SmolLM2 GGUF (carry .device/gguf.00)
#   stash-b      join it with the second half (carry .device/gguf.01) and check the hash
#   kernels      every kernel against the CPU reference (conformance, quick and full grids)
#   model-check  SmolLM2 on the GPU: whole-model tests vs CPU and transformers, a chat demo
#   bench8b      build the random-weight Llama-3-8B (hf_peer.py), transformers static batching,
#                then pagoda bench throughput + latency on the same requests
#   peer-cb      transformers continuous batching and single stream on the same model/requests
# Logs go to $OUT; a short summary prints last.
set -uo pipefail
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}"
W=/tmp/pagoda-gpu
OUT="${OUT:-$W/out}"
B=.device/bin    # pagoda, hf_peer.py, gguf.sha256
K=.device/kbin   # test executables: cuda_model, conformance
mkdir -p "$W" "$OUT"
SMOL="$W/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
L8B="$W/llama3-8b-random"
WORKLOAD="$W/llama3-8b-workload.jsonl"

for phase in "$@"; do
  echo "=== $phase"
  case "$phase" in
    stash-a) cp .device/gguf.00 "$W/" && ls -la "$W" ;;
    stash-b)
      mkdir -p "$W/smollm2"
      cat "$W/gguf.00" .device/gguf.01 > "$SMOL"
      echo "$(cat $B/gguf.sha256)  $SMOL" | sha256sum -c - ;;
    kernels)
      $K/conformance --test-threads=1 --nocapture > "$OUT/conformance.log" 2>&1
      echo "conformance quick rc=$?"
      $K/conformance --ignored full_grid_bf16 --nocapture >> "$OUT/conformance.log" 2>&1
      echo "conformance full rc=$?"
      grep -E "^test |test result|FAIL|^MAXERR" "$OUT/conformance.log" | head -40 ;;
    model-check)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
      PAGODA_TEST_MODEL="$SMOL" $K/cuda_model --test-threads=1 --nocapture > "$OUT/cuda_model.log" 2>&1
      echo "cuda_model rc=$?"
      grep -E "^test |test result|teacher-forced|diverges|reproduced|panicked" "$OUT/cuda_model.log"
      $B/pagoda generate --device cuda --model "$SMOL" --chat \
        "What is the capital of France? Answer in one sentence, then name one famous landmark there." 2>&1 | tee "$OUT/demo.log" ;;
    bench8b)
      t0=$SECONDS
      python3 $B/hf_peer.py --preset llama3-8b --save-model "$L8B" --write-workload "$WORKLOAD" \
        --n 256 --input-len 512 --output-len 256 --modes static 2>&1 | grep -v Warning | tee "$OUT/peer_static.log"
      echo "peer static phase $((SECONDS - t0)) s"; ls "$L8B"
      $B/pagoda bench throughput --device cuda --model "$L8B" --dataset "$WORKLOAD" \
        --max-num-batched-tokens 8192 --output-json "$OUT/pagoda_throughput.json" 2>&1 | tee "$OUT/pagoda_throughput.log"
      $B/pagoda bench latency --device cuda --model "$L8B" --input-len 512 --output-len 128 --num-iters 3 \
        --output-json "$OUT/pagoda_latency.json" 2>&1 | tee "$OUT/pagoda_latency.log"
      echo "--- the same with cuBLAS for small batches (PAGODA_DISABLE_GEMV=1)"
      PAGODA_DISABLE_GEMV=1 $B/pagoda bench latency --device cuda --model "$L8B" --input-len 512 --output-len 128 \
        --num-iters 3 2>&1 | tee "$OUT/pagoda_latency_cublas.log" ;;
    peer-cb)
      python3 $B/hf_peer.py --model "$L8B" --workload "$WORKLOAD" --n 256 --modes cb,bs1 2>&1 \
        | grep -v Warning | tee "$OUT/peer_cb.log" ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
