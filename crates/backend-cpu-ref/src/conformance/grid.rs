//! What a conformance run covers: shapes for every op, as plain data so a
//! device's tests can add their own cases to [`Grid::quick`] or [`Grid::full`].

use pagoda_backend::RopeStyle;
use pagoda_sampler::SamplingParams;

/// The cases of one conformance run. Every field is a list of cases; an empty
/// list skips that family of ops.
#[derive(Clone, Debug)]
pub struct Grid {
    pub name: String,
    /// Seeds every case's inputs (each case also mixes in its own label).
    pub seed: u64,
    /// Element counts for upload / download / write / fill round trips.
    pub memory: Vec<usize>,
    /// embedding, rms_norm, add_rms_norm, silu_and_mul, gather_rows.
    pub rows: Vec<RowsCase>,
    pub linear: Vec<LinearCase>,
    pub rotary: Vec<RotaryCase>,
    pub attention: Vec<AttentionCase>,
    /// copy_blocks and the swap_out / swap_in round trip.
    pub blocks: Vec<BlocksCase>,
    pub sample: Vec<SampleCase>,
    /// lora_apply.
    pub lora: Vec<LoraCase>,
    /// fp8_linear, each case in both modes.
    pub fp8_linear: Vec<Fp8LinearCase>,
    /// Bad shapes and out-of-range host indices must come back as errors.
    pub errors: bool,
}

/// Shapes for the row-wise ops.
#[derive(Clone, Debug)]
pub struct RowsCase {
    pub tokens: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub vocab: usize,
    /// When > 0, inputs and outputs are views `margin` rows into a larger
    /// tensor, and the rows around an output view must stay untouched.
    pub margin: usize,
}

#[derive(Clone, Debug)]
pub struct LinearCase {
    pub tokens: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
    /// The output is F32 whatever the activation dtype (the logits case).
    pub f32_out: bool,
    /// As in [`RowsCase::margin`], for `x` and `out`.
    pub margin: usize,
}

/// One `fp8_linear` shape; each case runs in both modes
/// (`check/fp8_linear.rs`).
#[derive(Clone, Debug)]
pub struct Fp8LinearCase {
    pub tokens: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub bias: bool,
    /// What the layer fuses: input norm, input norm + SiLU-and-mul, or the
    /// residual add (a random residual in `out`).
    pub fusion: Fp8Fusion,
    /// A static activation scale (a checkpoint's `input_scale`) instead of
    /// the dynamic per-row scales, for the quantized mode.
    pub static_input_scale: Option<f32>,
    /// As in [`RowsCase::margin`], for `x` and `out`.
    pub margin: usize,
}

/// The fusions of [`Fp8LinearCase`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Fusion {
    None,
    Norm,
    NormSiluMul,
    Accumulate,
}

impl Fp8LinearCase {
    pub fn label(&self) -> String {
        format!(
            "T{} K{} N{}{} {:?}{}{}",
            self.tokens,
            self.in_features,
            self.out_features,
            if self.bias { " +bias" } else { "" },
            self.fusion,
            self.static_input_scale.map_or(String::new(), |s| format!(" static {s}")),
            if self.margin > 0 { " view" } else { "" },
        )
    }
}

/// The FP8 linear layer over `shapes` (K, N) and `tokens`, the fusion,
/// bias, margin and a static scale cycling so each appears at every size.
fn fp8_linear_cases(shapes: &[(usize, usize)], tokens: &[usize]) -> Vec<Fp8LinearCase> {
    let fusions = [Fp8Fusion::Norm, Fp8Fusion::Accumulate, Fp8Fusion::NormSiluMul, Fp8Fusion::None];
    let mut cases = Vec::new();
    let mut i = 0usize;
    for &(in_features, out_features) in shapes {
        for &t in tokens {
            cases.push(Fp8LinearCase {
                tokens: t,
                in_features,
                out_features,
                bias: i % 3 == 1,
                fusion: fusions[i % fusions.len()],
                // About 0.01: rows of unit size saturate a few codes at ±448.
                static_input_scale: (i % 5 == 2).then_some(0.0078125),
                margin: usize::from(i % 4 == 3),
            });
            i += 1;
        }
    }
    cases
}

