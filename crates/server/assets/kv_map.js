// Draws a KV page map: one cell per physical block, coloured by state, from
// the encoding of /v1/debug/kv (runs of [state code, length] in block order;
// block lists as runs of [first id, length]). Shared by /dashboard and the
// animation `pagoda sim --html` writes. No dependencies.
"use strict";

const KvMap = (() => {
  const COLORS = {
    f: "#e6e8eb", // free
    o: "#2f6fdb", // owned by one running sequence
    s: "#8e44ad", // shared copy-on-write (ref count > 1)
    r: "#a9c8f0", // reserved for tokens not written yet (contiguous allocators)
    cpu: "#138d75", // a swapped-out block in the CPU pool
  };
  // Cached evictable blocks: the next to be evicted lightest, the most
  // recently freed darkest.
  const CACHED_OLD = [252, 224, 160];
  const CACHED_NEW = [214, 110, 0];
  const NAMES = { f: "free", o: "owned", s: "shared (copy-on-write)", c: "cached (evictable)", r: "reserved", cpu: "swapped out" };

  function decodeRuns(runs) {
    const out = [];
    for (const [code, len] of runs) for (let i = 0; i < len; i++) out.push(code);
    return out;
  }

  function decodeIdRuns(runs) {
    const out = [];
    for (const [first, len] of runs || []) for (let i = 0; i < len; i++) out.push(first + i);
    return out;
  }

  function cachedColor(rank, total) {
    const t = total <= 1 ? 1 : rank / (total - 1);
    const c = CACHED_OLD.map((o, i) => Math.round(o + (CACHED_NEW[i] - o) * t));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  // Cell size and columns for `n` cells in a box `width` wide, at most
  // `maxHeight` tall: as large as fits, 3 to 18 pixels.
  function layout(n, width, maxHeight) {
    let cell = 18;
    while (cell > 3) {
      const cols = Math.max(1, Math.floor(width / cell));
      if (Math.ceil(n / cols) * cell <= maxHeight) break;
      cell -= 1;
    }
    const cols = Math.max(1, Math.floor(width / cell));
    return { cell, cols, rows: Math.max(1, Math.ceil(n / cols)) };
  }

  // A map bound to one canvas. `draw(view)` repaints it; `hit(x, y)` names
  // the block under a point of the canvas.
  function create(canvas, options = {}) {
    const maxHeight = options.maxHeight || 420;
    let geometry = null;
    let states = [];
    let holders = new Map(); // block -> [{request, sample, index}]
    let pool = "gpu";

    function draw(view, which = "gpu") {
      pool = which;
      states = which === "gpu" ? decodeRuns(view.gpu_runs) : decodeRuns(view.cpu_runs);
      holders = new Map();
      for (const seq of view.seqs || []) {
        const blocks = decodeIdRuns(which === "gpu" ? seq.gpu_blocks : seq.cpu_blocks);
        blocks.forEach((block, index) => {
          if (!holders.has(block)) holders.set(block, []);
          holders.get(block).push({ request: seq.request_id, sample: seq.sample_index, index });
        });
      }
      const rank = new Map();
      const evictable = decodeIdRuns(view.eviction_order);
      evictable.forEach((block, i) => rank.set(block, i));
      const width = canvas.clientWidth || canvas.width;
      geometry = layout(Math.max(states.length, 1), width, maxHeight);
      const ratio = window.devicePixelRatio || 1;
      canvas.width = Math.round(geometry.cols * geometry.cell * ratio);
      canvas.height = Math.round(geometry.rows * geometry.cell * ratio);
      canvas.style.height = `${geometry.rows * geometry.cell}px`;
      const ctx = canvas.getContext("2d");
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      const gap = geometry.cell >= 6 ? 1 : 0;
      states.forEach((code, block) => {
        let color;
        if (which !== "gpu") color = code === "o" ? COLORS.cpu : COLORS.f;
        else if (code === "c") color = cachedColor(rank.get(block) || 0, evictable.length);
        else color = COLORS[code] || "#000";
        ctx.fillStyle = color;
        const x = (block % geometry.cols) * geometry.cell;
        const y = Math.floor(block / geometry.cols) * geometry.cell;
        ctx.fillRect(x, y, geometry.cell - gap, geometry.cell - gap);
      });
      canvas.dataset.drawn = String(states.length);
      // The geometry, for tests that point at a block.
      canvas.dataset.cell = String(geometry.cell);
      canvas.dataset.cols = String(geometry.cols);
    }

    function hit(x, y) {
      if (!geometry) return null;
      const col = Math.floor(x / geometry.cell);
      const row = Math.floor(y / geometry.cell);
      if (col < 0 || col >= geometry.cols || row < 0) return null;
      const block = row * geometry.cols + col;
      if (block >= states.length) return null;
      const code = states[block];
      const held = holders.get(block) || [];
      const state = pool === "gpu" ? NAMES[code] : code === "o" ? NAMES.cpu : NAMES.f;
      return { block, state, refCount: held.length, holders: held };
    }

    return { draw, hit };
  }

  return { create, decodeRuns, decodeIdRuns, COLORS, NAMES, cachedColor };
})();
