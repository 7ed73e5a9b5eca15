// Elementwise and row-copy kernels: fill, seeded uniform fill, bias broadcast, row gather
// (embedding, gather_rows), SiLU-and-mul, and the error-string table.
#include <cuda_runtime.h>

#include "common.cuh"

using namespace pagoda;

namespace {

// Each kernel waits on the kernel before (programmatic dependent launch) before
// touching memory: there is nothing of use to do ahead of it, but the launch
// itself still overlaps that kernel's tail.
template <typename T> __global__ void fill_kernel(T *dst, size_t n, T value) {
    pdl_launch_dependents();
    pdl_wait();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = value;
}

// SplitMix64's draw `counter` (from 0) of the generator seeded with `key`:
// pagoda_backend::splitmix64_draw.
__device__ __forceinline__ uint64_t splitmix64_draw(uint64_t key, uint64_t counter) {
    uint64_t z = key + (counter + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Element e of a rows x cols destination is (e / cols, e % cols); a
// contiguous fill (row_stride == cols) comes as one row, with no division.
// The value is low + width * u with each step rounded on its own (__fmul_rn
// and __fadd_rn are never fused into an FMA), as the host computes it.
template <typename T>
__global__ void fill_uniform_kernel(T *dst, size_t n, size_t cols, uint64_t key, float low, float width,
                                    uint64_t first, uint64_t row_stride) {
    pdl_launch_dependents();
    pdl_wait();
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const uint64_t counter = cols == n ? first + i : first + (i / cols) * row_stride + i % cols;
        const float u = (float)(uint32_t)(splitmix64_draw(key, counter) >> 40) * (1.0f / 16777216.0f);
        dst[i] = from_float<T>(__fadd_rn(low, __fmul_rn(width, u)));
    }
}

template <typename B, typename T>
__global__ void broadcast_rows_kernel(const B *bias, T *out, int rows, int cols, int accumulate) {
    pdl_launch_dependents();
    pdl_wait();
    const size_t n = (size_t)rows * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float b = to_float<B>(bias[i % cols]);
        out[i] = from_float<T>(accumulate ? to_float<T>(out[i]) + b : b);
    }
}

// One block per output row; VEC elements of 16 bytes when rows allow it.
template <typename V>
__global__ void gather_rows_kernel(const V *x, const int32_t *indices, V *out, int row_vecs, int num_src_rows,
                                   uint32_t *status, uint32_t status_bit) {
    pdl_launch_dependents();
    pdl_wait();  // the indices may be a kernel's output too (sampled tokens), not only host copies
    const int m = blockIdx.x;
    const int32_t src = indices[m];
    if (src < 0 || src >= num_src_rows) {
        if (threadIdx.x == 0) set_status(status, status_bit);
        return;
    }
    const V *in = x + (size_t)src * row_vecs;
    V *o = out + (size_t)m * row_vecs;
    for (int i = threadIdx.x; i < row_vecs; i += blockDim.x) o[i] = in[i];
}

template <typename T>
__global__ void silu_and_mul_vec_kernel(const T *x, T *out, int inter) {
    pdl_launch_dependents();
    pdl_wait();
    const int r = blockIdx.x;
    const int i = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
    if (i >= inter) return;
    const T *row = x + (size_t)r * 2 * inter;
    float a[8], b[8], o[8];
    unpack8<T>(*reinterpret_cast<const uint4 *>(row + i), a);
    unpack8<T>(*reinterpret_cast<const uint4 *>(row + inter + i), b);
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] = silu(a[e]) * b[e];
    *reinterpret_cast<uint4 *>(out + (size_t)r * inter + i) = pack8<T>(o);
}

template <typename T> __global__ void silu_and_mul_kernel(const T *x, T *out, int inter) {
    pdl_launch_dependents();
    pdl_wait();
    const int r = blockIdx.x;
    const int i = blockIdx.y * blockDim.x + threadIdx.x;
    if (i >= inter) return;
    const T *row = x + (size_t)r * 2 * inter;
    out[(size_t)r * inter + i] = from_float<T>(silu(to_float<T>(row[i])) * to_float<T>(row[inter + i]));
}

