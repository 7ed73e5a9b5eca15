#!/usr/bin/env python3
"""Rebuilds tests/fixtures/smollm2/lora/, the multi-LoRA golden fixture (issue #20).

transformers + PEFT are the oracle: every expected token id and logprob below comes from
PEFT's LoRA layers on transformers' SmolLM2-135M-Instruct (Q4_1 GGUF dequantised by
transformers, float32, CPU), never from Pagoda.

Adapter weights are never committed. Every lora_A / lora_B value comes from a small
deterministic generator (splitmix64, `lora_values` below) that the Rust test reimplements;
the fixture holds only PEFT's adapter_config.json, the tensor names and shapes PEFT saved,
per-tensor sums to check the Rust generator against this one, and the greedy outputs.

The environment (once; CI never runs this script, it only reads the committed JSON):

    python3 -m venv /tmp/loraenv
    /tmp/loraenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu  # or plain `pip install torch`
    /tmp/loraenv/bin/pip install transformers peft gguf accelerate numpy safetensors
    bash scripts/fetch-model.sh
    /tmp/loraenv/bin/python scripts/make_lora_golden.py

Fixtures were last built with torch 2.15.0, transformers 5.25.0, peft 0.21.2, gguf 0.19.0,
tokenizers 0.23.3, numpy 2.4.6, safetensors 0.8.0.

What it writes (tests/fixtures/smollm2/lora/):
  <adapter>/adapter_config.json  exactly as PEFT's save_pretrained wrote it
  <adapter>/tensors.json         the generator parameters {seed, b_amp}, PEFT's scaling, and
                                 every tensor of adapter_model.safetensors in file order as
                                 [name, shape, sum, sum of squares] (float64, exactly rounded)
  golden.json                    for 4 prompts, the base model and each adapter: 24 greedy tokens
                                 (no eos stop), each chosen token's logprob and the top-5
                                 (token, logprob) of the first 4 steps
(README.md there, written by hand, states the generator spec for the Rust side.)
"""

import copy
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never ask the Hub
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import ROOT, SMOLLM_DIR, SMOLLM_GGUF, smollm_tokenizer, write_json  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "smollm2" / "lora"
torch.set_num_threads(2)

# --------------------------------------------------------------------------- the generator

M = 2**64 - 1
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def splitmix64(x: int) -> int:
    """Scalar reference (Python ints, wrapped to 64 bits)."""
    x = (x + 0x9E3779B97F4A7C15) & M
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    return z ^ (z >> 31)


