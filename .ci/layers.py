#!/usr/bin/env python3
"""Checks the layering of src/ (docs/architecture.md): no two top-level modules import each
other, and each layer imports only the ones its //! header allows. Test modules
(`#[cfg(test)] mod tests`) may use lower layers as fixtures and are skipped."""
import os
import re
import sys

# module -> modules it must not import (directly or through `crate::`)
FORBIDDEN = {
    "engine": {"blk", "backend", "virtio_blk", "vhost", "vduse", "ublk", "registry", "config", "cli"},
    "blk": {"backend", "virtio_blk", "vhost", "vduse", "ublk", "registry", "cli"},
    "backend": {"virtio_blk", "vhost", "vduse", "ublk", "registry", "cli"},
    "virtio_blk": {"backend", "vhost", "vduse", "ublk", "registry", "cli"},
    "vhost": {"backend", "registry", "cli"},
    "vduse": {"backend", "vhost", "ublk", "registry", "cli"},
    "ublk": {"backend", "virtio_blk", "vhost", "vduse", "registry", "cli"},
}

src = os.path.join(os.path.dirname(__file__), "..", "src")
mods = {e[:-3] if e.endswith(".rs") else e for e in os.listdir(src)
        if e not in ("main.rs", "lib.rs", "bin") and (e.endswith(".rs") or os.path.isdir(os.path.join(src, e)))}


def files(m):
    p = os.path.join(src, m)
    if os.path.isfile(p + ".rs"):
        return [p + ".rs"]
    return [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith(".rs")]


def strip_tests(text):
    i = text.find("#[cfg(test)]\nmod tests")
    return text if i < 0 else text[:i]


edges = {m: set() for m in mods}
for m in mods:
    for f in files(m):
        if f.endswith("/testing.rs") or f.endswith("/mock.rs"):
            continue
        t = strip_tests(open(f).read())
        names = set(re.findall(r"\bcrate::(\w+)", t))
        for g in re.findall(r"use\s+crate::\{([^}]*)\}", t):
            names |= set(re.findall(r"(\w+)", g))
        edges[m] |= {n for n in names if n in mods and n != m}

bad = []
for a in sorted(mods):
    for b in sorted(edges[a]):
        if a < b and a in edges[b]:
            bad.append(f"{a} and {b} import each other")
    for b in sorted(edges[a] & FORBIDDEN.get(a, set())):
        bad.append(f"{a} imports {b}, a layer above it")
for line in bad:
    print("layers:", line)
for m in sorted(mods):
    print(f"  {m} -> {', '.join(sorted(edges[m])) or '-'}")
sys.exit(1 if bad else 0)
