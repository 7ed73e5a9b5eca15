// LoRA over a batch that mixes adapters, each token by its slot
// (pagoda_lora): for each part p of a product, u = A_p[slot] . x (f32), then
// out[:, part's columns] += Bt_p[slot]^T . u (in the activation dtype). Slots
// hold A part-major, [P, S, R, K], and each part's B transposed, Bt [S, R, N],
// so both stacks are plain matrices over every slot.
//
// Three ways, chosen per launch by shape (so a recorded graph keeps its
// choice):
// - Dense (from dense_min_tokens tokens, while the slot stacks are narrow:
//   P * S * R <= 4096, S * R <= 1024): cuBLAS GEMMs over every slot at once.
//   x . A_all^T (T x P*S*R, f32, columns (p, s, r)) into scratch; one mask
//   kernel keeps each token's slot columns, rounded to the activation dtype
//   (as vLLM's kernels round u), and zeroes every other slot's, into a second
//   scratch; then each part's out columns += its S*R columns of that (read in
//   place, leading dimension P*S*R) . Bt_p (S*R x N) with beta = 1 and f32
//   reductions. Parts whose Bt follow each other in one allocation with equal
//   N and equally spaced output columns (k and v, gate and up) take one
//   strided batched GEMM. S times the adapter work, at tensor-core speed,
//   out read and written once per GEMM; no per-token gathers or scatters.
// - Per token (Punica's BGMV; few tokens, e.g. single-stream decode, where
//   reading every slot would cost more than the gathers), u in f32 scratch:
//   - shrink: a block takes one token and ROWS output columns (rows (p, r) of
//     A[slot]) and splits K over its threads with 16-byte loads of x and A;
//     the threads' sums meet in shared memory. ROWS is chosen per launch so
//     that decode (one token, P*R = 16..192 rows) still spreads over many SMs;
//   - expand, per part: a thread takes one output column n: it holds column
//     n of Bt[slot] in registers (a warp's loads of one Bt row are
//     contiguous), dots it with the token's u (in shared memory) in f32, and
//     adds the sum into out once; with many tokens a block walks
//     TOKENS_PER_BLOCK tokens and reloads the column only when the slot
//     changes. (A form taking 8 adjacent columns per thread with 16-byte
//     loads was measured on an H100 and was no faster in single-stream
//     decode: BENCHMARKS.md, "FP8 KV cache, FP8 weights, multi-LoRA"; removed.)
// - Grouped by slot (SGMV, only with PAGODA_LORA_GROUPED=1 and when the
//   launch is not dense): a block takes one group (up to 32 tokens of one
//   slot, through token_order) and reads its A rows once per 8 tokens, its Bt
//   column once per group. Measured slower than the dense path in the engine
//   (BENCHMARKS.md), kept for comparison.
//
// Slots < 0 (no adapter): the shrink writes zeros, the expand leaves the row
// (the dense expand adds an exact 0). Slots >= num_slots set
// PAGODA_STATUS_LORA_SLOT and are treated as no adapter. No host
// synchronisation; the scratch comes from the caller (a stream-ordered
// allocation): all may be captured in a graph. Every kernel waits on the one
// before (PDL) before its first read: the slots may be any kernel's output.
#include "blas.cuh"
#include "common.cuh"

using namespace pagoda;

