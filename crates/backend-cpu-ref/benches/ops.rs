//! CPU reference speed at SmolLM2-135M's shapes (hidden 576, 9 q / 3 kv
//! heads of 64, FFN 1536, vocab 49152, 30 layers).
//!
//! `cargo bench -p pagoda-backend-cpu-ref --bench ops`; add a filter such as
//! `-- decode_step` for one group.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pagoda_backend::{
    AttentionArgs, AttentionHostMetadata, AttentionMetadata, Backend, DType, HostSlice, RopeStyle,
    RotaryCacheArgs, Tensor,
};
use pagoda_backend_cpu_ref::CpuBackend;

const HIDDEN: usize = 576;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const FFN: usize = 1536;
const VOCAB: usize = 49152;
const LAYERS: usize = 30;
const BLOCK: usize = 16;

type T = Tensor<CpuBackend>;

fn random(cpu: &CpuBackend, dims: &[usize], scale: f32, seed: u64) -> T {
    let n: usize = dims.iter().product();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect();
    cpu.upload(HostSlice::F32(&v), dims, DType::F32).expect("upload")
}

fn linear(c: &mut Criterion) {
    let cpu = CpuBackend::new();
    let mut g = c.benchmark_group("linear");
    for (name, k, n) in [("gate_up", HIDDEN, 2 * FFN), ("down", FFN, HIDDEN), ("logits", HIDDEN, VOCAB)] {
        let w = random(&cpu, &[n, k], 0.05, 1);
        for tokens in [1usize, 2, 4, 8, 16, 32, 128, 512] {
            if name == "logits" && tokens > 8 {
                continue;
            }
            let x = random(&cpu, &[tokens, k], 1.0, 2);
            let out = cpu.alloc(&[tokens, n], DType::F32).expect("alloc");
            g.throughput(Throughput::Elements((2 * tokens * k * n) as u64)); // flops
            g.bench_with_input(BenchmarkId::new(name, tokens), &tokens, |b, _| {
                b.iter(|| cpu.linear(&x, &w, None, &out).expect("linear"))
            });
        }
    }
    g.finish();
}

/// One layer's attention inputs for `batch` decodes of `context` tokens each.
struct DecodeAttention {
    q: T,
    k: T,
    v: T,
    out: T,
    meta: AttentionMetadata<CpuBackend>,
}

fn decode_attention(cpu: &CpuBackend, batch: usize, context: usize) -> DecodeAttention {
    let blocks = context.div_ceil(BLOCK);
    let host = AttentionHostMetadata {
        query_start_loc: (0..=batch as i32).collect(),
        seq_lens: vec![context as i32; batch],
        block_tables: (0..(batch * blocks) as i32).collect(),
        max_blocks_per_seq: blocks,
        slot_mapping: vec![-1; batch],
        num_decode_seqs: batch,
    };
    let cache = [batch * blocks, KV_HEADS, BLOCK, HEAD_DIM];
    DecodeAttention {
        q: random(cpu, &[batch, HEADS * HEAD_DIM], 1.0, 3),
        k: random(cpu, &cache, 1.0, 4),
        v: random(cpu, &cache, 1.0, 5),
        out: cpu.alloc(&[batch, HEADS * HEAD_DIM], DType::F32).expect("alloc"),
        meta: AttentionMetadata::upload(cpu, host).expect("meta"),
    }
}

fn attend(cpu: &CpuBackend, a: &DecodeAttention) {
    cpu.attention(&AttentionArgs {
        q: &a.q,
        k_cache: &a.k,
        v_cache: &a.v,
        kv_scales: None,
        out: &a.out,
        meta: &a.meta,
        num_q_heads: HEADS,
        num_kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        scale: 0.125,
        sliding_window: None,
    })
    .expect("attention");
}

fn attention(c: &mut Criterion) {
    let cpu = CpuBackend::new();
    let mut g = c.benchmark_group("attention_decode");
    for (batch, context) in [(1usize, 512usize), (1, 4096), (16, 1024)] {
        let a = decode_attention(&cpu, batch, context);
        // Bytes of K and V read.
        g.throughput(Throughput::Bytes((2 * batch * context * KV_HEADS * HEAD_DIM * 4) as u64));
        g.bench_function(format!("b{batch}_ctx{context}"), |b| b.iter(|| attend(&cpu, &a)));
    }
    g.finish();
}

