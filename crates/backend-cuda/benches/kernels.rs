//! Kernel bench on the GPU (not a test): each figure against its ceiling,
//! measured in the same run.
//!
//! - Ceilings: a large device-to-device copy (bytes read + written) and a
//!   cuBLAS bf16 GEMM (8192^3).
//! - Paged decode attention, Llama-3-8B heads (32 q / 8 kv, D = 128, bf16,
//!   block 16), batch 64 at context 2k and 8k: bytes of K and V read over time,
//!   against the copy bandwidth.
//! - The same over an FP8 (E4M3) cache, counting its bytes (one a code), and
//!   single-stream decode at 32k context over both caches (FP8 on the CUDA
//!   and on the tensor cores); FP8 prefill
//!   attention (TFLOP/s) and rotary_and_cache writing FP8.
//! - Prefill attention (causal, with and without a cached prefix): TFLOP/s
//!   against the GEMM.
//! - Speculative verification: attention of 5 query rows a sequence (k + 1
//!   for k = 4 drafts), as one prompt chunk and as 5 decode rows (the
//!   engine's layout), against one, batch 1 and 32, bytes against the copy.
//! - Linear products of 1-160 token rows on the 8B layer shapes (and the LM
//!   head), both GEMVs and cuBLAS: weight bytes over time against the copy.
//! - FP8 (E4M3) weights on the same layer shapes: the weight-only GEMV (1-16
//!   rows; one byte a weight against the copy) and the quantized-activation
//!   FP8 GEMM (16-4096 rows; TFLOP/s against the bf16 GEMM).
//! - LoRA on the 8B layer shapes (rank 16, 16 resident slots, 1-4096 token
//!   rows, each token its own slot or a run of one): each adapted product
//!   (q/k/v, o, gate/up, down: the shrink and every part's expand) by the
//!   bytes it must move over time against the copy, and a whole layer's LoRA
//!   work (the four products), eager and replayed from a graph (as decode
//!   steps run), in microseconds.
//! - rms_norm, add_rms_norm, silu_and_mul, rotary_and_cache on 8B shapes
//!   against the copy bandwidth.
//!
//! Random data everywhere (never zeros), block tables shuffled, each timing
//! the median of repeated launches after a warm-up, one event pair around each.
//!
//! Run: `cargo bench -p pagoda-backend-cuda --bench kernels [FILTER]` (on a GPU
//! machine); with FILTER, only the rows whose label contains it run (for a profiler).
use std::fmt::Write as _;

use half::bf16;
use pagoda_backend::{
    lora_token_groups, AttentionArgs, AttentionHostMetadata, AttentionMetadata, Backend, DType,
    Fp8InputScale, Fp8LinearArgs, Fp8LinearMode, HostSlice, LinearFusion, LoraArgs, LoraGroups, LoraPart,
    Result, RopeStyle, RotaryCacheArgs, Tensor,
};
use pagoda_backend_cuda::{CudaBackend, DecodePartition, KernelOptions};

type T = Tensor<CudaBackend>;

struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// A bf16 tensor of random values: a random 32 MiB pattern tiled over it on the device.
fn random_tensor(g: &CudaBackend, rng: &mut Rng, dims: &[usize]) -> Result<T> {
    let t = g.alloc(dims, DType::BF16)?;
    let numel = t.numel();
    let chunk = numel.min(16 << 20);
    let pattern: Vec<bf16> = (0..chunk).map(|_| bf16::from_f32(rng.uniform())).collect();
    let flat = t.reshape(&[numel])?;
    let mut start = 0;
    while start < numel {
        let len = chunk.min(numel - start);
        g.write(&flat.narrow(start, len)?, HostSlice::BF16(&pattern[..len]))?;
        start += len;
    }
    Ok(t)
}

/// Median milliseconds of `reps` timed runs after `warmup` untimed ones.
fn median_ms(g: &CudaBackend, warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        times.push(g.time_ms(&mut f)? as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[reps / 2])
}

/// An F8E4M3 tensor of random E4M3 codes (never NaN), tiled as in [`random_tensor`].
fn random_codes(g: &CudaBackend, rng: &mut Rng, dims: &[usize]) -> Result<T> {
    let t = g.alloc(dims, DType::F8E4M3)?;
    let numel = t.numel();
    let chunk = numel.min(32 << 20);
    let pattern: Vec<u8> = (0..chunk)
        .map(|_| {
            let code = (rng.next_u64() >> 56) as u8;
            if code & 0x7F == 0x7F {
                code ^ 0x08 // NaN: another exponent
            } else {
                code
            }
        })
        .collect();
    let flat = t.reshape(&[numel])?;
    let mut start = 0;
    while start < numel {
        let len = chunk.min(numel - start);
        g.write(&flat.narrow(start, len)?, HostSlice::Bytes(&pattern[..len], DType::F8E4M3))?;
        start += len;
    }
    Ok(t)
}

