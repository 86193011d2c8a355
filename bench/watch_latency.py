#!/usr/bin/env python3
"""Watch latency: a manifest written -> the daemon has spawned the QEMU it asks for.

One `reconcile DIR` daemon (`--resync 600`, so only the manifest watcher can
explain a pass within a run) on a temp manifest dir and state dir. Each edit
(`--runs`, default 20, after one warm-up edit not counted) adds a brand new VM
file `web-N.yaml` (the test guest, --memory, default 96M), written as editors
save: a hidden temp file, then os.replace(). t0 = time.time() right before the
write; record.json of web-N is polled every 1 ms, and the latency is its
`started_at` (stamped by the daemon right after posix_spawn() of QEMU) - t0: the
pure watch (inotify, debounce) + pass (load, observe, plan) + spawn path.
Goal: median < 300 ms.

Between edits: the new guest must reach user space (so no booting guest eats
the CPU of the next measurement), then web-(N-3)'s file is deleted and the
script waits until the daemon has terminated it (guest powered off on the ACPI
button, record gone), so at most 4 VMs run; then until the daemon is idle (its
`reconciler_passes_total` unchanged for --settle seconds).

Then --restart-runs edits (default 5; 0 skips them) of the memory of the last
VM (96M <-> 112M): a hardware change, so the daemon restarts it. Its guest is
up before each edit, so the graceful terminate takes the guest's ACPI power-off;
timed separately: write -> old QEMU gone (a pidfd) -> new QEMU spawned.

The daemon's log line `manifests changed: ...` (1 ms resolution) splits each
latency into detection (watchfiles' debounce) and the pass up to the spawn.

Usage: python bench/watch_latency.py [--runs N] [--restart-runs N]
Exit status: 0 when the figures were measured (goal met or not), 1 on errors.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    GUEST_DIR,
    BenchError,
    Daemon,
    LogWatcher,
    file_tail,
    finish,
    free_port,
    kill_qemus,
    log_lines,
    median,
    ms,
    our_qemus,
    proc_alive,
    read_record,
    reconcile_cmd,
    recorded_pids,
    run_main,
    scrape,
    stage_guest,
    table,
    verdict,
    vm_manifest,
    wait_for_marker,
    write_like_an_editor,
)

GOAL_MS = 300.0
RESYNC = 600.0  # the daemon's --resync: far beyond any run, so it never explains a pass
RECORD_POLL = 0.001  # how often record.json is read after a write
KEEP = 3  # VMs left running before each edit (the new one makes KEEP + 1)
PASSES = "reconciler_passes_total"


class Bench:
    def __init__(self, root: Path, guest: Path, cmd: list[str],
                 args: argparse.Namespace) -> None:
        self.root, self.guest, self.args = root, guest, args
        self.manifests = root / "m"
        self.manifests.mkdir()
        self.state = root / "s"
        self.address = f"127.0.0.1:{args.port or free_port()}"
        self.daemon = Daemon([*cmd, str(self.manifests), "--state-dir", str(self.state),
                              "--resync", f"{RESYNC:g}", "--metrics", self.address],
                             root / "daemon.log")

    # --- the daemon -------------------------------------------------------

    def passes(self) -> int:
        self.daemon.check()
        return int(scrape(self.address)[PASSES])

    def wait_first_pass(self) -> None:
        deadline = time.monotonic() + self.args.timeout
        while True:
            self.daemon.check()
            try:
                if self.passes() >= 1:
                    return
            except OSError:  # metrics not served yet (still importing)
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"the daemon ran no pass within {self.args.timeout:.0f}s:\n  "
                                 + (file_tail(self.daemon.log) or "(no output)"))
            time.sleep(0.05)

    def wait_idle(self) -> int:
        """Until passes_total stays unchanged for --settle seconds; returns it."""
        deadline = time.monotonic() + self.args.timeout
        last, since = self.passes(), time.monotonic()
        while time.monotonic() - since < self.args.settle:
            time.sleep(0.05)
            now = self.passes()
            if now != last:
                last, since = now, time.monotonic()
            if time.monotonic() > deadline:
                raise BenchError(f"the daemon never went idle ({last} passes)")
        return last

    def logged(self, message: str, *, after: float, vm: str) -> float | None:
        """When the daemon logged a line starting with `message` and naming `vm`."""
        for at, text in log_lines(self.daemon.text()):
            if at >= after - 0.002 and text.startswith(message) and vm in text:
                return at
        return None

    def wait_logged(self, message: str, *, after: float, vm: str) -> float:
        deadline = time.monotonic() + self.args.timeout
        while (at := self.logged(message, after=after, vm=vm)) is None:
            self.daemon.check()
            if time.monotonic() > deadline:
                raise BenchError(f"the daemon did not log {message!r} for {vm} within "
                                 f"{self.args.timeout:.0f}s:\n  " + file_tail(self.daemon.log))
            time.sleep(0.02)
        return at

    # --- VMs --------------------------------------------------------------

    def record_path(self, name: str) -> Path:
        return self.state / "vms" / name / "record.json"

    def write(self, name: str, memory: str) -> float:
        """Write web-N's manifest as an editor does; t0 (wall clock) right before."""
        text = vm_manifest(name, self.guest, memory=memory)
        t0 = time.time()
        write_like_an_editor(self.manifests / f"{name}.yaml", text)
        return t0

    def wait_spawn(self, name: str, t0: float, *, old_pid: int | None = None,
                   pidfd: int | None = None) -> dict[str, Any]:
        """Poll record.json every RECORD_POLL until it names a QEMU other than old_pid.

        With `pidfd` (of old_pid): also when the old QEMU ended.
        """
        path = self.record_path(name)
        deadline = t0 + self.args.spawn_timeout
        gone: float | None = None
        last = None
        while True:
            if pidfd is not None and gone is None and select.select([pidfd], [], [], 0)[0]:
                gone = time.time()
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                data = None
            if data is not None and data != last:
                last = data
                record = read_record(path)
                if record is not None and record["pid"] != old_pid:
                    seen = time.time()
                    if pidfd is not None and gone is None:  # ended before the spawn
                        gone = seen if select.select([pidfd], [], [], 0)[0] else None
                    return {"record": record, "seen": seen - t0,
                            "spawn": record["started_at"] - t0,
                            "gone": None if gone is None else gone - t0}
            if time.time() > deadline:
                self.daemon.check()
                raise BenchError(f"no QEMU spawned for {name} within "
                                 f"{self.args.spawn_timeout:.0f}s of the write; daemon log:\n  "
                                 + (file_tail(self.daemon.log) or "(no output)"))
            time.sleep(RECORD_POLL)

    def wait_up(self, name: str, record: dict[str, Any]) -> float:
        """Until this boot of the guest is in user space: seconds after its spawn."""
        pid = int(record["pid"])
        vm_dir = self.state / "vms" / name

        def check() -> None:
            self.daemon.check()
            if not proc_alive(pid):
                raise BenchError(f"{name}'s QEMU (pid {pid}) exited while booting "
                                 "(too little --memory? this guest needs at least 96M)\n"
                                 "  qemu.log: " + (file_tail(vm_dir / "qemu.log") or "(empty)"))

        watcher = LogWatcher(vm_dir / "serial.log", offset=int(record.get("serial_offset", 0)))
        try:
            wait_for_marker(watcher, time.perf_counter(), timeout=self.args.timeout,
                            check=check)
        finally:
            watcher.close()
        return time.time() - float(record["started_at"])

    def delete(self, name: str) -> float:
        """Remove name's manifest; until the daemon terminated it: seconds taken."""
        record = read_record(self.record_path(name))
        if record is None:
            raise BenchError(f"{name} has no record to delete")
        pid = int(record["pid"])
        t0 = time.time()
        (self.manifests / f"{name}.yaml").unlink()
        deadline = time.monotonic() + self.args.timeout
        while proc_alive(pid) or self.record_path(name).parent.exists():
            self.daemon.check()
            if time.monotonic() > deadline:
                raise BenchError(f"{name} (pid {pid}) was not terminated within "
                                 f"{self.args.timeout:.0f}s of its file's removal:\n  "
                                 + file_tail(self.daemon.log))
            time.sleep(0.01)
        return time.time() - t0

    def cleanup(self) -> list[str]:
        notes = self.daemon.stop()
        killed = kill_qemus(recorded_pids(self.state), str(self.root))
        leftovers = kill_qemus(our_qemus(str(self.root)), str(self.root))
        if leftovers:
            notes.append(f"killed leftover QEMU pids {leftovers}")
        if killed:
            notes.append(f"killed {len(killed)} VM(s) of ours by pid")
        return notes


