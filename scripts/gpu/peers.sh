#!/usr/bin/env bash
# Peers on the GPU machine: vLLM 0.24.0 and transformers on the model and requests Pagoda runs.
# Runs from the repository root, after scripts/gpu/vllm-wheels.sh split the wheels here into
# .device/vllm/NN/ (one folder a device call carries). State lives in /tmp/pagoda-gpu while
# the machine is warm; each phase is one word, several run in one call, in order:
#
#   vllm-stash       keep the wheel part(s) this call carried (.device/vllm/NN/) in $W/vllm
#   vllm-install     join the parts, check every hash, pip install --no-index --no-deps into
#                    $W/vllm-site, then import vllm (and its CUDA kernels) to prove it loads
#   workloads        the ShareGPT-like and shared-prefix workloads, by pagoda bench workload
#                    (the model and the fixed workload come from session.sh model8b)
#   vllm-throughput  offline: vllm_peer.py throughput over $PEER_WORKLOADS (default
#                    "fixed sharegpt prefix") at each of $PEER_TEMPERATURES (default "0 1"),
#                    one engine, prefix cache reset before each run
#   vllm-latency     single stream 512 in / 128 out, 3 timed runs; its warm-up request gives
#                    the cold start (process start to first token) with the compile cache as found
#   vllm-coldstart   process start to first token twice: an empty vLLM cache (torch.compile
#                    and graphs from scratch, a first start) and the cache that run left (a restart)
#   vllm-serve       vllm serve (its defaults) driven by pagoda bench serve with $SERVE_WORKLOAD
#                    (default the fixed workload) at Poisson rates ${SERVE_RATES:-8 16 24} req/s
#                    and all at once; the prefix cache is reset between rates
#   vllm-spec        speculative decoding (issue 18): SmolLM2 (the GGUF that speculative.sh's
#                    smollm2 phase ran, as an HF folder written by transformers, which needs the
#                    gguf wheel of .device/whl carried or installed) single stream on the prompts
#                    that phase ran, token for token (their spec_smollm2_*_plain_r1.json in
#                    $W/spec-results), plain and with n-gram k = 4, two rounds
#   pagoda-peers     Pagoda on the same workloads and temperatures (bench throughput), and
#                    latency greedy and sampled, for the same tables
#   hf-peers         transformers: static batching at ${HF_BATCH_SIZES:-64,256} and single
#                    stream on the fixed workload, by scripts/peers/hf_peer.py
#   bundle           pack everything in $OUT into one file, $OUT/peers-<time>.tar.gz (a call
#                    brings back at most 8 files)
#
# Every run writes its raw JSON to $OUT (device, driver, versions, command inside); logs go
# there too. vLLM runs with the defaults a user gets: CUDA graphs and torch.compile, prefix
# caching, chunked prefill, its own token budget. Two settings are environment only:
# VLLM_USE_FLASHINFER_SAMPLER=0, since FlashInfer is not carried (it only serves top-k/top-p
# sampling, which these runs do not use, and attention backends vLLM ranks below FlashAttention
# on Hopper), and no usage statistics (the machine reaches no network).
set -uo pipefail
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}"
W=/tmp/pagoda-gpu
OUT="${OUT:-$W/out}"
B=.device/bin
mkdir -p "$W" "$OUT"
L8B="${L8B:-$W/llama3-8b-random}"
WORKLOAD="${WORKLOAD:-$W/llama3-8b-workload.jsonl}"
SHAREGPT="$W/llama3-8b-sharegpt.jsonl"
PREFIX="$W/llama3-8b-prefix.jsonl"
VOCAB=128256
SITE="$W/vllm-site"
PEERS=scripts/peers
# shellcheck source=scripts/gpu/lib.sh
source scripts/gpu/lib.sh


workload_file() {
  case "$1" in
    fixed) echo "$WORKLOAD" ;;
    sharegpt) echo "$SHAREGPT" ;;
    prefix) echo "$PREFIX" ;;
    *) echo "$1" ;;
  esac
}

vllm_env() {
  [ -d "$SITE/vllm" ] || { echo "peers.sh: vLLM is not installed here (phases vllm-stash, vllm-install)" >&2; return 1; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$SITE/bin:$PATH"
  export VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
  # Every compile cache of a vLLM run under one folder, so a cold start can start from none.
  export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$W/vllm-cache}"
  export TRITON_CACHE_DIR="$VLLM_CACHE_ROOT/triton" TORCHINDUCTOR_CACHE_DIR="$VLLM_CACHE_ROOT/inductor"
  export PAGODA_COMMIT="${PAGODA_COMMIT:-$(git rev-parse HEAD 2>/dev/null || cat .device/bin/commit 2>/dev/null || true)}"
}

