// The tensor-core GEMV of small-batch products (2-16 token rows), shared by
// gemm.cu (16-bit weights) and fp8_linear.cu (E4M3 weights with a scale per
// output row, converted to the activation type in registers: every E4M3
// value is exact in f16 and bf16).
#pragma once

#include <cuda_fp8.h>

#include "common.cuh"

namespace pagoda {
namespace mma_gemv {

// The CUDA-core GEMV (gemm.cu) does 8 FMAs per weight element and token row on the CUDA
// cores, and converts every element to f32: at 5 or more rows that arithmetic,
// not the weight stream, sets its speed (an 8B verification step of 5 rows ran
// at twice the time of a 1-row decode). Here the same product runs on the
// tensor cores with the roles swapped: 16 weight rows are the MMA's M, up to
// 8 token rows its N (two N tiles for 9-16 rows), so arithmetic is free and
// the kernel streams the weights once for all rows.
//
// Loads stay 16 bytes wide: a lane reads 8 consecutive k of its weight rows
// and 8 of its token row, and those 8 k feed two m16n8k16 products (k of an
// MMA is a permutation of the real k, the same for A and B, which a dot
// product does not see): lane (group g, q) loads k 8q..8q+7 of a 32-wide chunk
// for weight rows g and g + 8 and token row g; registers .x/.y go to the
// first product (its k 2q, 2q+1, 2q+8, 2q+9), .z/.w to the second.
//
// A block takes 16 output rows (SILU: 8 gate rows and the 8 up rows that pair
// with them, so one lane holds both halves of an output) and splits k over its
// 8 warps; the warps' partial sums meet in shared memory. The input norm
// scales x by gamma before the product (rounded to 16 bits, as the unfused path
// rounds the normalised rows) and by 1/rms(x) after it.

// Compile-time knobs (PAGODA_NVCC_FLAGS=-DPAGODA_MMA_GEMV_...=N), for the kernel bench's sweeps.
#ifndef PAGODA_MMA_GEMV_WARPS
#define PAGODA_MMA_GEMV_WARPS 8
#endif
#ifndef PAGODA_MMA_GEMV_VEC
#define PAGODA_MMA_GEMV_VEC 1
#endif
#ifndef PAGODA_MMA_GEMV_UNROLL
#define PAGODA_MMA_GEMV_UNROLL 4
#endif
#ifndef PAGODA_MMA_GEMV_PREFETCH_CHUNKS
#define PAGODA_MMA_GEMV_PREFETCH_CHUNKS 16
#endif
// Warps of a block, each taking a share of k.
constexpr int MMA_GEMV_WARPS = PAGODA_MMA_GEMV_WARPS;
constexpr int MMA_GEMV_MAX_TOKENS = 16;
// 16-bit weights: 16-byte loads per lane, row and chunk (a chunk is 32 * VEC wide in k; Layout).
constexpr int MMA_GEMV_VEC = PAGODA_MMA_GEMV_VEC;
constexpr int MMA_GEMV_UNROLL = PAGODA_MMA_GEMV_UNROLL;
// Chunks of each warp's k range prefetched into L2 before waiting on the kernel before.
constexpr int MMA_GEMV_PREFETCH_CHUNKS = PAGODA_MMA_GEMV_PREFETCH_CHUNKS;

// E4M3 weights: a 16-byte load holds 16 codes, two groups of 8 k, so a chunk
// is 64 wide in k (VEC 2) and each lane makes one load per row and chunk.
template <bool FP8> struct Layout {
    // 8-k groups per lane, row and chunk (each one 16-byte load of x).
    static constexpr int VEC = FP8 ? 2 : MMA_GEMV_VEC;
    // 16-byte weight loads per lane, row and chunk.
    static constexpr int LOADS = FP8 ? VEC / 2 : VEC;
    static constexpr int CHUNK = 32 * VEC;  // k per chunk
    static constexpr int ELEMENT_BYTES = FP8 ? 1 : 2;
};

// Two E4M3 codes as the packed pair of T an MMA register holds (exact).
template <typename T> __device__ __forceinline__ uint32_t e4m3x2_to(uint16_t codes);
template <> __device__ __forceinline__ uint32_t e4m3x2_to<__half>(uint16_t codes) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(codes, __NV_E4M3);
    return (uint32_t)h.x | ((uint32_t)h.y << 16);
}
template <> __device__ __forceinline__ uint32_t e4m3x2_to<__nv_bfloat16>(uint16_t codes) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(codes, __NV_E4M3);
    const float2 f = __half22float2(*reinterpret_cast<const __half2 *>(&h));
    return Mma<__nv_bfloat16>::pack(f.x, f.y);
}

