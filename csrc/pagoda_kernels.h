/*
 * Pagoda's CUDA kernels as plain C launchers: the one header bindgen reads.
 *
 * Every launcher takes the kernel policy of the device it runs on (see
 * PagodaKernelPolicy: never NULL) and the CUDA stream it runs on (a CUstream /
 * cudaStream_t passed as void*), and returns 0 on success, a cudaError_t value
 * when CUDA refused the launch, or one of the PAGODA_ERR_* codes when an
 * argument is out of what the kernels support. Launches are asynchronous:
 * errors inside a kernel surface at the next synchronisation. Nothing here
 * reads the environment or asks the driver which device is current: what a
 * launcher may choose comes in the policy.
 *
 * Device-side index checks (token ids, row indices, cache slots, block-table
 * entries) cannot return an error without a synchronisation, so kernels skip
 * the offending element and set a PAGODA_STATUS_* bit in a device status word
 * that the caller reads back at its next synchronisation point.
 */
#ifndef PAGODA_KERNELS_H
#define PAGODA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element types (the Rust DType, in this order). */
#define PAGODA_DTYPE_F32 0
#define PAGODA_DTYPE_F16 1
#define PAGODA_DTYPE_BF16 2
#define PAGODA_DTYPE_I32 3
#define PAGODA_DTYPE_I64 4
#define PAGODA_DTYPE_F8E4M3 5 /* FP8 E4M3 codes: KV caches only */

/* Argument errors (beyond the cudaError_t range). */
#define PAGODA_ERR_DTYPE 10001
#define PAGODA_ERR_HEAD_DIM 10002
#define PAGODA_ERR_GQA_RATIO 10003
#define PAGODA_ERR_ALIGNMENT 10004
#define PAGODA_ERR_ARGUMENT 10005
#define PAGODA_ERR_WORKSPACE 10006
/* cuBLAS failures: PAGODA_ERR_CUBLAS + the cublasStatus_t. */
#define PAGODA_ERR_CUBLAS 20000

/* Bits of the device status word. */
#define PAGODA_STATUS_ROW_INDEX 1u
#define PAGODA_STATUS_SLOT 2u
#define PAGODA_STATUS_BLOCK_TABLE 4u
#define PAGODA_STATUS_POSITION 8u
#define PAGODA_STATUS_LORA_SLOT 16u

/* The most top logprobs a sampled row returns. */
#define PAGODA_MAX_TOP_LOGPROBS 20

/* A readable message for any code a launcher returned. */
const char *pagoda_error_string(int code);

/* How the launchers choose kernels on one device. The Rust side resolves it
 * once per device, when the backend is created (command-line flags, then the
 * PAGODA_* environment variables, then the device's own facts), and passes it
 * to every launcher. */
typedef struct {
    /* Streaming multiprocessors of the device the stream belongs to (> 0):
     * decode attention and greedy sampling size their grids by it. */
    int32_t num_sms;
    /* 1: kernels are launched with programmatic stream serialization (PDL;
     * only on sm_90 and newer); 0: plain launches. */
    int32_t use_pdl;
    /* 1: products of few token rows with 16-bit inputs go to a
     * weight-streaming kernel (gemv_mma_min_tokens picks which); 0: every
     * product goes to cuBLAS. */
    int32_t use_gemv;
    /* With use_gemv: products of this many token rows up to 16 (k a multiple
     * of 32) take the tensor-core GEMV; fewer rows (at most 8) the CUDA-core
     * one. 17 or more: the tensor-core GEMV is never taken. */
    int32_t gemv_mma_min_tokens;
    /* Context tokens per decode-attention partition: 0 chooses per launch
     * from the shape and num_sms; 64, 128, 256, 512 or 1024 forces it. */
    int32_t decode_partition;
    /* 1: decode attention over an E4M3 cache computes q.k and p.v on the
     * tensor cores (f16 operands, f32 sums); 0: on the CUDA cores (f32). */
    int32_t decode_attention_mma;
} PagodaKernelPolicy;

/* ---- elementwise ------------------------------------------------------- */

/* dst[0..n) = value, converted to dtype (integers: truncated toward zero;
 * F8E4M3: the nearest code, saturating). */
int pagoda_fill(void *dst, int dtype, size_t n, float value, const PagodaKernelPolicy *policy, void *stream);

/* Seeded uniform values (pagoda_backend::UniformFill): element (r, c) of dst
 * (rows x cols, a float dtype) gets the f32 value low + width * u, each step
 * rounded once (no FMA), rounded to dtype (nearest even), where
 * u = (splitmix64 draw number first + r * row_stride + c of the generator
 * seeded with key >> 40) / 2^24. Bit for bit the CPU reference's values. */
