// Linear layers (pagoda_linear): row-major out[t, n] = x[t, k] . w[n, k]^T with
// the layer's norm, bias, SiLU and residual add fused in. Few token rows go to
// a weight-streaming kernel written here; more go to cuBLAS on the caller's
// stream, where in column-major terms out^T (n x t) = w (k x n)^T . x^T (k x t).
#include <cublas_v2.h>

#include <type_traits>

#include "blas.cuh"
#include "common.cuh"
#include "mma_gemv.cuh"

using pagoda::BlasHandle;
using pagoda::blas_status;
using pagoda::cuda_type;
using pagoda::kBlasWorkspaceBytes;

namespace {

// ---- small-batch products (decode) ---------------------------------------------
// With a handful of token rows the product is a matrix-vector product bound by
// reading the weights once: each warp streams one weight row with 16-byte
// loads (several in flight per lane) and dots it with every token row, which
// stays in L1/L2. cuBLAS reaches about 70% of bandwidth on these shapes.
//
// What surrounds the product in a Llama layer rides along for free, since the
// kernel is bound by the weight stream, not by arithmetic:
// - NORM: the input rows are RMS-normalised on the fly. The dot product is
//   taken with x * gamma and scaled by 1/rms(x) at the end; each warp sums x^2
//   over the row it reads anyway.
// - SILU: the weight is [gate; up] stacked; a warp streams gate row j and up
//   row j + n_out together and writes silu(gate) * up.
// - bias and accumulate (out += p: the residual update) in the epilogue.

constexpr int GEMV_MAX_TOKENS = 8;
// Compile-time knobs (PAGODA_NVCC_FLAGS=-DPAGODA_GEMV_...=N) for the GEMV sweep
// (crates/backend-cuda/sweep/).
#ifndef PAGODA_GEMV_WARPS
#define PAGODA_GEMV_WARPS 8
#endif
#ifndef PAGODA_GEMV_UNROLL
#define PAGODA_GEMV_UNROLL 4
#endif
constexpr int GEMV_WARPS = PAGODA_GEMV_WARPS;
constexpr int GEMV_UNROLL = PAGODA_GEMV_UNROLL;
// 16-byte chunks at the start of each weight row prefetched into L2 before
// waiting on the previous kernel: 1 KB, enough to keep DRAM busy across the
// kernel boundary. Whole rows (8 KB) were slower, 6.1 against 5.6 ms a token:
// the blocks that are resident early belong to products that run later, and
// their prefetches evicted the weights of the product running now (PERF.md, v10).
constexpr int GEMV_PREFETCH_CHUNKS = 64;

// One 16-byte chunk `c` of each weight row against every token row.
template <typename T, int TOKENS, int ROWS, bool NORM>
__device__ __forceinline__ void gemv_chunk(const uint4 (&wv)[ROWS], const T *__restrict__ x,
                                           const T *__restrict__ gamma, int k, int c, float (&acc)[ROWS][TOKENS],
                                           float (&ss)[TOKENS]) {
    float wf[ROWS][8];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) pagoda::unpack8<T>(wv[r], wf[r]);
    float gf[8];
    if (NORM) pagoda::unpack8<T>(__ldg(reinterpret_cast<const uint4 *>(gamma) + c), gf);
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
        float xf[8];
        pagoda::unpack8<T>(__ldg(reinterpret_cast<const uint4 *>(x + (size_t)t * k) + c), xf);
        if (NORM) {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                ss[t] = fmaf(xf[e], xf[e], ss[t]);
                xf[e] *= gf[e];
            }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[r][t] = fmaf(wf[r][e], xf[e], acc[r][t]);
    }
}

template <typename T, typename O, int TOKENS, bool NORM, bool SILU>
__global__ void __launch_bounds__(GEMV_WARPS * 32)
    gemv_kernel(const T *__restrict__ x, const T *__restrict__ w, const T *__restrict__ bias,
                const T *__restrict__ gamma, float eps, O *__restrict__ out, int n_out, int k, int accumulate) {
    constexpr int ROWS = SILU ? 2 : 1;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    const uint4 *wrow[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
        wrow[r] = reinterpret_cast<const uint4 *>(w + (size_t)(min(row, n_out - 1) + r * n_out) * k);
    const int chunks = k / 8;  // 16-byte chunks per row
    // The weights never depend on the kernel before this one: while it
    // finishes (programmatic dependent launch), pull the start of this warp's
    // rows into L2. Only then wait for it, before reading x or out.
    if (row < n_out) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
            for (int c = 2 * lane; c < min(chunks, GEMV_PREFETCH_CHUNKS); c += 64)  // one per 32-byte sector
                pagoda::prefetch_l2(wrow[r] + c);
    }
    pagoda::pdl_wait();
    if (row >= n_out) {
        pagoda::pdl_launch_dependents();
        return;
    }
    float acc[ROWS][TOKENS], ss[TOKENS];
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
        ss[t] = 0.f;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[r][t] = 0.f;
    }
    int c = lane;
    // Main loop: GEMV_UNROLL independent loads per weight row issued before any use.
    for (; c + (GEMV_UNROLL - 1) * 32 < chunks; c += GEMV_UNROLL * 32) {
        uint4 wv[GEMV_UNROLL][ROWS];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u)
