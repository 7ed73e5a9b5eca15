// Rotary position embedding fused with the paged KV-cache write: one block per
// token rotates its q and k heads, writes q to q_out and k, v to the cache slot
// (as E4M3 codes of the values over their scales for an FP8 cache).
#include "common.cuh"

using namespace pagoda;

namespace {

// The rotated value of element d of one head (x points at the head's first element).
template <typename T>
__device__ __forceinline__ float rotate(const T *x, int d, int rot, bool neox, const float *cs) {
    const float v = to_float<T>(x[d]);
    if (d >= rot) return v;
    const int half = rot / 2;
    if (neox) {
        if (d < half) return v * cs[d] - to_float<T>(x[d + half]) * cs[half + d];
        const int i = d - half;
        return v * cs[i] + to_float<T>(x[i]) * cs[half + i];
    }
    const int i = d / 2;
    if ((d & 1) == 0) return v * cs[i] - to_float<T>(x[d + 1]) * cs[half + i];
    return v * cs[i] + to_float<T>(x[d - 1]) * cs[half + i];
}

// Token t's position and cache slot (both kernels), read from step inputs before
// waiting on the kernel before (programmatic dependent launch), then the wait.
// Returns false, with the status set, when the position is out of range: the
// block has nothing to do. `write_cache` is false for a negative slot (padding)
// or an out-of-range one (status set); `block` and `off` are 0 then.
__device__ __forceinline__ bool token_slot(const PagodaRotaryArgs &a, int t, int &pos, bool &write_cache,
                                           int64_t &block, int &off) {
    pos = a.positions[t];
    const int64_t slot = a.slot_mapping[t];
    const int64_t num_slots = (int64_t)a.num_blocks * a.block_size;
    write_cache = slot >= 0 && slot < num_slots;
    block = write_cache ? slot / a.block_size : 0;
    off = write_cache ? (int)(slot % a.block_size) : 0;
    pdl_wait();  // qkv comes from the kernel before; the status word is written only after it
    if (pos < 0 || pos >= a.max_positions) {
        if (threadIdx.x == 0) set_status(a.status, PAGODA_STATUS_POSITION);
        return false;
    }
    if (slot >= num_slots && threadIdx.x == 0) set_status(a.status, PAGODA_STATUS_SLOT);
    return true;
}

// FP8: the caches are E4M3 codes (PAGODA_DTYPE_F8E4M3) of k and v over their scales.
template <typename T, bool FP8> __global__ void rotary_and_cache_kernel(PagodaRotaryArgs a) {
    pdl_launch_dependents();
    const int t = blockIdx.x;
    const int D = a.head_dim, hq = a.num_q_heads, hkv = a.num_kv_heads;
    int pos;
    bool write_cache;
    int64_t block;
    int off;
    if (!token_slot(a, t, pos, write_cache, block, off)) return;
    float2 scales = make_float2(1.f, 1.f);
    if constexpr (FP8) scales = load_kv_scales(a.kv_scales);  // after token_slot's wait

    const T *row = (const T *)a.qkv + (size_t)t * (hq + 2 * hkv) * D;
    const float *cs = a.cos_sin + (size_t)pos * a.rotary_dim;
    const bool neox = a.neox != 0;
    T *q_out = (T *)a.q_out + (size_t)t * hq * D;
    T *kc = (T *)a.k_cache, *vc = (T *)a.v_cache;

    for (int idx = threadIdx.x; idx < (hq + 2 * hkv) * D; idx += blockDim.x) {
        const int head = idx / D, d = idx % D;
        if (head < hq) {
            q_out[idx] = from_float<T>(rotate(row + head * D, d, a.rotary_dim, neox, cs));
        } else if (write_cache) {
            const bool is_k = head < hq + hkv;
            const int h = is_k ? head - hq : head - hq - hkv;
            const size_t dst = (((size_t)block * hkv + h) * a.block_size + off) * D + d;
            if constexpr (FP8) {
                __nv_fp8_storage_t *c8 = (__nv_fp8_storage_t *)(is_k ? a.k_cache : a.v_cache);
                if (is_k)
                    c8[dst] = e4m3_of(to_float<T>(from_float<T>(rotate(row + head * D, d, a.rotary_dim, neox, cs))),
                                      scales.x);
                else
                    c8[dst] = e4m3_of(to_float<T>(row[idx]), scales.y);
            } else {
                if (is_k)
                    kc[dst] = from_float<T>(rotate(row + head * D, d, a.rotary_dim, neox, cs));
                else
                    vc[dst] = row[idx];
            }
        }
    }
}

// The 16-byte path (16-bit types, rotary_dim == head_dim, head_dim % 16 == 0):
// one work item is 8 elements. Neox items take 8 dims of a head's first half and
// their partners in the second half; interleaved items are 4 adjacent pairs; v
// items are copies. With FP8, 8 cache elements are 8 bytes of E4M3 codes.
template <typename T, bool NEOX, bool FP8> __global__ void rotary_and_cache_vec_kernel(PagodaRotaryArgs a) {
    pdl_launch_dependents();
    const int t = blockIdx.x;
    const int D = a.head_dim, hq = a.num_q_heads, hkv = a.num_kv_heads, half = D / 2;
    int pos;
    bool write_cache;
    int64_t block;
    int off;
    if (!token_slot(a, t, pos, write_cache, block, off)) return;
    float2 scales = make_float2(1.f, 1.f);
    if constexpr (FP8) scales = load_kv_scales(a.kv_scales);  // after token_slot's wait

    const T *row = (const T *)a.qkv + (size_t)t * (hq + 2 * hkv) * D;
    const float *cs = a.cos_sin + (size_t)pos * D;
    T *q_out = (T *)a.q_out + (size_t)t * hq * D;
    const int per_head = NEOX ? half / 8 : D / 8;  // rotation items per head
    const int rot_items = (hq + hkv) * per_head;
    const int items = rot_items + hkv * (D / 8);
    for (int idx = threadIdx.x; idx < items; idx += blockDim.x) {
        if (idx >= rot_items) {  // v: a plain copy into the cache
            if (!write_cache) continue;
            const int j = idx - rot_items, h = j / (D / 8), d0 = (j % (D / 8)) * 8;
            const uint4 v = *reinterpret_cast<const uint4 *>(row + (size_t)(hq + hkv + h) * D + d0);
            if constexpr (FP8) {
                float x[8];
                unpack8<T>(v, x);
                *reinterpret_cast<uint2 *>((__nv_fp8_storage_t *)a.v_cache +
                                           (((size_t)block * hkv + h) * a.block_size + off) * D + d0) =
                    pack8_e4m3<T>(x, scales.y);
            } else {
                *reinterpret_cast<uint4 *>((T *)a.v_cache + (((size_t)block * hkv + h) * a.block_size + off) * D +
                                           d0) = v;
            }
            continue;
        }
        const int head = idx / per_head, d0 = (idx % per_head) * 8;
        const bool is_q = head < hq;
        if (!is_q && !write_cache) continue;
        T *dst = is_q ? q_out + (size_t)head * D
                      : (T *)a.k_cache + (((size_t)block * hkv + (head - hq)) * a.block_size + off) * D;
        // An FP8 cache's k goes to its codes instead (dst is then q's only).
        __nv_fp8_storage_t *k8 = nullptr;
        if constexpr (FP8) {
            if (!is_q)
                k8 = (__nv_fp8_storage_t *)a.k_cache + (((size_t)block * hkv + (head - hq)) * a.block_size + off) * D;
        }
        // Eight rotated elements from e onwards: to q_out or the cache.
        auto store8 = [&](int e, const float (&vals)[8]) {
            if constexpr (FP8) {
                if (!is_q) {
                    *reinterpret_cast<uint2 *>(k8 + e) = pack8_e4m3<T>(vals, scales.x);
                    return;
                }
            }
            *reinterpret_cast<uint4 *>(dst + e) = pack8<T>(vals);
        };
        const T *src = row + (size_t)head * D;
        float x[8], o[8];
        unpack8<T>(*reinterpret_cast<const uint4 *>(src + d0), x);
        if constexpr (NEOX) {
            float y[8], p[8], c[8], sn[8];
            unpack8<T>(*reinterpret_cast<const uint4 *>(src + d0 + half), y);
            *reinterpret_cast<float4 *>(c) = *reinterpret_cast<const float4 *>(cs + d0);
            *reinterpret_cast<float4 *>(c + 4) = *reinterpret_cast<const float4 *>(cs + d0 + 4);
            *reinterpret_cast<float4 *>(sn) = *reinterpret_cast<const float4 *>(cs + half + d0);
            *reinterpret_cast<float4 *>(sn + 4) = *reinterpret_cast<const float4 *>(cs + half + d0 + 4);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                o[e] = x[e] * c[e] - y[e] * sn[e];
                p[e] = y[e] * c[e] + x[e] * sn[e];
            }
            store8(d0, o);
            store8(d0 + half, p);
        } else {
            float c[4], sn[4];
            *reinterpret_cast<float4 *>(c) = *reinterpret_cast<const float4 *>(cs + d0 / 2);
            *reinterpret_cast<float4 *>(sn) = *reinterpret_cast<const float4 *>(cs + half + d0 / 2);
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                o[2 * q] = x[2 * q] * c[q] - x[2 * q + 1] * sn[q];
                o[2 * q + 1] = x[2 * q + 1] * c[q] + x[2 * q] * sn[q];
            }
            store8(d0, o);
        }
    }
}

