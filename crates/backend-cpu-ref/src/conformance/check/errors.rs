//! Bad calls must come back as typed errors: shapes that do not fit an op,
//! and out-of-range indices the host can see (block pairs, sampling rows).
//! Data-dependent checks on device memory (token ids, slots) are not asked
//! of device backends.

use pagoda_backend::{
    AttentionArgs, AttentionHostMetadata, AttentionMetadata, Backend, BackendError, DType, HostSlice,
    LoraArgs, LoraPart, SamplingParams, SamplingRow, Tensor,
};

use crate::conformance::{dev, CheckResult, Harness};

fn is_shape(e: &BackendError) -> bool {
    matches!(e, BackendError::Shape { .. })
}

fn is_index(e: &BackendError) -> bool {
    matches!(e, BackendError::Index { .. })
}

pub(crate) fn run<B: Backend>(h: &mut Harness<'_, B>) {
    h.case("errors", "bad shapes and host indices", |h, _| {
        let d = h.device;
        let act = h.dtype;
        let mut rows = Vec::new();
        let mut expect = |what: &str, got: Result<(), BackendError>, want: fn(&BackendError) -> bool| {
            let (passed, note) = match &got {
                Err(e) if want(e) => (true, String::new()),
                Err(e) => (false, format!("wrong error: {e}")),
                Ok(()) => (false, "accepted".to_string()),
            };
            rows.push(CheckResult {
                op: "errors".into(),
                case: what.to_string(),
                rel_err: if passed { 0.0 } else { 1.0 },
                max_row_err: if passed { 0.0 } else { 1.0 },
                tolerance: 0.0,
                passed,
                note,
            });
        };
        let zeros = |dims: &[usize], dtype: DType| -> Result<_, String> {
            let t = dev(d.alloc(dims, dtype))?;
            dev(d.fill(&t, 0.0))?;
            Ok(t)
        };

        let x = zeros(&[4, 8], act)?;
        let w = zeros(&[6, 9], act)?;
        let out = zeros(&[4, 6], act)?;
        expect("linear: weight K != x K", d.linear(&x, &w, None, &out), is_shape);
        let w_ok = zeros(&[6, 8], act)?;
        let bias = zeros(&[5], act)?;
        expect("linear: bias length", d.linear(&x, &w_ok, Some(&bias), &out), is_shape);
        expect(
            "rms_norm: weight length",
            d.rms_norm(&x, &zeros(&[7], act)?, 1e-5, &zeros(&[4, 8], act)?),
            is_shape,
        );
        let ids = zeros(&[4], DType::I32)?;
        expect(
            "embedding: out width",
            d.embedding(&ids, &zeros(&[10, 8], act)?, &zeros(&[4, 9], act)?),
            is_shape,
        );
        expect("silu_and_mul: out width", d.silu_and_mul(&x, &zeros(&[4, 3], act)?), is_shape);
        let idx = zeros(&[2], DType::I32)?;
        expect("gather_rows: out rows", d.gather_rows(&x, &idx, &zeros(&[3, 8], act)?), is_shape);
        expect(
            "upload: data length",
            d.upload(HostSlice::F32(&[0.0; 5]), &[2, 3], act).map(|_| ()),
            is_shape,
        );

        let cache = zeros(&[4, 1, 2, 8], act)?;
        expect("copy_blocks: block 4 of 4", d.copy_blocks(&[&cache], &[(0, 4)]), is_index);
        let block_bytes = 2 * 8 * act.size_in_bytes();
        let mut pool = vec![0u8; 2 * block_bytes];
        expect("swap_out: host block 2 of 2", d.swap_out(&cache, &mut pool, &[(0, 2)]), is_index);
        expect("swap_in: device block 9 of 4", d.swap_in(&pool, &cache, &[(0, 9)]), is_index);

        let logits = zeros(&[2, 10], DType::F32)?;
        let params = SamplingParams::greedy();
        let row = SamplingRow {
            params: &params,
            seed: 0,
            step: 0,
            prompt_tokens: &[],
            output_tokens: &[],
            allowed_tokens: None,
        };
        expect("sample: 1 row for 2 logit rows", d.sample(&logits, &[row]).map(|_| ()), is_shape);

        let host = AttentionHostMetadata {
            query_start_loc: vec![0, 1],
            seq_lens: vec![1],
            block_tables: vec![0],
            max_blocks_per_seq: 1,
            slot_mapping: vec![0],
            num_decode_seqs: 1,
        };
        let meta = dev(AttentionMetadata::upload(d, host))?;
        let q = zeros(&[1, 16], act)?;
        let attention_over = |out, k_cache, v_cache, kv_scales| {
            d.attention(&AttentionArgs {
                q: &q,
                k_cache,
                v_cache,
                kv_scales,
                out,
                meta: &meta,
                num_q_heads: 2,
                num_kv_heads: 1,
                head_dim: 8,
                scale: 0.35,
                sliding_window: None,
            })
        };
        let short = zeros(&[1, 8], act)?;
        expect("attention: out shape != q shape", attention_over(&short, &cache, &cache, None), is_shape);
        // FP8 caches: both or neither, scales only with them (F32 [2]).
        let fp8_cache = zeros(&[4, 1, 2, 8], DType::F8E4M3)?;
        let (out, scales, scales3) =
            (zeros(&[1, 16], act)?, zeros(&[2], DType::F32)?, zeros(&[3], DType::F32)?);
        let is_dtype = |e: &BackendError| matches!(e, BackendError::DType { .. });
        expect(
            "attention: FP8 K with a V of the activation dtype",
            attention_over(&out, &fp8_cache, &cache, None),
            is_dtype,
        );
        expect(
            "attention: kv_scales without FP8 caches",
            attention_over(&out, &cache, &cache, Some(&scales)),
            is_shape,
        );
        expect(
            "attention: kv_scales of 3",
            attention_over(&out, &fp8_cache, &fp8_cache, Some(&scales3)),
            is_shape,
        );

        let slots = zeros(&[4], DType::I32)?;
        let (a, a_k9) = (zeros(&[2, 2, 4, 8], act)?, zeros(&[2, 2, 4, 9], act)?);
        let (b, b_r5) = (zeros(&[2, 4, 3], act)?, zeros(&[2, 5, 3], act)?);
        let apply = |a, parts: &[(&Tensor<B>, usize)]| {
            let parts: Vec<LoraPart<'_, B>> =
                parts.iter().map(|&(b, out_offset)| LoraPart { b, out_offset }).collect();
            d.lora_apply(&LoraArgs { x: &x, a, parts: &parts, token_slots: &slots, out: &out, groups: None })
        };
        expect("lora_apply: a's K != x's K", apply(&a_k9, &[(&b, 0), (&b, 3)]), is_shape);
        expect("lora_apply: b's R != a's R", apply(&a, &[(&b, 0), (&b_r5, 3)]), is_shape);
        expect("lora_apply: one part for a of two", apply(&a, &[(&b, 0)]), is_shape);
        expect("lora_apply: out_offset + N past O", apply(&a, &[(&b, 0), (&b, 4)]), is_shape);
        expect("lora_apply: parts' columns overlap", apply(&a, &[(&b, 0), (&b, 2)]), is_shape);
        Ok(rows)
    });
}
