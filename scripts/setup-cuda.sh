#!/usr/bin/env bash
# Installs the CUDA 13.0 build toolchain on a machine WITHOUT a GPU, so that
# `cargo build --features cuda` compiles and links here; the binaries then run
# on a GPU machine against its real driver.
#
# Everything lands in the git-ignored .cuda/ folder of the checkout:
#   .cuda/venv/                   PyPI wheels of nvcc, the runtime, CCCL and cuBLAS (pinned to 13.0),
#                                 and NCCL (nvidia-nccl-cu13) for tensor parallelism
#   .cuda/venv/.../nvidia/cu13    the toolkit root: bin/ (nvcc, ptxas), include/, lib/
#   .cuda/venv/.../nvidia/nccl    NCCL: include/nccl.h (bindgen reads it) and lib/libnccl.so.2 (loaded
#                                 at run time, only by tensor-parallel runs: see crates/backend-cuda/src/nccl.rs)
#   .cuda/lib64/libcuda.so        a stub driver (every cu* symbol cust_raw declares) for linking only,
#                                 built by scripts/make-cuda-stub.sh
#   .cuda/env.sh                  the environment to export before building
# It is idempotent: a second run re-checks and rewrites env.sh but downloads nothing.
# With a real toolkit (/usr/local/cuda), none of this is needed: build.rs finds it.
#
# Usage: scripts/setup-cuda.sh && source .cuda/env.sh
set -euo pipefail
# shellcheck source=scripts/lib/on-error.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/on-error.sh"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CUDA_DIR="$ROOT/.cuda"
VENV="$CUDA_DIR/venv"
PYTHON="${PYTHON:-python3}"

# Pinned to the GPU machines' driver (API 13.0).
WHEELS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.0.2.14
  # NCCL for CUDA 13: its header for the bindings, its libnccl.so.2 for runs on this machine's GPUs (if
  # any). Any NCCL 2.x from 2.14 on works at run time (the library is loaded by name, not linked).
  nvidia-nccl-cu13==2.28.9
)

log() { echo "setup-cuda: $*" >&2; }

command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install Python 3 with venv and pip (or set PYTHON)"
mkdir -p "$CUDA_DIR"

# 1. libclang for bindgen.
if ! ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* >/dev/null 2>&1; then
  log "installing libclang-dev (bindgen needs libclang)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  command -v apt-get >/dev/null || die "libclang is missing and this is not a Debian/Ubuntu machine: install libclang (LLVM) yourself"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libclang-dev >/dev/null; } \
    || die "could not install libclang-dev with ${SUDO:+sudo }apt-get; install it yourself and rerun"
fi

# 2. The toolkit wheels, in a venv of their own.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PYTHON" -m venv "$VENV" \
    || die "$PYTHON -m venv failed (on Debian/Ubuntu: apt-get install python3-venv), then rm -rf $VENV and rerun"
fi
if ! "$VENV/bin/python" -m pip show -q "${WHEELS[@]%%==*}" >/dev/null 2>&1 \
  || ! "$VENV/bin/python" - "${WHEELS[@]}" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    try:
        if version(name) != want:
            sys.exit(1)
    except PackageNotFoundError:  # a wheel added to the list since the last run
        sys.exit(1)
PY
then
  log "installing ${WHEELS[*]}"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${WHEELS[@]}" \
    || die "pip could not install the CUDA wheels from PyPI (is it reachable? about 1.2 GB to download)"
fi
CU13="$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
for f in bin/nvcc include/cuda.h include/cuda_bf16.h include/cublas_v2.h include/cccl/cub/cub.cuh \
  lib/libcudart_static.a lib/libcublas.so.13 lib/libcublasLt.so.13; do
  [ -e "$CU13/$f" ] || die "missing $CU13/$f after installing the wheels"
done
NCCL="$(dirname "$CU13")/nccl"
for f in include/nccl.h lib/libnccl.so.2; do
  [ -e "$NCCL/$f" ] || die "missing $NCCL/$f after installing the wheels"
done

# 3. Unversioned cuBLAS names for the linker.
for lib in cublas cublasLt; do
  ln -sfn "libcublas${lib#cublas}.so.13" "$CU13/lib/lib$lib.so"
done

# 4. A stub libcuda.so: the driver is not in the wheels, but cust links -lcuda.
# It defines every cu* function cust_raw declares; at run time the real driver is used.
STUB_DIR="$CUDA_DIR/lib64"
if [ ! -e "$STUB_DIR/libcuda.so" ]; then
  "$ROOT/scripts/make-cuda-stub.sh" "$STUB_DIR"
fi

# 5. The environment.
cat >"$CUDA_DIR/env.sh" <<EOF
# Written by scripts/setup-cuda.sh: source it before building with --features cuda.
export CUDA_PATH="$CU13"
export CUDA_LIBRARY_PATH="$CUDA_DIR"
export PAGODA_NCCL_ROOT="$NCCL"
export PATH="$CU13/bin:\$PATH"
EOF
log "done; now run: source $CUDA_DIR/env.sh"
cat "$CUDA_DIR/env.sh"
