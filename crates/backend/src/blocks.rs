//! The argument checks of the whole-block ops every backend shares:
//! [`Backend::copy_blocks`], [`Backend::swap_out`] and [`Backend::swap_in`].
//! A block is one step of a cache tensor's leading dimension.

use crate::{Backend, BackendError, Result, Tensor};

/// How a cache tensor splits into blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheBlocks {
    /// The leading dimension.
    pub num_blocks: usize,
    /// Elements of one block (the product of the other dimensions).
    pub block_numel: usize,
    /// Bytes of one block in the cache's dtype: a host pool's block.
    pub block_bytes: usize,
}

impl CacheBlocks {
    /// The blocks of `cache` (rank >= 1), naming `what` in the error.
    pub fn of<B: Backend>(op: &'static str, what: &str, cache: &Tensor<B>) -> Result<Self> {
        let (num_blocks, block_numel) = cache.rows_cols(op, what)?;
        Ok(Self { num_blocks, block_numel, block_bytes: block_numel * cache.dtype().size_in_bytes() })
    }
}

/// Checks [`Backend::copy_blocks`]: every cache has a leading block
/// dimension and every `(src, dst)` pair names blocks inside every cache, so
/// a backend can refuse the call before it copies anything.
pub fn check_copy_blocks<B: Backend>(caches: &[&Tensor<B>], pairs: &[(u32, u32)]) -> Result<()> {
    const OP: &str = "copy_blocks";
    for (c, cache) in caches.iter().enumerate() {
        let blocks = CacheBlocks::of(OP, "cache", cache)?;
        let outside = |b: u32| b as usize >= blocks.num_blocks;
        if let Some((i, &(src, dst))) =
            pairs.iter().enumerate().find(|&(_, &(s, d))| outside(s) || outside(d))
        {
            return Err(BackendError::Index {
                op: OP,
                detail: format!("pair {i} ({src}, {dst}): cache {c} has {} blocks", blocks.num_blocks),
            });
        }
    }
    Ok(())
}

/// Checks [`Backend::swap_out`]: `pairs` are `(device block, host block)`,
/// each inside `cache` and inside a host pool of `host_pool_bytes` (blocks of
/// the cache's block size). Returns the cache's blocks.
pub fn check_swap_out<B: Backend>(
    cache: &Tensor<B>,
    host_pool_bytes: usize,
    pairs: &[(u32, u32)],
) -> Result<CacheBlocks> {
    check_swap("swap_out", cache, host_pool_bytes, pairs.iter().map(|&(device, host)| (device, host)))
}

/// Checks [`Backend::swap_in`]: `pairs` are `(host block, device block)`, as
/// [`check_swap_out`] otherwise.
pub fn check_swap_in<B: Backend>(
    host_pool_bytes: usize,
    cache: &Tensor<B>,
    pairs: &[(u32, u32)],
) -> Result<CacheBlocks> {
    check_swap("swap_in", cache, host_pool_bytes, pairs.iter().map(|&(host, device)| (device, host)))
}

/// Host block `h` exists when its bytes `h * block_bytes..(h + 1) * block_bytes` fit the pool.
fn check_swap<B: Backend>(
    op: &'static str,
    cache: &Tensor<B>,
    host_pool_bytes: usize,
    device_host_pairs: impl Iterator<Item = (u32, u32)>,
) -> Result<CacheBlocks> {
    let blocks = CacheBlocks::of(op, "cache", cache)?;
    let host_fits =
        |h: u32| (h as usize + 1).checked_mul(blocks.block_bytes).is_some_and(|end| end <= host_pool_bytes);
    for (i, (device, host)) in device_host_pairs.enumerate() {
        if device as usize >= blocks.num_blocks {
            return Err(BackendError::Index {
                op,
                detail: format!("pair {i}: device block {device} of {}", blocks.num_blocks),
            });
        }
        if !host_fits(host) {
            return Err(BackendError::Index {
                op,
                detail: format!(
                    "pair {i}: host block {host} of {} ({host_pool_bytes} bytes in blocks of {})",
                    host_pool_bytes.checked_div(blocks.block_bytes).unwrap_or(0),
                    blocks.block_bytes
                ),
            });
        }
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tensor;
    use crate::DType;

    fn index_error(r: Result<impl std::fmt::Debug>, detail: &str) -> bool {
        matches!(&r, Err(e @ BackendError::Index { .. }) if e.to_string().contains(detail))
    }

    #[test]
    fn copy_blocks_pairs_must_lie_in_every_cache() {
        let (k, v) = (tensor(&[4, 2, 16, 8], DType::BF16), tensor(&[3, 2, 16, 8], DType::BF16));
        assert!(check_copy_blocks(&[&k, &v], &[(0, 1), (2, 0)]).is_ok());
        assert!(check_copy_blocks(&[&k, &v], &[]).is_ok());
        assert!(check_copy_blocks::<crate::testing::Shapes>(&[], &[(9, 9)]).is_ok());
        assert!(index_error(
            check_copy_blocks(&[&k, &v], &[(0, 1), (3, 0)]),
            "pair 1 (3, 0): cache 1 has 3 blocks"
        ));
        assert!(index_error(check_copy_blocks(&[&k], &[(0, 4)]), "pair 0 (0, 4): cache 0 has 4 blocks"));
        let scalar = tensor(&[], DType::BF16);
        let r = check_copy_blocks(&[&k, &scalar], &[(0, 1)]);
        assert!(
            matches!(&r, Err(e @ BackendError::Shape { .. }) if e.to_string().contains("cache: expected rank >= 1"))
        );
    }

    #[test]
    fn swaps_check_device_and_host_blocks_in_their_own_order() {
        // Blocks of 2 * 16 * 8 bf16 = 512 bytes; a pool of 3 of them.
        let cache = tensor(&[4, 2, 16, 8], DType::BF16);
        let pool = 3 * 512;
        let blocks = CacheBlocks { num_blocks: 4, block_numel: 256, block_bytes: 512 };
        assert_eq!(check_swap_out(&cache, pool, &[(3, 2), (0, 0)]).unwrap(), blocks);
        assert_eq!(check_swap_in(pool, &cache, &[(2, 3), (0, 0)]).unwrap(), blocks);
        // swap_out pairs are (device, host); swap_in pairs are (host, device).
        assert!(index_error(check_swap_out(&cache, pool, &[(0, 0), (4, 0)]), "pair 1: device block 4 of 4"));
        assert!(index_error(check_swap_out(&cache, pool, &[(0, 3)]), "pair 0: host block 3 of 3"));
        assert!(index_error(check_swap_in(pool, &cache, &[(0, 4)]), "pair 0: device block 4 of 4"));
        assert!(index_error(check_swap_in(pool, &cache, &[(3, 0)]), "pair 0: host block 3 of 3"));
        // A pool that ends inside a block does not hold it.
        assert!(index_error(check_swap_out(&cache, pool - 1, &[(0, 2)]), "host block 2 of 2"));
        assert!(check_swap_out(&cache, 0, &[]).is_ok());
    }
}