namespace {

// One launch's shrink: out [num_tokens, u] (f32) with u = parts * rank
// columns (p, r); a is [parts, num_slots, rank, k].
struct ShrinkLaunch {
    const void *x;
    const void *a;
    const int32_t *token_slots;
    float *out;
    uint32_t *status;
    int dtype;
    int num_tokens;
    int k;
    int u;
    int rank;
    int num_slots;
    const int32_t *token_order;
    const int32_t *groups;
    int num_groups;
};

// One part's expand: out[t, out_offset + n] += sum_r u[t, u_offset + r] * b[slot_t, r, n].
struct ExpandLaunch {
    const float *u;
    const void *b;
    const int32_t *token_slots;
    void *out;
    uint32_t *status;
    int dtype;
    int num_tokens;
    int n;
    int rank;
    int num_slots;
    int u_stride;
    int u_offset;
    int out_stride;
    int out_offset;
    const int32_t *token_order;
    const int32_t *groups;
    int num_groups;
};

// Row j = (p, r) of slot s in a part-major A stack [parts, num_slots, rank, k].
template <typename T>
__device__ __forceinline__ const T *slot_row(const T *a, int s, int j, int rank, int num_slots, int k) {
    const int p = j / rank;
    return a + (((size_t)p * num_slots + s) * rank + (j - p * rank)) * k;
}

constexpr int SHRINK_MAX_THREADS = 256;
constexpr int SHRINK_MAX_WARPS = SHRINK_MAX_THREADS / 32;

// 8 products of one 16-byte chunk of x with one of a row of A, added to acc.
template <typename T> __device__ __forceinline__ float dot8(const uint4 &xv, const uint4 &av, float acc) {
    float xf[8], af[8];
    unpack8<T>(xv, xf);
    unpack8<T>(av, af);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc = fmaf(af[e], xf[e], acc);
    return acc;
}

// out[t, j] = A[slot_t, j, :] . x[t, :] for j in blockIdx.y * ROWS + 0..ROWS,
// t = blockIdx.x. VEC: 16-byte loads (16-bit T, K % 8 == 0, x and A aligned);
// otherwise one element at a time.
template <typename T, int ROWS, bool VEC>
__global__ void __launch_bounds__(SHRINK_MAX_THREADS)
    lora_shrink_kernel(const T *__restrict__ x, const T *__restrict__ a, const int32_t *__restrict__ slots,
                       float *__restrict__ out, int k, int u, int rank, int num_slots, uint32_t *status) {
    pdl_launch_dependents();
    pdl_wait();
    const int t = blockIdx.x;
    const int j0 = blockIdx.y * ROWS;
    const int32_t s = slots[t];
    float *o = out + (size_t)t * u;
    if (s < 0 || s >= num_slots) {
        if (s >= num_slots && threadIdx.x == 0 && blockIdx.y == 0) set_status(status, PAGODA_STATUS_LORA_SLOT);
        if (threadIdx.x < ROWS && j0 + (int)threadIdx.x < u) o[j0 + threadIdx.x] = 0.f;
        return;
    }
    const T *xt = x + (size_t)t * k;
    // Rows past U (the last block's tail) read row U - 1 and are not stored.
    const T *arow[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) arow[r] = slot_row(a, s, min(j0 + r, u - 1), rank, num_slots, k);
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
    if constexpr (VEC) {
        const uint4 *xv = reinterpret_cast<const uint4 *>(xt);
        const uint4 *av[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) av[r] = reinterpret_cast<const uint4 *>(arow[r]);
        const int chunks = k / 8, step = blockDim.x;
        int c = threadIdx.x;
        // Two chunks of x and of every row in flight before any use.
        for (; c + step < chunks; c += 2 * step) {
            const uint4 x0 = __ldg(xv + c), x1 = __ldg(xv + c + step);
            uint4 a0[ROWS], a1[ROWS];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                a0[r] = __ldg(av[r] + c);
                a1[r] = __ldg(av[r] + c + step);
            }
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[r] = dot8<T>(x1, a1[r], dot8<T>(x0, a0[r], acc[r]));
        }
        if (c < chunks) {
            const uint4 x0 = __ldg(xv + c);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[r] = dot8<T>(x0, __ldg(av[r] + c), acc[r]);
        }
    } else {
        for (int i = threadIdx.x; i < k; i += blockDim.x) {
            const float xf = to_float<T>(xt[i]);
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[r] = fmaf(to_float<T>(arow[r][i]), xf, acc[r]);
        }
    }
    __shared__ float partial[ROWS][SHRINK_MAX_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const float v = warp_sum(acc[r]);
        if (lane == 0) partial[r][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x < ROWS && j0 + (int)threadIdx.x < u) {
        float sum = 0.f;
        for (int w = 0; w < warps; ++w) sum += partial[threadIdx.x][w];
        o[j0 + threadIdx.x] = sum;
    }
}

template <typename T, bool VEC>
cudaError_t launch_shrink(const ShrinkLaunch *p, int rows, int threads, LaunchStream s) {
    const T *x = static_cast<const T *>(p->x);
    const T *a = static_cast<const T *>(p->a);
    const dim3 block(threads);
    switch (rows) {
#define PAGODA_SHRINK_CASE(R)                                                                                  \
    case R:                                                                                                    \
        return launch(lora_shrink_kernel<T, R, VEC>, dim3(p->num_tokens, ceil_div(p->u, R)), block, 0, s, x, a, \
                      p->token_slots, p->out, p->k, p->u, p->rank, p->num_slots, p->status);
        PAGODA_SHRINK_CASE(1)
        PAGODA_SHRINK_CASE(2)
        PAGODA_SHRINK_CASE(4)
#undef PAGODA_SHRINK_CASE
        default: return cudaErrorInvalidValue;
    }
}

// Threads: enough for one load each of a row's (16-byte or single) units, up to the maximum.
template <typename T>
cudaError_t dispatch_shrink(const ShrinkLaunch *p, int rows, bool vec, LaunchStream s) {
    auto threads_for = [](int units) {
        return units >= SHRINK_MAX_THREADS ? SHRINK_MAX_THREADS : 32 * ceil_div(units > 0 ? units : 1, 32);
    };
    if constexpr (sizeof(T) == 2) {
        if (vec) return launch_shrink<T, true>(p, rows, threads_for(p->k / 8), s);
    }
    return launch_shrink<T, false>(p, rows, threads_for(p->k), s);
}

constexpr int EXPAND_THREADS = 128;
// Tokens a block walks on the many-token path (one when few tokens: more blocks).
constexpr int EXPAND_TOKENS_PER_BLOCK = 8;
// The vectorised path keeps up to 8 16-byte chunks (R <= 64) in registers.
// The u of this block's tokens (tokens_per_block from t0) into shared memory,
// [tokens][rank]; returns how many tokens the block has. Ends with a barrier.
__device__ __forceinline__ int stage_block_u(const float *__restrict__ u, int u_stride, int u_offset, int t0,
                                             int num_tokens, int rank, int tokens_per_block, float *us) {
    const int tokens = min(tokens_per_block, num_tokens - t0);
    for (int i = threadIdx.x; i < tokens * rank; i += blockDim.x) {
        const int j = i / rank;
        us[i] = u[(size_t)(t0 + j) * u_stride + u_offset + (i - j * rank)];
    }
    __syncthreads();
    return tokens;
}

constexpr int EXPAND_MAX_CACHED_RANK = 64;

// out[t, out_offset + n] += sum_r u[t, u_offset + r] * Bt[slot_t, r, n] for the
// tokens_per_block tokens from blockIdx.x * tokens_per_block and the column n
// of this thread (a warp's loads of one Bt row are contiguous). RMAX > 0:
// rank <= RMAX, the thread's column of Bt stays in registers while the slot
// stays the same. RMAX == 0: read from Bt for every token, any rank.
template <typename T, int RMAX>
__global__ void __launch_bounds__(EXPAND_THREADS)
    lora_expand_kernel(const float *__restrict__ u, int u_stride, int u_offset, const T *__restrict__ b,
                       const int32_t *__restrict__ slots, T *__restrict__ out, int out_stride, int out_offset,
                       int num_tokens, int n, int rank, int num_slots, int tokens_per_block, uint32_t *status) {
    extern __shared__ float us[];  // [tokens_per_block][rank]: the tokens' u
    pdl_launch_dependents();
    pdl_wait();
    const int t0 = blockIdx.x * tokens_per_block;
    const int tokens = stage_block_u(u, u_stride, u_offset, t0, num_tokens, rank, tokens_per_block, us);
    const int col = blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= n) return;
    float bf[RMAX > 0 ? RMAX : 1];
    int32_t loaded = -1;
    for (int j = 0; j < tokens; ++j) {
        const int32_t s = slots[t0 + j];
        if (s < 0) continue;
        if (s >= num_slots) {
            if (col == 0) set_status(status, PAGODA_STATUS_LORA_SLOT);
            continue;
        }
        const float *ut = us + j * rank;
        const T *bcol = b + (size_t)s * rank * n + col;
        float acc = 0.f;
        if constexpr (RMAX > 0) {
            if (s != loaded) {
#pragma unroll
                for (int r = 0; r < RMAX; ++r) bf[r] = r < rank ? to_float<T>(__ldg(bcol + (size_t)r * n)) : 0.f;
                loaded = s;
            }
#pragma unroll
            for (int r = 0; r < RMAX; ++r)
                if (r < rank) acc = fmaf(ut[r], bf[r], acc);
        } else {
            for (int r = 0; r < rank; ++r) acc = fmaf(ut[r], to_float<T>(bcol[(size_t)r * n]), acc);
        }
        T *o = out + (size_t)(t0 + j) * out_stride + out_offset + col;
        *o = from_float<T>(to_float<T>(*o) + acc);
    }
}

