#!/usr/bin/env python3
"""The independent oracle for Pagoda's CUDA path (issue 15): Hugging Face transformers,
run greedily on a fixed prompt set, written as JSON for the Rust side to compare with
(tests/oracle/mod.rs, run by tests/cuda_model.rs on the GPU and tests/oracle_cpu.rs on the CPU).

For every prompt and every one of --max-tokens greedy steps (EOS ignored) it records the
chosen token, its logprob, the top --top (token, logprob) pairs, and, for the bound the
Rust side derives, the first-order sensitivity of that logprob to a rounding of every
intermediate value of the forward pass (below). Nothing here looks at Pagoda.

Checks (--checks, comma-separated):
  bf16  transformers in bfloat16 (SDPA flash/efficient attention, f32 accumulation in every
        matmul: PyTorch's reduced-precision bf16 reductions are turned off). Pagoda bf16 is
        compared with it. Both round the same f32 weights to bf16 (round to nearest even), so
        their weights are identical and only the arithmetic differs.
  f16   transformers in float32 (eager attention, TF32 off) on the weights rounded to float16
        and back, i.e. on exactly the weights Pagoda's f16 path holds. Pagoda f16 is compared
        with it. (The CUDA backend has no f32 attention, so f16 is its high-precision path.)
  f32   transformers in float32 on the weights as they are: the CPU reference backend's
        dry run of the whole flow (tests/oracle_cpu.rs).

Sensitivities. An engine that stores a tensor x in a format of unit roundoff u (bf16 2^-8,
f16 2^-11, f32 2^-24) replaces each element x_i by x_i (1 + d_i), |d_i| <= u. To first order
a logprob lp moves by sum_i (dlp/dx_i) x_i d_i. This script computes, per position t and per
class c of intermediate value (the names in CLASSES), S_c(t) = sqrt(sum over every tensor of
class c, every layer and every earlier token, of (dlp_t/dx_i * x_i)^2), by autograd through
a plain float32 re-implementation of the Llama forward pass (`forward_probed`), checked here
against transformers' own float32 logprobs. The Rust side turns S into a bound with the
unit roundoffs and rounding counts of each engine. A table shared by every layer (the rotary
cos/sin) gets one probe, so its sensitivity sums over layers before squaring: a rounding of
it is the same in every layer.

Usage (the GPU machine has torch and transformers; carry the gguf wheel for a .gguf model):
  python3 scripts/gpu/oracle.py --model models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
      --prompts tests/fixtures/oracle/smollm2_prompts.json --checks bf16,f16 --out /tmp/oracle.json
  python3 scripts/gpu/oracle.py --model /tmp/llama3-8b-random --random-prompts 16,32,64,96,128,160 \
      --checks bf16,f16 --out /tmp/oracle8b.json
  python3 scripts/gpu/oracle.py --write-prompts tests/fixtures/oracle/smollm2_prompts.json --model ...gguf
"""

import argparse
import json
import math
import os
import random
import sys
import time

# Every kind of intermediate value the forward pass stores; tests/oracle/mod.rs knows the same
# names and how often each engine rounds each.
CLASSES = [
    "norm_hat", "norm_out", "q", "k", "v", "rope_table", "rope_mul", "rope_out", "scores",
    "probs", "attn", "o_proj", "residual", "gate", "up", "silu", "act", "down", "logits",
]

# The fixed SmolLM2 prompt set: the six prompts of tests/fixtures/smollm2/golden.json, then ten
# more. (kind, text or messages)
PROMPTS = [
    ("plain", "The capital of France is"),
    ("plain", "def fibonacci(n):\n    "),
    ("plain", "Once upon a time, in a small village,"),
    ("chat", [{"role": "user", "content": "What is the capital of France?"}]),
    ("chat", [{"role": "system", "content": "You are a concise assistant."},
              {"role": "user", "content": "List three primary colors."}]),
    ("chat", [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help you today?"},
              {"role": "user", "content": "Write a haiku about the sea."}]),
    ("plain", "The three laws of thermodynamics are"),
    ("plain", "def quicksort(arr):\n"),
    ("plain", "In 1969, Neil Armstrong"),
    ("plain", "A recipe for pancakes:\n1."),
    ("plain", "Photosynthesis is the process by which"),
    ("chat", [{"role": "user", "content": "Explain what a hash table is in two sentences."}]),
    ("chat", [{"role": "user", "content": "Write a Python function that reverses a string."}]),
    ("chat", [{"role": "user", "content": "What is 17 times 23?"}]),
    ("chat", [{"role": "user", "content": "Give me three tips for sleeping better."}]),
    ("chat", [{"role": "system", "content": "You answer in French."},
              {"role": "user", "content": "How are you today?"}]),
]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a .gguf file or a Hugging Face model folder")
    ap.add_argument("--prompts", help="JSON with prompts[].prompt_ids (tests/fixtures/oracle/...)")
    ap.add_argument("--random-prompts", help="comma-separated prompt lengths of random token ids")
    ap.add_argument("--seed", type=int, default=0, help="seed of --random-prompts")
    ap.add_argument("--limit", type=int, help="only the first N prompts")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--checks", default="bf16,f16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", help="the JSON to write")
    ap.add_argument("--write-prompts", help="tokenize PROMPTS with the GGUF's tokenizer into this fixture, then exit")
    return ap.parse_args()


