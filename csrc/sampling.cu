// On-device sampling that reproduces pagoda_sampler::sample_row: the same order
// of operations, the same f64/f32 roundings at each step, the same tie rules and
// the same counter-based uniform(seed, step). Only the sampled ids and logprobs
// go back to the host.
//
// Pipeline per call (rows that draw, temperature > 0, are compacted to "draw slots"):
//   1. prepare:   raw logits -> f32 working copy, with the logit constraints (merged
//                 allowed-token mask -> -inf, then logit bias); log-sum-exp of the raw row (f64)
//   2. penalties: repetition, then frequency/presence, on the working copy
//   3. select:    greedy rows: arg-max (lowest id on ties, NaN never wins);
//                 drawing rows: probabilities exp((x - max) / T) in f64, rounded to f32, normalised
//   4. sort:      each drawing row's probabilities, descending, ids ascending on ties (stable radix sort)
//   5. draw:      top-k, top-p, min-p truncation, then the inverse-CDF walk at uniform(seed, step)
//   6. finalise:  the chosen token's raw logprob and the top-n raw logprobs
// Greedy-only calls (no penalties, no top logprobs, no constraints) take a short path instead:
// each row is split into chunks over many blocks, each finds its chunk's arg-max
// and (max, sum of exp) partial log-sum-exp, and one warp per row merges them.
// pagoda_feed_sampled_tokens then copies chosen ids from the output records into
// a later step's input token ids on the device (asynchronous scheduling).
#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <climits>

#include "common.cuh"

using namespace pagoda;

namespace {

constexpr int kThreads = 1024;

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// pagoda_sampler::uniform, bit for bit.
__device__ __forceinline__ float uniform(uint64_t seed, uint64_t step) {
    const uint64_t bits = mix64(mix64(seed ^ 0x9e3779b97f4a7c15ull) + step);
    return __fmul_rn((float)(bits >> 40), 1.0f / 16777216.0f);
}

// Whether (av, ai) comes before (bv, bi) in arg-max order: larger value first, the lower
// id on ties; a NaN never beats a number; among NaNs the last one wins, as the reference's scan.
__device__ __forceinline__ bool argmax_before(float av, int ai, float bv, int bi) {
    const bool an = isnan(av), bn = isnan(bv);
    if (an != bn) return bn;
    if (an) return ai > bi;
    if (av != bv) return av > bv;
    return ai < bi;
}

// Warp-wide arg-max over (value, id) pairs; every lane gets the winner.
__device__ __forceinline__ void warp_argmax(float &v, int &id) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, id, o);
        if (argmax_before(ov, oi, v, id)) {
            v = ov;
            id = oi;
        }
    }
}

// Block-wide arg-max over (value, id) pairs; every thread gets the winner.
__device__ void block_argmax(float &v, int &id) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    warp_argmax(v, id);
    __syncthreads();
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = id;
    }
    __syncthreads();
    v = lane < nwarps ? sv[lane] : NAN;
    id = lane < nwarps ? si[lane] : INT_MIN;
    warp_argmax(v, id);
}

