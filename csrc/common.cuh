// Shared device helpers: element conversions, vector access, warp and block
// reductions, programmatic dependent launch, and the dtype dispatch every
// launcher uses.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>
#include <utility>

#include "pagoda_kernels.h"

namespace pagoda {

// ---- element conversion -----------------------------------------------------

template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
    return __bfloat162float(x);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Eight 16-bit elements packed in a uint4 (one 16-byte access).
template <typename T> __device__ __forceinline__ void unpack8(const uint4 &v, float (&out)[8]) {
    const T *e = reinterpret_cast<const T *>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = to_float<T>(e[i]);
}

template <typename T> __device__ __forceinline__ uint4 pack8(const float (&in)[8]) {
    uint4 v;
    T *e = reinterpret_cast<T *>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = from_float<T>(in[i]);
    return v;
}

// ---- FP8 (E4M3) KV cache ---------------------------------------------------------
// An F8E4M3 cache holds e4m3(x / scale) for the value x a cache of the
// activation dtype would hold (pagoda_backend::RotaryCacheArgs); it is read as
// code * scale. Kernels take the cache's element type as a template parameter
// C: the activation type T, or __nv_fp8_e4m3.

template <typename C> constexpr bool kIsFp8 = std::is_same<C, __nv_fp8_e4m3>::value;

// The E4M3 code of x / scale: the division rounded to nearest (__fdiv_rn, an
// IEEE division whatever the fast-math flags, as the CPU reference's), then
// to the nearest code (ties to even), saturating at +-448.
__device__ __forceinline__ __nv_fp8_storage_t e4m3_of(float x, float scale) {
    return __nv_cvt_float_to_fp8(__fdiv_rn(x, scale), __NV_SATFINITE, __NV_E4M3);
}

// Eight floats divided by scale (IEEE divisions) as eight E4M3 codes (nearest,
// ties to even, saturating): one 8-byte access.
__device__ __forceinline__ uint2 e4m3x8_of(const float (&in)[8], float scale) {
    uint2 v;
    __nv_fp8x2_storage_t *e = reinterpret_cast<__nv_fp8x2_storage_t *>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i)
        e[i] = __nv_cvt_float2_to_fp8x2(make_float2(__fdiv_rn(in[2 * i], scale), __fdiv_rn(in[2 * i + 1], scale)),
                                        __NV_SATFINITE, __NV_E4M3);
    return v;
}

// Eight floats rounded to T (what a cache of T would hold), then as e4m3x8_of.
template <typename T> __device__ __forceinline__ uint2 pack8_e4m3(const float (&in)[8], float scale) {
    float r[8];
    unpack8<T>(pack8<T>(in), r);
    return e4m3x8_of(r, scale);
}

// Eight E4M3 codes (8 bytes) as floats: their exact values, unscaled (the
// conversion goes through f16, which holds every E4M3 value exactly).
__device__ __forceinline__ void unpack8_e4m3(const uint2 &v, float (&out)[8]) {
    const __nv_fp8x2_storage_t *e = reinterpret_cast<const __nv_fp8x2_storage_t *>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(e[i], __NV_E4M3);
        const float2 f = __half22float2(__half2(h));
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// Eight cache elements from one access: 16 bytes of a 16-bit cache, 8 of an E4M3 one.
template <typename C> struct KvChunk {
    using type = uint4;
    __device__ __forceinline__ static type ldg(const C *p) { return __ldg(reinterpret_cast<const uint4 *>(p)); }
    __device__ __forceinline__ static type zero() { return make_uint4(0, 0, 0, 0); }
    __device__ __forceinline__ static void unpack(const type &v, float (&out)[8]) { unpack8<C>(v, out); }
};
template <> struct KvChunk<__nv_fp8_e4m3> {
    using type = uint2;
    __device__ __forceinline__ static type ldg(const __nv_fp8_e4m3 *p) {
        return __ldg(reinterpret_cast<const uint2 *>(p));
    }
    __device__ __forceinline__ static type zero() { return make_uint2(0, 0); }
    __device__ __forceinline__ static void unpack(const type &v, float (&out)[8]) { unpack8_e4m3(v, out); }
};

// The K and V scales of an E4M3 cache (kv_scales may be null: both 1.0).
// Read only after pdl_wait.
__device__ __forceinline__ float2 load_kv_scales(const float *kv_scales) {
    return kv_scales != nullptr ? make_float2(kv_scales[0], kv_scales[1]) : make_float2(1.f, 1.f);
}

// ---- tensor cores ---------------------------------------------------------------
// One mma.sync m16n8k16 (row-major A, column-major B, f32 accumulation) on
// 16-bit operands, and the packing of two floats into one operand register
// (the lower k in the low half). Fragment layouts: PTX ISA, "Matrix Fragments
// for mma.m16n8k16": lane = 4 * group + q holds A rows group and group + 8 at
// k = 2q, 2q+1 (registers 0, 1) and 2q+8, 2q+9 (registers 2, 3); B column group
// at the same k; C rows group, group + 8 at columns 2q, 2q+1.
template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&v);
    }
};
template <> struct Mma<__half> {
    __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
        asm(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&v);
    }
};