template <typename T, int RMAX>
cudaError_t launch_expand(const ExpandLaunch *p, int tokens_per_block, LaunchStream s) {
    const dim3 grid(ceil_div(p->num_tokens, tokens_per_block), ceil_div(p->n, EXPAND_THREADS));
    const size_t smem = (size_t)tokens_per_block * p->rank * sizeof(float);
    return launch(lora_expand_kernel<T, RMAX>, grid, dim3(EXPAND_THREADS), smem, s, p->u, p->u_stride,
                  p->u_offset, static_cast<const T *>(p->b), p->token_slots, static_cast<T *>(p->out),
                  p->out_stride, p->out_offset, p->num_tokens, p->n, p->rank, p->num_slots, tokens_per_block,
                  p->status);
}

template <typename T>
cudaError_t dispatch_expand(const ExpandLaunch *p, int tokens_per_block, LaunchStream s) {
    if (p->rank <= 8) return launch_expand<T, 8>(p, tokens_per_block, s);
    if (p->rank <= 16) return launch_expand<T, 16>(p, tokens_per_block, s);
    if (p->rank <= 32) return launch_expand<T, 32>(p, tokens_per_block, s);
    if (p->rank <= EXPAND_MAX_CACHED_RANK) return launch_expand<T, EXPAND_MAX_CACHED_RANK>(p, tokens_per_block, s);
    return launch_expand<T, 0>(p, tokens_per_block, s);
}