// Every kernel here waits on the kernel before (programmatic dependent launch)
// at its start: all it reads is that kernel's output (logits, the working copy,
// partials), but the launch itself still overlaps the kernel before.
// The working copy also takes the row's logit constraints (when the call has any):
// masked-out tokens become -inf, then the bias entries are added. The log-sum-exp
// is of the raw row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    prepare_kernel(const T *__restrict__ logits, const PagodaSampleRow *__restrict__ rows,
                   const uint32_t *__restrict__ mask_words, const int32_t *__restrict__ bias_tokens,
                   const float *__restrict__ bias_values, float *__restrict__ work, double *__restrict__ lse,
                   int vocab, int has_constraints) {
    pdl_launch_dependents();
    pdl_wait();
    __shared__ float fscratch[32];
    __shared__ double dscratch[32];
    const size_t base = (size_t)blockIdx.x * vocab;
    const uint32_t *mask = nullptr;
    int bias_start = 0, bias_end = 0;
    if (has_constraints) {
        const PagodaSampleRow &r = rows[blockIdx.x];
        if (r.mask_start >= 0) mask = mask_words + r.mask_start;
        bias_start = r.bias_start;
        bias_end = r.bias_end;
    }
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float x = to_float<T>(logits[base + i]);
        const bool allowed = mask == nullptr || ((mask[i >> 5] >> (i & 31)) & 1u);
        work[base + i] = allowed ? x : -INFINITY;
        mx = fmaxf(mx, x);  // fmaxf ignores NaN, as f32::max
    }
    mx = block_max(mx, fscratch);  // its barrier also orders the writes above before the bias below
    // One thread per token: the first of its run of entries adds them all, in order.
    for (int e = bias_start + threadIdx.x; e < bias_end; e += blockDim.x) {
        const int t = bias_tokens[e];
        if (e > bias_start && bias_tokens[e - 1] == t) continue;
        if (t < 0 || t >= vocab) continue;
        float l = work[base + t];
        for (int k = e; k < bias_end && bias_tokens[k] == t; ++k) l = __fadd_rn(l, bias_values[k]);
        work[base + t] = l;
    }
    double sum = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        sum += exp((double)to_float<T>(logits[base + i]) - (double)mx);
    sum = block_sum(sum, dscratch);
    if (threadIdx.x == 0) lse[blockIdx.x] = log(sum) + (double)mx;
}

__global__ void penalties_kernel(const PagodaSampleRow *__restrict__ rows, const int32_t *__restrict__ tokens,
                                 const int32_t *__restrict__ counts, float *__restrict__ work, int vocab) {
    pdl_launch_dependents();
    pdl_wait();
    const PagodaSampleRow r = rows[blockIdx.x];
    const bool repetition = r.repetition_penalty != 1.0f;
    const bool additive = r.frequency_penalty != 0.0f || r.presence_penalty != 0.0f;
    float *row = work + (size_t)blockIdx.x * vocab;
    // Each token appears once per row, so no two threads touch the same logit.
    for (int e = r.penalty_start + threadIdx.x; e < r.penalty_end; e += blockDim.x) {
        const int t = tokens[e];
        if (t < 0 || t >= vocab) continue;
        float l = row[t];
        if (repetition) l = l > 0.0f ? __fdiv_rn(l, r.repetition_penalty) : __fmul_rn(l, r.repetition_penalty);
        const int c = counts[e];
        if (additive && c > 0)
            l = __fsub_rn(l, __fadd_rn(__fmul_rn(r.frequency_penalty, (float)c), r.presence_penalty));
        row[t] = l;
    }
}

__global__ void __launch_bounds__(kThreads)
    select_kernel(const PagodaSampleRow *__restrict__ rows, const float *__restrict__ work,
                  float *__restrict__ probs, int32_t *__restrict__ ids, int32_t *__restrict__ offsets,
                  int32_t *__restrict__ draw_row_of, PagodaSampleOut *__restrict__ out, int vocab, int num_draw) {
    pdl_launch_dependents();
    pdl_wait();
    __shared__ float fscratch[32];
    __shared__ double dscratch[32];
    const int m = blockIdx.x;
    const PagodaSampleRow r = rows[m];
    const float *x = work + (size_t)m * vocab;
    if (r.draw_index < 0) {
        float v = NAN;
        int id = INT_MIN;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            if (argmax_before(x[i], i, v, id)) {
                v = x[i];
                id = i;
            }
        block_argmax(v, id);
        if (threadIdx.x == 0) out[m].token = id;
        return;
    }
    const int d = r.draw_index;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, x[i]);
    mx = block_max(mx, fscratch);
    const double inv_t = 1.0 / (double)r.temperature;
    float *p = probs + (size_t)d * vocab;
    int32_t *pid = ids + (size_t)d * vocab;
    if (threadIdx.x == 0) {
        offsets[d] = d * vocab;
        if (d == num_draw - 1) offsets[num_draw] = num_draw * vocab;
        draw_row_of[d] = m;
    }
    if (mx == -INFINITY) {
        // Constraints banned every token (or the row is all -inf/NaN): nothing to
        // draw from, so the arg-max rule decides, as in the reference. The chosen
        // token gets probability 1, which every truncation keeps and the draw picks.
        float v = NAN;
        int id = INT_MIN;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x)
            if (argmax_before(x[i], i, v, id)) {
                v = x[i];
                id = i;
            }
        block_argmax(v, id);
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            p[i] = i == id ? 1.0f : 0.0f;
            pid[i] = i;
        }
        return;
    }
    double total = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float q = (float)exp(((double)x[i] - (double)mx) * inv_t);
        p[i] = q;
        pid[i] = i;
        total += (double)q;
    }
    total = block_sum(total, dscratch);
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) p[i] = (float)((double)p[i] / total);
}

