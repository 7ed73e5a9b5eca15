// Attention over the paged KV cache.
//
// Decode (one query token per sequence): flash-decoding. A thread block takes
// one KV head of one sequence and one partition of its context, so one long
// sequence still spreads over many blocks; all query heads that share the KV
// head (GQA) are served from the same K/V reads. A second kernel merges the
// partitions' partial softmax results.
//
// Prefill (any number of query tokens, with a cached prefix): FlashAttention-2
// style. A thread block takes a 64-row tile of one query head's queries; K/V
// tiles of 64 tokens are gathered from the paged cache into shared memory with
// cp.async, scores and the P.V product use bf16/f16 tensor cores
// (mma.sync m16n8k16, f32 accumulation), and the softmax is online.
//
// FP8 (E4M3) caches: both kernels take the cache element type C (T, or
// __nv_fp8_e4m3) and read 8 codes (8 bytes) where a 16-bit cache gives 8
// elements (16 bytes). Codes are converted exactly (to f32 in decode, to T in
// the prefill's shared-memory tiles: every E4M3 value is a bf16 and an f16
// value); the K scale is folded into the query's scale (q.(s k) = (s q).k) and
// the V scale into the output's normalisation.
#include "common.cuh"

using namespace pagoda;

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
// Context tokens per decode partition. Large partitions when there are enough
// (sequence, KV head) pairs to fill the GPU; small ones otherwise, so that a
// few sequences (single-stream decode) still spread over every SM.
constexpr int kDecodePartitionLarge = 512;
constexpr int kDecodePartitionSmall = 64;
constexpr int kDecodePartitionWhole = 1024;
constexpr int kMaxDecodeGroup = 8;

// The first context token a query at position `pos` sees.
__device__ __forceinline__ int window_start(int pos, int window) {
    return (window > 0 && pos + 1 > window) ? pos + 1 - window : 0;
}

// 2^x on the special-function unit (inputs are <= 0 here; -inf gives 0).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Token -> (block, offset) with shifts: block sizes are powers of two (the launcher
// checks), which keeps integer divisions out of the per-token work.
struct BlockDiv {
    int mask, shift;
    __device__ __forceinline__ explicit BlockDiv(int block_size) : mask(block_size - 1), shift(0) {
        while ((1 << shift) < block_size) ++shift;
    }
    __device__ __forceinline__ int div(int tok) const { return tok >> shift; }
    __device__ __forceinline__ int mod(int tok) const { return tok & mask; }
};

// ---------------------------------------------------------------------------------------------
// Decode
// ---------------------------------------------------------------------------------------------

// ---- decode on the tensor cores (E4M3 caches) ------------------------------------
// The CUDA-core decode below spends ~45 instructions on every 8 codes (convert,
// then 8 FMAs per query head of the group): at half the bytes of a 16-bit cache
// it is bound by instruction issue, at 44-51% of the copy bandwidth. Here q.k
// and p.v are m16n8k16 products on f16 operands (every E4M3 value is an f16
// value; f32 sums), 16 context tokens a warp step, and a lane converts each
// code once: about one instruction per code.
//
// q.k: M = 16 tokens (rows g and g + 8 of a lane's group g), N = 8 query heads
// (the group's; zero past G), K = head dims. K of an MMA is a permutation of the
// dims, the same for A and B, which a dot product does not see: lane q of a
// group loads 16 codes of each row at dims 64l + 16q (l < D/64), and k step
// 4l + m takes its codes 4m..4m+3, the first two as k 2q, 2q+1 and the last two
// as k 2q + 8, 2q + 9. The query goes to f16 unscaled (a bf16 value in f16's
// normal range is exact there; scaling first could push small ones below it),
// and the scales multiply the f32 sums.
//
// p.v: M = head dims, N = the 8 heads, K = 16 tokens. A lane of group g holds the
// dims D/8 * g .. D/8 * (g + 1) of its four tokens (2q, 2q + 1, 2q + 8, 2q + 9:
// one load each), and M tile i takes dims 2i (row g) and 2i + 1 (row g + 8) of
// them: a byte permute pairs two tokens' codes of one dim for each A register.
// The probabilities (f32 in shared memory) are rounded to f16 for B.
constexpr int kMmaUnroll = 2;  // 16-token tiles a warp loads before its products

__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(uint32_t pair) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(pair & 0xffffu), __NV_E4M3);
    return (uint32_t)h.x | ((uint32_t)h.y << 16);
}