// ---- reductions -----------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum; every thread gets the result. `scratch` holds 32 values.
template <typename V> __device__ __forceinline__ V block_sum(V v, V *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read from a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    V total = lane < nwarps ? scratch[lane] : V(0);
    return warp_sum(total);
}

__device__ __forceinline__ float block_max(float v, float *scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = lane < nwarps ? scratch[lane] : -INFINITY;
    return warp_max(m);
}

__device__ __forceinline__ void set_status(uint32_t *status, uint32_t bit) {
    if (status != nullptr) atomicOr(status, bit);
}

// Programmatic dependent launch (PDL, Hopper). A kernel launched through
// `launch` below may start once every block of the kernel before it on the
// stream has called `pdl_launch_dependents` (or exited), so its launch and its
// first memory round trips overlap that kernel's tail. `pdl_wait` blocks until
// the previous grid has completed and its writes are visible. Both are no-ops
// before sm_90 and when the launch had no PDL attribute (plain <<<>>>).
//
// Why it is safe: a kernel may call `pdl_launch_dependents` at its very start
// (most do; the GEMV calls it after its weight stream), so the kernel before it
// may itself still be waiting on its own predecessor,
// and so on back to the last non-kernel operation on the stream (a copy, a
// memset, an event wait) or the last plain launch. Hence before its wait a kernel
// may read only what no kernel since then writes: step inputs uploaded by host
// copies (positions, slot mapping, sequence lengths, block tables), weights and
// tables written at load time; and it writes nothing, the status word included.
// An L2 prefetch is only a hint (a line a predecessor is still writing
// stays coherent in L2) and may touch any mapped address. After the wait the whole
// chain before it has completed, because every kernel completes only after its
// own wait: so every kernel launched with the attribute calls `pdl_wait` on
// every path, early exits included, before its first global write or read of
// earlier output. A plain launch after the chain waits for all of it.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void prefetch_l2(const void *p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// Where a launcher's kernels go: the stream, and whether they are launched with
// the PDL attribute (the policy's use_pdl, which the Rust side turns on only for
// sm_90 and newer). Internal helpers take one of these where they would take a
// cudaStream_t; `stream` is the raw stream for cuBLAS and CUB.
struct LaunchStream {
    cudaStream_t stream;
    bool pdl;
};

// The launch stream of an extern "C" launcher's (policy, stream) arguments.
inline LaunchStream launch_stream(const PagodaKernelPolicy *policy, void *stream) {
    return LaunchStream{(cudaStream_t)stream, policy->use_pdl != 0};
}

// Launches `kernel` like <<<grid, block, smem, s.stream>>>(args...), with
// programmatic stream serialization when s.pdl is set: the kernel must follow
// the rules above. A failed launch is also the thread's last error, so
// PAGODA_LAUNCH_CHECK after it reports it as after <<<>>>.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, LaunchStream s, Args &&...args) {
    cudaLaunchConfig_t config = {};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = s.stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    if (s.pdl) {
        config.attrs = attr;
        config.numAttrs = 1;
    }
    return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// SiLU with the fast exponential (the kernels' one definition).
__device__ __forceinline__ float silu(float x) { return x / (1.0f + __expf(-x)); }

__host__ __device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

inline bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace pagoda

// Runs `body` with `scalar_t` bound to the element type of a float dtype code;
// returns PAGODA_ERR_DTYPE from the enclosing function for other codes.
#define PAGODA_DISPATCH_FLOAT(dtype, ...)                                   \
    switch (dtype) {                                                        \
        case PAGODA_DTYPE_F32: {                                            \
            using scalar_t = float;                                         \
            __VA_ARGS__;                                                    \
            break;                                                          \
        }                                                                   \
        case PAGODA_DTYPE_F16: {                                            \
            using scalar_t = __half;                                        \
            __VA_ARGS__;                                                    \
            break;                                                          \
        }                                                                   \
        case PAGODA_DTYPE_BF16: {                                           \
            using scalar_t = __nv_bfloat16;                                 \
            __VA_ARGS__;                                                    \
            break;                                                          \
        }                                                                   \
        default:                                                            \
            return PAGODA_ERR_DTYPE;                                        \
    }

// The same for the 16-bit float types only (tensor-core and attention kernels).
#define PAGODA_DISPATCH_HALF(dtype, ...)                                    \
    switch (dtype) {                                                        \
        case PAGODA_DTYPE_F16: {                                            \
            using scalar_t = __half;                                        \
            __VA_ARGS__;                                                    \
            break;                                                          \
        }                                                                   \
        case PAGODA_DTYPE_BF16: {                                           \
            using scalar_t = __nv_bfloat16;                                 \
            __VA_ARGS__;                                                    \
            break;                                                          \
        }                                                                   \
        default:                                                            \
            return PAGODA_ERR_DTYPE;                                        \
    }

// Every extern "C" launcher starts with this: a NULL policy is an argument error.
#define PAGODA_CHECK_POLICY(policy)                          \
    do {                                                     \
        if ((policy) == nullptr) return PAGODA_ERR_ARGUMENT; \
    } while (0)

// The launch's own error (bad configuration) is returned at once.
#define PAGODA_LAUNCH_CHECK() \
    do {                                  \
        cudaError_t e_ = cudaGetLastError(); \
        if (e_ != cudaSuccess) return (int)e_; \
    } while (0)
