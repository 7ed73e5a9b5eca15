#!/usr/bin/env python3
"""Rebuilds the golden fixtures in tests/fixtures/ that crates/models tests against.

Hugging Face transformers is the oracle: every expected token id, logit and rendered
prompt below comes from transformers (run in float32 on the CPU), never from Pagoda.

The environment (once; CI never runs this script, it only reads the committed JSON):

    python3 -m venv /tmp/fxenv
    /tmp/fxenv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu  # or plain `pip install torch`
    /tmp/fxenv/bin/pip install transformers gguf accelerate numpy
    bash scripts/fetch-model.sh
    /tmp/fxenv/bin/python scripts/make_golden.py            # everything
    /tmp/fxenv/bin/python scripts/make_golden.py tiny       # only the tiny random models

Fixtures were last built with torch 2.15.0, transformers 5.23.0, gguf 0.19.0, tokenizers 0.23.3.

What it writes:
  smollm2/golden.json         SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised by transformers):
                              for 6 prompts, the prompt ids, 32 greedy tokens and the top-10
                              (token, logit) of the first 4 steps.
  smollm2/tokenizer_cases.json  ~300 varied strings with their token ids and decodings.
  smollm2/chat_template.json  SmolLM2's template rendered for several conversations.
  tiny-llama/                 random Llama (f32, tied embeddings, llama3 rope scaling) + tokenizer
  tiny-qwen2/                 random Qwen2 (f16 weights, q/k/v biases, untied, sharded safetensors)
  tiny-mistral/               random Mistral (bf16 weights, sliding window 8, untied)
  tiny-llama-gguf/            tiny-llama as a GGUF of mixed quant types, q/k permuted as
                              llama.cpp's converter does, with transformers' logits for it
  dequant.json                random blocks of each ggml type and gguf-py's dequantisation
Each tiny model folder has golden.json: the prompt ids, the logits of every prompt position,
16 greedy tokens and the full logits of the first 4 decode steps.
"""

import copy
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
SMOLLM_DIR = ROOT / "models" / "smollm2-135m-instruct"
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

torch.set_num_threads(2)


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")


def rounded(values, digits=6):
    return [round(float(v), digits) for v in values]


# --------------------------------------------------------------------------- SmolLM2


def smollm_tokenizer():
    """transformers' tokenizer for the GGUF, with SmolLM2's own pre-tokenizer.

    transformers builds a GGUF's byte-level tokenizer with GPT-2's pre-tokenizer whatever
    `tokenizer.ggml.pre` says; for pre = "smollm" the model's own tokenizer.json (and
    llama.cpp) first splits every digit on its own (Digits(individual_digits=True)), then
    applies GPT-2's byte-level split. We set that here so the fixture holds the ids the
    model was trained with; `stock_differs` in the fixture lists the strings where
    transformers' stock GGUF tokenizer gives other ids.
    """
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM_DIR, gguf_file=SMOLLM_GGUF)
    stock = AutoTokenizer.from_pretrained(SMOLLM_DIR, gguf_file=SMOLLM_GGUF)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    return tok, stock


