#!/usr/bin/env python3
"""Hugging Face transformers as a peer, on the same model and the same requests as Pagoda.

Runs where torch (with a GPU) and transformers are installed. Prints one JSON line per run
(and, with --output-json, writes them all with the machine and versions to one file).

  python3 hf_peer.py --preset llama3-8b --save-model /tmp/llama3-8b-random \\
      --write-workload /tmp/w.jsonl --n 256 --input-len 512 --output-len 256 --modes static
  python3 hf_peer.py --model /tmp/llama3-8b-random --workload /tmp/w.jsonl --modes cb,bs1

The model: --model DIR loads a Hugging Face folder; --preset NAME builds one of that shape with
random weights (bf16, on the GPU; normal(0, 0.02), norms 1), and --save-model DIR writes it
(config.json + safetensors) so another engine loads exactly these weights. --save-config DIR
writes only the preset's config.json and exits (for llama3-70b, which fits no single GPU: an
engine that makes random weights itself loads it).

The requests: --workload FILE reads a JSONL file ({"prompt_token_ids": [...], "max_tokens": N}
a line; `pagoda bench workload` writes the ShareGPT-like and shared-prefix ones); otherwise
--n requests of --input-len / --output-len tokens (--lengths lognormal: log-normal around
them), seeded; --write-workload FILE writes them for the other engines.

Modes (--modes, comma-separated), each warmed up before it is timed:
  static  classic transformers serving: batches of --batch-size requests (a list such as
          64,256 runs each; the best is the peer's figure), left-padded, every request of a
          batch decoding until the batch's longest is done; useful tokens are each request's
          own max_tokens.
  cb      transformers' own continuous batching (generate_batch, paged KV cache).
  bs1     single stream: time to first token (the best of 3 one-token generations), then
          decode-only tokens/s over --output-len - 1 tokens, as `pagoda bench latency` reports.
  none    only build/save the model and write the workload.
--temperature 0 is greedy (the default); above 0 samples (top-p 1, no top-k).
Each run checks itself: every request must produce at least its max_tokens.
"""

import argparse
import json
import math
import os
import random
import sys
import time

import torch

# common.py sits beside this file; a copy elsewhere (package.sh puts one in .device/bin) finds it
# in the repository it runs from.
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.join(os.getcwd(), "scripts", "peers")]
import common  # noqa: E402

# Shapes of real models; the weights are random.
LLAMA3 = dict(num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
              max_position_embeddings=8192, rms_norm_eps=1e-5)
PRESETS = {
    # Llama-3-8B: 32 layers, hidden 4096, GQA 32q/8kv, SwiGLU 14336, vocab 128256.
    "llama3-8b": dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32),
    # Llama-3.2-1B: 16 layers, hidden 2048, tied embeddings.
    "llama3-1b": dict(LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      tie_word_embeddings=True),
    # Llama-3-70B: 141 GB in bf16, more than one GPU holds: use --save-config.
    "llama3-70b": dict(LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64),
}


def preset_config(name):
    from transformers import LlamaConfig

    return LlamaConfig(**PRESETS[name], bos_token_id=1, eos_token_id=2)


def random_model(name, seed):
    """A Llama of the preset's shape with random bf16 weights, built on the GPU."""
    from transformers import LlamaForCausalLM

    cfg = preset_config(name)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(before)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def load_model(args):
    if args.model:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).cuda().eval()
    model = random_model(args.preset, args.seed)
    if args.save_model:
        try:
            model.save_pretrained(args.save_model, safe_serialization=True)
        except TypeError:  # transformers without the argument (safetensors always)
            model.save_pretrained(args.save_model)
    return model


def generated_requests(args, vocab):
    """--n requests, fixed or log-normal lengths (sigma 0.8, clamped to 4..--max-len), seeded."""
    rng = random.Random(args.seed)
    requests = []
    for _ in range(args.n):
        if args.lengths == "fixed":
            il, ol = args.input_len, args.output_len
        else:
            il = min(args.max_len, max(4, int(rng.lognormvariate(math.log(args.input_len), 0.8))))
            ol = min(args.max_len, max(4, int(rng.lognormvariate(math.log(args.output_len), 0.8))))
        requests.append(([rng.randrange(10, vocab - 10) for _ in range(il)], ol))
    return requests


def sampling(args):
    if args.temperature > 0:
        return dict(do_sample=True, temperature=args.temperature, top_p=1.0, top_k=0)
    return dict(do_sample=False)


def sync():
    torch.cuda.synchronize()


def left_padded(batch):
    width = max(len(p) for p, _ in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (p, _) in enumerate(batch):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids.cuda(), mask.cuda()


def generate(model, args, ids, mask, new_tokens):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, pad_token_id=0, **sampling(args))


def run_static(model, args, requests, batch_size):
    """Fixed batches, left-padded; each batch runs until its longest request is done."""
    # Warm-up: the first batch's shape, a few tokens, untimed.
    ids, mask = left_padded(requests[:batch_size])
    generate(model, args, ids, mask, 4)
    sync()
    produced, expected = [], []
    started = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        ids, mask = left_padded(batch)
        longest = max(o for _, o in batch)
        out = generate(model, args, ids, mask, longest)
        made = out.shape[1] - ids.shape[1]
        produced += [min(made, o) for _, o in batch]  # each request's useful tokens
        expected += [o for _, o in batch]
    sync()
    return time.perf_counter() - started, expected, produced, dict(batch_size=batch_size)


