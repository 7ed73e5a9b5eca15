#!/usr/bin/env bash
# Downloads here the wheels vLLM 0.24.0 needs on the GPU machine (scripts/gpu/vllm-wheels.txt,
# every hash checked by pip) and splits them into parts a device call can carry: one folder per
# call, .device/vllm/NN/ (git-ignored), each with part.NN and manifest.sha256 (the hash of every
# part and of every wheel). On the GPU machine, scripts/gpu/peers.sh vllm-stash keeps each
# call's part, and vllm-install joins them, checks every hash and installs.
#
# Usage: scripts/gpu/vllm-wheels.sh        (needs Python's pip and PyPI here, nothing else)
#   VLLM_PRUNE=0   carry the vLLM wheel whole (two more parts; see "Pruned" below)
#   PART_MIB=58    the largest part; a call carries at most 64 MiB with the working tree
#
# The set. The GPU machine has Python 3.12, torch 2.11.0+cu130 (the version vLLM 0.24.0 pins;
# its kernels link libcudart.so.13), torchvision 0.26.0, torchaudio 2.11.0, transformers 5.17,
# and most of vLLM's smaller needs (KINDS.md). `pip install --dry-run vllm==0.24.0` with that
# torch taken as installed resolves 177 packages; 67 are on the machine and 110 are not. Of those
# 110 these 39 are carried: the ones vLLM imports when it builds an engine and serves a Llama
# model. They were found by importing, with only this set on top of the machine's packages
# (torch 2.11.0+cu130 on a CPU machine, a stub libcuda and torch told it has an H100), every
# module the LLM API, the engine core and its GPU worker, the Llama model, the FlashAttention
# backend, the sampler, torch.compile's integration and `vllm serve` load, plus every vLLM
# module their functions import, and reading what the rest would pull in:
#   vllm itself; pydantic, pydantic-core, annotated-types, typing-inspection (config);
#   msgspec, pyzmq, cbor2, blake3, cachetools, setproctitle (engine core and its processes);
#   xgrammar, apache-tvm-ffi, llguidance (the engine core's structured-output manager imports
#   both backends at start); openai, jiter, sniffio, httpx2, httpcore2, truststore,
#   openai-harmony (request types, imported by config); fastapi, starlette, uvicorn, httptools,
#   python-multipart, prometheus-fastapi-instrumentator, watchfiles, model-hosting-container-
#   standards, jmespath, partial-json-parser, pybase64, jsonschema, referencing, rpds-py,
#   jsonschema-specifications (vllm serve); depyf, dill, astor (torch.compile's diagnostics).
#   httptools is uvicorn's fast HTTP parser, which a `pip install vllm` has and the serve runs
#   should too.
# Left out (71), each only imported on a path a bf16 Llama on one Hopper GPU does not take:
#   flashinfer-python and flashinfer-cubin (447 MB; vLLM ranks FlashAttention 3 above FlashInfer
#   on Hopper, and FlashInfer's sampler only does top-k/top-p, which these runs do not ask for;
#   peers.sh sets VLLM_USE_FLASHINFER_SAMPLER=0, without which vLLM imports FlashInfer to build
#   its sampler; vLLM's FlashInfer autotuning at start is skipped too), torch-c-dlpack-ext,
#   nvidia-cudnn-frontend, nvidia-cutlass-dsl and its libs, quack-kernels, cuda-python,
#   cuda-tile, nvidia-cuda-nvcc/-nvvm/-crt/-cccl/-tileiras, tilelang, z3-solver, tokenspeed-mla,
#   tokenspeed-triton, humming-kernels, kernels, pyelftools, fastsafetensors (kernels for FP4/FP8, MoE,
#   MLA, Blackwell, DeepSeek or other loaders); compressed-tensors (quantized checkpoints);
#   outlines-core, lm-format-enforcer, interegular, lark, diskcache (structured-output backends
#   other than the two imported); mistral-common, pycountry, pydantic-extra-types, ijson
#   (Mistral tokenizer and tools); anthropic, docstring-parser, mcp, mcp-types, pydantic-settings,
#   python-dotenv, sse-starlette, pyjwt, cryptography, cffi, pycparser (the Anthropic API and
#   tool servers); opentelemetry-* and googleapis-common-protos (tracing); python-json-logger
#   (JSON logging config); supervisor, loguru, tomlkit (SageMaker); fastapi-cli,
#   fastapi-cloud-cli, rich-toolkit, rignore, fastar, sentry-sdk, agent-detector,
#   detect-installer, email-validator, dnspython, websockets (fastapi[standard]'s command line
#   and cloud tools, realtime websockets).
# Of the 67 on the machine, the versions vLLM pins may differ there: numba (==0.65.0) is only
#   imported for n-gram speculative decoding; the others it constrains (transformers>=5.5.3,
#   tokenizers, safetensors, aiohttp, protobuf, setuptools) are new enough by KINDS.md's list or
#   not imported on these paths.
# Pruned (VLLM_PRUNE=1, the default): four parts instead of six. From the vLLM wheel, files no
#   run here loads: vllm_flash_attn/_vllm_fa2_C.abi3.so (FlashAttention 2, 81 MB compressed:
#   on Hopper vLLM uses FlashAttention 3, and a missing FA2 is a case vLLM handles, it only
#   marks FA2 unavailable); vllm-rs (the Rust frontend, used only with VLLM_USE_RUST_FRONTEND=1);
#   third_party/deep_gemm and third_party/fmha_sm100 (FP8 GEMMs and Blackwell attention). The
#   file PRUNED.txt inside the parts lists them; RECORD is rewritten to match.
set -euo pipefail
# shellcheck source=scripts/lib/on-error.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/on-error.sh"
cd "$(dirname "$0")/../.."
LOCK=scripts/gpu/vllm-wheels.txt
DL=.device/vllm-download
STAGE=.device/vllm-stage
OUTDIR=.device/vllm
PART_MIB="${PART_MIB:-58}"
PY="${PYTHON:-python3}"
"$PY" -m pip --version >/dev/null 2>&1 || die "$PY has no pip (set PYTHON to a Python with pip)"

