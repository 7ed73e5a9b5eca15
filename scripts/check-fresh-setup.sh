#!/usr/bin/env bash
# CI check that the setup scripts work on a fresh machine, in seconds and
# without the 1 GB CUDA toolkit download:
#   1. the stub libcuda (scripts/make-cuda-stub.sh, which scripts/setup-cuda.sh
#      calls) from an EMPTY cargo cache: a fresh CARGO_HOME, so cust_raw must be
#      fetched from the registry; the stub must define the driver functions the
#      CUDA backend calls, and every one cust_raw declares;
#   2. every shell script in scripts/ parses, and reports what failed when it
#      fails (it sources scripts/lib/on-error.sh).
set -euo pipefail
# shellcheck source=scripts/lib/on-error.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/on-error.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

FRESH="$(mktemp -d)"
trap 'rm -rf "$FRESH"' EXIT

echo "stub libcuda with an empty CARGO_HOME ($FRESH/cargo-home)"
CARGO_HOME="$FRESH/cargo-home" scripts/make-cuda-stub.sh "$FRESH/lib64"
STUB="$FRESH/lib64/libcuda.so"
[ -e "$STUB" ] || die "$STUB was not written"
command -v nm >/dev/null || die "nm (binutils) is needed to check the stub's symbols"
DEFINED="$(nm -D --defined-only "$STUB" | awk '{ print $3 }' | sort -u)"
# Driver functions the CUDA backend (through cust) calls: context, memory,
# streams, events, kernel launches, graphs.
for symbol in cuInit cuDeviceGet cuDevicePrimaryCtxRetain cuCtxSetCurrent cuMemAllocAsync \
  cuMemcpyHtoDAsync_v2 cuMemcpyDtoHAsync_v2 cuStreamCreate cuEventRecord cuModuleLoadData \
  cuLaunchKernel cuStreamBeginCapture_v2 cuGraphInstantiateWithFlags cuGraphLaunch; do
  grep -qx "$symbol" <<<"$DEFINED" || die "the stub libcuda lacks $symbol"
done
DECLARED="$(grep -ohE "pub fn cu[A-Za-z0-9_]+" "$FRESH"/cargo-home/registry/src/*/cust_raw-*/src/cuda.rs \
  | sed 's/pub fn //' | sort -u)"
MISSING="$(comm -23 <(echo "$DECLARED") <(echo "$DEFINED"))"
[ -z "$MISSING" ] || die "the stub lacks functions cust_raw declares: $(echo "$MISSING" | head -n 5 | tr '\n' ' ')"
echo "ok: $(echo "$DEFINED" | wc -l) driver functions defined"

echo "every script parses and reports its failures"
for script in scripts/*.sh scripts/gpu/package.sh; do
  bash -n "$script" || die "$script does not parse"
  grep -q 'lib/on-error.sh' "$script" || die "$script does not source scripts/lib/on-error.sh"
done
echo "ok"
