#!/usr/bin/env bash
# Builds the CUDA backend's GPU test executables and kernel bench (release,
# stripped) into the git-ignored .device/ folder, to be carried to a GPU
# machine and run there with crates/backend-cuda/scripts/gpu-check.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
cd "$ROOT"
# shellcheck disable=SC1091
[ -f .cuda/env.sh ] && source .cuda/env.sh
mkdir -p .device
rm -f .device/device .device/conformance .device/kernels
cargo build -p pagoda-backend-cuda --release --tests --benches --message-format=json 2>/dev/null \
  | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if "backend-cuda" not in m["package_id"] or m["target"]["name"] not in ("device", "conformance", "kernels"):
        continue
    shutil.copy(m["executable"], ".device/" + m["target"]["name"])
'
strip .device/device .device/conformance .device/kernels
ls -la .device
du -sh .device
