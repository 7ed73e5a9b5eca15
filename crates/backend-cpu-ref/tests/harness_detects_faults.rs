//! The conformance harness must tell a faithful device from a faulty one.
//!
//! `Device` wraps the CPU reference as a stand-in device backend. It can
//! (a) emulate BF16/F16 activations — store f32 but round every float it
//! holds to the dtype, as a GPU storing bf16 does — which must pass within the
//! documented tolerances with a non-zero error, and (b) inject one realistic
//! bug, which the quick grid must catch in exactly the ops it affects.

use half::{bf16, f16};
use pagoda_backend::fp8::{e4m3_from_f32, e4m3_round, e4m3_to_f32};
use pagoda_backend::{
    check_fp8_quantize_rows, fp8_quantize_rows, fp8_quantize_rows_on_host, AttentionArgs, AttentionMetadata,
    Backend, BackendError, DType, Fp8LinearArgs, Fp8LinearMode, HostSlice, HostVec, LinearFusion, LoraArgs,
    LoraPart, MemoryInfo, Result, RopeStyle, RotaryCacheArgs, SampledToken, SamplingRow, Tensor, UniformFill,
};
use pagoda_backend_cpu_ref::conformance::{self, Grid};
use pagoda_backend_cpu_ref::{CpuBackend, CpuSampled, CpuStorage};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    /// Decode queries forget the newest key (seq_len - 1).
    AttentionOffByOne,
    /// Rotates with the other pairing of dimensions.
    WrongRopeStyle,
    /// Treats slot -1 as slot 0 instead of skipping the token.
    WritesSkippedSlots,
    LinearDropsBias,
    /// A fused linear that should add into its output overwrites it.
    FusedLinearOverwrites,
    /// eps 1e-2 instead of the caller's.
    RmsNormWrongEps,
    /// Leaves the last output element unwritten.
    SiluSkipsLastElement,
    /// Copies blocks in the first cache only.
    CopyBlocksFirstCacheOnly,
    /// Draws with the random stream one step ahead.
    SampleWrongStep,
    /// Swaps out the block after the one asked for.
    SwapOutNextBlock,
    /// Gives tokens without an adapter (slot -1) the adapter in slot 0.
    LoraNoAdapterUsesSlotZero,
    /// Writes FP8 key codes rounded toward zero instead of to the nearest.
    Fp8KeyCodesTruncated,
    /// Reads FP8 caches without their scales (as 1.0).
    Fp8AttentionIgnoresScales,
    /// Fills a part of a tensor as if it were a whole one (ignores the row stride).
    FillUniformIgnoresRowStride,
    /// Computes an FP8 linear layer in the other mode than the one asked for.
    Fp8LinearWrongMode,
    /// Quantizes weights with one scale for the whole tensor (vLLM's
    /// per-tensor default) instead of one per row.
    Fp8QuantizeRowsPerTensor,
}

struct Device {
    cpu: CpuBackend,
    dtype: DType,
    fault: Fault,
}

type D = Tensor<Device>;
type C = Tensor<CpuBackend>;

/// The CPU view of a device tensor: same storage, held as f32.
fn c(t: &D) -> C {
    let dtype = if t.dtype().is_float() { DType::F32 } else { t.dtype() };
    Tensor::from_parts(t.storage().clone(), t.offset(), t.shape().clone(), dtype)
}

fn round(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(x).to_f32(),
        DType::F16 => f16::from_f32(x).to_f32(),
        _ => x,
    }
}

impl Device {
    fn new(dtype: DType, fault: Fault) -> Self {
        Self { cpu: CpuBackend::new(), dtype, fault }
    }

    fn wrap(&self, t: C, dtype: DType) -> D {
        Tensor::from_parts(t.storage().clone(), t.offset(), t.shape().clone(), dtype)
    }

    /// Rounds a float tensor's elements to its dtype, as storing them would.
    fn store(&self, t: &D) -> Result<()> {
        if matches!(t.dtype(), DType::BF16 | DType::F16) {
            let v: Vec<f32> = self.cpu.download_f32(&c(t))?.iter().map(|&x| round(t.dtype(), x)).collect();
            self.cpu.write(&c(t), HostSlice::F32(&v))?;
        }
        Ok(())
    }