int pagoda_fill_uniform(void *dst, int dtype, size_t rows, size_t cols, uint64_t key, float low, float width,
                        uint64_t first, uint64_t row_stride, const PagodaKernelPolicy *policy, void *stream);

/* out[r, :] = bias[:] (or += with accumulate) for r in 0..rows (bias may be another float dtype). */
int pagoda_broadcast_rows(const void *bias, int bias_dtype, void *out, int out_dtype, int rows, int cols,
                          int accumulate, const PagodaKernelPolicy *policy, void *stream);

/* out[m, :] = x[indices[m], :]; indices outside 0..num_src_rows set
 * status_bit and leave the row unwritten. Used for embedding and gather_rows. */
int pagoda_gather_rows(const void *x, const int32_t *indices, void *out, int dtype, int num_out_rows,
                       int row_elems, int num_src_rows, uint32_t *status, uint32_t status_bit,
                       const PagodaKernelPolicy *policy, void *stream);

/* If residual != NULL: residual += x (rounded to dtype), then out = rms_norm(residual).
 * Otherwise out = rms_norm(x). weight has dtype or F32. */
int pagoda_rms_norm(const void *x, void *residual, const void *weight, int weight_dtype, void *out, int dtype,
                    int rows, int hidden, float eps, const PagodaKernelPolicy *policy, void *stream);

/* out[r, i] = silu(x[r, i]) * x[r, inter + i]. */
int pagoda_silu_and_mul(const void *x, void *out, int dtype, int rows, int inter, const PagodaKernelPolicy *policy,
                        void *stream);

/* ---- rotary embedding fused with the cache write ---------------------- */

typedef struct {
    const void *qkv;           /* [T, (Hq + 2 Hkv) * D] */
    const int32_t *positions;  /* [T] */
    const float *cos_sin;      /* [max_positions, rotary_dim] */
    void *q_out;               /* [T, Hq * D] */
    void *k_cache;             /* [num_blocks, Hkv, block_size, D] of cache_dtype */
    void *v_cache;
    const int64_t *slot_mapping; /* [T]; negative skips the token */
    uint32_t *status;
    int dtype;
    int num_tokens;
    int num_q_heads;
    int num_kv_heads;
    int head_dim;
    int rotary_dim;
    int neox; /* 1: dim i pairs with i + rotary_dim/2; 0: 2i with 2i+1 */
    int max_positions;
    int num_blocks;
    int block_size;
    /* Device [2]: the K scale and the V scale of an F8E4M3 cache (read after
     * the kernel before has completed); NULL: both 1.0. */
    const float *kv_scales;
    /* dtype, or PAGODA_DTYPE_F8E4M3: the caches then get e4m3(x / scale) of
     * the value x a cache of dtype would get (k rotated and rounded to
     * dtype, v as it is), the division an IEEE one, the rounding to nearest
     * even and saturating at +-448. */
    int cache_dtype;
} PagodaRotaryArgs;

int pagoda_rotary_and_cache(const PagodaRotaryArgs *args, const PagodaKernelPolicy *policy, void *stream);

/* ---- attention over the paged cache ----------------------------------- */

typedef struct {
    const void *q;          /* [T, Hq, D] */
    const void *k_cache;    /* [num_blocks, Hkv, block_size, D] of cache_dtype */
    const void *v_cache;
    void *out;              /* [T, Hq, D] */
    const int32_t *query_start_loc; /* [num_seqs + 1] */
    const int32_t *seq_lens;        /* [num_seqs] */
    const int32_t *block_tables;    /* [num_seqs, max_blocks_per_seq] */
    float *workspace;               /* split-K partials of the decode kernel */
    size_t workspace_bytes;
    uint32_t *status;
    int dtype;
    int num_seqs;
    int num_decode_seqs;     /* the first num_decode_seqs have one query token */
    int max_blocks_per_seq;
    int num_blocks;
    int block_size;
    int num_q_heads;
    int num_kv_heads;
    int head_dim;
    float scale;
    int sliding_window;      /* 0: none */
    int max_decode_seq_len;  /* over the decode sequences */
    int max_prefill_query_len; /* over the other sequences */
    /* dtype, or PAGODA_DTYPE_F8E4M3: codes read as value * scale (K's scale
     * kv_scales[0], V's kv_scales[1]; NULL: 1.0; read after the kernel
     * before has completed). */
    const float *kv_scales;
    int cache_dtype;
} PagodaAttentionArgs;

/* Bytes of workspace pagoda_attention needs for these arguments under this
 * policy (the decode partition decides the number of partials). */
