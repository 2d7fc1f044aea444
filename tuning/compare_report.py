#!/usr/bin/env python3
"""Summarizes tuning/compare.sh runs: per cell, vubd against the best qemu-storage-daemon
configuration (highest median IOPS), their ratios, every QSD configuration, the goals, and a
plot. Usage: compare_report.py RUNS.jsonl OUTDIR [--floor FILE] (markdown on stdout,
OUTDIR/compare.png).

A cell is BACKEND/RW/qdN/qN/CLIENT. Figures are medians over a cell's runs of one server.
Ratios are vubd / QSD: above 1 is better for vubd for IOPS, below 1 for p99 and CPU per I/O.
"""
import argparse
import json
import math
import re
import statistics
from collections import defaultdict

QSD = ["qsd-main", "qsd-iothread", "qsd-iothread-nopoll"]
BACKENDS = ["null", "tmpfs", "disk"]
FILE_BACKENDS = ("tmpfs", "disk")
FIELDS = ("iops", "lat_p50_us", "lat_p99_us", "server_cpu_us_per_io")

# Goals, vubd / best QSD. File cells: each one, and the geometric means over all of them.
GOAL_CELL_IOPS = 1.0
GOAL_CELL_P99 = 1.0
GOAL_CELL_CPU = 1.0
GOAL_GEO_IOPS = 1.2
GOAL_GEO_CPU = 0.8
GOAL_NULL_QD32_CPU = 0.3
# The goals count the 1-queue cells. With 2 queues the client's two threads share CPU 0 on a
# 2-CPU machine; with a polling client they time-slice, which puts the scheduler tick (4 ms)
# into p99 whichever the server. The 2-queue rows are for reference.
GOAL_QUEUES = "q1"

ap = argparse.ArgumentParser()
ap.add_argument("runs")
ap.add_argument("out")
ap.add_argument("--floor", help="vubd-floor's output, one line per measurement (first number: "
                "the line floor in µs; ring_p50_us=, ring_nodata_p50_us=; cell= rep= when tagged)")
args = ap.parse_args()

runs = [json.loads(l) for l in open(args.runs) if l.strip()]
failed = defaultdict(int)
groups = defaultdict(list)
for r in runs:
    if r.get("failed"):
        failed[(r["cell"], r["server"])] += 1
    else:
        groups[(r["cell"], r["server"])].append(r)


def cell_key(cell):
    b, rw, qd, q, client = cell.split("/")
    return (BACKENDS.index(b), rw, int(qd[2:]), int(q[1:]), client)


cells = sorted({c for c, _ in groups} | {c for c, _ in failed}, key=cell_key)


def med(cell, server, field):
    vals = [r[field] for r in groups.get((cell, server), []) if r.get(field) is not None]
    return statistics.median(vals) if vals else None


def figs(cell, server):
    return {f: med(cell, server, f) for f in FIELDS}


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(v, spec=".1f"):
    return "–" if v is None else format(v, spec)


def lat(v):
    return fmt(v, ".2f" if v is not None and v < 10 else ".1f")


def rx(v):
    return "–" if v is None else f"{v:.2f}×"


def geomean(vals):
    vals = [v for v in vals if v]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None


def is_file(cell):
    return cell.split("/")[0] in FILE_BACKENDS


def in_goals(cell):
    return cell.split("/")[3] == GOAL_QUEUES


def best_qsd(cell):
    """The QSD configuration with the highest median IOPS in this cell."""
    cands = [(med(cell, s, "iops"), s) for s in QSD if med(cell, s, "iops") is not None]
    return max(cands)[1] if cands else None


V = {c: figs(c, "vubd") for c in cells}
BEST = {c: best_qsd(c) for c in cells}
B = {c: figs(c, BEST[c]) if BEST[c] else {f: None for f in FIELDS} for c in cells}
R = {
    c: {f: ratio(V[c][f], B[c][f]) for f in ("iops", "lat_p50_us", "lat_p99_us", "server_cpu_us_per_io")}
    for c in cells
}