#[derive(Clone, Debug)]
pub struct RotaryCase {
    pub tokens: usize,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub style: RopeStyle,
    pub block_size: usize,
    pub num_blocks: usize,
    pub max_positions: usize,
    /// Every `skip_every`-th token gets slot -1 (0: none skipped).
    pub skip_every: usize,
    /// F8E4M3 caches with these scales (K's, V's; see [`Fp8Scales`]);
    /// `None`: caches of the activation dtype.
    pub fp8: Option<Fp8Scales>,
}

/// The K and V scales of an F8E4M3 KV cache case.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fp8Scales {
    /// No scale tensor: both 1.0.
    Unit,
    /// A scale tensor holding `[k, v]`.
    Given(f32, f32),
}

impl Fp8Scales {
    /// `(k, v)`: the values the ops use.
    pub fn values(self) -> (f32, f32) {
        match self {
            Fp8Scales::Unit => (1.0, 1.0),
            Fp8Scales::Given(k, v) => (k, v),
        }
    }

    fn label(fp8: Option<Self>) -> String {
        match fp8 {
            None => String::new(),
            Some(Fp8Scales::Unit) => " fp8".into(),
            Some(Fp8Scales::Given(k, v)) => format!(" fp8 k{k}/v{v}"),
        }
    }
}

/// One sequence of an attention batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqShape {
    /// Context after this step: cached prefix plus this step's queries.
    pub seq_len: usize,
    pub query_len: usize,
}

impl SeqShape {
    pub fn decode(seq_len: usize) -> Self {
        Self { seq_len, query_len: 1 }
    }

    /// `query_len` new tokens after a cached prefix of `cached` tokens.
    pub fn prefill(cached: usize, query_len: usize) -> Self {
        Self { seq_len: cached + query_len, query_len }
    }
}

#[derive(Clone, Debug)]
pub struct AttentionCase {
    pub num_kv_heads: usize,
    /// Query heads per KV head (the GQA ratio).
    pub group: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Decodes first, as the scheduler orders them.
    pub seqs: Vec<SeqShape>,
    pub sliding_window: Option<usize>,
    /// F8E4M3 caches with these scales; `None`: the activation dtype.
    pub fp8: Option<Fp8Scales>,
}

#[derive(Clone, Debug)]
pub struct BlocksCase {
    pub num_blocks: usize,
    pub num_kv_heads: usize,
    pub block_size: usize,
    pub head_dim: usize,
    /// Copy pairs and swapped blocks.
    pub pairs: usize,
    /// F8E4M3 caches (random codes) rather than the activation dtype.
    pub fp8: bool,
}

#[derive(Clone, Debug)]
pub struct SampleCase {
    pub rows: usize,
    pub vocab: usize,
    /// Row `i` uses `params[i % params.len()]`.
    pub params: Vec<SamplingParams>,
    /// Logits in F32 (as `linear` with an F32 output gives) rather than the
    /// activation dtype.
    pub f32_logits: bool,
    /// Prompt and output history per row, for the penalties.
    pub history: usize,
    /// Standard deviation of the random logits.
    pub logit_scale: f32,
}

/// One adapted product's LoRA delta: a shrink over `parts` stacked `A`
/// matrices, then each part's expand into its columns of the base output.
#[derive(Clone, Debug)]
pub struct LoraCase {
    pub tokens: usize,
    /// K, the layer's input width.
    pub in_features: usize,
    /// N of each part.
    pub out_features: usize,
    pub rank: usize,
    /// Parts stacked in one shrink (1 for o/down, 2 for gate/up, 3 for q/k/v).
    pub parts: usize,
    /// Adapter slots resident (S).
    pub slots: usize,
    pub layout: SlotLayout,
    /// Columns of the expand's output on each side of the parts, which it must
    /// leave alone (part `p` starts at column `column_margin + p · N`).
    pub column_margin: usize,
}

/// How the tokens of a [`LoraCase`] are given slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotLayout {
    /// Each token its own random slot or none (-1), as a decode batch of
    /// requests on different adapters; with as many tokens as slots + 1,
    /// every slot and -1 appear.
    Mixed,
    /// Runs of one slot, as prefill chunks: half the tokens on one slot, a
    /// quarter without an adapter, the rest on another slot.
    Runs,
}

