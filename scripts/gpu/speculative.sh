#!/usr/bin/env bash
# Speculative decoding on the GPU (issue 18), phases in one lease:
#   stash    copy this call's .device/gguf.0N (SmolLM2 travels in thirds: a call carries 64 MiB)
#   keep-bin copy .device/bin to the machine, for later calls that carry no binaries
#   models   random-weight Llama-3-8B (target) and Llama-3.2-1B (draft) shapes (hf_peer.py), and the
#            workloads: 1 and 32 requests of 512 random prompt tokens, 256 output tokens
#   verify   the cost of a verification step (k + 1 = 5 rows: --verify-drafts 4, every decode carries
#            4 drafts) against plain decoding, batch 1 and 32, two rounds alternating; then batch 1
#            with the 5-row products on the CUDA-core GEMV (the tensor-core GEMV's ablation)
#   draft    the 8B target with the random 1B draft (acceptance near 0): the automatic off switch
#            against plain decoding, batch 1 and 32
#   smollm2  SmolLM2-135M single stream on prompts that copy (benchmarks/prompts/*.txt, chat
#            template), n-gram k = 4 against no speculation, two rounds
# Carry: .device/bin (pagoda, hf_peer.py; or keep-bin once) and, per call, .device/gguf.0N.
# PAGODA=path runs that pagoda binary instead; DUMMY=1 makes the 8B and 1B models --load-format dummy
# (a config.json alone, weights made on the GPU in seconds: no torch, no 16 GB of files); ROUNDS=1
# runs verify's alternation once.
# Results: $OUT/spec_*.json and logs.
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
W=/tmp/pagoda-gpu; mkdir -p "$W"
# The binaries: carried in .device/bin, or kept on the machine by an earlier call's keep-bin.
B=.device/bin; [ -x "$B/pagoda" ] || B="$W/bin"
PAGODA="${PAGODA:-$B/pagoda}"
[ "${DUMMY:-0}" = 1 ] && LOAD=(--load-format dummy) || LOAD=()
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
L8B="$W/llama3-8b-random"; L1B="$W/llama3-1b-random"

bench() { # name, pagoda bench args...
  local name=$1; shift
  "$PAGODA" bench "$@" "${LOAD[@]}" --device cuda --output-json "$OUT/spec_$name.json" 2>&1 | grep -v "^\s*$" \
    > "$OUT/spec_$name.log"
  grep -E "output tok/s|decode:|speculative:|self-check" "$OUT/spec_$name.log" | sed "s/^/$name: /"
  # Kept for later calls (peers.sh vllm-spec gives vLLM the prompts these ran).
  mkdir -p "$W/spec-results" && cp "$OUT/spec_$name.json" "$W/spec-results/" 2>/dev/null
}

