#!/usr/bin/env bash
# Builds what a GPU session carries to the device machine (git-ignored .device/):
#   .device/bin/    pagoda (release, --features cuda), hf_peer.py
#   .device/kbin/   the test executables: cuda_model (whole model), conformance (every kernel)
#   .device/gguf.aa, .device/gguf.ab
#                   SmolLM2 split in two: the GGUF (98 MB) is larger than one call may
#                   carry (64 MiB), so two calls carry a half each (see session.sh join).
# Usage: scripts/gpu/package.sh [path/to/hf_peer.py]
set -euo pipefail
cd "$(dirname "$0")/../.."
PEER="${1:-../shared/bench/hf_peer.py}"
scripts/setup-cuda.sh >/dev/null
# shellcheck disable=SC1091
source .cuda/env.sh
MODEL="$(scripts/fetch-model.sh)"
mkdir -p .device/bin .device/kbin
cargo build --release --features cuda --bin pagoda
cp target/release/pagoda .device/bin/pagoda
test_exe() { # package, test target, extra cargo arguments
  cargo test --release -p "$1" --test "$2" "${@:3}" --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==sys.argv[1]: print(m["executable"])' "$2"
}
cp "$(test_exe pagoda cuda_model --features cuda)" .device/kbin/cuda_model
cp "$(test_exe pagoda-backend-cuda conformance)" .device/kbin/conformance
strip .device/bin/pagoda .device/kbin/*
cp "$PEER" .device/bin/hf_peer.py
rm -f .device/gguf.*
split -n 2 -d "$MODEL" .device/gguf.
sha256sum "$MODEL" | cut -d' ' -f1 > .device/bin/gguf.sha256
du -sh .device/bin .device/kbin .device/gguf.*