impl SlotLayout {
    /// The slot of each of `tokens` tokens, in `-1..slots`.
    pub(crate) fn assign(
        self,
        tokens: usize,
        slots: usize,
        mut draw: impl FnMut(usize) -> usize,
    ) -> Vec<i32> {
        let slots = slots.max(1);
        match self {
            SlotLayout::Mixed if tokens == 1 => vec![draw(slots) as i32],
            SlotLayout::Mixed => {
                let mut v: Vec<i32> = (0..tokens)
                    .map(|t| if t <= slots { t as i32 - 1 } else { draw(slots + 1) as i32 - 1 })
                    .collect();
                for i in (1..tokens).rev() {
                    v.swap(i, draw(i + 1));
                }
                v
            }
            SlotLayout::Runs => {
                let (first, second) = (draw(slots) as i32, draw(slots) as i32);
                (0..tokens)
                    .map(|t| match 4 * t / tokens.max(1) {
                        0 | 1 => first,
                        2 => -1,
                        _ => second,
                    })
                    .collect()
            }
        }
    }
}

impl LoraCase {
    pub fn label(&self) -> String {
        format!(
            "T{} K{} {}x N{} r{} S{} {:?}{}",
            self.tokens,
            self.in_features,
            self.parts,
            self.out_features,
            self.rank,
            self.slots,
            self.layout,
            if self.column_margin > 0 { format!(" margin{}", self.column_margin) } else { String::new() },
        )
    }
}

impl AttentionCase {
    pub fn label(&self) -> String {
        let decodes = self.seqs.iter().take_while(|s| s.query_len == 1).count();
        let prefills = self.seqs.len() - decodes;
        let max_len = self.seqs.iter().map(|s| s.seq_len).max().unwrap_or(0);
        let tokens: usize = self.seqs.iter().map(|s| s.query_len).sum();
        let window = self.sliding_window.map(|w| format!(" win{w}")).unwrap_or_default();
        format!(
            "D{} {}q/{}kv bs{} {}dec+{}pre T{} ctx<={}{}{}",
            self.head_dim,
            self.num_kv_heads * self.group,
            self.num_kv_heads,
            self.block_size,
            decodes,
            prefills,
            tokens,
            max_len,
            window,
            Fp8Scales::label(self.fp8),
        )
    }
}

impl RowsCase {
    pub fn label(&self) -> String {
        let view = if self.margin > 0 { " view" } else { "" };
        format!("T{} H{} I{} V{}{}", self.tokens, self.hidden, self.intermediate, self.vocab, view)
    }
}

impl LinearCase {
    pub fn label(&self) -> String {
        format!(
            "T{} K{} N{}{}{}{}",
            self.tokens,
            self.in_features,
            self.out_features,
            if self.bias { " +bias" } else { "" },
            if self.f32_out { " f32-out" } else { "" },
            if self.margin > 0 { " view" } else { "" },
        )
    }
}

impl RotaryCase {
    pub fn label(&self) -> String {
        format!(
            "T{} {}q/{}kv D{} rot{} {:?} bs{}{}",
            self.tokens,
            self.num_q_heads,
            self.num_kv_heads,
            self.head_dim,
            self.rotary_dim,
            self.style,
            self.block_size,
            Fp8Scales::label(self.fp8),
        )
    }
}

impl BlocksCase {
    pub fn label(&self) -> String {
        format!(
            "{} blocks {}kv bs{} D{} {} pairs{}",
            self.num_blocks,
            self.num_kv_heads,
            self.block_size,
            self.head_dim,
            self.pairs,
            if self.fp8 { " fp8" } else { "" }
        )
    }
}

impl SampleCase {
    pub fn label(&self) -> String {
        let kinds: Vec<String> = self.params.iter().map(describe_params).collect();
        format!(
            "{}x{} {} {}",
            self.rows,
            self.vocab,
            if self.f32_logits { "f32" } else { "act" },
            kinds.join("|")
        )
    }
}

fn describe_params(p: &SamplingParams) -> String {
    let mut parts = Vec::new();
    if p.is_greedy() {
        parts.push("greedy".to_string());
    } else {
        parts.push(format!("t{}", p.temperature));
    }
    if p.top_k > 0 {
        parts.push(format!("k{}", p.top_k));
    }
    if p.top_p < 1.0 {
        parts.push(format!("p{}", p.top_p));
    }
    if p.min_p > 0.0 {
        parts.push(format!("minp{}", p.min_p));
    }
    if p.has_penalties() {
        parts.push("pen".to_string());
    }
    if let Some(n) = p.logprobs {
        parts.push(format!("lp{n}"));
    }
    parts.join(",")
}

