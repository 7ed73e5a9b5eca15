#!/usr/bin/env python3
"""vLLM as a peer: the same model folder and the same JSONL requests Pagoda reads.

Modes (each prints one JSON line and writes it to --output-json):

  throughput  offline, like `vllm bench throughput`: every request of --workload at once
              through the LLM API, prompts as token ids, ignore_eos, each request's own
              max_tokens; elapsed time of llm.generate() alone (the engine is built first).
              --run FILE:TEMPERATURE[:LABEL] (repeatable) runs several workloads and
              temperatures in one engine, resetting the prefix cache before each.
  latency     single stream, like `pagoda bench latency`: one warm-up request, then
              --num-iters requests of --input-len random prompt tokens (a fresh prompt each,
              so the prefix cache cannot help) and --output-len output tokens, one at a time,
              stepping the engine to see the first token: TTFT and decode-only tokens/s
              ((output_len - 1) / (end - first token)). Also the cold start: process start
              (--process-start, else the process's creation time) to the warm-up's first token.
  coldstart   only the cold start: the latency mode with no timed runs.
  describe    no engine: the machine and versions, and the lines of --log (a `vllm serve`
              log) that say what vLLM chose (attention backend, CUDA graphs, KV cache).

vLLM runs with its defaults (CUDA graphs and torch.compile, prefix caching, chunked prefill,
its own max_num_batched_tokens); --engine-arg KEY=VALUE changes one (logged in the JSON).
A model folder without a tokenizer (random-weight benchmark models) runs with
skip_tokenizer_init: token ids in, token ids out, no text.

Every run checks itself: each request must finish with exactly its max_tokens; a run that
does not exits 1 after writing its JSON.

  python3 vllm_peer.py throughput --model DIR --workload W.jsonl --output-json out.json
  python3 vllm_peer.py latency --model DIR --input-len 512 --output-len 128 --num-iters 3
"""

import argparse
import json
import os
import random
import re
import sys
import threading
import time

# common.py sits beside this file; a copy elsewhere (package.sh puts one in .device/bin) finds it
# in the repository it runs from.
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)), os.path.join(os.getcwd(), "scripts", "peers")]
import common  # noqa: E402

