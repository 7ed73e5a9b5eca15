// The dashboard's page logic: polls /v1/debug/kv five times a second (the
// engine rebuilds a view at most ten times a second however many pages
// poll) and /metrics once a second, then draws the KV page map, the queues,
// the step timeline and the latency percentiles. No dependencies.
"use strict";

(() => {
  const VIEW_PERIOD_MS = 200;
  const METRICS_PERIOD_MS = 1000;
  const HISTORY_POINTS = 300; // a minute of views
  const LATENCY_WINDOW_S = 60;
  const MAX_SEQ_ROWS = 40;

  const $ = (id) => document.getElementById(id);
  const gpuMap = KvMap.create($("gpu-map"), { maxHeight: 460 });
  const cpuMap = KvMap.create($("cpu-map"), { maxHeight: 460 });
  let lastView = null;
  const stepHistory = []; // {prefillMs, decodeMs, tokensPerStep}
  const latencyHistory = []; // {t, p50/p99 of ttft and itl}
  const histogramSamples = []; // {t, ttft, itl}: cumulative buckets from /metrics

  function setValue(id, value, text) {
    const el = $(id);
    el.dataset.value = String(value);
    el.textContent = text === undefined ? String(value) : text;
  }

  function status(text, isError) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("error", Boolean(isError));
  }

  // ---- the KV view -------------------------------------------------------------------

  function showView(view) {
    gpuMap.draw(view, "gpu");
    cpuMap.draw(view, "cpu");
    const c = view.counts;
    $("gpu-caption").textContent = `${view.num_gpu_blocks} × ${view.block_size} tokens`;
    $("cpu-caption").textContent = view.num_cpu_blocks ? `${view.num_cpu_blocks} blocks` : "none (preemption recomputes)";
    setValue("count-total", view.num_gpu_blocks);
    setValue("count-used", c.used);
    setValue("count-free", c.free + c.cached);
    setValue("count-owned", c.owned);
    setValue("count-shared", c.shared);
    setValue("count-cached", c.cached);
    setValue("count-empty", c.free);
    setValue("count-cpu", c.cpu_used, `${c.cpu_used} / ${view.num_cpu_blocks}`);
    setValue("q-running", view.queues.running);
    setValue("q-waiting", view.queues.waiting);
    setValue("q-swapped", view.queues.swapped);
    setValue("preemptions", view.preemptions);
    const p = view.prefix_cache;
    setValue("prefix-hit-rate", p.hit_tokens, `${(100 * p.hit_rate).toFixed(1)}%`);
    $("prefix-hit-rate").dataset.queried = String(p.queried_tokens);
    $("prefix-detail").textContent = `${p.hit_tokens} of ${p.queried_tokens} tokens, ${p.evictions} evicted`;
    showSeqs(view.seqs || []);
    if (lastView && view.view_id !== lastView.view_id) recordSteps(lastView, view);
    lastView = view;
    const time = new Date().toLocaleTimeString();
    status(`view ${view.view_id} · engine step ${view.engine_steps} · ${time} · built in ${view.build_us} µs`);
    document.body.dataset.viewId = String(view.view_id);
  }

  function showSeqs(seqs) {
    const body = $("seq-table").tBodies[0];
    const rows = seqs.slice(0, MAX_SEQ_ROWS).map((s) => {
      const share = s.prompt_tokens ? s.prompt_tokens_computed / s.prompt_tokens : 1;
      const tr = document.createElement("tr");
      const cell = (text, cls) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (cls) td.className = cls;
        tr.appendChild(td);
        return td;
      };
      cell(s.request_id, "id").title = s.request_id;
      cell(String(s.sample_index));
      cell(s.status, `state-${s.status}`);
      const progress = cell("");
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = `${Math.round(100 * share)}%`;
      bar.appendChild(fill);
      progress.appendChild(bar);
      progress.appendChild(document.createTextNode(`${s.prompt_tokens_computed} / ${s.prompt_tokens}`));
      cell(String(s.output_tokens));
      return tr;
    });
    if (seqs.length > MAX_SEQ_ROWS) {
      const tr = document.createElement("tr");
      const td = document.createElement("td");
      td.colSpan = 5;
      td.textContent = `… and ${seqs.length - MAX_SEQ_ROWS} more`;
      tr.appendChild(td);
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  }

  // Per interval between two views: mean host time of the steps of each
  // kind, and tokens per step.
  function recordSteps(before, after) {
    const d = (kind, field) => after.steps[kind][field] - before.steps[kind][field];
    const prefillSteps = d("prefill", "steps");
    const decodeSteps = d("decode", "steps");
    const steps = prefillSteps + decodeSteps;
    // A step can outlast the polling period: only intervals with steps make points.
    if (!steps) return;
    stepHistory.push({
      prefillMs: prefillSteps ? (1000 * d("prefill", "seconds")) / prefillSteps : null,
      decodeMs: decodeSteps ? (1000 * d("decode", "seconds")) / decodeSteps : null,
      tokensPerStep: steps ? (d("prefill", "tokens") + d("decode", "tokens")) / steps : null,
    });
    while (stepHistory.length > HISTORY_POINTS) stepHistory.shift();
    drawChart($("chart-step"), [
      { color: "#d35400", values: stepHistory.map((p) => p.prefillMs) },
      { color: "#2f6fdb", values: stepHistory.map((p) => p.decodeMs) },
    ]);
    drawChart($("chart-tokens"), [{ color: "#1d2330", values: stepHistory.map((p) => p.tokensPerStep) }]);
  }

  // ---- /metrics: latency percentiles ------------------------------------------------------

  // Cumulative bucket counts of one histogram in the Prometheus text format:
  // [[upper bound, count], ...] in increasing bounds.
  function histogram(text, name) {
    const buckets = [];
    const prefix = `${name}_bucket{`;
    for (const line of text.split("\n")) {
      if (!line.startsWith(prefix)) continue;
      const le = /le="([^"]+)"/.exec(line);
      const count = Number(line.slice(line.lastIndexOf(" ") + 1));
      if (le) buckets.push([le[1] === "+Inf" ? Infinity : Number(le[1]), count]);
    }
    return buckets.sort((a, b) => a[0] - b[0]);
  }

  // The q-quantile of cumulative buckets, interpolated inside its bucket (as
  // Prometheus' histogram_quantile does); null without observations.
  function quantile(buckets, q) {
    const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
    if (!total) return null;
    const rank = q * total;
    let lower = 0;
    let below = 0;
    for (const [bound, count] of buckets) {
      if (count >= rank) {
        if (bound === Infinity) return lower;
        const inBucket = count - below;
        return inBucket ? lower + ((bound - lower) * (rank - below)) / inBucket : bound;
      }
      lower = bound;
      below = count;
    }
    return lower;
  }

  function minus(now, then) {
    return now.map(([bound, count], i) => [bound, count - (then && then[i] ? then[i][1] : 0)]);
  }

  function showMetrics(text) {
    const t = Date.now() / 1000;
    const sample = {
      t,
      ttft: histogram(text, "pagoda:time_to_first_token_seconds"),
      itl: histogram(text, "pagoda:inter_token_latency_seconds"),
    };
    histogramSamples.push(sample);
    while (histogramSamples.length > 1 && histogramSamples[0].t < t - LATENCY_WINDOW_S) histogramSamples.shift();
    const oldest = histogramSamples[0];
    const windowed = {
      ttft: minus(sample.ttft, oldest === sample ? null : oldest.ttft),
      itl: minus(sample.itl, oldest === sample ? null : oldest.itl),
    };
    // With nothing observed in the window, show everything since the start.
    const inWindow = (b) => (b.length ? b[b.length - 1][1] : 0);
    const useWindow = inWindow(windowed.ttft) > 0 || inWindow(windowed.itl) > 0;
    const source = useWindow ? windowed : sample;
    $("latency-window").textContent = useWindow ? `(last ${LATENCY_WINDOW_S} s)` : "(since start)";
    const ms = (v) => (v === null ? "–" : (1000 * v).toFixed(1));
    const point = { t };
    for (const name of ["ttft", "itl"]) {
      for (const q of [50, 90, 99]) {
        const value = quantile(source[name], q / 100);
        $(`${name}-p${q}`).textContent = ms(value);
        point[`${name}${q}`] = value === null ? null : 1000 * value;
      }
      $(`${name}-count`).textContent = String(inWindow(source[name]));
    }
    latencyHistory.push(point);
    while (latencyHistory.length > LATENCY_WINDOW_S) latencyHistory.shift();
    drawChart($("chart-latency"), [
      { color: "#d35400", values: latencyHistory.map((p) => p.ttft50) },
      { color: "#f0a868", values: latencyHistory.map((p) => p.ttft99) },
      { color: "#2f6fdb", values: latencyHistory.map((p) => p.itl50) },
      { color: "#94b6ee", values: latencyHistory.map((p) => p.itl99) },
    ]);
  }

  // ---- charts -------------------------------------------------------------------------

  // Lines over the last HISTORY_POINTS samples, with the y axis from 0 to the
  // largest value; a null value (no step of that kind in the interval) is
  // skipped, and every point gets a dot so that a lone one shows.
  function drawChart(canvas, series) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    let max = 0;
    for (const s of series) for (const v of s.values) if (v !== null && v > max) max = v;
    const top = max > 0 ? max * 1.1 : 1;
    const left = 36;
    ctx.strokeStyle = "#e6e8eb";
    ctx.fillStyle = "#6b7489";
    ctx.font = "10px system-ui, sans-serif";
    for (const f of [0, 0.5, 1]) {
      const y = height - 12 - f * (height - 20);
      ctx.beginPath();
      ctx.moveTo(left, y);
      ctx.lineTo(width, y);
      ctx.stroke();
      ctx.fillText(formatAxis(f * top), 2, y + 3);
    }
    const n = HISTORY_POINTS;
    let points = 0;
    for (const s of series) {
      ctx.strokeStyle = s.color;
      ctx.fillStyle = s.color;
      ctx.lineWidth = 1.5;
      const offset = n - s.values.length;
      const xy = [];
      s.values.forEach((v, i) => {
        if (v === null) return;
        xy.push([left + ((offset + i) / (n - 1)) * (width - left), height - 12 - (v / top) * (height - 20)]);
      });
      ctx.beginPath();
      xy.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.stroke();
      for (const [x, y] of xy) ctx.fillRect(x - 1.5, y - 1.5, 3, 3);
      points += xy.length;
    }
    canvas.dataset.points = String(points);
  }

  function formatAxis(v) {
    if (v >= 100) return v.toFixed(0);
    if (v >= 10) return v.toFixed(1);
    return v.toFixed(2);
  }

  // ---- hover --------------------------------------------------------------------------

  function bindTooltip(canvas, map) {
    const tip = $("tooltip");
    canvas.addEventListener("mousemove", (event) => {
      const rect = canvas.getBoundingClientRect();
      const hit = map.hit(event.clientX - rect.left, event.clientY - rect.top);
      if (!hit) {
        tip.hidden = true;
        return;
      }
      const lines = [`block ${hit.block}: ${hit.state}`, `ref count ${hit.refCount}`];
      for (const h of hit.holders.slice(0, 6)) {
        lines.push(`${h.request} #${h.sample}, logical block ${h.index}`);
      }
      if (hit.holders.length > 6) lines.push(`… ${hit.holders.length - 6} more holders`);
      tip.textContent = lines.join("\n");
      tip.style.whiteSpace = "pre";
      tip.style.left = `${event.clientX + 12}px`;
      tip.style.top = `${event.clientY + 12}px`;
      tip.hidden = false;
    });
    canvas.addEventListener("mouseleave", () => {
      tip.hidden = true;
    });
  }
  bindTooltip($("gpu-map"), gpuMap);
  bindTooltip($("cpu-map"), cpuMap);

  // ---- polling ------------------------------------------------------------------------

  async function poll(url, period, handle, asText) {
    for (;;) {
      const started = Date.now();
      try {
        const response = await fetch(url, { cache: "no-store" });
        if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
        handle(asText ? await response.text() : await response.json());
      } catch (e) {
        status(`${e.message || e} (retrying)`, true);
      }
      await new Promise((r) => setTimeout(r, Math.max(0, period - (Date.now() - started))));
    }
  }

  poll("v1/debug/kv", VIEW_PERIOD_MS, showView, false);
  poll("metrics", METRICS_PERIOD_MS, showMetrics, true);
})();