/// The sampling mixes both grids use: greedy, plain and truncated seeded
/// sampling, penalties, and logprobs.
fn sampling_mixes() -> Vec<Vec<SamplingParams>> {
    let greedy = SamplingParams::greedy();
    let seeded = SamplingParams { temperature: 0.8, ..Default::default() };
    let truncated =
        SamplingParams { temperature: 1.0, top_k: 40, top_p: 0.9, min_p: 0.02, ..Default::default() };
    let penalised = SamplingParams {
        temperature: 0.7,
        repetition_penalty: 1.3,
        frequency_penalty: 0.5,
        presence_penalty: 0.4,
        ..Default::default()
    };
    let greedy_penalised =
        SamplingParams { repetition_penalty: 1.2, presence_penalty: -0.5, ..greedy.clone() };
    let with_logprobs =
        SamplingParams { temperature: 1.2, top_p: 0.95, logprobs: Some(5), ..Default::default() };
    let greedy_logprobs = SamplingParams { logprobs: Some(20), ..greedy.clone() };
    vec![
        vec![greedy.clone()],
        vec![seeded, truncated.clone()],
        vec![penalised, greedy_penalised],
        vec![with_logprobs, greedy_logprobs, truncated],
    ]
}

impl Grid {
    /// Small shapes covering every op and every variant (GQA, both RoPE
    /// styles, unaligned lengths, cached prefixes, mixed batches, windows,
    /// views); runs in seconds on the CPU.
    pub fn quick() -> Self {
        let attention = [
            AttentionCase {
                num_kv_heads: 3,
                group: 3,
                head_dim: 64,
                block_size: 16,
                seqs: vec![SeqShape::decode(1), SeqShape::decode(17), SeqShape::decode(100)],
                sliding_window: None,
                fp8: None,
            },
            AttentionCase {
                num_kv_heads: 2,
                group: 4,
                head_dim: 128,
                block_size: 32,
                seqs: vec![SeqShape::prefill(0, 40), SeqShape::prefill(45, 30)],
                sliding_window: None,
                fp8: None,
            },
            AttentionCase {
                num_kv_heads: 1,
                group: 8,
                head_dim: 64,
                block_size: 16,
                seqs: vec![
                    SeqShape::decode(33),
                    SeqShape::decode(1),
                    SeqShape::prefill(15, 5),
                    SeqShape::prefill(0, 9),
                ],
                sliding_window: None,
                fp8: None,
            },
            AttentionCase {
                num_kv_heads: 4,
                group: 1,
                head_dim: 64,
                block_size: 16,
                seqs: vec![SeqShape::decode(70), SeqShape::prefill(20, 19)],
                sliding_window: Some(24),
                fp8: None,
            },
            AttentionCase {
                num_kv_heads: 2,
                group: 2,
                head_dim: 128,
                block_size: 16,
                seqs: vec![SeqShape::decode(1500)],
                sliding_window: None,
                fp8: None,
            },
        ];
        // The FP8 cache: the decode, prefill, mixed (group 8) and long split-K
        // cases again over F8E4M3 caches, with scales and without.
        let fp8 = [
            (0, Fp8Scales::Given(0.05, 0.021)),
            (1, Fp8Scales::Given(0.1, 0.03)),
            (2, Fp8Scales::Unit),
            (3, Fp8Scales::Given(0.013, 0.2)),
            (4, Fp8Scales::Given(0.02, 0.011)),
        ];
        // And a group of 16 query heads per KV head (its decodes take the prefill kernel).
        let wide = AttentionCase {
            num_kv_heads: 2,
            group: 16,
            head_dim: 128,
            block_size: 16,
            seqs: vec![SeqShape::decode(300), SeqShape::decode(77), SeqShape::prefill(50, 40)],
            sliding_window: None,
            fp8: Some(Fp8Scales::Given(0.04, 0.03)),
        };
        let attention = attention
            .iter()
            .cloned()
            .chain(fp8.map(|(i, scales)| AttentionCase { fp8: Some(scales), ..attention[i].clone() }))
            .chain([wide])
            .collect();
        let mixes = sampling_mixes();
        Grid {
            name: "quick".into(),
            seed: 0x5eed_0001,
            memory: vec![1, 1000, 4097],
            rows: vec![
                RowsCase { tokens: 1, hidden: 64, intermediate: 96, vocab: 100, margin: 0 },
                RowsCase { tokens: 7, hidden: 576, intermediate: 1536, vocab: 1000, margin: 2 },
                RowsCase { tokens: 33, hidden: 128, intermediate: 64, vocab: 50, margin: 0 },
            ],
            linear: vec![
                LinearCase {
                    tokens: 1,
                    in_features: 64,
                    out_features: 96,
                    bias: false,
                    f32_out: false,
                    margin: 0,
                },
                LinearCase {
                    tokens: 3,
                    in_features: 130,
                    out_features: 67,
                    bias: true,
                    f32_out: false,
                    margin: 1,
                },
                LinearCase {
                    tokens: 17,
                    in_features: 64,
                    out_features: 200,
                    bias: true,
                    f32_out: true,
                    margin: 0,
                },
                LinearCase {
                    tokens: 64,
                    in_features: 256,
                    out_features: 128,
                    bias: false,
                    f32_out: false,
                    margin: 0,
                },
                LinearCase {
                    tokens: 2,
                    in_features: 64,
                    out_features: 1000,
                    bias: false,
                    f32_out: true,
                    margin: 0,
                },
                // The tensor-core GEMV's shapes (k a multiple of 32, 2-16 rows):
                // one and two N tiles, output rows not a multiple of 16, and a
                // k range that does not split evenly over its 8 warps.
                LinearCase {
                    tokens: 5,
                    in_features: 320,
                    out_features: 200,
                    bias: true,
                    f32_out: false,
                    margin: 1,
                },
                LinearCase {
                    tokens: 12,
                    in_features: 96,
                    out_features: 67,
                    bias: true,
                    f32_out: false,
                    margin: 0,
                },
                LinearCase {
                    tokens: 16,
                    in_features: 576,
                    out_features: 136,
                    bias: false,
                    f32_out: true,
                    margin: 0,
                },
            ],
            rotary: with_fp8_rotary(vec![
                RotaryCase {
                    tokens: 5,
                    num_q_heads: 4,
                    num_kv_heads: 2,
                    head_dim: 64,
                    rotary_dim: 64,
                    style: RopeStyle::Neox,
                    block_size: 16,
                    num_blocks: 8,
                    max_positions: 256,
                    skip_every: 3,
                    fp8: None,
                },
                RotaryCase {
                    tokens: 9,
                    num_q_heads: 6,
                    num_kv_heads: 2,
                    head_dim: 128,
                    rotary_dim: 64,
                    style: RopeStyle::Interleaved,
                    block_size: 32,
                    num_blocks: 4,
                    max_positions: 64,
                    skip_every: 0,
                    fp8: None,
                },
                RotaryCase {
                    tokens: 1,
                    num_q_heads: 9,
                    num_kv_heads: 3,
                    head_dim: 64,
                    rotary_dim: 64,
                    style: RopeStyle::Neox,
                    block_size: 16,
                    num_blocks: 3,
                    max_positions: 8192,
                    skip_every: 0,
                    fp8: None,
                },
                RotaryCase {
                    tokens: 17,
                    num_q_heads: 8,
                    num_kv_heads: 2,
                    head_dim: 128,
                    rotary_dim: 128,
                    style: RopeStyle::Interleaved,
                    block_size: 16,
                    num_blocks: 4,
                    max_positions: 512,
                    skip_every: 5,
                    fp8: None,
                },
            ]),
            attention,
            // The same copies over a bf16/f16 cache and over an FP8 one.
            blocks: [false, true]
                .map(|fp8| BlocksCase {
                    num_blocks: 8,
                    num_kv_heads: 2,
                    block_size: 16,
                    head_dim: 64,
                    pairs: 3,
                    fp8,
                })
                .to_vec(),
            sample: mixes
                .into_iter()
                .enumerate()
                .map(|(i, params)| SampleCase {
                    rows: 6,
                    vocab: 1000,
                    params,
                    f32_logits: i % 2 == 0,
                    history: 12,
                    logit_scale: 3.0,
                })
                .chain([(1usize, 50_000usize, true), (3, 32_000, false)].map(|(rows, vocab, f32_logits)| {
                    // Greedy-only rows long enough to be split across blocks.
                    SampleCase {
                        rows,
                        vocab,
                        params: vec![SamplingParams::greedy()],
                        f32_logits,
                        history: 0,
                        logit_scale: 3.0,
                    }
                }))
                .collect(),
            lora: quick_lora(),
            // Decode (1, 2, 7, 16: weight-streaming sizes) and prefill (17, 64)
            // at SmolLM2's widths, and an odd K for the devices' unaligned paths.
            fp8_linear: fp8_linear_cases(&[(576, 1536), (1536, 576), (96, 40)], &[1, 2, 7, 16, 17, 64]),
            errors: true,
        }
    }

