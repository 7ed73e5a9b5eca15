// LoRA's two products over a batch that mixes adapters, each token by its
// slot (Punica's BGMV): pagoda_lora_shrink (u = A[slot] . x, to f32) and
// pagoda_lora_expand (out += B[slot] . u, in the activation dtype).
//
// Both are gathers of small per-slot matrices, bound by reading them:
// - shrink: a block takes one token and ROWS output columns (rows of A) and
//   splits K over its threads with 16-byte loads of x and A; the threads'
//   sums meet in shared memory. ROWS is chosen per launch so that decode (one
//   token, U = 16..192 rows) still spreads over many SMs, and prefill reads
//   x once per ROWS rows.
// - expand: a thread takes one output column n: it holds B[slot, n, 0..R) in
//   registers (R / 8 16-byte loads), dots it with the token's u (in shared
//   memory, the same for the whole block) in f32, and adds the sum into out
//   once. With many tokens a block walks TOKENS_PER_BLOCK consecutive tokens
//   and reloads B only when the slot changes, so a prefill run of one adapter
//   reads each B row once per 8 tokens instead of once per token.
//
// Prefill with long runs of one slot (SGMV) would be better served by a
// tensor-core GEMM per run; this first version is per token for the shrink
// (A rows come from L2 after the first token of a slot).
//
// Slots < 0 (no adapter): the shrink writes zeros, the expand leaves the row.
// Slots >= num_slots set PAGODA_STATUS_LORA_SLOT and are treated as no
// adapter. No allocation, no host synchronisation: both may be captured in a
// graph. Every kernel waits on the one before (PDL) before its first read:
// the slots may be any kernel's output.
#include "common.cuh"

using namespace pagoda;

