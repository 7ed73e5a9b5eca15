#!/usr/bin/env python3
"""The dashboard's browser test: headless Chromium against a running `pagoda serve`.

1. Puts the server under load (concurrent completions sharing a prompt prefix).
2. Loads /dashboard in headless Chromium (driven over the DevTools protocol on a
   pipe: no websocket library, no browser download), waits for the KV map to be
   drawn with blocks in use, and saves a screenshot.
3. Points the mouse at a block a running sequence holds: the tooltip names the block, its ref
   count, the request and the logical block index.
4. Checks the screenshot (decoded here with zlib, no imaging library) region by
   region: the header's dark bar, owned (blue) and free (grey) cells inside the
   map's box, and chart lines in the step-time chart's box. Regions come from the
   page's own layout (getBoundingClientRect), so this is no pixel-exact golden.
5. Once the load has finished and the engine is idle, checks that every count the
   page shows equals the one /metrics reports.

Only the Python standard library. Usage:
  dashboard_check.py --base-url http://127.0.0.1:PORT --api-key KEY --chromium /usr/bin/chromium --out DIR
"""

import argparse
import base64
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib

WIDTH, HEIGHT = 1400, 1000


def fail(message):
    print(f"dashboard check FAILED: {message}", file=sys.stderr)
    sys.exit(1)


# ---- HTTP ---------------------------------------------------------------------------------


def http(base, path, body=None, api_key=None, timeout=120):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method="POST" if data else "GET")
    if data:
        request.add_header("Content-Type", "application/json")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metrics(base):
    """The unlabelled value of every `pagoda:` sample of /metrics, by name."""
    status, text = http(base, "/metrics")
    if status != 200:
        fail(f"/metrics answered {status}")
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(pagoda:[a-z_]+)(?:\{[^}]*\})? (\S+)$", line)
        if match and "_bucket" not in match.group(1):
            values.setdefault(match.group(1), float(match.group(2)))
    return values