    /// The CPU view of LoRA token slots, with the fault applied.
    fn lora_slots(&self, slots: &D) -> Result<C> {
        if self.fault != Fault::LoraNoAdapterUsesSlotZero {
            return Ok(c(slots));
        }
        let v: Vec<i32> = self.cpu.download(&c(slots))?.to_f32().iter().map(|&s| s.max(0.0) as i32).collect();
        self.cpu.upload(HostSlice::I32(&v), &[v.len()], DType::I32)
    }

    /// rotary_and_cache into F8E4M3 caches as a 16-bit device does it: the
    /// rotated key rounded to the activation dtype first, then divided by its
    /// scale and rounded to the nearest code (toward zero with
    /// [`Fault::Fp8KeyCodesTruncated`]).
    fn rotary_fp8(&self, a: &RotaryCacheArgs<'_, Self>, slots: &C, style: RopeStyle) -> Result<()> {
        let cpu = &self.cpu;
        let dims = a.k_cache.dims();
        let (k32, v32) = (cpu.alloc(dims, DType::F32)?, cpu.alloc(dims, DType::F32)?);
        let (qkv, pos, cs, q) = (c(a.qkv), c(a.positions), c(a.cos_sin), c(a.q_out));
        cpu.rotary_and_cache(&RotaryCacheArgs {
            qkv: &qkv,
            positions: &pos,
            cos_sin: &cs,
            q_out: &q,
            k_cache: &k32,
            v_cache: &v32,
            kv_scales: None,
            slot_mapping: slots,
            num_q_heads: a.num_q_heads,
            num_kv_heads: a.num_kv_heads,
            head_dim: a.head_dim,
            rotary_dim: a.rotary_dim,
            style,
        })?;
        self.store(a.q_out)?;
        let (ks, vs) = match a.kv_scales {
            Some(t) => {
                let s = cpu.download_f32(&c(t))?;
                (s[0], s[1])
            }
            None => (1.0, 1.0),
        };
        let nearest = |x: f32| e4m3_round(x);
        let toward_zero = |x: f32| {
            let code = e4m3_from_f32(x);
            let magnitude = code & 0x7F;
            if e4m3_to_f32(code).abs() > x.abs() && magnitude > 0 && magnitude < 0x7F {
                e4m3_to_f32(code - 1)
            } else {
                e4m3_to_f32(code)
            }
        };
        let truncate = self.fault == Fault::Fp8KeyCodesTruncated;
        let (kf, vf) = (cpu.download_f32(&k32)?, cpu.download_f32(&v32)?);
        let (k8, v8) = (c(a.k_cache), c(a.v_cache));
        let (mut kc, mut vc) = (cpu.download_f32(&k8)?, cpu.download_f32(&v8)?);
        let (bs, d, hkv) = (dims[2], a.head_dim, a.num_kv_heads);
        let HostVec::I64(slot_values) = cpu.download(slots)? else { unreachable!("I64 slots") };
        for slot in slot_values.into_iter().filter(|&s| s >= 0) {
            let (block, off) = (slot as usize / bs, slot as usize % bs);
            for h in 0..hkv {
                let at = ((block * hkv + h) * bs + off) * d;
                for i in at..at + d {
                    let k = round(self.dtype, kf[i]) / ks;
                    kc[i] = if truncate { toward_zero(k) } else { nearest(k) };
                    vc[i] = nearest(vf[i] / vs);
                }
            }
        }
        cpu.write(&k8, HostSlice::F32(&kc))?;
        cpu.write(&v8, HostSlice::F32(&vc))
    }

    fn cpu_meta(&self, m: &AttentionMetadata<Device>) -> AttentionMetadata<CpuBackend> {
        AttentionMetadata {
            host: m.host.clone(),
            query_start_loc: c(&m.query_start_loc),
            seq_lens: c(&m.seq_lens),
            block_tables: c(&m.block_tables),
            slot_mapping: c(&m.slot_mapping),
        }
    }
}

impl Backend for Device {
    type Storage = CpuStorage;

    fn name(&self) -> String {
        format!("emulated {:?} with fault {:?}", self.dtype, self.fault)
    }

    fn activation_dtype(&self) -> DType {
        self.dtype
    }

    fn alloc(&self, shape: &[usize], dtype: DType) -> Result<D> {
        let storage_dtype = if dtype.is_float() { DType::F32 } else { dtype };
        Ok(self.wrap(self.cpu.alloc(shape, storage_dtype)?, dtype))
    }

    fn upload(&self, data: HostSlice<'_>, shape: &[usize], dtype: DType) -> Result<D> {
        let t = self.alloc(shape, dtype)?;
        self.write(&t, data)?;
        Ok(t)
    }

