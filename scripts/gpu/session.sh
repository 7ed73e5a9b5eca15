#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with what package.sh built.
# Phases (each one device call; state lives in /tmp/pagoda-gpu while the machine is warm):
#   stash        keep the thirds of the SmolLM2 GGUF this call carries (.device/gguf.0N)
#   join         join the three thirds and check the hash
#   keep-bin     keep pagoda and the GGUF hash for calls that do not carry .device/bin
#   sanitize     compute-sanitizer memcheck and racecheck over the quick conformance grid
#   kernels      the CUDA backend's device tests, then every kernel against the CPU reference
#                (conformance, quick and full grids)
#   model-check  SmolLM2 on the GPU: whole-model tests vs CPU and transformers, a chat demo
#   bench8b      build the random-weight Llama-3-8B (hf_peer.py), transformers static batching,
#                then pagoda bench throughput + latency on the same requests (latency also with
#                --enforce-eager and with PAGODA_DISABLE_PDL=1)
#   peer-cb      transformers continuous batching and single stream on the same model/requests
#   kbench       kernel bench (decode partition sweep) + conformance per forced partition
#   model8b      only build the random-weight Llama-3-8B and its request file
#   pagoda8b     pagoda bench throughput + latency on them
#   throughput16k  the throughput run with --max-num-batched-tokens 16384
#   eager16k     the same with --enforce-eager (no CUDA graphs), for comparison
#   ncu8b        kernel times (ncu) of decode steps at batch 256 and at batch 1
#   async8b      asynchronous scheduling on and off: single stream (two alternating rounds),
#                and throughput16k with it off
#   serve8b      online: pagoda serve on the 8B model, pagoda bench serve at Poisson rates
#                ($SERVE_RATES, default "8 16 24" req/s) and all at once, a fresh server each
#   prefill8b    short requests' TTFT under a stream of long prompts (issue 13, D8): pagoda serve
#                with the default partial prefills and with --max-num-partial-prefills 1 (the
#                earlier behaviour), pagoda bench serve with half 4000-token and half 16-token
#                prompts at $PREFILL_RATES (default "8 12") req/s; then the offline workload both ways
#   unpack       decompress .device/xz/{bin,kbin}/*.xz (binaries carried xz-compressed, so two
#                pagoda builds and the device tests fit one call) into .device/bin and .device/kbin
#   compare8b    before/after A/B of two builds on the 8B shape ($B/pagoda-before, $B/pagoda):
#                offline throughput (16k budget) and single stream, two alternating rounds
#   kflags8b     single stream with each --kernel-* override (PDL off, GEMV off, decode partition 256)
#   variants8b   single-stream A/B: the latency run with no settings, then with each
#                ';'-separated set of VAR=VALUE settings in $LAT_VARIANTS; two alternating rounds
# Logs go to $OUT; a short summary prints last.
set -uo pipefail
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}"
W=/tmp/pagoda-gpu
OUT="${OUT:-$W/out}"
B=.device/bin    # pagoda, hf_peer.py, gguf.sha256
K=.device/kbin   # test executables: conformance, device
KB=.device/kbench  # the kernel bench: kernels
M=.device/mtest  # the whole-model test executable: cuda_model
mkdir -p "$W" "$OUT"
SMOL="$W/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
L8B="$W/llama3-8b-random"
WORKLOAD="$W/llama3-8b-workload.jsonl"