def run_cb(model, args, requests):
    """transformers' continuous batching (paged KV cache): every request decodes the
    longest max_tokens (one generation config for all); its own max_tokens count."""
    from transformers import GenerationConfig

    longest = max(o for _, o in requests)
    config = GenerationConfig(max_new_tokens=longest, min_new_tokens=longest, eos_token_id=-1,
                              pad_token_id=0, **sampling(args))
    ids, mask = left_padded(requests[:1])
    generate(model, args, ids[:, :64], mask[:, :64], 4)  # warm-up
    sync()
    started = time.perf_counter()
    out = model.generate_batch(inputs=[p for p, _ in requests], generation_config=config)
    sync()
    elapsed = time.perf_counter() - started
    # generate_batch keys its results by request id ("req_0", ...) in submission order.
    results = list(out.values())
    made = [len(r.generated_tokens) for r in results] + [0] * (len(requests) - len(results))
    expected = [o for _, o in requests]
    return elapsed, expected, [min(m, o) for m, o in zip(made, expected)], dict(decoded_per_request=longest)


def run_bs1(model, args, requests):
    """Single stream: TTFT (best of 3 one-token runs), then decode-only tokens/s."""
    prompt = requests[0][0]
    ids = torch.tensor([prompt]).cuda()
    mask = torch.ones_like(ids)

    def timed(n):
        sync()
        started = time.perf_counter()
        out = generate(model, args, ids, mask, n)
        sync()
        return time.perf_counter() - started, out.shape[1] - ids.shape[1]

    timed(8)  # warm-up
    ttft = min(timed(1)[0] for _ in range(3))
    runs = [timed(args.output_len) for _ in range(2)]
    total = min(t for t, _ in runs)
    decode_s = total - ttft
    extra = dict(ttft_ms=round(ttft * 1e3, 2), prompt_len=len(prompt), e2e_s=round(total, 4),
                 decode_only=True, decode_tokens_per_s=round((args.output_len - 1) / decode_s, 2))
    return decode_s, [args.output_len] * 2, [min(n, args.output_len) for _, n in runs], extra


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--model", help="load this Hugging Face folder instead of a random preset")
    ap.add_argument("--save-model", help="write the random model here (config.json + safetensors)")
    ap.add_argument("--save-config", help="write only the preset's config.json here and exit")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--lengths", default="fixed", choices=["fixed", "lognormal"])
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--batch-size", default="256",
                    help="static batch size; a comma-separated list runs each (the best is the peer's figure)")
    ap.add_argument("--modes", default="static,cb")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workload", help="read the requests from this JSONL file")
    ap.add_argument("--write-workload", help="write the requests to this JSONL file")
    ap.add_argument("--output-json", help="write every run, with the machine and versions, here")
    args = ap.parse_args()

    if args.save_config:
        os.makedirs(args.save_config, exist_ok=True)
        cfg = preset_config(args.preset)
        cfg.dtype = "bfloat16"
        cfg.save_pretrained(args.save_config)
        print(json.dumps({"config": os.path.join(args.save_config, "config.json"), "preset": args.preset}))
        return

    started = time.perf_counter()
    model = load_model(args)
    load_s = time.perf_counter() - started
    vocab = model.config.vocab_size
    requests = common.read_workload(args.workload) if args.workload else generated_requests(args, vocab)
    if args.write_workload:
        common.write_workload(args.write_workload, requests)
    base = dict(peer="transformers", model=args.model or args.preset, n=len(requests), lengths=args.lengths,
                input_len=args.input_len, output_len=args.output_len, workload=args.workload,
                temperature=args.temperature, gpu=torch.cuda.get_device_name(), load_s=round(load_s, 1))
    runs = []
    for mode in [m for m in args.modes.split(",") if m and m != "none"]:
        sizes = [int(b) for b in str(args.batch_size).split(",")] if mode == "static" else [None]
        for bs in sizes:
            try:
                if mode == "static":
                    seconds, expected, produced, extra = run_static(model, args, requests, bs)
                elif mode == "cb":
                    seconds, expected, produced, extra = run_cb(model, args, requests)
                elif mode == "bs1":
                    seconds, expected, produced, extra = run_bs1(model, args, requests)
                else:
                    raise ValueError(f"unknown mode {mode}")
                finished = [p >= e for p, e in zip(produced, expected)]
                check = common.completion_check(expected, produced, finished)
                tokens = args.output_len - 1 if mode == "bs1" else sum(produced)
                run = dict(base, mode=mode, **extra, seconds=round(seconds, 3), output_tokens=tokens,
                           output_tok_s=round(tokens / seconds, 1),
                           req_s=None if mode == "bs1" else round(len(requests) / seconds, 3), check=check)
            except Exception as e:  # e.g. out of memory at a large static batch: record it, go on
                torch.cuda.empty_cache()
                run = dict(base, mode=mode, batch_size=bs, error=repr(e)[:500])
            print(json.dumps(run), flush=True)
            runs.append(run)
    if args.output_json:
        best = {}
        for r in runs:
            if "output_tok_s" in r and r["output_tok_s"] > best.get(r["mode"], {}).get("output_tok_s", -1):
                best[r["mode"]] = r
        result = dict(peer="transformers", environment=common.environment(), runs=runs,
                      best={m: dict(output_tok_s=r["output_tok_s"], batch_size=r.get("batch_size"))
                            for m, r in best.items()})
        if args.workload:
            result["workload"] = common.describe_workload(args.workload, requests)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    failed = [r for r in runs if "check" in r and not r["check"]["passed"]]
    if failed:
        print("self-check failed: " + "; ".join(f"{r['mode']}: {r['check']['message']}" for r in failed),
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
