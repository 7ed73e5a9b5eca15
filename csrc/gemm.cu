// Dense products through cuBLAS on the caller's stream: row-major
// out[t, n] = x[t, k] . w[n, k]^T, which in cuBLAS's column-major terms is
// out^T (n x t) = w (k x n)^T . x^T (k x t).
#include <cublas_v2.h>

#include "common.cuh"

namespace {

bool cuda_type(int dtype, cudaDataType_t *out) {
    switch (dtype) {
        case PAGODA_DTYPE_F32: *out = CUDA_R_32F; return true;
        case PAGODA_DTYPE_F16: *out = CUDA_R_16F; return true;
        case PAGODA_DTYPE_BF16: *out = CUDA_R_16BF; return true;
        default: return false;
    }
}

int blas_status(cublasStatus_t st) { return st == CUBLAS_STATUS_SUCCESS ? 0 : PAGODA_ERR_CUBLAS + (int)st; }

}  // namespace

extern "C" int pagoda_blas_create(void **handle) {
    cublasHandle_t h = nullptr;
    cublasStatus_t st = cublasCreate(&h);
    if (st != CUBLAS_STATUS_SUCCESS) return blas_status(st);
    // Bit-reproducible results on one device matter more than the last percent.
    st = cublasSetMathMode(h, CUBLAS_DEFAULT_MATH);
    *handle = h;
    return blas_status(st);
}

extern "C" int pagoda_blas_destroy(void *handle) { return blas_status(cublasDestroy((cublasHandle_t)handle)); }

extern "C" int pagoda_gemm(void *handle, const void *x, const void *w, int in_dtype, void *out, int out_dtype, int t,
                           int n, int k, int accumulate, void *stream) {
    if (t == 0 || n == 0) return 0;
    cudaDataType_t in_type, out_type;
    if (!cuda_type(in_dtype, &in_type) || !cuda_type(out_dtype, &out_type)) return PAGODA_ERR_DTYPE;
    if (out_dtype != in_dtype && out_dtype != PAGODA_DTYPE_F32) return PAGODA_ERR_DTYPE;
    cublasHandle_t h = (cublasHandle_t)handle;
    cublasStatus_t st = cublasSetStream(h, (cudaStream_t)stream);
    if (st != CUBLAS_STATUS_SUCCESS) return blas_status(st);
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    if (k == 0 && !accumulate) return pagoda_fill(out, out_dtype, (size_t)t * n, 0.0f, stream);
    st = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, t, k, &alpha, w, in_type, k, x, in_type, k, &beta, out,
                      out_type, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    return blas_status(st);
}
