#!/usr/bin/env bash
# The dashboard's browser test: headless Chromium loads /dashboard from a running
# `pagoda serve` under load on the default model.
#   1. Debian's `chromium` package (installed with apt-get when missing, as CI runs: root,
#      Debian; elsewhere install it yourself or set CHROMIUM)
#   2. `pagoda serve --model MODEL` with an API key, in the background on a free loopback port
#   3. scripts/dashboard_check.py (Python standard library only: it drives Chromium over the
#      DevTools protocol on a pipe and decodes the screenshot with zlib): puts the server under
#      load, waits for the KV map to draw blocks in use, saves a screenshot and checks its
#      regions (header, owned and free cells in the map's box, chart lines), then, once idle,
#      checks that every count the page shows equals /metrics
#   4. SIGTERM to the server.
# Usage: scripts/dashboard-check.sh [MODEL_PATH]   (default: the model scripts/fetch-model.sh fetches)
# PAGODA_BIN picks the binary (default target/release/pagoda, built from this checkout);
# OUT_DIR keeps the screenshot and the values read (default target/dashboard-check).
set -euo pipefail
# shellcheck source=scripts/lib/on-error.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/on-error.sh"
# shellcheck source=scripts/lib/serve.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/serve.sh"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODEL="${1:-${PAGODA_TEST_MODEL:-$(scripts/fetch-model.sh)}}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
if [[ -z "${PAGODA_BIN:-}" ]]; then
    PAGODA_BIN="$TARGET_DIR/release/pagoda"
    echo "==> building $PAGODA_BIN" >&2
    cargo build --release --bin pagoda
fi
[[ -x "$PAGODA_BIN" ]] || die "$PAGODA_BIN is not an executable"
OUT_DIR="${OUT_DIR:-$TARGET_DIR/dashboard-check}"
PYTHON="${PYTHON:-python3}"

CHROMIUM="${CHROMIUM:-$(command -v chromium || true)}"
if [[ -z "$CHROMIUM" ]]; then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "==> installing Debian's chromium package" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends chromium >/dev/null \
            || { apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium >/dev/null; } \
            || die "apt-get could not install chromium"
        CHROMIUM="$(command -v chromium)"
    else
        die "no chromium: install Debian's chromium package (apt-get install chromium) or set CHROMIUM"
    fi
fi

API_KEY="dashboard-check-key"
export PAGODA_API_KEY="$API_KEY"
start_server "$PYTHON" dashboard-check --model "$MODEL"

status=0
"$PYTHON" scripts/dashboard_check.py --base-url "http://127.0.0.1:$PORT" --api-key "$API_KEY" \
    --chromium "$CHROMIUM" --out "$OUT_DIR" || status=$?
stop_server
trap - EXIT
if [[ $status -ne 0 ]]; then
    echo "error: the dashboard check failed; server log: $LOG, screenshot in $OUT_DIR" >&2
    tail -n 20 "$LOG" >&2
    exit "$status"
fi
echo "==> dashboard check passed (screenshot: $OUT_DIR/dashboard.png)" >&2
