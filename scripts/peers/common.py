"""What every peer run records, and the workload file every engine reads.

The workload is JSONL, one request a line: {"prompt_token_ids": [...], "max_tokens": N}
(`pagoda bench workload` and `hf_peer.py --write-workload` write it; `pagoda bench
throughput --dataset`, `pagoda bench serve --dataset`, vllm_peer.py and hf_peer.py read it).

Every result is one JSON object with the machine (GPU, driver), the versions of what ran,
the command line and the repository commit, so a figure can be traced to its run.
"""

import hashlib
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time


def read_workload(path):
    """The requests of a JSONL workload file, as (prompt_token_ids, max_tokens) pairs."""
    requests = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            prompt, max_tokens = r["prompt_token_ids"], int(r["max_tokens"])
            if not prompt or max_tokens < 1:
                raise ValueError(f"{path}:{n}: empty prompt or max_tokens < 1")
            requests.append((prompt, max_tokens))
    if not requests:
        raise ValueError(f"{path}: no requests")
    return requests


def write_workload(path, requests):
    with open(path, "w") as f:
        for prompt, max_tokens in requests:
            f.write(json.dumps({"prompt_token_ids": prompt, "max_tokens": max_tokens}) + "\n")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_workload(path, requests):
    prompt_lens = sorted(len(p) for p, _ in requests)
    output_lens = sorted(m for _, m in requests)
    return dict(
        path=str(path),
        sha256=file_sha256(path),
        requests=len(requests),
        prompt_tokens=sum(prompt_lens),
        expected_output_tokens=sum(output_lens),
        prompt_len_min_median_max=[prompt_lens[0], prompt_lens[len(prompt_lens) // 2], prompt_lens[-1]],
        output_len_min_median_max=[output_lens[0], output_lens[len(output_lens) // 2], output_lens[-1]],
    )


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(packages=("torch", "transformers", "vllm", "flashinfer-python", "triton")):
    """The machine and software of this run."""
    env = dict(
        time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        host=platform.node(),
        python=platform.python_version(),
        command=shlex.join([sys.executable] + sys.argv),
        cwd=os.getcwd(),
        commit=os.environ.get("PAGODA_COMMIT") or _run(["git", "rev-parse", "HEAD"]),
        versions={p: _version(p) for p in packages},
    )
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if smi:
        first = smi.splitlines()[0].split(", ")
        env.update(gpu=first[0], driver=first[1] if len(first) > 1 else None,
                   gpu_memory=first[2] if len(first) > 2 else None, gpu_count=len(smi.splitlines()))
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name()
            env["device_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    except Exception as e:  # a peer without torch still records the rest
        env["torch_error"] = repr(e)[:200]
    return env


def completion_check(expected, produced, finished):
    """The self-check of a run under ignore_eos: every request finished with exactly its
    max_tokens. `expected`, `produced` and `finished` are per-request lists."""
    unfinished = [i for i, f in enumerate(finished) if not f]
    mismatched = [i for i, (e, p, f) in enumerate(zip(expected, produced, finished)) if f and e != p]
    passed = not unfinished and not mismatched and sum(produced) == sum(expected)
    message = ""
    if not passed:
        name = lambda ids: ", ".join(f"request {i} ({produced[i]} of {expected[i]} tokens)" for i in ids[:3]) + (
            f", {len(ids) - 3} more" if len(ids) > 3 else "")
        message = (f"{sum(produced)} output tokens where the requests' max_tokens sum to {sum(expected)}; "
                   f"{len(finished) - len(unfinished)} of {len(finished)} requests finished")
        if unfinished:
            message += "; unfinished: " + name(unfinished)
        if mismatched:
            message += "; finished with another length than max_tokens: " + name(mismatched)
    return dict(requests=len(expected), finished_requests=len(finished) - len(unfinished),
                expected_output_tokens=sum(expected), output_tokens=sum(produced),
                mismatched_requests=len(mismatched), passed=passed, message=message)


def emit(result, path=None):
    """Print the result as one JSON line and write it to `path` (pretty) if given."""
    print(json.dumps(result), flush=True)
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