// Scores of every token of the partition and head of the group into s_score [GMAX][P]
// (log2 domain: score_scale holds log2(e), the softmax scale and the K scale).
template <typename T, int D, int P>
__device__ __forceinline__ void mma_scores(const T *qbase, const __nv_fp8_e4m3 *kbase, size_t block_stride,
                                           const int *s_blocks, int first_block, const BlockDiv &bdiv, int tok0,
                                           int ntok, int G, float score_scale, float *s_score) {
    constexpr int KL = D / 64;        // 16-byte loads per K row and lane
    constexpr int KSTEPS = D / 16;    // MMAs per tile
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane >> 2, q = lane & 3;
    uint32_t qb[KSTEPS][2];
#pragma unroll
    for (int l = 0; l < KL; ++l) {
        float lo[8], hi[8];
        if (g < G) {
            const uint4 *src = reinterpret_cast<const uint4 *>(qbase + (size_t)g * D + 64 * l + 16 * q);
            unpack8<T>(src[0], lo);
            unpack8<T>(src[1], hi);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) lo[e] = hi[e] = 0.f;
        }
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const float *f = m < 2 ? lo + 4 * m : hi + 4 * (m - 2);
            qb[4 * l + m][0] = Mma<__half>::pack(f[0], f[1]);
            qb[4 * l + m][1] = Mma<__half>::pack(f[2], f[3]);
        }
    }
    for (int base = warp * 16; base < ntok; base += kDecodeWarps * 16 * kMmaUnroll) {
        uint4 kr[kMmaUnroll][2][KL];  // rows g and g + 8 of each tile
#pragma unroll
        for (int u = 0; u < kMmaUnroll; ++u)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int tl = base + u * kDecodeWarps * 16 + g + 8 * h;
                const int tok = tok0 + tl;
                const int b = tl < ntok ? s_blocks[bdiv.div(tok) - first_block] : -1;
#pragma unroll
                for (int l = 0; l < KL; ++l)
                    kr[u][h][l] = b >= 0 ? __ldg(reinterpret_cast<const uint4 *>(
                                               kbase + (size_t)b * block_stride + (size_t)bdiv.mod(tok) * D +
                                               64 * l + 16 * q))
                                         : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
        for (int u = 0; u < kMmaUnroll; ++u) {
            float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int l = 0; l < KL; ++l) {
                const uint32_t *lo = reinterpret_cast<const uint32_t *>(&kr[u][0][l]);
                const uint32_t *hi = reinterpret_cast<const uint32_t *>(&kr[u][1][l]);
#pragma unroll
                for (int m = 0; m < 4; ++m) {
                    const uint32_t a[4] = {e4m3x2_to_f16x2(lo[m]), e4m3x2_to_f16x2(hi[m]),
                                           e4m3x2_to_f16x2(lo[m] >> 16), e4m3x2_to_f16x2(hi[m] >> 16)};
                    Mma<__half>::run(c, a, qb[4 * l + m][0], qb[4 * l + m][1]);
                }
            }
            // c[0], c[1]: token g, heads 2q and 2q + 1; c[2], c[3]: token g + 8.
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int tl = base + u * kDecodeWarps * 16 + g + 8 * h;
                if (tl >= ntok) continue;
                if (2 * q < G) s_score[2 * q * P + tl] = c[2 * h] * score_scale;
                if (2 * q + 1 < G) s_score[(2 * q + 1) * P + tl] = c[2 * h + 1] * score_scale;
            }
        }
    }
}

// This warp's share of p.v (unscaled, unnormalised) into s_part [warps][GMAX][D],
// once every warp is done with the probabilities in s_score (which s_part overlays).
template <int D, int GMAX, int P>
__device__ __forceinline__ void mma_pv(const __nv_fp8_e4m3 *vbase, size_t block_stride, const int *s_blocks,
                                       int first_block, const BlockDiv &bdiv, int tok0, int ntok, int G,
                                       const float *s_score, float *s_part) {
    constexpr int DPL = D / 8;      // dims a lane holds of each of its tokens
    constexpr int WORDS = DPL / 4;  // ... in 32-bit words: one 16- (D 128) or 8-byte (D 64) load
    constexpr int MT = DPL / 2;     // M tiles
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int g = lane >> 2, q = lane & 3;
    float o[MT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[i][e] = 0.f;
    for (int base = warp * 16; base < ntok; base += kDecodeWarps * 16 * kMmaUnroll) {
        uint32_t vw[kMmaUnroll][4][WORDS];
#pragma unroll
        for (int u = 0; u < kMmaUnroll; ++u)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int tl = base + u * kDecodeWarps * 16 + 2 * q + (j & 1) + 8 * (j >> 1);
                const int tok = tok0 + tl;
                const int b = tl < ntok ? s_blocks[bdiv.div(tok) - first_block] : -1;
                const __nv_fp8_e4m3 *src = vbase + (size_t)(b >= 0 ? b : 0) * block_stride +
                                           (size_t)bdiv.mod(tok) * D + DPL * g;
                if constexpr (WORDS == 4) {
                    const uint4 v = b >= 0 ? __ldg(reinterpret_cast<const uint4 *>(src)) : make_uint4(0, 0, 0, 0);
                    vw[u][j][0] = v.x;
                    vw[u][j][1] = v.y;
                    vw[u][j][2] = v.z;
                    vw[u][j][3] = v.w;
                } else {
                    const uint2 v = b >= 0 ? __ldg(reinterpret_cast<const uint2 *>(src)) : make_uint2(0, 0);
                    vw[u][j][0] = v.x;
                    vw[u][j][1] = v.y;
                }
            }
#pragma unroll
        for (int u = 0; u < kMmaUnroll; ++u) {
            float p[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int tl = base + u * kDecodeWarps * 16 + 2 * q + (j & 1) + 8 * (j >> 1);
                p[j] = g < G && tl < ntok ? s_score[g * P + tl] : 0.f;
            }
            const uint32_t b0 = Mma<__half>::pack(p[0], p[1]), b1 = Mma<__half>::pack(p[2], p[3]);
#pragma unroll
            for (int i = 0; i < MT; ++i) {
                // Bytes 2i and 2i + 1 of two tokens, as [t0 dim 2i, t1 dim 2i, t0 dim 2i+1, t1 dim 2i+1].
                const uint32_t sel = (i & 1) ? 0x7362u : 0x5140u;
                const uint32_t x01 = __byte_perm(vw[u][0][i >> 1], vw[u][1][i >> 1], sel);
                const uint32_t x23 = __byte_perm(vw[u][2][i >> 1], vw[u][3][i >> 1], sel);
                const uint32_t a[4] = {e4m3x2_to_f16x2(x01), e4m3x2_to_f16x2(x01 >> 16), e4m3x2_to_f16x2(x23),
                                       e4m3x2_to_f16x2(x23 >> 16)};
                Mma<__half>::run(o[i], a, b0, b1);
            }
        }
    }
    __syncthreads();  // every warp is done with the probabilities: s_part overlays them
    // o[i]: dims D/8 * g + 2i (c0, c1) and + 2i + 1 (c2, c3), heads 2q (c0, c2) and 2q + 1 (c1, c3).
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int head = 2 * q + h;
            if (head >= G) continue;
            float *row = s_part + (size_t)(warp * GMAX + head) * D + DPL * g + 2 * i;
            row[0] = o[i][h];
            row[1] = o[i][2 + h];
        }
}

