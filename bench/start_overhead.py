#!/usr/bin/env python3
"""Start overhead: `reconcile --once` versus starting the same QEMU command directly.

Both arms are timed from the moment the command is launched to the moment the
test guest's `reconciler-guest: up uptime=<s>` line shows up in the serial log:

  reconcile  `reconcile --once DIR --state-dir FRESH` on a one-VM manifest;
             the clock runs until the marker appears in FRESH/vms/NAME/serial.log.
  direct     the argv the reconciler used (taken from the record.json of a
             reconciler-started warm-up VM), with paths where the reconciler
             hands QEMU descriptors (sockets, logs, images, kernel: `by_paths`),
             its socket/log paths rewritten into another temp dir, started as
             root with subprocess.Popen; the clock runs until the marker appears
             in that serial log.

Runs are paired (the order alternates from pair to pair, so a warming or
cooling machine does not favour one arm) and the overhead of a pair is
reconcile - direct. Logs are polled every 2 ms: that interval (plus one read)
bounds the resolution of every figure. Each VM is killed (SIGKILL) right
after its marker is seen. Goal: median overhead < 150 ms.

Usage: python bench/start_overhead.py [--runs N] [--memory 128M]
Exit status: 0 when the figures were measured (goal met or not), 1 on errors.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    GUEST_DIR,
    POLL_INTERVAL,
    BenchError,
    LogWatcher,
    finish,
    kill_qemu,
    median,
    ms,
    proc_alive,
    reconcile_cmd,
    run_main,
    stage_guest,
    table,
    verdict,
    vm_manifest,
    wait_for_marker,
)

GOAL_MS = 150.0
VM_NAME = "bench-start"


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return "\n  ".join(text.splitlines()[-lines:])


SOCKETS = {"qmp": "qmp.sock", "serial0": "serial.sock", "qga0": "qga.sock"}


def by_paths(argv: list[str], vm_dir: str, guest: Path) -> list[str]:
    """The reconciler's QEMU command with paths where it hands over descriptors
    (privsep): what one would type to start the same VM by hand, as root."""
    fdsets: dict[str, str] = {}
    for flag, value in itertools.pairwise(argv):
        if flag == "-add-fd":
            opts = dict(o.partition("=")[::2] for o in value.split(",", 2))
            fdsets.setdefault(f"/dev/fdset/{opts['set']}", opts["opaque"].replace(",,", ","))
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        flag = argv[i - 1] if i else ""
        if arg == "-add-fd":
            skip = True
            continue
        if flag == "-chardev" and ",fd=" in arg:
            cid = arg.split("id=", 1)[1].split(",", 1)[0]
            head, _, rest = arg.partition(",fd=")
            arg = f"{head},path={vm_dir}/{SOCKETS[cid]},{rest.split(',', 1)[1]}"
        elif flag == "-kernel":
            arg = str(guest / "vmlinuz")
        elif flag == "-initrd":
            arg = str(guest / "initrd.img")
        for fdset, path in fdsets.items():
            arg = arg.replace(f"logfile={fdset},", f"logfile={path},").replace(
                f'"filename":"{fdset}"', json.dumps({"filename": path})[1:-1])
        out.append(arg)
    return out


class Bench:
    def __init__(self, root: Path, guest: Path, *, memory: str, timeout: float) -> None:
        self.root = root
        self.timeout = timeout
        self.cmd = reconcile_cmd()
        self.manifests = root / "m"
        self.manifests.mkdir()
        (self.manifests / "vm.yaml").write_text(vm_manifest(VM_NAME, guest, memory=memory))
        self.template_argv: list[str] = []
        self.template_dir = ""
        self.count = 0

    def _fresh(self, prefix: str) -> Path:
        self.count += 1
        return self.root / f"{prefix}{self.count}"

    # --- the reconcile arm ------------------------------------------------

    def reconcile_run(self) -> dict[str, Any]:
        state = self._fresh("r")
        vm_dir = state / "vms" / VM_NAME
        watcher = LogWatcher(vm_dir / "serial.log")
        argv = [*self.cmd, "--once", str(self.manifests), "--state-dir", str(state)]
        exited: dict[str, float] = {}
        pid: list[int] = []
        last_alive_check = [0.0]

        t0_wall = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

        def check() -> None:
            now = time.perf_counter()
            if "t" not in exited and proc.poll() is not None:
                exited["t"] = now - t0
                out, err = proc.communicate()
                if proc.returncode != 0:
                    raise BenchError(f"reconcile --once exited {proc.returncode}:\n"
                                     f"{out}{err}".rstrip())
            if "t" in exited and now - last_alive_check[0] > 0.05:
                last_alive_check[0] = now
                if not pid:
                    pid.append(json.loads((vm_dir / "record.json").read_text())["pid"])
                if not proc_alive(pid[0]):
                    raise BenchError(
                        f"QEMU (pid {pid[0]}) exited before the guest reached user space "
                        "(too little --memory? this guest needs more than 64M)\n  qemu.log: "
                        + (_tail(vm_dir / "qemu.log") or "(empty)"))

        try:
            took, uptime = wait_for_marker(watcher, t0, timeout=self.timeout, check=check,
                                           check_every=0)
            if "t" not in exited:
                out, err = proc.communicate(timeout=60)
                exited["t"] = time.perf_counter() - t0
                if proc.returncode != 0:
                    raise BenchError(f"reconcile --once exited {proc.returncode}:\n"
                                     f"{out}{err}".rstrip())
        finally:
            watcher.close()
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            self._kill_recorded(vm_dir, state)
        record = json.loads((vm_dir / "record.json").read_text())
        return {
            "t": took, "uptime": uptime, "exit": exited["t"],
            "spawn": record["started_at"] - t0_wall,
            "argv": record["argv"], "vm_dir": str(vm_dir),
        }

    def _kill_recorded(self, vm_dir: Path, state: Path) -> None:
        try:
            record = json.loads((vm_dir / "record.json").read_text())
        except (OSError, ValueError):
            return
        kill_qemu(int(record["pid"]), str(state))

    # --- the direct arm ---------------------------------------------------

    def direct_run(self) -> dict[str, Any]:
        run_dir = self._fresh("d")
        run_dir.mkdir()
        argv = [a.replace(self.template_dir, str(run_dir)) for a in self.template_argv]
        if not any(str(run_dir) in a for a in argv) or any(self.template_dir in a for a in argv):
            raise BenchError(f"cannot rewrite the paths of {self.template_argv}")
        watcher = LogWatcher(run_dir / "serial.log")
        with open(run_dir / "qemu.log", "wb") as out:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            spawned = time.perf_counter() - t0

        def check() -> None:
            if proc.poll() is not None:
                raise BenchError(f"direct QEMU exited {proc.returncode} before the marker\n"
                                 "  qemu.log: " + (_tail(run_dir / "qemu.log") or "(empty)"))

        try:
            took, uptime = wait_for_marker(watcher, t0, timeout=self.timeout, check=check)
        finally:
            watcher.close()
            proc.kill()
            proc.wait()
        return {"t": took, "uptime": uptime, "spawn": spawned}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, metavar="N",
                        help="number of (reconcile, direct) pairs (default 5)")
    parser.add_argument("--memory", default="128M",
                        help="guest memory (default 128M; 64M is too little for this guest)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for a marker (default 60)")
    parser.add_argument("--settle", type=float, default=0.3,
                        help="pause in seconds after each run (default 0.3)")
    parser.add_argument("--guest", type=Path, default=GUEST_DIR, metavar="DIR",
                        help="test guest dir (vmlinuz, initrd.img) to copy and boot "
                             f"(default {GUEST_DIR})")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    # Short, under /tmp: the state dir must fit unix socket paths (107 bytes).
    root = Path(tempfile.mkdtemp(prefix="rbench-start-", dir="/tmp"))
    try:
        guest = stage_guest(root, args.guest)
        bench = Bench(root, guest, memory=args.memory, timeout=args.timeout)
        print(f"reconcile command: {' '.join(bench.cmd)}")
        print(f"guest memory {args.memory}, {args.runs} pairs, log poll interval "
              f"{POLL_INTERVAL * 1000:.0f} ms (resolution bound), temp dir {root}")
        print("warm-up (not counted): one reconciler start, its argv is the direct command")
        warm = bench.reconcile_run()
        bench.template_argv = by_paths(warm["argv"], warm["vm_dir"], guest)
        bench.template_dir = warm["vm_dir"]
        print(f"  warm-up: marker after {ms(warm['t'])} ms; direct argv: "
              f"{' '.join(warm['argv'])}\n")
        time.sleep(args.settle)

        rows, pairs = [], []
        for i in range(args.runs):
            order = ("reconcile", "direct") if i % 2 == 0 else ("direct", "reconcile")
            got: dict[str, dict[str, Any]] = {}
            for arm in order:
                got[arm] = bench.reconcile_run() if arm == "reconcile" else bench.direct_run()
                time.sleep(args.settle)
            r, d = got["reconcile"], got["direct"]
            over = r["t"] - d["t"]
            adj = (r["t"] - r["uptime"]) - (d["t"] - d["uptime"])
            pairs.append({"r": r, "d": d, "over": over, "adj": adj})
            rows.append([str(i + 1), " then ".join(order), ms(r["t"]), ms(d["t"]),
                         f"{over * 1000:+.1f}", f"{adj * 1000:+.0f}", ms(r["spawn"]),
                         ms(d["spawn"]), ms(r["exit"]), f"{r['uptime']:.2f}/{d['uptime']:.2f}"])
            print(f"  pair {i + 1}/{args.runs}: reconcile {ms(r['t'])} ms, direct {ms(d['t'])}"
                  f" ms, overhead {over * 1000:+.1f} ms", flush=True)

        med = {k: median([p[k] for p in pairs]) for k in ("over", "adj")}
        med_r = median([p["r"]["t"] for p in pairs])
        med_d = median([p["d"]["t"] for p in pairs])
        rows.append(["median", "", ms(med_r), ms(med_d), f"{med['over'] * 1000:+.1f}",
                     f"{med['adj'] * 1000:+.0f}",
                     ms(median([p["r"]["spawn"] for p in pairs])),
                     ms(median([p["d"]["spawn"] for p in pairs])),
                     ms(median([p["r"]["exit"] for p in pairs])), ""])
        print()
        print(table(["pair", "order", "reconcile ms", "direct ms", "overhead ms",
                     "boot-adj ms", "r spawn ms", "d spawn ms", "r exit ms",
                     "uptime r/d s"], rows, right=2))
        print("""
reconcile/direct ms: launch -> marker in the serial log (time to user space).
overhead ms: reconcile - direct of the same pair; median row: median of pairs.
boot-adj ms: the same with each guest's own uptime subtracted (wall - uptime),
  which removes guest-boot jitter; uptime has 10 ms resolution.
r spawn ms: launch of `reconcile` -> QEMU spawned (record.json started_at);
d spawn ms: Popen() return for the direct QEMU.
r exit ms: launch -> `reconcile --once` exited (QMP answered, record written).""")
        over_ms = med["over"] * 1000
        spawn_ms = (median([p["r"]["spawn"] for p in pairs])
                    - median([p["d"]["spawn"] for p in pairs])) * 1000
        print(f"\nspawn latency median: {spawn_ms:.0f} ms (time `reconcile` needs before QEMU "
              "runs: a floor for the overhead, free of guest-boot jitter)")
        print(f"overhead median: {over_ms:.0f} ms (goal < {GOAL_MS:.0f} ms): "
              f"{verdict(over_ms, GOAL_MS)}")
        return 0
    finally:
        finish(root, keep=args.keep)


if __name__ == "__main__":
    run_main(main, "start_overhead")
