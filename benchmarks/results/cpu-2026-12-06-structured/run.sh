#!/usr/bin/env bash
# Structured-output overhead on the CPU backend (issue 17): batch 64 (all at once), SmolLM2-135M-Instruct,
# 128 prompt + 128 output tokens, greedy, unconstrained vs every output under benchmarks/schemas/records.json
# (minItems 48: no output completes it within 128 tokens, so every step is constrained); two rounds, alternating.
# Usage: run.sh PAGODA_BIN MODEL OUT_DIR
set -euo pipefail
B=$1; M=$2; D=$3
for round in 1 2; do
  for kind in plain json; do
    extra=(); [ $kind = json ] && extra=(--json-schema benchmarks/schemas/records.json)
    "$B" bench throughput --device cpu --model "$M" --num-prompts 64 --input-len 128 --output-len 128 \
      --output-json "$D/structured_${kind}_r$round.json" "${extra[@]}" > "$D/structured_${kind}_r$round.log" 2>&1
    grep -E "output tok|throughput|step time" "$D/structured_${kind}_r$round.log" | sed "s/^/$kind r$round: /"
  done
done