// ---- Grouped by slot (SGMV) ----------------------------------------------

constexpr int GROUP_TOKENS = PAGODA_LORA_GROUP_TOKENS;
constexpr int GSHRINK_THREADS = 128;
constexpr int GSHRINK_WARPS = GSHRINK_THREADS / 32;
constexpr int GSHRINK_TOKENS = 8;  // tokens dotted per pass over K
// A launch takes the grouped path from this many tokens (fewer: the per-token
// kernels spread a token's rows over more blocks).
constexpr int GROUPED_MIN_TOKENS = 16;

// Reads group g's (slot, first, count) and its tokens into tok; returns the
// count, or 0 for padding and for a count past the limit (reported).
__device__ __forceinline__ int load_group(const int32_t *__restrict__ groups, const int32_t *__restrict__ order,
                                          int g, int *tok, int &slot, uint32_t *status) {
    slot = groups[3 * g];
    const int first = groups[3 * g + 1], count = groups[3 * g + 2];
    if (count <= 0) return 0;
    if (count > GROUP_TOKENS) {
        if (threadIdx.x == 0) set_status(status, PAGODA_STATUS_LORA_SLOT);
        return 0;
    }
    if ((int)threadIdx.x < count) tok[threadIdx.x] = order[first + threadIdx.x];
    __syncthreads();
    return count;
}

// out[tok, j] = A[slot, j, :] . x[tok, :] for the group blockIdx.x's tokens
// and j in blockIdx.y * ROWS + 0..ROWS. 16-bit T, K % 8 == 0, x and a aligned.
template <typename T, int ROWS>
__global__ void __launch_bounds__(GSHRINK_THREADS)
    lora_shrink_grouped_kernel(const T *__restrict__ x, const T *__restrict__ a, const int32_t *__restrict__ order,
                               const int32_t *__restrict__ groups, float *__restrict__ out, int k, int u,
                               int rank, int num_slots, uint32_t *status) {
    pdl_launch_dependents();
    pdl_wait();
    __shared__ int tok[GROUP_TOKENS];
    __shared__ float partial[GSHRINK_TOKENS][ROWS][GSHRINK_WARPS];
    int slot;
    const int count = load_group(groups, order, blockIdx.x, tok, slot, status);
    if (count == 0) return;
    const int j0 = blockIdx.y * ROWS;
    if (slot < 0 || slot >= num_slots) {
        if (slot >= num_slots && threadIdx.x == 0 && blockIdx.y == 0) set_status(status, PAGODA_STATUS_LORA_SLOT);
        for (int i = threadIdx.x; i < count * ROWS; i += blockDim.x) {
            const int j = j0 + i % ROWS;
            if (j < u) out[(size_t)tok[i / ROWS] * u + j] = 0.f;
        }
        return;
    }
    // Rows past U (the last block's tail) read row U - 1 and are not stored.
    const uint4 *av[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
        av[r] = reinterpret_cast<const uint4 *>(slot_row(a, slot, min(j0 + r, u - 1), rank, num_slots, k));
    const int chunks = k / 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int p = 0; p < count; p += GSHRINK_TOKENS) {
        const int n = min(GSHRINK_TOKENS, count - p);
        // Tokens past the group's end repeat its last token and are not stored.
        const uint4 *xv[GSHRINK_TOKENS];
#pragma unroll
        for (int i = 0; i < GSHRINK_TOKENS; ++i)
            xv[i] = reinterpret_cast<const uint4 *>(x + (size_t)tok[p + min(i, n - 1)] * k);
        float acc[GSHRINK_TOKENS][ROWS];
#pragma unroll
        for (int i = 0; i < GSHRINK_TOKENS; ++i)
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[i][r] = 0.f;
        for (int c = threadIdx.x; c < chunks; c += GSHRINK_THREADS) {
            float af[ROWS][8];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) unpack8<T>(__ldg(av[r] + c), af[r]);
#pragma unroll
            for (int i = 0; i < GSHRINK_TOKENS; ++i) {
                float xf[8];
                unpack8<T>(__ldg(xv[i] + c), xf);
#pragma unroll
                for (int r = 0; r < ROWS; ++r)
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[i][r] = fmaf(af[r][e], xf[e], acc[i][r]);
            }
        }
#pragma unroll
        for (int i = 0; i < GSHRINK_TOKENS; ++i)
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                const float v = warp_sum(acc[i][r]);
                if (lane == 0) partial[i][r][warp] = v;
            }
        __syncthreads();
        for (int o = threadIdx.x; o < n * ROWS; o += GSHRINK_THREADS) {
            const int i = o / ROWS, r = o % ROWS;
            if (j0 + r < u) {
                float sum = 0.f;
#pragma unroll
                for (int w = 0; w < GSHRINK_WARPS; ++w) sum += partial[i][r][w];
                out[(size_t)tok[p + i] * u + j0 + r] = sum;
            }
        }
        __syncthreads();  // partial is rewritten by the next pass
    }
}

