// KV-cache block copies (copy-on-write): every layer's cache in one launch.
#include "common.cuh"

using namespace pagoda;

namespace {

// Grid (pair, cache); each block copies one block of one cache.
template <typename V>
__global__ void copy_blocks_kernel(const uint64_t *cache_ptrs, size_t block_vecs, const int64_t *pairs) {
    pdl_launch_dependents();
    pdl_wait();  // the caches are written by the kernels before
    const int p = blockIdx.x, c = blockIdx.y;
    V *cache = reinterpret_cast<V *>(cache_ptrs[c]);
    const int64_t src = pairs[2 * p], dst = pairs[2 * p + 1];
    const V *from = cache + (size_t)src * block_vecs;
    V *to = cache + (size_t)dst * block_vecs;
    for (size_t i = threadIdx.x; i < block_vecs; i += blockDim.x) to[i] = from[i];
}

}  // namespace

extern "C" int pagoda_copy_blocks(const uint64_t *cache_ptrs, int num_caches, size_t block_bytes,
                                  const int64_t *pairs, int num_pairs, const PagodaKernelPolicy *policy,
                                  void *stream) {
    PAGODA_CHECK_POLICY(policy);
    if (num_caches == 0 || num_pairs == 0 || block_bytes == 0) return 0;
    if (num_caches > 65535) return PAGODA_ERR_ARGUMENT;
    const LaunchStream s = launch_stream(policy, stream);
    dim3 grid(num_pairs, num_caches);
    // The caller passes 256-byte aligned cache bases, so 16-byte blocks stay aligned.
    if (block_bytes % 16 == 0)
        launch(copy_blocks_kernel<uint4>, grid, 256, 0, s, cache_ptrs, block_bytes / 16, pairs);
    else if (block_bytes % 4 == 0)
        launch(copy_blocks_kernel<uint32_t>, grid, 256, 0, s, cache_ptrs, block_bytes / 4, pairs);
    else
        launch(copy_blocks_kernel<uint8_t>, grid, 256, 0, s, cache_ptrs, block_bytes, pairs);
    PAGODA_LAUNCH_CHECK();
    return 0;
}