for phase in "$@"; do
  case $phase in
    stash) cp .device/gguf.0* "$W/" && ls -la "$W" | grep gguf ;;
    keep-bin) mkdir -p "$W/bin" && cp .device/bin/* "$W/bin/" && B="$W/bin" ;;
    models)
      nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
      cat $B/build_commit.txt 2>/dev/null | tee "$OUT/build_commit.txt"
      t0=$SECONDS
      if [ "${DUMMY:-0}" = 1 ]; then
        PEER=scripts/peers/hf_peer.py; [ -f "$PEER" ] || PEER=$B/hf_peer.py
        [ -f "$L8B/config.json" ] || python3 "$PEER" --preset llama3-8b --save-config "$L8B" | tail -1
        [ -f "$L1B/config.json" ] || python3 "$PEER" --preset llama3-1b --save-config "$L1B" | tail -1
      else
        [ -f "$L8B/config.json" ] || python3 $B/hf_peer.py --preset llama3-8b --save-model "$L8B" \
          --n 1 --input-len 8 --output-len 2 --modes none 2>&1 | tail -2
        [ -f "$L1B/config.json" ] || python3 $B/hf_peer.py --preset llama3-1b --save-model "$L1B" \
          --n 1 --input-len 8 --output-len 2 --modes none 2>&1 | tail -2
      fi
      echo "models built in $((SECONDS - t0)) s"
      python3 - "$W" <<'PY'
import json, random, sys
w = sys.argv[1]
for n in (1, 32):
    rng = random.Random(7 + n)
    with open(f"{w}/spec-{n}.jsonl", "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt_token_ids": [rng.randrange(128000) for _ in range(512)],
                                "max_tokens": 256}) + "\n")
PY
      ;;
    verify)
      for round in $(seq 1 "${ROUNDS:-2}"); do
        for n in 1 32; do
          bench "plain_b${n}_r$round" throughput --model "$L8B" --dataset "$W/spec-$n.jsonl"
          bench "verify4_b${n}_r$round" throughput --model "$L8B" --dataset "$W/spec-$n.jsonl" --verify-drafts 4
        done
      done
      # Ablation: the verification's 5-row products on the CUDA-core GEMV instead of the tensor cores.
      bench "verify4_b1_simt" throughput --model "$L8B" --dataset "$W/spec-1.jsonl" --verify-drafts 4 \
        --kernel-gemv-mma-min-tokens 17 ;;
    draft)
      for n in 1 32; do
        bench "plain_draftref_b$n" throughput --model "$L8B" --dataset "$W/spec-$n.jsonl"
        bench "draft1b_b$n" throughput --model "$L8B" --dataset "$W/spec-$n.jsonl" \
          --speculative-config "{\"model\": \"$L1B\", \"num_speculative_tokens\": 4}"
        bench "draft1b_never_pause_b$n" throughput --model "$L8B" --dataset "$W/spec-$n.jsonl" \
          --speculative-config "{\"model\": \"$L1B\", \"num_speculative_tokens\": 4, \"min_acceptance_rate\": 0}"
      done ;;
    smollm2)
      GGUF="$W/SmolLM2-135M-Instruct.Q4_1.gguf"
      [ -f "$GGUF" ] || cat "$W"/gguf.00 "$W"/gguf.01 "$W"/gguf.02 > "$GGUF"
      NGRAM='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
      for round in 1 2; do
        for prompt in copy-passage edit-code; do
          args=(latency --model "$GGUF" --prompt-file "benchmarks/prompts/$prompt.txt" --chat
                --output-len 256 --num-iters 3)
          bench "smollm2_${prompt}_plain_r$round" "${args[@]}"
          bench "smollm2_${prompt}_ngram4_r$round" "${args[@]}" --speculative-config "$NGRAM"
        done
      done ;;
    summary)
      python3 - "$OUT" <<'PY'
import json, os, re, sys
out = sys.argv[1]
def load(name):
    p = os.path.join(out, f"spec_{name}.json")
    r = json.load(open(p)) if os.path.exists(p) else None
    # The step time of decode-only steps (prefill steps excluded), from the log's runner split.
    log = os.path.join(out, f"spec_{name}.log")
    if r is not None and os.path.exists(log):
        m = re.search(r"decode-only steps .*\(([0-9.]+) ms per step\)", open(log).read())
        r["decode_step_s"] = float(m.group(1)) / 1e3 if m else None
    return r
for r in (1, 2):
    for n in (1, 32):
        p, v = load(f"plain_b{n}_r{r}"), load(f"verify4_b{n}_r{r}")
        if p and v:
            step = lambda x: x["decode_step_s"] or x["elapsed_s"] / x["engine_steps"]
            print(f"round {r} batch {n}: decode-only step {step(p)*1e3:.2f} ms plain, {step(v)*1e3:.2f} ms verify(5 rows): "
                  f"ratio {step(v)/step(p):.3f}; tok/s {p['output_tokens_per_s']:.0f} vs {v['output_tokens_per_s']:.0f}")
s, p = load("verify4_b1_simt"), load("plain_b1_r2") or load("plain_b1_r1")
if s and p:
    step = lambda x: x["decode_step_s"] or x["elapsed_s"] / x["engine_steps"]
    print(f"ablation batch 1: verify(5 rows) on the CUDA-core GEMV {step(s)*1e3:.2f} ms, ratio {step(s)/step(p):.3f}")
for n in (1, 32):
    d, dn, p = load(f"draft1b_b{n}"), load(f"draft1b_never_pause_b{n}"), load(f"plain_draftref_b{n}") or load(f"plain_b{n}_r2")
    if d and p:
        print(f"draft 1B batch {n}: {d['output_tokens_per_s']:.0f} tok/s with the off switch, "
              f"{dn['output_tokens_per_s'] if dn else float('nan'):.0f} never pausing, {p['output_tokens_per_s']:.0f} plain: "
              f"ratio {d['output_tokens_per_s']/p['output_tokens_per_s']:.3f}")
for prompt in ("copy-passage", "edit-code"):
    for r in (1, 2):
        p, s = load(f"smollm2_{prompt}_plain_r{r}"), load(f"smollm2_{prompt}_ngram4_r{r}")
        if p and s:
            spec = s.get("speculative") or {}
            print(f"smollm2 {prompt} round {r}: {p['median_decode_tokens_per_s']:.0f} -> "
                  f"{s['median_decode_tokens_per_s']:.0f} tok/s ({s['median_decode_tokens_per_s']/p['median_decode_tokens_per_s']:.2f}x), "
                  f"acceptance {spec.get('acceptance_rate', 0):.2f}, mean accepted length {spec.get('mean_accepted_length', 0):.2f}")
PY
      ;;
  esac
done
