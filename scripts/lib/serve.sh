# Starting `pagoda serve` for the check scripts (sourced after scripts/lib/on-error.sh, whose `die`
# it uses).
#
# start_server PYTHON NAME SERVE_ARGS...
#   picks a free loopback port (PORT, unless it is set), starts "$PAGODA_BIN" serve SERVE_ARGS on
#   127.0.0.1:$PORT in the background (the environment passes through, PAGODA_API_KEY included) with
#   its output in LOG (a temporary file named after NAME), stops it when the script exits, and waits
#   up to 300 s for /health. Sets PORT, LOG and SERVER_PID.
# stop_server
#   SIGTERM to the server if it still runs, and waits for it.

start_server() {
    local python=$1 name=$2
    shift 2
    PORT="${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
    LOG="$(mktemp -t "pagoda-$name.XXXXXX.log")"
    echo "==> starting $PAGODA_BIN serve on 127.0.0.1:$PORT (log: $LOG)" >&2
    "$PAGODA_BIN" serve "$@" --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
    SERVER_PID=$!
    trap stop_server EXIT

    echo "==> waiting for /health" >&2
    local _
    for _ in $(seq 1 300); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            cat "$LOG" >&2
            die "the server exited while starting (its log is above)"
        fi
        if "$python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=2)" 2>/dev/null; then
            return 0
        fi
        sleep 1
    done
    tail -n 40 "$LOG" >&2
    die "the server did not answer /health on 127.0.0.1:$PORT within 300 s (log: $LOG)"
}

stop_server() {
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