// The first index i < n at which the running sum of p[0..=i] (f64) reaches `threshold`
// (>= when !strict, > when strict), or -1. Uniform across the block.
__device__ int first_crossing(const float *__restrict__ p, int n, double threshold, bool strict) {
    __shared__ double warp_total[32];
    __shared__ int found;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    __syncthreads();
    if (threadIdx.x == 0) found = INT_MAX;
    double carry = 0.0;
    for (int base = 0; base < n; base += blockDim.x) {
        const int i = base + threadIdx.x;
        double x = i < n ? (double)p[i] : 0.0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const double y = __shfl_up_sync(0xffffffffu, x, o);
            if (lane >= o) x += y;
        }
        if (lane == 31) warp_total[warp] = x;
        __syncthreads();
        if (warp == 0) {
            double t = lane < nwarps ? warp_total[lane] : 0.0;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const double y = __shfl_up_sync(0xffffffffu, t, o);
                if (lane >= o) t += y;
            }
            if (lane < nwarps) warp_total[lane] = t;
        }
        __syncthreads();
        const double cum = carry + (warp > 0 ? warp_total[warp - 1] : 0.0) + x;
        if (i < n && (strict ? cum > threshold : cum >= threshold)) atomicMin(&found, i);
        __syncthreads();
        const int hit = found;
        if (hit != INT_MAX) return hit;
        carry += warp_total[nwarps - 1];
        __syncthreads();
    }
    return -1;
}

// The first index i < n with !(p[i] >= threshold), or n.
__device__ int first_below(const float *__restrict__ p, int n, float threshold) {
    __shared__ int found;
    __syncthreads();
    if (threadIdx.x == 0) found = n;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        if (!(p[i] >= threshold)) {
            atomicMin(&found, i);
            break;
        }
    __syncthreads();
    return found;
}

__global__ void __launch_bounds__(kThreads)
    draw_kernel(const PagodaSampleRow *__restrict__ rows, const float *__restrict__ sorted_probs,
                const int32_t *__restrict__ sorted_ids, const int32_t *__restrict__ draw_row_of,
                PagodaSampleOut *__restrict__ out, int vocab) {
    pdl_launch_dependents();
    pdl_wait();
    __shared__ double dscratch[32];
    const int d = blockIdx.x;
    const int m = draw_row_of[d];
    const PagodaSampleRow r = rows[m];
    const float *p = sorted_probs + (size_t)d * vocab;
    const int32_t *ids = sorted_ids + (size_t)d * vocab;
    int keep = vocab;
    if (r.top_k > 0) keep = min(keep, r.top_k);
    if (r.top_p < 1.0f) {
        const int i = first_crossing(p, keep, (double)r.top_p, false);
        if (i >= 0) keep = i + 1;
    }
    if (r.min_p > 0.0f) {
        const float threshold = __fmul_rn(p[0], r.min_p);
        keep = max(first_below(p, keep, threshold), 1);
    }
    keep = max(keep, 1);
    double mass = 0.0;
    for (int i = threadIdx.x; i < keep; i += blockDim.x) mass += (double)p[i];
    mass = block_sum(mass, dscratch);
    const double target = (double)uniform(r.seed, r.step) * mass;
    const int i = first_crossing(p, keep, target, true);
    if (threadIdx.x == 0) out[m].token = ids[i >= 0 ? i : keep - 1];
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const T *__restrict__ logits, const PagodaSampleRow *__restrict__ rows,
                    const double *__restrict__ lse, PagodaSampleOut *__restrict__ out, int vocab) {
    pdl_launch_dependents();
    pdl_wait();
    const int m = blockIdx.x;
    const T *x = logits + (size_t)m * vocab;
    const double log_sum = lse[m];
    const int n = min(rows[m].num_logprobs, min(PAGODA_MAX_TOP_LOGPROBS, vocab));
    if (threadIdx.x == 0) {
        const int tok = out[m].token;
        out[m].logprob = (float)((double)to_float<T>(x[tok]) - log_sum);
    }
    // n rounds of arg-max, each over what comes after the previous winner in
    // (logprob descending, id ascending) order.
    float prev_v = INFINITY;
    int prev_id = -1;
    for (int k = 0; k < n; ++k) {
        float v = NAN;
        int id = INT_MIN;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float lp = (float)((double)to_float<T>(x[i]) - log_sum);
            const bool after = lp < prev_v || (lp == prev_v && i > prev_id);
            if (after && argmax_before(lp, i, v, id)) {
                v = lp;
                id = i;
            }
        }
        block_argmax(v, id);
        if (threadIdx.x == 0) {
            out[m].top_ids[k] = id;
            out[m].top_logprobs[k] = v;
        }
        prev_v = v;
        prev_id = id;
    }
}

