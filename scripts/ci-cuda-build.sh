#!/usr/bin/env bash
# What CI runs for the CUDA path (no GPU there): install the toolchain into
# .cuda/ (scripts/setup-cuda.sh), then compile and link the `cuda` feature's
# binary and the CUDA backend's test and bench executables without running
# them, and lint the backend, so the CUDA path cannot rot unnoticed.
set -euo pipefail
# shellcheck source=scripts/lib/on-error.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/on-error.sh"
cd "$(dirname "$0")/.."

scripts/setup-cuda.sh
[ -f .cuda/env.sh ] || die "scripts/setup-cuda.sh succeeded but wrote no .cuda/env.sh"
# shellcheck disable=SC1091
source .cuda/env.sh

echo "==> cargo build --features cuda (the pagoda binary with the CUDA backend)"
cargo build --features cuda --bin pagoda
echo "==> CUDA backend tests and bench, and the whole-model GPU test: compile and link only"
cargo test -p pagoda-backend-cuda --all-targets --no-run
cargo test --features cuda --test cuda_model --no-run
echo "==> clippy on the CUDA backend"
cargo clippy -p pagoda-backend-cuda --all-targets -- -D warnings
echo "==> CUDA backend host-side unit tests (no GPU needed)"
LD_LIBRARY_PATH="$CUDA_LIBRARY_PATH/lib64:$CUDA_PATH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test -p pagoda-backend-cuda --lib