def tokenizer_strings():
    """Handwritten edge cases plus seeded random mixes of many scripts."""
    cases = [
        "",
        " ",
        "  ",
        "\n",
        "\n\n\n",
        "\t",
        " \t \n ",
        "Hello world",
        "Hello, world!",
        " hello",
        "hello ",
        "   three leading spaces",
        "trailing spaces   ",
        "multiple     spaces     inside",
        "The quick brown fox jumps over the lazy dog.",
        "I'm sure you'll see they've done it, haven't they? I'd say we're fine.",
        "DON'T SHOUT'S",
        "12345",
        "3.14159",
        "1,000,000",
        "in 2024 we had 365 days",
        "x1y2z3",
        "0x1F 0b1010 1e-9",
        "²³¹ ¼½¾",
        "①②③ Ⅻ ٣٤٥ ४२",
        "phone: +1 (555) 123-4567",
        "café naïve résumé Ångström",
        "Straße, Œuvre, Ærø",
        "日本語のテキストです。",
        "中文测试：你好，世界！",
        "한국어 문장입니다.",
        "Привет, мир! Как дела?",
        "Γειά σου Κόσμε",
        "مرحبا بالعالم",
        "שלום עולם",
        "नमस्ते दुनिया",
        "สวัสดีชาวโลก",
        "emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷",
        "🤖💬🔥",
        "math: ∀x∈ℝ, x²≥0 ⇒ √x ∈ ℂ",
        "arrows → ← ↔ ⇐ and — dashes – ‑",
        "quotes “double” ‘single’ «guillemets»",
        "zero\u200bwidth\u200djoiner",
        "nbsp\u00a0here",
        "control\x01chars\x7f",
        "def f(x):\n    return x * 2\n",
        "fn main() {\n\tprintln!(\"hi {}\", 1 + 2);\n}",
        "for (int i = 0; i < n; ++i) { a[i] = i << 2; }",
        "<div class=\"a\">&amp; &lt;tag&gt;</div>",
        "SELECT * FROM users WHERE id = 42;",
        "https://example.com/path?q=1&r=two#frag",
        "user@example.org",
        "C:\\Users\\name\\file.txt",
        "$HOME/.config && echo $((1+2))",
        "{\"key\": [1, 2, {\"nested\": null}]}",
        "a" * 50,
        "ab" * 30,
        "🙂" * 10,
        " " * 17 + "x",
        "line1\r\nline2\rline3",
        "<|im_start|>user\nHello<|im_end|>\n",
        "<|im_start|>assistant\n",
        "<|endoftext|>",
        "text<|im_end|>more<|im_start|>",
        "<|im_start|><|im_end|><|endoftext|>",
        "<repo_name>pagoda<file_sep>main.rs",
        "<|im_start", "im_end|>", "< |im_start| >",
        "ALLCAPS lowercase MiXeD CamelCaseWord snake_case_word kebab-case-word",
        "...!!!???,,,;;;:::",
        "¡¿Qué?!",
        "™ © ® ° ± × ÷ µ §",
        "Ṁȧɲÿ ḓíąćṙîťïčš",
    ]
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n",
        ".,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
        "àéîõüßçñøåæœ",
        "日本語中文字测试漢字かなカナ",
        "한국어",
        "абвгдеёжзийклмнопрстуфхцчшщъыьэюя",
        "αβγδεζηθικλμνξοπρστυφχψω",
        "😀😂🥲😍🤔👍🏽🚀🌍🎉❤️",
        "①²¼٣",
    ]
    rng = random.Random(1234)
    while len(cases) < 300:
        length = rng.randint(1, 40)
        chosen = rng.sample(pools, rng.randint(1, 4))
        cases.append("".join(rng.choice(rng.choice(chosen)) for _ in range(length)))
    return cases


def make_smollm_tokenizer_fixture(tok, stock):
    entries = []
    stock_differs = []
    for s in tokenizer_strings():
        ids = tok.encode(s, add_special_tokens=False)
        decoded = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert decoded == s, f"transformers does not round-trip {s!r}: {decoded!r}"
        entries.append({"text": s, "ids": ids})
        if stock.encode(s, add_special_tokens=False) != ids:
            stock_differs.append(s)
    # One string with add_special_tokens=True: this GGUF says add_bos_token = false.
    with_special = tok("Hello world")["input_ids"]
    write_json(
        FIXTURES / "smollm2" / "tokenizer_cases.json",
        {
            "source": "transformers AutoTokenizer(gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf) with SmolLM2's "
            "Digits(individual)+ByteLevel pre-tokenizer; see scripts/make_golden.py",
            "stock_differs": stock_differs,
            "hello_world_with_special_tokens": with_special,
            "cases": entries,
        },
    )


SMOLLM_CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "List three primary colors."},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help you today?"},
        {"role": "user", "content": "Write a haiku about the sea."},
    ],
    [{"role": "user", "content": "Unicode: café 日本語 😀\nand a second line"}],
]


def make_smollm_chat_template_fixture(tok):
    renders = []
    for messages in SMOLLM_CONVERSATIONS:
        for add_generation_prompt in (True, False):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            renders.append({"messages": messages, "add_generation_prompt": add_generation_prompt, "text": text})
    write_json(
        FIXTURES / "smollm2" / "chat_template.json",
        {"template": tok.chat_template, "bos_token": tok.bos_token, "eos_token": tok.eos_token, "renders": renders},
    )