class Load:
    """Concurrent completions, each thread sending one after another until stopped."""

    def __init__(self, base, api_key, threads, max_tokens):
        self.base, self.api_key, self.max_tokens = base, api_key, max_tokens
        self.stopping = threading.Event()
        self.errors = []
        self.done = 0
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(threads)]

    def run(self, i):
        shared = "You are a careful assistant. Answer in full sentences, and explain every step. " * 3
        n = 0
        while not self.stopping.is_set():
            body = {
                "prompt": f"{shared}Question {i}-{n}: name a colour and a number.",
                "max_tokens": self.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            status, text = http(self.base, "/v1/completions", body, self.api_key)
            if status != 200:
                self.errors.append(f"{status}: {text[:200]}")
                return
            self.done += 1
            n += 1

    def start(self):
        for t in self.threads:
            t.start()

    def stop(self):
        self.stopping.set()
        for t in self.threads:
            t.join(timeout=300)
        if self.errors:
            fail(f"load requests failed: {self.errors[:3]}")


# ---- Chromium over the DevTools protocol (--remote-debugging-pipe) ---------------------------


class Browser:
    def __init__(self, chromium):
        self.profile = tempfile.mkdtemp(prefix="pagoda-dashboard-chromium-")
        to_browser_r, self.to_browser = os.pipe()
        self.from_browser, from_browser_w = os.pipe()

        def wire_pipes():
            # The protocol pipe is fds 3 (commands in) and 4 (replies out).
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-pipe",
            f"--user-data-dir={self.profile}", f"--window-size={WIDTH},{HEIGHT}", "about:blank",
        ]
        self.log = open(os.path.join(self.profile, "chromium.log"), "w")
        self.process = subprocess.Popen(
            [chromium, *flags], pass_fds=(3, 4), preexec_fn=wire_pipes,
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.next_id = 0
        self.buffer = b""
        self.session = None

    def send(self, method, params=None, session=True):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.time() + 60
        while time.time() < deadline:
            while b"\0" not in self.buffer:
                chunk = os.read(self.from_browser, 1 << 20)
                if not chunk:
                    fail(f"chromium closed the protocol pipe (log: {self.log.name})")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    fail(f"{method}: {reply['error']}")
                return reply.get("result", {})
        fail(f"{method}: no reply within 60 s")

    def open(self, url):
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)["targetId"]
        self.session = self.send(
            "Target.attachToTarget", {"targetId": target, "flatten": True}, session=False
        )["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})

    def eval(self, expression):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            fail(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self):
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def close(self):
        try:
            self.send("Browser.close", session=False)
        except SystemExit:
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


# ---- PNG ----------------------------------------------------------------------------------


def decode_png(data):
    """(width, height, rows of (r, g, b) tuples) of an 8-bit RGB or RGBA PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        fail("the screenshot is not a PNG")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    width, height, depth, color, _, _, interlace = header
    if depth != 8 or color not in (2, 6) or interlace:
        fail(f"unsupported PNG: depth {depth}, colour type {color}, interlace {interlace}")
    channels = 3 if color == 2 else 4
    stride = width * channels
    raw = zlib.decompress(idat)
    rows, previous = [], bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            upleft = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + ((left + up) >> 1)) & 0xFF
            elif kind == 4:
                p = left + up - upleft
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
                predictor = left if pa <= pb and pa <= pc else up if pb <= pc else upleft
                line[i] = (line[i] + predictor) & 0xFF
        rows.append([tuple(line[x * channels:x * channels + 3]) for x in range(width)])
        previous = line
    return width, height, rows


def hex_color(text):
    return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))


def count_color(rows, box, color, tolerance=12):
    """Pixels within `tolerance` (per channel) of `color` inside box (x, y, w, h)."""
    x0, y0, w, h = (int(round(v)) for v in box)
    n = 0
    for row in rows[max(0, y0):y0 + h]:
        for pixel in row[max(0, x0):x0 + w]:
            if all(abs(a - b) <= tolerance for a, b in zip(pixel, color)):
                n += 1
    return n


# ---- the check ----------------------------------------------------------------------------

# null until the page's elements exist (the navigation may still be under way).
DOM_VALUES = """document.getElementById("seq-table") === null ? "null" : JSON.stringify(Object.fromEntries(
  ["count-total", "count-used", "count-free", "count-cached", "count-owned", "count-shared", "count-cpu",
   "q-running", "q-waiting", "q-swapped", "preemptions", "prefix-hit-rate"]
  .map((id) => [id, document.getElementById(id).dataset.value])
  .concat([["prefix-queried", document.getElementById("prefix-hit-rate").dataset.queried],
           ["drawn", document.getElementById("gpu-map").dataset.drawn || ""],
           ["view", document.body.dataset.viewId || ""]])))"""

BOXES = """JSON.stringify(Object.fromEntries(["gpu-map", "chart-step", "chart-tokens"].map((id) => {
  const r = document.getElementById(id).getBoundingClientRect();
  return [id, [r.x, r.y, r.width, r.height]];
}).concat([["header", (() => { const r = document.querySelector("header").getBoundingClientRect();
  return [r.x, r.y, r.width, r.height]; })()]])))"""

# Points the mouse at the first block of the first running sequence of a fresh view and returns the
# tooltip's text if it names that sequence's request, its logical block 0 and a ref count (else null: the
# page may not have drawn that view yet).
HOVER = """(async () => {
  const view = await (await fetch("v1/debug/kv")).json();
  const seq = (view.seqs || []).find((s) => s.status === "running" && s.gpu_blocks.length);
  if (!seq) return null;
  const block = seq.gpu_blocks[0][0];
  const canvas = document.getElementById("gpu-map");
  const cell = Number(canvas.dataset.cell), cols = Number(canvas.dataset.cols);
  const rect = canvas.getBoundingClientRect();
  canvas.dispatchEvent(new MouseEvent("mousemove", { bubbles: true,
    clientX: rect.left + (block % cols) * cell + cell / 2, clientY: rect.top + Math.floor(block / cols) * cell + cell / 2 }));
  const text = document.getElementById("tooltip").textContent;
  return text.includes(`block ${block}:`) && text.includes(seq.request_id) && text.includes("logical block 0")
    && text.includes("ref count") ? text : null;
})()"""

# The page's counts and the /metrics series each must equal.
EQUAL_TO_METRICS = {
    "count-total": "pagoda:kv_cache_blocks_total",
    "count-used": "pagoda:kv_cache_blocks_used",
    "count-free": "pagoda:kv_cache_blocks_free",
    "count-cached": "pagoda:kv_cache_blocks_cached",
    "q-running": "pagoda:num_requests_running",
    "q-waiting": "pagoda:num_requests_waiting",
    "q-swapped": "pagoda:num_requests_swapped",
    "preemptions": "pagoda:num_preemptions_total",
    "prefix-hit-rate": "pagoda:prefix_cache_hits_total",
    "prefix-queried": "pagoda:prefix_cache_queries_total",
}


def wait_for(what, seconds, probe):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.25)
    fail(f"timed out after {seconds} s waiting for {what}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", help="the server's API key (the dashboard itself needs none)")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--out", required=True, help="where the screenshot and the page's values go")
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    base = args.base_url.rstrip("/")
    os.makedirs(args.out, exist_ok=True)

    # The endpoints themselves: no key needed, bad input refused by name.
    status, page = http(base, "/dashboard")
    if status != 200 or "gpu-map" not in page:
        fail(f"/dashboard answered {status}")
    status, body = http(base, "/v1/debug/kv?seqs=maybe")
    if status != 400 or '"seqs"' not in body:
        fail(f"/v1/debug/kv?seqs=maybe should be a 400 naming seqs, got {status}: {body[:200]}")

    load = Load(base, args.api_key, args.threads, args.max_tokens)
    load.start()
    browser = Browser(args.chromium)
    try:
        browser.open(base + "/dashboard")
        # Under load: the map is drawn with blocks held by running sequences.
        busy = wait_for("the map to draw blocks in use", 180, lambda: (
            lambda v: v if v and v["drawn"] and int(v["count-used"] or 0) > 0 and int(v["q-running"] or 0) > 0
            else None
        )(json.loads(browser.eval(DOM_VALUES))))
        print(f"under load, the page shows: {busy}")
        # A few more views, so that the step charts have points (a CPU step can outlast a poll).
        wait_for("the step charts to have points", 120, lambda: browser.eval(
            "Number(document.getElementById('chart-step').dataset.points || 0) >= 3"
            " && Number(document.getElementById('chart-tokens').dataset.points || 0) >= 3"))
        # Hover: pointing at a block a running sequence holds names its holder and logical block.
        tooltip = wait_for("a hover tooltip naming a holder", 60, lambda: browser.eval(HOVER))
        print(f"hovering a held block shows: {tooltip!r}")
        png = browser.screenshot()
        with open(os.path.join(args.out, "dashboard.png"), "wb") as f:
            f.write(png)
        boxes = json.loads(browser.eval(BOXES))
        width, height, rows = decode_png(png)
        if (width, height) != (WIDTH, HEIGHT):
            fail(f"screenshot is {width}x{height}, expected {WIDTH}x{HEIGHT}")
        regions = {
            "header is the dark bar": count_color(rows, boxes["header"], hex_color("#1d2330")) > 0.5 * boxes["header"][2] * boxes["header"][3],
            "the map has owned (blue) cells": count_color(rows, boxes["gpu-map"], hex_color("#2f6fdb")) > 20,
            "the map has free (grey) cells": count_color(rows, boxes["gpu-map"], hex_color("#e6e8eb")) > 20,
            "the step chart has a line": count_color(rows, boxes["chart-step"], hex_color("#2f6fdb"), 60)
            + count_color(rows, boxes["chart-step"], hex_color("#d35400"), 60) > 10,
            "the tokens chart has a line": count_color(rows, boxes["chart-tokens"], hex_color("#1d2330"), 60) > 10,
        }
        print("screenshot regions:", json.dumps(regions))
        bad = [name for name, ok in regions.items() if not ok]
        if bad:
            fail(f"screenshot regions wrong: {bad} (see {args.out}/dashboard.png; boxes {boxes})")

        load.stop()
        print(f"load done: {load.done} completions")
        # Idle: the counts the page shows equal /metrics (nothing moves any more).
        wait_for("the engine to be idle", 120, lambda: (
            lambda m: m.get("pagoda:num_requests_running") == 0 and m.get("pagoda:num_requests_waiting") == 0
        )(metrics(base)))
        time.sleep(0.5)

        def agree():
            shown = json.loads(browser.eval(DOM_VALUES))
            reported = metrics(base)
            diffs = {k: (shown[k], reported.get(m)) for k, m in EQUAL_TO_METRICS.items()
                     if shown[k] in (None, "") or float(shown[k]) != reported.get(m)}
            agree.last = (shown, reported, diffs)
            return not diffs

        deadline = time.time() + 15
        while not agree():
            if time.time() > deadline:
                fail(f"the page's counts differ from /metrics: {agree.last[2]}")
            time.sleep(0.3)
        shown = agree.last[0]
        with open(os.path.join(args.out, "dashboard-values.json"), "w") as f:
            json.dump({"under_load": busy, "idle": shown}, f, indent=2)
        print(f"idle, the page's counts equal /metrics: {shown}")
    finally:
        if not load.stopping.is_set():
            load.stopping.set()
        browser.close()
    print("dashboard check passed")


if __name__ == "__main__":
    main()
