#!/usr/bin/env python3
"""Summarizes tuning/many-devices.sh: the cost of idle devices on one reactor, the busy
device's figures against N, and how far N can go here. Usage:
many_devices_report.py MANY.jsonl OUTDIR (markdown on stdout, OUTDIR/many-devices.png)."""
import json
import statistics
import sys
from collections import defaultdict

path, out = sys.argv[1], sys.argv[2]
CLIENT_BUDGET_KIB = 3 * 1024 * 1024  # idle clients' RSS budget: 3 GiB
MODES = ["qd1-poll", "qd1-fd", "qd32-fd"]
FIELDS = ("iops", "lat_p50_us", "lat_p99_us", "server_cpu_us_per_io")

rows = [json.loads(l) for l in open(path) if l.strip()]
idle = {r["n"]: r for r in rows if r["kind"] == "idle"}
busy = defaultdict(list)
failed = defaultdict(int)
for r in rows:
    if r["kind"] == "busy":
        if r.get("failed"):
            failed[(r["n"], r["mode"])] += 1
        else:
            busy[(r["n"], r["mode"])].append(r)
ns = sorted(idle)


def med(n, mode, field):
    vals = [r[field] for r in busy.get((n, mode), []) if r.get(field) is not None]
    return statistics.median(vals) if vals else None


def fmt(v, spec=".1f"):
    return "–" if v is None else format(v, spec)


def lat(v):
    return fmt(v, ".2f" if v is not None and v < 10 else ".1f")


def row(c):
    return "| " + " | ".join(c) + " |"


base = idle[ns[0]] if ns else None


def per_device(r, field):
    """Growth of vubd's `field` per extra device, from the smallest N to this one."""
    if base is None or r["n"] == base["n"]:
        return None
    return (r[field] - base[field]) / (r["n"] - base["n"])


print("## Idle devices\n")
print(f"Per device: growth from N={base['n'] if base else '–'} to N (attached = with its idle client; "
      "unattached = the device alone, before any client connected).\n")
print(row(["N", "vubd RSS MiB unattached", "fds unattached", "vubd RSS MiB attached", "fds attached",
           "RSS KiB per device unattached", "RSS KiB per idle device", "fds per idle device",
           "vubd CPU % (idle clients only)", "idle clients attached", "idle clients RSS MiB (PSS)", "attach s"]))
print(row(["---"] * 12))
for n in ns:
    r = idle[n]
    print(row([str(n), fmt(r["vubd_rss_kib_unattached"] / 1024), str(r["vubd_fds_unattached"]),
               fmt(r["vubd_rss_kib"] / 1024), str(r["vubd_fds"]),
               fmt(per_device(r, "vubd_rss_kib_unattached"), ".0f"), fmt(per_device(r, "vubd_rss_kib"), ".0f"),
               fmt(per_device(r, "vubd_fds"), ".1f"), fmt(r["idle_cpu_pct"], ".2f"),
               f"{r['idle_clients_attached']}/{r['idle_clients']}",
               f"{r['idle_clients_rss_kib'] / 1024:.0f} ({r['idle_clients_pss_kib'] / 1024:.0f})", fmt(r["attach_s"], ".2f")]))

print("\n## The busy device (device 0), 4 KiB randread\n")
print(row(["N", "client", "IOPS", "vs N=" + (str(ns[0]) if ns else "–"), "p50 µs", "p99 µs", "server CPU µs/IO", "runs"]))
print(row(["---"] * 8))
for mode in MODES:
    for n in ns:
        i = med(n, mode, "iops")
        i0 = med(ns[0], mode, "iops")
        runs = str(len(busy.get((n, mode), []))) + (f" ({failed[(n, mode)]} failed)" if failed.get((n, mode)) else "")
        print(row([str(n), mode, fmt(i, ".0f"), fmt(i / i0 if i and i0 else None, ".2f") + "×", lat(med(n, mode, "lat_p50_us")),
                   lat(med(n, mode, "lat_p99_us")), fmt(med(n, mode, "server_cpu_us_per_io"), ".2f"), runs]))