def log(msg):
    print(msg, flush=True)


# ----------------------------------------------------------------------------- loading


def from_pretrained(path, dtype, attn):
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=dtype, attn_implementation=attn)
    if path.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(path))
        return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def load(args, dtype, attn):
    import torch

    t0 = time.time()
    model = from_pretrained(args.model, dtype, attn).to(args.device).eval()
    model.requires_grad_(False)
    cfg = model.config
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(cfg, flag, False):
            sys.exit(f"oracle.py: {flag} is set; forward_probed has no biases")
    rope_type = (getattr(cfg, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        sys.exit(f"oracle.py: rope type {rope_type}: forward_probed knows only the default rotary embedding")
    rot = model.model.rotary_emb
    if rot.inv_freq.dtype != torch.float32:
        # A bf16 inv_freq would shift every angle by up to 2^-8 of itself: not what we test.
        log(f"note: inv_freq was {rot.inv_freq.dtype}; recomputed in float32")
        dim = rot.inv_freq.numel() * 2
        base = float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"])
        rot.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=args.device) / dim))
    log(f"loaded {args.model} as {dtype} ({attn}) in {time.time() - t0:.1f} s")
    return model


def prompt_set(args, vocab):
    if args.random_prompts:
        rng = random.Random(args.seed)
        lens = [int(x) for x in args.random_prompts.split(",")]
        prompts = [[rng.randrange(10, vocab - 10) for _ in range(n)] for n in lens]
    else:
        with open(args.prompts) as f:
            prompts = [p["prompt_ids"] for p in json.load(f)["prompts"]]
    return prompts[: args.limit] if args.limit else prompts


# ----------------------------------------------------------------------------- greedy


def greedy(model, prompt, max_tokens, top):
    """transformers' own forward with its KV cache, one token a step; argmax of the logits
    (the first index on a tie), logprobs as the float32 log-softmax of those logits."""
    import torch

    dev = model.device
    tokens, logprobs, tops = [], [], []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt], device=dev), use_cache=True)
        for step in range(max_tokens):
            logits = out.logits[0, -1].float()
            lsm = torch.log_softmax(logits, dim=-1)
            tok = int(torch.argmax(logits))
            vals, ids = torch.topk(lsm, top)
            tokens.append(tok)
            logprobs.append(float(lsm[tok]))
            tops.append([[int(i), float(v)] for i, v in zip(ids.tolist(), vals.tolist())])
            if step + 1 < max_tokens:
                out = model(input_ids=torch.tensor([[tok]], device=dev), past_key_values=out.past_key_values,
                            use_cache=True)
    return tokens, logprobs, tops


def teacher_forced(model, prompt, tokens):
    """transformers' float32 logprobs of `tokens` after `prompt`, one forward pass."""
    import torch

    seq = prompt + tokens[:-1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq], device=model.device)).logits[0].float()
    rows = torch.arange(len(prompt) - 1, len(seq), device=logits.device)
    lsm = torch.log_softmax(logits[rows], dim=-1)
    return lsm[torch.arange(len(tokens), device=logits.device), torch.tensor(tokens, device=logits.device)].tolist()


# ----------------------------------------------------------------------------- sensitivities


class Probes:
    """Marks intermediate values: `probe(cls, x)` returns x + 0 through a zero tensor that
    requires grad, so d(out)/d(probe) = d(out)/dx, and keeps x for the products g * x."""

    def __init__(self):
        self.items = []

    def __call__(self, cls, x):
        import torch

        assert cls in CLASSES, cls
        p = torch.zeros_like(x, requires_grad=True)
        self.items.append((cls, x.detach(), p))
        return x + p