template <typename T>
cudaError_t launch_shrink_grouped(const ShrinkLaunch *p, int rows, LaunchStream s) {
    const T *x = static_cast<const T *>(p->x);
    const T *a = static_cast<const T *>(p->a);
    switch (rows) {
#define PAGODA_GSHRINK_CASE(R)                                                                                 \
    case R:                                                                                                    \
        return launch(lora_shrink_grouped_kernel<T, R>, dim3(p->num_groups, ceil_div(p->u, R)),                \
                      dim3(GSHRINK_THREADS), 0, s, x, a, p->token_order, p->groups, p->out, p->k, p->u,       \
                      p->rank, p->num_slots, p->status);
        PAGODA_GSHRINK_CASE(1)
        PAGODA_GSHRINK_CASE(2)
        PAGODA_GSHRINK_CASE(4)
        PAGODA_GSHRINK_CASE(8)
#undef PAGODA_GSHRINK_CASE
        default: return cudaErrorInvalidValue;
    }
}

constexpr int GEXPAND_THREADS = 128;
constexpr int GEXPAND_MAX_RANK = 64;

// out[tok, out_offset + n] += sum_r u[tok, u_offset + r] * Bt[slot, r, n] for
// the group blockIdx.x's tokens and this thread's column n. 16-bit T,
// R % 8 == 0, R <= 8 * CHUNKS.
template <typename T, int CHUNKS>
__global__ void __launch_bounds__(GEXPAND_THREADS)
    lora_expand_grouped_kernel(const float *__restrict__ u, int u_stride, int u_offset, const T *__restrict__ b,
                               const int32_t *__restrict__ order, const int32_t *__restrict__ groups,
                               T *__restrict__ out, int out_stride, int out_offset, int n, int rank, int num_slots,
                               uint32_t *status) {
    pdl_launch_dependents();
    pdl_wait();
    __shared__ int tok[GROUP_TOKENS];
    __shared__ float us[GROUP_TOKENS * GEXPAND_MAX_RANK];  // [count][rank]
    int slot;
    const int count = load_group(groups, order, blockIdx.x, tok, slot, status);
    if (count == 0 || slot < 0) return;
    if (slot >= num_slots) {
        if (threadIdx.x == 0 && blockIdx.y == 0) set_status(status, PAGODA_STATUS_LORA_SLOT);
        return;
    }
    for (int i = threadIdx.x; i < count * rank; i += blockDim.x) {
        const int j = i / rank;
        us[i] = u[(size_t)tok[j] * u_stride + u_offset + (i - j * rank)];
    }
    __syncthreads();
    const int col = blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= n) return;
    float bf[CHUNKS][8];
    const T *bcol = b + (size_t)slot * rank * n + col;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
        for (int e = 0; e < 8; ++e) bf[c][e] = c * 8 + e < rank ? to_float<T>(__ldg(bcol + (size_t)(c * 8 + e) * n)) : 0.f;
    for (int j = 0; j < count; ++j) {
        const float *ut = us + j * rank;
        float acc = 0.f;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {
            if (c * 8 < rank) {
#pragma unroll
                for (int e = 0; e < 8; ++e) acc = fmaf(ut[c * 8 + e], bf[c][e], acc);
            }
        }
        T *o = out + (size_t)tok[j] * out_stride + out_offset + col;
        *o = from_float<T>(to_float<T>(*o) + acc);
    }
}

template <typename T, int CHUNKS>
cudaError_t launch_expand_grouped(const ExpandLaunch *p, LaunchStream s) {
    const dim3 grid(p->num_groups, ceil_div(p->n, GEXPAND_THREADS));
    return launch(lora_expand_grouped_kernel<T, CHUNKS>, grid, dim3(GEXPAND_THREADS), 0, s, p->u, p->u_stride,
                  p->u_offset, static_cast<const T *>(p->b), p->token_order, p->groups, static_cast<T *>(p->out),
                  p->out_stride, p->out_offset, p->n, p->rank, p->num_slots, p->status);
}

template <typename T>
cudaError_t dispatch_expand_grouped(const ExpandLaunch *p, LaunchStream s) {
    if (p->rank <= 8) return launch_expand_grouped<T, 1>(p, s);
    if (p->rank <= 16) return launch_expand_grouped<T, 2>(p, s);
    if (p->rank <= 32) return launch_expand_grouped<T, 4>(p, s);
    return launch_expand_grouped<T, 8>(p, s);
}