namespace {

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
                       float *__restrict__ out, int k, int u, int num_slots, uint32_t *status) {
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
    for (int r = 0; r < ROWS; ++r) arow[r] = a + ((size_t)s * u + min(j0 + r, u - 1)) * k;
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
cudaError_t launch_shrink(const PagodaLoraShrinkArgs *p, int rows, int threads, LaunchStream s) {
    const T *x = static_cast<const T *>(p->x);
    const T *a = static_cast<const T *>(p->a);
    const dim3 block(threads);
    switch (rows) {
#define PAGODA_SHRINK_CASE(R)                                                                                  \
    case R:                                                                                                    \
        return launch(lora_shrink_kernel<T, R, VEC>, dim3(p->num_tokens, ceil_div(p->u, R)), block, 0, s, x, a, \
                      p->token_slots, p->out, p->k, p->u, p->num_slots, p->status);
        PAGODA_SHRINK_CASE(1)
        PAGODA_SHRINK_CASE(2)
        PAGODA_SHRINK_CASE(4)
#undef PAGODA_SHRINK_CASE
        default: return cudaErrorInvalidValue;
    }
}

// Threads: enough for one load each of a row's (16-byte or single) units, up to the maximum.
template <typename T>
cudaError_t dispatch_shrink(const PagodaLoraShrinkArgs *p, int rows, bool vec, LaunchStream s) {
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
constexpr int EXPAND_MAX_CHUNKS = 8;

// out[t, out_offset + n] += sum_r u[t, u_offset + r] * B[slot_t, n, r] for the
// tokens_per_block tokens from blockIdx.x * tokens_per_block and the column n
// of this thread. CHUNKS > 0: 16-bit T, R % 8 == 0, R <= 8 * CHUNKS, b
// aligned: the thread's B row stays in registers while the slot stays the
// same. CHUNKS == 0: one element at a time, any R.
template <typename T, int CHUNKS>
__global__ void __launch_bounds__(EXPAND_THREADS)
    lora_expand_kernel(const float *__restrict__ u, int u_stride, int u_offset, const T *__restrict__ b,
                       const int32_t *__restrict__ slots, T *__restrict__ out, int out_stride, int out_offset,
                       int num_tokens, int n, int rank, int num_slots, int tokens_per_block, uint32_t *status) {
    extern __shared__ float us[];  // [tokens_per_block][rank]: the tokens' u
    pdl_launch_dependents();
    pdl_wait();
    const int t0 = blockIdx.x * tokens_per_block;
    const int tokens = min(tokens_per_block, num_tokens - t0);
    for (int i = threadIdx.x; i < tokens * rank; i += blockDim.x) {
        const int j = i / rank;
        us[i] = u[(size_t)(t0 + j) * u_stride + u_offset + (i - j * rank)];
    }
    __syncthreads();
    const int col = blockIdx.y * blockDim.x + threadIdx.x;
    if (col >= n) return;
    uint4 bv[CHUNKS > 0 ? CHUNKS : 1];
    int32_t loaded = -1;
    for (int j = 0; j < tokens; ++j) {
        const int32_t s = slots[t0 + j];
        if (s < 0) continue;
        if (s >= num_slots) {
            if (col == 0) set_status(status, PAGODA_STATUS_LORA_SLOT);
            continue;
        }
        const float *ut = us + j * rank;
        float acc = 0.f;
        if constexpr (CHUNKS > 0) {
            if (s != loaded) {
                const uint4 *brow = reinterpret_cast<const uint4 *>(b + ((size_t)s * n + col) * rank);
#pragma unroll
                for (int c = 0; c < CHUNKS; ++c)
                    if (c * 8 < rank) bv[c] = __ldg(brow + c);
                loaded = s;
            }
#pragma unroll
            for (int c = 0; c < CHUNKS; ++c) {
                if (c * 8 < rank) {
                    float bf[8];
                    unpack8<T>(bv[c], bf);
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc = fmaf(ut[c * 8 + e], bf[e], acc);
                }
            }
        } else {
            const T *brow = b + ((size_t)s * n + col) * rank;
            for (int r = 0; r < rank; ++r) acc = fmaf(ut[r], to_float<T>(brow[r]), acc);
        }
        T *o = out + (size_t)(t0 + j) * out_stride + out_offset + col;
        *o = from_float<T>(to_float<T>(*o) + acc);
    }
}

template <typename T, int CHUNKS>
cudaError_t launch_expand(const PagodaLoraExpandArgs *p, int tokens_per_block, LaunchStream s) {
    const dim3 grid(ceil_div(p->num_tokens, tokens_per_block), ceil_div(p->n, EXPAND_THREADS));
    const size_t smem = (size_t)tokens_per_block * p->rank * sizeof(float);
    return launch(lora_expand_kernel<T, CHUNKS>, grid, dim3(EXPAND_THREADS), smem, s, p->u, p->u_stride,
                  p->u_offset, static_cast<const T *>(p->b), p->token_slots, static_cast<T *>(p->out),
                  p->out_stride, p->out_offset, p->num_tokens, p->n, p->rank, p->num_slots, tokens_per_block,
                  p->status);
}

template <typename T>
cudaError_t dispatch_expand(const PagodaLoraExpandArgs *p, int tokens_per_block, bool vec, LaunchStream s) {
    if constexpr (sizeof(T) == 2) {
        if (vec) {
            if (p->rank <= 8) return launch_expand<T, 1>(p, tokens_per_block, s);
            if (p->rank <= 16) return launch_expand<T, 2>(p, tokens_per_block, s);
            if (p->rank <= 32) return launch_expand<T, 4>(p, tokens_per_block, s);
            return launch_expand<T, EXPAND_MAX_CHUNKS>(p, tokens_per_block, s);
        }
    }
    return launch_expand<T, 0>(p, tokens_per_block, s);
}

// Dynamic shared memory a block may take without opting in.
constexpr size_t SMEM_DEFAULT_LIMIT = 48 * 1024;

}  // namespace

extern "C" int pagoda_lora_shrink(const PagodaLoraShrinkArgs *p, const PagodaKernelPolicy *policy, void *stream) {
    PAGODA_CHECK_POLICY(policy);
    if (p == nullptr || p->num_tokens < 0 || p->k < 0 || p->u < 0 || p->num_slots < 0) return PAGODA_ERR_ARGUMENT;
    if (p->num_tokens == 0 || p->u == 0) return 0;
    const LaunchStream s = launch_stream(policy, stream);
    // Rows of A per block: as many as keep about two blocks per SM busy.
    const int sms = policy->num_sms > 0 ? policy->num_sms : 1;
    const int rows = ceil_div(p->u, 4) * p->num_tokens >= 2 * sms ? 4
                     : ceil_div(p->u, 2) * p->num_tokens >= sms  ? 2
                                                                  : 1;
    cudaError_t e = cudaSuccess;
    const bool vec = p->k % 8 == 0 && aligned16(p->x) && aligned16(p->a);
    PAGODA_DISPATCH_FLOAT(p->dtype, { e = dispatch_shrink<scalar_t>(p, rows, vec, s); });
    if (e != cudaSuccess) return (int)e;
    PAGODA_LAUNCH_CHECK();
    return 0;
}

extern "C" int pagoda_lora_expand(const PagodaLoraExpandArgs *p, const PagodaKernelPolicy *policy, void *stream) {
    PAGODA_CHECK_POLICY(policy);
    if (p == nullptr || p->num_tokens < 0 || p->n < 0 || p->rank < 0 || p->num_slots < 0 || p->u_offset < 0 ||
        p->out_offset < 0 || p->u_offset + p->rank > p->u_stride || p->out_offset + p->n > p->out_stride)
        return PAGODA_ERR_ARGUMENT;
    if (p->num_tokens == 0 || p->n == 0 || p->rank == 0) return 0;
    const LaunchStream s = launch_stream(policy, stream);
    // Many tokens: blocks walk 8 tokens (B rows reused across a slot's run),
    // as long as that still gives every SM a block; few tokens: one each.
    const int sms = policy->num_sms > 0 ? policy->num_sms : 1;
    const int col_blocks = ceil_div(p->n, EXPAND_THREADS);
    int tokens_per_block = p->num_tokens >= 64 && col_blocks * ceil_div(p->num_tokens, EXPAND_TOKENS_PER_BLOCK) >= sms
                               ? EXPAND_TOKENS_PER_BLOCK
                               : 1;
    if ((size_t)tokens_per_block * p->rank * sizeof(float) > SMEM_DEFAULT_LIMIT) tokens_per_block = 1;
    if ((size_t)p->rank * sizeof(float) > SMEM_DEFAULT_LIMIT) return PAGODA_ERR_ARGUMENT;
    const bool vec = p->rank % 8 == 0 && p->rank <= 8 * EXPAND_MAX_CHUNKS && aligned16(p->b);
    cudaError_t e = cudaSuccess;
    PAGODA_DISPATCH_FLOAT(p->dtype, {
        e = dispatch_expand<scalar_t>(p, tokens_per_block, vec, s);
    });
    if (e != cudaSuccess) return (int)e;
    PAGODA_LAUNCH_CHECK();
    return 0;
}