template <typename T>
void launch_silu_and_mul(const T *x, T *out, int rows, int inter, bool vec, LaunchStream s) {
    constexpr int threads = 256;
    if constexpr (sizeof(T) == 2) {
        if (vec) {
            launch(silu_and_mul_vec_kernel<T>, dim3(rows, ceil_div(inter / 8, threads)), threads, 0, s, x, out, inter);
            return;
        }
    }
    launch(silu_and_mul_kernel<T>, dim3(rows, ceil_div(inter, threads)), threads, 0, s, x, out, inter);
}

int grid_for(size_t n, int threads) {
    size_t blocks = (n + threads - 1) / threads;
    if (blocks > 65535u * 16u) blocks = 65535u * 16u;
    return blocks == 0 ? 1 : (int)blocks;
}

}  // namespace

extern "C" const char *pagoda_error_string(int code) {
    switch (code) {
        case PAGODA_ERR_DTYPE: return "unsupported dtype";
        case PAGODA_ERR_HEAD_DIM: return "unsupported head dimension (64 or 128)";
        case PAGODA_ERR_GQA_RATIO: return "unsupported GQA ratio (query heads per KV head, at most 16)";
        case PAGODA_ERR_ALIGNMENT: return "operand not aligned to 16 bytes";
        case PAGODA_ERR_ARGUMENT: return "invalid argument";
        case PAGODA_ERR_WORKSPACE: return "workspace too small";
        default: break;
    }
    if (code >= PAGODA_ERR_CUBLAS) return "cuBLAS call failed";
    return cudaGetErrorString((cudaError_t)code);
}

extern "C" int pagoda_fill(void *dst, int dtype, size_t n, float value, const PagodaKernelPolicy *policy,
                           void *stream) {
    PAGODA_CHECK_POLICY(policy);
    if (n == 0) return 0;
    const LaunchStream s = launch_stream(policy, stream);
    const int threads = 256, blocks = grid_for(n, threads);
    switch (dtype) {
        case PAGODA_DTYPE_F32: launch(fill_kernel<float>, blocks, threads, 0, s, (float *)dst, n, value); break;
        case PAGODA_DTYPE_F16:
            launch(fill_kernel<__half>, blocks, threads, 0, s, (__half *)dst, n, __float2half_rn(value));
            break;
        case PAGODA_DTYPE_BF16:
            launch(fill_kernel<__nv_bfloat16>, blocks, threads, 0, s, (__nv_bfloat16 *)dst, n,
                   __float2bfloat16_rn(value));
            break;
        case PAGODA_DTYPE_I32:
            launch(fill_kernel<int32_t>, blocks, threads, 0, s, (int32_t *)dst, n, (int32_t)value);
            break;
        case PAGODA_DTYPE_I64:
            launch(fill_kernel<int64_t>, blocks, threads, 0, s, (int64_t *)dst, n, (int64_t)value);
            break;
        case PAGODA_DTYPE_F8E4M3:  // the nearest code, saturating (the host's conversion)
            launch(fill_kernel<uint8_t>, blocks, threads, 0, s, (uint8_t *)dst, n,
                   (uint8_t)__nv_cvt_float_to_fp8(value, __NV_SATFINITE, __NV_E4M3));
            break;
        default: return PAGODA_ERR_DTYPE;
    }
    PAGODA_LAUNCH_CHECK();
    return 0;
}

extern "C" int pagoda_fill_uniform(void *dst, int dtype, size_t rows, size_t cols, uint64_t key, float low,
                                   float width, uint64_t first, uint64_t row_stride,
                                   const PagodaKernelPolicy *policy, void *stream) {
    PAGODA_CHECK_POLICY(policy);
    if (row_stride < cols) return PAGODA_ERR_ARGUMENT;
    const size_t n = rows * cols;
    if (n == 0) return 0;
    // Contiguous counters: one row of n, so the kernel divides nothing.
    if (row_stride == cols || rows == 1) cols = n;
    const LaunchStream s = launch_stream(policy, stream);
    const int threads = 256, blocks = grid_for(n, threads);
    switch (dtype) {
        case PAGODA_DTYPE_F32:
            launch(fill_uniform_kernel<float>, blocks, threads, 0, s, (float *)dst, n, cols, key, low, width, first,
                   row_stride);
            break;
        case PAGODA_DTYPE_F16:
            launch(fill_uniform_kernel<__half>, blocks, threads, 0, s, (__half *)dst, n, cols, key, low, width, first,
                   row_stride);
            break;
        case PAGODA_DTYPE_BF16:
            launch(fill_uniform_kernel<__nv_bfloat16>, blocks, threads, 0, s, (__nv_bfloat16 *)dst, n, cols, key, low,
                   width, first, row_stride);
            break;
        default: return PAGODA_ERR_DTYPE;
    }
    PAGODA_LAUNCH_CHECK();
    return 0;
}