# Log lines worth keeping in the result: what vLLM chose, and what went wrong.
KEEP = re.compile(
    r"attention backend|FlashAttention version|Using .*backend|cudagraph|CUDA graph|graph captur|"
    r"torch\.compile|compil|KV cache|Maximum concurrency|prefix cach|chunked prefill|"
    r"async.scheduling|max_num_batched_tokens|Model loading took|init engine|"
    r"Initializing a V1 LLM engine|Traceback|Error|WARNING",
    re.IGNORECASE,
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class LogTap:
    """Passes this process's stdout and stderr, and those of the engine processes it starts
    (they inherit both), through to the real stdout, keeping the lines that KEEP matches."""

    def __init__(self, limit=300):
        self.lines, self.limit, self.partial = [], limit, b""
        sys.stdout.flush()
        sys.stderr.flush()
        self.out = os.dup(1)
        self.err = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        self.read = read
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        while True:
            try:
                chunk = os.read(self.read, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            os.write(self.out, chunk)
            self.partial += chunk
            *done, self.partial = self.partial.split(b"\n")
            for raw in done:
                line = ANSI.sub("", raw.decode("utf-8", "replace")).strip()
                if KEEP.search(line) and len(self.lines) < self.limit:
                    self.lines.append(line[:4000])

    def close(self):
        """Stops passing output through; returns the kept lines."""
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.out, 1)
        os.dup2(self.err, 2)
        # Engine processes may still hold the pipe: do not wait for them.
        self.thread.join(timeout=2)
        return list(self.lines)


def attention_backend(lines):
    """The attention backend vLLM picked, from its log ("Using X attention backend ...")."""
    for line in lines:
        m = re.search(r"Using (\S+) attention backend", line) or re.search(r"Using (\S+) backend\.", line)
        if m:
            return m.group(1)
    return None


def has_tokenizer(model):
    return any(os.path.exists(os.path.join(model, f))
               for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def parse_engine_args(pairs):
    """KEY=VALUE pairs; a VALUE that parses as JSON is taken as such (16384, true, "x")."""
    out = {}
    for pair in pairs or []:
        key, _, value = pair.partition("=")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            out[key.replace("-", "_")] = value
    return out


def make_llm(args):
    from vllm import LLM

    kwargs = dict(model=args.model, seed=args.seed)
    if args.tokenizer:
        kwargs["tokenizer"] = args.tokenizer
    elif not has_tokenizer(args.model):
        kwargs["skip_tokenizer_init"] = True
    kwargs.update(parse_engine_args(args.engine_arg))
    started = time.perf_counter()
    llm = LLM(**kwargs)
    return llm, time.perf_counter() - started, kwargs


def _plain(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v][:80]
    return str(v)


def engine_config(llm):
    """The settings vLLM ended up with (its defaults plus --engine-arg)."""
    out = {}
    try:
        c = llm.llm_engine.vllm_config
    except AttributeError:
        return out
    wanted = {
        "model_config": ("model", "dtype", "max_model_len", "skip_tokenizer_init", "enforce_eager"),
        "cache_config": ("block_size", "gpu_memory_utilization", "enable_prefix_caching", "num_gpu_blocks",
                         "cache_dtype", "prefix_caching_hash_algo"),
        "scheduler_config": ("max_num_batched_tokens", "max_num_seqs", "enable_chunked_prefill",
                             "async_scheduling", "max_num_partial_prefills", "long_prefill_token_threshold"),
        "compilation_config": ("mode", "level", "cudagraph_mode", "max_cudagraph_capture_size",
                               "cudagraph_capture_sizes"),
        "attention_config": ("backend", "flash_attn_version"),
    }
    for section, names in wanted.items():
        obj = getattr(c, section, None)
        if obj is not None:
            out[section] = {n: _plain(getattr(obj, n, None)) for n in names if hasattr(obj, n)}
    return out


def sampling_params(args, max_tokens, has_tok):
    from vllm import SamplingParams

    # vllm bench throughput's settings: n=1, top_p=1, ignore_eos, the request's max_tokens.
    return SamplingParams(n=1, temperature=args.temperature, top_p=1.0, ignore_eos=True,
                          max_tokens=max_tokens, detokenize=args.detokenize and has_tok)


def base_result(args, mode):
    return dict(peer="vllm", mode=mode, model=args.model, temperature=args.temperature,
                detokenize=bool(args.detokenize), label=args.label, environment=common.environment())


def finish(result, tap, llm=None, path=None):
    lines = tap.close() if tap else []
    if llm is not None:
        result["engine_config"] = engine_config(llm)
    result["attention_backend"] = attention_backend(lines)
    result["log"] = lines
    common.emit(result, path)
    if "check" in result and not result["check"]["passed"]:
        print("self-check failed, the figures are not a valid measurement: " + result["check"]["message"],
              file=sys.stderr)
        sys.exit(1)


def throughput_runs(args):
    """(workload file, temperature, label) of each run: --run FILE:TEMPERATURE[:LABEL]
    (repeatable), else --workload at --temperature."""
    if args.run:
        runs = []
        for spec in args.run:
            path, temperature, *label = spec.split(":")
            runs.append((path, float(temperature), label[0] if label else os.path.basename(path)))
        return runs
    return [(args.workload, args.temperature, args.label or os.path.basename(args.workload))]


def one_throughput_run(args, llm, has_tok, path, temperature, label):
    from vllm.inputs import TokensPrompt

    requests = common.read_workload(path)
    run_args = argparse.Namespace(**{**vars(args), "temperature": temperature})
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in requests]
    params = [sampling_params(run_args, m, has_tok) for _, m in requests]
    # Each run starts from an empty prefix cache, as a fresh engine would.
    llm.reset_prefix_cache()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - started
    produced = [len(o.outputs[0].token_ids) if o.outputs else 0 for o in outputs]
    finished = [bool(o.finished) for o in outputs]
    if len(outputs) < len(requests):  # lost requests count as unfinished
        produced += [0] * (len(requests) - len(outputs))
        finished += [False] * (len(requests) - len(outputs))
    expected = [m for _, m in requests]
    prompt_tokens = sum(len(p) for p, _ in requests)
    out_tokens = sum(produced)
    cached = [getattr(o, "num_cached_tokens", None) for o in outputs]
    run = dict(
        label=label, temperature=temperature, detokenize=bool(args.detokenize and has_tok),
        workload=common.describe_workload(path, requests),
        num_requests=len(requests), prompt_tokens=prompt_tokens, output_tokens=out_tokens,
        elapsed_s=round(elapsed, 3), requests_per_s=round(len(requests) / elapsed, 3),
        output_tokens_per_s=round(out_tokens / elapsed, 1),
        total_tokens_per_s=round((prompt_tokens + out_tokens) / elapsed, 1),
        check=common.completion_check(expected, produced, finished),
    )
    if cached and all(isinstance(c, int) for c in cached):
        run["prefix_cache_hit_tokens"] = sum(cached)
        run["prefix_cache_hit_rate"] = round(sum(cached) / prompt_tokens, 4)
    print(f"{label} T={temperature}: {run['output_tokens_per_s']} output tok/s, "
          f"{run['elapsed_s']} s, check {'passed' if run['check']['passed'] else 'FAILED'}", flush=True)
    return run


def run_throughput(args):
    runs = throughput_runs(args)
    for path, _, _ in runs:
        common.read_workload(path)  # fail before the engine is built
    tap = LogTap()
    llm, load_s, kwargs = make_llm(args)
    has_tok = not kwargs.get("skip_tokenizer_init", False)
    results = [one_throughput_run(args, llm, has_tok, *run) for run in runs]
    result = base_result(args, "throughput")
    result.update(llm_kwargs={k: _plain(v) for k, v in kwargs.items()}, load_s=round(load_s, 2), runs=results)
    passed = all(r["check"]["passed"] for r in results)
    result["check"] = dict(passed=passed, message="; ".join(
        f"{r['label']} T={r['temperature']}: {r['check']['message']}" for r in results if not r["check"]["passed"]))
    finish(result, tap, llm, args.output_json)


def process_creation_time():
    """When this process started, as a Unix time (Linux: /proc; else now)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return time.time()


def run_latency(args, timed_iters):
    from vllm.inputs import TokensPrompt

    process_start = args.process_start or process_creation_time()
    tap = LogTap()
    llm, load_s, kwargs = make_llm(args)
    has_tok = not kwargs.get("skip_tokenizer_init", False)
    engine = llm.llm_engine
    vocab = engine.model_config.get_vocab_size()
    params = sampling_params(args, args.output_len, has_tok)
    fixed_prompt = None
    if args.prompt_ids_from:
        with open(args.prompt_ids_from) as f:
            fixed_prompt = json.load(f)["prompt_token_ids"]
    ttft, decode, e2e, expected, produced, finished = [], [], [], [], [], []
    cold_start_s = None
    for it in range(timed_iters + 1):
        if fixed_prompt is not None:
            # The same prompt each run (pagoda's, token for token): the prefix cache is emptied.
            llm.reset_prefix_cache()
            prompt = list(fixed_prompt)
        else:
            # A fresh random prompt each run (away from the vocabulary's ends, where special
            # tokens live), so the prefix cache cannot help.
            rng = random.Random(1000 + it)
            prompt = [rng.randrange(10, vocab - 10) for _ in range(args.input_len)]
        started, first, first_wall, final = time.perf_counter(), None, None, None
        engine.add_request(f"latency-{it}", TokensPrompt(prompt_token_ids=prompt), params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None and out.outputs and len(out.outputs[0].token_ids) > 0:
                    first, first_wall = time.perf_counter() - started, time.time()
                if out.finished:
                    final = out
        total = time.perf_counter() - started
        n = len(final.outputs[0].token_ids) if final is not None and final.outputs else 0
        expected.append(args.output_len)
        produced.append(n)
        finished.append(final is not None)
        first = total if first is None else first
        if it == 0:
            cold_start_s = (first_wall or time.time()) - process_start
            continue
        ttft.append(first)
        decode.append((args.output_len - 1) / (total - first) if total > first else float("nan"))
        e2e.append(total)
    median = lambda v: sorted(v)[len(v) // 2] if len(v) % 2 else sum(sorted(v)[len(v) // 2 - 1:len(v) // 2 + 1]) / 2
    result = base_result(args, "latency" if timed_iters else "coldstart")
    result.update(
        llm_kwargs={k: _plain(v) for k, v in kwargs.items()},
        input_len=len(fixed_prompt) if fixed_prompt is not None else args.input_len,
        output_len=args.output_len, num_iters=timed_iters,
        prompt_ids_from=args.prompt_ids_from,
        load_s=round(load_s, 2), cold_start_s=round(cold_start_s, 3),
        process_start_from=("--process-start" if args.process_start else "process creation time"),
        compile_cache=os.environ.get("PEER_COMPILE_CACHE"),
        check=common.completion_check(expected, produced, finished),
    )
    if timed_iters:
        result.update(ttft_s=[round(x, 5) for x in ttft], decode_tokens_per_s=[round(x, 2) for x in decode],
                      e2e_s=[round(x, 4) for x in e2e], median_ttft_s=round(median(ttft), 5),
                      median_decode_tokens_per_s=round(median(decode), 2))
    finish(result, tap, llm, args.output_json)


def run_describe(args):
    lines = []
    if args.log and os.path.exists(args.log):
        with open(args.log, errors="replace") as f:
            for raw in f:
                line = ANSI.sub("", raw).strip()
                if KEEP.search(line) and len(lines) < 300:
                    lines.append(line[:4000])
    result = base_result(args, "describe")
    result.update(server_command=args.server_command, log_file=args.log,
                  attention_backend=attention_backend(lines), log=lines)
    common.emit(result, args.output_json)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["throughput", "latency", "coldstart", "describe"])
    ap.add_argument("--model", help="model folder (config.json + safetensors [+ tokenizer])")
    ap.add_argument("--tokenizer", help="a tokenizer folder, for a model folder without one")
    ap.add_argument("--workload", help="throughput: the JSONL requests")
    ap.add_argument("--run", action="append", metavar="FILE:TEMPERATURE[:LABEL]",
                    help="throughput: one run of this workload at this temperature (repeatable; "
                         "all in one engine, the prefix cache reset before each)")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-iters", type=int, default=3, help="latency: timed runs after one warm-up")
    ap.add_argument("--prompt-ids-from", metavar="JSON",
                    help="latency: the prompt_token_ids of a `pagoda bench latency --prompt-file` result, "
                         "as the prompt of every run")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy; vllm bench throughput samples at 1.0 (top_p 1)")
    ap.add_argument("--detokenize", action="store_true", help="make text (needs a tokenizer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine-arg", action="append", metavar="KEY=VALUE",
                    help="an LLM(...) keyword changed from vLLM's default (repeatable)")
    ap.add_argument("--process-start", type=float,
                    help="cold start: the process's start as a Unix time (date +%%s.%%N before exec)")
    ap.add_argument("--log", help="describe: a vllm serve log to read")
    ap.add_argument("--server-command", help="describe: the vllm serve command line, recorded")
    ap.add_argument("--label", help="a name recorded in the result (e.g. the workload's)")
    ap.add_argument("--output-json")
    args = ap.parse_args()
    if args.mode == "describe":
        return run_describe(args)
    if not args.model:
        ap.error("--model is required")
    if args.mode == "throughput":
        if not args.workload and not args.run:
            ap.error("throughput needs --workload or --run")
        return run_throughput(args)
    if args.output_len < 2:
        ap.error("--output-len must be at least 2 to time decoding")
    return run_latency(args, args.num_iters if args.mode == "latency" else 0)


if __name__ == "__main__":
    main()