# How far N can go: idle clients within the RSS budget; vubd within its fd limit.
print("\n## How far N can go on this machine\n")
with_clients = [idle[n] for n in ns if idle[n]["idle_clients_alive"] > 0]
if with_clients:
    top = max(with_clients, key=lambda r: r["n"])
    rss_c = top["idle_clients_rss_kib"] / top["idle_clients_alive"]
    pss_c = top["idle_clients_pss_kib"] / top["idle_clients_alive"]
    fd_dev = per_device(top, "vubd_fds")
    nofile = int(top["vubd_nofile"]) if str(top["vubd_nofile"]).isdigit() else None
    by_rss = int(CLIENT_BUDGET_KIB / rss_c) + 1 if rss_c else None
    by_fds = int((nofile - base["vubd_fds"]) / fd_dev) + base["n"] if nofile and fd_dev else None
    mem_avail = next((int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemAvailable")), None)
    by_pss = int(mem_avail / pss_c) if mem_avail and pss_c else None
    print(f"- One idle client (`vubd-bench --hold`): {rss_c / 1024:.2f} MiB RSS, {pss_c / 1024:.2f} MiB PSS "
          f"(measured with {top['idle_clients_alive']} of them).")
    print(f"- Idle clients within 3 GiB of RSS: N ≈ {by_rss}." if by_rss else "- RSS per client: not measured.")
    if by_pss:
        print(f"- Counting shared pages once (PSS) against MemAvailable ({mem_avail / 1048576:.1f} GiB now): N ≈ {by_pss}.")
    if by_fds:
        print(f"- vubd's open-file limit ({nofile}) at {fd_dev:.1f} fds per attached device: N ≈ {by_fds}.")
    lim = min(v for v in (by_rss, by_fds) if v)
    print(f"\nWithin a 3 GiB client budget N can go to about **{lim}** here "
          f"({'client memory' if lim == by_rss else 'vubd fds'} is the limit); vubd itself needs "
          f"{(per_device(top, 'vubd_rss_kib') or 0):.0f} KiB and {fd_dev:.1f} fds per idle device.")
else:
    print("Not measured (no N above 1).")

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    colors = {"qd1-poll": "tab:blue", "qd1-fd": "tab:orange", "qd32-fd": "tab:green"}
    for mode in MODES:
        xs = [n for n in ns if med(n, mode, "iops") is not None]
        c = colors[mode]
        axes[0][0].plot(xs, [med(n, mode, "iops") for n in xs], "o-", color=c, label=mode)
        axes[0][1].plot(xs, [med(n, mode, "lat_p50_us") for n in xs], "o-", color=c, label=f"{mode} p50")
        axes[0][1].plot(xs, [med(n, mode, "lat_p99_us") for n in xs], "s--", color=c, label=f"{mode} p99")
        axes[1][0].plot(xs, [med(n, mode, "server_cpu_us_per_io") for n in xs], "o-", color=c, label=mode)
    axes[0][0].set_title("busy device: IOPS")
    axes[0][1].set_title("busy device: latency µs")
    axes[0][1].set_yscale("log")
    axes[1][0].set_title("busy device: server CPU µs per I/O")
    ax = axes[1][1]
    ax.plot(ns, [idle[n]["vubd_rss_kib"] / 1024 for n in ns], "o-", color="tab:purple", label="vubd RSS MiB")
    ax.set_title("vubd with N-1 idle attached devices")
    ax.set_ylabel("RSS MiB")
    ax2 = ax.twinx()
    ax2.plot(ns, [idle[n]["vubd_fds"] for n in ns], "s--", color="tab:gray", label="open fds")
    ax2.set_ylabel("open fds")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="lower right", fontsize=8)
    for a in (axes[0][0], axes[0][1], axes[1][0], ax):
        a.set_xscale("log")
        a.set_xticks(ns)
        a.set_xticklabels([str(n) for n in ns])
        a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        a.set_xlabel("devices on the reactor (N)")
        a.grid(alpha=0.3)
        if a is not ax:
            a.legend(fontsize=7)
    fig.suptitle("Many devices on one reactor (vubd, 4 KiB randread on device 0, medians)")
    fig.tight_layout()
    fig.savefig(f"{out}/many-devices.png", dpi=90)
    print(f"\nPlot: `{out}/many-devices.png`")
except ImportError:
    print("\n(matplotlib missing: no plot)")
