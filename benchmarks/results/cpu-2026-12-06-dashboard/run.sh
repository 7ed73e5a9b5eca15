#!/usr/bin/env bash
# The dashboard's cost on the engine loop (issue 22), CPU backend, SmolLM2-135M-Instruct: batch 64 (all at
# once), 128 prompt + 128 output tokens, greedy; without the dashboard, and with its KV view built 10 times a
# second (`--kv-view-hz 10`: the same KvViewSource the engine thread answers /v1/debug/kv with, on the same
# thread, between steps); two rounds, alternating. The view's cost is timed directly around each build and
# set against the time spent inside engine steps (`kv_view.share_of_step_time` in the JSON).
# Usage: run.sh PAGODA_BIN MODEL OUT_DIR
set -euo pipefail
B=$1; M=$2; D=$3
for round in 1 2; do
  for kind in plain view10; do
    extra=(); [ $kind = view10 ] && extra=(--kv-view-hz 10)
    "$B" bench throughput --device cpu --model "$M" --num-prompts 64 --input-len 128 --output-len 128 \
      --output-json "$D/dashboard_${kind}_r$round.json" "${extra[@]}" > "$D/dashboard_${kind}_r$round.log" 2>&1
    grep -E "throughput|dashboard KV view" "$D/dashboard_${kind}_r$round.log" | sed "s/^/$kind r$round: /"
  done
done