def misses(c):
    """The file-cell goals this cell misses (empty for null and 2-queue cells)."""
    if not is_file(c) or not in_goals(c):
        return []
    r = R[c]
    out = []
    if r["iops"] is None or r["iops"] < GOAL_CELL_IOPS:
        out.append("IOPS")
    if r["lat_p99_us"] is None or r["lat_p99_us"] > GOAL_CELL_P99:
        out.append("p99")
    if r["server_cpu_us_per_io"] is None or r["server_cpu_us_per_io"] > GOAL_CELL_CPU:
        out.append("CPU/IO")
    return out


def mark(c, what, text):
    return text + " ✗" if what in misses(c) else text


def row(cells_):
    return "| " + " | ".join(cells_) + " |"


def split(c):
    b, rw, qd, q, client = c.split("/")
    return [b, rw, qd[2:], q[1:], client]


print("## vubd against the best QSD configuration per cell\n")
print("Best QSD = the configuration with the highest median IOPS in the cell. Ratios are vubd / best QSD "
      "(IOPS: higher is better for vubd; p99 and server CPU per I/O: lower). ✗: a file cell that misses its "
      f"goal (IOPS ≥ {GOAL_CELL_IOPS}×, p99 ≤ {GOAL_CELL_P99}×, CPU/IO ≤ {GOAL_CELL_CPU}×; ratios are rounded, "
      "so 1.00× ✗ is just past 1). Goals count the 1-queue cells only: with 2 queues the client's two threads "
      "share CPU 0, and two polling client threads time-slice (p99 ≈ 4 ms, the scheduler tick, for any server).\n")
print(row(["backend", "rw", "QD", "queues", "client", "vubd IOPS", "p50 µs", "p99 µs", "CPU µs/IO",
           "best QSD", "QSD IOPS", "p50 µs", "p99 µs", "CPU µs/IO", "IOPS ×", "p99 ×", "CPU/IO ×"]))
print(row(["---"] * 17))
for c in cells:
    v, b, r = V[c], B[c], R[c]
    print(row(split(c) + [
        fmt(v["iops"], ".0f"), lat(v["lat_p50_us"]), lat(v["lat_p99_us"]), fmt(v["server_cpu_us_per_io"], ".2f"),
        BEST[c] or "–", fmt(b["iops"], ".0f"), lat(b["lat_p50_us"]), lat(b["lat_p99_us"]),
        fmt(b["server_cpu_us_per_io"], ".2f"),
        mark(c, "IOPS", rx(r["iops"])), mark(c, "p99", rx(r["lat_p99_us"])),
        mark(c, "CPU/IO", rx(r["server_cpu_us_per_io"])),
    ]))

# ---- goals ----
file_cells = [c for c in cells if is_file(c) and in_goals(c)]
null_qd32 = [c for c in cells if c.startswith("null/") and "/qd32/" in c and in_goals(c)]


def every(name, cells_, field, op, target):
    vals = [(R[c][field], c) for c in cells_]
    if not vals:
        return row([name, f"{op} {target}×", "not measured", "–"])
    ok = [c for v, c in vals if v is not None and (v >= target if op == "≥" else v <= target)]
    present = [(v, c) for v, c in vals if v is not None]
    worst = (min if op == "≥" else max)(present) if present else (None, "–")
    text = f"{len(ok)}/{len(vals)} cells; worst {rx(worst[0])} ({worst[1]})"
    return row([name, f"{op} {target}× in every cell", text, "yes" if len(ok) == len(vals) else "NO"])


def geo(name, field, op, target):
    g = geomean([R[c][field] for c in file_cells])
    n = sum(1 for c in file_cells if R[c][field])
    met = g is not None and (g >= target if op == "≥" else g <= target)
    return row([name, f"{op} {target}×", f"{rx(g)} over {n} cells" if g else "not measured",
                "yes" if met else ("–" if g is None else "NO")])


