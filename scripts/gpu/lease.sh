#!/usr/bin/env bash
# One lease's chained device calls for FP8 (issue 19), multi-LoRA (issue 20) and speculative decoding
# (issue 18). From the repository root on the GPU machine, after scripts/gpu/package.sh and
# `scripts/gpu/lease.sh pack` here (xz-compressed binaries in .device/xz/<folder>/, SmolLM2's GGUF in
# fifths in .device/q/<n>/: a call carries 64 MiB, so each carries one binary folder and a fifth):
#   conformance  carry [".device/xz/kconf", ".device/q/0"]: conformance, quick grids (bf16, f16; and
#                both with FP8 decode attention on the tensor cores): FP8 cache, FP8 linear (CUDA-core and tensor-core GEMV, cuBLASLt GEMM), FP8 quantization
#                of weights, LoRA; CONFORMANCE_FULL=<seconds> adds the full bf16 grid
#   engine       carry [".device/xz/bin", ".device/q/1"] (a later engine call on the warm machine needs
#                no binaries: it may carry two fifths): ENGINE_PARTS="fp8 lora long spec"; with dummy weights (the Llama-3-8B shape from
#                its config alone, made on the GPU): single stream 512/128 and offline 256 x 512/256
#                with bf16 and FP8 weights; 16 LoRA adapters and single stream with one; 32k single
#                stream with the FP8 KV cache by decode partition; speculative decoding (the cost of a
#                verification step, a useless 1B draft and the off switch: speculative.sh)
#   kernels      carry [".device/xz/kbench", ".device/q/2"]: FP8 GEMV/MMA GEMV/GEMM rows, bf16 linear
#                rows, FP8 and bf16 decode attention
#   device       carry [".device/xz/kdev", ".device/q/3"]: the CUDA backend's device tests
#   quality      carry [".device/xz/mtest", ".device/q/4"]: SmolLM2 (joined from the fifths) on the GPU: FP8 KV cache
#                and FP8 weights against bf16 (tests/cuda_model.rs), and prompt lookup on copying
#                prompts (speculative.sh smollm2)
# State between calls lives in /tmp/pagoda-gpu (the machine stays warm 30 s after a call).
# Output: $OUT/<call>/ (logs, JSON).
# An order that fits 30 minutes of device time, most needed first (each ~2-7 minutes):
#   1. ENGINE_PARTS=fp8 engine              carry [".device/xz/bin", ".device/q/1"]
#   2. conformance                          carry [".device/xz/kconf", ".device/q/0"]
#   3. ENGINE_PARTS="sweep lora" engine     carry [".device/q/2", ".device/q/3", ".device/sweep"]
#   4. quality                              carry [".device/xz/mtest", ".device/q/4"]
#   5. ENGINE_PARTS="long spec" engine, then kernels, device, as time allows (no carry needed for 5's
#      engine call while the machine stays warm)
set -uo pipefail
CALL="${1:?latency, kernels, device, conformance, engine or pack}"
if [ "$CALL" = pack ]; then
  # Here, after package.sh: compress each binary folder a call carries.
  rm -f .device/tp/cuda_tensor_parallel  # skips on one GPU: not carried
  # One folder per call: each xz-compressed test binary is ~30 MiB (the kernels' fat binary).
  mkdir -p .device/kdev .device/kconf
  cp .device/kbin/device .device/kdev/; cp .device/kbin/conformance .device/kconf/
  rm -rf .device/xz .device/q
  for d in bin kdev kconf kbench mtest; do
    mkdir -p ".device/xz/$d"
    for f in .device/$d/*; do
      case "$f" in *.py) cp "$f" ".device/xz/$d/" ;; *.sha256) cp "$f" ".device/xz/$d/" ;;
        *) xz -9 -T0 -c "$f" > ".device/xz/$d/$(basename "$f").xz" ;; esac
    done
  done
  git rev-parse HEAD > .device/xz/bin/build_commit.txt
  MODEL="$(scripts/fetch-model.sh)"
  for n in 0 1 2 3 4; do mkdir -p ".device/q/$n"; done
  split -n 5 -d "$MODEL" .device/q/gguf.
  for n in 0 1 2 3 4; do mv ".device/q/gguf.0$n" ".device/q/$n/"; done
  du -sh .device/xz/* .device/q/*
  exit 0
fi
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}"
W=/tmp/pagoda-gpu; D=$W/dev; mkdir -p "$W" "$D"
A="$OUT/$CALL"; mkdir -p "$A"
GGUF="$W/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # a model folder of its own, for PAGODA_TEST_MODEL
t0=$SECONDS
say() { echo "[$((SECONDS - t0)) s] $*"; }
# Unpack this call's binaries into $D/<folder>/ (kept for later calls), and its GGUF third.
for f in .device/xz/*/*; do
  d="$D/$(basename "$(dirname "$f")")"; mkdir -p "$d"
  case "$f" in *.xz) xz -d -T0 -c "$f" > "$d/$(basename "$f" .xz)" && chmod +x "$d/$(basename "$f" .xz)" ;;
    *) cp "$f" "$d/" ;; esac