cache_state() { # whether vLLM's cache (torch.compile artefacts) holds anything yet
  if [ -n "$(ls -A "$VLLM_CACHE_ROOT" 2>/dev/null)" ]; then echo warm; else echo empty; fi
}


for phase in "$@"; do
  echo "=== $phase ($(date -u +%H:%M:%S))"
  t0=$SECONDS
  case "$phase" in
    vllm-stash)
      # This call's folder, and any an earlier call left in the tree.
      mkdir -p "$W/vllm"
      for d in .device/vllm/*/; do
        [ -f "$d/manifest.sha256" ] || continue
        cp "$d"part.* "$W/vllm/" && cp "$d/manifest.sha256" "$W/vllm/manifest.sha256"
      done
      ls -l "$W/vllm"
      echo "parts here: $(ls "$W"/vllm/part.* 2>/dev/null | wc -l) of $(grep -c ' part\.' "$W/vllm/manifest.sha256" 2>/dev/null || echo '?')" ;;
    vllm-install)
      (
        set -e
        cd "$W/vllm"
        # The parts as split here (manifest.sha256 lists each part, then each wheel).
        grep ' part\.' manifest.sha256 | sha256sum -c --quiet -
        cat part.* > wheels.tar
        tar xf wheels.tar && rm -f wheels.tar
        grep '\.whl$' manifest.sha256 | sha256sum -c --quiet -
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" ./*.whl
        echo "installed $(ls ./*.whl | wc -l) wheels into $SITE ($(du -sh "$SITE" | cut -f1))"
      ) || { echo "vllm-install failed"; exit 1; }
      vllm_env
      python3 - <<'EOF' 2>&1 | grep -v -E "^(INFO|DEBUG)" | tee "$OUT/vllm_install.log"
import torch, vllm
print("vllm", vllm.__version__, "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
import vllm._C_stable_libtorch  # the CUDA kernels: links libcudart.so.13 and libtorch
from vllm.vllm_flash_attn.flash_attn_interface import FA2_AVAILABLE, FA3_AVAILABLE, FA3_UNAVAILABLE_REASON
print("flash-attention: FA3", FA3_AVAILABLE, FA3_UNAVAILABLE_REASON or "", "| FA2", FA2_AVAILABLE)
from vllm import LLM, SamplingParams  # noqa: F401  the offline API
import vllm.entrypoints.openai.api_server  # noqa: F401  vllm serve
import vllm.v1.engine.core, vllm.v1.worker.gpu_worker, vllm.model_executor.models.llama  # noqa: F401,E401
print("vllm imports: ok")
EOF
      ;;
    workloads)
      PAGODA=$(pagoda_bin) || exit 1
      # ShareGPT-like: log-normal lengths around 160 prompt / 128 output tokens, outputs 8..768.
      $PAGODA bench workload --vocab-size $VOCAB --lengths sharegpt --num-prompts 1000 \
        --input-len 160 --output-len 128 --max-len 2048 --workload-seed 1 --write-dataset "$SHAREGPT"
      # Shared prefix: 4 system prompts of 1,536 tokens, 512 requests, each 128 own + 128 output tokens.
      $PAGODA bench workload --vocab-size $VOCAB --lengths shared-prefix --num-prompts 512 \
        --num-prefixes 4 --prefix-len 1536 --input-len 128 --output-len 128 --workload-seed 2 \
        --write-dataset "$PREFIX" ;;
    vllm-throughput)
      vllm_env || exit 1
      args=()
      for t in ${PEER_TEMPERATURES:-0 1}; do
        for w in ${PEER_WORKLOADS:-fixed sharegpt prefix}; do
          args+=(--run "$(workload_file "$w"):$t:$w")
        done
      done
      # shellcheck disable=SC2086
      python3 $PEERS/vllm_peer.py throughput --model "$L8B" "${args[@]}" ${VLLM_PEER_ARGS:-} \
        --output-json "$OUT/vllm_throughput.json" > "$OUT/vllm_throughput.log" 2>&1
      echo "vllm throughput rc=$?"
      python3 - "$OUT/vllm_throughput.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print("attention backend:", r.get("attention_backend"), "| load", r.get("load_s"), "s")
for x in r["runs"]:
    print(f"{x['label']:9s} T={x['temperature']}: {x['output_tokens_per_s']:9.1f} output tok/s "
          f"{x['total_tokens_per_s']:9.1f} total tok/s {x['elapsed_s']:7.2f} s  check {x['check']['passed']}")
EOF
      ;;
    vllm-latency)
      vllm_env || exit 1
      start=$(date +%s.%N)
      PEER_COMPILE_CACHE=$(cache_state) python3 $PEERS/vllm_peer.py latency --model "$L8B" \
        --input-len 512 --output-len 128 --num-iters 3 --process-start "$start" \
        --output-json "$OUT/vllm_latency.json" > "$OUT/vllm_latency.log" 2>&1
      echo "vllm latency rc=$?"
      [ -f "$OUT/vllm_latency.json" ] && python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))
print("TTFT", r["median_ttft_s"]*1e3, "ms; decode", r["median_decode_tokens_per_s"], "tok/s; cold start",
      r["cold_start_s"], "s (cache", r["compile_cache"], "); backend", r["attention_backend"])' "$OUT/vllm_latency.json" ;;
    vllm-coldstart)
      vllm_env || exit 1
      rm -rf "$VLLM_CACHE_ROOT.cold" && mv "$VLLM_CACHE_ROOT" "$VLLM_CACHE_ROOT.cold" 2>/dev/null
      for run in ${COLDSTART_RUNS:-first restart}; do
        start=$(date +%s.%N)
        PEER_COMPILE_CACHE=$(cache_state) python3 $PEERS/vllm_peer.py coldstart --model "$L8B" \
          --input-len 512 --output-len 128 --process-start "$start" \
          --output-json "$OUT/vllm_coldstart_$run.json" > "$OUT/vllm_coldstart_$run.log" 2>&1
        echo "vllm cold start ($run) rc=$?: $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))
print(r["cold_start_s"], "s to the first token; engine built in", r["load_s"], "s; cache", r["compile_cache"])' \
          "$OUT/vllm_coldstart_$run.json" 2>/dev/null)"
      done ;;
    vllm-serve)
      vllm_env || exit 1
      PAGODA=$(pagoda_bin) || exit 1
      SW=$(workload_file "${SERVE_WORKLOAD:-fixed}")
      PORT=8021
      flags=(--port $PORT)
      ls "$L8B"/tokenizer* >/dev/null 2>&1 || flags+=(--skip-tokenizer-init)
      # shellcheck disable=SC2086
      cmd=(python3 -m vllm.entrypoints.cli.main serve "$L8B" "${flags[@]}" ${VLLM_SERVE_ARGS:-})
      echo "${cmd[*]}"
      # Dev mode only adds /reset_prefix_cache, so one server serves every rate cold.
      VLLM_SERVER_DEV_MODE=1 "${cmd[@]}" > "$OUT/vllm_serve.log" 2>&1 &
      SERVER=$!
      if ! wait_http "http://127.0.0.1:$PORT/health" 900; then
        echo "vllm serve did not come up"; tail -30 "$OUT/vllm_serve.log"; kill -TERM $SERVER; exit 1
      fi
      echo "server up after $((SECONDS - t0)) s"
      for rate in ${SERVE_RATES:-8 16 24} inf; do
        python3 -c 'import sys, urllib.request as u
print("reset_prefix_cache", u.urlopen(u.Request(sys.argv[1], method="POST"), timeout=30).status)' \
          "http://127.0.0.1:$PORT/reset_prefix_cache" || echo "reset_prefix_cache failed: this rate may find cached prefixes"
        echo "--- request rate $rate"
        $PAGODA bench serve --base-url "http://127.0.0.1:$PORT" --dataset "$SW" --vocab-size $VOCAB \
          --request-rate "$rate" --output-json "$OUT/vllm_serve_rate_$rate.json" 2>&1 \
          | tee "$OUT/vllm_serve_rate_$rate.txt" | grep -E "Successful|Failed|duration|throughput|TTFT|TPOT|ITL|Self-check"
        python3 -c 'import sys, urllib.request as u; print(u.urlopen(sys.argv[1]).read().decode())' \
          "http://127.0.0.1:$PORT/metrics" | grep -E "^vllm:(prefix_cache_(queries|hits)_total|num_preemptions_total|request_success_total)" \
          > "$OUT/vllm_serve_metrics_$rate.txt"
        cat "$OUT/vllm_serve_metrics_$rate.txt"
      done
      kill -TERM $SERVER; wait $SERVER; echo "server exit $?"
      python3 $PEERS/vllm_peer.py describe --log "$OUT/vllm_serve.log" --server-command "${cmd[*]}" \
        --label "serve $(basename "$SW")" --output-json "$OUT/vllm_serve_meta.json" | cut -c1-300 ;;
    vllm-spec)
      vllm_env || exit 1
      HF="$W/smollm2-hf"
      if [ ! -f "$HF/config.json" ]; then
        ls .device/whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-cache-dir \
          --target "$W/gguf-site" .device/whl/*.whl
        PYTHONPATH="$W/gguf-site:$PYTHONPATH" python3 - "$W/SmolLM2-135M-Instruct.Q4_1.gguf" "$HF" <<'PY' || exit 1
import os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
gguf, out = sys.argv[1], sys.argv[2]
folder, name = os.path.dirname(gguf), os.path.basename(gguf)
# bf16, as Pagoda runs it (its loader dequantizes the GGUF's blocks to bf16 too).
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.bfloat16)
model.save_pretrained(out)
AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
print("wrote", out, sorted(os.listdir(out)))
PY
      fi
      NGRAM='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
      for round in 1 2; do
        for prompt in copy-passage edit-code; do
          ids="$W/spec-results/spec_smollm2_${prompt}_plain_r1.json"
          [ -f "$ids" ] || { echo "vllm-spec: $ids is missing (speculative.sh smollm2 first)"; exit 1; }
          for mode in plain ngram4; do
            extra=(); [ "$mode" = ngram4 ] && extra=(--engine-arg "speculative_config=$NGRAM")
            name="vllm_spec_smollm2_${prompt}_${mode}_r$round"
            python3 $PEERS/vllm_peer.py latency --model "$HF" --prompt-ids-from "$ids" --output-len 256 \
              --num-iters 3 "${extra[@]}" --label "$prompt $mode" --output-json "$OUT/$name.json" \
              > "$OUT/$name.log" 2>&1
            echo "$name rc=$? $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r.get("median_decode_tokens_per_s"), "tok/s decode")' "$OUT/$name.json" 2>/dev/null)"
          done
        done
      done ;;
    pagoda-peers)
      PAGODA=$(pagoda_bin) || exit 1
      for t in ${PEER_TEMPERATURES:-0 1}; do
        for w in ${PEER_WORKLOADS:-fixed sharegpt prefix}; do
          echo "--- pagoda $w, temperature $t"
          # shellcheck disable=SC2086
          $PAGODA bench throughput --device cuda --model "$L8B" --dataset "$(workload_file "$w")" \
            --temperature "$t" ${PAGODA_THROUGHPUT_FLAGS:---max-num-batched-tokens 16384} \
            --output-json "$OUT/pagoda_throughput_${w}_t$t.json" > "$OUT/pagoda_throughput_${w}_t$t.log" 2>&1
          echo "rc=$?"; grep -E "throughput:|self-check|prefix cache|error" "$OUT/pagoda_throughput_${w}_t$t.log"
        done
        $PAGODA bench latency --device cuda --model "$L8B" --input-len 512 --output-len 128 --num-iters 3 \
          --temperature "$t" --output-json "$OUT/pagoda_latency_t$t.json" > "$OUT/pagoda_latency_t$t.log" 2>&1
        echo "latency T=$t rc=$?"; grep -E "TTFT|decode:|cold start|self-check" "$OUT/pagoda_latency_t$t.log"
      done ;;
    hf-peers)
      python3 $PEERS/hf_peer.py --model "$L8B" --workload "$WORKLOAD" --modes static,bs1 \
        --batch-size "${HF_BATCH_SIZES:-64,256}" --output-len 128 --output-json "$OUT/hf_peer.json" 2>&1 \
        | grep -v Warning | tee "$OUT/hf_peer.log" | cut -c1-400 ;;
    bundle)
      name="peers-$(date -u +%Y%m%d-%H%M%S).tar.gz"
      (cd "$OUT" && tar czf "$W/$name" --exclude='peers-*.tar.gz' . && rm -rf ./* && mv "$W/$name" .)
      ls -l "$OUT" ;;
    *) echo "unknown phase $phase"; exit 2 ;;
  esac
  echo "=== $phase done in $((SECONDS - t0)) s"
done