print("\n## Goals (vubd / best QSD configuration, medians, 1-queue cells)\n")
print(row(["goal", "target", "measured", "met"]))
print(row(["---"] * 4))
print(every("file cells (tmpfs, O_DIRECT disk): IOPS", file_cells, "iops", "≥", GOAL_CELL_IOPS))
print(every("file cells: p99 latency", file_cells, "lat_p99_us", "≤", GOAL_CELL_P99))
print(every("file cells: server CPU per I/O", file_cells, "server_cpu_us_per_io", "≤", GOAL_CELL_CPU))
print(geo("file cells: geometric mean of IOPS ratios", "iops", "≥", GOAL_GEO_IOPS))
print(geo("file cells: geometric mean of CPU-per-I/O ratios", "server_cpu_us_per_io", "≤", GOAL_GEO_CPU))
print(every("null QD32: server CPU per I/O", null_qd32, "server_cpu_us_per_io", "≤", GOAL_NULL_QD32_CPU))
missing = [f"{c} ({', '.join(misses(c))})" for c in file_cells if misses(c)]
if missing:
    print("\nFile cells missing a goal: " + "; ".join(missing) + ".")

# Floors: one line per measurement; compare.sh takes one right before each rep of the null
# QD1 polling cells and tags it cell= rep=. The line's p50 is the first number; a null read
# fills the buffer (the ring floor with data), a null write leaves it (the ring alone).
floors = []
if args.floor:
    for l in open(args.floor):
        m = re.match(r"\s*([0-9]+(?:\.[0-9]+)?)", l)
        if not m:
            continue
        f = dict(re.findall(r"(\w+)=(\S+)", l))
        floors.append({"line": float(m.group(1)),
                       "randread": float(f["ring_p50_us"]) if "ring_p50_us" in f else None,
                       "randwrite": float(f["ring_nodata_p50_us"]) if "ring_nodata_p50_us" in f else None,
                       "cell": f.get("cell"), "rep": int(f["rep"]) if "rep" in f else None})


def floor_of(cell, kind):
    """Median floor over the measurements taken for `cell` (else all), and the median over
    reps of vubd's p50 divided by the floor measured just before that rep (else by the
    median floor)."""
    own = [f for f in floors if f["cell"] == cell and f[kind] is not None]
    mine = own or [f for f in floors if f[kind] is not None]
    if not mine:
        return None, None
    fl = statistics.median(f[kind] for f in mine)
    by_rep = {f["rep"]: f[kind] for f in own}
    ratios = [r["lat_p50_us"] / by_rep[r["rep"]] for r in groups.get((cell, "vubd"), [])
              if r.get("rep") in by_rep and r.get("lat_p50_us") is not None]
    return fl, statistics.median(ratios) if ratios else ratio(V[cell]["lat_p50_us"], fl)


print("\n### Null QD1, polling client: p50 against the cross-core floors\n")
if floors:
    tagged = any(f["cell"] for f in floors)
    print(f"Floors (`{args.floor}`, {len(floors)} measurement(s)"
          f"{', each right before a rep of the cell; ratios are medians of each rep against its own floor' if tagged else ''}): "
          "the line floor is a cache line's round trip between the two CPUs, which no server can beat; the "
          "ring floor is a QD1 4 KiB request served by an ideal device on the split ring's layout (every line "
          "a driver and a device exchange, and for a read the buffer filled; a null write leaves it), which "
          "is as close as the ring layout allows. The client's own work (libblkio) is in vubd's p50 and in "
          "neither floor.\n")
else:
    print("No floor given (tuning/results/floor.txt: first number = cross-core round trip in µs).\n")
print(row(["cell", "vubd p50 µs", "best QSD p50 µs", "vubd / QSD", "line floor µs", "vubd / line floor",
           "ring floor µs", "vubd / ring floor"]))
print(row(["---"] * 8))
for c in cells:
    if c.startswith("null/") and "/qd1/" in c and c.endswith("/poll"):
        line_fl, line_r = floor_of(c, "line")
        ring_fl, ring_r = floor_of(c, c.split("/")[1])
        print(row([c, lat(V[c]["lat_p50_us"]), f"{lat(B[c]['lat_p50_us'])} ({BEST[c]})", rx(R[c]["lat_p50_us"]),
                   fmt(line_fl, ".3f"), rx(line_r), fmt(ring_fl, ".3f"), rx(ring_r)]))

