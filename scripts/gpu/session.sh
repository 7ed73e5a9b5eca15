#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with what package.sh built.
# Phases (each one device call; state lives in /tmp/pagoda-gpu while the machine is warm):
#   stash        keep the thirds of the SmolLM2 GGUF this call carries (.device/gguf.0N)
#   join         join the three thirds and check the hash
#   keep-bin     keep pagoda and the GGUF hash for calls that do not carry .device/bin
#   sanitize     compute-sanitizer memcheck and racecheck over the quick conformance grid
#   kernels      the CUDA backend's device tests, then every kernel against the CPU reference
#                (conformance, quick and full grids)
#   model-check  SmolLM2 on the GPU: graph replays against eager steps, a chat demo (the
#                comparison with transformers is the oracle phase)
#   bench8b      build the random-weight Llama-3-8B (hf_peer.py), transformers static batching,
#                then pagoda bench throughput + latency on the same requests (latency also with
#                --enforce-eager and with PAGODA_DISABLE_PDL=1)
#   peer-cb      transformers continuous batching and single stream on the same model/requests
#   kbench       kernel bench (decode partition sweep) + conformance per forced partition
#   model8b      only build the random-weight Llama-3-8B and its request file
#   pagoda8b     pagoda bench throughput + latency on them
#   dummy8b      --load-format dummy: only a Llama-3-8B config.json (scripts/peers/hf_peer.py
#                --save-config; no weight file), random weights made on the GPU; pagoda bench latency
#                (512/128) and throughput (model8b's workload if there, else 256 x 512/256 random
#                prompts), each with its model load time; the flags of $DUMMY_FLAGS too (e.g. "-tp 2
#                --enforce-eager"; $DUMMY_PRESET=llama3-70b for the 70B shape)
#   lora8b       multi-LoRA on the 8B (after model8b): offline throughput with 0, 16, 1, 4, 64
#                synthetic rank-16 adapters (16 slots), single stream without and with one
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
#   oracle-setup install the carried gguf wheel (.device/whl) for transformers' GGUF reader, and
#                keep it and cuda_model (.device/mtest) for later calls
#   oracle       SmolLM2 against transformers on this GPU (issue 15): scripts/gpu/oracle.py writes
#                the reference (bf16, and f32 on the f16-rounded weights) for the 16 prompts of
#                tests/fixtures/oracle/smollm2_prompts.json, then cuda_model's oracle_ tests
#                compare Pagoda bf16 (graphs and eager) and f16 with it under bounds derived in
#                tests/oracle/mod.rs, and check the error model on transformers itself
#   oracle8b-ref the same reference for the random-weight Llama-3-8B (after model8b): 6 prompts
#                of random token ids, 16 to 160 long
#   oracle8b     Pagoda's side of it (runs oracle8b-ref first if its reference is missing)
#   oracle-fault the planted fault: oracle's Pagoda side (bf16 with graphs, f16) with rope_theta
#                times each factor of ${ORACLE_FAULTS:-1.01 1.1 2 0.1 0.01} in Pagoda only, a table
#                of which verdicts detect which factor, and the verdict on the last (strongest):
#                expected outcome FAIL (the phase reports "detected" and succeeds; a pass there
#                means the check is blind, and the phase fails). The smaller factors measure the
#                resolution: on the CPU dry run (3 prompts x 16 tokens) the f16 bound caught x2
#                and x0.5 but not x1.1, the bf16 bound caught x10 and x0.03 but not x0.1
#   oracle8b-fault  the same on the 8B reference, factors ${ORACLE8B_FAULTS:-0.1 0.01}
#   nccl         the NCCL communicator's tests (.device/tp/nccl): a group of one on any GPU machine
#                (eager and inside a CUDA graph, refusals, a rank that never joins times out), and on
#                a machine of 2+ GPUs every rank's exact sums, graph replays, the TCP bootstrap and an
#                abort releasing a waiting rank, then the all-reduce bus bandwidth (1 MiB..1 GiB).
#                libnccl.so.2 is PyTorch's (pip's nvidia-nccl-cu13 on the image): nccl_env finds it
#   tp8b         2+ GPUs, after model8b: TP ${TP:-2} greedy tokens against one GPU's on the random
#                8B (.device/tp/cuda_tensor_parallel: first divergence and its logit margin), then
#                pagoda bench latency and throughput at TP 1 and TP ${TP:-2} (--enforce-eager both)
# Logs go to $OUT; a short summary prints last.
#
# The oracle in one lease (scripts/gpu/package.sh first; each line one device call, with the
# `carry` list; /tmp/pagoda-gpu keeps state between the calls while the machine stays warm):
#   1. carry [".device/mtest", ".device/whl", ".device/gguf.00"]:
#        bash scripts/gpu/session.sh stash oracle-setup
#   2. carry [".device/gguf.01"]:   bash scripts/gpu/session.sh stash
#   3. carry [".device/gguf.02"]:   bash scripts/gpu/session.sh stash join oracle
#   4. no carry:                    bash scripts/gpu/session.sh oracle-fault
#   5. carry [".device/bin"] (hf_peer.py):  bash scripts/gpu/session.sh model8b oracle8b-ref
#   6. no carry:                    bash scripts/gpu/session.sh oracle8b oracle8b-fault
# (3 and 4 may be one call; each is a few minutes, oracle-fault five factors x two engines.)
# Expected: call 3 prints "oracle: PASS" (bf16 graphs, bf16 eager, f16, self-checks); call 4
# the fault table and "planted fault (rope_theta x 0.01) detected: every verdict FAILS, as
# expected"; calls 5-6 the same for the 8B.
# $OUT gets oracle_<model>.json (transformers' reference), oracle_<model>.log (every verdict
# with its per-prompt table) and oracle_<model>_summary.json (pass/fail and worst margin of
# each verdict), oracle_<model>_fault.log and _fault_summary.json (every factor's verdicts).
set -uo pipefail
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}"
W=/tmp/pagoda-gpu
OUT="${OUT:-$W/out}"
B=.device/bin    # pagoda, hf_peer.py, gguf.sha256
K=.device/kbin   # test executables: conformance, device
KB=.device/kbench  # the kernel bench: kernels
M=.device/mtest  # the whole-model test executable: cuda_model
T=.device/tp     # tensor parallelism: nccl, cuda_tensor_parallel
WHL=.device/whl  # the gguf wheel transformers needs to read a GGUF
mkdir -p "$W" "$OUT"
# shellcheck source=scripts/gpu/lib.sh
source scripts/gpu/lib.sh
SMOL="$W/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
L8B="$W/llama3-8b-random"
WORKLOAD="$W/llama3-8b-workload.jsonl"