def make_smollm_golden(tok):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(SMOLLM_DIR, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    model.eval()
    check_smollm_weights_are_plain_dequantisation(model)
    prompts = [
        {"kind": "plain", "text": "The capital of France is"},
        {"kind": "plain", "text": "def fibonacci(n):\n    "},
        {"kind": "plain", "text": "Once upon a time, in a small village,"},
    ] + [{"kind": "chat", "messages": m} for m in SMOLLM_CONVERSATIONS[:3]]
    out = []
    for p in prompts:
        if p["kind"] == "chat":
            text = tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
        else:
            text = p["text"]
        ids = tok(text, add_special_tokens=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=32,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                eos_token_id=[2],
                pad_token_id=2,
            )
        tokens = gen.sequences[0, len(ids):].tolist()
        steps = []
        for logits in gen.logits[:4]:
            row = logits[0].float()
            top = torch.topk(row, 10)
            steps.append({"top_ids": top.indices.tolist(), "top_logits": rounded(top.values.tolist())})
        margins = [float(torch.topk(l[0], 2).values[0] - torch.topk(l[0], 2).values[1]) for l in gen.logits]
        entry = dict(p)
        entry.update(
            {
                "prompt_text": text,
                "prompt_ids": ids,
                "greedy_tokens": tokens,
                "greedy_text": tok.decode(tokens),
                "min_top2_margin": round(min(margins), 6),
                "steps": steps,
            }
        )
        out.append(entry)
        print(f"  {p.get('text') or p['messages'][-1]['content']!r} -> {tok.decode(tokens)!r}")
    write_json(
        FIXTURES / "smollm2" / "golden.json",
        {
            "model": SMOLLM_GGUF,
            "oracle": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=...), float32, CPU, greedy",
            "eos_token_ids": [2],
            "prompts": out,
        },
    )


