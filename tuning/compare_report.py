#!/usr/bin/env python3
"""Summarizes tuning/compare.sh runs: medians per figure for vubd and QSD, their ratios,
the issue's goals, and a plot. Usage: compare_report.py RUNS.jsonl OUTDIR (markdown on
stdout, OUTDIR/compare.png)."""
import json
import statistics
import sys
from collections import defaultdict

runs_path, out = sys.argv[1], sys.argv[2]
runs = [json.loads(l) for l in open(runs_path) if l.strip()]
groups = defaultdict(list)
for r in runs:
    key = (r["backend"], r["rw"], r["iodepth"], r["queues"], r["poll"])
    groups[(key, r["server"])].append(r)

def med(key, server, field):
    vals = [r[field] for r in groups.get((key, server), []) if r[field] is not None]
    return statistics.median(vals) if vals else None

def ratio(a, b):
    return a / b if a is not None and b else None

def fmt(v, spec=".1f"):
    return "–" if v is None else format(v, spec)

keys = sorted({k for k, _ in groups}, key=lambda k: (["null", "tmpfs", "disk"].index(k[0]), k[1], k[2], k[3], k[4]))
print("| backend | rw | QD | queues | client | IOPS vubd | IOPS QSD | ratio | p50 µs vubd | p50 µs QSD | ratio | p99 µs vubd | p99 µs QSD | server CPU µs/IO vubd | QSD | ratio |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for k in keys:
    v = {f: med(k, "vubd", f) for f in ("iops", "lat_p50_us", "lat_p99_us", "server_cpu_us_per_io")}
    q = {f: med(k, "qsd", f) for f in ("iops", "lat_p50_us", "lat_p99_us", "server_cpu_us_per_io")}
    print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {'poll' if k[4] else 'fd'} | "
          f"{fmt(v['iops'], '.0f')} | {fmt(q['iops'], '.0f')} | {fmt(ratio(v['iops'], q['iops']), '.2f')}× | "
          f"{fmt(v['lat_p50_us'])} | {fmt(q['lat_p50_us'])} | {fmt(ratio(v['lat_p50_us'], q['lat_p50_us']), '.2f')}× | "
          f"{fmt(v['lat_p99_us'])} | {fmt(q['lat_p99_us'])} | "
          f"{fmt(v['server_cpu_us_per_io'], '.2f')} | {fmt(q['server_cpu_us_per_io'], '.2f')} | "
          f"{fmt(ratio(v['server_cpu_us_per_io'], q['server_cpu_us_per_io']), '.2f')}× |")

print("\n### Goals (vubd / QSD, same run, medians)\n")
print("| figure | goal | measured | met |")
print("|---|---|---|---|")
def goal(name, key, field, op, target, extra=None):
    r = ratio(med(key, "vubd", field), med(key, "qsd", field))
    met = r is not None and (r <= target if op == "<=" else r >= target)
    text = fmt(r, ".2f") + "×"
    if extra:
        r2 = ratio(med(key, "vubd", extra[0]), med(key, "qsd", extra[0]))
        met = met and r2 is not None and r2 <= extra[1]
        text += f", server CPU {fmt(r2, '.2f')}×"
    print(f"| {name} | {op} {target}×{' at ≤ ' + str(extra[1]) + '× server CPU' if extra else ''} | {text} | {'yes' if met else 'NO'} |")
goal("null, QD1, poll client, p50 latency", ("null", "randread", 1, 1, True), "lat_p50_us", "<=", 0.5)
goal("null, QD32, 1 queue, IOPS", ("null", "randread", 32, 1, False), "iops", ">=", 1.5)
goal("null, QD32, server CPU-µs per I/O (adaptive)", ("null", "randread", 32, 1, False), "server_cpu_us_per_io", "<=", 0.5)
goal("tmpfs file, QD32, IOPS", ("tmpfs", "randread", 32, 1, False), "iops", ">=", 1.5)
goal("disk file O_DIRECT, QD32, IOPS", ("disk", "randread", 32, 1, False), "iops", ">=", 1.0, ("server_cpu_us_per_io", 0.5))

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{k[0]} {k[1][4:]} qd{k[2]} q{k[3]}{' poll' if k[4] else ''}" for k in keys]
    x = range(len(keys))
    fig, axes = plt.subplots(3, 1, figsize=(max(12, len(keys) * 0.45), 13), sharex=True)
    for ax, field, title, log in [
        (axes[0], "iops", "IOPS (higher is better)", True),
        (axes[1], "lat_p50_us", "p50 latency µs (lower is better)", True),
        (axes[2], "lat_p99_us", "p99 latency µs (lower is better)", True),
    ]:
        for off, server, color in [(-0.2, "vubd", "tab:blue"), (0.2, "qsd", "tab:orange")]:
            ys = [med(k, server, field) or 0 for k in keys]
            ax.bar([i + off for i in x], ys, width=0.4, label=server, color=color)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    axes[2].set_xticks(list(x))
    axes[2].set_xticklabels(labels, rotation=70, ha="right", fontsize=8)
    fig.suptitle("vubd vs qemu-storage-daemon, 4 KiB, libblkio client (medians)")
    fig.tight_layout()
    fig.savefig(f"{out}/compare.png", dpi=90)
    print(f"\nPlot: `{out}/compare.png`")
except ImportError:
    print("\n(matplotlib missing: no plot)")