# NCCL for the tensor-parallel phases: NVLink multicast off (the shared machines' rule), and
# libnccl.so.2 on the loader path (PAGODA_NCCL_LIBRARY if set, else PyTorch's pip wheel, else the
# loader cache). The binaries load it at run time; nothing else needs it.
nccl_env() {
  export NCCL_NVLS_ENABLE=0
  [ -n "${PAGODA_NCCL_LIBRARY:-}" ] && { echo "NCCL: $PAGODA_NCCL_LIBRARY"; return 0; }
  local dir
  dir="$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null)"
  if [ -n "$dir" ] && [ -f "$dir/libnccl.so.2" ]; then
    export LD_LIBRARY_PATH="$dir:$LD_LIBRARY_PATH"
    echo "NCCL: $dir/libnccl.so.2"
    return 0
  fi
  ldconfig -p | grep -q 'libnccl\.so\.2' && { echo "NCCL: from the loader cache"; return 0; }
  echo "no libnccl.so.2 here: set PAGODA_NCCL_LIBRARY (pip's nvidia-nccl-cu13 was expected beside PyTorch)"
  return 1
}
gpu_count() { nvidia-smi --query-gpu=name --format=csv,noheader | wc -l; }

# The cuda_model executable: this call's, or the copy oracle-setup kept.
cuda_model() { if [ -x $M/cuda_model ]; then echo $M/cuda_model; else echo "$W/cuda_model"; fi; }