def check_smollm_weights_are_plain_dequantisation(model):
    """The oracle's weights must be gguf-py's dequantisation with llama.cpp's q/k permutation undone."""
    import gguf

    reader = gguf.GGUFReader(str(SMOLLM_DIR / SMOLLM_GGUF))
    tensors = {t.name: t for t in reader.tensors}
    t = tensors["blk.0.attn_k.weight"]
    w = gguf.dequantize(t.data, t.tensor_type).reshape(192, 576)
    heads, d = 3, 64
    hf = w.reshape(heads, d // 2, 2, 576).swapaxes(1, 2).reshape(192, 576)
    got = model.model.layers[0].self_attn.k_proj.weight
    got = got.dequantize() if hasattr(got, "dequantize") else got
    got = torch.as_tensor(np.asarray(got.detach().float() if torch.is_tensor(got) else got))
    diff = float((got - torch.from_numpy(hf)).abs().max())
    assert diff == 0.0, f"transformers' k_proj differs from plain dequantisation by {diff}"


# --------------------------------------------------------------------------- tiny random models

TINY_CORPUS = (
    "Pagoda serves language models. It pages the key value cache into blocks, batches requests "
    "continuously and caches shared prefixes. The quick brown fox jumps over the lazy dog. "
    "def add(a, b):\n    return a + b\n" * 3
    + "Numbers 0 1 2 3 4 5 6 7 8 9 10 42 100. Unicode: café, naïve, 日本, 😀. "
)

TINY_TEMPLATE = """{%- if tools %}<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You may call these tools.' }}
Tools:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}<|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content | trim }}<|im_end|>
{% endif %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role: ' + message.role) }}
    {%- endif %}
    {%- if message.role != 'system' %}
<|im_start|>{{ message.role }}
{{ message.content.strip() }}<|im_end|>
    {% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

TINY_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city <today> & \"now\"",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer", "default": 1}},
                "required": ["city"],
            },
        },
    }
]

TINY_CONVERSATIONS = [
    ([{"role": "user", "content": "  hello there  "}], None),
    (
        [
            {"role": "system", "content": " Be brief. "},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        None,
    ),
    ([{"role": "user", "content": "Weather in Paris?"}], TINY_TOOLS),
]


def tiny_tokenizer(vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_CORPUS], trainer=trainer)
    return tok


def save_tiny_tokenizer(folder: Path, vocab_size: int):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer(vocab_size),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = TINY_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def randomise(model, seed):
    """transformers initialises norms to 1 and biases to 0; randomise them so the test sees them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def tiny_golden(model, prompt_ids, folder: Path, extra=None):
    model.eval()
    with torch.no_grad():
        prefill = model(torch.tensor([prompt_ids])).logits[0]
        gen = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    tokens = gen.sequences[0, len(prompt_ids):].tolist()
    golden = {
        "oracle": f"transformers {type(model).__name__}, float32, CPU",
        "prompt_ids": prompt_ids,
        "prompt_logits": [rounded(r) for r in prefill.tolist()],
        "greedy_tokens": tokens,
        "decode_logits": [rounded(l[0].tolist()) for l in gen.logits[1:5]],
        "min_top2_margin": round(
            min(float(torch.topk(l[0], 2).values[0] - torch.topk(l[0], 2).values[1]) for l in gen.logits), 6
        ),
    }
    golden.update(extra or {})
    write_json(folder / "golden.json", golden)
    return golden


def round_weights(model, dtype):
    """Rounds every weight to `dtype` (kept in f32), so saving in `dtype` is lossless."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))


TINY_PROMPT = [5, 17, 200, 42, 99, 3, 250, 31, 8, 120, 64, 77, 140, 9, 210, 55, 180, 11, 230, 90]


def make_tiny_models():
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    vocab = 320
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        initializer_range=0.15,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )

    # Llama: f32, tied embeddings, Llama 3.1 rope scaling.
    folder = FIXTURES / "tiny-llama"
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        **common,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    model = LlamaForCausalLM(config)
    randomise(model, 1)
    model.save_pretrained(folder)
    tok = save_tiny_tokenizer(folder, vocab)
    tiny_golden(model, TINY_PROMPT, folder)
    tiny_chat_fixture(tok, folder)
    llama = model

    # Qwen2: f16 weights, biases on q/k/v, untied, sharded safetensors.
    folder = FIXTURES / "tiny-qwen2"
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(2)
    config = Qwen2Config(**common, tie_word_embeddings=False, rope_theta=1000000.0, use_sliding_window=False)
    model = Qwen2ForCausalLM(config)
    randomise(model, 3)
    round_weights(model, torch.float16)
    # Save a copy: casting the model itself would round its rotary inv_freq buffer too.
    copy.deepcopy(model).to(torch.float16).save_pretrained(folder, max_shard_size="150KB")
    save_tiny_tokenizer(folder, vocab)
    tiny_golden(model, TINY_PROMPT, folder)

    # Mistral: bf16 weights, a sliding window shorter than the prompt.
    folder = FIXTURES / "tiny-mistral"
    shutil.rmtree(folder, ignore_errors=True)
    torch.manual_seed(4)
    config = MistralConfig(**common, tie_word_embeddings=False, sliding_window=8, rope_theta=10000.0)
    model = MistralForCausalLM(config)
    randomise(model, 5)
    round_weights(model, torch.bfloat16)
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(folder)
    save_tiny_tokenizer(folder, vocab)
    golden = tiny_golden(model, TINY_PROMPT, folder)
    # Without the window the logits must differ, or the fixture would not test it.
    config.sliding_window = None
    full = MistralForCausalLM(config)
    full.load_state_dict(model.state_dict())
    full.eval()
    with torch.no_grad():
        unwindowed = full(torch.tensor([TINY_PROMPT])).logits[0, -1]
    gap = float((unwindowed - torch.tensor(golden["prompt_logits"][-1])).abs().max())
    assert gap > 1e-2, f"sliding window changes the last logits by only {gap}"

    make_tiny_gguf(llama)


def tiny_chat_fixture(tok, folder: Path):
    renders = []
    for messages, tools in TINY_CONVERSATIONS:
        for add_generation_prompt in (True, False):
            text = tok.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            renders.append(
                {"messages": messages, "tools": tools, "add_generation_prompt": add_generation_prompt, "text": text}
            )
    try:
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)
        raise AssertionError("the template should reject an unknown role")
    except Exception as e:  # jinja2's TemplateError
        rejected = str(e)
    encodings = [{"text": r["text"], "ids": tok.encode(r["text"], add_special_tokens=True)} for r in renders]
    write_json(
        folder / "chat_cases.json",
        {"renders": renders, "rejected_role_error": rejected, "encodings": encodings},
    )


def permute_for_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Llama q/k rows (halves -> interleaved)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_tiny_gguf(llama):
    import gguf
    from transformers import AutoModelForCausalLM

    folder = FIXTURES / "tiny-llama-gguf"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    path = folder / "tiny-llama.gguf"
    c = llama.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in llama.state_dict().items()}
    Q = gguf.GGMLQuantizationType

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    # Linear rope scaling here, so the GGUF path tests that kind (the safetensors one tests llama3).
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(2.0)

    tok = tiny_tokenizer(c.vocab_size)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template(TINY_TEMPLATE)

    kinds = {
        "attn_q": Q.Q4_0,
        "attn_k": Q.Q4_1,
        "attn_v": Q.Q5_0,
        "attn_output": Q.Q5_1,
        "ffn_gate": Q.F16,
        "ffn_up": Q.BF16,
        "ffn_down": Q.Q8_0,
    }
    hf_names = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }

    def add(name, array, qtype):
        if qtype == Q.F32:
            w.add_tensor(name, array.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, array.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quantize(array, qtype), raw_dtype=qtype)

    add("token_embd.weight", sd["model.embed_tokens.weight"], Q.Q8_0)
    add("output_norm.weight", sd["model.norm.weight"], Q.F32)
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}"
        add(f"blk.{layer}.attn_norm.weight", sd[f"{p}.input_layernorm.weight"], Q.F32)
        add(f"blk.{layer}.ffn_norm.weight", sd[f"{p}.post_attention_layernorm.weight"], Q.F32)
        for short, qtype in kinds.items():
            array = sd[f"{p}.{hf_names[short]}.weight"]
            if short == "attn_q":
                array = permute_for_llama_cpp(array, c.num_attention_heads)
            elif short == "attn_k":
                array = permute_for_llama_cpp(array, c.num_key_value_heads)
            add(f"blk.{layer}.{short}.weight", array, qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes)")

    # The oracle reads the file back itself (dequantisation and unpermutation included). Its GGUF
    # config reader ignores llama.rope.scaling.*, so we pass the scaling the file states.
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=path.name,
        dtype=torch.float32,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    )
    rope = model.config.rope_parameters
    assert rope.get("rope_type") == "linear" and rope.get("factor") == 2.0, rope
    tiny_golden(model, TINY_PROMPT, folder, extra={"oracle_rope_parameters": dict(rope)})


# --------------------------------------------------------------------------- dequantisation


def make_dequant_fixture():
    """Random blocks of every type we dequantise, with gguf-py's dequantisation as the answer."""
    import gguf

    rng = np.random.default_rng(7)
    Q = gguf.GGMLQuantizationType
    cases = []
    for qtype in [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q6_K]:
        block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
        n_blocks = 3
        if qtype in (Q.F32, Q.F16, Q.BF16):
            values = rng.standard_normal(64).astype(np.float32)
            raw = gguf.quantize(values, qtype) if qtype != Q.BF16 else gguf.quants.quantize(values, qtype)
            raw = np.frombuffer(np.ascontiguousarray(raw).tobytes(), dtype=np.uint8)
        else:
            raw = rng.integers(0, 256, size=n_blocks * nbytes, dtype=np.uint8)
            # Keep every f16 scale finite and moderate: random bits could be NaN or huge.
            blocks = raw.reshape(n_blocks, nbytes)
            scale_offsets = {Q.Q6_K: [208]}.get(qtype, [0, 2] if qtype in (Q.Q4_1, Q.Q5_1, Q.Q4_K) else [0])
            for b in blocks:
                for off in scale_offsets:
                    b[off : off + 2] = np.frombuffer(np.float16(rng.uniform(-0.1, 0.1)).tobytes(), dtype=np.uint8)
            raw = blocks.reshape(-1)
        expected = gguf.dequantize(raw, qtype).reshape(-1)
        cases.append({"type": qtype.name, "bytes_hex": raw.tobytes().hex(), "values": [float(v) for v in expected]})
    write_json(FIXTURES / "dequant.json", {"oracle": f"gguf-py {gguf.__name__} dequantize", "cases": cases})


def main(argv):
    which = set(argv[1:]) or {"smollm", "tiny", "dequant"}
    if "dequant" in which:
        make_dequant_fixture()
    if "tiny" in which:
        make_tiny_models()
    if "smollm" in which:
        if not (SMOLLM_DIR / SMOLLM_GGUF).is_file():
            sys.exit("run scripts/fetch-model.sh first")
        tok, stock = smollm_tokenizer()
        make_smollm_tokenizer_fixture(tok, stock)
        make_smollm_chat_template_fixture(tok)
        make_smollm_golden(tok)


if __name__ == "__main__":
    main(sys.argv)