// Grid (kv head, decode sequence, partition). Dynamic shared memory: the partition's
// scores for every query head of the group, later reused to merge the warps' outputs.
// C: the cache element type (T, or __nv_fp8_e4m3 for an E4M3 cache). MMA (E4M3
// caches only): q.k and p.v on the tensor cores (mma_scores, mma_pv below).
template <typename T, typename C, int D, int GMAX, int P, bool MMA>
__global__ void __launch_bounds__(kDecodeThreads)
    paged_decode_kernel(const PagodaAttentionArgs a, int max_splits) {
    static_assert(!MMA || kIsFp8<C>, "the tensor-core decode reads E4M3 caches");
    using Chunk = KvChunk<C>;  // 8 cache elements: one 16-byte load, or 8 bytes of E4M3 codes
    constexpr int TPT = 8;                    // lanes per token for q.k
    constexpr int EPL = D / TPT;              // elements per lane for q.k
    constexpr int VPL = EPL / 8;              // 8-element loads per lane for q.k
    constexpr int QK_TOK = kDecodeWarps * (32 / TPT);  // tokens per block step for q.k
    constexpr int LPV = D / 8;                // lanes per token for p.v
    constexpr int PV_TOK = kDecodeWarps * (32 / LPV);
    // K loads in flight per lane (x VPL), V loads in flight per lane: twice
    // as many of an E4M3 cache's 8-byte loads, so as many bytes are in flight
    // (in as many registers) as with a 16-bit cache.
    constexpr int U = kIsFp8<C> ? 8 : 4;
    constexpr int UV = kIsFp8<C> ? 16 : 8;

    pdl_launch_dependents();  // the output product may start fetching its weights
    extern __shared__ float smem[];
    float *s_score = smem;  // [GMAX][P]
    __shared__ float s_max[GMAX], s_sum[GMAX];

    // Until pdl_wait below, the kernel before (rotary_and_cache, writing q and the
    // newest token's K/V) may still run: only step inputs (sequence lengths, query
    // offsets, block tables) are read. (Prefetching the partition's K/V into L2
    // here made the isolated kernel faster but the whole decode step no faster:
    // PERF.md, v10.)
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int kvh = blockIdx.x, s = blockIdx.y, split = blockIdx.z;
    const int G = a.num_q_heads / a.num_kv_heads;
    const int L = a.seq_lens[s];
    const int start = window_start(L - 1, a.sliding_window);
    const int num_splits = ceil_div(L - start, P);
    if (split >= num_splits) {
        pdl_wait();  // not to complete before the kernels this one follows
        return;
    }
    const int tok0 = start + split * P;
    const int ntok = min(P, L - tok0);

    const int qrow = a.query_start_loc[s];
    const T *qbase = (const T *)a.q + ((size_t)qrow * a.num_q_heads + (size_t)kvh * G) * D;
    const int32_t *table = a.block_tables + (size_t)s * a.max_blocks_per_seq;
    const size_t block_stride = (size_t)a.num_kv_heads * a.block_size * D;
    const C *kbase = (const C *)a.k_cache + (size_t)kvh * a.block_size * D;
    const C *vbase = (const C *)a.v_cache + (size_t)kvh * a.block_size * D;
    const float qscale = a.scale * kLog2e;

    // The partition's block-table entries, once, in shared memory: the K and V
    // loads below then wait for one memory round trip, not two.
    __shared__ int s_blocks[P + 1];
    const BlockDiv bdiv(a.block_size);
    const int first_block = bdiv.div(tok0);
    const int num_part_blocks = bdiv.div(tok0 + ntok - 1) - first_block + 1;
    bool bad_entry = false;
    for (int i = threadIdx.x; i < num_part_blocks; i += blockDim.x) {
        const int b = table[first_block + i];
        const bool ok = b >= 0 && b < a.num_blocks;
        bad_entry |= !ok;
        s_blocks[i] = ok ? b : -1;
    }
    __syncthreads();

    pdl_wait();  // q and the newest K/V come from the kernel before
    if (bad_entry) set_status(a.status, PAGODA_STATUS_BLOCK_TABLE);
    // An E4M3 cache's K scale goes into the query's, its V scale into the output.
    float k_scale = 1.f, v_scale = 1.f;
    if constexpr (kIsFp8<C>) {
        const float2 kv = load_kv_scales(a.kv_scales);
        k_scale = kv.x;
        v_scale = kv.y;
    }

    // ---- scores: q.k for every token of the partition and every head of the group ----
    if constexpr (MMA) {
        mma_scores<T, D, P>(qbase, kbase, block_stride, s_blocks, first_block, bdiv, tok0, ntok, G,
                            qscale * k_scale, s_score);
    } else {
        const float qk_scale = kIsFp8<C> ? qscale * k_scale : qscale;
        const int c = lane % TPT, sub = lane / TPT;
        float qr[GMAX][EPL];
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
#pragma unroll
            for (int v = 0; v < VPL; ++v) {
                float tmp[8];
                if (g < G) {
                    unpack8<T>(*reinterpret_cast<const uint4 *>(qbase + (size_t)g * D + (c + v * TPT) * 8), tmp);
                } else {
#pragma unroll
                    for (int e = 0; e < 8; ++e) tmp[e] = 0.f;
                }
#pragma unroll
                for (int e = 0; e < 8; ++e) qr[g][v * 8 + e] = tmp[e] * qk_scale;
            }
        }
        for (int base = 0; base < ntok; base += QK_TOK * U) {
            typename Chunk::type kv[U][VPL];
            int tl[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                tl[u] = base + u * QK_TOK + warp * (32 / TPT) + sub;
                const int tok = tok0 + tl[u];
                const int b = tl[u] < ntok ? s_blocks[bdiv.div(tok) - first_block] : -1;
#pragma unroll
                for (int v = 0; v < VPL; ++v) {
                    if (b >= 0) {
                        const C *p = kbase + (size_t)b * block_stride + (size_t)bdiv.mod(tok) * D +
                                     (c + v * TPT) * 8;
                        kv[u][v] = Chunk::ldg(p);
                    } else {
                        kv[u][v] = Chunk::zero();
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                float acc[GMAX];
#pragma unroll
                for (int g = 0; g < GMAX; ++g) acc[g] = 0.f;
#pragma unroll
                for (int v = 0; v < VPL; ++v) {
                    float k[8];
                    Chunk::unpack(kv[u][v], k);
#pragma unroll
                    for (int g = 0; g < GMAX; ++g)
#pragma unroll
                        for (int e = 0; e < 8; ++e) acc[g] += qr[g][v * 8 + e] * k[e];
                }
#pragma unroll
                for (int g = 0; g < GMAX; ++g)
#pragma unroll
                    for (int o = TPT / 2; o > 0; o >>= 1) acc[g] += __shfl_xor_sync(0xffffffffu, acc[g], o);
                if (c == 0 && tl[u] < ntok) {
#pragma unroll
                    for (int g = 0; g < GMAX; ++g)
                        if (g < G) s_score[g * P + tl[u]] = acc[g];
                }
            }
        }
    }
    __syncthreads();

    // ---- softmax within the partition (log2 domain) ----
    for (int g = warp; g < G; g += kDecodeWarps) {
        float m = -INFINITY;
        for (int i = lane; i < ntok; i += 32) m = fmaxf(m, s_score[g * P + i]);
        m = warp_max(m);
        float sum = 0.f;
        for (int i = lane; i < ntok; i += 32) {
            const float p = fast_exp2(s_score[g * P + i] - m);
            s_score[g * P + i] = p;
            sum += p;
        }
        sum = warp_sum(sum);
        if (lane == 0) {
            s_max[g] = m;
            s_sum[g] = sum;
        }
    }
    __syncthreads();

    // ---- p.v ----
    if constexpr (MMA) {
        mma_pv<D, GMAX, P>(vbase, block_stride, s_blocks, first_block, bdiv, tok0, ntok, G, s_score, smem);
    } else {
        const int vc = lane % LPV, vsub = lane / LPV;
        float acc[GMAX][8];
#pragma unroll
        for (int g = 0; g < GMAX; ++g)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[g][e] = 0.f;
        for (int base = 0; base < ntok; base += PV_TOK * UV) {
            typename Chunk::type vv[UV];
            int tl[UV];
#pragma unroll
            for (int u = 0; u < UV; ++u) {
                tl[u] = base + u * PV_TOK + warp * (32 / LPV) + vsub;
                const int tok = tok0 + tl[u];
                const int b = tl[u] < ntok ? s_blocks[bdiv.div(tok) - first_block] : -1;
                if (b >= 0) {
                    const C *p = vbase + (size_t)b * block_stride + (size_t)bdiv.mod(tok) * D + vc * 8;
                    vv[u] = Chunk::ldg(p);
                } else {
                    vv[u] = Chunk::zero();
                }
            }
#pragma unroll
            for (int u = 0; u < UV; ++u) {
                if (tl[u] < ntok) {
                    float v[8];
                    Chunk::unpack(vv[u], v);
#pragma unroll
                    for (int g = 0; g < GMAX; ++g) {
                        if (g < G) {
                            const float p = s_score[g * P + tl[u]];
#pragma unroll
                            for (int e = 0; e < 8; ++e) acc[g][e] += p * v[e];
                        }
                    }
                }
            }
        }
        // Lanes that share a dimension chunk hold different tokens: sum them.
#pragma unroll
        for (int g = 0; g < GMAX; ++g)
#pragma unroll
            for (int e = 0; e < 8; ++e)
#pragma unroll
                for (int o = LPV; o < 32; o <<= 1) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
        __syncthreads();  // every warp is done with the scores: reuse the memory
        float *s_part = smem;  // [warps][GMAX][D]
        if (vsub == 0) {
#pragma unroll
            for (int g = 0; g < GMAX; ++g)
#pragma unroll
                for (int e = 0; e < 8; ++e) s_part[(warp * GMAX + g) * D + vc * 8 + e] = acc[g][e];
        }
    }
    __syncthreads();
    const float *s_part = smem;  // [warps][GMAX][D]: each warp's share of the outputs

    const int Hq = a.num_q_heads;
    for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
        const int g = i / D, d = i % D;
        float o = 0.f;
#pragma unroll
        for (int w = 0; w < kDecodeWarps; ++w) o += s_part[(w * GMAX + g) * D + d];
        if constexpr (kIsFp8<C>) o *= v_scale;  // the partials too: the merge then needs no scale
        const int h = kvh * G + g;
        if (num_splits == 1) {
            T *out = (T *)a.out + ((size_t)qrow * Hq + h) * D;
            out[d] = from_float<T>(o / s_sum[g]);
        } else {
            const size_t part = ((size_t)s * Hq + h) * max_splits + split;
            a.workspace[part * D + d] = o;
            if (d == 0) {
                const size_t nparts = (size_t)a.num_decode_seqs * Hq * max_splits;
                a.workspace[nparts * D + part] = s_max[g];
                a.workspace[nparts * (D + 1) + part] = s_sum[g];
            }
        }
    }
}