def splitmix64_np(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def key_base(seed: int, layer: int, module: int, matrix: int) -> int:
    return ((seed << 48) ^ (layer << 40) ^ (module << 36) ^ (matrix << 32)) & M


def lora_values(seed, layer, module, matrix, shape, b_amp) -> np.ndarray:
    """lora_A (matrix 0, [r, in]) or lora_B (matrix 1, [out, r]) of one module, as float32."""
    rows, cols = shape
    amp = 1.0 / math.sqrt(cols) if matrix == 0 else float(b_amp)
    n = rows * cols
    assert n < 2**32
    h = splitmix64_np(np.uint64(key_base(seed, layer, module, matrix)) ^ np.arange(n, dtype=np.uint64))
    u = (h >> np.uint64(40)).astype(np.float64) / 2.0**24
    return ((2.0 * u - 1.0) * amp).astype(np.float32).reshape(shape)


def lora_value_scalar(seed, layer, module, matrix, i, amp) -> float:
    h = splitmix64(key_base(seed, layer, module, matrix) ^ i)
    u = (h >> 40) / 2**24
    return float(np.float32((2 * u - 1) * amp))


NAME_RE = re.compile(r"\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.(?:\w+\.)?weight$")


def parse_name(name):
    m = NAME_RE.search(name)
    assert m, f"unexpected LoRA tensor name {name!r}"
    return int(m.group(1)), MODULES.index(m.group(2)), 0 if m.group(3) == "A" else 1


# --------------------------------------------------------------------------- adapters

# b_amp (lora_B's amplitude) was picked per adapter so that every adapter changes the base model's
# greedy text on every prompt yet stays fluent, and no greedy step is a near-tie (top-2 logprob
# margin >= 0.03 on every adapter step; see "top2_margins" in golden.json).
ADAPTERS = [
    {"name": "all8", "seed": 1, "b_amp": 0.1, "r": 8, "lora_alpha": 16, "target_modules": MODULES, "use_rslora": False},
    {
        "name": "qv4rs",
        "seed": 2,
        "b_amp": 0.16,
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "use_rslora": True,
    },
    {
        "name": "mlp16",
        "seed": 3,
        "b_amp": 0.1,
        "r": 16,
        "lora_alpha": 32,
        "target_modules": ["gate_proj", "up_proj", "down_proj"],
        "use_rslora": False,
    },
]


def build_adapter(base, spec, b_amp, folder: Path):
    """PEFT model on a copy of `base` with the generator's weights, saved to `folder`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec["r"],
        lora_alpha=spec["lora_alpha"],
        target_modules=list(spec["target_modules"]),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=spec["use_rslora"],
    )
    model = get_peft_model(copy.deepcopy(base), config)
    model.eval()
    scalings = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
                continue
            layer, mod, _ = parse_name(name + ".lora_A.weight")
            for matrix, lin in ((0, module.lora_A["default"]), (1, module.lora_B["default"])):
                values = lora_values(spec["seed"], layer, mod, matrix, tuple(lin.weight.shape), b_amp)
                lin.weight.copy_(torch.from_numpy(values))
            scalings.add(float(module.scaling["default"]))
    assert len(scalings) == 1, scalings
    # save_embedding_layers=False: no embedding is targeted; "auto" would ask the Hub about the base.
    model.save_pretrained(folder, save_embedding_layers=False)
    return model, scalings.pop()


def safetensors_in_file_order(path: Path):
    """[(name, dtype, shape)] ordered by data offset, as the bytes lie in the file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return [(k, v["dtype"], v["shape"]) for k, v in items]


def describe_adapter(spec, b_amp, scaling, folder: Path):
    from safetensors.numpy import load_file

    saved = load_file(folder / "adapter_model.safetensors")
    order = safetensors_in_file_order(folder / "adapter_model.safetensors")
    assert len(order) == len(saved)
    tensors = []
    total_sum, total_sq = [], []
    for name, dtype, shape in order:
        assert dtype == "F32", (name, dtype)
        layer, mod, matrix = parse_name(name)
        assert MODULES[mod] in spec["target_modules"]
        expected = lora_values(spec["seed"], layer, mod, matrix, tuple(shape), b_amp)
        got = saved[name]
        assert got.dtype == np.float32 and np.array_equal(got, expected), f"saved {name} is not the generator's"
        flat = got.astype(np.float64).reshape(-1)
        s, sq = math.fsum(flat), math.fsum(flat * flat)  # squares of f32 are exact in f64
        total_sum.append(s)
        total_sq.append(sq)
        tensors.append([name, list(shape), s, sq])
    n_layers = 30
    assert len(tensors) == 2 * n_layers * len(spec["target_modules"])
    # Scalar spot checks of the vectorised generator; also test vectors for the Rust side.
    probes = []
    for name, shape, _, _ in [tensors[0], tensors[1], tensors[-1]]:
        layer, mod, matrix = parse_name(name)
        amp = 1.0 / math.sqrt(shape[1]) if matrix == 0 else b_amp
        for i in (0, 1, shape[0] * shape[1] - 1):
            key = key_base(spec["seed"], layer, mod, matrix) ^ i
            value = lora_value_scalar(spec["seed"], layer, mod, matrix, i, amp)
            assert value == float(saved[name].reshape(-1)[i])
            probes.append(
                {
                    "tensor": name,
                    "index": i,
                    "key": f"0x{key:016x}",
                    "splitmix64": f"0x{splitmix64(key):016x}",
                    "value": value,
                }
            )
    return {
        "name": spec["name"],
        "generator": {"seed": spec["seed"], "b_amp": b_amp},
        "r": spec["r"],
        "lora_alpha": spec["lora_alpha"],
        "use_rslora": spec["use_rslora"],
        "peft_scaling": scaling,
        "sum": math.fsum(total_sum),
        "sum_of_squares": math.fsum(total_sq),
        "probes": probes,
        "tensors": tensors,
    }


def write_tensors_json(path: Path, value):
    """Like write_json, but one tensor per line so the file stays small and diffable."""
    tensors = value.pop("tensors")
    head = json.dumps(value, ensure_ascii=False, indent=1)
    lines = ",\n".join("  " + json.dumps(t) for t in tensors)
    path.write_text(head[:-2] + ',\n "tensors": [\n' + lines + "\n ]\n}\n")
    json.loads(path.read_text())
    value["tensors"] = tensors
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")


# --------------------------------------------------------------------------- greedy decoding

PROMPTS = [
    {"kind": "plain", "text": "The capital of France is"},
    {"kind": "plain", "text": "Once upon a time, in a small village,"},
    {"kind": "plain", "text": "Here are three tips for staying healthy:"},
    {"kind": "chat", "messages": [{"role": "user", "content": "Write a haiku about the sea."}]},
]
N_TOKENS = 24
TOP_STEPS = 4
TOP_K = 5


def prompt_ids(tok, p):
    if p["kind"] == "chat":
        text = tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
    else:
        text = p["text"]
    return text, tok(text, add_special_tokens=True)["input_ids"]


@torch.no_grad()
def greedy(model, ids, n=N_TOKENS):
    """Plain argmax for n steps, no eos stop, KV cache; returns tokens and full log-softmax rows."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    cache = out.cache
    logits = out.logits[0, -1]
    tokens, rows = [], []
    for step in range(n):
        logp = torch.log_softmax(logits.double(), dim=-1)
        t = int(torch.argmax(logits))
        tokens.append(t)
        rows.append(logp)
        if step + 1 == n:
            break
        out = model(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[0, -1]
    return tokens, rows


def summarise(tok, tokens, rows):
    steps = []
    for logp in rows[:TOP_STEPS]:
        top = torch.topk(logp, TOP_K)
        steps.append([[int(i), round(float(v), 6)] for i, v in zip(top.indices, top.values)])
    margins = []
    for logp in rows:
        top2 = torch.topk(logp, 2).values
        margins.append(float(top2[0] - top2[1]))
    return {
        "tokens": tokens,
        "text": tok.decode(tokens),
        "logprobs": [round(float(logp[t]), 6) for t, logp in zip(tokens, rows)],
        "min_top2_margin": round(min(margins), 6),
        "top2_margins": [round(m, 6) for m in margins],
        "top5": steps,
    }


def main(argv):
    import gguf  # noqa: F401  (version record)
    import peft
    import safetensors
    import tokenizers
    import transformers
    from importlib.metadata import version
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if not (SMOLLM_DIR / SMOLLM_GGUF).is_file():
        sys.exit("run scripts/fetch-model.sh first")
    started = time.time()
    tok, _ = smollm_tokenizer()
    base = AutoModelForCausalLM.from_pretrained(SMOLLM_DIR, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    base.eval()
    # PEFT records the base model's name_or_path in adapter_config.json: keep this machine's path out of it
    # (get_peft_model reads the model instance's `name_or_path`, not the config's).
    base.name_or_path = base.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    print(f"loaded base in {time.time() - started:.1f}s")

    prompts = []
    for p in PROMPTS:
        text, ids = prompt_ids(tok, p)
        prompts.append({**p, "prompt_text": text, "prompt_ids": ids})

    results = {"base": []}
    for p in prompts:
        results["base"].append(greedy(base, p["prompt_ids"]))

    adapters_meta = []
    for spec in ADAPTERS:
        t0 = time.time()
        folder = OUT / spec["name"]
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            model, scaling = build_adapter(base, spec, spec["b_amp"], tmp)
            saved_files = sorted(f.name for f in tmp.iterdir())
            assert saved_files == ["README.md", "adapter_config.json", "adapter_model.safetensors"], saved_files
            (folder / "adapter_config.json").write_bytes((tmp / "adapter_config.json").read_bytes())
            meta = describe_adapter(spec, spec["b_amp"], scaling, tmp)
            write_tensors_json(folder / "tensors.json", meta)

            runs = [greedy(model, p["prompt_ids"]) for p in prompts]
            results[spec["name"]] = runs

            # Re-load with PeftModel.from_pretrained: identical outputs.
            reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp)
            reloaded.eval()
            for p, (tokens, rows) in zip(prompts, runs):
                t2, r2 = greedy(reloaded, p["prompt_ids"])
                assert t2 == tokens, (spec["name"], p["prompt_text"])
                gap = max(float((a - b).abs().max()) for a, b in zip(rows, r2))
                assert gap == 0.0, f"{spec['name']}: reloaded logprobs differ by {gap}"
            # Merged: same greedy tokens (sanity; the logprobs move by rounding only).
            merged = reloaded.merge_and_unload()
            merged.eval()
            merge_gap = 0.0
            for p, (tokens, rows) in zip(prompts, runs):
                t3, r3 = greedy(merged, p["prompt_ids"])
                assert t3 == tokens, (spec["name"], p["prompt_text"], tok.decode(t3))
                merge_gap = max(merge_gap, max(float((a - b).abs().max()) for a, b in zip(rows, r3)))
            del model, reloaded, merged
        meta["merge_max_logprob_gap"] = merge_gap
        adapters_meta.append(meta)
        print(f"{spec['name']}: scaling {scaling}, merged max |Δlogprob| {merge_gap:.2e}, {time.time() - t0:.1f}s")

    out_prompts = []
    for k, p in enumerate(prompts):
        entry = dict(p)
        base_tokens = results["base"][k][0]
        entry["outputs"] = {}
        for name in ["base"] + [a["name"] for a in ADAPTERS]:
            tokens, rows = results[name][k]
            s = summarise(tok, tokens, rows)
            if name != "base":
                s["differs_from_base"] = sum(a != b for a, b in zip(tokens, base_tokens))
                s["first_diff"] = next((i for i, (a, b) in enumerate(zip(tokens, base_tokens)) if a != b), None)
                assert s["differs_from_base"] >= 3, f"{name} barely changes {p['prompt_text']!r}"
            if s["min_top2_margin"] < 0.02:
                print(f"  note: {name} on {p['prompt_text'][-40:]!r} has a near-tie, margin {s['min_top2_margin']}")
            entry["outputs"][name] = s
            diff = f" ({s['differs_from_base']} differ, first at {s['first_diff']})" if name != "base" else ""
            print(f"  [{name:5}] {p['prompt_text'][-40:]!r} -> {s['text']!r}{diff}")
        out_prompts.append(entry)

    golden = {
        "model": SMOLLM_GGUF,
        "oracle": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=...) + PEFT LoRA, float32, CPU, "
        "greedy argmax for 24 steps with no eos stop, logprobs = log_softmax of the float32 logits (in float64)",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "gguf": version("gguf"),
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
        "eos_token_ids": [2],
        "n_tokens": N_TOKENS,
        "adapters": [
            {k: a[k] for k in ("name", "generator", "r", "lora_alpha", "use_rslora", "peft_scaling")}
            | {"target_modules": spec["target_modules"], "merge_max_logprob_gap": a["merge_max_logprob_gap"]}
            for a, spec in zip(adapters_meta, ADAPTERS)
        ],
        "prompts": out_prompts,
    }
    write_json(OUT / "golden.json", golden)
    print(f"total {time.time() - started:.1f}s")


if __name__ == "__main__":
    main(sys.argv)