size_t pagoda_attention_workspace_bytes(const PagodaAttentionArgs *args, const PagodaKernelPolicy *policy);

/* Decode sequences through the split-K paged kernel, the rest through the
 * tiled prefill kernel (tensor cores). */
int pagoda_attention(const PagodaAttentionArgs *args, const PagodaKernelPolicy *policy, void *stream);

/* ---- dense matrix products (cuBLAS) ------------------------------------ */

/* A cuBLAS handle (one per backend: its work goes to the stream of each call). */
int pagoda_blas_create(void **handle);
int pagoda_blas_destroy(void *handle);

/* A linear layer with what is fused around it, f32 accumulation:
 *   x'   = rms_norm(x) * norm_weight       when norm_weight != NULL (eps), else x
 *   p    = x' . weight^T + bias            (bias optional, [n])
 *   out  = p, or silu(p[:, :n/2]) * p[:, n/2:] with silu_mul (out [t, n/2]),
 *          added to out instead of stored with accumulate (not with silu_mul).
 * x, weight, bias and norm_weight share in_dtype (F32, F16 or BF16); out is
 * in_dtype or F32 (F32 not with silu_mul). With at most 8 token rows (and
 * policy->use_gemv) the norm, bias, SiLU and accumulation happen inside one
 * weight-streaming kernel; otherwise through cuBLAS and the elementwise
 * kernels, using `scratch` (pagoda_linear_scratch_bytes). */
typedef struct {
    const void *x;           /* [t, k] */
    const void *weight;      /* [n, k] */
    const void *bias;        /* [n] or NULL */
    const void *norm_weight; /* [k] or NULL */
    float eps;
    void *out;
    void *scratch;
    size_t scratch_bytes;
    int in_dtype;
    int out_dtype;
    int t, n, k;
    int silu_mul;
    int accumulate;
} PagodaLinearArgs;

/* Scratch the unfused (cuBLAS) path of these arguments needs under this policy; 0 if none. */
size_t pagoda_linear_scratch_bytes(const PagodaLinearArgs *args, const PagodaKernelPolicy *policy);

int pagoda_linear(void *handle, const PagodaLinearArgs *args, const PagodaKernelPolicy *policy, void *stream);

/* ---- FP8 (E4M3) weights ------------------------------------------------------ */

/* A linear layer with an E4M3 weight [n, k] and f32 scales weight_scale[n],
 * one per output row (pagoda_backend::Fp8LinearArgs states the formulas):
 *   x'  = rms_norm(x) * norm_weight when norm_weight != NULL (eps), else x
 *   PAGODA_FP8_WEIGHT_ONLY: p[t, j] = weight_scale[j] * sum_k x'[t, k] * dec(w[j, k])
 *       (the FP8 GEMV: codes streamed with 16-byte loads, 16 token rows a launch)
 *   PAGODA_FP8_QUANTIZED: x' rounded to dtype, s[t] = input_scale when > 0,
 *       else max_k |x'[t, k]| / 448 (1 for a zero row); q = e4m3(x' / s[t])
 *       (round to nearest even, saturating); p[t, j] = s[t] * weight_scale[j] *
 *       sum_k dec(q[t, k]) * dec(w[j, k]) on FP8 tensor cores (cuBLASLt, outer-
 *       vector scales: needs cuBLAS 12.9+ and sm_90)
 *   then p += bias[j]; out = p, out += p (accumulate) or silu(p[:, :n/2]) * p[:, n/2:].
 * x, bias, norm_weight and out are dtype (F16 or BF16); k must be a multiple
 * of 16 and every pointer 16-byte aligned (PAGODA_ERR_ALIGNMENT otherwise);
 * the quantized mode also needs n a multiple of 8. `handle` is
 * pagoda_blas_create's; scratch of pagoda_fp8_linear_scratch_bytes. */
#define PAGODA_FP8_WEIGHT_ONLY 0
#define PAGODA_FP8_QUANTIZED 1
typedef struct {
    const void *x;              /* [t, k] */
    const uint8_t *weight;      /* [n, k] E4M3 codes */
    const float *weight_scale;  /* [n] */
    const void *bias;           /* [n] or NULL */
    const void *norm_weight;    /* [k] or NULL */
    float eps;
    void *out;
    void *scratch;
    size_t scratch_bytes;
    int dtype;
    int t, n, k;
    int silu_mul;
    int accumulate;
    int mode;
    float input_scale; /* > 0: static activation scale; 0: dynamic per row */
} PagodaFp8LinearArgs;

/* Scratch a launch of these arguments needs; 0 if none. */
size_t pagoda_fp8_linear_scratch_bytes(const PagodaFp8LinearArgs *args);