// Grid (query head, decode sequence), D threads: merges the partitions of sequences that had several.
template <typename T, int D>
__global__ void paged_decode_merge_kernel(const PagodaAttentionArgs a, int max_splits, int partition) {
    pdl_launch_dependents();
    const int h = blockIdx.x, s = blockIdx.y, d = threadIdx.x;
    const int L = a.seq_lens[s];  // step inputs may be read before the wait, the partials not
    const int start = window_start(L - 1, a.sliding_window);
    const int num_splits = ceil_div(L - start, partition);
    const int qrow = a.query_start_loc[s];
    pdl_wait();
    if (num_splits <= 1) return;
    const int Hq = a.num_q_heads;
    const size_t first = ((size_t)s * Hq + h) * max_splits;
    const size_t nparts = (size_t)a.num_decode_seqs * Hq * max_splits;
    const float *part_max = a.workspace + nparts * D;
    const float *part_sum = a.workspace + nparts * (D + 1);
    float m = -INFINITY;
    for (int i = 0; i < num_splits; ++i) m = fmaxf(m, part_max[first + i]);
    float l = 0.f, o = 0.f;
    for (int i = 0; i < num_splits; ++i) {
        const float w = exp2f(part_max[first + i] - m);
        l += part_sum[first + i] * w;
        o += a.workspace[(first + i) * D + d] * w;
    }
    T *out = (T *)a.out + ((size_t)qrow * Hq + h) * D;
    out[d] = from_float<T>(o / l);
}

