// Dense products through cuBLAS on the caller's stream: row-major
// out[t, n] = x[t, k] . w[n, k]^T, which in cuBLAS's column-major terms is
// out^T (n x t) = w (k x n)^T . x^T (k x t).
#include <cublas_v2.h>
#include <stdlib.h>

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

// ---- small-batch products (decode) ---------------------------------------------
// With a handful of token rows the product is a matrix-vector product bound by
// reading the weights once: each warp streams one weight row with 16-byte
// loads (several in flight per lane) and dots it with every token row, which
// stays in L1/L2. cuBLAS reaches about 70% of bandwidth on these shapes.

constexpr int GEMV_MAX_TOKENS = 8;
constexpr int GEMV_WARPS = 8;
constexpr int GEMV_UNROLL = 4;

template <typename T, typename O, int TOKENS>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(const T *__restrict__ x, const T *__restrict__ w, O *__restrict__ out, int n, int k,
                int accumulate) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (row >= n) return;
    const uint4 *wrow = reinterpret_cast<const uint4 *>(w + (size_t)row * k);
    const int chunks = k / 8;  // 16-byte chunks per row
    float acc[TOKENS];
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) acc[t] = 0.f;
    int c = lane;
    // Main loop: GEMV_UNROLL independent weight loads issued before any use.
    for (; c + (GEMV_UNROLL - 1) * 32 < chunks; c += GEMV_UNROLL * 32) {
        uint4 wv[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) wv[u] = __ldg(wrow + c + u * 32);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            float wf[8];
            pagoda::unpack8<T>(wv[u], wf);
#pragma unroll
            for (int t = 0; t < TOKENS; ++t) {
                float xf[8];
                pagoda::unpack8<T>(__ldg(reinterpret_cast<const uint4 *>(x + (size_t)t * k) + c + u * 32), xf);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[t] = fmaf(wf[e], xf[e], acc[t]);
            }
        }
    }
    for (; c < chunks; c += 32) {
        float wf[8];
        pagoda::unpack8<T>(__ldg(wrow + c), wf);
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) {
            float xf[8];
            pagoda::unpack8<T>(__ldg(reinterpret_cast<const uint4 *>(x + (size_t)t * k) + c), xf);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[t] = fmaf(wf[e], xf[e], acc[t]);
        }
    }
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
        const float v = pagoda::warp_sum(acc[t]);
        if (lane == 0) {
            O *dst = out + (size_t)t * n + row;
            *dst = pagoda::from_float<O>(accumulate ? pagoda::to_float<O>(*dst) + v : v);
        }
    }
}

template <typename T, typename O>
int launch_gemv(const void *x, const void *w, void *out, int t, int n, int k, int accumulate, cudaStream_t stream) {
    const dim3 grid(pagoda::ceil_div(n, GEMV_WARPS)), block(GEMV_WARPS * 32);
    const T *xp = static_cast<const T *>(x);
    const T *wp = static_cast<const T *>(w);
    O *op = static_cast<O *>(out);
    switch (t) {
#define PAGODA_GEMV_CASE(N) \
    case N: gemv_kernel<T, O, N><<<grid, block, 0, stream>>>(xp, wp, op, n, k, accumulate); break;
        PAGODA_GEMV_CASE(1)
        PAGODA_GEMV_CASE(2)
        PAGODA_GEMV_CASE(3)
        PAGODA_GEMV_CASE(4)
        PAGODA_GEMV_CASE(5)
        PAGODA_GEMV_CASE(6)
        PAGODA_GEMV_CASE(7)
        PAGODA_GEMV_CASE(8)
#undef PAGODA_GEMV_CASE
        default: return PAGODA_ERR_ARGUMENT;
    }
    PAGODA_LAUNCH_CHECK();
    return 0;
}

// Whether the small-batch kernel takes this product: 16-bit inputs, at most
// GEMV_MAX_TOKENS rows, rows of whole 16-byte chunks, aligned pointers, and
// not switched off (PAGODA_DISABLE_GEMV=1 forces cuBLAS, for comparisons).
bool gemv_applies(const void *x, const void *w, int in_dtype, int t, int k) {
    static const bool disabled = [] {
        const char *v = getenv("PAGODA_DISABLE_GEMV");
        return v != nullptr && v[0] == '1';
    }();
    return !disabled && t >= 1 && t <= GEMV_MAX_TOKENS && k % 8 == 0 &&
           (in_dtype == PAGODA_DTYPE_BF16 || in_dtype == PAGODA_DTYPE_F16) && pagoda::aligned16(x) &&
           pagoda::aligned16(w);
}

int gemv(const void *x, const void *w, int in_dtype, void *out, int out_dtype, int t, int n, int k, int accumulate,
         cudaStream_t stream) {
    if (in_dtype == PAGODA_DTYPE_BF16) {
        return out_dtype == PAGODA_DTYPE_F32
                   ? launch_gemv<__nv_bfloat16, float>(x, w, out, t, n, k, accumulate, stream)
                   : launch_gemv<__nv_bfloat16, __nv_bfloat16>(x, w, out, t, n, k, accumulate, stream);
    }
    return out_dtype == PAGODA_DTYPE_F32 ? launch_gemv<__half, float>(x, w, out, t, n, k, accumulate, stream)
                                         : launch_gemv<__half, __half>(x, w, out, t, n, k, accumulate, stream);
}

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
    if (k > 0 && gemv_applies(x, w, in_dtype, t, k)) {
        return gemv(x, w, in_dtype, out, out_dtype, t, n, k, accumulate, (cudaStream_t)stream);
    }
    st = cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, t, k, &alpha, w, in_type, k, x, in_type, k, &beta, out,
                      out_type, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    return blas_status(st);
}