def forward_probed(model, ids, probe):
    """Log-softmax of the logits of every position of `ids`, in float32, written out op by op
    as transformers' Llama computes it (RMSNorm, rotate-half RoPE, GQA, causal softmax
    attention, SwiGLU), with every value an engine may store marked by `probe`."""
    import torch
    import torch.nn.functional as F

    cfg, inner = model.config, model.model
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    eps, dev, t = cfg.rms_norm_eps, ids.device, ids.shape[0]

    rot = inner.rotary_emb
    freqs = torch.outer(torch.arange(t, device=dev, dtype=torch.float32), rot.inv_freq.float())
    emb = torch.cat([freqs, freqs], dim=-1)
    scaling = float(getattr(rot, "attention_scaling", 1.0))
    cos = probe("rope_table", emb.cos() * scaling)
    sin = probe("rope_table", emb.sin() * scaling)

    def norm(x, w):
        hat = probe("norm_hat", x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        return probe("norm_out", w.float() * hat)

    def rotate_half(x):
        return torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)

    def rope(x):  # [heads, t, d]
        return probe("rope_out", probe("rope_mul", x * cos) + probe("rope_mul", rotate_half(x) * sin))

    def lin(cls, x, w):
        return probe(cls, x @ w.float().T)

    mask = torch.full((t, t), float("-inf"), device=dev).triu(1)
    h = inner.embed_tokens.weight.float()[ids]
    for layer in inner.layers:
        att, mlp = layer.self_attn, layer.mlp
        x = norm(h, layer.input_layernorm.weight)
        q = rope(lin("q", x, att.q_proj.weight).view(t, hq, d).transpose(0, 1))
        k = rope(lin("k", x, att.k_proj.weight).view(t, hkv, d).transpose(0, 1))
        v = lin("v", x, att.v_proj.weight).view(t, hkv, d).transpose(0, 1)
        k, v = k.repeat_interleave(hq // hkv, 0), v.repeat_interleave(hq // hkv, 0)
        scores = probe("scores", (q @ k.transpose(1, 2)) * d ** -0.5)
        p = probe("probs", torch.softmax(scores + mask, dim=-1))
        o = probe("attn", (p @ v).transpose(0, 1).reshape(t, hq * d))
        h = probe("residual", h + lin("o_proj", o, att.o_proj.weight))
        x = norm(h, layer.post_attention_layernorm.weight)
        a = probe("act", probe("silu", F.silu(lin("gate", x, mlp.gate_proj.weight))) * lin("up", x, mlp.up_proj.weight))
        h = probe("residual", h + lin("down", a, mlp.down_proj.weight))
    logits = lin("logits", norm(h, inner.norm.weight), model.lm_head.weight)
    return torch.log_softmax(logits, dim=-1)


def sensitivities(model, prompt, tokens):
    """(exact logprobs of `tokens` from forward_probed, {class: [S_c(t) for each t]})."""
    import torch

    seq = prompt + tokens[:-1]
    dev = model.device
    probe = Probes()
    with torch.enable_grad():
        lsm = forward_probed(model, torch.tensor(seq, device=dev), probe)
        rows = torch.arange(len(prompt) - 1, len(seq), device=dev)
        lp = lsm[rows, torch.tensor(tokens, device=dev)]
        exact = lp.detach().tolist()
        # The derivatives need no float32 accuracy (a 1e-3 error in S is 1e-3 of the bound).
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        index = {c: i for i, c in enumerate(CLASSES)}
        cls_of = torch.tensor([index[c] for c, _, _ in probe.items], device=dev)
        values = [x for _, x, _ in probe.items]
        leaves = [p for _, _, p in probe.items]
        rows_out = []
        for t in range(len(tokens)):
            grads = torch.autograd.grad(lp[t], leaves, retain_graph=t + 1 < len(tokens), allow_unused=True)
            sq = torch.stack([
                (g.float() * x).pow(2).sum() if g is not None else torch.zeros((), device=dev)
                for g, x in zip(grads, values)
            ])
            per_class = torch.zeros(len(CLASSES), device=dev, dtype=torch.float64).index_add_(0, cls_of, sq.double())
            rows_out.append(per_class.sqrt().tolist())
        torch.backends.cuda.matmul.allow_tf32 = tf32
    sens = {c: [row[i] for row in rows_out] for i, c in enumerate(CLASSES)}
    return exact, sens


# ----------------------------------------------------------------------------- checks


def run_check(args, name, prompts):
    """One check's reference outputs for every prompt."""
    import torch

    if name == "bf16":
        model = load(args, torch.bfloat16, "sdpa")
        reference = "transformers bfloat16, SDPA flash/efficient attention, f32 accumulation"
        weights = "f32 weights rounded to bf16"
    elif name in ("f16", "f32"):
        model = load(args, torch.float32, "eager")
        if name == "f16":
            for p in model.parameters():
                p.data = p.data.half().float()
        reference = "transformers float32, eager attention, TF32 off"
        weights = "f32 weights rounded to f16 and back" if name == "f16" else "f32 weights"
    else:
        sys.exit(f"oracle.py: unknown check {name}")

    from contextlib import nullcontext

    attention = nullcontext()
    if name == "bf16" and model.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # Both keep the scores and the softmax in f32 and round P to bf16 before P.V.
        attention = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])
    out = []
    t0 = time.time()
    with attention:
        for prompt in prompts:
            tokens, logprobs, tops = greedy(model, prompt, args.max_tokens, args.top)
            out.append(dict(prompt_ids=prompt, tokens=tokens, logprobs=logprobs, top=tops))
    log(f"{name}: greedy {len(prompts)} x {args.max_tokens} tokens in {time.time() - t0:.1f} s")

    if name == "bf16":
        # Exact: the same (bf16) weights, now in float32 (SDPA then runs in f32). By hand:
        # transformers refuses `.float()` on a model loaded from a GGUF.
        for p in model.parameters():
            p.data = p.data.float()
    t0 = time.time()
    worst = 0.0
    for rec in out:
        exact, sens = sensitivities(model, rec["prompt_ids"], rec["tokens"])
        hf32 = teacher_forced(model, rec["prompt_ids"], rec["tokens"])
        # forward_probed must be the same function as transformers' float32 forward.
        worst = max(worst, max(abs(a - b) for a, b in zip(exact, hf32)))
        rec["exact_logprobs"] = exact
        rec["sensitivity"] = sens
    log(f"{name}: sensitivities in {time.time() - t0:.1f} s; forward_probed vs transformers f32: "
        f"max |logprob diff| {worst:.2e}")
    if not worst < 1e-3:
        sys.exit(f"oracle.py: forward_probed differs from transformers' float32 forward by {worst}")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return dict(name=name, reference=reference, weights=weights, probed_vs_transformers_f32=worst, prompts=out)