/// Random K and V caches of `batch` sequences of `ctx` tokens (`(kv heads,
/// block size, head dim)`, bf16 or F8E4M3), and their block tables: every
/// block used once, shuffled. Returns the caches, the tables (row-major) and
/// their width.
fn random_paged_kv(
    g: &CudaBackend,
    rng: &mut Rng,
    batch: usize,
    ctx: usize,
    (hkv, bs, d): (usize, usize, usize),
    dtype: DType,
) -> Result<(T, T, Vec<i32>, usize)> {
    let blocks_per_seq = ctx.div_ceil(bs);
    let num_blocks = batch * blocks_per_seq;
    let dims = [num_blocks, hkv, bs, d];
    let (k, v) = if dtype == DType::F8E4M3 {
        (random_codes(g, rng, &dims)?, random_codes(g, rng, &dims)?)
    } else {
        (random_tensor(g, rng, &dims)?, random_tensor(g, rng, &dims)?)
    };
    let mut perm: Vec<i32> = (0..num_blocks as i32).collect();
    for i in (1..perm.len()).rev() {
        perm.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    Ok((k, v, perm, blocks_per_seq))
}

/// Median milliseconds (as [`median_ms`]) of paged attention for the batch
/// that `host` describes: a random query of `num_q_heads` heads over the
/// caches `kv` (`[num_blocks, Hkv, block_size, D]` each, with their scales
/// when F8E4M3), scale `1/sqrt(D)`.
fn time_attention(
    g: &CudaBackend,
    rng: &mut Rng,
    (k, v, kv_scales): (&T, &T, Option<&T>),
    host: AttentionHostMetadata,
    num_q_heads: usize,
    warmup: usize,
    reps: usize,
) -> Result<f64> {
    let (num_kv_heads, head_dim) = (k.dim(1), k.dim(3));
    let tokens = host.num_tokens();
    let meta = AttentionMetadata::upload(g, host)?;
    let q = random_tensor(g, rng, &[tokens, num_q_heads, head_dim])?;
    let out = g.alloc(&[tokens, num_q_heads, head_dim], DType::BF16)?;
    let args = AttentionArgs {
        q: &q,
        k_cache: k,
        v_cache: v,
        kv_scales,
        out: &out,
        meta: &meta,
        num_q_heads,
        num_kv_heads,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
        sliding_window: None,
    };
    median_ms(g, warmup, reps, || g.attention(&args))
}

struct Row {
    what: String,
    ms: f64,
    figure: String,
    vs_ceiling: String,
}

impl Row {
    /// A row of `bytes` moved in `ms`, against the copy's `peak_bw` (bytes/s).
    fn bandwidth(what: impl Into<String>, ms: f64, bytes: f64, peak_bw: f64) -> Self {
        let bw = bytes / (ms * 1e-3);
        Row {
            what: what.into(),
            ms,
            figure: format!("{:.0} GB/s", bw / 1e9),
            vs_ceiling: format!("{:.1}% of copy", 100.0 * bw / peak_bw),
        }
    }

    /// A row of its time alone (work of several kernels).
    fn time(what: impl Into<String>, ms: f64) -> Self {
        Row { what: what.into(), ms, figure: format!("{:.1} us", ms * 1e3), vs_ceiling: String::new() }
    }
}

fn main() -> Result<()> {
    let mut g = CudaBackend::new(0)?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut rows = Vec::new();
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |label: &str| filter.as_deref().is_none_or(|f| label.contains(f));

    // ---- ceilings (always measured: every row is reported against one) ----
    let peak_bw = {
        let copy_elems = 512usize << 20; // 1 GiB of bf16
        let src = random_tensor(&g, &mut rng, &[copy_elems])?;
        let dst = g.alloc(&[copy_elems], DType::BF16)?;
        let ms = median_ms(&g, 3, 20, || g.copy(&src, &dst))?;
        let peak_bw = 2.0 * (copy_elems * 2) as f64 / (ms * 1e-3);
        rows.push(Row {
            what: "d2d copy 1 GiB (read+write)".into(),
            ms,
            figure: format!("{:.0} GB/s", peak_bw / 1e9),
            vs_ceiling: "ceiling".into(),
        });
        drop((src, dst));
        peak_bw
    };

    let gemm_tflops = {
        let n = 8192;
        let a = random_tensor(&g, &mut rng, &[n, n])?;
        let b = random_tensor(&g, &mut rng, &[n, n])?;
        let c = g.alloc(&[n, n], DType::BF16)?;
        let ms = median_ms(&g, 3, 10, || g.linear(&a, &b, None, &c))?;
        let gemm_tflops = 2.0 * (n as f64).powi(3) / (ms * 1e-3) / 1e12;
        rows.push(Row {
            what: "cuBLAS bf16 GEMM 8192^3".into(),
            ms,
            figure: format!("{gemm_tflops:.0} TFLOP/s"),
            vs_ceiling: "ceiling".into(),
        });
        drop((a, b, c));
        gemm_tflops
    };

    // ---- paged decode attention, Llama-3-8B heads ----
    let (hq, hkv, d, bs) = (32usize, 8usize, 128usize, 16usize);
    // The two shapes, then single-stream and the 8B workload's batch
    // (256 sequences near 640 tokens); each with the launcher's own partition
    // choice and then every partition forced, to check that choice.
    let partitions = ["auto", "64", "128", "256", "512", "1024"];
    for (batch, ctx, part) in [(64usize, 2048usize), (64, 8192), (1, 576), (256, 640)]
        .iter()
        .flat_map(|&(b, c)| partitions.iter().map(move |&p| (b, c, p)))
    {
        let label = format!("decode attention b{batch} ctx{ctx} 32q/8kv D128 bs16 partition {part}");
        if !wanted(&label) {
            continue;
        }
        let partition: DecodePartition = part.parse().expect("the sweep names valid partitions");
        g.set_kernel_options(KernelOptions { decode_partition: Some(partition), ..KernelOptions::default() });
        let (k, v, perm, blocks_per_seq) =
            random_paged_kv(&g, &mut rng, batch, ctx, (hkv, bs, d), DType::BF16)?;
        let host = AttentionHostMetadata {
            query_start_loc: (0..=batch as i32).collect(),
            seq_lens: vec![ctx as i32; batch],
            block_tables: perm,
            max_blocks_per_seq: blocks_per_seq,
            slot_mapping: vec![-1; batch],
            num_decode_seqs: batch,
        };
        let ms = time_attention(&g, &mut rng, (&k, &v, None), host, hq, 5, 30)?;
        g.set_kernel_options(KernelOptions::default());
        let bytes = (2 * batch * ctx * hkv * d * 2 + 2 * batch * hq * d * 2) as f64;
        rows.push(Row::bandwidth(label, ms, bytes, peak_bw));
    }

    // ---- decode attention over an FP8 (E4M3) cache: bytes are one a code ----
    // The launcher's own partitions; single stream at 32k context over both caches.
    let kv_scales = g.upload(HostSlice::F32(&[0.021, 0.017]), &[2], DType::F32)?;
    // FP8 rows once on the CUDA cores and once on the tensor cores ("fp8 mma").
    let fp8_shapes = [(64usize, 2048usize), (64, 8192), (1, 576), (256, 640), (1, 32768)];
    let fp8_decode = [false, true]
        .into_iter()
        .flat_map(|mma| fp8_shapes.map(|(b, c)| (b, c, DType::F8E4M3, mma)))
        .chain([(1, 32768, DType::BF16, false)]);
    for (batch, ctx, dtype, mma) in fp8_decode {
        let cache = match (dtype, mma) {
            (DType::F8E4M3, false) => "fp8",
            (DType::F8E4M3, true) => "fp8 mma",
            _ => "bf16",
        };
        let label = format!("decode attention {cache} cache b{batch} ctx{ctx} 32q/8kv D128 bs16");
        if !wanted(&label) {
            continue;
        }
        g.set_kernel_options(KernelOptions { decode_attention_mma: Some(mma), ..KernelOptions::default() });
        let (k, v, perm, blocks_per_seq) = random_paged_kv(&g, &mut rng, batch, ctx, (hkv, bs, d), dtype)?;
        let host = AttentionHostMetadata {
            query_start_loc: (0..=batch as i32).collect(),
            seq_lens: vec![ctx as i32; batch],
            block_tables: perm,
            max_blocks_per_seq: blocks_per_seq,
            slot_mapping: vec![-1; batch],
            num_decode_seqs: batch,
        };
        let scales = (dtype == DType::F8E4M3).then_some(&kv_scales);
        let ms = time_attention(&g, &mut rng, (&k, &v, scales), host, hq, 5, 30)?;
        g.set_kernel_options(KernelOptions::default());
        let bytes = (2 * batch * ctx * hkv * d * dtype.size_in_bytes() + 2 * batch * hq * d * 2) as f64;
        rows.push(Row::bandwidth(label, ms, bytes, peak_bw));
    }

    // ---- prefill attention (and over an FP8 cache) ----
    let prefill_cases = [(4usize, 0usize, 4096usize, false), (1, 0, 8192, false), (2, 4096, 2048, false)]
        .into_iter()
        .chain([(4, 0, 4096, true), (2, 4096, 2048, true)]);
    for (seqs, cached, qlen, fp8) in prefill_cases {
        let cache = if fp8 { " fp8 cache" } else { "" };
        let label = format!("prefill attention{cache} {seqs}x(cached {cached} + {qlen}) causal");
        if !wanted(&label) {
            continue;
        }
        let ctx = cached + qlen;
        let blocks_per_seq = ctx.div_ceil(bs);
        let num_blocks = seqs * blocks_per_seq;
        let dims = [num_blocks, hkv, bs, d];
        let (k, v) = if fp8 {
            (random_codes(&g, &mut rng, &dims)?, random_codes(&g, &mut rng, &dims)?)
        } else {
            (random_tensor(&g, &mut rng, &dims)?, random_tensor(&g, &mut rng, &dims)?)
        };
        let scales = fp8.then_some(&kv_scales);
        let t = seqs * qlen;
        let host = AttentionHostMetadata {
            query_start_loc: (0..=seqs as i32).map(|s| s * qlen as i32).collect(),
            seq_lens: vec![ctx as i32; seqs],
            block_tables: (0..num_blocks as i32).collect(),
            max_blocks_per_seq: blocks_per_seq,
            slot_mapping: vec![-1; t],
            num_decode_seqs: 0,
        };
        let ms = time_attention(&g, &mut rng, (&k, &v, scales), host, hq, 3, 10)?;
        // Query i (0-based within the chunk) sees cached + i + 1 keys: q.k and p.v are 2 * D flops each.
        let pairs = (qlen * cached + qlen * (qlen + 1) / 2) as f64;
        let flops = seqs as f64 * hq as f64 * pairs * 4.0 * d as f64;
        let tflops = flops / (ms * 1e-3) / 1e12;
        rows.push(Row {
            what: label,
            ms,
            figure: format!("{tflops:.0} TFLOP/s"),
            vs_ceiling: format!("{:.2}x GEMM", tflops / gemm_tflops),
        });
    }

    // ---- speculative verification: k + 1 = 5 query rows a sequence against one ----
    // As one 5-row prompt chunk (the prefill kernel), and "as decode rows": the
    // engine's layout, 5 one-token decode rows over the same block table, row i
    // seeing ctx - 4 + i tokens (the decode kernel). Bytes: K and V of the context once.
    let verify_cases = [(1usize, 580usize, 1usize, false), (1, 580, 5, false), (1, 580, 5, true)]
        .into_iter()
        .chain([(32, 580, 1, false), (32, 580, 5, false), (32, 580, 5, true)]);
    for (batch, ctx, qlen, as_rows) in verify_cases {
        let layout = if as_rows { " as decode rows" } else { "" };
        let label = format!("verify attention b{batch} ctx{ctx} q{qlen}{layout} 32q/8kv D128 bs16");
        if !wanted(&label) {
            continue;
        }
        let (k, v, perm, blocks_per_seq) =
            random_paged_kv(&g, &mut rng, batch, ctx, (hkv, bs, d), DType::BF16)?;
        let host = if as_rows {
            let rows = batch * qlen;
            AttentionHostMetadata {
                query_start_loc: (0..=rows as i32).collect(),
                seq_lens: (0..rows).map(|r| (ctx - qlen + 1 + r % qlen) as i32).collect(),
                block_tables: perm
                    .chunks(blocks_per_seq)
                    .flat_map(|table| std::iter::repeat_n(table, qlen).flatten().copied())
                    .collect(),
                max_blocks_per_seq: blocks_per_seq,
                slot_mapping: vec![-1; rows],
                num_decode_seqs: rows,
            }
        } else {
            AttentionHostMetadata {
                query_start_loc: (0..=batch as i32).map(|s| s * qlen as i32).collect(),
                seq_lens: vec![ctx as i32; batch],
                block_tables: perm,
                max_blocks_per_seq: blocks_per_seq,
                slot_mapping: vec![-1; batch * qlen],
                num_decode_seqs: if qlen == 1 { batch } else { 0 },
            }
        };
        let ms = time_attention(&g, &mut rng, (&k, &v, None), host, hq, 5, 30)?;
        let bytes = (2 * batch * ctx * hkv * d * 2) as f64;
        rows.push(Row::bandwidth(label, ms, bytes, peak_bw));
    }

    // ---- linear products on Llama-3-8B shapes, few token rows (decode and verification) ----
    // Weight bytes over time against the copy bandwidth: with few rows every
    // product is a stream of its weights. The CUDA-core GEMV ("simt") takes up
    // to 8 rows, the tensor-core one ("mma") up to 16, cuBLAS any.
    const ROWS: [usize; 7] = [1, 2, 5, 8, 16, 32, 160];
    let products: [(&str, usize, usize, bool, bool, bool); 5] = [
        // (name, in, out rows of the weight, input norm, silu-and-mul, accumulate)
        ("qkv", 4096, 6144, true, false, false),
        ("o_proj", 4096, 4096, false, false, true),
        ("gate_up", 4096, 2 * 14336, true, true, false),
        ("down", 14336, 4096, false, false, true),
        ("lm_head", 4096, 128256, true, false, false),
    ];
    for &(name, kdim, ndim, norm, silu, accumulate) in &products {
        let any = ROWS
            .iter()
            .any(|t| ["simt", "mma", "cublas"].iter().any(|p| wanted(&format!("linear {name} t{t} {p}"))));
        if !any {
            continue;
        }
        let w = random_tensor(&g, &mut rng, &[ndim, kdim])?;
        let gamma = random_tensor(&g, &mut rng, &[kdim])?;
        for &t in &ROWS {
            let x = random_tensor(&g, &mut rng, &[t, kdim])?;
            let out = g.alloc(&[t, if silu { ndim / 2 } else { ndim }], DType::BF16)?;
            let fusion =
                LinearFusion { input_norm: norm.then_some((&gamma, 1e-5)), silu_mul: silu, accumulate };
            for (path, mma_from) in [("simt", 17), ("mma", 1), ("cublas", 17)] {
                let label = format!("linear {name} t{t} {path}");
                if (path == "simt" && t > 8) || (path == "mma" && t > 16) || !wanted(&label) {
                    continue;
                }
                g.set_kernel_options(KernelOptions {
                    gemv: Some(path != "cublas"),
                    gemv_mma_min_tokens: Some(mma_from),
                    ..KernelOptions::default()
                });
                let ms = median_ms(&g, 5, 30, || g.linear_fused(&x, &w, None, &out, &fusion))?;
                g.set_kernel_options(KernelOptions::default());
                let bytes = (ndim * kdim * 2) as f64;
                rows.push(Row::bandwidth(label, ms, bytes, peak_bw));
            }
        }
    }

    // ---- FP8 (E4M3) weights on Llama-3-8B shapes, next to the bf16 rows above ----
    // Weight only, 1-16 rows: the CUDA-core FP8 GEMV ("gemv") and the
    // tensor-core one ("mma", codes converted in registers), the weight bytes
    // (one a code) over time against the copy bandwidth; the floor is half the
    // bf16 GEMV's time. Quantized activations ("gemm", 2-4096 rows): the
    // quantization and cuBLASLt's FP8 GEMM, in TFLOP/s (2·T·N·K) against the
    // bf16 GEMM ceiling (the FP8 tensor cores' peak is twice it), and for few
    // rows the weight bandwidth too, to set where each mode takes over.
    const FP8_GEMV_ROWS: [usize; 5] = [1, 2, 5, 8, 16];
    const FP8_GEMM_ROWS: [usize; 8] = [2, 5, 8, 16, 64, 256, 1024, 4096];
    let fp8_label = |name: &str, t: usize, path: &str| format!("fp8 {name} t{t} {path}");
    for &(name, kdim, ndim, norm, silu, accumulate) in &products[..4] {
        let any =
            FP8_GEMV_ROWS.iter().any(|&t| ["gemv", "mma"].iter().any(|p| wanted(&fp8_label(name, t, p))))
                || FP8_GEMM_ROWS.iter().any(|&t| wanted(&fp8_label(name, t, "gemm")));
        if !any {
            continue;
        }
        let w = random_codes(&g, &mut rng, &[ndim, kdim])?;
        // Scales that keep random codes' products of order one.
        let scale = 1.0 / (448.0 * (kdim as f32).sqrt());
        let w_scale = g.upload(HostSlice::F32(&vec![scale; ndim]), &[ndim], DType::F32)?;
        let gamma = random_tensor(&g, &mut rng, &[kdim])?;
        // (rows, path, mode, the tensor-core GEMV's first row count)
        let runs = FP8_GEMV_ROWS
            .iter()
            .flat_map(|&t| {
                [(t, "gemv", Fp8LinearMode::WeightOnly, 17), (t, "mma", Fp8LinearMode::WeightOnly, 1)]
            })
            .chain(FP8_GEMM_ROWS.iter().map(|&t| (t, "gemm", Fp8LinearMode::QuantizedActivations, 17)));
        for (t, path, mode, mma_from) in runs {
            let label = fp8_label(name, t, path);
            if !wanted(&label) {
                continue;
            }
            let x = random_tensor(&g, &mut rng, &[t, kdim])?;
            let out = g.alloc(&[t, if silu { ndim / 2 } else { ndim }], DType::BF16)?;
            let fusion =
                LinearFusion { input_norm: norm.then_some((&gamma, 1e-5)), silu_mul: silu, accumulate };
            let args = Fp8LinearArgs {
                x: &x,
                weight: &w,
                weight_scale: &w_scale,
                bias: None,
                out: &out,
                fusion: &fusion,
                mode,
                input_scale: Fp8InputScale::Dynamic,
            };
            g.set_kernel_options(KernelOptions {
                gemv_mma_min_tokens: Some(mma_from),
                ..KernelOptions::default()
            });
            let ms = median_ms(&g, 5, 30, || g.fp8_linear(&args))?;
            g.set_kernel_options(KernelOptions::default());
            let weight_bytes = (ndim * kdim) as f64;
            if mode == Fp8LinearMode::WeightOnly {
                rows.push(Row::bandwidth(label, ms, weight_bytes, peak_bw));
            } else {
                let tflops = 2.0 * (t * ndim * kdim) as f64 / (ms * 1e-3) / 1e12;
                let weight_bw = weight_bytes / (ms * 1e-3);
                rows.push(Row {
                    what: label,
                    ms,
                    figure: format!("{tflops:.0} TFLOP/s"),
                    vs_ceiling: format!(
                        "{:.0}% of bf16 GEMM, weights {:.0}% of copy",
                        100.0 * tflops / gemm_tflops,
                        100.0 * weight_bw / peak_bw
                    ),
                });
            }
        }
    }

    // ---- LoRA on Llama-3-8B layers: rank 16, 16 resident slots ----
    // Each row is one adapted product (`lora_apply`: the shrink and every
    // part's expand), with the bytes it must move: x and the A of the slots
    // the batch uses (each once), the B of those slots, and its columns of
    // out read and written. Decode-like rows give token i slot i % 16 (every
    // token its own adapter up to 16); "1 slot" rows are a prefill chunk of
    // one adapter. From 32 tokens the products run dense (GEMMs over all 16
    // slots), below per token. "layer" rows time the four products of one
    // layer in a row; "layer graph" rows replay them from a graph (as the
    // decode steps do, without the host's launch cost).
    let (rank, num_slots) = (16usize, 16usize);
    // (name, K, each part's N): the slot stacks as the model holds them
    // (`LayerLoraSlots`): A part-major, the B of equal-width parts (k and v,
    // gate and up) in one allocation, so that the dense path batches them.
    let products: [(&str, usize, &[usize]); 4] = [
        ("qkv", 4096, &[4096, 1024, 1024]),
        ("o", 4096, &[4096]),
        ("gate_up", 4096, &[14336, 14336]),
        ("down", 14336, &[4096]),
    ];
    struct Product {
        name: &'static str,
        x: T,
        a: T,
        /// The B stacks (one per run of equal widths) and each part's view.
        _stacks: Vec<T>,
        b: Vec<T>,
        out: T,
        bytes: usize,
    }
    // "16 runs": a prefill step over 16 adapters (runs of t / 16 tokens).
    // "grouped": the same with the tokens grouped by slot (the SGMV path,
    // only with PAGODA_LORA_GROUPED=1 and below the dense path's tokens).
    let mixes =
        [("16 slots", [1usize, 8, 64, 256].as_slice()), ("1 slot", &[64, 256, 4096]), ("16 runs", &[4096])];
    for (mix, counts) in mixes {
        for (&t, grouped) in counts.iter().flat_map(|t| [(t, false), (t, true)]) {
            if grouped && t < 16 {
                continue;
            }
            let slots: Vec<i32> = (0..t)
                .map(|i| match mix {
                    "1 slot" => 3,
                    "16 runs" => (i * num_slots / t) as i32,
                    _ => (i % num_slots) as i32,
                })
                .collect();
            let used = if mix == "1 slot" { 1 } else { t.min(num_slots) };
            let mix = if grouped { format!("{mix} grouped") } else { mix.to_string() };
            let layer_label = format!("lora layer t{t} r{rank} {mix}");
            let any_product = products.iter().any(|p| wanted(&format!("lora {} t{t} r{rank} {mix}", p.0)));
            if !any_product && !wanted(&layer_label) {
                continue;
            }
            let token_slots = g.upload(HostSlice::I32(&slots), &[t], DType::I32)?;
            let (order, groups) = lora_token_groups(&slots, None);
            let order = g.upload(HostSlice::I32(&order), &[t], DType::I32)?;
            let groups = g.upload(HostSlice::I32(&groups), &[groups.len() / 3, 3], DType::I32)?;
            let groups = || grouped.then_some(LoraGroups { order: &order, groups: &groups });
            let mut layer = Vec::new();
            for &(name, k, widths) in &products {
                let parts = widths.len();
                let x = random_tensor(&g, &mut rng, &[t, k])?;
                let a = random_tensor(&g, &mut rng, &[parts, num_slots, rank, k])?;
                let (mut stacks, mut b) = (Vec::new(), Vec::new());
                let mut p = 0;
                while p < parts {
                    let run = widths[p..].iter().take_while(|&&n| n == widths[p]).count();
                    let stack = random_tensor(&g, &mut rng, &[run * num_slots, rank, widths[p]])?;
                    for i in 0..run {
                        b.push(
                            stack.narrow(i * num_slots, num_slots)?.reshape(&[num_slots, rank, widths[p]])?,
                        );
                    }
                    stacks.push(stack);
                    p += run;
                }
                let width: usize = widths.iter().sum();
                let out = random_tensor(&g, &mut rng, &[t, width])?;
                let bytes =
                    t * k * 2 + used * parts * rank * k * 2 + used * rank * width * 2 + 2 * t * width * 2;
                layer.push(Product { name, x, a, _stacks: stacks, b, out, bytes });
            }
            let apply = |p: &Product| -> Result<()> {
                let mut offset = 0;
                let parts: Vec<LoraPart<'_, CudaBackend>> =
                    p.b.iter()
                        .map(|b| {
                            let part = LoraPart { b, out_offset: offset };
                            offset += b.dim(2);
                            part
                        })
                        .collect();
                g.lora_apply(&LoraArgs {
                    x: &p.x,
                    a: &p.a,
                    parts: &parts,
                    token_slots: &token_slots,
                    out: &p.out,
                    groups: groups(),
                })
            };
            for p in &layer {
                let label = format!("lora {} t{t} r{rank} {mix}", p.name);
                if !wanted(&label) {
                    continue;
                }
                let ms = median_ms(&g, 5, 30, || apply(p))?;
                rows.push(Row::bandwidth(label, ms, p.bytes as f64, peak_bw));
            }
            if wanted(&layer_label) {
                let mut all = || layer.iter().try_for_each(apply);
                let ms = median_ms(&g, 5, 30, &mut all)?;
                rows.push(Row::time(layer_label.clone(), ms));
                let graph = g.capture(&mut all)?;
                let ms = median_ms(&g, 5, 30, || g.replay(&graph))?;
                rows.push(Row::time(format!("lora layer graph t{t} r{rank} {mix}"), ms));
            }
        }
    }

    // ---- row ops on 8B shapes (T = 4096 tokens) ----
    if !wanted("row ops rms_norm silu rotary fp8") {
        print_table(&g, &rows);
        return Ok(());
    }
    let (tok, hidden, inter) = (4096usize, 4096usize, 14336usize);
    let x = random_tensor(&g, &mut rng, &[tok, hidden])?;
    let res = random_tensor(&g, &mut rng, &[tok, hidden])?;
    let w = random_tensor(&g, &mut rng, &[hidden])?;
    let out = g.alloc(&[tok, hidden], DType::BF16)?;
    let bw_row = |what: &str, ms: f64, bytes: usize| Row::bandwidth(what, ms, bytes as f64, peak_bw);
    let ms = median_ms(&g, 5, 30, || g.rms_norm(&x, &w, 1e-5, &out))?;
    rows.push(bw_row("rms_norm [4096, 4096]", ms, 2 * tok * hidden * 2));
    let ms = median_ms(&g, 5, 30, || g.add_rms_norm(&x, &res, &w, 1e-5, &out))?;
    rows.push(bw_row("add_rms_norm [4096, 4096]", ms, 4 * tok * hidden * 2));
    let gate_up = random_tensor(&g, &mut rng, &[tok, 2 * inter])?;
    let act = g.alloc(&[tok, inter], DType::BF16)?;
    let ms = median_ms(&g, 5, 30, || g.silu_and_mul(&gate_up, &act))?;
    rows.push(bw_row("silu_and_mul [4096, 2x14336]", ms, 3 * tok * inter * 2));
    drop((gate_up, act));

    let qkv = random_tensor(&g, &mut rng, &[tok, (hq + 2 * hkv) * d])?;
    let positions: Vec<i32> = (0..tok as i32).collect();
    let positions = g.upload(HostSlice::I32(&positions), &[tok], DType::I32)?;
    let mut table = Vec::with_capacity(8192 * d);
    for p in 0..8192 {
        let angles: Vec<f32> =
            (0..d / 2).map(|i| p as f32 * 500_000f32.powf(-2.0 * i as f32 / d as f32)).collect();
        table.extend(angles.iter().map(|a| a.cos()));
        table.extend(angles.iter().map(|a| a.sin()));
    }
    let cos_sin = g.upload(HostSlice::F32(&table), &[8192, d], DType::F32)?;
    let num_blocks = tok.div_ceil(bs);
    let kc = g.alloc(&[num_blocks, hkv, bs, d], DType::BF16)?;
    let vc = g.alloc(&[num_blocks, hkv, bs, d], DType::BF16)?;
    let slots: Vec<i64> = (0..tok as i64).collect();
    let slots = g.upload(HostSlice::I64(&slots), &[tok], DType::I64)?;
    let q_out = g.alloc(&[tok, hq * d], DType::BF16)?;
    let args = RotaryCacheArgs {
        qkv: &qkv,
        positions: &positions,
        cos_sin: &cos_sin,
        q_out: &q_out,
        k_cache: &kc,
        v_cache: &vc,
        kv_scales: None,
        slot_mapping: &slots,
        num_q_heads: hq,
        num_kv_heads: hkv,
        head_dim: d,
        rotary_dim: d,
        style: RopeStyle::Neox,
    };
    let ms = median_ms(&g, 5, 30, || g.rotary_and_cache(&args))?;
    // qkv read once, q and k, v written once, the cos/sin rows read once per token.
    let bytes = 2 * tok * (hq + 2 * hkv) * d * 2 + tok * d * 4;
    rows.push(bw_row("rotary_and_cache [4096, 6144]", ms, bytes));
    let (kc8, vc8) = (
        g.alloc(&[num_blocks, hkv, bs, d], DType::F8E4M3)?,
        g.alloc(&[num_blocks, hkv, bs, d], DType::F8E4M3)?,
    );
    let fp8_args = RotaryCacheArgs { k_cache: &kc8, v_cache: &vc8, kv_scales: Some(&kv_scales), ..args };
    let ms = median_ms(&g, 5, 30, || g.rotary_and_cache(&fp8_args))?;
    // As above, with k and v written as one byte a code.
    let bytes = tok * (hq + 2 * hkv) * d * 2 + tok * hq * d * 2 + tok * 2 * hkv * d + tok * d * 4;
    rows.push(bw_row("rotary_and_cache fp8 cache [4096, 6144]", ms, bytes));
    g.synchronize()?;
    print_table(&g, &rows);
    Ok(())
}

fn print_table(g: &CudaBackend, rows: &[Row]) {
    let mut table = String::new();
    writeln!(table, "device: {}", g.name()).ok();
    writeln!(table, "kernel policy (partition rows force their own): {}", g.kernel_policy()).ok();
    writeln!(table, "{:<52} {:>10} {:>16} {:>16}", "kernel", "ms", "achieved", "vs ceiling").ok();
    for r in rows {
        writeln!(table, "{:<52} {:>10.4} {:>16} {:>16}", r.what, r.ms, r.figure, r.vs_ceiling).ok();
    }
    print!("{table}");
}