int decode_context(const PagodaAttentionArgs *a) {
    int ctx = a->max_decode_seq_len;
    if (a->sliding_window > 0 && ctx > a->sliding_window) ctx = a->sliding_window;
    return ctx > 0 ? ctx : 1;
}

// Small partitions when large ones would leave most SMs idle (fewer blocks than
// two per SM); the extra merge work is negligible at that size. When the
// (sequence, KV head) pairs alone fill the GPU twice over and every context fits
// kDecodePartitionWhole, one partition per pair: no merge pass, and no short
// trailing partitions (the bench's sweep: larger partitions won at batch 64-256).
// A policy's decode_partition of 64|128|256|512|1024 forces one (for that sweep).
int decode_partition(const PagodaAttentionArgs *a, const PagodaKernelPolicy *policy) {
    const int forced = policy->decode_partition;
    if (forced == 64 || forced == 128 || forced == 256 || forced == 512 || forced == 1024) return forced;
    const long sms = policy->num_sms > 0 ? policy->num_sms : 1;
    const long pairs = (long)a->num_kv_heads * a->num_decode_seqs;
    const long blocks = pairs * ceil_div(decode_context(a), kDecodePartitionLarge);
    if (blocks < 2L * sms) return kDecodePartitionSmall;
    // (Groups of 8 query heads need 255 registers at 1024: they keep 512.)
    const int group = a->num_q_heads / a->num_kv_heads;
    if (group <= 4 && decode_context(a) <= kDecodePartitionWhole && pairs >= 2L * sms) return kDecodePartitionWhole;
    return kDecodePartitionLarge;
}

int decode_max_splits(const PagodaAttentionArgs *a, const PagodaKernelPolicy *policy) {
    return ceil_div(decode_context(a), decode_partition(a, policy));
}

template <typename T, typename C, int D, int GMAX, int P, bool MMA>
int launch_decode_p(const PagodaAttentionArgs *a, LaunchStream s) {
    const int max_splits = ceil_div(decode_context(a), P);
    const size_t smem = sizeof(float) * (size_t)max(GMAX * P, kDecodeWarps * GMAX * D);
    if (smem > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(paged_decode_kernel<T, C, D, GMAX, P, MMA>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return (int)e;
    }
    dim3 grid(a->num_kv_heads, a->num_decode_seqs, max_splits);
    launch(paged_decode_kernel<T, C, D, GMAX, P, MMA>, grid, kDecodeThreads, smem, s, *a, max_splits);
    PAGODA_LAUNCH_CHECK();
    if (max_splits > 1) {
        launch(paged_decode_merge_kernel<T, D>, dim3(a->num_q_heads, a->num_decode_seqs), D, 0, s, *a, max_splits, P);
        PAGODA_LAUNCH_CHECK();
    }
    return 0;
}

template <typename T, typename C, int D, int GMAX, bool MMA>
int launch_decode_g(const PagodaAttentionArgs *a, const PagodaKernelPolicy *policy, LaunchStream s) {
    switch (decode_partition(a, policy)) {
        case 64: return launch_decode_p<T, C, D, GMAX, 64, MMA>(a, s);
        case 128: return launch_decode_p<T, C, D, GMAX, 128, MMA>(a, s);
        case 256: return launch_decode_p<T, C, D, GMAX, 256, MMA>(a, s);
        case 1024: return launch_decode_p<T, C, D, GMAX, 1024, MMA>(a, s);
        default: return launch_decode_p<T, C, D, GMAX, 512, MMA>(a, s);
    }
}

// By the GQA group's size (the query heads a block serves).
template <typename T, typename C, int D, bool MMA>
int launch_decode_group(const PagodaAttentionArgs *a, const PagodaKernelPolicy *policy, LaunchStream s) {
    const int G = a->num_q_heads / a->num_kv_heads;
    if (G <= 1) return launch_decode_g<T, C, D, 1, MMA>(a, policy, s);
    if (G <= 2) return launch_decode_g<T, C, D, 2, MMA>(a, policy, s);
    if (G <= 4) return launch_decode_g<T, C, D, 4, MMA>(a, policy, s);
    return launch_decode_g<T, C, D, 8, MMA>(a, policy, s);
}

// E4M3 caches take the tensor-core decode where the policy asks for it.
template <typename T, typename C, int D>
int launch_decode(const PagodaAttentionArgs *a, const PagodaKernelPolicy *policy, LaunchStream s) {
    if constexpr (kIsFp8<C>) {
        if (policy->decode_attention_mma) return launch_decode_group<T, C, D, true>(a, policy, s);
    }
    return launch_decode_group<T, C, D, false>(a, policy, s);
}

// ---------------------------------------------------------------------------------------------
// Prefill
// ---------------------------------------------------------------------------------------------

constexpr int kBM = 64;  // query rows per block (16 per warp)
constexpr int kBN = 64;  // context tokens per K/V tile
constexpr int kPrefillThreads = 128;

__device__ __forceinline__ void cp_async16(void *smem_ptr, const void *gmem) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_ptr);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *smem_ptr) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_ptr);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void *smem_ptr) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem_ptr);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows][D] tile, XOR-swizzled so
// that ldmatrix's eight row addresses hit eight different bank groups.
template <int D> __device__ __forceinline__ int swz(int row, int chunk) {
    return row * D + ((chunk ^ (row & 7)) << 3);
}