done
cp .device/q/*/gguf.0? "$W/" 2>/dev/null
# SmolLM2, once all five parts have come (speculative.sh smollm2 reads it here too).
if [ ! -f "$GGUF" ] && [ "$(ls "$W"/gguf.0? 2>/dev/null | wc -l)" = 5 ]; then
  mkdir -p "$(dirname "$GGUF")" && cat "$W"/gguf.0? > "$GGUF"
  sha256sum "$GGUF" | cut -d' ' -f1 > "$W/gguf.sha256.got"
  ln -sf "$GGUF" "$W/SmolLM2-135M-Instruct.Q4_1.gguf"  # where speculative.sh smollm2 looks
fi
P=$D/bin/pagoda
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$A/gpu.txt"
cat "$D/bin/build_commit.txt" 2>/dev/null | tee "$A/build_commit.txt"
# run SECONDS NAME CMD...: CMD with a time limit, output to $A/NAME.log, exit status said.
run() {
  local limit=$1 name=$2; shift 2
  timeout "$limit" "$@" > "$A/$name.log" 2>&1
  local rc=$?
  say "$name rc=$rc$([ $rc = 124 ] && echo ' (timed out)')"
  return $rc
}
bench() { # limit name args...: pagoda bench, JSON beside the log
  local limit=$1 name=$2; shift 2
  run "$limit" "$name" $P bench "$@" --device cuda --output-json "$A/$name.json"
  grep -h -E "output tok/s|throughput|decode:|TTFT|preempt|KV cache|blocks|speculative:|LoRA:|self-check|rror" \
    "$A/$name.log" | head -12 | sed "s/^/  $name: /"
}
# The 8B shape with dummy weights (made on the GPU from a config alone, in seconds): every engine run
# here uses it; a 40k context for the 32k runs. Offline: 256 random prompts of 512, 256 out each.
DM=$W/llama3-8b-dummy
if [ ! -f "$DM/config.json" ]; then
  python3 scripts/peers/hf_peer.py --preset llama3-8b --save-config "$DM" > "$A/dummy_config.log" 2>&1
  python3 - "$DM/config.json" <<'PY'
import json, sys
p = sys.argv[1]; c = json.load(open(p)); c["max_position_embeddings"] = 40960; json.dump(c, open(p, "w"), indent=1)
PY
fi
M8=(--model "$DM" --load-format dummy)
LAT=(latency "${M8[@]}" --input-len 512 --output-len 128 --num-iters 3)
TPUT=(throughput "${M8[@]}" --num-prompts 256 --input-len 512 --output-len 256 --max-num-batched-tokens 16384)
case "$CALL" in
  conformance)
    K=$D/kconf
    run 300 conformance $K/conformance "${CONFORMANCE_FILTER:-quick}" --test-threads=1 --nocapture
    grep -E "FAIL|test result" "$A/conformance.log" | head -20
    if [ -n "${CONFORMANCE_FULL:-}" ]; then  # the full bf16 grid (batch to 256, context to 8k)
      run "$CONFORMANCE_FULL" conformance_full $K/conformance full_grid_bf16 --ignored --test-threads=1 --nocapture
      grep -E "FAIL|test result" "$A/conformance_full.log" | head -20
    fi ;;
  engine)
    # ENGINE_PARTS picks what runs (one call has 10 minutes; all four take ~19): fp8 (bf16 and FP8
    # weights, single stream and offline), lora (16 adapters offline, one adapter single stream; the
    # bf16 offline run of the same lease is the base), long (32k single stream, FP8 and bf16 cache),
    # spec (speculative decoding with dummy models), sweep (the small-batch GEMV builds of
    # crates/backend-cuda/sweep/, carried in .device/sweep: needs no other binary).
    for part in ${ENGINE_PARTS:-fp8 lora long spec}; do case "$part" in
    fp8)
      bench 60 latency_bf16 "${LAT[@]}"
      bench 120 latency_fp8w "${LAT[@]}" --quantization fp8
      # One-row products on the tensor-core GEMV too (the FP8 CUDA-core GEMV read 39-77% of copy).
      bench 120 latency_fp8w_mma1 "${LAT[@]}" --quantization fp8 --kernel-gemv-mma-min-tokens 1
      grep -E "load|cold" "$A/latency_bf16.log" "$A/latency_fp8w.log" | head -6
      bench 60 tput_bf16 "${TPUT[@]}"
      bench 120 tput_fp8w "${TPUT[@]}" --quantization fp8
      grep -h "plan cache" "$A"/*.log | head -3 ;;
    lora)
      bench 90 tput_lora16 "${TPUT[@]}" --enable-lora --max-loras 16 --max-lora-rank 16 --synthetic-loras 16
      bench 40 lora_latency "${LAT[@]}" --enable-lora --max-loras 16 --synthetic-loras 1
      # The cost per adapter count, and the swap cost once the adapters outnumber the slots (last: the
      # longest, 64 adapters read and packed before its timed run).
      for n in 1 4 64; do
        bench "$([ "$n" = 64 ] && echo 240 || echo 90)" "tput_lora$n" "${TPUT[@]}" --enable-lora --max-loras 16 \
          --max-lora-rank 16 --max-cpu-loras 64 --synthetic-loras "$n"
      done ;;
    long)
      # FP8 decode attention on the tensor cores (off by default until measured), then by partition.
      bench 100 latency_32k_kv_fp8_mma latency "${M8[@]}" --kv-cache-dtype fp8 --input-len 32000 \
        --output-len 128 --num-iters 2 --kernel-decode-attention-mma on
      for p in ${PARTITIONS:-default 1024 256}; do
        extra=(); [ "$p" = default ] || extra=(--kernel-decode-partition "$p")
        bench 100 "latency_32k_kv_fp8_p$p" latency "${M8[@]}" --kv-cache-dtype fp8 --input-len 32000 \
          --output-len 128 --num-iters 2 "${extra[@]}"
      done
      bench 100 latency_32k_kv_auto latency "${M8[@]}" --input-len 32000 --output-len 128 --num-iters 2 ;;
    spec)
      OUT="$A" PAGODA="$P" DUMMY=1 ROUNDS=1 timeout 240 bash scripts/gpu/speculative.sh models verify draft summary \
        > "$A/speculative.log" 2>&1
      say "speculative rc=$?"; tail -12 "$A/speculative.log" ;;
    sweep)  # carry .device/sweep too (crates/backend-cuda/sweep/gemv-sweep.sh build: ~7 MB)
      OUT="$A" timeout 300 bash crates/backend-cuda/sweep/gemv-sweep.sh run; say "gemv sweep rc=$?" ;;
    *) say "unknown engine part $part" ;;
    esac; done ;;
  kernels)
    run 200 kernels_fp8 $D/kbench/kernels "fp8"
    grep -E "fp8" "$A/kernels_fp8.log" | head -80
    run 120 kernels_linear $D/kbench/kernels "linear"
    run 60 kernels_attention_bf16 $D/kbench/kernels "decode attention bf16"
    grep -E "attention" "$A/kernels_attention_bf16.log" ;;
  device)
    run 200 device $D/kdev/device --test-threads=1 --nocapture
    grep -E "test result|FAILED|panicked" "$A/device.log" | head -8 ;;
  quality)
    [ -f "$GGUF" ] || { say "no SmolLM2 (the five parts did not all come)"; exit 1; }
    say "GGUF sha256 $(cat "$W/gguf.sha256.got")"
    # FP8 decode attention on the CUDA cores (0), then on the tensor cores (1).
    for mma in 0 1; do
      name=cuda_model_fp8$([ $mma = 1 ] && echo _mma)
      PAGODA_TEST_MODEL="$(dirname "$GGUF")" PAGODA_DECODE_ATTENTION_MMA=$mma run 200 "$name" \
        $D/mtest/cuda_model fp8 --test-threads=1 --nocapture
      grep -E "agreement|test result|FAILED|panicked" "$A/$name.log" | head -8
    done
    OUT="$A" PAGODA="$P" timeout 200 bash scripts/gpu/speculative.sh smollm2 summary > "$A/speculative.log" 2>&1
    say "speculative rc=$?"; tail -6 "$A/speculative.log" ;;
  *) echo "unknown call $CALL" >&2; exit 2 ;;
esac
say "done"