# ---- every QSD configuration ----
print("\n## Every QSD configuration\n")
wins = defaultdict(list)
for c in cells:
    if BEST[c]:
        wins[BEST[c]].append(c)
print("Best configuration: " + "; ".join(f"{s} in {len(wins[s])} cells" for s in QSD) + ".\n")
print(row(["cell", "QSD configuration", "runs", "IOPS", "p50 µs", "p99 µs", "CPU µs/IO",
           "vubd/it IOPS", "vubd/it p99", "vubd/it CPU/IO"]))
print(row(["---"] * 10))
for c in cells:
    for s in ["vubd"] + QSD:
        f = figs(c, s)
        n = len(groups.get((c, s), []))
        runs_text = f"{n}" + (f" ({failed[(c, s)]} failed)" if failed.get((c, s)) else "")
        name = s + (" (best)" if s == BEST[c] else "")
        rs = ["", "", ""] if s == "vubd" else [
            rx(ratio(V[c]["iops"], f["iops"])), rx(ratio(V[c]["lat_p99_us"], f["lat_p99_us"])),
            rx(ratio(V[c]["server_cpu_us_per_io"], f["server_cpu_us_per_io"]))]
        print(row([c, name, runs_text, fmt(f["iops"], ".0f"), lat(f["lat_p50_us"]), lat(f["lat_p99_us"]),
                   fmt(f["server_cpu_us_per_io"], ".2f")] + rs))
total_failed = sum(failed.values())
if total_failed:
    print(f"\n{total_failed} runs failed: " + ", ".join(f"{c} {s} ×{n}" for (c, s), n in sorted(failed.items())))

# ---- plot ----
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {"vubd": "tab:blue", "qsd-main": "tab:orange", "qsd-iothread": "tab:red",
              "qsd-iothread-nopoll": "tab:brown"}
    n = len(cells)
    y = list(range(n))[::-1]
    h = 0.38
    fig, axes = plt.subplots(1, 2, figsize=(15, max(4, 0.32 * n + 1.8)), sharey=True)
    for ax, field, title in [(axes[0], "iops", "IOPS (higher is better)"),
                             (axes[1], "lat_p99_us", "p99 latency µs (lower is better)")]:
        vv = [V[c][field] or 0 for c in cells]
        bb = [B[c][field] or 0 for c in cells]
        ax.barh([i + h / 2 for i in y], vv, height=h, color=colors["vubd"])
        ax.barh([i - h / 2 for i in y], bb, height=h, color=[colors.get(BEST[c], "grey") for c in cells])
        for i, c in zip(y, cells):
            r = R[c]["iops" if field == "iops" else "lat_p99_us"]
            if r is not None and max(vv[cells.index(c)], bb[cells.index(c)]) > 0:
                ax.text(max(vv[cells.index(c)], bb[cells.index(c)]) * 1.15, i, f"{r:.2f}×", va="center", fontsize=7)
        ax.set_xscale("log")
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        lo, hi = ax.get_xlim()
        ax.set_xlim(lo, hi * 3)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(cells, fontsize=8)
    axes[0].set_ylim(-0.7, n - 0.3)
    fig.legend(handles=[Patch(color=colors[s], label=s if s == "vubd" else f"best QSD: {s}")
                        for s in ["vubd"] + QSD], fontsize=8, loc="upper center", ncol=4,
               bbox_to_anchor=(0.5, 1 - 0.45 / fig.get_figheight()))
    fig.suptitle("vubd vs the best qemu-storage-daemon configuration per cell, 4 KiB, libblkio client "
                 "(medians; labels: vubd / best QSD)")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / fig.get_figheight()))
    fig.savefig(f"{args.out}/compare.png", dpi=90)
    print(f"\nPlot: `{args.out}/compare.png`")
except ImportError:
    print("\n(matplotlib missing: no plot)")