// A lane's weight values of one row and chunk as VEC groups of 8 packed T:
// the loads themselves for 16-bit weights, each load's 16 codes converted for E4M3.
template <typename T, bool FP8>
__device__ __forceinline__ void weight_groups(const uint4 (&raw)[Layout<FP8>::LOADS],
                                              uint4 (&out)[Layout<FP8>::VEC]) {
#pragma unroll
    for (int l = 0; l < Layout<FP8>::LOADS; ++l) {
        if constexpr (FP8) {
            const uint16_t *pairs = reinterpret_cast<const uint16_t *>(&raw[l]);
            out[2 * l] = make_uint4(e4m3x2_to<T>(pairs[0]), e4m3x2_to<T>(pairs[1]), e4m3x2_to<T>(pairs[2]),
                                    e4m3x2_to<T>(pairs[3]));
            out[2 * l + 1] = make_uint4(e4m3x2_to<T>(pairs[4]), e4m3x2_to<T>(pairs[5]), e4m3x2_to<T>(pairs[6]),
                                        e4m3x2_to<T>(pairs[7]));
        } else {
            out[l] = raw[l];
        }
    }
}

// One chunk `c` of the warp's two weight rows (`rlo`, `rhi`: the raw loads) against its token rows.
template <typename T, int NT, bool NORM, bool FP8>
__device__ __forceinline__ void mma_gemv_chunk(const uint4 (&rlo)[Layout<FP8>::LOADS],
                                               const uint4 (&rhi)[Layout<FP8>::LOADS],
                                               const uint4 *const (&xrow)[NT], const bool (&xvalid)[NT],
                                               const uint4 *grow, int c, float (&acc)[NT][4], float (&ss)[NT]) {
    constexpr int VEC = Layout<FP8>::VEC;
    uint4 alo[VEC], ahi[VEC];
    weight_groups<T, FP8>(rlo, alo);
    weight_groups<T, FP8>(rhi, ahi);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
        const int idx = c * 4 * VEC + v;
        uint4 gv;
        if (NORM) gv = __ldg(grow + idx);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            uint4 xv = xvalid[nt] ? __ldg(xrow[nt] + idx) : make_uint4(0, 0, 0, 0);
            if (NORM) {
                float xf[8], gf[8];
                unpack8<T>(xv, xf);
                unpack8<T>(gv, gf);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    ss[nt] = fmaf(xf[e], xf[e], ss[nt]);
                    xf[e] *= gf[e];
                }
                xv.x = Mma<T>::pack(xf[0], xf[1]);
                xv.y = Mma<T>::pack(xf[2], xf[3]);
                xv.z = Mma<T>::pack(xf[4], xf[5]);
                xv.w = Mma<T>::pack(xf[6], xf[7]);
            }
            const uint32_t a0[4] = {alo[v].x, ahi[v].x, alo[v].y, ahi[v].y};
            Mma<T>::run(acc[nt], a0, xv.x, xv.y);
            const uint32_t a1[4] = {alo[v].z, ahi[v].z, alo[v].w, ahi[v].w};
            Mma<T>::run(acc[nt], a1, xv.z, xv.w);
        }
    }
}