// ---- greedy-only path -------------------------------------------------------

constexpr int kGreedyThreads = 256;
constexpr int kGreedyMinChunk = 2048;
constexpr int kGreedyMaxChunks = 64;

struct GreedyPartial {
    double sum_exp;  // sum of exp(x - max) over the chunk (0 when the chunk is all -inf)
    float max;       // fmaxf over the chunk: NaN-ignoring, as f32::max
    float best_v;    // the chunk's arg-max
    int best_id;
    int pad;
};

// Chunks per row: about eight blocks per SM, chunks of at least kGreedyMinChunk.
int greedy_chunks(int rows, int vocab, int sms) {
    sms = sms > 0 ? sms : 1;
    const int by_occupancy = ceil_div(8 * sms, rows);
    const int by_size = max(1, vocab / kGreedyMinChunk);
    return max(1, min(kGreedyMaxChunks, min(by_occupancy, by_size)));
}

template <typename T>
__global__ void __launch_bounds__(kGreedyThreads)
    greedy_partial_kernel(const T *__restrict__ logits, GreedyPartial *__restrict__ parts, int vocab, int chunks) {
    pdl_launch_dependents();
    pdl_wait();
    __shared__ float fscratch[32];
    __shared__ double dscratch[32];
    const int m = blockIdx.x / chunks, c = blockIdx.x % chunks;
    const int per = ceil_div(vocab, chunks);
    const int begin = c * per, end = min(vocab, begin + per);
    const T *x = logits + (size_t)m * vocab;
    float mx = -INFINITY, v = NAN;
    int id = INT_MIN;
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float xi = to_float<T>(x[i]);
        mx = fmaxf(mx, xi);
        if (argmax_before(xi, i, v, id)) {
            v = xi;
            id = i;
        }
    }
    mx = block_max(mx, fscratch);
    double sum = 0.0;
    if (mx != -INFINITY)
        for (int i = begin + threadIdx.x; i < end; i += blockDim.x)
            sum += exp((double)to_float<T>(x[i]) - (double)mx);
    sum = block_sum(sum, dscratch);
    block_argmax(v, id);
    if (threadIdx.x == 0) parts[blockIdx.x] = GreedyPartial{sum, mx, v, id, 0};
}

// One warp per row: log-sum-exp and arg-max over the row's chunks.
template <typename T>
__global__ void greedy_merge_kernel(const T *__restrict__ logits, const GreedyPartial *__restrict__ parts,
                                    PagodaSampleOut *__restrict__ out, int vocab, int chunks) {
    pdl_launch_dependents();
    pdl_wait();
    const int m = blockIdx.x, lane = threadIdx.x;
    const GreedyPartial *p = parts + (size_t)m * chunks;
    float mx = -INFINITY;
    for (int c = lane; c < chunks; c += 32) mx = fmaxf(mx, p[c].max);
    mx = warp_max(mx);
    double sum = 0.0;
    float v = NAN;
    int id = INT_MIN;
    for (int c = lane; c < chunks; c += 32) {
        if (p[c].max != -INFINITY) sum += p[c].sum_exp * exp((double)p[c].max - (double)mx);
        if (argmax_before(p[c].best_v, p[c].best_id, v, id)) {
            v = p[c].best_v;
            id = p[c].best_id;
        }
    }
    sum = warp_sum(sum);
    warp_argmax(v, id);
    if (lane == 0) {
        // An all -inf row: the full-row reference computes exp(-inf - -inf) = NaN.
        const double lse = mx == -INFINITY ? (double)NAN : log(sum) + (double)mx;
        out[m].token = id;
        out[m].logprob = (float)((double)to_float<T>(logits[(size_t)m * vocab + id]) - lse);
    }
}