int pagoda_fp8_linear(void *handle, const PagodaFp8LinearArgs *args, const PagodaKernelPolicy *policy,
                      void *stream);

/* Each row of x ([rows, cols], dtype F16 or BF16) quantized to E4M3 with its
 * own scale, as the quantized mode quantizes activations: scales[r] =
 * max_c |x[r, c]| / 448 (1 for a zero row), codes[r, c] = e4m3(x[r, c] /
 * scales[r]) (round to nearest even, saturating). For weights quantized at
 * load (--quantization fp8). cols must be a multiple of 8, x 16-byte and
 * codes 8-byte aligned (PAGODA_ERR_ALIGNMENT otherwise). */
int pagoda_fp8_quantize_rows(const void *x, int dtype, uint8_t *codes, float *scales, int rows, int cols,
                             const PagodaKernelPolicy *policy, void *stream);

/* ---- LoRA: many adapters in one batch, each token by its slot ------------- */

/* The most tokens in one group of token_order (LORA_GROUP_TOKENS in Rust). */
#define PAGODA_LORA_GROUP_TOKENS 32

/* A LoRA launch may also get the tokens grouped by slot (SGMV): token_order
 * [num_tokens] (the tokens ordered by slot) and groups [num_groups, 3] of
 * (slot, first, count): tokens token_order[first .. first + count), all of
 * that slot (-1: none), count <= PAGODA_LORA_GROUP_TOKENS; groups of count 0
 * are padding. With num_groups > 0 its per-token path may read the groups instead of
 * token_slots (it chooses by shape, so a recorded graph keeps its choice);
 * they must agree. A group's count past the limit sets
 * PAGODA_STATUS_LORA_SLOT and the group is skipped. */

/* The most parts one LoRA product stacks (q, k, v; LORA_MAX_PARTS in Rust). */
#define PAGODA_LORA_MAX_PARTS 3

/* One part of a LoRA product: b [num_slots, rank, n] (each slot's B
 * transposed) adds into columns out_offset .. out_offset + n of out. */
typedef struct {
    const void *b;
    int n;
    int out_offset;
} PagodaLoraPart;

/* For each part p and each token t of slot s = token_slots[t] >= 0:
 *   u[r] = sum_k a[p, s, r, k] * x[t, k]                 (f32)
 *   out[t, parts[p].out_offset + j] += sum_r u[r] * parts[p].b[s, r, j]
 * the sum in f32, added to out (dtype) once; x, a, b and out have dtype. Rows
 * of tokens with a negative slot are left alone (the dense path adds 0 to
 * them); a slot >= num_slots sets PAGODA_STATUS_LORA_SLOT and is treated as
 * none. a is part-major: [num_parts * num_slots * rank, k] as a matrix.
 *
 * Dense path: with dense_min_tokens > 0, a launch of at least that many
 * tokens (16-bit dtype, num_parts * num_slots * rank <=
 * PAGODA_LORA_DENSE_MAX_SHRINK_COLS, num_slots * rank <=
 * PAGODA_LORA_DENSE_MAX_EXPAND_COLS) runs as cuBLAS GEMMs over every slot:
 * x . a^T (f32) into scratch, one kernel keeping each token's slot columns
 * (rounded to dtype) and zeroing the others, then per part out += those
 * columns . b (b is one [num_slots * rank, n] matrix); parts whose b follow
 * each other in memory with equal n and equally spaced out_offset take one
 * strided batched GEMM. Otherwise per-token kernels (u in f32 scratch). The
 * launch needs pagoda_lora_scratch_bytes of scratch and, for the dense path,
 * the cuBLAS handle of pagoda_blas_create. */
#define PAGODA_LORA_DENSE_MAX_SHRINK_COLS 4096
#define PAGODA_LORA_DENSE_MAX_EXPAND_COLS 1024

typedef struct {
    const void *x;              /* [num_tokens, k] */
    const void *a;              /* [num_parts, num_slots, rank, k] */
    const int32_t *token_slots; /* [num_tokens] */
    void *out;                  /* [num_tokens, out_stride] */
    uint32_t *status;
    int dtype;
    int num_tokens;
    int k;
    int rank;
    int num_slots;
    int num_parts; /* 1 .. PAGODA_LORA_MAX_PARTS */
    int out_stride;
    PagodaLoraPart parts[PAGODA_LORA_MAX_PARTS];
    const int32_t *token_order; /* [num_tokens], with groups */
    const int32_t *groups;      /* [num_groups, 3] */
    int num_groups;             /* 0: no groups */
    int dense_min_tokens;       /* 0: never dense */
    void *scratch;              /* pagoda_lora_scratch_bytes of it */
    size_t scratch_bytes;
} PagodaLoraArgs;