# oracle_ref NAME MODEL ARGS...: transformers' reference for MODEL into $W/oracle_NAME.json
# (and a copy in $OUT).
oracle_ref() {
  local name=$1 model=$2; shift 2
  [ -d "$W/site" ] || { echo "run oracle-setup first (the gguf wheel)"; return 1; }
  rm -f "$W/oracle_$name.json"
  PYTHONPATH="$W/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 python3 scripts/gpu/oracle.py \
    --model "$model" --checks bf16,f16 --out "$W/oracle_$name.json" "$@" 2>&1 \
    | grep -v -i -e warning -e "de-quantizing" | tee "$OUT/oracle_${name}_ref.log"
  [ -f "$W/oracle_$name.json" ] || { echo "oracle.py wrote no reference"; return 1; }
  cp "$W/oracle_$name.json" "$OUT/"
}

# oracle_pagoda NAME MODEL [FAULT]: cuda_model's oracle_ tests against $W/oracle_NAME.json, or,
# with a FAULT factor, only Pagoda's checks with rope_theta x FAULT in Pagoda. Every verdict
# goes to $OUT/oracle_NAME[_fault].log, their pass/fail and worst margins to
# $W/summary_NAME[_fault_FAULT].json. Returns the tests' status.
oracle_pagoda() {
  local name=$1 model=$2 fault=${3:-} tag="" rc=0
  [ -n "$fault" ] && tag=_fault
  local reports="$W/reports_$name$tag$fault" log="$OUT/oracle_$name$tag.log"
  rm -rf "$reports"; mkdir -p "$reports"
  [ -z "$fault" ] && : > "$log"
  local env=(PAGODA_ORACLE_JSON="$W/oracle_$name.json" PAGODA_TEST_MODEL="$model" PAGODA_ORACLE_REPORT="$reports")
  local tests=(oracle_bf16 oracle_f16 oracle_reference)
  if [ -n "$fault" ]; then
    env+=(PAGODA_ORACLE_FAULT_ROPE="$fault")
    tests=(oracle_bf16 oracle_f16)  # the fault is Pagoda's: the reference's self-check has nothing to say
  fi
  for t in "${tests[@]}"; do
    env "${env[@]}" "$(cuda_model)" --ignored "$t" --test-threads=1 --nocapture >> "$log" 2>&1 || rc=1
  done
  [ -z "$fault" ] && grep -E "^oracle |^self-check|^  (PASS|FAIL)|^test |panicked" "$log"
  python3 - "$reports" "$W/summary_$name$tag$fault.json" <<'PY'
import json, os, sys
folder, out = sys.argv[1], sys.argv[2]
verdicts = {f[:-5]: json.load(open(os.path.join(folder, f))) for f in sorted(os.listdir(folder)) if f.endswith(".json")}
json.dump(verdicts, open(out, "w"), indent=1)
for k, v in verdicts.items():
    w = v["worst_margin"]
    print(f"{k}: {'PASS' if v['passed'] else 'FAIL'}, {v['positions_compared']} positions compared, "
          f"{v['identical_prompts']}/{v['prompts']} prompts identical throughout, worst |dlp|/bound "
          f"{w['ratio']:.3f} (prompt {w['prompt']}, position {w['position']}: {w['abs_diff']:.2e} vs {w['bound']:.2e})")
PY
  [ -z "$fault" ] && cp "$W/summary_$name.json" "$OUT/oracle_${name}_summary.json"
  return $rc
}