// w: [n, k] of T, or E4M3 codes (FP8) with w_scale[n] each row's scale.
template <typename T, typename O, int NT, bool NORM, bool SILU, bool FP8>
__global__ void __launch_bounds__(MMA_GEMV_WARPS * 32)
    mma_gemv_kernel(const T *__restrict__ x, const void *__restrict__ w, const float *__restrict__ w_scale,
                    const T *__restrict__ bias, const T *__restrict__ gamma, float eps, O *__restrict__ out,
                    int n_out, int k, int t, int accumulate) {
    using L = Layout<FP8>;
    constexpr int TOK = NT * 8;
    constexpr int OUT_ROWS = SILU ? 8 : 16;  // outputs of this block per token
    __shared__ float s_part[MMA_GEMV_WARPS][16][TOK];
    __shared__ float s_ss[MMA_GEMV_WARPS][TOK];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const int r0 = blockIdx.x * OUT_ROWS;
    // Weight rows of MMA rows g and g + 8 (clamped: rows past the end are read, never stored).
    const int lo_row = min(r0 + g, n_out - 1);
    const int hi_row = SILU ? lo_row + n_out : min(r0 + g + 8, n_out - 1);
    const int chunks = k / L::CHUNK;
    const int c_begin = (int)((long)chunks * warp / MMA_GEMV_WARPS);
    const int c_end = (int)((long)chunks * (warp + 1) / MMA_GEMV_WARPS);
    const char *wb = static_cast<const char *>(w);
    const size_t row_bytes = (size_t)k * L::ELEMENT_BYTES;
    const uint4 *wlo = reinterpret_cast<const uint4 *>(wb + (size_t)lo_row * row_bytes) + q * L::LOADS;
    const uint4 *whi = reinterpret_cast<const uint4 *>(wb + (size_t)hi_row * row_bytes) + q * L::LOADS;
    // As in the CUDA-core GEMV: the weights never depend on the kernel before.
    if (L::LOADS > 1 || (q & 1) == 0) {  // one prefetch per 32-byte sector
        for (int c = c_begin; c < min(c_end, c_begin + MMA_GEMV_PREFETCH_CHUNKS); ++c) {
            prefetch_l2(wlo + c * 4 * L::LOADS);
            prefetch_l2(whi + c * 4 * L::LOADS);
        }
    }
    pdl_wait();

    const uint4 *xrow[NT];
    bool xvalid[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int tok = g + 8 * nt;
        xvalid[nt] = tok < t;
        xrow[nt] = reinterpret_cast<const uint4 *>(x + (size_t)min(tok, t - 1) * k) + q * L::VEC;
    }
    const uint4 *grow = NORM ? reinterpret_cast<const uint4 *>(gamma) + q * L::VEC : nullptr;
    float acc[NT][4], ss[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        ss[nt] = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
    }
    int c = c_begin;
    for (; c + MMA_GEMV_UNROLL <= c_end; c += MMA_GEMV_UNROLL) {
        uint4 rlo[MMA_GEMV_UNROLL][L::LOADS], rhi[MMA_GEMV_UNROLL][L::LOADS];
#pragma unroll
        for (int u = 0; u < MMA_GEMV_UNROLL; ++u)
#pragma unroll
            for (int l = 0; l < L::LOADS; ++l) {
                rlo[u][l] = __ldg(wlo + (c + u) * 4 * L::LOADS + l);
                rhi[u][l] = __ldg(whi + (c + u) * 4 * L::LOADS + l);
            }
#pragma unroll
        for (int u = 0; u < MMA_GEMV_UNROLL; ++u)
            mma_gemv_chunk<T, NT, NORM, FP8>(rlo[u], rhi[u], xrow, xvalid, grow, c + u, acc, ss);
    }
    for (; c < c_end; ++c) {
        uint4 rlo[L::LOADS], rhi[L::LOADS];
#pragma unroll
        for (int l = 0; l < L::LOADS; ++l) {
            rlo[l] = __ldg(wlo + c * 4 * L::LOADS + l);
            rhi[l] = __ldg(whi + c * 4 * L::LOADS + l);
        }
        mma_gemv_chunk<T, NT, NORM, FP8>(rlo, rhi, xrow, xvalid, grow, c, acc, ss);
    }
    pdl_launch_dependents();

#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int col = 8 * nt + 2 * q;
        s_part[warp][g][col] = acc[nt][0];
        s_part[warp][g][col + 1] = acc[nt][1];
        s_part[warp][g + 8][col] = acc[nt][2];
        s_part[warp][g + 8][col + 1] = acc[nt][3];
        if (NORM) {
            float v = ss[nt];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            if (q == 0) s_ss[warp][g + 8 * nt] = v;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < OUT_ROWS * t; i += blockDim.x) {
        const int tok = i / OUT_ROWS, r = i % OUT_ROWS;
        const int row = r0 + r;
        if (row >= n_out) continue;
        float scale = 1.f;
        if (NORM) {
            float sum = 0.f;
#pragma unroll
            for (int wi = 0; wi < MMA_GEMV_WARPS; ++wi) sum += s_ss[wi][tok];
            scale = rsqrtf(sum / (float)k + eps);
        }
        float v = 0.f;
#pragma unroll
        for (int wi = 0; wi < MMA_GEMV_WARPS; ++wi) v += s_part[wi][r][tok];
        v *= FP8 ? scale * w_scale[row] : scale;
        if (bias != nullptr) v += to_float<T>(bias[row]);
        float y = v;
        if (SILU) {
            float up = 0.f;
#pragma unroll
            for (int wi = 0; wi < MMA_GEMV_WARPS; ++wi) up += s_part[wi][r + 8][tok];
            up *= FP8 ? scale * w_scale[row + n_out] : scale;
            if (bias != nullptr) up += to_float<T>(bias[row + n_out]);
            y = silu(v) * up;
        }
        O *dst = out + (size_t)tok * n_out + row;
        *dst = from_float<O>(accumulate ? to_float<O>(*dst) + y : y);
    }
}


}  // namespace mma_gemv
}  // namespace pagoda
