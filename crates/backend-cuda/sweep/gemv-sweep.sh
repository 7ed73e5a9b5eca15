#!/usr/bin/env bash
# The small-batch GEMV sweep (gemv_sweep.cu): several builds of the GEMV kernels' compile-time knobs,
# each a small binary (sm_90a only, cuBLAS linked dynamically), so one GPU call carries them all.
#   build  (here, after scripts/setup-cuda.sh): xz-compressed binaries into .device/sweep/ (git-ignored;
#          ~7 MB for all: each is ~7 MB, mostly one architecture's kernels, and compresses to ~0.9 MB)
#   run    (on the GPU machine, from the repository root, carry [".device/sweep"]): every variant, output
#          to $OUT/gemv_sweep.log (or stdout without $OUT)
# Variants: name and the -D flags that make it (defaults: csrc/mma_gemv.cuh, gemm.cu, fp8_linear.cu).
set -euo pipefail
cd "$(dirname "$0")/../../.."
VARIANTS=(
  "default:"
  "mma_warps4:-DPAGODA_MMA_GEMV_WARPS=4"
  "mma_unroll2:-DPAGODA_MMA_GEMV_UNROLL=2"
  "mma_unroll8:-DPAGODA_MMA_GEMV_UNROLL=8"
  "mma_vec2:-DPAGODA_MMA_GEMV_VEC=2"
  "mma_prefetch0:-DPAGODA_MMA_GEMV_PREFETCH_CHUNKS=0"
  "simt_unroll8:-DPAGODA_GEMV_UNROLL=8 -DPAGODA_FP8_GEMV_UNROLL=8"
  "simt_warps4:-DPAGODA_GEMV_WARPS=4 -DPAGODA_FP8_GEMV_WARPS=4"
)
S=.device/sweep
case "${1:?build or run}" in
  build)
    # shellcheck disable=SC1091
    source .cuda/env.sh
    NVCC=(nvcc -std=c++17 -O3 --expt-relaxed-constexpr -Icsrc -gencode=arch=compute_90a,code=sm_90a)
    mkdir -p "$S/obj"
    # The kernels the products call around the GEMVs (norm, SiLU, bias) take no knob: built once.
    for f in norm elementwise; do "${NVCC[@]}" -c "csrc/$f.cu" -o "$S/obj/$f.o" & done
    wait
    for v in "${VARIANTS[@]}"; do
      name="${v%%:*}"; flags="${v#*:}"
      # shellcheck disable=SC2086
      ( "${NVCC[@]}" $flags crates/backend-cuda/sweep/gemv_sweep.cu csrc/gemm.cu csrc/fp8_linear.cu \
          "$S/obj/norm.o" "$S/obj/elementwise.o" -L"$CUDA_PATH/lib" -lcublasLt -lcublas -o "$S/gemv_sweep_$name" \
          && strip "$S/gemv_sweep_$name" && xz -9 -f "$S/gemv_sweep_$name" && echo "built $name" ) &
      # Two at a time (this machine's cores).
      [ "$(jobs -rp | wc -l)" -ge 2 ] && wait -n
    done
    wait
    rm -rf "$S/obj"
    du -sh "$S" ;;
  run)
    export LD_LIBRARY_PATH="/usr/local/cuda-13.0/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}"
    log=/dev/stdout; [ -n "${OUT:-}" ] && log="$OUT/gemv_sweep.log"
    mkdir -p /tmp/gemv_sweep
    for f in "$S"/gemv_sweep_*.xz; do
      b="/tmp/gemv_sweep/$(basename "$f" .xz)"
      xz -d -c "$f" > "$b" && chmod +x "$b"
      timeout 120 "$b" "${b##*/gemv_sweep_}" >> "$log" 2>&1 || echo "${b##*/}: exit $?" >> "$log"
    done
    [ -n "${OUT:-}" ] && grep -E "variant|verification" "$log" ;;
  *) echo "build or run" >&2; exit 2 ;;
esac
