#!/usr/bin/env python3
"""Restart latency: SIGKILL of a VM's QEMU -> the daemon has spawned its replacement.

Each run starts from nothing: a fresh temp state dir, a one-VM manifest
(`restart: always`, 128M, the test guest) and a fresh `reconcile DIR` daemon
with `--resync 600`, so the only thing that can explain a restart within the
run is the daemon noticing the exit (its pidfd watcher), and the restart is
the VM's first (backoff 0: no deliberate delay).

Before the kill it waits until the VM's record.json exists with a live pid,
the daemon has logged the start (its pass is over) and at least --settle
seconds (default 0.5) have passed since QEMU was spawned: the daemon registers
its pidfd watchers only after a pass, and the exit of a VM killed before that
would be found at the end of that pass at best (at the next resync in daemons
that do not look for such exits), not timed through the watcher. With --boot
it also waits for the guest's `reconciler-guest: up` line (a VM that is up,
not booting, is killed).

Then t0 = time.time() right before os.kill(pid, SIGKILL), and record.json is
polled every 1 ms until its pid changes. The latency is the new record's
`started_at` - t0: both wall clock, `started_at` is stamped by the daemon right
after posix_spawn() of the new QEMU returned. Also shown: when the daemon
stamped the exit (`exit.at`, if the poller saw that intermediate record) and
when the poller saw the new record. Goal: median < 100 ms.

Usage: python bench/restart_latency.py [--runs N] [--boot]
Exit status: 0 when the figures were measured (goal met or not), 1 on errors.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    GUEST_DIR,
    BenchError,
    LogWatcher,
    file_tail,
    finish,
    kill_qemu,
    median,
    ms,
    our_qemus,
    proc_alive,
    proc_cmdline,
    read_record,
    reconcile_cmd,
    run_main,
    stage_guest,
    table,
    verdict,
    vm_manifest,
    wait_for_marker,
)

GOAL_MS = 100.0
VM_NAME = "bench-restart"
RESYNC = 600.0  # the daemon's --resync: far beyond any run, so it never explains a restart
RECORD_POLL = 0.001  # how often record.json is read after the kill
DAEMON_STOP_TIMEOUT = 30.0  # it finishes its pass first, and a start waits for QMP (<= 15 s)


class Run:
    """One fresh daemon with one fresh VM in its own state dir under `root`."""

    def __init__(self, root: Path, guest: Path, cmd: list[str], *, memory: str) -> None:
        self.root = root
        self.manifests = root / "m"
        self.manifests.mkdir(parents=True)
        (self.manifests / "vm.yaml").write_text(
            vm_manifest(VM_NAME, guest, memory=memory) + "restart: always\n")
        self.state = root / "s"
        self.vm_dir = self.state / "vms" / VM_NAME
        self.record_path = self.vm_dir / "record.json"
        self.daemon_log = root / "daemon.log"
        self.argv = [*cmd, str(self.manifests), "--state-dir", str(self.state),
                     "--resync", f"{RESYNC:g}"]
        self.daemon: subprocess.Popen[bytes] | None = None

    def start_daemon(self) -> None:
        with open(self.daemon_log, "wb") as log:
            # Its own session: a Ctrl-C on the terminal reaches us, and we stop it.
            self.daemon = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)

    def check_daemon(self) -> None:
        assert self.daemon is not None
        if self.daemon.poll() is not None:
            raise BenchError(f"the daemon exited {self.daemon.returncode}:\n  "
                             + (file_tail(self.daemon_log) or "(no output)"))

    def check_qemu(self, pid: int) -> None:
        if not proc_alive(pid):
            raise BenchError(f"QEMU (pid {pid}) exited on its own (too little --memory? "
                             "this guest needs at least 96M)\n  qemu.log: "
                             + (file_tail(self.vm_dir / "qemu.log") or "(empty)"))

    def wait_started(self, *, settle: float, timeout: float) -> dict[str, Any]:
        """The record of the first QEMU, once the daemon's pass is over and it settled."""
        deadline = time.monotonic() + timeout
        logged = f"vm '{VM_NAME}': start"
        while True:
            self.check_daemon()
            record = read_record(self.record_path)
            if (record is not None and proc_alive(record["pid"])
                    and logged in self.daemon_log.read_text(errors="replace")
                    and time.time() >= record["started_at"] + settle):
                return record
            if time.monotonic() > deadline:
                raise BenchError(f"the daemon did not start the VM within {timeout:.0f}s:\n  "
                                 + (file_tail(self.daemon_log) or "(no output)"))
            time.sleep(0.01)

    def kill_and_wait(self, pid: int, *, timeout: float) -> dict[str, Any]:
        """SIGKILL pid, then poll record.json every RECORD_POLL until its pid changes."""
        cmd = proc_cmdline(pid)
        if "qemu-system" not in cmd or str(self.root) not in cmd:  # never someone else's
            raise BenchError(f"pid {pid} is not our QEMU: {cmd!r}")
        last = b""
        exit_at: float | None = None
        t0 = time.time()
        os.kill(pid, signal.SIGKILL)
        deadline = t0 + timeout
        while True:
            data = self.record_path.read_bytes()
            if data != last:
                seen = time.time()
                last = data
                record = read_record(self.record_path)
                if record is not None and record["pid"] != pid:
                    return {"t0": t0, "record": record, "seen": seen - t0,
                            "spawn": record["started_at"] - t0,
                            "exit": None if exit_at is None else exit_at - t0}
                if record is not None and record.get("exit"):
                    exit_at = record["exit"]["at"]
            if time.time() > deadline:
                self.check_daemon()
                raise BenchError(
                    f"no restart within {timeout:.0f}s of the kill (exit recorded: "
                    f"{'yes' if exit_at else 'no'}); daemon log:\n  "
                    + (file_tail(self.daemon_log) or "(no output)"))
            time.sleep(RECORD_POLL)

    def cleanup(self) -> list[str]:
        """Stop the daemon (SIGTERM: it leaves the VM running), then kill our QEMUs."""
        notes = []
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            try:
                self.daemon.wait(DAEMON_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
                notes.append(f"daemon ignored SIGTERM for {DAEMON_STOP_TIMEOUT:.0f}s: killed")
        # -SIGTERM: stopped before it had set up its handler (still importing).
        if self.daemon is not None and self.daemon.returncode not in (0, -15, None):
            notes.append(f"daemon exited {self.daemon.returncode}")
        record = read_record(self.record_path) if self.record_path.parent.is_dir() else None
        if record is not None:
            kill_qemu(int(record["pid"]), str(self.root))
        leftovers = our_qemus(str(self.root))
        for pid in leftovers:
            kill_qemu(pid, str(self.root))
        if leftovers:
            notes.append(f"killed leftover QEMU pids {leftovers}")
        return notes


def one_run(root: Path, guest: Path, cmd: list[str], args: argparse.Namespace
            ) -> dict[str, Any]:
    run = Run(root, guest, cmd, memory=args.memory)
    try:
        run.start_daemon()
        first = run.wait_started(settle=args.settle, timeout=args.timeout)
        pid = int(first["pid"])
        if args.boot:
            watcher = LogWatcher(run.vm_dir / "serial.log")
            try:
                wait_for_marker(watcher, time.perf_counter(), timeout=args.timeout,
                                check=lambda: run.check_qemu(pid))
            finally:
                watcher.close()
        run.check_qemu(pid)
        now = read_record(run.record_path)
        if now is None or now["pid"] != pid or now.get("exit"):
            raise BenchError(f"the VM changed before the kill: {now}")
        got = run.kill_and_wait(pid, timeout=args.restart_timeout)
        new = got["record"]
        if new.get("restarts") != 1:
            raise BenchError(f"expected the first restart, the new record says restarts="
                             f"{new.get('restarts')} backoff={new.get('backoff')}")
        got.update(old_pid=pid, new_pid=int(new["pid"]),
                   ran=got["t0"] - first["started_at"])
        return got
    finally:
        for note in run.cleanup():
            print(f"  cleanup: {note}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, metavar="N",
                        help="kills, each with a fresh daemon and state dir (default 20)")
    parser.add_argument("--memory", default="128M",
                        help="guest memory (default 128M; at least 96M for this guest)")
    parser.add_argument("--settle", type=float, default=0.5, metavar="S",
                        help="seconds between the spawn of QEMU and the kill, at least "
                             "(default 0.5; the daemon's pass must be over)")
    parser.add_argument("--boot", action="store_true",
                        help="also wait for the guest to reach user space before the kill")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for the first start (and the guest) (default 60)")
    parser.add_argument("--restart-timeout", type=float, default=10.0, metavar="S",
                        help="seconds to wait for the restart after the kill (default 10)")
    parser.add_argument("--guest", type=Path, default=GUEST_DIR, metavar="DIR",
                        help="test guest dir (vmlinuz, initrd.img) to copy and boot "
                             f"(default {GUEST_DIR})")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (daemon, serial and QEMU logs)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    cmd = reconcile_cmd()
    # Short, under /tmp: the state dir must fit unix socket paths (107 bytes).
    root = Path(tempfile.mkdtemp(prefix="rbench-restart-", dir="/tmp"))
    try:
        guest = stage_guest(root, args.guest)
        print(f"reconcile command: {' '.join(cmd)}")
        print(f"guest memory {args.memory}, {args.runs} runs, daemon --resync {RESYNC:g}, "
              f"kill >= {args.settle:g}s after spawn"
              + (" and after the guest is up" if args.boot else "")
              + f", record poll {RECORD_POLL * 1000:.0f} ms, temp dir {root}\n")
        results = []
        for i in range(args.runs):
            got = one_run(root / f"r{i + 1}", guest, cmd, args)
            results.append(got)
            exit_ms = "-" if got["exit"] is None else ms(got["exit"])
            print(f"  run {i + 1}/{args.runs}: pid {got['old_pid']} -> {got['new_pid']}: "
                  f"spawned after {ms(got['spawn'])} ms (exit stamped {exit_ms} ms, "
                  f"record seen {ms(got['seen'])} ms)", flush=True)
            if not args.keep:
                shutil.rmtree(root / f"r{i + 1}", ignore_errors=True)

        rows = [[str(i + 1), str(r["old_pid"]), str(r["new_pid"]), f"{r['ran']:.2f}",
                 "-" if r["exit"] is None else ms(r["exit"]), ms(r["spawn"]), ms(r["seen"])]
                for i, r in enumerate(results)]
        exits = [r["exit"] for r in results if r["exit"] is not None]
        for label, fn in (("median", median), ("min", min), ("max", max)):
            rows.append([label, "", "", "", ms(fn(exits)) if exits else "-",
                         ms(fn([r["spawn"] for r in results])),
                         ms(fn([r["seen"] for r in results]))])
        print()
        print(table(["run", "old pid", "new pid", "ran s", "exit ms", "spawn ms", "seen ms"],
                    rows))
        print(f"""
All times are from t0 = time.time() right before os.kill(pid, SIGKILL).
ran s: how long the first QEMU ran before the kill.
exit ms: the daemon stamped the exit (record's exit.at, after it reaped QEMU);
  '-' when the 1 ms poller missed that intermediate record ({len(exits)}/{len(results)} seen).
spawn ms: the new QEMU spawned (new record's started_at, right after posix_spawn):
  the restart latency.
seen ms: the poller read the new record.json (written just after the spawn).""")
        med_ms = median([r["spawn"] for r in results]) * 1000
        print(f"\nrestart latency median: {med_ms:.0f} ms (goal < {GOAL_MS:.0f} ms): "
              f"{verdict(med_ms, GOAL_MS)}")
        return 0
    finally:
        finish(root, keep=args.keep)


if __name__ == "__main__":
    run_main(main, "restart_latency")
