//! Whole-block moves in the paged KV cache: copy-on-write copies between
//! device blocks, and swaps to and from a host pool (preemption by swapping).
//! A block is one step of a cache tensor's leading dimension.
//!
//! The host pool holds blocks in the cache's dtype, as a device's would: F32
//! caches as little-endian f32 (4 bytes an element), F8E4M3 caches as their
//! codes (1 byte an element).

use pagoda_backend::fp8::{e4m3_from_f32, e4m3_to_f32};
use pagoda_backend::{
    check_copy_blocks, check_swap_in, check_swap_out, BackendError, CacheBlocks, DType, Result,
};

use crate::storage::{range_in, CpuBuffer, CpuTensor};

/// Mutable access to one cache tensor's elements (F32 or F8E4M3 values) and its dtype.
fn with_cache<R>(
    op: &'static str,
    cache: &CpuTensor,
    body: impl FnOnce(&mut [f32], DType) -> Result<R>,
) -> Result<R> {
    let mut buffer = cache.storage().write();
    let dtype = buffer.dtype();
    let (CpuBuffer::F32(data) | CpuBuffer::F8E4M3(data)) = &mut *buffer else {
        return Err(BackendError::DType { op, dtype: cache.dtype() });
    };
    cache.expect_dtype(op, dtype)?;
    let range = range_in(op, cache, data.len())?;
    body(&mut data[range], dtype)
}

/// A value's bytes in a host pool of `dtype` (F32 or F8E4M3).
fn store(dtype: DType, value: f32, dst: &mut [u8]) {
    match dtype {
        DType::F8E4M3 => dst[0] = e4m3_from_f32(value),
        _ => dst.copy_from_slice(&value.to_le_bytes()),
    }
}

/// The value of one element's bytes in a host pool of `dtype`.
fn load(dtype: DType, src: &[u8]) -> f32 {
    match dtype {
        DType::F8E4M3 => e4m3_to_f32(src[0]),
        _ => f32::from_le_bytes([src[0], src[1], src[2], src[3]]),
    }
}

pub(crate) fn copy_blocks(caches: &[&CpuTensor], pairs: &[(u32, u32)]) -> Result<()> {
    const OP: &str = "copy_blocks";
    // Every pair is checked against every cache first, so a bad pair leaves every cache untouched.
    check_copy_blocks(caches, pairs)?;
    // One cache at a time: caches may be views of one allocation.
    for cache in caches {
        let block = CacheBlocks::of(OP, "cache", cache)?.block_numel;
        with_cache(OP, cache, |data, _| {
            for &(src, dst) in pairs {
                let (src, dst) = (src as usize * block, dst as usize * block);
                data.copy_within(src..src + block, dst);
            }
            Ok(())
        })?;
    }
    Ok(())
}

pub(crate) fn swap_out(cache: &CpuTensor, host_pool: &mut [u8], pairs: &[(u32, u32)]) -> Result<()> {
    const OP: &str = "swap_out";
    let CacheBlocks { block_numel: block, block_bytes: bytes, .. } =
        check_swap_out(cache, host_pool.len(), pairs)?;
    let buffer = cache.storage().read();
    let dtype = buffer.dtype();
    let (CpuBuffer::F32(data) | CpuBuffer::F8E4M3(data)) = &*buffer else {
        return Err(BackendError::DType { op: OP, dtype: cache.dtype() });
    };
    cache.expect_dtype(OP, dtype)?;
    let data = &data[range_in(OP, cache, data.len())?];
    let size = dtype.size_in_bytes();
    for &(device, host) in pairs {
        let src = &data[device as usize * block..][..block];
        let dst = &mut host_pool[host as usize * bytes..][..bytes];
        for (d, &s) in dst.chunks_exact_mut(size).zip(src) {
            store(dtype, s, d);
        }
    }
    Ok(())
}