    /// The grid: batch 1..256, context 1..8k, head dims 64/128, GQA
    /// ratios 1/3/4/8, block sizes 16/32, unaligned lengths, prefill with a
    /// cached prefix and chunked prefill, decode+prefill mixes, and
    /// Llama-3-8B / SmolLM2 sized dense ops. Minutes on a many-core host.
    pub fn full() -> Self {
        let mut rng = GridRng(0xf011_9121);
        let mut attention = Vec::new();
        // (GQA ratio, kv heads): SmolLM2 (9/3), Llama-3-8B (32/8), 32/4, MHA 8/8.
        let head_layouts = [(1usize, 8usize), (3, 3), (4, 8), (8, 4)];
        let mut variant = 0usize;
        for head_dim in [64usize, 128] {
            for &(group, num_kv_heads) in &head_layouts {
                for block_size in [16usize, 32] {
                    let case = |seqs: Vec<SeqShape>| AttentionCase {
                        num_kv_heads,
                        group,
                        head_dim,
                        block_size,
                        seqs,
                        sliding_window: None,
                        fp8: None,
                    };
                    // Decode-only: the batch size cycles over 1..256, with
                    // contexts bounded so the cache stays near 64k tokens.
                    let (batch, max_ctx) = [(1, 8192), (16, 8000), (64, 2000), (256, 500)][variant % 4];
                    let mut seqs: Vec<SeqShape> =
                        (0..batch).map(|_| SeqShape::decode(1 + rng.below(max_ctx))).collect();
                    if batch == 1 {
                        seqs[0] = SeqShape::decode(8192 - variant % 3); // long: split-K territory
                    }
                    attention.push(case(seqs));
                    // Prefill-only: a fresh unaligned prompt and a chunk after a cached prefix.
                    attention.push(case(vec![
                        SeqShape::prefill(0, 100 + rng.below(300)),
                        SeqShape::prefill(1 + rng.below(3000), 1 + rng.below(256)),
                    ]));
                    // Mixed: decodes first, then chunked and fresh prefills.
                    let mut mixed: Vec<SeqShape> =
                        (0..1 + rng.below(40)).map(|_| SeqShape::decode(1 + rng.below(3000))).collect();
                    mixed.push(SeqShape::prefill(rng.below(2000), 1 + rng.below(200)));
                    mixed.push(SeqShape::prefill(0, 1 + rng.below(64)));
                    attention.push(case(mixed));
                    variant += 1;
                }
            }
        }
        // Long chunked prefill at the end of an 8k context, and sliding windows (Mistral).
        attention.push(AttentionCase {
            num_kv_heads: 8,
            group: 4,
            head_dim: 128,
            block_size: 16,
            seqs: vec![SeqShape::prefill(8192 - 512, 512)],
            sliding_window: None,
            fp8: None,
        });
        attention.push(AttentionCase {
            num_kv_heads: 8,
            group: 4,
            head_dim: 128,
            block_size: 16,
            seqs: vec![SeqShape::decode(8000), SeqShape::decode(3000), SeqShape::prefill(5000, 300)],
            sliding_window: Some(4096),
            fp8: None,
        });
        attention.push(AttentionCase {
            num_kv_heads: 3,
            group: 3,
            head_dim: 64,
            block_size: 32,
            seqs: vec![SeqShape::decode(700), SeqShape::prefill(50, 200)],
            sliding_window: Some(100),
            fp8: None,
        });

        // The FP8 cache over every fourth case (each head layout, block size
        // and batch kind appears), scales varying.
        let fp8: Vec<AttentionCase> = attention
            .iter()
            .step_by(4)
            .enumerate()
            .map(|(i, c)| {
                let scales = [Fp8Scales::Given(0.05, 0.02), Fp8Scales::Unit, Fp8Scales::Given(0.0071, 0.3)];
                AttentionCase { fp8: Some(scales[i % 3]), ..c.clone() }
            })
            .collect();
        attention.extend(fp8);

        let mut rows = Vec::new();
        for (i, &tokens) in [1usize, 7, 64, 256, 1000].iter().enumerate() {
            rows.push(RowsCase { tokens, hidden: 576, intermediate: 1536, vocab: 49152, margin: i % 2 });
            rows.push(RowsCase { tokens, hidden: 4096, intermediate: 14336, vocab: 32000, margin: 0 });
        }

        let mut linear = Vec::new();
        for tokens in [1usize, 5, 7, 16, 64, 256] {
            // SmolLM2 qkv with a Qwen2-style bias, o_proj, gate_up, down.
            linear.push(LinearCase {
                tokens,
                in_features: 576,
                out_features: 960,
                bias: true,
                f32_out: false,
                margin: 0,
            });
            linear.push(LinearCase {
                tokens,
                in_features: 1536,
                out_features: 576,
                bias: false,
                f32_out: false,
                margin: 1,
            });
            // Llama-3-8B qkv and down projections.
            linear.push(LinearCase {
                tokens,
                in_features: 4096,
                out_features: 6144,
                bias: false,
                f32_out: false,
                margin: 0,
            });
            linear.push(LinearCase {
                tokens,
                in_features: 14336,
                out_features: 4096,
                bias: false,
                f32_out: false,
                margin: 0,
            });
        }
        for tokens in [1usize, 256] {
            linear.push(LinearCase {
                tokens,
                in_features: 576,
                out_features: 49152,
                bias: false,
                f32_out: true,
                margin: 0,
            });
            linear.push(LinearCase {
                tokens,
                in_features: 4096,
                out_features: 28672,
                bias: false,
                f32_out: false,
                margin: 0,
            });
        }
        linear.push(LinearCase {
            tokens: 333,
            in_features: 1000,
            out_features: 1001,
            bias: true,
            f32_out: true,
            margin: 2,
        });

        let mut rotary = Vec::new();
        for (i, &tokens) in [1usize, 64, 256, 1000].iter().enumerate() {
            let style = if i % 2 == 0 { RopeStyle::Neox } else { RopeStyle::Interleaved };
            rotary.push(RotaryCase {
                tokens,
                num_q_heads: 32,
                num_kv_heads: 8,
                head_dim: 128,
                rotary_dim: 128,
                style,
                block_size: 16,
                num_blocks: tokens.div_ceil(16) + 64,
                max_positions: 8192,
                skip_every: 7,
                fp8: None,
            });
            rotary.push(RotaryCase {
                tokens,
                num_q_heads: 9,
                num_kv_heads: 3,
                head_dim: 64,
                rotary_dim: if i % 2 == 0 { 64 } else { 32 },
                style: if i % 2 == 0 { RopeStyle::Interleaved } else { RopeStyle::Neox },
                block_size: 32,
                num_blocks: tokens.div_ceil(32) + 16,
                max_positions: 8192,
                skip_every: 0,
                fp8: None,
            });
        }

        let rotary = with_fp8_rotary(rotary);

        let mut sample = Vec::new();
        for (i, params) in sampling_mixes().into_iter().enumerate() {
            for (rows, vocab) in [(1usize, 49152usize), (64, 32000), (256, 128_256)] {
                sample.push(SampleCase {
                    rows,
                    vocab,
                    params: params.clone(),
                    f32_logits: (i + rows) % 2 == 0,
                    history: 64,
                    logit_scale: 4.0,
                });
            }
        }

        Grid {
            name: "full".into(),
            seed: 0x5eed_f011,
            memory: vec![1, 4097, 1 << 20],
            rows,
            linear,
            rotary,
            attention,
            blocks: vec![
                BlocksCase {
                    num_blocks: 256,
                    num_kv_heads: 8,
                    block_size: 16,
                    head_dim: 128,
                    pairs: 32,
                    fp8: false,
                },
                BlocksCase {
                    num_blocks: 100,
                    num_kv_heads: 3,
                    block_size: 32,
                    head_dim: 64,
                    pairs: 17,
                    fp8: false,
                },
                BlocksCase {
                    num_blocks: 256,
                    num_kv_heads: 8,
                    block_size: 16,
                    head_dim: 128,
                    pairs: 32,
                    fp8: true,
                },
            ],
            sample,
            lora: full_lora(),
            // SmolLM2 (576, 1536) and Llama-3-8B (4096, 14336) projections: qkv/o
            // and gate_up/down at each width, T from decode to a prefill chunk.
            fp8_linear: fp8_linear_cases(
                &[(576, 1536), (1536, 576), (4096, 4096), (4096, 14336), (14336, 4096)],
                &[1, 2, 7, 16, 17, 64, 300],
            ),
            errors: true,
        }
    }
}