// ---- Dense: cuBLAS over every slot ------------------------------------------
// all = x . [A_(0,0); A_(0,1); ...; A_(P-1,S-1)]^T (f32, columns (p, s, r));
// um = all with every slot's columns but the token's zeroed (as T); then per
// part out += um[:, p*S*R ..][:, S*R] . [Bt_0; Bt_1; ...]: the slot stacks
// are plain matrices, so a product is a few GEMMs at tensor-core speed
// instead of per-token gathers, for num_slots times the (small) adapter work.

constexpr int DENSE_THREADS = 128;

size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

bool is_half(int dtype) { return dtype == PAGODA_DTYPE_BF16 || dtype == PAGODA_DTYPE_F16; }

long dense_cols(const PagodaLoraArgs *p) { return (long)p->num_parts * p->num_slots * p->rank; }

bool dense_applies(const PagodaLoraArgs *p) {
    return p->dense_min_tokens > 0 && p->num_tokens >= p->dense_min_tokens && is_half(p->dtype) && p->k > 0 &&
           p->num_slots > 0 && dense_cols(p) <= PAGODA_LORA_DENSE_MAX_SHRINK_COLS &&
           (long)p->num_slots * p->rank <= PAGODA_LORA_DENSE_MAX_EXPAND_COLS;
}

// The dense path's scratch: all (f32), then um (16-bit), each [T, P*S*R].
size_t dense_all_bytes(const PagodaLoraArgs *p) { return align256((size_t)p->num_tokens * dense_cols(p) * 4); }
size_t dense_um_bytes(const PagodaLoraArgs *p) { return align256((size_t)p->num_tokens * dense_cols(p) * 2); }
// The per-token path's: u (f32) [T, P*R].
size_t per_token_u_bytes(const PagodaLoraArgs *p) {
    return align256((size_t)p->num_tokens * p->num_parts * p->rank * sizeof(float));
}

// um[t, c] = all[t, c] (as T) where column c = (p, s, r) belongs to t's slot
// s, 0 elsewhere (everywhere without a valid slot). Grid: tokens. VEC8: 8
// columns at a time (rank % 8 == 0, so 8 columns share a slot; cols % 8 == 0
// and all, um 16-byte aligned).
template <typename T, bool VEC8>
__global__ void __launch_bounds__(DENSE_THREADS)
    lora_mask_kernel(const float *__restrict__ all, const int32_t *__restrict__ slots, T *__restrict__ um, int cols,
                     int rank, int num_slots, uint32_t *status) {
    pdl_launch_dependents();
    pdl_wait();
    const int t = blockIdx.x;
    const int32_t s = slots[t];
    if (s >= num_slots && threadIdx.x == 0) set_status(status, PAGODA_STATUS_LORA_SLOT);
    const bool valid = s >= 0 && s < num_slots;
    const float *row = all + (size_t)t * cols;
    T *o = um + (size_t)t * cols;
    if constexpr (VEC8) {
        for (int c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
            float v[8];
            if (valid && (c / rank) % num_slots == s) {
                const float4 lo = *reinterpret_cast<const float4 *>(row + c);
                const float4 hi = *reinterpret_cast<const float4 *>(row + c + 4);
                v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w;
                v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) v[e] = 0.f;
            }
            *reinterpret_cast<uint4 *>(o + c) = pack8<T>(v);
        }
    } else {
        for (int c = threadIdx.x; c < cols; c += blockDim.x)
            o[c] = from_float<T>(valid && (c / rank) % num_slots == s ? row[c] : 0.f);
    }
}

// Whether part j can join the strided batch of parts first .. j - 1: the same
// n, its Bt right after the previous part's (one allocation), its columns
// the same distance (at least n) further on.
bool batches_with(const PagodaLoraArgs *p, int first, int j, size_t elem) {
    const PagodaLoraPart &a = p->parts[first], &b = p->parts[j];
    const long step = (long)p->parts[first + 1].out_offset - a.out_offset;
    const size_t slot_stack = (size_t)p->num_slots * p->rank * a.n * elem;
    return b.n == a.n && step >= a.n &&
           static_cast<const char *>(b.b) == static_cast<const char *>(a.b) + (size_t)(j - first) * slot_stack &&
           (long)b.out_offset - a.out_offset == (long)(j - first) * step;
}

