#!/usr/bin/env python3
"""A small QMP client for the guest tests (run.sh).

  qmp.py SOCKET COMMAND [ARGS-JSON]
      Runs one QMP command; prints its "return" as JSON. Exit 1 with the error's class and
      description on stderr (and on stdout as {"error": ...}) if QEMU refused it.
  qmp.py SOCKET --migrate URI [--max-bandwidth BYTES] [--timeout SECONDS]
      Starts a migration and polls query-migrate until it ends; prints one line of
      key=value (status, dirty_sync_count, total_time_ms, downtime_ms, transferred_bytes,
      iterations_seen). Exit 0 only if the status is "completed".
  qmp.py SOCKET --wait-gone QOM-PATH [--timeout SECONDS]
      Polls until QOM-PATH (e.g. /machine/peripheral/disk1) no longer exists (an unplug the
      guest acknowledged). Exit 1 on timeout.
  qmp.py SOCKET --virtio-rings
      One line per virtio device: its driver status and, for a vhost device, per queue,
      the avail and used indices read from guest memory (pmemsave; nothing is asked of
      the backend). A queue whose avail index stays ahead of its used index has requests
      the driver is still waiting for.
"""

import json
import os
import socket
import sys
import tempfile
import time


class Qmp:
    def __init__(self, path, timeout=30.0):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise ConnectionError("QEMU closed the QMP connection")
        return json.loads(line)

    def execute(self, name, args=None):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            r = self._read()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise QmpError(r["error"])
            # an event: skip


class QmpError(Exception):
    def __init__(self, err):
        super().__init__(f"{err.get('class')}: {err.get('desc')}")
        self.err = err


def option(args, name, default):
    if name in args:
        i = args.index(name)
        return args[i + 1]
    return default


def migrate(path, uri, args):
    bandwidth = int(option(args, "--max-bandwidth", str(1 << 30)))
    timeout = float(option(args, "--timeout", "600"))
    q = Qmp(path)
    q.execute("migrate-set-parameters", {"max-bandwidth": bandwidth})
    q.execute("migrate", {"uri": uri})
    deadline = time.time() + timeout
    info = {}
    syncs_seen = set()
    while time.time() < deadline:
        info = q.execute("query-migrate")
        ram = info.get("ram", {})
        syncs_seen.add(ram.get("dirty-sync-count", 0))
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.2)
    ram = info.get("ram", {})
    status = info.get("status", "none")
    if status not in ("completed", "failed", "cancelled"):
        status = "timeout"
    out = {
        "status": status,
        "dirty_sync_count": ram.get("dirty-sync-count", 0),
        "total_time_ms": info.get("total-time", 0),
        "downtime_ms": info.get("downtime", 0),
        "transferred_bytes": ram.get("transferred", 0),
        "dirty_pages_rate": ram.get("dirty-pages-rate", 0),
        "iterations_seen": len(syncs_seen),
    }
    if "error-desc" in info:
        out["error"] = info["error-desc"].replace(" ", "_")
    print(" ".join(f"{k}={v}" for k, v in out.items()))
    return 0 if status == "completed" else 1


def wait_gone(path, qom_path, args):
    timeout = float(option(args, "--timeout", "120"))
    parent, _, name = qom_path.rpartition("/")
    deadline = time.time() + timeout
    # One connection: QEMU serves one QMP client at a time.
    q = Qmp(path)
    while time.time() < deadline:
        children = [c["name"] for c in q.execute("qom-list", {"path": parent})]
        if name not in children:
            print(f"gone={qom_path}")
            return 0
        time.sleep(0.5)
    print(f"still_present={qom_path}")
    return 1


def guest_u16_pair(q, addr, scratch):
    """The two little-endian u16 at guest physical `addr` (a ring's flags and idx), read
    with pmemsave, which only copies guest memory out."""
    q.execute("pmemsave", {"val": addr, "size": 4, "filename": scratch})
    with open(scratch, "rb") as f:
        raw = f.read(4)
    return int.from_bytes(raw[0:2], "little"), int.from_bytes(raw[2:4], "little")


def virtio_rings(path):
    # Read-only on purpose: x-query-virtio-queue-status asks a vhost backend for its ring
    # base (GET_VRING_BASE stops the ring), and x-query-virtio-queue-element walks a
    # descriptor chain at QEMU's stale index, which can mark the device broken.
    q = Qmp(path, timeout=10.0)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = os.path.join(tmp, "ring")
        for dev in q.execute("x-query-virtio"):
            st = q.execute("x-query-virtio-status", {"path": dev["path"]})
            words = [
                f"virtio {dev['path']}",
                f"name={st.get('name')}",
                "status="
                + (
                    ",".join(
                        x.split(":")[0].replace("VIRTIO_CONFIG_S_", "")
                        for x in st.get("status", {}).get("statuses", [])
                    )
                    or "-"
                ),
                f"vhost_started={st.get('vhost-started')}",
                f"broken={st.get('broken')}",
            ]
            if st.get("vhost-started"):
                for i in range(st.get("num-vqs", 0)):
                    try:
                        v = q.execute(
                            "x-query-virtio-vhost-queue-status",
                            {"path": dev["path"], "queue": i},
                        )
                        if not v["avail-phys"] or not v["used-phys"]:
                            words.append(f"q{i}:not_set_up")
                            continue
                        aflags, aidx = guest_u16_pair(q, v["avail-phys"], scratch)
                        uflags, uidx = guest_u16_pair(q, v["used-phys"], scratch)
                        words.append(
                            f"q{i}:avail={aidx},used={uidx},"
                            f"avail_flags={aflags},used_flags={uflags}"
                        )
                    except QmpError as err:
                        words.append(f"q{i}:{str(err).replace(' ', '_')[:80]}")
            print(" ".join(words))
    return 0


def main(argv):
    if len(argv) < 3:
        sys.stderr.write(__doc__)
        return 2
    path, cmd = argv[1], argv[2]
    try:
        if cmd == "--migrate":
            return migrate(path, argv[3], argv[4:])
        if cmd == "--wait-gone":
            return wait_gone(path, argv[3], argv[4:])
        if cmd == "--virtio-rings":
            return virtio_rings(path)
        args = json.loads(argv[3]) if len(argv) > 3 else None
        print(json.dumps(Qmp(path).execute(cmd, args)))
        return 0
    except QmpError as e:
        print(json.dumps({"error": e.err}))
        sys.stderr.write(f"qmp.py: {cmd}: {e}\n")
        return 1
    except (OSError, ConnectionError, ValueError) as e:
        sys.stderr.write(f"qmp.py: {cmd}: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