/// `cases`, then each again writing F8E4M3 caches, the scales cycling over a
/// K scale small enough that rotated keys saturate at ±448 (1/250 of keys of
/// unit size: about 7% of them), no scale tensor (1.0), and moderate ones.
fn with_fp8_rotary(cases: Vec<RotaryCase>) -> Vec<RotaryCase> {
    let scales = [Fp8Scales::Given(0.004, 0.37), Fp8Scales::Unit, Fp8Scales::Given(0.03, 0.021)];
    let fp8: Vec<RotaryCase> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| RotaryCase { fp8: Some(scales[i % scales.len()]), ..c.clone() })
        .collect();
    cases.into_iter().chain(fp8).collect()
}

/// Decode (1-16 tokens, mixed slots) and prefill (300 tokens, runs or mixed)
/// on SmolLM2 and 8B widths, ranks 8 to 64, one to three parts; then odd
/// shapes (K not a multiple of 8, a rank not a multiple of 8, odd N) that
/// devices serve off their vectorised paths.
fn quick_lora() -> Vec<LoraCase> {
    use SlotLayout::{Mixed, Runs};
    [
        (1usize, 576usize, 192usize, 8usize, 3usize, 4usize, Mixed, 0usize),
        (3, 4096, 4096, 16, 1, 16, Mixed, 3),
        (16, 576, 576, 64, 2, 8, Mixed, 1),
        (16, 4096, 192, 16, 3, 4, Runs, 0),
        (300, 576, 4096, 16, 1, 3, Runs, 2),
        (300, 4096, 576, 8, 2, 16, Mixed, 0),
        (300, 576, 192, 64, 3, 2, Runs, 1),
        // A decode batch over 16 adapters (an 8B model's k/v part), and the down projection's K.
        (256, 4096, 1024, 16, 3, 16, Mixed, 0),
        (64, 14336, 576, 16, 1, 16, Mixed, 1),
        (3, 100, 67, 24, 2, 3, Mixed, 1),
        (5, 64, 33, 5, 1, 2, Mixed, 2),
    ]
    .into_iter()
    .map(|(tokens, in_features, out_features, rank, parts, slots, layout, column_margin)| LoraCase {
        tokens,
        in_features,
        out_features,
        rank,
        parts,
        slots,
        layout,
        column_margin,
    })
    .collect()
}