    fn write(&self, dst: &D, data: HostSlice<'_>) -> Result<()> {
        self.cpu.write(&c(dst), data)?;
        self.store(dst)
    }

    fn download(&self, src: &D) -> Result<HostVec> {
        let v = self.cpu.download(&c(src))?;
        Ok(match (src.dtype(), v) {
            (DType::BF16, HostVec::F32(v)) => HostVec::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            (DType::F16, HostVec::F32(v)) => HostVec::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            (_, v) => v,
        })
    }

    fn fill(&self, dst: &D, value: f32) -> Result<()> {
        self.cpu.fill(&c(dst), round(dst.dtype(), value))
    }

    fn fill_uniform(&self, dst: &D, fill: &UniformFill) -> Result<()> {
        let (rows, cols, row_stride) = fill.check(dst)?;
        let stride = if self.fault == Fault::FillUniformIgnoresRowStride { cols as u64 } else { row_stride };
        self.write(dst, HostSlice::F32(&fill.host_values(0..rows, cols, stride)))
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn memory_info(&self) -> Result<MemoryInfo> {
        self.cpu.memory_info()
    }

    fn embedding(&self, ids: &D, table: &D, out: &D) -> Result<()> {
        self.cpu.embedding(&c(ids), &c(table), &c(out))?;
        self.store(out)
    }

    fn rms_norm(&self, x: &D, w: &D, eps: f32, out: &D) -> Result<()> {
        let eps = if self.fault == Fault::RmsNormWrongEps { 1e-2 } else { eps };
        self.cpu.rms_norm(&c(x), &c(w), eps, &c(out))?;
        self.store(out)
    }

    fn add_rms_norm(&self, x: &D, residual: &D, w: &D, eps: f32, out: &D) -> Result<()> {
        self.cpu.add_rms_norm(&c(x), &c(residual), &c(w), eps, &c(out))?;
        self.store(residual)?;
        self.store(out)
    }

    fn linear(&self, x: &D, w: &D, bias: Option<&D>, out: &D) -> Result<()> {
        let bias = if self.fault == Fault::LinearDropsBias { None } else { bias.map(c) };
        self.cpu.linear(&c(x), &c(w), bias.as_ref(), &c(out))?;
        self.store(out)
    }

    fn linear_fused(
        &self,
        x: &D,
        w: &D,
        bias: Option<&D>,
        out: &D,
        f: &LinearFusion<'_, Self>,
    ) -> Result<()> {
        let bias = if self.fault == Fault::LinearDropsBias { None } else { bias.map(c) };
        let eps = |eps| if self.fault == Fault::RmsNormWrongEps { 1e-2 } else { eps };
        let norm = f.input_norm.map(|(g, e)| (c(g), eps(e)));
        let fusion = LinearFusion {
            input_norm: norm.as_ref().map(|(g, e)| (g, *e)),
            silu_mul: f.silu_mul,
            accumulate: f.accumulate && self.fault != Fault::FusedLinearOverwrites,
        };
        self.cpu.linear_fused(&c(x), &c(w), bias.as_ref(), &c(out), &fusion)?;
        self.store(out)
    }

    fn rotary_and_cache(&self, a: &RotaryCacheArgs<'_, Self>) -> Result<()> {
        let mut slots = c(a.slot_mapping);
        if self.fault == Fault::WritesSkippedSlots {
            let v: Vec<i64> = self
                .cpu
                .download(&slots)?
                .to_f32()
                .iter()
                .map(|&s| if s < 0.0 { 0 } else { s as i64 })
                .collect();
            slots = self.cpu.upload(HostSlice::I64(&v), &[v.len()], DType::I64)?;
        }
        let style = match (self.fault, a.style) {
            (Fault::WrongRopeStyle, RopeStyle::Neox) => RopeStyle::Interleaved,
            (Fault::WrongRopeStyle, RopeStyle::Interleaved) => RopeStyle::Neox,
            (_, s) => s,
        };
        if a.k_cache.dtype() == DType::F8E4M3 {
            return self.rotary_fp8(a, &slots, style);
        }
        let (qkv, pos, cs, q, k, v) =
            (c(a.qkv), c(a.positions), c(a.cos_sin), c(a.q_out), c(a.k_cache), c(a.v_cache));
        self.cpu.rotary_and_cache(&RotaryCacheArgs {
            qkv: &qkv,
            positions: &pos,
            cos_sin: &cs,
            q_out: &q,
            k_cache: &k,
            v_cache: &v,
            kv_scales: None,
            slot_mapping: &slots,
            num_q_heads: a.num_q_heads,
            num_kv_heads: a.num_kv_heads,
            head_dim: a.head_dim,
            rotary_dim: a.rotary_dim,
            style,
        })?;
        self.store(a.q_out)?;
        self.store(a.k_cache)?;
        self.store(a.v_cache)
    }

    fn attention(&self, a: &AttentionArgs<'_, Self>) -> Result<()> {
        let mut meta = self.cpu_meta(a.meta);
        if self.fault == Fault::AttentionOffByOne {
            let mut host = meta.host.clone();
            for s in 0..host.num_decode_seqs {
                if host.seq_lens[s] > 1 {
                    host.seq_lens[s] -= 1;
                }
            }
            meta = AttentionMetadata::upload(&self.cpu, host)?;
        }
        let (q, k, v, out) = (c(a.q), c(a.k_cache), c(a.v_cache), c(a.out));
        let scales = a.kv_scales.filter(|_| self.fault != Fault::Fp8AttentionIgnoresScales).map(c);
        self.cpu.attention(&AttentionArgs {
            q: &q,
            k_cache: &k,
            v_cache: &v,
            kv_scales: scales.as_ref(),
            out: &out,
            meta: &meta,
            num_q_heads: a.num_q_heads,
            num_kv_heads: a.num_kv_heads,
            head_dim: a.head_dim,
            scale: a.scale,
            sliding_window: a.sliding_window,
        })?;
        self.store(a.out)
    }

    fn silu_and_mul(&self, x: &D, out: &D) -> Result<()> {
        let before = self.cpu.download_f32(&c(out))?;
        self.cpu.silu_and_mul(&c(x), &c(out))?;
        if self.fault == Fault::SiluSkipsLastElement && !before.is_empty() {
            let mut after = self.cpu.download_f32(&c(out))?;
            let last = after.len() - 1;
            after[last] = before[last];
            self.cpu.write(&c(out), HostSlice::F32(&after))?;
        }
        self.store(out)
    }

    fn gather_rows(&self, x: &D, idx: &D, out: &D) -> Result<()> {
        self.cpu.gather_rows(&c(x), &c(idx), &c(out))?;
        self.store(out)
    }

    fn lora_apply(&self, a: &LoraArgs<'_, Self>) -> Result<()> {
        let (x, w, slots, out) = (c(a.x), c(a.a), self.lora_slots(a.token_slots)?, c(a.out));
        let bs: Vec<C> = a.parts.iter().map(|p| c(p.b)).collect();
        let parts: Vec<LoraPart<'_, CpuBackend>> =
            a.parts.iter().zip(&bs).map(|(p, b)| LoraPart { b, out_offset: p.out_offset }).collect();
        self.cpu.lora_apply(&LoraArgs {
            x: &x,
            a: &w,
            parts: &parts,
            token_slots: &slots,
            out: &out,
            groups: None,
        })?;
        self.store(a.out)
    }

    fn fp8_quantize_rows(&self, x: &D, codes: &D, scales: &D) -> Result<()> {
        if self.fault != Fault::Fp8QuantizeRowsPerTensor {
            return fp8_quantize_rows_on_host(self, x, codes, scales);
        }
        let (rows, cols) = check_fp8_quantize_rows("fp8_quantize_rows", x, codes, scales)?;
        let values = self.download_f32(x)?;
        // The whole tensor as one row: one scale, repeated.
        let (host_codes, scale) = fp8_quantize_rows(&values, 1, rows * cols);
        self.write(codes, HostSlice::Bytes(&host_codes, DType::F8E4M3))?;
        self.write(scales, HostSlice::F32(&vec![scale[0]; rows]))
    }

    /// As a 16-bit device: with quantized activations the normed rows are
    /// rounded to the dtype before quantizing (the op's spec), the output is
    /// stored in the dtype.
    fn fp8_linear(&self, a: &Fp8LinearArgs<'_, Self>) -> Result<()> {
        a.check("fp8_linear")?;
        let mode = match (self.fault, a.mode) {
            (Fault::Fp8LinearWrongMode, Fp8LinearMode::WeightOnly) => Fp8LinearMode::QuantizedActivations,
            (Fault::Fp8LinearWrongMode, Fp8LinearMode::QuantizedActivations) => Fp8LinearMode::WeightOnly,
            (_, m) => m,
        };
        let mut x = c(a.x);
        let mut norm = a.fusion.input_norm.map(|(g, e)| (c(g), e));
        if let (Fp8LinearMode::QuantizedActivations, Some((g, eps))) = (mode, &norm) {
            let normed = self.alloc(a.x.dims(), a.x.dtype())?;
            self.cpu.rms_norm(&x, g, *eps, &c(&normed))?;
            self.store(&normed)?;
            x = c(&normed);
            norm = None;
        }
        let fusion = LinearFusion {
            input_norm: norm.as_ref().map(|(g, e)| (g, *e)),
            silu_mul: a.fusion.silu_mul,
            accumulate: a.fusion.accumulate,
        };
        let bias = a.bias.map(c);
        self.cpu.fp8_linear(&Fp8LinearArgs {
            x: &x,
            weight: &c(a.weight),
            weight_scale: &c(a.weight_scale),
            bias: bias.as_ref(),
            out: &c(a.out),
            fusion: &fusion,
            mode,
            input_scale: a.input_scale,
        })?;
        self.store(a.out)
    }

    fn copy_blocks(&self, caches: &[&D], pairs: &[(u32, u32)]) -> Result<()> {
        let mut cpu_caches: Vec<C> = caches.iter().map(|t| c(t)).collect();
        if self.fault == Fault::CopyBlocksFirstCacheOnly {
            cpu_caches.truncate(1);
        }
        let refs: Vec<&C> = cpu_caches.iter().collect();
        self.cpu.copy_blocks(&refs, pairs)
    }

    fn swap_out(&self, cache: &D, host_pool: &mut [u8], pairs: &[(u32, u32)]) -> Result<()> {
        let blocks = cache.dim(0) as u32;
        let pairs: Vec<(u32, u32)> = if self.fault == Fault::SwapOutNextBlock {
            pairs.iter().map(|&(d, h)| ((d + 1) % blocks, h)).collect()
        } else {
            pairs.to_vec()
        };
        if cache.dtype() == DType::F8E4M3 {
            // The reference's pool already holds one code a byte, as a device's does.
            return self.cpu.swap_out(&c(cache), host_pool, &pairs);
        }
        let size = cache.dtype().size_in_bytes();
        let block = cache.shape().row_numel();
        let mut wide = vec![0u8; host_pool.len() / size * 4];
        self.cpu.swap_out(&c(cache), &mut wide, &pairs)?;
        for &(_, h) in &pairs {
            let h = h as usize;
            for i in h * block..(h + 1) * block {
                let x = f32::from_le_bytes([wide[4 * i], wide[4 * i + 1], wide[4 * i + 2], wide[4 * i + 3]]);
                let bytes: Vec<u8> = match cache.dtype() {
                    DType::BF16 => bf16::from_f32(x).to_le_bytes().to_vec(),
                    DType::F16 => f16::from_f32(x).to_le_bytes().to_vec(),
                    _ => x.to_le_bytes().to_vec(),
                };
                host_pool[i * size..(i + 1) * size].copy_from_slice(&bytes);
            }
        }
        Ok(())
    }

    fn swap_in(&self, host_pool: &[u8], cache: &D, pairs: &[(u32, u32)]) -> Result<()> {
        if cache.dtype() == DType::F8E4M3 {
            return self.cpu.swap_in(host_pool, &c(cache), pairs);
        }
        let size = cache.dtype().size_in_bytes();
        let wide: Vec<u8> = host_pool
            .chunks_exact(size)
            .flat_map(|b| {
                let x = match cache.dtype() {
                    DType::BF16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                    DType::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
                    _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                };
                x.to_le_bytes()
            })
            .collect();
        self.cpu.swap_in(&wide, &c(cache), pairs)
    }

    type Graph = pagoda_backend::NoGraph;

    fn capture(&self, _record: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph> {
        Err(BackendError::Unsupported { op: "graph capture", backend: self.name() })
    }

    fn replay(&self, graph: &Self::Graph) -> Result<()> {
        match *graph {}
    }

    type Sampled = CpuSampled;

    fn sample_async(&self, logits: &D, rows: &[SamplingRow<'_>]) -> Result<CpuSampled> {
        let shifted: Vec<SamplingRow<'_>> = rows
            .iter()
            .map(|r| {
                if self.fault == Fault::SampleWrongStep {
                    SamplingRow { step: r.step + 1, ..*r }
                } else {
                    *r
                }
            })
            .collect();
        self.cpu.sample_async(&c(logits), &shifted)
    }

    fn finish_sample(&self, sampled: CpuSampled) -> Result<Vec<SampledToken>> {
        self.cpu.finish_sample(sampled)
    }

    fn feed_sampled_tokens(&self, sampled: &CpuSampled, source_rows: &D, token_ids: &D) -> Result<()> {
        self.cpu.feed_sampled_tokens(sampled, &c(source_rows), &c(token_ids))
    }
}

#[test]
fn emulated_half_precision_devices_pass_within_tolerance() {
    for dtype in [DType::BF16, DType::F16] {
        let report = conformance::run(&Device::new(dtype, Fault::None), &Grid::quick());
        println!("{report}");
        report.assert_all_passed();
        // Rounding to the dtype is visible, and well inside the tolerance.
        let attention = report.max_rel_err("attention").unwrap_or(0.0);
        // Unit roundoff: 8 significant bits for bf16, 11 for f16.
        let unit = if dtype == DType::BF16 { 2f64.powi(-8) } else { 2f64.powi(-11) };
        assert!(attention > 0.05 * unit && attention < unit, "{dtype:?} attention error {attention}");
        // FP8 key codes written from rounded keys: some one step from the
        // reference's, far fewer than the bound allows (see check/rotary.rs).
        let adjacent = report.max_rel_err("rotary_and_cache/k_cache fp8").unwrap_or(0.0);
        assert!(adjacent > 0.0 && adjacent < 1.0 / 16.0, "{dtype:?} adjacent FP8 key codes {adjacent}");
        assert_eq!(report.max_rel_err("rotary_and_cache/v_cache fp8"), Some(0.0));
        // Copies stay exact in any dtype.
        assert_eq!(report.max_rel_err("copy_blocks"), Some(0.0));
        assert_eq!(report.max_rel_err("embedding"), Some(0.0));
    }
}

#[test]
fn every_injected_fault_is_caught_where_it_lives() {
    let cases = [
        (Fault::AttentionOffByOne, vec!["attention"]),
        (Fault::WrongRopeStyle, vec!["rotary_and_cache/q_out", "rotary_and_cache/k_cache"]),
        (Fault::WritesSkippedSlots, vec!["rotary_and_cache/k_cache", "rotary_and_cache/v_cache"]),
        (Fault::LinearDropsBias, vec!["linear", "errors"]), // it also accepts a bias of the wrong length
        (Fault::FusedLinearOverwrites, vec!["linear_fused"]),
        (Fault::RmsNormWrongEps, vec!["rms_norm", "linear_fused"]),
        (Fault::SiluSkipsLastElement, vec!["silu_and_mul"]),
        (Fault::CopyBlocksFirstCacheOnly, vec!["copy_blocks/v"]),
        (Fault::SampleWrongStep, vec!["sample/tokens"]),
        (Fault::SwapOutNextBlock, vec!["swap_out", "swap_in"]),
        (Fault::LoraNoAdapterUsesSlotZero, vec!["lora_apply"]),
        (Fault::Fp8KeyCodesTruncated, vec!["rotary_and_cache/k_cache fp8"]),
        // It also accepts a scale tensor of the wrong shape.
        (Fault::Fp8AttentionIgnoresScales, vec!["attention", "errors"]),
        (Fault::FillUniformIgnoresRowStride, vec!["memory/fill_uniform columns view"]),
        (Fault::Fp8LinearWrongMode, vec!["fp8_linear"]),
        (Fault::Fp8QuantizeRowsPerTensor, vec!["fp8_quantize_rows"]),
    ];
    for (fault, ops) in cases {
        let report = conformance::run(&Device::new(DType::F32, fault), &Grid::quick());
        let failed: Vec<&str> = report.failures().map(|c| c.op.as_str()).collect();
        assert!(!failed.is_empty(), "{fault:?} went unnoticed:\n{report}");
        for op in &failed {
            assert!(
                ops.iter().any(|o| op.starts_with(o)),
                "{fault:?} failed an unrelated check {op}:\n{report}"
            );
        }
        for o in &ops {
            assert!(failed.iter().any(|op| op.starts_with(o)), "{fault:?} not caught by {o}:\n{report}");
        }
    }
}