/// Every op of one SmolLM2-shaped decode step for `batch` sequences at
/// `context` tokens, with random weights: what a generated token costs.
fn decode_step(c: &mut Criterion) {
    let cpu = CpuBackend::new();
    let qkv_width = (HEADS + 2 * KV_HEADS) * HEAD_DIM;
    let layers: Vec<[T; 6]> = (0..LAYERS as u64)
        .map(|l| {
            [
                random(&cpu, &[qkv_width, HIDDEN], 0.05, 10 + l),
                random(&cpu, &[HIDDEN, HEADS * HEAD_DIM], 0.05, 20 + l),
                random(&cpu, &[2 * FFN, HIDDEN], 0.05, 30 + l),
                random(&cpu, &[HIDDEN, FFN], 0.05, 40 + l),
                random(&cpu, &[HIDDEN], 1.0, 50 + l),
                random(&cpu, &[HIDDEN], 1.0, 60 + l),
            ]
        })
        .collect();
    let embed = random(&cpu, &[VOCAB, HIDDEN], 0.05, 7);
    let final_norm = random(&cpu, &[HIDDEN], 1.0, 8);
    let cos_sin = random(&cpu, &[8192, HEAD_DIM], 1.0, 9);
    let mut g = c.benchmark_group("decode_step");
    g.sample_size(10);
    for (batch, context) in [(1usize, 256usize), (8, 256)] {
        let attn = decode_attention(&cpu, batch, context);
        let ids: Vec<i32> = (0..batch as i32).map(|i| i * 7 + 1).collect();
        let ids = cpu.upload(HostSlice::I32(&ids), &[batch], DType::I32).expect("ids");
        let positions = cpu
            .upload(HostSlice::I32(&vec![context as i32 - 1; batch]), &[batch], DType::I32)
            .expect("positions");
        let slots: Vec<i64> =
            (0..batch).map(|i| (i * context.div_ceil(BLOCK) * BLOCK + context - 1) as i64).collect();
        let slots = cpu.upload(HostSlice::I64(&slots), &[batch], DType::I64).expect("slots");
        let act = |w: usize| cpu.alloc(&[batch, w], DType::F32).expect("alloc");
        let (hidden, residual, normed, qkv) = (act(HIDDEN), act(HIDDEN), act(HIDDEN), act(qkv_width));
        let (gate_up, mlp, logits) = (act(2 * FFN), act(FFN), act(VOCAB));
        g.bench_function(format!("b{batch}_ctx{context}"), |b| {
            b.iter(|| {
                cpu.embedding(&ids, &embed, &residual).expect("embedding");
                cpu.fill(&hidden, 0.0).expect("fill");
                for [w_qkv, w_o, w_gate_up, w_down, norm1, norm2] in &layers {
                    cpu.add_rms_norm(&hidden, &residual, norm1, 1e-5, &normed).expect("norm");
                    cpu.linear(&normed, w_qkv, None, &qkv).expect("qkv");
                    cpu.rotary_and_cache(&RotaryCacheArgs {
                        qkv: &qkv,
                        positions: &positions,
                        cos_sin: &cos_sin,
                        q_out: &attn.q,
                        k_cache: &attn.k,
                        v_cache: &attn.v,
                        kv_scales: None,
                        slot_mapping: &slots,
                        num_q_heads: HEADS,
                        num_kv_heads: KV_HEADS,
                        head_dim: HEAD_DIM,
                        rotary_dim: HEAD_DIM,
                        style: RopeStyle::Neox,
                    })
                    .expect("rotary");
                    attend(&cpu, &attn);
                    cpu.linear(&attn.out, w_o, None, &hidden).expect("o_proj");
                    cpu.add_rms_norm(&hidden, &residual, norm2, 1e-5, &normed).expect("norm");
                    cpu.linear(&normed, w_gate_up, None, &gate_up).expect("gate_up");
                    cpu.silu_and_mul(&gate_up, &mlp).expect("silu");
                    cpu.linear(&mlp, w_down, None, &hidden).expect("down");
                }
                cpu.add_rms_norm(&hidden, &residual, &final_norm, 1e-5, &normed).expect("norm");
                cpu.linear(&normed, &embed, None, &logits).expect("logits");
            })
        });
    }
    g.finish();
}

criterion_group!(benches, linear, attention, decode_step);
criterion_main!(benches);
