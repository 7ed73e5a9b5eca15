#!/usr/bin/env bash
# Checks the server with the official `openai` Python client, end to end:
#   1. a venv with `openai` (pip, from PyPI) in .venv-openai-check/
#   2. `pagoda serve --model MODEL` in the background on a free loopback port
#   3. scripts/openai_client_check.py against it (chat streaming, completions, n=2,
#      stop strings, logprobs, structured outputs validated with jsonschema, tool calls,
#      error cases, a wrong API key)
#   4. SIGTERM to the server (a graceful shutdown), and the check's exit status.
# Usage: scripts/openai-check.sh [MODEL_PATH]   (default: the model scripts/fetch-model.sh fetches)
# PAGODA_BIN picks the binary; by default target/release/pagoda, (re)built from this
# checkout with the default features so a stale or CUDA-only build is never tested.
set -euo pipefail
# shellcheck source=scripts/lib/on-error.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/on-error.sh"
# shellcheck source=scripts/lib/serve.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/serve.sh"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODEL="${1:-${PAGODA_TEST_MODEL:-$(scripts/fetch-model.sh)}}"
if [[ -z "${PAGODA_BIN:-}" ]]; then
    PAGODA_BIN="$ROOT/target/release/pagoda"
    echo "==> building $PAGODA_BIN" >&2
    cargo build --release --bin pagoda
fi
VENV="$ROOT/.venv-openai-check"
PYTHON="${PYTHON:-python3}"
API_KEY="openai-check-key"
SERVED_NAME="pagoda-check"

if [[ ! -x "$PAGODA_BIN" ]]; then
    die "$PAGODA_BIN is not an executable"
fi

if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c "import openai, jsonschema" 2>/dev/null; then
    echo "==> creating $VENV with the openai package" >&2
    "$PYTHON" -m venv "$VENV" \
        || die "$PYTHON -m venv failed (on Debian/Ubuntu: apt-get install python3-venv), then rm -rf $VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip \
        || die "pip could not upgrade itself in $VENV (is PyPI reachable?)"
    "$VENV/bin/python" -m pip install --quiet openai jsonschema \
        || die "pip could not install openai and jsonschema (is PyPI reachable?)"
fi

export PAGODA_API_KEY="$API_KEY"
start_server "$VENV/bin/python" openai-check --model "$MODEL" --served-model-name "$SERVED_NAME" \
    --enable-auto-tool-choice --tool-call-parser hermes

status=0
"$VENV/bin/python" scripts/openai_client_check.py --base-url "http://127.0.0.1:$PORT/v1" \
    --model "$SERVED_NAME" --api-key "$API_KEY" || status=$?

echo "==> stopping the server (SIGTERM)" >&2
kill -TERM "$SERVER_PID"
server_status=0
wait "$SERVER_PID" || server_status=$?
trap - EXIT
if [[ $status -ne 0 ]]; then
    echo "error: the openai client check failed; server log: $LOG" >&2
    tail -n 40 "$LOG" >&2
    exit "$status"
fi
if [[ $server_status -ne 0 ]]; then
    echo "error: the server exited with status $server_status after SIGTERM; log: $LOG" >&2
    tail -n 40 "$LOG" >&2
    exit "$server_status"
fi
echo "==> openai client check passed" >&2
