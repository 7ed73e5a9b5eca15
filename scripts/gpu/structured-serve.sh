#!/usr/bin/env bash
# Structured outputs and tool calls through `pagoda serve --device cuda` on SmolLM2 (issue 17).
# The GGUF travels in three thirds (a call carries 64 MiB): `stash` copies this call's
# .device/gguf.0N into /tmp/pagoda-gpu, `serve` joins them and runs the check.
# Carry: .device/gguf.0N per call; the last one also .device/bin (pagoda).
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
W=/tmp/pagoda-gpu; mkdir -p "$W"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
for phase in "$@"; do
  case $phase in
    stash) cp .device/gguf.0* "$W/" && ls -la "$W" ;;
    serve)
      GGUF="$W/SmolLM2-135M-Instruct.Q4_1.gguf"
      cat "$W"/gguf.00 "$W"/gguf.01 "$W"/gguf.02 > "$GGUF"
      .device/bin/pagoda serve --device cuda --model "$GGUF" --port 8123 \
        --enable-auto-tool-choice --tool-call-parser hermes > "$OUT/serve.log" 2>&1 &
      pid=$!
      for _ in $(seq 1 120); do curl -sf http://127.0.0.1:8123/health >/dev/null && break; sleep 1; done
      python3 scripts/gpu/structured_serve_check.py http://127.0.0.1:8123 2>&1 | tee "$OUT/structured_serve.log"
      kill -TERM $pid; wait $pid ;;
  esac
done