template <typename T> int lora_dense(BlasHandle *blas, const PagodaLoraArgs *p, LaunchStream ls) {
    const int cols = (int)dense_cols(p);
    const int sr = p->num_slots * p->rank;
    if (p->scratch == nullptr || p->scratch_bytes < dense_all_bytes(p) + dense_um_bytes(p)) return PAGODA_ERR_WORKSPACE;
    cudaDataType_t type;
    if (!cuda_type(p->dtype, &type)) return PAGODA_ERR_DTYPE;
    int rc = blas_bind(blas, ls.stream);
    if (rc != 0) return rc;
    float *all = static_cast<float *>(p->scratch);
    T *um = reinterpret_cast<T *>(static_cast<char *>(p->scratch) + dense_all_bytes(p));
    // Column-major: all^T (cols x t) = a (k x cols)^T . x^T (k x t).
    const float one = 1.f, zero = 0.f;
    rc = blas_status(cublasGemmEx(blas->handle, CUBLAS_OP_T, CUBLAS_OP_N, cols, p->num_tokens, p->k, &one, p->a, type,
                                  p->k, p->x, type, p->k, &zero, all, CUDA_R_32F, cols, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
    if (rc != 0) return rc;
    const bool vec8 = p->rank % 8 == 0 && aligned16(all) && aligned16(um);
    const cudaError_t e =
        vec8 ? launch(lora_mask_kernel<T, true>, dim3(p->num_tokens), dim3(DENSE_THREADS), 0, ls, all, p->token_slots,
                      um, cols, p->rank, p->num_slots, p->status)
             : launch(lora_mask_kernel<T, false>, dim3(p->num_tokens), dim3(DENSE_THREADS), 0, ls, all,
                      p->token_slots, um, cols, p->rank, p->num_slots, p->status);
    if (e != cudaSuccess) return (int)e;
    // Reductions in f32, never in out's dtype: a split-K algorithm would
    // otherwise round the partial sums (and out) once per split (measured:
    // errors growing with num_slots * rank in the conformance grid).
    cublasStatus_t st = cublasSetMathMode(
        blas->handle, (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
    if (st != CUBLAS_STATUS_SUCCESS) return blas_status(st);
    for (int first = 0; first < p->num_parts && st == CUBLAS_STATUS_SUCCESS;) {
        int count = 1;
        while (first + count < p->num_parts && batches_with(p, first, first + count, sizeof(T))) ++count;
        const PagodaLoraPart &part = p->parts[first];
        const T *u = um + (size_t)first * sr;
        T *out = static_cast<T *>(p->out) + part.out_offset;
        // Column-major: out^T (n x t, leading dimension out_stride) += bt (n x sr) . u^T (sr x t, leading
        // dimension cols).
        if (count == 1) {
            st = cublasGemmEx(blas->handle, CUBLAS_OP_N, CUBLAS_OP_N, part.n, p->num_tokens, sr, &one, part.b, type,
                              part.n, u, type, cols, &one, out, type, p->out_stride, CUBLAS_COMPUTE_32F,
                              CUBLAS_GEMM_DEFAULT);
        } else {
            const long long step = (long long)p->parts[first + 1].out_offset - part.out_offset;
            st = cublasGemmStridedBatchedEx(blas->handle, CUBLAS_OP_N, CUBLAS_OP_N, part.n, p->num_tokens, sr, &one,
                                            part.b, type, part.n, (long long)sr * part.n, u, type, cols,
                                            (long long)sr, &one, out, type, p->out_stride, step, count,
                                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        }
        first += count;
    }
    const cublasStatus_t restored = cublasSetMathMode(blas->handle, CUBLAS_DEFAULT_MATH);
    if (st != CUBLAS_STATUS_SUCCESS) return blas_status(st);
    return blas_status(restored);
}

// Dynamic shared memory a block may take without opting in.
constexpr size_t SMEM_DEFAULT_LIMIT = 48 * 1024;

// The per-token (or grouped) shrink of every part into u.
int shrink_per_token(const ShrinkLaunch *p, int sms, LaunchStream s) {
    const bool vec = p->k % 8 == 0 && aligned16(p->x) && aligned16(p->a);
    cudaError_t e = cudaSuccess;
    if (p->num_groups > 0 && p->num_tokens >= GROUPED_MIN_TOKENS && vec && is_half(p->dtype)) {
        if (p->token_order == nullptr || p->groups == nullptr) return PAGODA_ERR_ARGUMENT;
        // Rows of A per block: the most that still give every SM two blocks.
        int rows = 8;
        while (rows > 1 && ceil_div(p->u, rows) * p->num_groups < 2 * sms) rows /= 2;
        PAGODA_DISPATCH_HALF(p->dtype, { e = launch_shrink_grouped<scalar_t>(p, rows, s); });
        return (int)e;
    }
    // Rows of A per block: as many as keep about two blocks per SM busy.
    const int rows = ceil_div(p->u, 4) * p->num_tokens >= 2 * sms ? 4
                     : ceil_div(p->u, 2) * p->num_tokens >= sms  ? 2
                                                                  : 1;
    PAGODA_DISPATCH_FLOAT(p->dtype, { e = dispatch_shrink<scalar_t>(p, rows, vec, s); });
    return (int)e;
}

// One part's per-token (or grouped) expand.
int expand_per_token(const ExpandLaunch *p, int sms, LaunchStream s) {
    cudaError_t e = cudaSuccess;
    if (p->num_groups > 0 && p->num_tokens >= GROUPED_MIN_TOKENS && is_half(p->dtype) && p->rank % 8 == 0 &&
        p->rank <= GEXPAND_MAX_RANK) {
        if (p->token_order == nullptr || p->groups == nullptr) return PAGODA_ERR_ARGUMENT;
        PAGODA_DISPATCH_HALF(p->dtype, { e = dispatch_expand_grouped<scalar_t>(p, s); });
        return (int)e;
    }
    // Many tokens: blocks walk 8 tokens (B rows reused across a slot's run),
    // as long as that still gives every SM a block; few tokens: one each.
    const int col_blocks = ceil_div(p->n, EXPAND_THREADS);
    int tokens_per_block = p->num_tokens >= 64 && col_blocks * ceil_div(p->num_tokens, EXPAND_TOKENS_PER_BLOCK) >= sms
                               ? EXPAND_TOKENS_PER_BLOCK
                               : 1;
    if ((size_t)tokens_per_block * p->rank * sizeof(float) > SMEM_DEFAULT_LIMIT) tokens_per_block = 1;
    if ((size_t)p->rank * sizeof(float) > SMEM_DEFAULT_LIMIT) return PAGODA_ERR_ARGUMENT;
    PAGODA_DISPATCH_FLOAT(p->dtype, { e = dispatch_expand<scalar_t>(p, tokens_per_block, s); });
    return (int)e;
}

int lora_per_token(const PagodaLoraArgs *p, int sms, LaunchStream s) {
    if (p->scratch == nullptr || p->scratch_bytes < per_token_u_bytes(p)) return PAGODA_ERR_WORKSPACE;
    float *u = static_cast<float *>(p->scratch);
    const int u_cols = p->num_parts * p->rank;
    const ShrinkLaunch shrink{p->x,     p->a,         p->token_slots, u,      p->status,
                              p->dtype, p->num_tokens, p->k,         u_cols, p->rank,
                              p->num_slots, p->token_order, p->groups, p->num_groups};
    int rc = shrink_per_token(&shrink, sms, s);
    if (rc != 0) return rc;
    for (int i = 0; i < p->num_parts; ++i) {
        const PagodaLoraPart &part = p->parts[i];
        if (part.n == 0) continue;
        const ExpandLaunch expand{u,
                                  part.b,
                                  p->token_slots,
                                  p->out,
                                  p->status,
                                  p->dtype,
                                  p->num_tokens,
                                  part.n,
                                  p->rank,
                                  p->num_slots,
                                  u_cols,
                                  i * p->rank,
                                  p->out_stride,
                                  part.out_offset,
                                  p->token_order,
                                  p->groups,
                                  p->num_groups};
        rc = expand_per_token(&expand, sms, s);
        if (rc != 0) return rc;
    }
    return 0;
}

bool args_valid(const PagodaLoraArgs *p) {
    if (p == nullptr || p->num_tokens < 0 || p->k < 0 || p->rank < 0 || p->num_slots < 0 || p->num_parts < 1 ||
        p->num_parts > PAGODA_LORA_MAX_PARTS || p->out_stride < 0)
        return false;
    for (int i = 0; i < p->num_parts; ++i) {
        const PagodaLoraPart &part = p->parts[i];
        if (part.n < 0 || part.out_offset < 0 || (long)part.out_offset + part.n > p->out_stride) return false;
    }
    return true;
}

bool nothing_to_do(const PagodaLoraArgs *p) { return p->num_tokens == 0 || p->rank == 0 || p->num_slots == 0; }

}  // namespace

extern "C" size_t pagoda_lora_scratch_bytes(const PagodaLoraArgs *p) {
    if (!args_valid(p) || nothing_to_do(p)) return 0;
    return dense_applies(p) ? dense_all_bytes(p) + dense_um_bytes(p) : per_token_u_bytes(p);
}

extern "C" int pagoda_lora(void *blas, const PagodaLoraArgs *p, const PagodaKernelPolicy *policy, void *stream) {
    PAGODA_CHECK_POLICY(policy);
    if (!args_valid(p)) return PAGODA_ERR_ARGUMENT;
    if (nothing_to_do(p)) return 0;
    const LaunchStream s = launch_stream(policy, stream);
    int rc = 0;
    if (dense_applies(p)) {
        if (blas == nullptr) return PAGODA_ERR_ARGUMENT;
        PAGODA_DISPATCH_HALF(p->dtype, { rc = lora_dense<scalar_t>(static_cast<BlasHandle *>(blas), p, s); });
    } else {
        rc = lora_per_token(p, policy->num_sms > 0 ? policy->num_sms : 1, s);
    }
    if (rc != 0) return rc;
    PAGODA_LAUNCH_CHECK();
    return 0;
}