/// Every token count {1, 3, 16, 300} against K {576, 4096} and N {192, 576,
/// 4096, 14336}, the rank cycling over {8, 16, 64} and the parts over 1..3;
/// slots mixed for decode sizes, runs and mixed alternating for 300 tokens;
/// and the down projection's K = 14336.
fn full_lora() -> Vec<LoraCase> {
    let mut cases = Vec::new();
    let mut i = 0usize;
    for tokens in [1usize, 3, 16, 300] {
        for in_features in [576usize, 4096] {
            for out_features in [192usize, 576, 4096, 14336] {
                let layout = if tokens >= 16 && i % 2 == 1 { SlotLayout::Runs } else { SlotLayout::Mixed };
                cases.push(LoraCase {
                    tokens,
                    in_features,
                    out_features,
                    rank: [8, 16, 64][i % 3],
                    parts: 1 + (i / 3) % 3,
                    slots: [16, 4, 1][(i / 9) % 3],
                    layout,
                    column_margin: i % 4,
                });
                i += 1;
            }
        }
    }
    for (tokens, layout) in [(1, SlotLayout::Mixed), (300, SlotLayout::Runs)] {
        cases.push(LoraCase {
            tokens,
            in_features: 14336,
            out_features: 4096,
            rank: 16,
            parts: 1,
            slots: 16,
            layout,
            column_margin: 0,
        });
    }
    cases
}

/// A tiny generator for choosing the full grid's lengths reproducibly.
struct GridRng(u64);

impl GridRng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % n.max(1) as u64) as usize
    }
}