int sample_greedy_only(const PagodaSampleArgs *a, int num_sms, LaunchStream s) {
    const int chunks = greedy_chunks(a->num_rows, a->vocab, num_sms);
    if ((size_t)a->num_rows * chunks * sizeof(GreedyPartial) > a->workspace_bytes) return PAGODA_ERR_WORKSPACE;
    GreedyPartial *parts = (GreedyPartial *)a->workspace;
    PAGODA_DISPATCH_FLOAT(a->logits_dtype, {
        launch(greedy_partial_kernel<scalar_t>, a->num_rows * chunks, kGreedyThreads, 0, s,
               (const scalar_t *)a->logits, parts, a->vocab, chunks);
        PAGODA_LAUNCH_CHECK();
        launch(greedy_merge_kernel<scalar_t>, a->num_rows, 32, 0, s, (const scalar_t *)a->logits, parts, a->out,
               a->vocab, chunks);
    });
    PAGODA_LAUNCH_CHECK();
    return 0;
}

// ---- feeding sampled ids into the next step ----------------------------------

constexpr int kFeedThreads = 256;

__global__ void feed_sampled_tokens_kernel(const PagodaSampleOut *__restrict__ sampled, int num_sampled,
                                           const int32_t *__restrict__ source_rows, int32_t *__restrict__ token_ids,
                                           int n, uint32_t *status) {
    pdl_launch_dependents();
    pdl_wait();  // the records are the sampling kernels' output
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int32_t r = source_rows[i];
    if (r < 0) return;
    if (r >= num_sampled) {
        set_status(status, PAGODA_STATUS_ROW_INDEX);
        return;
    }
    token_ids[i] = sampled[r].token;
}

size_t align_up(size_t x) { return (x + 255) & ~(size_t)255; }

struct SampleWorkspace {
    float *work;
    double *lse;
    float *probs_in, *probs_out;
    int32_t *ids_in, *ids_out;
    int32_t *offsets, *draw_row_of;
    void *sort_temp;
    size_t sort_temp_bytes;
    size_t total;
};

int plan_workspace(char *base, int num_rows, int num_draw, int vocab, SampleWorkspace *w) {
    const size_t rv = (size_t)num_rows * vocab, dv = (size_t)num_draw * vocab;
    size_t off = 0;
    auto take = [&](size_t bytes) {
        char *p = base ? base + off : nullptr;
        off += align_up(bytes);
        return p;
    };
    w->work = (float *)take(rv * sizeof(float));
    w->lse = (double *)take((size_t)num_rows * sizeof(double));
    w->probs_in = (float *)take(dv * sizeof(float));
    w->probs_out = (float *)take(dv * sizeof(float));
    w->ids_in = (int32_t *)take(dv * sizeof(int32_t));
    w->ids_out = (int32_t *)take(dv * sizeof(int32_t));
    w->offsets = (int32_t *)take((size_t)(num_draw + 1) * sizeof(int32_t));
    w->draw_row_of = (int32_t *)take((size_t)(num_draw + 1) * sizeof(int32_t));
    w->sort_temp_bytes = 0;
    if (num_draw > 0) {
        cudaError_t e = cub::DeviceSegmentedRadixSort::SortPairsDescending(
            nullptr, w->sort_temp_bytes, (const float *)nullptr, (float *)nullptr, (const int32_t *)nullptr,
            (int32_t *)nullptr, (int)dv, num_draw, (const int32_t *)nullptr, (const int32_t *)nullptr, 0,
            (int)(sizeof(float) * 8), (cudaStream_t)0);
        if (e != cudaSuccess) return (int)e;
    }
    w->sort_temp = take(w->sort_temp_bytes);
    // The greedy-only path reuses the start of the workspace for its partials.
    off = std::max(off, align_up((size_t)num_rows * kGreedyMaxChunks * sizeof(GreedyPartial)));
    w->total = off;
    return 0;
}

}  // namespace