// A thread's share of one K/V tile: rows r0 + j * RSTEP (j < RPT) at 16-byte chunk c.
// The block-table entries are fetched first (raw, so the loads stay in flight
// across the tensor-core work) and checked only when the copies are issued.
template <int D> struct TileRows {
    static constexpr int CH = D / 8;
    static constexpr int RSTEP = kPrefillThreads / CH;
    static constexpr int RPT = kBN / RSTEP;
    static constexpr int kPastEnd = INT32_MIN;
    int entry[RPT];  // table entry of each row's token, or kPastEnd
    int n0;          // the tile's first token

    __device__ __forceinline__ void fetch(const int32_t *table, int first, int end, const BlockDiv &bdiv) {
        const int r0 = threadIdx.x / CH;
        n0 = first;
#pragma unroll
        for (int j = 0; j < RPT; ++j) {
            const int tok = n0 + r0 + j * RSTEP;
            entry[j] = tok < end ? __ldg(table + bdiv.div(tok)) : kPastEnd;
        }
    }

    // Queues the copies of the fetched tile's tokens into a swizzled tile; rows past the end
    // (or with an out-of-range entry, reported in the status word) become zeros.
    // An E4M3 cache (C = __nv_fp8_e4m3) is not copied asynchronously: each row's 8 codes
    // are loaded (every row's load in flight at once), converted exactly to T and stored
    // as the 16 bytes a cache of T would have given.
    template <typename T, typename C>
    __device__ __forceinline__ void issue(T *tile, const C *cache, int kvh, const PagodaAttentionArgs &a,
                                          const BlockDiv &bdiv) const {
        const int r0 = threadIdx.x / CH, c = threadIdx.x % CH;
        const size_t block_stride = (size_t)a.num_kv_heads * a.block_size * D;
        if constexpr (kIsFp8<C>) {
            uint2 raw[RPT];
#pragma unroll
            for (int j = 0; j < RPT; ++j) {
                const int r = r0 + j * RSTEP;
                const int b = entry[j];
                if (b >= 0 && b < a.num_blocks) {
                    raw[j] = __ldg(reinterpret_cast<const uint2 *>(
                        cache + (size_t)b * block_stride + ((size_t)kvh * a.block_size + bdiv.mod(n0 + r)) * D + c * 8));
                } else {
                    if (b != kPastEnd) set_status(a.status, PAGODA_STATUS_BLOCK_TABLE);
                    raw[j] = make_uint2(0, 0);
                }
            }
#pragma unroll
            for (int j = 0; j < RPT; ++j) {
                float x[8];
                unpack8_e4m3(raw[j], x);
                *reinterpret_cast<uint4 *>(tile + swz<D>(r0 + j * RSTEP, c)) = pack8<T>(x);
            }
        } else {
#pragma unroll
            for (int j = 0; j < RPT; ++j) {
                const int r = r0 + j * RSTEP;
                T *dst = tile + swz<D>(r, c);
                const int b = entry[j];
                if (b >= 0 && b < a.num_blocks) {
                    cp_async16(dst, cache + (size_t)b * block_stride +
                                        ((size_t)kvh * a.block_size + bdiv.mod(n0 + r)) * D + c * 8);
                } else {
                    if (b != kPastEnd) set_status(a.status, PAGODA_STATUS_BLOCK_TABLE);
                    *reinterpret_cast<uint4 *>(dst) = make_uint4(0, 0, 0, 0);
                }
            }
        }
    }
};