def write_prompts(args):
    """Tokenizes PROMPTS with transformers' tokenizer for the GGUF, with SmolLM2's own
    pre-tokenizer (digits split one by one; see scripts/make_golden.py), into a fixture."""
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    folder, name = os.path.split(os.path.abspath(args.model))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    entries = []
    for kind, content in PROMPTS:
        if kind == "chat":
            text = tok.apply_chat_template(content, tokenize=False, add_generation_prompt=True)
        else:
            text = content
        entries.append(dict(kind=kind, text=text, prompt_ids=tok.encode(text, add_special_tokens=False)))
    with open(args.write_prompts, "w") as f:
        json.dump(dict(model="SmolLM2-135M-Instruct Q4_1 GGUF", tokenizer="transformers (GGUF) + SmolLM2 digits",
                       prompts=entries), f, ensure_ascii=False, indent=1)
        f.write("\n")
    log(f"wrote {len(entries)} prompts to {args.write_prompts}")


def main():
    args = parse_args()
    if args.write_prompts:
        return write_prompts(args)
    import torch
    import transformers

    # The references keep float32 accumulation everywhere: no TF32, no reduced-precision
    # reductions inside bf16/f16 matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)

    checks = [c for c in args.checks.split(",") if c]
    result = dict(format=1, model=args.model, max_tokens=args.max_tokens, top=args.top,
                  transformers=transformers.__version__, torch=torch.__version__,
                  device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                  classes=CLASSES, checks=[])
    prompts = None
    t0 = time.time()
    for name in checks:
        if prompts is None:
            from transformers import AutoConfig

            if args.model.endswith(".gguf"):
                folder, file = os.path.split(os.path.abspath(args.model))
                cfg = AutoConfig.from_pretrained(folder, gguf_file=file)
            else:
                cfg = AutoConfig.from_pretrained(args.model)
            result["vocab_size"] = cfg.vocab_size
            prompts = prompt_set(args, cfg.vocab_size)
        result["checks"].append(run_check(args, name, prompts))
    result["seconds"] = round(time.time() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(result, f)
    log(f"wrote {args.out}: checks {checks}, {len(prompts)} prompts, {result['seconds']} s")


if __name__ == "__main__":
    main()
