//! `pagoda sim --html FILE`: the simulation's KV page maps as an animation,
//! every allocator side by side, in one self-contained HTML file drawn with
//! the dashboard's own map script (`pagoda_server::dashboard::KV_MAP_JS`).

use std::path::PathBuf;

use anyhow::Context;
use pagoda_scheduler::sim::{animation, run_cli, AllocatorKind, SimArgs};

/// `pagoda sim`'s options: the simulator's, plus the animation's.
#[derive(clap::Args, Debug)]
pub struct SimCommandArgs {
    #[command(flatten)]
    pub sim: SimArgs,
    /// Also write the KV page map of every allocator as an animation of the
    /// simulated trace (one self-contained HTML file, no network needed).
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Simulated seconds between two frames of the animation (doubled as
    /// often as needed to keep each allocator within 2000 frames).
    #[arg(long, default_value_t = 0.5, requires = "html")]
    pub html_frame_interval: f64,
}

pub fn run(args: SimCommandArgs) -> anyhow::Result<()> {
    print!("{}", run_cli(&args.sim)?);
    let Some(path) = &args.html else { return Ok(()) };
    let kinds =
        args.sim.allocators.iter().map(|a| AllocatorKind::parse(a.trim())).collect::<Result<Vec<_>, _>>()?;
    let trace = args.sim.load_trace()?;
    let animations = animation::animate(&trace, &args.sim.sim_config(), &kinds, args.html_frame_interval)?;
    let html = page(&animation::to_json(&animations));
    std::fs::write(path, html).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote the animation to {}", path.display());
    Ok(())
}

/// The page: the map script, the player, and the frames as JSON.
fn page(data: &serde_json::Value) -> String {
    // `</` inside a script element would end it early.
    let data = data.to_string().replace("</", "<\\/");
    PAGE.replace("{{KV_MAP_JS}}", pagoda_server::dashboard::KV_MAP_JS)
        .replace("{{PLAYER_JS}}", PLAYER_JS)
        .replace("{{DATA}}", &data)
}

const PAGE: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>pagoda sim: KV page maps</title>
<style>
body { margin: 16px; font: 13px/1.4 system-ui, sans-serif; color: #1d2330; background: #f4f5f7; }
h1 { font-size: 18px; margin: 0 0 8px; }
.controls { display: flex; gap: 12px; align-items: center; margin-bottom: 12px; }
.controls input[type=range] { flex: 1; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 12px; }
.panel { background: #fff; border-radius: 6px; padding: 10px 12px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.panel h2 { font-size: 15px; margin: 0 0 4px; }
.panel p { margin: 0 0 6px; color: #4a5468; font-variant-numeric: tabular-nums; }
canvas { display: block; width: 100%; }
.legend span { margin-right: 12px; } .legend i { display: inline-block; width: 11px; height: 11px; margin-right: 4px; vertical-align: -1px; }
</style>
</head>
<body>
<h1>KV page maps of a simulated trace</h1>
<p class="legend"><span><i style="background:#e6e8eb"></i>free</span><span><i style="background:#2f6fdb"></i>holding tokens</span><span><i style="background:#a9c8f0"></i>reserved, not written yet</span><span><i style="background:#8e44ad"></i>shared</span><span><i style="background:#e8a33a"></i>cached prefix</span></p>
<div class="controls"><button id="play">pause</button><input id="seek" type="range" min="0" value="0"><span id="clock"></span></div>
<div id="grid" class="grid"></div>
<script id="data" type="application/json">{{DATA}}</script>
<script>{{KV_MAP_JS}}</script>
<script>{{PLAYER_JS}}</script>
</body>
</html>
"#;

/// Plays the frames: all allocators at the same simulated time, so the
/// panels stay comparable while one finishes the trace sooner than another.
const PLAYER_JS: &str = r#"
"use strict";
(() => {
  const animations = JSON.parse(document.getElementById("data").textContent);
  const grid = document.getElementById("grid");
  const panels = animations.map((a) => {
    const panel = document.createElement("div");
    panel.className = "panel";
    panel.innerHTML = `<h2></h2><p class="summary"></p><p class="now"></p><canvas></canvas>`;
    panel.querySelector("h2").textContent = a.allocator;
    panel.querySelector(".summary").textContent =
      `${a.num_gpu_blocks} blocks × ${a.block_size} tokens · finished ${a.finished}, rejected ${a.rejected} ` +
      `in ${a.sim_time_s.toFixed(1)} s · waste ${(100 * a.waste).toFixed(1)}% · at most ${a.max_running} running`;
    grid.appendChild(panel);
    return { a, now: panel.querySelector(".now"), map: KvMap.create(panel.querySelector("canvas"), { maxHeight: 360 }) };
  });
  const end = Math.max(0, ...animations.map((a) => (a.frames.length ? a.frames[a.frames.length - 1].t : 0)));
  const seek = document.getElementById("seek");
  const clock = document.getElementById("clock");
  const play = document.getElementById("play");
  const STEPS = 1000;
  seek.max = String(STEPS);
  let playing = true;
  function frameAt(frames, t) {
    let lo = 0, hi = frames.length - 1;
    while (lo < hi) { const mid = (lo + hi + 1) >> 1; if (frames[mid].t <= t) lo = mid; else hi = mid - 1; }
    return frames[lo];
  }
  function show(position) {
    const t = (position / STEPS) * end;
    clock.textContent = `t = ${t.toFixed(1)} s of ${end.toFixed(1)} s`;
    for (const p of panels) {
      if (!p.a.frames.length) continue;
      const f = frameAt(p.a.frames, t);
      p.map.draw({ gpu_runs: f.gpu_runs, cpu_runs: f.cpu_runs, eviction_order: f.eviction_order, seqs: [] });
      p.now.textContent = `${f.used} blocks held (${f.reserved} reserved ahead) · running ${f.running}, waiting ${f.waiting}, swapped ${f.swapped}`;
    }
  }
  seek.addEventListener("input", () => show(Number(seek.value)));
  play.addEventListener("click", () => { playing = !playing; play.textContent = playing ? "pause" : "play"; });
  setInterval(() => {
    if (!playing) return;
    const next = (Number(seek.value) + 1) % (STEPS + 1);
    seek.value = String(next);
    show(next);
  }, 40);
  show(0);
})();
"#;