template <typename T, bool FP8> void launch_rotary(const PagodaRotaryArgs *args, bool vec, LaunchStream s) {
    const int D = args->head_dim;
    if constexpr (sizeof(T) == 2) {
        if (vec) {
            const int per_head = args->neox ? D / 16 : D / 8;
            const int items = (args->num_q_heads + args->num_kv_heads) * per_head + args->num_kv_heads * (D / 8);
            int threads = 256;
            while (threads > 32 && threads / 2 >= items) threads /= 2;
            if (args->neox)
                launch(rotary_and_cache_vec_kernel<T, true, FP8>, args->num_tokens, threads, 0, s, *args);
            else
                launch(rotary_and_cache_vec_kernel<T, false, FP8>, args->num_tokens, threads, 0, s, *args);
            return;
        }
    }
    const int work = (args->num_q_heads + 2 * args->num_kv_heads) * D;
    int threads = 512;
    while (threads > 64 && threads / 2 >= work) threads /= 2;
    launch(rotary_and_cache_kernel<T, FP8>, args->num_tokens, threads, 0, s, *args);
}

}  // namespace

extern "C" int pagoda_rotary_and_cache(const PagodaRotaryArgs *args, const PagodaKernelPolicy *policy,
                                       void *stream) {
    PAGODA_CHECK_POLICY(policy);
    if (args->num_tokens == 0) return 0;
    if (args->rotary_dim > args->head_dim || args->rotary_dim % 2 != 0) return PAGODA_ERR_ARGUMENT;
    const LaunchStream s = launch_stream(policy, stream);
    const bool vec = args->rotary_dim == args->head_dim && args->head_dim % 16 == 0 && aligned16(args->qkv) &&
                     aligned16(args->q_out) && aligned16(args->k_cache) && aligned16(args->v_cache) &&
                     aligned16(args->cos_sin);
    const bool fp8 = args->cache_dtype == PAGODA_DTYPE_F8E4M3;
    if (!fp8 && args->cache_dtype != args->dtype) return PAGODA_ERR_DTYPE;
    PAGODA_DISPATCH_FLOAT(args->dtype, {
        if (fp8)
            launch_rotary<scalar_t, true>(args, vec, s);
        else
            launch_rotary<scalar_t, false>(args, vec, s);
    });
    PAGODA_LAUNCH_CHECK();
    return 0;
}