/* Scratch a launch of these arguments needs (0 if none). */
size_t pagoda_lora_scratch_bytes(const PagodaLoraArgs *args);

int pagoda_lora(void *blas, const PagodaLoraArgs *args, const PagodaKernelPolicy *policy, void *stream);

/* ---- KV cache blocks ---------------------------------------------------- */

/* For every cache c in 0..num_caches and pair p in 0..num_pairs (in order
 * only if the pairs are independent: the caller splits dependent ones):
 * copies block_bytes from block pairs[2p] to block pairs[2p+1] of cache c.
 * cache_ptrs and pairs live on the device. */
int pagoda_copy_blocks(const uint64_t *cache_ptrs, int num_caches, size_t block_bytes, const int64_t *pairs,
                       int num_pairs, const PagodaKernelPolicy *policy, void *stream);

/* ---- sampling ------------------------------------------------------------ */

typedef struct {
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
    float repetition_penalty;
    float presence_penalty;
    float frequency_penalty;
    int32_t num_logprobs;  /* top logprobs to return, 0..PAGODA_MAX_TOP_LOGPROBS */
    uint64_t seed;
    uint64_t step;
    int32_t draw_index;    /* slot among the rows that draw (temperature > 0), or -1 */
    int32_t penalty_start; /* this row's entries in the penalty arrays */
    int32_t penalty_end;
    /* Logit constraints, applied to the working copy before the penalties (logprobs
     * stay raw): tokens whose bit is clear in the row's mask (ceil(vocab / 32) words
     * of mask_words from mask_start; bit t % 32 of word t / 32) go to -inf, then
     * bias_values[e] is added to token bias_tokens[e] for e in bias_start..bias_end
     * (entries of one token adjacent, added in order). mask_start -1: no mask. */
    int32_t mask_start;
    int32_t bias_start;
    int32_t bias_end;
} PagodaSampleRow;

/* What one row's sampling returns to the host. */
typedef struct {
    int32_t token;
    float logprob;
    int32_t top_ids[PAGODA_MAX_TOP_LOGPROBS];
    float top_logprobs[PAGODA_MAX_TOP_LOGPROBS];
} PagodaSampleOut;

typedef struct {
    const void *logits;              /* [num_rows, vocab] */
    const PagodaSampleRow *rows;     /* [num_rows], on the device */
    const int32_t *penalty_tokens;   /* token ids seen in a row's prompt or output */
    const int32_t *penalty_counts;   /* occurrences of that token in the output */
    PagodaSampleOut *out;            /* [num_rows] */
    const uint32_t *mask_words;      /* the rows' merged allowed-token masks (see PagodaSampleRow) */
    const int32_t *bias_tokens;      /* the rows' logit-bias entries: token ids in 0..vocab */
    const float *bias_values;        /* and the bias added to each */
    void *workspace;
    size_t workspace_bytes;
    int logits_dtype;
    int num_rows;
    int num_draw_rows;
    int vocab;
    /* Set when every row is greedy with no penalties and no top logprobs:
     * rows are then split over many blocks (one row alone still fills the GPU). */
    int greedy_only;
    /* Set when some row has a mask or bias entries; when clear, the rows'
     * constraint fields are not read (and greedy_only may be set). */
    int has_constraints;
} PagodaSampleArgs;

/* Bytes of workspace pagoda_sample needs. */
int pagoda_sample_workspace_bytes(int num_rows, int num_draw_rows, int vocab, size_t *bytes);

/* Samples every row exactly as pagoda_sampler::sample_row specifies. */
int pagoda_sample(const PagodaSampleArgs *args, const PagodaKernelPolicy *policy, void *stream);

/* token_ids[i] = sampled[source_rows[i]].token for every i in 0..n with
 * source_rows[i] >= 0, so a step's input can take the previous step's sampled
 * ids without a round trip through the host. A source row >= num_sampled sets
 * PAGODA_STATUS_ROW_INDEX and leaves token_ids[i] alone; a negative one leaves
 * it alone silently. Device memory only, no synchronisation: it may be
 * recorded in a graph (which then keeps reading this `sampled`). */
int pagoda_feed_sampled_tokens(const PagodaSampleOut *sampled, int num_sampled, const int32_t *source_rows,
                               int32_t *token_ids, int n, uint32_t *status, const PagodaKernelPolicy *policy,
                               void *stream);

#ifdef __cplusplus
}
#endif

#endif /* PAGODA_KERNELS_H */