#pragma unroll
            for (int r = 0; r < ROWS; ++r) wv[u][r] = __ldg(wrow[r] + c + u * 32);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) gemv_chunk<T, TOKENS, ROWS, NORM>(wv[u], x, gamma, k, c + u * 32, acc, ss);
    }
    for (; c < chunks; c += 32) {
        uint4 wv[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) wv[r] = __ldg(wrow[r] + c);
        gemv_chunk<T, TOKENS, ROWS, NORM>(wv, x, gamma, k, c, acc, ss);
    }
    // The next kernel may launch once every block is past its weight stream, not
    // earlier: its blocks would take SM slots (and L2) from this one's later blocks.
    pagoda::pdl_launch_dependents();
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
        const float scale = NORM ? rsqrtf(pagoda::warp_sum(ss[t]) / (float)k + eps) : 1.f;
        float v[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            v[r] = pagoda::warp_sum(acc[r][t]) * scale;
            if (bias != nullptr) v[r] += pagoda::to_float<T>(bias[row + r * n_out]);
        }
        const float y = SILU ? pagoda::silu(v[0]) * v[ROWS - 1] : v[0];
        if (lane == 0) {
            O *dst = out + (size_t)t * n_out + row;
            *dst = pagoda::from_float<O>(accumulate ? pagoda::to_float<O>(*dst) + y : y);
        }
    }
}