extern "C" int pagoda_broadcast_rows(const void *bias, int bias_dtype, void *out, int out_dtype, int rows, int cols,
                                     int accumulate, const PagodaKernelPolicy *policy, void *stream) {
    PAGODA_CHECK_POLICY(policy);
    if (rows == 0 || cols == 0) return 0;
    const LaunchStream s = launch_stream(policy, stream);
    const size_t n = (size_t)rows * cols;
    const int threads = 256, blocks = grid_for(n, threads);
    PAGODA_DISPATCH_FLOAT(out_dtype, {
        using out_t = scalar_t;
        PAGODA_DISPATCH_FLOAT(bias_dtype, {
            launch(broadcast_rows_kernel<scalar_t, out_t>, blocks, threads, 0, s, (const scalar_t *)bias,
                   (out_t *)out, rows, cols, accumulate);
        });
    });
    PAGODA_LAUNCH_CHECK();
    return 0;
}

extern "C" int pagoda_gather_rows(const void *x, const int32_t *indices, void *out, int dtype, int num_out_rows,
                                  int row_elems, int num_src_rows, uint32_t *status, uint32_t status_bit,
                                  const PagodaKernelPolicy *policy, void *stream) {
    PAGODA_CHECK_POLICY(policy);
    if (num_out_rows == 0 || row_elems == 0) return 0;
    int elem;
    switch (dtype) {
        case PAGODA_DTYPE_F16:
        case PAGODA_DTYPE_BF16: elem = 2; break;
        case PAGODA_DTYPE_F32:
        case PAGODA_DTYPE_I32: elem = 4; break;
        case PAGODA_DTYPE_I64: elem = 8; break;
        default: return PAGODA_ERR_DTYPE;
    }
    const LaunchStream s = launch_stream(policy, stream);
    const size_t row_bytes = (size_t)row_elems * elem;
    const int threads = 128;
    if (row_bytes % 16 == 0 && aligned16(x) && aligned16(out)) {
        launch(gather_rows_kernel<uint4>, num_out_rows, threads, 0, s, (const uint4 *)x, indices, (uint4 *)out,
               (int)(row_bytes / 16), num_src_rows, status, status_bit);
    } else if (row_bytes % 4 == 0 && ((uintptr_t)x & 3) == 0 && ((uintptr_t)out & 3) == 0) {
        launch(gather_rows_kernel<uint32_t>, num_out_rows, threads, 0, s, (const uint32_t *)x, indices,
               (uint32_t *)out, (int)(row_bytes / 4), num_src_rows, status, status_bit);
    } else {
        launch(gather_rows_kernel<uint16_t>, num_out_rows, threads, 0, s, (const uint16_t *)x, indices,
               (uint16_t *)out, (int)(row_bytes / 2), num_src_rows, status, status_bit);
    }
    PAGODA_LAUNCH_CHECK();
    return 0;
}

extern "C" int pagoda_silu_and_mul(const void *x, void *out, int dtype, int rows, int inter,
                                   const PagodaKernelPolicy *policy, void *stream) {
    PAGODA_CHECK_POLICY(policy);
    if (rows == 0 || inter == 0) return 0;
    const LaunchStream s = launch_stream(policy, stream);
    const bool vec = inter % 8 == 0 && aligned16(x) && aligned16(out);
    PAGODA_DISPATCH_FLOAT(dtype, { launch_silu_and_mul<scalar_t>((const scalar_t *)x, (scalar_t *)out, rows, inter, vec, s); });
    PAGODA_LAUNCH_CHECK();
    return 0;
}