// Grid (query tile, query head, sequence - seq_begin). Registers are capped for three
// resident blocks per SM (168; a few bytes spill): measured as fast as two blocks
// without the cap (PERF.md), with more warps to hide latency.
template <typename T, typename C, int D>
__global__ void __launch_bounds__(kPrefillThreads, 3)
    prefill_attention_kernel(const PagodaAttentionArgs a, int seq_begin) {
    constexpr int CH = D / 8;
    constexpr int KSTEPS = D / 16;   // k-steps of q.k
    constexpr int NT = kBN / 8;      // n-tiles of the score tile
    constexpr int DT = D / 8;        // n-tiles of the output
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *q_tile = reinterpret_cast<T *>(smem_raw);
    T *k_tile = q_tile + kBM * D;
    T *v_tile = k_tile + kBN * D;
    // Programmatic dependent launch: only the launch overlaps the kernel before.
    pdl_launch_dependents();
    pdl_wait();

    const int s = seq_begin + blockIdx.z, h = blockIdx.y;
    const int m_tile = gridDim.x - 1 - blockIdx.x;  // the longest rows first
    const int qs = a.query_start_loc[s];
    const int qlen = a.query_start_loc[s + 1] - qs;
    const int m0 = m_tile * kBM;
    if (m0 >= qlen) return;
    const int L = a.seq_lens[s];
    const int ctx_off = L - qlen;
    const int rows_valid = min(kBM, qlen - m0);
    const int pos_first = ctx_off + m0;
    const int kv_end = pos_first + rows_valid;  // one past the last query's position
    const int kv_begin = window_start(pos_first, a.sliding_window);
    const int G = a.num_q_heads / a.num_kv_heads;
    const int kvh = h / G;
    const int32_t *table = a.block_tables + (size_t)s * a.max_blocks_per_seq;
    const C *kc = (const C *)a.k_cache;
    const C *vc = (const C *)a.v_cache;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const size_t q_stride = (size_t)a.num_q_heads * D;

    // Q tile -> registers (A fragments).
    for (int i = threadIdx.x; i < kBM * CH; i += kPrefillThreads) {
        const int r = i / CH, c = i % CH;
        T *dst = q_tile + swz<D>(r, c);
        if (r < rows_valid)
            cp_async16(dst, (const T *)a.q + (size_t)(qs + m0 + r) * q_stride + (size_t)h * D + c * 8);
        else
            *reinterpret_cast<uint4 *>(dst) = make_uint4(0, 0, 0, 0);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    // Q stays in shared memory and is re-read per tile: that frees the registers
    // for a fourth resident block per SM.
    const T *q_frag = q_tile + (warp * 16 + (lane % 16)) * D;
    const int q_row_swz = (lane % 16) & 7;

    // An E4M3 cache's K scale goes into the scores' scale, its V scale into 1/l below.
    float2 kv_scale = make_float2(1.f, 1.f);
    if constexpr (kIsFp8<C>) kv_scale = load_kv_scales(a.kv_scales);  // after the wait above
    const float sl = kIsFp8<C> ? a.scale * kLog2e * kv_scale.x : a.scale * kLog2e;
    const int r0 = warp * 16 + lane / 4;  // this thread's rows: r0 and r0 + 8
    const int pos0 = pos_first + r0, pos1 = pos0 + 8;
    const int lo0 = window_start(pos0, a.sliding_window), lo1 = window_start(pos1, a.sliding_window);
    // The warp's rows see every token of a tile that ends at or before its first
    // row's position and starts at or after its last row's window start.
    const int warp_pos_min = pos_first + warp * 16;
    const int warp_lo_max = window_start(warp_pos_min + 15, a.sliding_window);
    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m_0 = -INFINITY, m_1 = -INFINITY, l_0 = 0.f, l_1 = 0.f;

    const BlockDiv bdiv(a.block_size);
    TileRows<D> rows;
    rows.fetch(table, kv_begin, kv_end, bdiv);
    rows.issue(k_tile, kc, kvh, a, bdiv);
    cp_async_commit();
    rows.issue(v_tile, vc, kvh, a, bdiv);
    cp_async_commit();

    for (int n0 = kv_begin; n0 < kv_end; n0 += kBN) {
        const bool has_next = n0 + kBN < kv_end;
        cp_async_wait<1>();  // K of this tile (V may still be in flight)
        __syncthreads();
        // The next tile's table entries: in flight while the tensor cores work.
        if (has_next) rows.fetch(table, n0 + kBN, kv_end, bdiv);

        float sacc[NT][4];
#pragma unroll
        for (int i = 0; i < NT; ++i) sacc[i][0] = sacc[i][1] = sacc[i][2] = sacc[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; kk += 2) {
            uint32_t qa[4], qb[4];
            ldmatrix_x4(qa, q_frag + (((2 * kk + lane / 16) ^ q_row_swz) << 3));
            ldmatrix_x4(qb, q_frag + (((2 * kk + 2 + lane / 16) ^ q_row_swz) << 3));
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                uint32_t kf[4];
                ldmatrix_x4(kf, k_tile + swz<D>(nt * 8 + (lane % 8), 2 * kk + lane / 8));
                Mma<T>::run(sacc[nt], qa, kf[0], kf[1]);
                Mma<T>::run(sacc[nt], qb, kf[2], kf[3]);
            }
        }
        __syncthreads();  // every warp has read K: the next tile may overwrite it
        if (has_next) rows.issue(k_tile, kc, kvh, a, bdiv);
        cp_async_commit();

        // Mask (only tiles on the diagonal or the window's edge need it), then the
        // online softmax update; scores stay unscaled until the exponent (one FFMA).
        // Each row's max and sum are shared by a lane quad.
        if (n0 + kBN - 1 > warp_pos_min || n0 < warp_lo_max) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int tok = n0 + nt * 8 + 2 * (lane % 4) + j;
                    if (tok > pos0 || tok < lo0) sacc[nt][j] = -INFINITY;
                    if (tok > pos1 || tok < lo1) sacc[nt][2 + j] = -INFINITY;
                }
            }
        }
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            mx0 = fmaxf(mx0, fmaxf(sacc[nt][0], sacc[nt][1]));
            mx1 = fmaxf(mx1, fmaxf(sacc[nt][2], sacc[nt][3]));
        }
#pragma unroll
        for (int o2 = 1; o2 < 4; o2 <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o2));
        }
        // Running maxima in the scaled log2 domain (sl > 0 keeps the order).
        const float mn0 = fmaxf(m_0, mx0 * sl), mn1 = fmaxf(m_1, mx1 * sl);
        // A row with nothing visible yet keeps max -inf: use 0 so exp2 gives 0, not NaN.
        const float base0 = mn0 == -INFINITY ? 0.f : mn0, base1 = mn1 == -INFINITY ? 0.f : mn1;
        const float alpha0 = fast_exp2(m_0 - base0), alpha1 = fast_exp2(m_1 - base1);
        m_0 = mn0;
        m_1 = mn1;
        float sum0 = 0.f, sum1 = 0.f;
        uint32_t pa[kBN / 16][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const float p0 = fast_exp2(fmaf(sacc[nt][0], sl, -base0)), p1 = fast_exp2(fmaf(sacc[nt][1], sl, -base0));
            const float p2 = fast_exp2(fmaf(sacc[nt][2], sl, -base1)), p3 = fast_exp2(fmaf(sacc[nt][3], sl, -base1));
            sum0 += p0 + p1;
            sum1 += p2 + p3;
            pa[nt / 2][(nt % 2) * 2 + 0] = Mma<T>::pack(p0, p1);
            pa[nt / 2][(nt % 2) * 2 + 1] = Mma<T>::pack(p2, p3);
        }
        l_0 = l_0 * alpha0 + sum0;
        l_1 = l_1 * alpha1 + sum1;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            o[dt][0] *= alpha0;
            o[dt][1] *= alpha0;
            o[dt][2] *= alpha1;
            o[dt][3] *= alpha1;
        }

        if (has_next)
            cp_async_wait<1>();  // V of this tile; the next K may stay in flight
        else
            cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
