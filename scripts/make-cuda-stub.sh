#!/usr/bin/env bash
# Builds a link-time stand-in for the CUDA driver library, libcuda.so: the
# driver is not in the PyPI toolkit wheels, yet cust links -lcuda. The stub
# defines every cu* function that cust_raw (the version in Cargo.lock)
# declares, each returning CUDA_ERROR_NO_DEVICE; at run time the real driver
# is loaded instead.
#
# cust_raw's sources come from the cargo registry under $CARGO_HOME (default
# ~/.cargo); when they are not there (a fresh machine), they are fetched.
#
# Usage: scripts/make-cuda-stub.sh OUT_DIR
#   writes OUT_DIR/libcuda.so.1, OUT_DIR/libcuda.so (a link) and the C source.
# scripts/setup-cuda.sh calls it; scripts/test.sh runs it with an empty
# CARGO_HOME to check the fresh-machine path.
set -euo pipefail
# shellcheck source=scripts/lib/on-error.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/on-error.sh"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "make-cuda-stub: $*" >&2; }

[ $# -eq 1 ] || die "usage: scripts/make-cuda-stub.sh OUT_DIR"
OUT_DIR="$1"
CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
export CARGO_HOME

# The cust_raw version the workspace links (Cargo.lock), so the stub cannot
# drift from it.
CUST_RAW_VERSION="$(awk '/^name = "cust_raw"$/ { found = 1; next }
  found && /^version = / { gsub(/"/, "", $3); print $3; exit }' "$ROOT/Cargo.lock")"
[ -n "$CUST_RAW_VERSION" ] || die "no cust_raw package in $ROOT/Cargo.lock"

# The unpacked sources, if the registry has them. A glob with no match expands
# to nothing (nullglob), so a fresh cache is "not found", not an error.
find_cust_raw() {
  local dirs
  shopt -s nullglob
  dirs=("$CARGO_HOME"/registry/src/*/"cust_raw-$CUST_RAW_VERSION")
  shopt -u nullglob
  if [ ${#dirs[@]} -gt 0 ]; then
    echo "${dirs[0]}"
  fi
}

SRC="$(find_cust_raw)"
if [ -z "$SRC" ]; then
  log "fetching cust_raw $CUST_RAW_VERSION sources into $CARGO_HOME for its symbol list"
  command -v cargo >/dev/null || die "cargo is not on PATH (install Rust: https://rustup.rs)"
  TMP="$(mktemp -d)"
  trap 'rm -rf "$TMP"' EXIT
  mkdir -p "$TMP/src"
  echo 'fn main() {}' >"$TMP/src/main.rs"
  printf '[package]\nname = "cust-raw-symbols"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\ncust_raw = "=%s"\n' \
    "$CUST_RAW_VERSION" >"$TMP/Cargo.toml"
  (cd "$TMP" && cargo fetch --quiet) \
    || die "cargo could not fetch cust_raw $CUST_RAW_VERSION from the crates.io registry (is it reachable?)"
  SRC="$(find_cust_raw)"
  [ -n "$SRC" ] || die "cargo fetch succeeded, but $CARGO_HOME/registry/src/*/cust_raw-$CUST_RAW_VERSION is not there"
fi

BINDINGS="$SRC/src/cuda.rs"
[ -f "$BINDINGS" ] || die "$BINDINGS is missing: cust_raw's layout changed; update this script"
command -v gcc >/dev/null || die "gcc is needed to build the stub libcuda (apt-get install gcc)"

mkdir -p "$OUT_DIR"
{
  echo "/* Link-time stand-in for the CUDA driver (cust_raw $CUST_RAW_VERSION); never loaded at run time. */"
  # `|| true`: grep finding nothing is checked just below, with a message.
  { grep -oE "pub fn cu[A-Za-z0-9_]+" "$BINDINGS" || true; } | sed 's/pub fn //' | sort -u \
    | sed 's/.*/int &(void) { return 100; \/* CUDA_ERROR_NO_DEVICE *\/ }/'
} >"$OUT_DIR/libcuda_stub.c"
COUNT="$(grep -c '^int cu' "$OUT_DIR/libcuda_stub.c" || true)"
[ "$COUNT" -gt 0 ] || die "found no cu* functions in $BINDINGS: cust_raw's layout changed; update this script"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$OUT_DIR/libcuda.so.1" "$OUT_DIR/libcuda_stub.c"
ln -sfn libcuda.so.1 "$OUT_DIR/libcuda.so"
log "stub libcuda with $COUNT symbols in $OUT_DIR"