for phase in "$@"; do
  echo "=== $phase"
  case "$phase" in
    stash)
      # Keep whichever thirds of the SmolLM2 GGUF this call carried (.device/gguf.0N).
      cp .device/gguf.0? "$W/" 2>/dev/null; ls "$W" ;;
    join)
      mkdir -p "$W/smollm2"
      cat "$W/gguf.00" "$W/gguf.01" "$W/gguf.02" > "$SMOL"
      echo "$(cat $B/gguf.sha256 2>/dev/null || cat $W/gguf.sha256)  $SMOL" | sha256sum -c - ;;
    unpack)
      for f in .device/xz/*/*.xz; do
        d=.device/$(basename "$(dirname "$f")"); mkdir -p "$d"
        xz -d -T0 -c "$f" > "$d/$(basename "$f" .xz)" && chmod +x "$d/$(basename "$f" .xz)"
      done
      ls -la $B $K ;;
    keep-bin)
      # Binaries for later calls that do not carry .device/bin or .device/kbin.
      cp $B/pagoda $B/gguf.sha256 "$W/" 2>/dev/null; cp $K/conformance "$W/" 2>/dev/null; ls "$W" ;;
    sanitize)
      # conformance from this call's .device/kbin, or the copy an earlier call kept.
      CONF=$K/conformance; [ -x "$CONF" ] || CONF=$W/conformance
      compute-sanitizer --tool memcheck --error-exitcode 9 "$CONF" quick_grid_bf16 --test-threads=1 \
        > "$OUT/sanitizer.log" 2>&1; echo "memcheck rc=$?"
      compute-sanitizer --tool racecheck --racecheck-report all --error-exitcode 9 "$CONF" quick_grid_bf16 \
        --test-threads=1 >> "$OUT/sanitizer.log" 2>&1; echo "racecheck rc=$?"
      grep -h -E "ERROR SUMMARY|RACECHECK SUMMARY|test result" "$OUT/sanitizer.log" | sort | uniq -c ;;
    kernels)
      $K/device --test-threads=1 > "$OUT/device.log" 2>&1
      echo "device tests rc=$?"; grep -E "test result|FAILED|panicked" "$OUT/device.log" | head -20
      $K/conformance --test-threads=1 --nocapture > "$OUT/conformance.log" 2>&1
      echo "conformance quick rc=$?"
      $K/conformance --ignored full_grid_bf16 --nocapture >> "$OUT/conformance.log" 2>&1
      echo "conformance full rc=$?"
      grep -E "^test |test result|FAIL|^MAXERR" "$OUT/conformance.log" | head -40 ;;
    model-check)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
      PAGODA_TEST_MODEL="$SMOL" $M/cuda_model --test-threads=1 --nocapture > "$OUT/cuda_model.log" 2>&1
      echo "cuda_model rc=$?"
      grep -E "^test |test result|teacher-forced|diverges|reproduced|panicked" "$OUT/cuda_model.log"
      PAGODA=$B/pagoda; [ -x "$PAGODA" ] || PAGODA=$W/pagoda
      $PAGODA generate --device cuda --model "$SMOL" --chat \
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
      echo "--- the same with every kernel launched eagerly (--enforce-eager: no CUDA graphs)"
      $B/pagoda bench latency --device cuda --model "$L8B" --input-len 512 --output-len 128 --num-iters 3 \
        --enforce-eager 2>&1 | tee "$OUT/pagoda_latency_eager.log"
      echo "--- the same without programmatic dependent launch (PAGODA_DISABLE_PDL=1)"
      PAGODA_DISABLE_PDL=1 $B/pagoda bench latency --device cuda --model "$L8B" --input-len 512 --output-len 128 \
        --num-iters 3 2>&1 | tee "$OUT/pagoda_latency_nopdl.log" ;;
    kbench)
      # The kernel bench (decode partitions swept), then the quick conformance
      # grid with each forced decode partition.
      $KB/kernels "${KBENCH_FILTER:-decode attention}" 2>&1 | tee "$OUT/kernels.log"
      for p in 64 128 256 512 1024; do
        PAGODA_DECODE_PARTITION=$p $K/conformance quick_grid_bf16 --test-threads=1 > "$OUT/conformance_p$p.log" 2>&1
        echo "conformance quick bf16, decode partition $p: rc=$?"
      done ;;
    model8b)
      [ -f "$L8B/config.json" ] && [ -f "$WORKLOAD" ] && { echo "model already built"; continue; }
      t0=$SECONDS
      python3 $B/hf_peer.py --preset llama3-8b --save-model "$L8B" --write-workload "$WORKLOAD" \
        --n 256 --input-len 512 --output-len 256 --modes none 2>&1 | grep -v -e Warning -e '"error"'
      echo "model build $((SECONDS - t0)) s"; ls "$L8B" ;;
    pagoda8b)
      $B/pagoda bench throughput --device cuda --model "$L8B" --dataset "$WORKLOAD" \
        --max-num-batched-tokens 8192 --output-json "$OUT/pagoda_throughput.json" 2>&1 | tee "$OUT/pagoda_throughput.log"
      $B/pagoda bench latency --device cuda --model "$L8B" --input-len 512 --output-len 128 --num-iters 3 \
        --output-json "$OUT/pagoda_latency.json" 2>&1 | tee "$OUT/pagoda_latency.log" ;;
    throughput16k)
      # The same offline run with a 16k-token step budget (fewer, larger prefill steps).
      $B/pagoda bench throughput --device cuda --model "$L8B" --dataset "$WORKLOAD" \
        --max-num-batched-tokens 16384 --output-json "$OUT/pagoda_throughput16k.json" 2>&1 \
        | tee "$OUT/pagoda_throughput16k.log" ;;
    eager16k)
      # throughput16k with --enforce-eager: what the decode graphs are worth at batch 256.
      $B/pagoda bench throughput --device cuda --model "$L8B" --dataset "$WORKLOAD" \
        --max-num-batched-tokens 16384 --enforce-eager 2>&1 | tee "$OUT/pagoda_throughput16k_eager.log" ;;
    ncu8b)
      # Kernel times of ~2 decode steps at batch 256 (throughput run), then of
      # ~2 single-stream decode steps (latency run); summed by kernel name.
      NCU="ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv"
      $NCU --launch-skip ${NCU_SKIP_BATCH:-40000} --launch-count ${NCU_COUNT_BATCH:-700} $B/pagoda bench throughput \
        --device cuda --model "$L8B" --dataset "$WORKLOAD" --max-num-batched-tokens 8192 > "$OUT/ncu_batch.csv" 2>&1
      python3 scripts/gpu/ncu_summary.py "$OUT/ncu_batch.csv" "${NCU_STEPS_BATCH:-2}"
      $NCU --launch-skip ${NCU_SKIP_BS1:-6000} --launch-count ${NCU_COUNT_BS1:-500} $B/pagoda bench latency \
        --device cuda --model "$L8B" --input-len 512 --output-len 64 --num-iters 1 > "$OUT/ncu_bs1.csv" 2>&1
      python3 scripts/gpu/ncu_summary.py "$OUT/ncu_bs1.csv" "${NCU_STEPS_BS1:-2}" ;;
    compare8b)
      for round in 1 2; do
        for build in before after; do
          exe=$B/pagoda; [ $build = before ] && exe=$B/pagoda-before
          echo "--- round $round: $build ($exe)"
          $exe bench throughput --device cuda --model "$L8B" --dataset "$WORKLOAD" --max-num-batched-tokens 16384 \
            --output-json "$OUT/compare_throughput_${build}_$round.json" > "$OUT/compare_throughput_${build}_$round.log" 2>&1
          grep -E "throughput:|step time|error|Error" "$OUT/compare_throughput_${build}_$round.log"
          $exe bench latency --device cuda --model "$L8B" --input-len 512 --output-len 128 --num-iters 3 \
            --output-json "$OUT/compare_latency_${build}_$round.json" > "$OUT/compare_latency_${build}_$round.log" 2>&1
          grep -E "decode:|TTFT|error|Error" "$OUT/compare_latency_${build}_$round.log"
        done
      done ;;
    kflags8b)
      for flags in "" "--kernel-pdl off" "--kernel-gemv off" "--kernel-decode-partition 256"; do
        echo "--- ${flags:-no kernel flags}"
        # shellcheck disable=SC2086
        $B/pagoda bench latency --device cuda --model "$L8B" --input-len 512 --output-len 128 --num-iters 3 $flags \
          2>&1 | tee -a "$OUT/kflags.log" | grep -E "decode:|TTFT|error|Error"
      done ;;
    variants8b)
      PAGODA=$B/pagoda; [ -x "$PAGODA" ] || PAGODA=$W/pagoda
      IFS=';' read -ra VARIANTS <<< "${LAT_VARIANTS:-}"
      for round in 1 2; do
        for v in "" "${VARIANTS[@]}"; do
          echo "--- round $round: ${v:-no settings}"
          env $v $PAGODA bench latency --device cuda --model "$L8B" --input-len 512 --output-len 128 \
            --num-iters 3 2>&1 | tee -a "$OUT/variants.log" | grep -E "decode:|TTFT|error|Error"
        done
      done ;;
    async8b)
      # Asynchronous scheduling against waiting for every step: single stream
      # (two alternating rounds), then the 16k offline run without it.
      PAGODA=$B/pagoda; [ -x "$PAGODA" ] || PAGODA=$W/pagoda
      for round in 1 2; do
        for flag in "" --no-async-scheduling; do
          echo "--- round $round: ${flag:-asynchronous scheduling}"
          $PAGODA bench latency --device cuda --model "$L8B" --input-len 512 --output-len 128 --num-iters 3 \
            $flag 2>&1 | tee -a "$OUT/async.log" | grep -E "decode:|TTFT|step time|error|Error"
        done
      done
      $PAGODA bench throughput --device cuda --model "$L8B" --dataset "$WORKLOAD" \
        --max-num-batched-tokens 16384 --no-async-scheduling 2>&1 | tee "$OUT/pagoda_throughput16k_sync.log" ;;
    serve8b)
      # Online: pagoda serve on the 8B model, driven over HTTP by pagoda bench serve with the
      # workload's requests at Poisson rates of ${SERVE_RATES:-8 16 24} req/s, then all at once.
      # A fresh server for each rate, so no run finds the prompts of the one before in the cache.
      PAGODA=$B/pagoda; [ -x "$PAGODA" ] || PAGODA=$W/pagoda
      for rate in ${SERVE_RATES:-8 16 24} inf; do
        $PAGODA serve --device cuda --model "$L8B" --port 8011 --max-num-batched-tokens 8192 \
          > "$OUT/serve_$rate.log" 2>&1 &
        SERVER=$!
        for _ in $(seq 1 240); do
          python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:8011/health")' \
            2>/dev/null && break
          sleep 0.5
        done
        echo "--- request rate $rate"
        $PAGODA bench serve --base-url http://127.0.0.1:8011 --dataset "$WORKLOAD" --vocab-size 128256 \
          --request-rate $rate --output-json "$OUT/serve_rate_$rate.json" 2>&1 \
          | grep -E "Successful|Failed|duration|throughput|TTFT|TPOT|ITL|E2EL"
        python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8011/metrics").read().decode())' \
          | grep -E "^pagoda:(kv_cache_blocks_used|num_requests_running|num_preemptions_total|request_success_total)[ {]"
        kill -TERM $SERVER; wait $SERVER; echo "server exit $?"
      done ;;
    prefill8b)
      PAGODA=${PAGODA:-$B/pagoda}; [ -x "$PAGODA" ] || PAGODA=$W/pagoda
      for rate in ${PREFILL_RATES:-8 12}; do
        for mode in before after; do
          flags=""; [ "$mode" = before ] && flags="--max-num-partial-prefills 1"
          # shellcheck disable=SC2086
          $PAGODA serve --device cuda --model "$L8B" --port 8012 $flags > "$OUT/prefill_${mode}_$rate.log" 2>&1 &
          SERVER=$!
          for _ in $(seq 1 240); do
            python3 -c 'import urllib.request; urllib.request.urlopen("http://127.0.0.1:8012/health")' \
              2>/dev/null && break
            sleep 0.5
          done
          echo "--- $mode (${flags:-defaults}), $rate req/s"
          $PAGODA bench serve --base-url http://127.0.0.1:8012 --vocab-size 128256 --num-prompts 96 \
            --input-len 4000 --output-len 64 --short-fraction 0.5 --short-input-len 16 --short-output-len 16 \
            --request-rate "$rate" --output-json "$OUT/prefill_${mode}_$rate.json" 2>&1 \
            | tee "$OUT/prefill_${mode}_$rate.txt" | grep -E "Successful|Failed|duration|TTFT|TPOT"
          kill -TERM $SERVER; wait $SERVER; echo "server exit $?"
        done
      done
      for mode in before after; do
        flags=""; [ "$mode" = before ] && flags="--max-num-partial-prefills 1"
        echo "--- offline workload, $mode (${flags:-defaults})"
        # shellcheck disable=SC2086
        $PAGODA bench throughput --device cuda --model "$L8B" --dataset "$WORKLOAD" $flags \
          --output-json "$OUT/prefill_offline_$mode.json" 2>&1 | tee "$OUT/prefill_offline_$mode.txt" | tail -4
      done ;;
    peer-cb)
      python3 $B/hf_peer.py --model "$L8B" --workload "$WORKLOAD" --n 256 --modes cb,bs1 2>&1 \
        | grep -v Warning | tee "$OUT/peer_cb.log" ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
