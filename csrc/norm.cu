// RMSNorm, optionally fused with the residual add: one block per row, f32
// accumulation, 16-byte accesses when the row allows.
#include "common.cuh"

using namespace pagoda;

namespace {

// When RESIDUAL: residual = round(residual + x), then the norm of that stored value
// (so the fused op equals a separate add followed by rms_norm). The 16-byte path
// keeps up to kCached vectors per thread in registers, so a row is read once.
constexpr int kCached = 4;

template <typename T, typename W, bool RESIDUAL, bool VEC>
__global__ void rms_norm_kernel(const T *__restrict__ x, T *__restrict__ residual, const W *__restrict__ weight,
                                T *__restrict__ out, int hidden, float eps) {
    pdl_launch_dependents();
    pdl_wait();  // x and the residual come from the kernels before
    __shared__ float scratch[32];
    const size_t base = (size_t)blockIdx.x * hidden;
    const T *xr = x + base;
    T *rr = RESIDUAL ? residual + base : nullptr;
    T *orow = out + base;
    float ss = 0.f;
    if constexpr (VEC) {
        const int nvec = hidden / 8;
        float v[kCached][8];
        // Loads first (all in flight), then the arithmetic.
        uint4 raw[kCached], rawr[kCached];
#pragma unroll
        for (int k = 0; k < kCached; ++k) {
            const int i = threadIdx.x + k * blockDim.x;
            if (i < nvec) {
                raw[k] = *reinterpret_cast<const uint4 *>(xr + i * 8);
                if constexpr (RESIDUAL) rawr[k] = *reinterpret_cast<const uint4 *>(rr + i * 8);
            }
        }
#pragma unroll
        for (int k = 0; k < kCached; ++k) {
            const int i = threadIdx.x + k * blockDim.x;
            if (i < nvec) {
                unpack8<T>(raw[k], v[k]);
                if constexpr (RESIDUAL) {
                    float r[8];
                    unpack8<T>(rawr[k], r);
#pragma unroll
                    for (int e = 0; e < 8; ++e) v[k][e] = to_float<T>(from_float<T>(v[k][e] + r[e]));
                    *reinterpret_cast<uint4 *>(rr + i * 8) = pack8<T>(v[k]);
                }
#pragma unroll
                for (int e = 0; e < 8; ++e) ss += v[k][e] * v[k][e];
            }
        }
        // Rows longer than kCached vectors per thread: the rest the plain way.
        for (int i = threadIdx.x + kCached * blockDim.x; i < nvec; i += blockDim.x) {
            float t[8];
            unpack8<T>(*reinterpret_cast<const uint4 *>(xr + i * 8), t);
            if constexpr (RESIDUAL) {
                float r[8];
                unpack8<T>(*reinterpret_cast<const uint4 *>(rr + i * 8), r);
#pragma unroll
                for (int e = 0; e < 8; ++e) t[e] = to_float<T>(from_float<T>(t[e] + r[e]));
                *reinterpret_cast<uint4 *>(rr + i * 8) = pack8<T>(t);
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) ss += t[e] * t[e];
        }
        ss = block_sum(ss, scratch);
        const float inv = rsqrtf(ss / (float)hidden + eps);
#pragma unroll
        for (int k = 0; k < kCached; ++k) {
            const int i = threadIdx.x + k * blockDim.x;
            if (i < nvec) {
#pragma unroll
                for (int e = 0; e < 8; ++e) v[k][e] = v[k][e] * inv * to_float<W>(weight[i * 8 + e]);
                *reinterpret_cast<uint4 *>(orow + i * 8) = pack8<T>(v[k]);
            }
        }
        const T *src = RESIDUAL ? rr : xr;  // each thread re-reads only what it wrote itself
        for (int i = threadIdx.x + kCached * blockDim.x; i < nvec; i += blockDim.x) {
            float t[8];
            unpack8<T>(*reinterpret_cast<const uint4 *>(src + i * 8), t);
#pragma unroll
            for (int e = 0; e < 8; ++e) t[e] = t[e] * inv * to_float<W>(weight[i * 8 + e]);
            *reinterpret_cast<uint4 *>(orow + i * 8) = pack8<T>(t);
        }
    } else {
        for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
            float v = to_float<T>(xr[i]);
            if constexpr (RESIDUAL) {
                T sum = from_float<T>(v + to_float<T>(rr[i]));
                rr[i] = sum;
                v = to_float<T>(sum);
            }
            ss += v * v;
        }
        ss = block_sum(ss, scratch);
        const float inv = rsqrtf(ss / (float)hidden + eps);
        const T *src = RESIDUAL ? rr : xr;
        for (int i = threadIdx.x; i < hidden; i += blockDim.x)
            orow[i] = from_float<T>(to_float<T>(src[i]) * inv * to_float<W>(weight[i]));
    }
}

template <typename T, typename W>
int launch_rms_norm(const T *x, T *residual, const W *weight, T *out, int rows, int hidden, float eps,
                    LaunchStream s) {
    const bool vec = sizeof(T) == 2 && hidden % 8 == 0 && aligned16(x) && aligned16(out) &&
                     (residual == nullptr || aligned16(residual));
    int threads = 1024;
    // 16-byte path: enough threads that kCached vectors each cover the row.
    const int work = vec ? ceil_div(hidden / 8, kCached) : hidden;
    while (threads > 32 && threads / 2 >= work) threads /= 2;
    constexpr bool kHalf = sizeof(T) == 2;  // only 16-bit rows take the 8-wide path
    if (residual != nullptr) {
        if (kHalf && vec)
            launch(rms_norm_kernel<T, W, true, kHalf>, rows, threads, 0, s, x, residual, weight, out, hidden, eps);
        else
            launch(rms_norm_kernel<T, W, true, false>, rows, threads, 0, s, x, residual, weight, out, hidden, eps);
    } else {
        if (kHalf && vec)
            launch(rms_norm_kernel<T, W, false, kHalf>, rows, threads, 0, s, x, residual, weight, out, hidden, eps);
        else
            launch(rms_norm_kernel<T, W, false, false>, rows, threads, 0, s, x, residual, weight, out, hidden, eps);
    }
    PAGODA_LAUNCH_CHECK();
    return 0;
}

}  // namespace

extern "C" int pagoda_rms_norm(const void *x, void *residual, const void *weight, int weight_dtype, void *out,
                               int dtype, int rows, int hidden, float eps, const PagodaKernelPolicy *policy,
                               void *stream) {
    PAGODA_CHECK_POLICY(policy);
    if (rows == 0 || hidden == 0) return 0;
    const LaunchStream s = launch_stream(policy, stream);
    PAGODA_DISPATCH_FLOAT(dtype, {
        if (weight_dtype == dtype) {
            return launch_rms_norm<scalar_t, scalar_t>((const scalar_t *)x, (scalar_t *)residual,
                                                       (const scalar_t *)weight, (scalar_t *)out, rows, hidden, eps,
                                                       s);
        } else if (weight_dtype == PAGODA_DTYPE_F32) {
            return launch_rms_norm<scalar_t, float>((const scalar_t *)x, (scalar_t *)residual, (const float *)weight,
                                                    (scalar_t *)out, rows, hidden, eps, s);
        }
        return PAGODA_ERR_DTYPE;
    });
    return 0;
}