pub(crate) fn swap_in(host_pool: &[u8], cache: &CpuTensor, pairs: &[(u32, u32)]) -> Result<()> {
    const OP: &str = "swap_in";
    let CacheBlocks { block_numel: block, block_bytes: bytes, .. } =
        check_swap_in(host_pool.len(), cache, pairs)?;
    with_cache(OP, cache, |data, dtype| {
        let size = dtype.size_in_bytes();
        for &(host, device) in pairs {
            let src = &host_pool[host as usize * bytes..][..bytes];
            let dst = &mut data[device as usize * block..][..block];
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(size)) {
                *d = load(dtype, s);
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use pagoda_backend::{Backend, DType, HostSlice, HostVec};

    use crate::CpuBackend;

    use super::*;

    fn cache(cpu: &CpuBackend) -> CpuTensor {
        let v: Vec<f32> = (0..4 * 6).map(|i| i as f32).collect();
        cpu.upload(HostSlice::F32(&v), &[4, 1, 2, 3], DType::F32).unwrap()
    }

    #[test]
    fn copy_blocks_applies_pairs_in_order_to_every_cache() {
        let cpu = CpuBackend::new();
        let (k, v) = (cache(&cpu), cache(&cpu));
        cpu.copy_blocks(&[&k, &v], &[(0, 2), (2, 3)]).unwrap();
        for t in [&k, &v] {
            let got = cpu.download_f32(t).unwrap();
            let block = |b: usize| got[b * 6..(b + 1) * 6].to_vec();
            assert_eq!(block(2), (0..6).map(|i| i as f32).collect::<Vec<_>>());
            assert_eq!(block(3), block(0));
            assert_eq!(block(1), (6..12).map(|i| i as f32).collect::<Vec<_>>());
        }
        let before = cpu.download_f32(&k).unwrap();
        assert!(matches!(cpu.copy_blocks(&[&k], &[(0, 1), (4, 0)]), Err(BackendError::Index { .. })));
        assert_eq!(cpu.download_f32(&k).unwrap(), before, "a rejected call changes nothing");
    }

    #[test]
    fn swap_out_then_in_round_trips_in_cache_layout() {
        let cpu = CpuBackend::new();
        let k = cache(&cpu);
        let mut pool = vec![0u8; 3 * 6 * 4];
        cpu.swap_out(&k, &mut pool, &[(3, 0), (1, 2)]).unwrap();
        let first: Vec<f32> =
            pool[..24].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(first, (18..24).map(|i| i as f32).collect::<Vec<_>>());
        let fresh = cpu.alloc(&[4, 1, 2, 3], DType::F32).unwrap();
        cpu.swap_in(&pool, &fresh, &[(0, 0), (2, 1)]).unwrap();
        let got = cpu.download_f32(&fresh).unwrap();
        assert_eq!(&got[..6], &(18..24).map(|i| i as f32).collect::<Vec<_>>()[..]);
        assert_eq!(&got[6..12], &(6..12).map(|i| i as f32).collect::<Vec<_>>()[..]);
        assert!(got[12..].iter().all(|x| x.is_nan()), "blocks not swapped in stay as they were");
        assert!(matches!(cpu.swap_out(&k, &mut pool, &[(0, 3)]), Err(BackendError::Index { .. })));
        assert!(matches!(cpu.swap_in(&pool, &k, &[(0, 4)]), Err(BackendError::Index { .. })));
    }

    #[test]
    fn fp8_caches_copy_and_swap_through_one_byte_a_code() {
        let cpu = CpuBackend::new();
        // 4 blocks of 6 codes: every block distinct, NaN and -0 among them.
        let mut codes: Vec<u8> = (0..24u8).map(|i| i.wrapping_mul(37) ^ 0x80).collect();
        codes[5] = 0x7F;
        codes[6] = 0x80;
        let k = cpu.upload(HostSlice::Bytes(&codes, DType::F8E4M3), &[4, 1, 2, 3], DType::F8E4M3).unwrap();
        cpu.copy_blocks(&[&k], &[(0, 2)]).unwrap();
        let HostVec::F8E4M3(got) = cpu.download(&k).unwrap() else { panic!("FP8 download") };
        assert_eq!(&got[12..18], &codes[..6]);
        assert_eq!(&got[..12], &codes[..12]);

        let mut pool = vec![0xAAu8; 3 * 6];
        cpu.swap_out(&k, &mut pool, &[(1, 2), (0, 0)]).unwrap();
        assert_eq!(&pool[12..18], &codes[6..12], "the pool holds the codes themselves");
        assert_eq!(&pool[..6], &codes[..6]);
        assert_eq!(&pool[6..12], &[0xAA; 6], "host blocks not swapped to stay as they were");
        let fresh = cpu.alloc(&[4, 1, 2, 3], DType::F8E4M3).unwrap();
        cpu.swap_in(&pool, &fresh, &[(2, 3), (0, 1)]).unwrap();
        let HostVec::F8E4M3(back) = cpu.download(&fresh).unwrap() else { panic!("FP8 download") };
        assert_eq!(&back[18..], &codes[6..12]);
        assert_eq!(&back[6..12], &codes[..6]);
        // A pool sized for f32 blocks holds four times the FP8 blocks; one byte short of a block does not.
        assert!(matches!(cpu.swap_out(&k, &mut pool[..17], &[(0, 2)]), Err(BackendError::Index { .. })));
    }
}