PLATFORMS=()
for n in 5 12 17 24 26 27 28 31; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)
mkdir -p "$DL"
echo "downloading $(grep -c '==' "$LOCK") wheels into $DL (pip checks each hash)"
PAGODA_STEP="pip download" "$PY" -m pip download -q --no-deps --only-binary=:all: --require-hashes \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" \
  -d "$DL" -r "$LOCK"

rm -rf "$STAGE" "$OUTDIR"
mkdir -p "$STAGE" "$OUTDIR"
# Only the wheels the lock names (an older download may have left others in $DL).
PAGODA_STEP="stage" "$PY" - "$LOCK" "$DL" "$STAGE" "${VLLM_PRUNE:-1}" <<'EOF'
import hashlib, os, re, shutil, sys, zipfile
lock, dl, stage, prune = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
want = {}
for line in open(lock):
    m = re.match(r"([A-Za-z0-9_.-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})", line)
    if m:
        want[(norm(m[1]), m[2])] = m[3]
found = {}
for f in os.listdir(dl):
    if f.endswith(".whl"):
        name, version = f.split("-")[:2]
        key = (norm(name), version)
        if key in want:
            digest = hashlib.sha256(open(os.path.join(dl, f), "rb").read()).hexdigest()
            if digest != want[key]:
                sys.exit(f"error: {f}: sha256 {digest}, the lock says {want[key]}")
            found[key] = f
missing = sorted(set(want) - set(found))
if missing:
    sys.exit(f"error: not downloaded: {missing}")
# Files of the vLLM wheel that no run on a Hopper GPU with a bf16 Llama loads (see the header).
PRUNE = re.compile(r"^vllm/(vllm_flash_attn/_vllm_fa2_C\.abi3\.so|vllm-rs|third_party/(deep_gemm|fmha_sm100)/.*)$")
for key, f in sorted(found.items()):
    src, dst = os.path.join(dl, f), os.path.join(stage, f)
    if key[0] != "vllm" or not prune:
        shutil.copyfile(src, dst)
        continue
    removed = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if PRUNE.match(info.filename):
                removed.append(f"{info.filename} ({info.compress_size} bytes compressed)")
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l for l in data.splitlines(keepends=True)
                                if not PRUNE.match(l.split(b",")[0].decode()))
            zout.writestr(info, data, compress_type=info.compress_type)
    with open(os.path.join(stage, "PRUNED.txt"), "w") as out:
        out.write(f"Removed from {f} (sha256 {want[key]} as downloaded):\n")
        out.write("".join(r + "\n" for r in removed))
    print(f"pruned {len(removed)} files from {f}: "
          f"{os.path.getsize(src) / 2**20:.1f} -> {os.path.getsize(dst) / 2**20:.1f} MiB")
EOF

(cd "$STAGE" && tar -cf ../vllm-wheels.tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 ./*)
TAR=.device/vllm-wheels.tar
bytes=$(stat -c %s "$TAR")
parts=$(( (bytes + PART_MIB * 1048576 - 1) / (PART_MIB * 1048576) ))
split -n "$parts" -d -a 2 "$TAR" "$STAGE/part."
{
  (cd "$STAGE" && sha256sum part.*)
  (cd "$STAGE" && sha256sum ./*.whl | sed 's#  \./#  #')
} > "$STAGE/manifest.sha256"
for p in "$STAGE"/part.*; do
  n="${p##*.}"
  mkdir -p "$OUTDIR/$n"
  mv "$p" "$OUTDIR/$n/"
  cp "$STAGE/manifest.sha256" "$OUTDIR/$n/"
done
rm -f "$TAR"

echo
echo "wheels (as carried):"
(cd "$STAGE" && ls -S ./*.whl | while read -r w; do
  printf '  %8.1f MiB  %s\n' "$(echo "$(stat -c %s "$w") / 1048576" | bc -l)" "${w#./}"
done)
printf 'total %.1f MiB in %d parts of at most %d MiB: %d device calls, each carrying one folder:\n' \
  "$(echo "$bytes / 1048576" | bc -l)" "$parts" "$PART_MIB" "$parts"
du -sh "$OUTDIR"/* | sed 's/^/  /'
rm -f "$STAGE"/*.whl