#pragma unroll
            for (int dt = 0; dt < DT; dt += 2) {
                uint32_t vf[4];
                ldmatrix_x4_trans(vf, v_tile + swz<D>(kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8, dt + lane / 16));
                Mma<T>::run(o[dt], pa[kk], vf[0], vf[1]);
                Mma<T>::run(o[dt + 1], pa[kk], vf[2], vf[3]);
            }
        }
        __syncthreads();  // every warp has read V
        if (has_next) rows.issue(v_tile, vc, kvh, a, bdiv);
        cp_async_commit();
    }

#pragma unroll
    for (int o2 = 1; o2 < 4; o2 <<= 1) {
        l_0 += __shfl_xor_sync(0xffffffffu, l_0, o2);
        l_1 += __shfl_xor_sync(0xffffffffu, l_1, o2);
    }
    float inv0 = l_0 > 0.f ? 1.f / l_0 : 0.f, inv1 = l_1 > 0.f ? 1.f / l_1 : 0.f;
    if constexpr (kIsFp8<C>) {
        inv0 *= kv_scale.y;
        inv1 *= kv_scale.y;
    }
    T *out = (T *)a.out;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = r0 + half * 8;
        if (r >= rows_valid) continue;
        const float inv = half ? inv1 : inv0;
        T *orow = out + (size_t)(qs + m0 + r) * q_stride + (size_t)h * D;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            const int d = dt * 8 + 2 * (lane % 4);
            orow[d] = from_float<T>(o[dt][half * 2] * inv);
            orow[d + 1] = from_float<T>(o[dt][half * 2 + 1] * inv);
        }
    }
}

template <typename T, typename C, int D>
int launch_prefill(const PagodaAttentionArgs *a, int seq_begin, int max_query_len, LaunchStream s) {
    const int nseqs = a->num_seqs - seq_begin;
    if (nseqs <= 0 || max_query_len <= 0) return 0;
    const size_t smem = sizeof(T) * (size_t)(kBM + 2 * kBN) * D;
    if (smem > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(prefill_attention_kernel<T, C, D>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return (int)e;
    }
    dim3 grid(ceil_div(max_query_len, kBM), a->num_q_heads, nseqs);
    launch(prefill_attention_kernel<T, C, D>, grid, kPrefillThreads, smem, s, *a, seq_begin);
    PAGODA_LAUNCH_CHECK();
    return 0;
}

template <typename T, typename C, int D>
int launch_attention(const PagodaAttentionArgs *a, const PagodaKernelPolicy *policy, LaunchStream s) {
    const int G = a->num_q_heads / a->num_kv_heads;
    if (G > kMaxDecodeGroup) {
        // Wide groups: the prefill kernel serves decode rows too (one query row each).
        const int max_q = a->max_prefill_query_len > 1 ? a->max_prefill_query_len : 1;
        return launch_prefill<T, C, D>(a, 0, max_q, s);
    }
    if (a->num_decode_seqs > 0) {
        const int rc = launch_decode<T, C, D>(a, policy, s);
        if (rc != 0) return rc;
    }
    return launch_prefill<T, C, D>(a, a->num_decode_seqs, a->max_prefill_query_len, s);
}

// The cache's element type: the activation type T, or E4M3 codes.
template <typename T, int D>
int launch_attention_cache(const PagodaAttentionArgs *a, const PagodaKernelPolicy *policy, LaunchStream s) {
    if (a->cache_dtype == PAGODA_DTYPE_F8E4M3) return launch_attention<T, __nv_fp8_e4m3, D>(a, policy, s);
    return launch_attention<T, T, D>(a, policy, s);
}

}  // namespace

extern "C" size_t pagoda_attention_workspace_bytes(const PagodaAttentionArgs *a, const PagodaKernelPolicy *policy) {
    if (policy == nullptr) return 0;  // pagoda_attention refuses the launch
    const int G = a->num_kv_heads > 0 ? a->num_q_heads / a->num_kv_heads : 0;
    if (a->num_decode_seqs == 0 || G > kMaxDecodeGroup) return 0;
    const int max_splits = decode_max_splits(a, policy);
    if (max_splits <= 1) return 0;
    const size_t parts = (size_t)a->num_decode_seqs * a->num_q_heads * max_splits;
    return parts * (size_t)(a->head_dim + 2) * sizeof(float);
}

extern "C" int pagoda_attention(const PagodaAttentionArgs *a, const PagodaKernelPolicy *policy, void *stream) {
    PAGODA_CHECK_POLICY(policy);
    if (a->num_seqs == 0) return 0;
    if (a->num_kv_heads <= 0 || a->num_q_heads % a->num_kv_heads != 0 || a->block_size <= 0 ||
        (a->block_size & (a->block_size - 1)) != 0)
        return PAGODA_ERR_ARGUMENT;
    if (a->num_decode_seqs > 0 && a->workspace_bytes < pagoda_attention_workspace_bytes(a, policy))
        return PAGODA_ERR_WORKSPACE;
    if (!aligned16(a->q) || !aligned16(a->k_cache) || !aligned16(a->v_cache) || !aligned16(a->out))
        return PAGODA_ERR_ALIGNMENT;
    if (a->cache_dtype != a->dtype && a->cache_dtype != PAGODA_DTYPE_F8E4M3) return PAGODA_ERR_DTYPE;
    const LaunchStream s = launch_stream(policy, stream);
    PAGODA_DISPATCH_HALF(a->dtype, {
        switch (a->head_dim) {
            case 64: return launch_attention_cache<scalar_t, 64>(a, policy, s);
            case 128: return launch_attention_cache<scalar_t, 128>(a, policy, s);
            default: return PAGODA_ERR_HEAD_DIM;
        }
    });
    return 0;
}