# oracle_fault NAME MODEL FACTORS...: the planted fault, rope_theta x FACTOR in Pagoda only, for
# each factor (the last one the strongest). Every verdict must fail at the last factor; the
# others show how small a fault each check resolves. Summary: $OUT/oracle_NAME_fault_summary.json.
oracle_fault() {
  local name=$1 model=$2 f missed; shift 2
  : > "$OUT/oracle_${name}_fault.log"
  for f in "$@"; do
    echo "--- rope_theta x $f"
    oracle_pagoda "$name" "$model" "$f"
  done
  python3 - "$OUT/oracle_${name}_fault_summary.json" "$W" "$name" "$@" <<'PY'
import json, sys
out, w, name, factors = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
runs = {f: json.load(open(f"{w}/summary_{name}_fault{f}.json")) for f in factors}
json.dump(runs, open(out, "w"), indent=1)
print("rope_theta x   " + "   ".join(f"{k:>24}" for k in runs[factors[-1]]))
for f, v in runs.items():
    print(f"{f:>12}   " + "   ".join(f"{('detected' if not x['passed'] else 'missed'):>9} ({x['worst_margin']['ratio']:9.2f})"
                                      for x in v.values()))
PY
  missed=$(python3 -c 'import json, sys
v = json.load(open(sys.argv[1]))[sys.argv[2]]
print(" ".join(k for k, x in v.items() if x["passed"]) if v else "no-verdicts")' \
    "$OUT/oracle_${name}_fault_summary.json" "${!#}")
  if [ -n "$missed" ]; then
    echo "$name oracle-fault: the planted fault (rope_theta x ${!#}) was NOT detected by: $missed"
    return 1
  fi
  echo "$name oracle-fault: planted fault (rope_theta x ${!#}) detected: every verdict FAILS, as expected"
}

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
      # The opt-in LoRA kernels (grouped; 8 columns per thread) are tested here.
      export PAGODA_LORA_GROUPED=1
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
      grep -E "^test |test result|max_num_seqs|panicked" "$OUT/cuda_model.log"
      PAGODA=$(pagoda_bin) || exit 1
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
    dummy8b)
      # No weights anywhere: the config alone, and the GPU makes the values.
      preset=${DUMMY_PRESET:-llama3-8b}
      D="$W/$preset-dummy"
      [ -f "$D/config.json" ] || python3 scripts/peers/hf_peer.py --preset "$preset" --save-config "$D" 2>&1 \
        | grep -v Warning
      ls "$D"
      PAGODA=$(pagoda_bin) || exit 1
      data=(--num-prompts 256 --input-len 512 --output-len 256)
      [ "$preset" = llama3-8b ] && [ -f "$WORKLOAD" ] && data=(--dataset "$WORKLOAD")
      # shellcheck disable=SC2086
      $PAGODA bench latency --device cuda --model "$D" --load-format dummy --input-len 512 --output-len 128 \
        --num-iters 3 ${DUMMY_FLAGS:-} --output-json "$OUT/dummy_${preset}_latency.json" 2>&1 \
        | tee "$OUT/dummy_${preset}_latency.log" | grep -E "model load|cold start|TTFT|decode:|self-check|rror"
      # shellcheck disable=SC2086
      $PAGODA bench throughput --device cuda --model "$D" --load-format dummy "${data[@]}" \
        --max-num-batched-tokens 8192 ${DUMMY_FLAGS:-} --output-json "$OUT/dummy_${preset}_throughput.json" 2>&1 \
        | tee "$OUT/dummy_${preset}_throughput.log" | grep -E "model load|throughput|self-check|rror" ;;
    pagoda8b)
      $B/pagoda bench throughput --device cuda --model "$L8B" --dataset "$WORKLOAD" \
        --max-num-batched-tokens 8192 --output-json "$OUT/pagoda_throughput.json" 2>&1 | tee "$OUT/pagoda_throughput.log"
      $B/pagoda bench latency --device cuda --model "$L8B" --input-len 512 --output-len 128 --num-iters 3 \
        --output-json "$OUT/pagoda_latency.json" 2>&1 | tee "$OUT/pagoda_latency.log" ;;
    lora8b)
      # Multi-LoRA (issue 20) on the random-weight Llama-3-8B (after model8b): the offline
      # workload (16k step budget) with no adapter, then spread evenly over $LORA_COUNTS
      # synthetic rank-16 adapters on all seven projections with 16 slots (--max-loras 16;
      # the host cache holds them all, so a count above 16 measures slot swapping); then
      # single stream without and with an adapter. Results: $OUT/lora8b_*.json.
      T="$B/pagoda bench throughput --device cuda --model $L8B --dataset $WORKLOAD --max-num-batched-tokens 16384"
      # LORA_BASE=0 skips the run without adapters, LORA_LATENCY=0 the single-stream runs.
      [ "${LORA_BASE:-1}" = 1 ] && $T --output-json "$OUT/lora8b_base.json" 2>&1 | tee "$OUT/lora8b_base.log" \
        | grep -E "throughput|self-check"
      for n in ${LORA_COUNTS:-16 1 4 64}; do
        echo "--- $n adapters"
        $T --enable-lora --max-loras 16 --max-lora-rank 16 --max-cpu-loras 64 --synthetic-loras "$n" \
          --output-json "$OUT/lora8b_adapters$n.json" 2>&1 | tee "$OUT/lora8b_adapters$n.log" \
          | grep -E "throughput|self-check|LoRA:|elapsed"
      done
      L="$B/pagoda bench latency --device cuda --model $L8B --input-len 512 --output-len 128 --num-iters 3"
      [ "${LORA_LATENCY:-1}" = 1 ] && for round in 1 2; do
        $L --output-json "$OUT/lora8b_latency_base_$round.json" 2>&1 | grep -E "decode:"
        $L --enable-lora --max-loras 16 --synthetic-loras 1 --output-json "$OUT/lora8b_latency_lora_$round.json" \
          2>&1 | grep -E "decode:|LoRA:"
      done ;;
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
      PAGODA=$(pagoda_bin) || exit 1
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
      PAGODA=$(pagoda_bin) || exit 1
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
      PAGODA=$(pagoda_bin) || exit 1
      for rate in ${SERVE_RATES:-8 16 24} inf; do
        $PAGODA serve --device cuda --model "$L8B" --port 8011 --max-num-batched-tokens 8192 \
          > "$OUT/serve_$rate.log" 2>&1 &
        SERVER=$!
        wait_http http://127.0.0.1:8011/health 120 || echo "the server did not answer in 120 s"
        echo "--- request rate $rate"
        $PAGODA bench serve --base-url http://127.0.0.1:8011 --dataset "$WORKLOAD" --vocab-size 128256 \
          --request-rate $rate --output-json "$OUT/serve_rate_$rate.json" 2>&1 \
          | grep -E "Successful|Failed|duration|throughput|TTFT|TPOT|ITL|E2EL"
        python3 -c 'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8011/metrics").read().decode())' \
          | grep -E "^pagoda:(kv_cache_blocks_used|num_requests_running|num_preemptions_total|request_success_total)[ {]"
        kill -TERM $SERVER; wait $SERVER; echo "server exit $?"
      done ;;
    prefill8b)
      PAGODA=$(pagoda_bin) || exit 1
      for rate in ${PREFILL_RATES:-8 12}; do
        for mode in before after; do
          flags=""; [ "$mode" = before ] && flags="--max-num-partial-prefills 1"
          # shellcheck disable=SC2086
          $PAGODA serve --device cuda --model "$L8B" --port 8012 $flags > "$OUT/prefill_${mode}_$rate.log" 2>&1 &
          SERVER=$!
          wait_http http://127.0.0.1:8012/health 120 || echo "the server did not answer in 120 s"
          echo "--- $mode (${flags:-defaults}), $rate req/s"
          $PAGODA bench serve --base-url http://127.0.0.1:8012 --vocab-size 128256 --num-prompts 96 \
            --input-len 4000 --output-len 64 --short-fraction 0.5 --short-input-len 16 --short-output-len 16 \
            --request-rate "$rate" --output-json "$OUT/prefill_${mode}_$rate.json" 2>&1 \
            | tee "$OUT/prefill_${mode}_$rate.txt" | grep -E "Successful|Failed|duration|TTFT|TPOT"
          kill -TERM $SERVER; wait $SERVER; echo "server exit $?"
        done
      done
      [ "${PREFILL_OFFLINE:-1}" = 1 ] || continue  # PREFILL_OFFLINE=0: the online runs only
      for mode in before after; do
        flags=""; [ "$mode" = before ] && flags="--max-num-partial-prefills 1"
        echo "--- offline workload, $mode (${flags:-defaults})"
        # shellcheck disable=SC2086
        $PAGODA bench throughput --device cuda --model "$L8B" --dataset "$WORKLOAD" $flags \
          --output-json "$OUT/prefill_offline_$mode.json" 2>&1 | tee "$OUT/prefill_offline_$mode.txt" | tail -4
      done ;;
    oracle-setup)
      [ -d $WHL ] && cp $WHL/*.whl "$W/" 2>/dev/null
      [ -x $M/cuda_model ] && cp $M/cuda_model "$W/"
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" \
        "$W"/gguf-*.whl && PYTHONPATH="$W/site" python3 -c 'import gguf, torch, transformers
print("gguf", gguf.__file__, "| torch", torch.__version__, "| transformers", transformers.__version__)'
      ls "$W" ;;
    oracle)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
      t0=$SECONDS
      oracle_ref smollm2 "$SMOL" --prompts tests/fixtures/oracle/smollm2_prompts.json \
        && oracle_pagoda smollm2 "$SMOL"
      rc=$?
      echo "oracle: $([ $rc = 0 ] && echo PASS || echo "FAIL (rc=$rc)") in $((SECONDS - t0)) s" ;;
    oracle8b-ref)
      t0=$SECONDS
      oracle_ref 8b "$L8B" --random-prompts 16,32,64,96,128,160 --seed 0
      echo "oracle8b-ref: rc=$? in $((SECONDS - t0)) s" ;;
    oracle8b)
      t0=$SECONDS
      [ -f "$W/oracle_8b.json" ] || oracle_ref 8b "$L8B" --random-prompts 16,32,64,96,128,160 --seed 0
      oracle_pagoda 8b "$L8B"
      rc=$?
      echo "oracle8b: $([ $rc = 0 ] && echo PASS || echo "FAIL (rc=$rc)") in $((SECONDS - t0)) s" ;;
    oracle-fault)
      # shellcheck disable=SC2086
      oracle_fault smollm2 "$SMOL" ${ORACLE_FAULTS:-1.01 1.1 2 0.1 0.01} ;;
    oracle8b-fault)
      # shellcheck disable=SC2086
      oracle_fault 8b "$L8B" ${ORACLE8B_FAULTS:-0.1 0.01} ;;
    nccl)
      nccl_env || continue
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
      $T/nccl --test-threads=1 --nocapture > "$OUT/nccl.log" 2>&1
      echo "nccl tests rc=$?"
      grep -E "^test |test result|skipped|panicked|^NCCL |released" "$OUT/nccl.log"
      if [ "$(gpu_count)" -ge 2 ]; then
        $T/nccl --ignored all_reduce_bus_bandwidth --test-threads=1 --nocapture 2>&1 | tee "$OUT/nccl_busbw.log" \
          | grep -E "all-reduce|MiB|test result"
      fi ;;
    tp8b)
      nccl_env || continue
      tp=${TP:-2}
      [ "$(gpu_count)" -ge "$tp" ] || { echo "tp8b: TP $tp needs $tp GPUs, $(gpu_count) here"; continue; }
      PAGODA=$(pagoda_bin) || continue
      PAGODA_TEST_MODEL="$L8B" PAGODA_TEST_TP=$tp $T/cuda_tensor_parallel --test-threads=1 --nocapture > "$OUT/tp8b_tokens.log" 2>&1
      echo "TP $tp tokens against TP 1: rc=$?"; grep -E "^prompt|test result|panicked|skipped" "$OUT/tp8b_tokens.log"
      for n in 1 "$tp"; do
        echo "--- TP $n, single stream"
        $PAGODA bench latency --device cuda --model "$L8B" --input-len 512 --output-len 128 --num-iters 3 \
          --enforce-eager -tp "$n" --output-json "$OUT/tp8b_latency_tp$n.json" 2>&1 \
          | tee "$OUT/tp8b_latency_tp$n.log" | grep -E "decode:|TTFT|error|Error"
        echo "--- TP $n, offline 256 x 512/256"
        $PAGODA bench throughput --device cuda --model "$L8B" --dataset "$WORKLOAD" --max-num-batched-tokens 16384 \
          --enforce-eager -tp "$n" --output-json "$OUT/tp8b_throughput_tp$n.json" 2>&1 \
          | tee "$OUT/tp8b_throughput_tp$n.log" | grep -E "throughput|elapsed|error|Error"
      done ;;
    peer-cb)
      python3 $B/hf_peer.py --model "$L8B" --workload "$WORKLOAD" --n 256 --modes cb,bs1 2>&1 \
        | grep -v Warning | tee "$OUT/peer_cb.log" ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