template <typename T, typename O, bool NORM, bool SILU>
int launch_gemv(const PagodaLinearArgs *a, pagoda::LaunchStream stream) {
    const int n_out = SILU ? a->n / 2 : a->n;
    const dim3 grid(pagoda::ceil_div(n_out, GEMV_WARPS)), block(GEMV_WARPS * 32);
    const T *x = static_cast<const T *>(a->x);
    const T *w = static_cast<const T *>(a->weight);
    const T *bias = static_cast<const T *>(a->bias);
    const T *gamma = static_cast<const T *>(a->norm_weight);
    O *out = static_cast<O *>(a->out);
    cudaError_t e = cudaSuccess;
    switch (a->t) {
#define PAGODA_GEMV_CASE(N)                                                                                       \
    case N:                                                                                                       \
        e = pagoda::launch(gemv_kernel<T, O, N, NORM, SILU>, grid, block, 0, stream, x, w, bias, gamma, a->eps,   \
                           out, n_out, a->k, a->accumulate);                                                      \
        break;
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
    if (e != cudaSuccess) return (int)e;
    PAGODA_LAUNCH_CHECK();
    return 0;
}

// ---- small-batch products on tensor cores: mma_gemv.cuh ----------------------------

using pagoda::mma_gemv::MMA_GEMV_MAX_TOKENS;
using pagoda::mma_gemv::MMA_GEMV_WARPS;

template <typename T, typename O, bool NORM, bool SILU>
int launch_mma_gemv(const PagodaLinearArgs *a, pagoda::LaunchStream stream) {
    const int n_out = SILU ? a->n / 2 : a->n;
    const dim3 grid(pagoda::ceil_div(n_out, SILU ? 8 : 16)), block(MMA_GEMV_WARPS * 32);
    const T *x = static_cast<const T *>(a->x);
    const T *w = static_cast<const T *>(a->weight);
    const T *bias = static_cast<const T *>(a->bias);
    const T *gamma = static_cast<const T *>(a->norm_weight);
    O *out = static_cast<O *>(a->out);
    using pagoda::mma_gemv::mma_gemv_kernel;
    const float *no_scale = nullptr;
    const cudaError_t e =
        a->t <= 8 ? pagoda::launch(mma_gemv_kernel<T, O, 1, NORM, SILU, false>, grid, block, 0, stream, x,
                                   static_cast<const void *>(w), no_scale, bias, gamma, a->eps, out, n_out, a->k,
                                   a->t, a->accumulate)
                  : pagoda::launch(mma_gemv_kernel<T, O, 2, NORM, SILU, false>, grid, block, 0, stream, x,
                                   static_cast<const void *>(w), no_scale, bias, gamma, a->eps, out, n_out, a->k,
                                   a->t, a->accumulate);
    if (e != cudaSuccess) return (int)e;
    PAGODA_LAUNCH_CHECK();
    return 0;
}

// The two weight-streaming kernels, each launched for one fusion of a product.
struct SimtGemv {
    template <typename T, typename O, bool NORM, bool SILU>
    static int launch(const PagodaLinearArgs *a, pagoda::LaunchStream stream) {
        return launch_gemv<T, O, NORM, SILU>(a, stream);
    }
};
struct MmaGemv {
    template <typename T, typename O, bool NORM, bool SILU>
    static int launch(const PagodaLinearArgs *a, pagoda::LaunchStream stream) {
        return launch_mma_gemv<T, O, NORM, SILU>(a, stream);
    }
};

// Kernel family `K` for the product's fusion: input norm or not, SiLU-and-mul
// (its output in the input's type) or not.
template <typename K, typename T, typename O> int gemv_fused(const PagodaLinearArgs *a, pagoda::LaunchStream stream) {
    const bool norm = a->norm_weight != nullptr;
    if (a->silu_mul) {
        if constexpr (std::is_same<O, T>::value) {
            return norm ? K::template launch<T, O, true, true>(a, stream)
                        : K::template launch<T, O, false, true>(a, stream);
        }
        return PAGODA_ERR_DTYPE;
    }
    return norm ? K::template launch<T, O, true, false>(a, stream) : K::template launch<T, O, false, false>(a, stream);
}

// Kernel family `K` for the product's input (bf16 or f16) and output (the same, or f32) types.
template <typename K> int gemv(const PagodaLinearArgs *a, pagoda::LaunchStream stream) {
    const bool f32_out = a->out_dtype == PAGODA_DTYPE_F32;
    if (a->in_dtype == PAGODA_DTYPE_BF16) {
        return f32_out ? gemv_fused<K, __nv_bfloat16, float>(a, stream)
                       : gemv_fused<K, __nv_bfloat16, __nv_bfloat16>(a, stream);
    }
    return f32_out ? gemv_fused<K, __half, float>(a, stream) : gemv_fused<K, __half, __half>(a, stream);
}

// What either weight-streaming kernel needs: the policy's use_gemv (off
// forces cuBLAS, for comparisons), at least one row, 16-bit inputs, aligned pointers.
bool streams_weights(const PagodaLinearArgs *a, const PagodaKernelPolicy *policy) {
    return policy->use_gemv != 0 && a->t >= 1 && a->k > 0 &&
           (a->in_dtype == PAGODA_DTYPE_BF16 || a->in_dtype == PAGODA_DTYPE_F16) && pagoda::aligned16(a->x) &&
           pagoda::aligned16(a->weight) && (a->norm_weight == nullptr || pagoda::aligned16(a->norm_weight));
}

// Whether the tensor-core kernel takes this product: between the policy's
// gemv_mma_min_tokens and MMA_GEMV_MAX_TOKENS rows, k a multiple of the chunk.
bool mma_gemv_applies(const PagodaLinearArgs *a, const PagodaKernelPolicy *policy) {
    return streams_weights(a, policy) && a->t >= policy->gemv_mma_min_tokens && a->t <= MMA_GEMV_MAX_TOKENS &&
           a->k % pagoda::mma_gemv::Layout<false>::CHUNK == 0;
}

// Whether the CUDA-core kernel takes this product: at most GEMV_MAX_TOKENS
// rows, rows of whole 16-byte chunks.
bool simt_gemv_applies(const PagodaLinearArgs *a, const PagodaKernelPolicy *policy) {
    return streams_weights(a, policy) && a->t <= GEMV_MAX_TOKENS && a->k % 8 == 0;
}

// Whether either weight-streaming kernel takes this product.
bool gemv_applies(const PagodaLinearArgs *a, const PagodaKernelPolicy *policy) {
    return mma_gemv_applies(a, policy) || simt_gemv_applies(a, policy);
}

size_t dtype_bytes(int dtype) { return dtype == PAGODA_DTYPE_F32 ? 4 : 2; }

size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

// The unfused path's scratch: normalised rows, then the product before SiLU.
size_t normed_bytes(const PagodaLinearArgs *a) {
    return a->norm_weight ? align256((size_t)a->t * a->k * dtype_bytes(a->in_dtype)) : 0;
}
size_t product_bytes(const PagodaLinearArgs *a) {
    return a->silu_mul ? (size_t)a->t * a->n * dtype_bytes(a->in_dtype) : 0;
}

// cuBLAS: out (or a product buffer) = x . w^T (+ what is already there when accumulate).
int blas_gemm(cublasHandle_t h, const void *x, const void *w, int in_dtype, void *out, int out_dtype, int t, int n,
              int k, bool accumulate) {
    cudaDataType_t in_type, out_type;
    if (!cuda_type(in_dtype, &in_type) || !cuda_type(out_dtype, &out_type)) return PAGODA_ERR_DTYPE;
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    return blas_status(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, t, k, &alpha, w, in_type, k, x, in_type, k, &beta,
                                    out, out_type, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

extern "C" int pagoda_blas_create(void **handle) {
    cublasHandle_t h = nullptr;
    cublasStatus_t st = cublasCreate(&h);
    if (st != CUBLAS_STATUS_SUCCESS) return blas_status(st);
    void *workspace = nullptr;
    const cudaError_t e = cudaMalloc(&workspace, kBlasWorkspaceBytes);
    if (e != cudaSuccess) {
        cublasDestroy(h);
        return (int)e;
    }
    // Bit-reproducible results on one device matter more than the last percent.
    st = cublasSetMathMode(h, CUBLAS_DEFAULT_MATH);
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasSetWorkspace(h, workspace, kBlasWorkspaceBytes);
    if (st != CUBLAS_STATUS_SUCCESS) {
        cublasDestroy(h);
        cudaFree(workspace);
        return blas_status(st);
    }
    *handle = new BlasHandle{h, workspace, nullptr, nullptr, false};
    return 0;
}

extern "C" int pagoda_blas_destroy(void *handle) {
    if (handle == nullptr) return 0;
    BlasHandle *b = static_cast<BlasHandle *>(handle);
    pagoda::fp8_plans_destroy(b->fp8_plans);
    const int rc = blas_status(cublasDestroy(b->handle));
    const cudaError_t e = cudaFree(b->workspace);
    delete b;
    return rc != 0 ? rc : (int)e;
}

extern "C" size_t pagoda_linear_scratch_bytes(const PagodaLinearArgs *a, const PagodaKernelPolicy *policy) {
    if (policy == nullptr) return 0;  // pagoda_linear refuses the launch
    if (a->t == 0 || a->n == 0 || gemv_applies(a, policy)) return 0;
    return normed_bytes(a) + product_bytes(a);
}

extern "C" int pagoda_linear(void *handle, const PagodaLinearArgs *a, const PagodaKernelPolicy *policy,
                             void *stream) {
    PAGODA_CHECK_POLICY(policy);
    if (a->t < 0 || a->n < 0 || a->k < 0) return PAGODA_ERR_ARGUMENT;
    if (a->t == 0 || a->n == 0) return 0;
    cudaDataType_t unused;
    if (!cuda_type(a->in_dtype, &unused) || !cuda_type(a->out_dtype, &unused)) return PAGODA_ERR_DTYPE;
    if (a->out_dtype != a->in_dtype && a->out_dtype != PAGODA_DTYPE_F32) return PAGODA_ERR_DTYPE;
    if (a->silu_mul && (a->n % 2 != 0 || a->accumulate || a->out_dtype != a->in_dtype)) return PAGODA_ERR_ARGUMENT;
    const pagoda::LaunchStream ls = pagoda::launch_stream(policy, stream);
    const cudaStream_t s = ls.stream;
    if (mma_gemv_applies(a, policy)) return gemv<MmaGemv>(a, ls);
    if (simt_gemv_applies(a, policy)) return gemv<SimtGemv>(a, ls);

    if (a->scratch_bytes < normed_bytes(a) + product_bytes(a)) return PAGODA_ERR_WORKSPACE;
    char *scratch = (char *)a->scratch;
    const void *x = a->x;
    int rc;
    if (a->norm_weight != nullptr) {
        rc = pagoda_rms_norm(a->x, nullptr, a->norm_weight, a->in_dtype, scratch, a->in_dtype, a->t, a->k, a->eps,
                             policy, stream);
        if (rc != 0) return rc;
        x = scratch;
    }
    void *product = a->silu_mul ? scratch + normed_bytes(a) : a->out;
    const int product_dtype = a->silu_mul ? a->in_dtype : a->out_dtype;
    bool accumulate = a->accumulate != 0;
    if (a->bias != nullptr) {
        rc = pagoda_broadcast_rows(a->bias, a->in_dtype, product, product_dtype, a->t, a->n, accumulate, policy,
                                   stream);
        if (rc != 0) return rc;
        accumulate = true;
    }
    if (a->k == 0) {
        if (!accumulate) {
            rc = pagoda_fill(product, product_dtype, (size_t)a->t * a->n, 0.0f, policy, stream);
            if (rc != 0) return rc;
        }
    } else {
        BlasHandle *b = static_cast<BlasHandle *>(handle);
        rc = pagoda::blas_bind(b, s);
        if (rc != 0) return rc;
        rc = blas_gemm(b->handle, x, a->weight, a->in_dtype, product, product_dtype, a->t, a->n, a->k, accumulate);
        if (rc != 0) return rc;
    }
    if (a->silu_mul) return pagoda_silu_and_mul(product, a->out, a->in_dtype, a->t, a->n / 2, policy, stream);
    return 0;
}
