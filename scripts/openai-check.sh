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

PORT="${PORT:-$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
LOG="$(mktemp -t pagoda-openai-check.XXXXXX.log)"
echo "==> starting $PAGODA_BIN serve on 127.0.0.1:$PORT (log: $LOG)" >&2
PAGODA_API_KEY="$API_KEY" "$PAGODA_BIN" serve --model "$MODEL" --host 127.0.0.1 --port "$PORT" \
    --served-model-name "$SERVED_NAME" --enable-auto-tool-choice --tool-call-parser hermes >"$LOG" 2>&1 &
SERVER_PID=$!
stop_server() {
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap stop_server EXIT

echo "==> waiting for /health" >&2
healthy=0
for _ in $(seq 1 300); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        cat "$LOG" >&2
        die "the server exited while starting (its log is above)"
    fi
    if "$VENV/bin/python" -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; then
        healthy=1
        break
    fi
    sleep 1
done
if [[ $healthy != 1 ]]; then
    tail -n 40 "$LOG" >&2
    die "the server did not answer /health on 127.0.0.1:$PORT within 300 s (log: $LOG)"
fi

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
