#!/usr/bin/env python3
"""Sums an `ncu --csv --metrics gpu__time_duration.sum` log by kernel name.

Usage: ncu_summary.py LOG [STEPS]   (STEPS: how many engine steps the log covers,
to print per-step figures). Kernel names are shortened to their first word.
"""
import csv
import re
import sys
from collections import defaultdict


def main() -> None:
    path = sys.argv[1]
    steps = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    with open(path, errors="replace") as f:
        lines = [l for l in f if l.startswith('"')]
    rows = list(csv.DictReader(lines))
    total = defaultdict(float)
    calls = defaultdict(int)
    for r in rows:
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = r.get("Kernel Name", "?")
        # "void <unnamed>::kernel<T, 1, 0>(args)" -> "kernel<T, 1, 0>" (template
        # arguments kept: they tell the fused variants apart).
        head = re.sub(r"^void\s+", "", name).replace("<unnamed>::", "").replace("(anonymous namespace)::", "")
        short = head.split("(", 1)[0].replace("__nv_bfloat16", "bf16").replace(" ", "") or "?"
        value = float(r["Metric Value"].replace(",", ""))
        unit = r.get("Metric Unit", "ns")
        scale = {"ns": 1e-3, "nsecond": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}.get(unit, 1e-3)
        total[short] += value * scale
        calls[short] += 1
    # One greedy merge per step when sampling is greedy: a better step count
    # than the caller's guess when the window cuts steps.
    if calls.get("greedy_merge_kernel"):
        steps = float(calls["greedy_merge_kernel"])
        print(f"steps (greedy merges in the window): {steps:.0f}")
    grand = sum(total.values())
    print(f"{'kernel':<60} {'calls/step':>10} {'us/step':>10} {'share':>7}")
    for name, us in sorted(total.items(), key=lambda kv: -kv[1]):
        print(f"{name[:60]:<60} {calls[name] / steps:>10.1f} {us / steps:>10.1f} {100 * us / grand:>6.1f}%")
    print(f"{'sum':<60} {sum(calls.values()) / steps:>10.1f} {grand / steps:>10.1f}")


if __name__ == "__main__":
    main()
