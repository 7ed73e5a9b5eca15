//! copy_blocks over two caches, and a swap_out / swap_in round trip through
//! host pools in the device's block layout (for F8E4M3 caches, one code a
//! byte on both sides: the pools must hold the same bytes).

use half::{bf16, f16};
use pagoda_backend::fp8::{e4m3_from_f32, e4m3_to_f32};
use pagoda_backend::{Backend, DType};

use super::mismatches;
use crate::conformance::grid::BlocksCase;
use crate::conformance::{cpu, dev, Harness};

/// Host pool bytes (little-endian, `dtype`) as f32.
fn pool_to_f32(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::BF16 => bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        DType::F8E4M3 => bytes.iter().map(|&c| e4m3_to_f32(c)).collect(),
        _ => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
    }
}

pub(crate) fn run<B: Backend>(h: &mut Harness<'_, B>, cases: &[BlocksCase]) {
    for c in cases {
        let label = c.label();
        h.case("copy_blocks", &label, |h, rng| {
            if 2 * c.pairs > c.num_blocks {
                return Err(format!("grid case: {} pairs need {} blocks", c.pairs, 2 * c.pairs));
            }
            let dims = [c.num_blocks, c.num_kv_heads, c.block_size, c.head_dim];
            let block = c.num_kv_heads * c.block_size * c.head_dim;
            let len = c.num_blocks * block;
            let cache = |rng: &mut crate::conformance::random::CaseRng| {
                let data = rng.normals(len, 1.0, h.dtype);
                if c.fp8 {
                    // Codes over most of the E4M3 range (about ±30, a few saturated).
                    let codes: Vec<u8> = data.iter().map(|&x| e4m3_from_f32(x * 10.0)).collect();
                    h.fp8_codes(&codes, &dims)
                } else {
                    h.floats(&data, &dims)
                }
            };
            let k = cache(rng)?;
            let v = cache(rng)?;
            // The reference's pool holds f32 (or codes), the device's its dtype (or codes).
            let (ref_dtype, dev_dtype) =
                if c.fp8 { (DType::F8E4M3, DType::F8E4M3) } else { (DType::F32, h.dtype) };
            // Copy-on-write pairs as the allocator makes them: distinct
            // destinations that are never sources.
            let order = rng.permutation(c.num_blocks);
            let pairs: Vec<(u32, u32)> = (0..c.pairs)
                .map(|i| (order[c.pairs + rng.below(c.num_blocks - c.pairs)] as u32, order[i] as u32))
                .collect();
            cpu(h.cpu.copy_blocks(&[&k.0, &v.0], &pairs))?;
            dev(h.device.copy_blocks(&[&k.1, &v.1], &pairs))?;
            let mut rows = Vec::new();
            for (name, (r, d)) in [("copy_blocks/k", &k), ("copy_blocks/v", &v)] {
                let (want, got) = (cpu(h.cpu.download_f32(r))?, dev(h.device.download_f32(d))?);
                rows.push(h.exact_count(name, &label, mismatches(&want, &got), "elements differ"));
            }

            // Swap `pairs` blocks of K out to a host pool (poisoned with 0xff,
            // NaN in every float format) and back in over other device blocks.
            let host_blocks = c.pairs + 2;
            let dev_bytes = block * dev_dtype.size_in_bytes();
            let mut pool_r = vec![0xffu8; host_blocks * block * ref_dtype.size_in_bytes()];
            let mut pool_d = vec![0xffu8; host_blocks * dev_bytes];
            let host_order = rng.permutation(host_blocks);
            let out_pairs: Vec<(u32, u32)> =
                (0..c.pairs).map(|i| (order[i] as u32, host_order[i] as u32)).collect();
            cpu(h.cpu.swap_out(&k.0, &mut pool_r, &out_pairs))?;
            dev(h.device.swap_out(&k.1, &mut pool_d, &out_pairs))?;
            let (host_r, host_d) = (pool_to_f32(&pool_r, ref_dtype), pool_to_f32(&pool_d, dev_dtype));
            let swapped = |all: &[f32]| -> Vec<f32> {
                out_pairs.iter().flat_map(|&(_, hb)| all[hb as usize * block..][..block].to_vec()).collect()
            };
            rows.push(h.exact_count(
                "swap_out",
                &label,
                mismatches(&swapped(&host_r), &swapped(&host_d)),
                "elements differ",
            ));
            let in_pairs: Vec<(u32, u32)> = out_pairs
                .iter()
                .enumerate()
                .map(|(i, &(_, hb))| (hb, order[c.num_blocks - 1 - i] as u32))
                .collect();
            cpu(h.cpu.swap_in(&pool_r, &k.0, &in_pairs))?;
            dev(h.device.swap_in(&pool_d, &k.1, &in_pairs))?;
            let (want, got) = (cpu(h.cpu.download_f32(&k.0))?, dev(h.device.download_f32(&k.1))?);
            rows.push(h.exact_count("swap_in", &label, mismatches(&want, &got), "elements differ"));
            Ok(rows)
        });
    }
}
