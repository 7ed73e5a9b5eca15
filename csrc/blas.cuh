// cuBLAS plumbing shared by the launchers that call it (gemm.cu's linear
// layers, lora.cu's dense LoRA products): the opaque handle's contents, the
// status mapping, dtype codes, and moving the handle to a launch's stream.
#pragma once

#include <cublas_v2.h>

#include "pagoda_kernels.h"

namespace pagoda {

inline bool cuda_type(int dtype, cudaDataType_t *out) {
    switch (dtype) {
        case PAGODA_DTYPE_F32: *out = CUDA_R_32F; return true;
        case PAGODA_DTYPE_F16: *out = CUDA_R_16F; return true;
        case PAGODA_DTYPE_BF16: *out = CUDA_R_16BF; return true;
        default: return false;
    }
}

inline int blas_status(cublasStatus_t st) { return st == CUBLAS_STATUS_SUCCESS ? 0 : PAGODA_ERR_CUBLAS + (int)st; }

// What the opaque handle points at: cuBLAS's handle and a workspace allocated
// once, so that cuBLAS never allocates during CUDA-graph stream capture.
struct BlasHandle {
    cublasHandle_t handle;
    void *workspace;
    cudaStream_t stream;  // the stream `workspace` was last set for
    // fp8_linear.cu's cuBLASLt plans by shape (Fp8Plans), made on first use:
    // making descriptors and asking the heuristic costs ~40 us a call.
    void *fp8_plans = nullptr;
    // Set when a cached plan failed where the per-call path then succeeded:
    // the handle stops caching (fp8_linear.cu says so once on stderr).
    bool fp8_plans_off = false;
};

// Frees a handle's FP8 plans (fp8_linear.cu); nullptr is fine.
void fp8_plans_destroy(void *plans);

// cuBLAS's recommended user workspace on Hopper (4 MiB suffices before it).
constexpr size_t kBlasWorkspaceBytes = (size_t)32 << 20;

// Moves the handle to stream s. cublasSetStream resets the workspace to
// cuBLAS's own pool, so the workspace is set again with it.
inline int blas_bind(BlasHandle *b, cudaStream_t s) {
    if (b->stream == s) return 0;
    cublasStatus_t st = cublasSetStream(b->handle, s);
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasSetWorkspace(b->handle, b->workspace, kBlasWorkspaceBytes);
    if (st != CUBLAS_STATUS_SUCCESS) return blas_status(st);
    b->stream = s;
    return 0;
}

}  // namespace pagoda
