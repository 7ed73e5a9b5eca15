#!/usr/bin/env bash
# Builds what a GPU session carries to the device machine (git-ignored .device/):
#   .device/bin/    pagoda (release, --features cuda), hf_peer.py
#   .device/kbin/   conformance (every kernel against the CPU reference) and the backend's device
#                   tests (async sampling, staged uploads, graphs...)
#   .device/kbench/ the kernel bench (its own folder: kbin + a GGUF third fill a call's 64 MiB)
#   .device/mtest/  cuda_model (the whole model on the GPU)
#   .device/gguf.00, .01, .02
#                   SmolLM2 split in three: the GGUF (98 MB) is larger than one call may
#                   carry (64 MiB), so three calls each carry a third beside a binary
#                   folder (see session.sh stash and join).
# Usage: scripts/gpu/package.sh [path/to/hf_peer.py]
set -euo pipefail
cd "$(dirname "$0")/../.."
PEER="${1:-../shared/bench/hf_peer.py}"
scripts/setup-cuda.sh >/dev/null
# shellcheck disable=SC1091
source .cuda/env.sh
MODEL="$(scripts/fetch-model.sh)"
mkdir -p .device/bin .device/kbin .device/kbench .device/mtest
cargo build --release --features cuda --bin pagoda
cp target/release/pagoda .device/bin/pagoda
test_exe() { # package, test target, extra cargo arguments
  cargo test --release -p "$1" --test "$2" "${@:3}" --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==sys.argv[1]: print(m["executable"])' "$2"
}
cp "$(test_exe pagoda cuda_model --features cuda)" .device/mtest/cuda_model
cp "$(test_exe pagoda-backend-cuda conformance)" .device/kbin/conformance
cp "$(test_exe pagoda-backend-cuda device)" .device/kbin/device
cargo bench -p pagoda-backend-cuda --bench kernels --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="kernels": print(m["executable"])' \
  | xargs -I{} cp {} .device/kbench/kernels
strip .device/bin/pagoda .device/kbin/* .device/kbench/* .device/mtest/*
cp "$PEER" .device/bin/hf_peer.py
rm -f .device/gguf.*
split -n 3 -d "$MODEL" .device/gguf.
sha256sum "$MODEL" | cut -d' ' -f1 > .device/bin/gguf.sha256
du -sh .device/bin .device/kbin .device/kbench .device/mtest .device/gguf.*