def add_runs(bench: Bench, args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """Warm-up edit (web-0), then --runs edits each adding web-N; and the last VM."""
    results = []
    names: list[str] = []
    for i in range(args.runs + 1):
        name = f"web-{i}"
        before = bench.wait_idle()
        t0 = bench.write(name, args.memory)
        got = bench.wait_spawn(name, t0)
        bench.wait_logged(f"vm '{name}': start", after=t0, vm=name)  # its pass is over
        got["up"] = bench.wait_up(name, got["record"])
        got["passes"] = bench.passes() - before
        detected = bench.logged("manifests changed:", after=t0, vm=f"{name}.yaml")
        got["detect"] = None if detected is None else detected - t0
        names.append(name)
        got["deleted"], got["delete"] = None, None
        if len(names) > KEEP:
            old = names.pop(0)
            got["deleted"], got["delete"] = old, bench.delete(old)
        got.update(name=name, pid=int(got["record"]["pid"]))
        label = "warm-up" if i == 0 else f"edit {i}/{args.runs}"
        detect = "-" if got["detect"] is None else ms(got["detect"])
        deleted = ("" if got["deleted"] is None
                   else f"; {got['deleted']} gone {got['delete']:.2f}s after its removal")
        print(f"  {label}: {name} spawned after {ms(got['spawn'])} ms (change logged "
              f"{detect} ms, record seen {ms(got['seen'])} ms; {got['passes']} pass(es); "
              f"up {got['up']:.2f}s after spawn{deleted})", flush=True)
        if i > 0:
            results.append(got)
    return results, names[-1]


def restart_runs(bench: Bench, name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """--restart-runs memory edits of VM `name`: graceful terminate + start."""
    results = []
    sizes = (args.alt_memory, args.memory)
    for j in range(args.restart_runs):
        record = read_record(bench.record_path(name))
        if record is None:
            raise BenchError(f"{name} has no record")
        bench.wait_up(name, record)  # (already up after the first round)
        bench.wait_idle()
        old_pid = int(record["pid"])
        pidfd = os.pidfd_open(old_pid)
        try:
            memory = sizes[j % 2]
            t0 = bench.write(name, memory)
            got = bench.wait_spawn(name, t0, old_pid=old_pid, pidfd=pidfd)
        finally:
            os.close(pidfd)
        bench.wait_logged(f"vm '{name}': restart", after=t0, vm=name)
        got["up"] = bench.wait_up(name, got["record"])
        detected = bench.logged("manifests changed:", after=t0, vm=f"{name}.yaml")
        got["detect"] = None if detected is None else detected - t0
        got.update(memory=memory, old_pid=old_pid, new_pid=int(got["record"]["pid"]))
        detect = "-" if got["detect"] is None else ms(got["detect"])
        gone = "-" if got["gone"] is None else ms(got["gone"])
        print(f"  restart {j + 1}/{args.restart_runs}: {name} -> {memory}: old QEMU gone "
              f"{gone} ms, new spawned {ms(got['spawn'])} ms (change logged {detect} ms)",
              flush=True)
        results.append(got)
    return results


def stats_rows(results: list[dict[str, Any]], keys: list[str], lead: int, width: int
               ) -> list[list[str]]:
    """median/min/max rows: `lead` label columns, then keys (ms), padded to `width`."""
    rows = []
    for label, fn in (("median", median), ("min", min), ("max", max)):
        row = [label] + [""] * (lead - 1)
        for key in keys:
            values = [r[key] for r in results if r.get(key) is not None]
            row.append(ms(fn(values)) if values else "")
        rows.append(row + [""] * (width - len(row)))
    return rows


def report_add(results: list[dict[str, Any]]) -> float:
    for r in results:
        r["pass"] = None if r["detect"] is None else r["spawn"] - r["detect"]
    rows = [[str(i + 1), r["name"], "-" if r["detect"] is None else ms(r["detect"]),
             "-" if r["pass"] is None else ms(r["pass"]), ms(r["spawn"]), ms(r["seen"]),
             str(r["passes"]), f"{r['up']:.2f}",
             "-" if r["delete"] is None else f"{r['delete']:.2f}"]
            for i, r in enumerate(results)]
    rows += stats_rows(results, ["detect", "pass", "spawn", "seen"], 2, 9)
    print()
    print(table(["edit", "vm", "detect ms", "pass ms", "spawn ms", "seen ms", "passes",
                 "up s", "del s"], rows))
    print("""
All times from t0 = time.time() right before writing web-N.yaml (temp file + rename).
detect ms: the daemon logged `manifests changed: web-N.yaml` (watchfiles' debounce;
  1 ms resolution, truncated).
pass ms: spawn - detect: load, observe (QMP query-status of each running VM), plan, spawn.
spawn ms: web-N's QEMU spawned (its record's started_at): the watch latency.
seen ms: this script read the new record.json.
passes: passes the daemon ran for the write (from reconciler_passes_total; 1 expected).
up s: spawn -> the guest's up line. del s: the removal of web-(N-3)'s file -> its
  QEMU gone and record removed (graceful: ACPI power-off).""")
    return median([r["spawn"] for r in results]) * 1000


def report_restart(results: list[dict[str, Any]]) -> None:
    for r in results:
        r["stop"] = (None if r["gone"] is None or r["detect"] is None
                     else r["gone"] - r["detect"])
        r["start"] = None if r["gone"] is None else r["spawn"] - r["gone"]
    rows = [[str(i + 1), r["memory"], f"{r['old_pid']}->{r['new_pid']}",
             "-" if r["detect"] is None else ms(r["detect"]),
             "-" if r["stop"] is None else ms(r["stop"]),
             "-" if r["gone"] is None else ms(r["gone"]),
             "-" if r["start"] is None else ms(r["start"]), ms(r["spawn"])]
            for i, r in enumerate(results)]
    rows += stats_rows(results, ["detect", "stop", "gone", "start", "spawn"], 3, 8)
    print()
    print(table(["edit", "memory", "pids", "detect ms", "stop ms", "gone ms", "start ms",
                 "spawn ms"], rows))
    print("""
Memory edits of one VM (a hardware change: the daemon restarts it); times from t0.
detect ms: `manifests changed` logged. gone ms: the old QEMU ended (seen on a pidfd).
stop ms: gone - detect: pass up to the terminate, then the guest's ACPI power-off.
start ms: spawn - gone: reap, the rest of the terminate, and the start.
spawn ms: the new QEMU spawned (record's started_at).""")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, metavar="N",
                        help="edits adding a VM, measured (default 20; plus 1 warm-up)")
    parser.add_argument("--restart-runs", type=int, default=5, metavar="N",
                        help="memory edits restarting a VM, reported apart (default 5; 0: none)")
    parser.add_argument("--memory", default="96M",
                        help="guest memory (default 96M; at least 96M for this guest)")
    parser.add_argument("--alt-memory", default="112M", metavar="MEMORY",
                        help="the other memory size of the restart edits (default 112M)")
    parser.add_argument("--settle", type=float, default=0.3, metavar="S",
                        help="before each edit, the daemon's pass count must have been "
                             "unchanged this long (default 0.3)")
    parser.add_argument("--port", type=int, default=0,
                        help="the daemon's metrics port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for a guest, a termination, the daemon "
                             "(default 60)")
    parser.add_argument("--spawn-timeout", type=float, default=20.0, metavar="S",
                        help="seconds to wait for a spawn after a write (default 20)")
    parser.add_argument("--guest", type=Path, default=GUEST_DIR, metavar="DIR",
                        help="test guest dir (vmlinuz, initrd.img) to copy and boot "
                             f"(default {GUEST_DIR})")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (daemon, serial and QEMU logs)")
    args = parser.parse_args()
    if args.runs < 1 or args.restart_runs < 0:
        parser.error("--runs must be at least 1, --restart-runs at least 0")

    cmd = reconcile_cmd()
    # Short, under /tmp: the state dir must fit unix socket paths (107 bytes).
    root = Path(tempfile.mkdtemp(prefix="rbench-watch-", dir="/tmp"))
    bench: Bench | None = None
    try:
        guest = stage_guest(root, args.guest)
        bench = Bench(root, guest, cmd, args)
        print(f"reconcile command: {' '.join(cmd)}")
        print(f"guest memory {args.memory}, {args.runs} edits (+1 warm-up) adding a VM, at "
              f"most {KEEP + 1} VMs, then {args.restart_runs} memory edits; daemon --resync "
              f"{RESYNC:g}, metrics {bench.address}; record poll "
              f"{RECORD_POLL * 1000:.0f} ms, temp dir {root}\n")
        bench.daemon.start()
        bench.wait_first_pass()
        added, last = add_runs(bench, args)
        restarted = restart_runs(bench, last, args) if args.restart_runs else []
        med_ms = report_add(added)
        if restarted:
            report_restart(restarted)
            spawn = median([r["spawn"] for r in restarted]) * 1000
            print(f"\nrestart after a memory edit, median: {spawn:.0f} ms write -> new QEMU "
                  "(includes the guest's ACPI power-off; no goal)")
        print(f"\nwatch latency median: {med_ms:.0f} ms write -> QEMU spawned "
              f"(goal < {GOAL_MS:.0f} ms): {verdict(med_ms, GOAL_MS)}")
        return 0
    finally:
        if bench is not None:
            for note in bench.cleanup():
                print(f"cleanup: {note}", file=sys.stderr)
        finish(root, keep=args.keep)


if __name__ == "__main__":
    run_main(main, "watch_latency")