extern "C" int pagoda_sample_workspace_bytes(int num_rows, int num_draw_rows, int vocab, size_t *bytes) {
    SampleWorkspace w;
    const int rc = plan_workspace(nullptr, num_rows, num_draw_rows, vocab, &w);
    *bytes = w.total;
    return rc;
}

extern "C" int pagoda_sample(const PagodaSampleArgs *a, const PagodaKernelPolicy *policy, void *stream) {
    PAGODA_CHECK_POLICY(policy);
    if (a->num_rows == 0) return 0;
    if (a->vocab <= 0 || a->num_draw_rows < 0 || a->num_draw_rows > a->num_rows ||
        (size_t)a->num_draw_rows * a->vocab > (size_t)INT_MAX)
        return PAGODA_ERR_ARGUMENT;
    SampleWorkspace w;
    int rc = plan_workspace((char *)a->workspace, a->num_rows, a->num_draw_rows, a->vocab, &w);
    if (rc != 0) return rc;
    if (w.total > a->workspace_bytes) return PAGODA_ERR_WORKSPACE;
    const LaunchStream s = launch_stream(policy, stream);
    if (a->greedy_only) {
        if (a->num_draw_rows != 0 || a->has_constraints) return PAGODA_ERR_ARGUMENT;
        return sample_greedy_only(a, policy->num_sms, s);
    }
    const int M = a->num_rows, V = a->vocab, Md = a->num_draw_rows;

    PAGODA_DISPATCH_FLOAT(a->logits_dtype, {
        launch(prepare_kernel<scalar_t>, M, kThreads, 0, s, (const scalar_t *)a->logits, a->rows, a->mask_words,
               a->bias_tokens, a->bias_values, w.work, w.lse, V, a->has_constraints);
    });
    PAGODA_LAUNCH_CHECK();
    launch(penalties_kernel, M, 256, 0, s, a->rows, a->penalty_tokens, a->penalty_counts, w.work, V);
    PAGODA_LAUNCH_CHECK();
    launch(select_kernel, M, kThreads, 0, s, a->rows, w.work, w.probs_in, w.ids_in, w.offsets, w.draw_row_of, a->out,
           V, Md);
    PAGODA_LAUNCH_CHECK();
    if (Md > 0) {
        size_t temp_bytes = w.sort_temp_bytes;
        cudaError_t e = cub::DeviceSegmentedRadixSort::SortPairsDescending(
            w.sort_temp, temp_bytes, w.probs_in, w.probs_out, w.ids_in, w.ids_out, Md * V, Md, w.offsets,
            w.offsets + 1, 0, (int)(sizeof(float) * 8), s.stream);
        if (e != cudaSuccess) return (int)e;
        launch(draw_kernel, Md, kThreads, 0, s, a->rows, w.probs_out, w.ids_out, w.draw_row_of, a->out, V);
        PAGODA_LAUNCH_CHECK();
    }
    PAGODA_DISPATCH_FLOAT(a->logits_dtype, {
        launch(finalize_kernel<scalar_t>, M, kThreads, 0, s, (const scalar_t *)a->logits, a->rows, w.lse, a->out,
               V);
    });
    PAGODA_LAUNCH_CHECK();
    return 0;
}

extern "C" int pagoda_feed_sampled_tokens(const PagodaSampleOut *sampled, int num_sampled, const int32_t *source_rows,
                                          int32_t *token_ids, int n, uint32_t *status,
                                          const PagodaKernelPolicy *policy, void *stream) {
    PAGODA_CHECK_POLICY(policy);
    if (n == 0) return 0;
    if (n < 0 || num_sampled < 0 || (num_sampled > 0 && sampled == nullptr)) return PAGODA_ERR_ARGUMENT;
    launch(feed_sampled_tokens_kernel, ceil_div(n, kFeedThreads), kFeedThreads, 0, launch_stream(policy, stream), sampled,
           num_sampled, source_rows, token_ids, n, status);
    PAGODA_LAUNCH_CHECK();
    return 0;
}
