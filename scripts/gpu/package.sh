#!/usr/bin/env bash
# Builds what a GPU session carries to the device machine (git-ignored .device/):
#   .device/bin/    pagoda (release, --features cuda), hf_peer.py
#   .device/kbin/   conformance (every kernel against the CPU reference) and the backend's device
#                   tests (async sampling, staged uploads, graphs...)
#   .device/kbench/ the kernel bench (its own folder: kbin + a GGUF third fill a call's 64 MiB)
#   .device/mtest/  cuda_model (the whole model on the GPU, and the oracle comparison of issue 15)
#   .device/tp/     tensor parallelism: nccl (the NCCL communicator's tests) and cuda_tensor_parallel
#                   (TP N greedy tokens against one GPU's); with .device/bin it is over one call's
#                   64 MiB, so a TP session carries bin first and keeps it (session.sh keep-bin)
#   .device/whl/    the gguf wheel (pure Python; its needs numpy, pyyaml, requests and tqdm are on
#                   the GPU machine's image) that transformers needs to read a GGUF, for
#                   scripts/gpu/oracle.py (session.sh oracle-setup installs it)
#   .device/gguf.00, .01, .02
#                   SmolLM2 split in three: the GGUF (98 MB) is larger than one call may
#                   carry (64 MiB), so three calls each carry a third beside a binary
#                   folder (see session.sh stash and join).
# Usage: scripts/gpu/package.sh [path/to/hf_peer.py]
set -euo pipefail
# shellcheck source=scripts/lib/on-error.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib/on-error.sh"
cd "$(dirname "$0")/../.."
PEER="${1:-scripts/peers/hf_peer.py}"
[ -f "$PEER" ] || die "$PEER (the transformers peer for bench8b) is missing: pass its path as the first argument"
scripts/setup-cuda.sh >/dev/null
# shellcheck disable=SC1091
source .cuda/env.sh
MODEL="$(scripts/fetch-model.sh)"
mkdir -p .device/bin .device/kbin .device/kbench .device/mtest .device/tp .device/whl
cargo build --release --features cuda --bin pagoda
cp target/release/pagoda .device/bin/pagoda
# Prints the path of the executable cargo builds for target $1 from its JSON
# messages (`cargo ... --no-run --message-format=json` on stdin); compiler
# errors go to stderr, and no executable is an error naming the target.
exe_of() {
  python3 -c 'import json, sys
found = None
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-message" and m["message"].get("level") == "error":
        sys.stderr.write(m["message"].get("rendered") or "")
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        found = m["executable"]
if not found:
    sys.exit("error: package.sh: cargo built no executable for " + sys.argv[1])
print(found)' "$1"
}
test_exe() { # package, test target, extra cargo arguments
  cargo test --release -p "$1" --test "$2" "${@:3}" --no-run --message-format=json | exe_of "$2"
}
cp "$(test_exe pagoda cuda_model --features cuda)" .device/mtest/cuda_model
cp "$(test_exe pagoda-backend-cuda conformance)" .device/kbin/conformance
cp "$(test_exe pagoda-backend-cuda device)" .device/kbin/device
cp "$(test_exe pagoda-backend-cuda nccl)" .device/tp/nccl
cp "$(test_exe pagoda cuda_tensor_parallel --features cuda)" .device/tp/cuda_tensor_parallel
cp "$(cargo bench -p pagoda-backend-cuda --bench kernels --no-run --message-format=json | exe_of kernels)" \
  .device/kbench/kernels
strip .device/bin/pagoda .device/kbin/* .device/kbench/* .device/mtest/* .device/tp/*
cp "$PEER" .device/bin/hf_peer.py
rm -f .device/gguf.*
split -n 3 -d "$MODEL" .device/gguf.
sha256sum "$MODEL" | cut -d' ' -f1 > .device/bin/gguf.sha256
# The version transformers' GGUF reader was checked with here (the fixtures too).
rm -f .device/whl/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: -d .device/whl gguf==0.19.0
du -sh .device/bin .device/kbin .device/kbench .device/mtest .device/tp .device/whl .device/gguf.*
# A call carries at most 64 MiB: the largest oracle call (session.sh's header) must fit.
mib() { du -cm "$@" | tail -1 | cut -f1; }
[ "$(mib .device/mtest .device/whl .device/gguf.00)" -lt 63 ] \
  || echo "package.sh: warning: mtest + whl + one GGUF third exceed what one call carries (64 MiB):" \
    "carry them in separate calls, xz-compressed (scripts/gpu/lease.sh pack)" >&2
