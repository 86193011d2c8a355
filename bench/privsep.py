#!/usr/bin/env python3
"""Privilege separation's cost: start and no-op time before and after it, paired.

Two source trees of the package run side by side with this interpreter's
dependencies: `before` (a commit without privilege separation: QEMU as root, paths
on its command line; `git archive` of --before into the temp dir) and `after` (this
checkout: QEMU as reconciler-qemu, every file handed over as a descriptor). Each
round, in alternating order:

  start   `reconcile --once DIR` of one VM with a fresh state dir: launch -> QEMU
          spawned (the record's started_at), and launch -> the guest's
          `reconciler-guest: up` marker on its console;
  no-op   `reconcile --once DIR` again while that VM runs: the whole command;
  pass    `python -c pass`: the interpreter's own start, the baseline.

Each figure is a median over the rounds with its ratio to the baseline of the same
run. The `after` VM's QEMU is checked to be unprivileged (uid, CapEff) and its
descriptors are listed (`ls -l /proc/PID/fd`).

Usage: python bench/privsep.py [--runs N] [--before REV]   (root: QEMU drops to a user)
Exit status: 0 when the figures were measured, 1 on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    GUEST_DIR,
    REPO,
    BenchError,
    LogWatcher,
    before_after_table,
    command,
    export,
    finish,
    kill_qemu,
    median,
    proc_status,
    python_pass,
    rev_before_adding,
    run_main,
    short_rev,
    stage_guest,
    vm_manifest,
    wait_for_marker,
)

VM_NAME = "bench-priv"


def before_rev() -> str:
    """The parent of the commit that added reconciler/privsep.py."""
    return rev_before_adding("reconciler/privsep.py")


class Arm:
    def __init__(self, name: str, tree: Path, root: Path, manifests: Path) -> None:
        self.name, self.cmd, self.root, self.manifests = name, command(tree), root, manifests
        self.count = 0

    def start(self, timeout: float) -> dict[str, Any]:
        self.count += 1
        state = self.root / f"{self.name}{self.count}"
        vm_dir = state / "vms" / VM_NAME
        watcher = LogWatcher(vm_dir / "serial.log")
        t0_wall, t0 = time.time(), time.perf_counter()
        run = subprocess.run([*self.cmd, "--once", str(self.manifests), "--state-dir",
                              str(state)], capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            raise BenchError(f"{self.name}: reconcile --once exited {run.returncode}:\n"
                             f"{run.stdout}{run.stderr}")
        try:
            took, _ = wait_for_marker(watcher, t0, timeout=timeout)
        finally:
            watcher.close()
        record = json.loads((vm_dir / "record.json").read_text())
        return {"spawn": record["started_at"] - t0_wall, "up": took, "state": state,
                "pid": int(record["pid"])}

    def noop(self, state: Path) -> float:
        t0 = time.perf_counter()
        run = subprocess.run([*self.cmd, "--once", str(self.manifests), "--state-dir",
                              str(state)], capture_output=True, text=True, timeout=120)
        took = time.perf_counter() - t0
        if run.returncode != 0 or " ok " not in run.stdout:
            raise BenchError(f"{self.name}: the no-op run was not one:\n{run.stdout}"
                             f"{run.stderr}")
        return took


def describe_qemu(pid: int) -> str:
    status = proc_status(pid)
    lines = [f"QEMU pid {pid}: Uid {status['Uid']}, Gid {status['Gid']}, "
             f"CapEff {status['CapEff']}", f"$ ls -l /proc/{pid}/fd"]
    listing = subprocess.run(["ls", "-l", f"/proc/{pid}/fd"], capture_output=True,
                             text=True).stdout
    return "\n".join(lines + [line for line in listing.splitlines()
                              if not line.startswith("total")])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, metavar="N")
    parser.add_argument("--before", default=None, metavar="REV",
                        help="the commit to compare with (default: the one before "
                             "reconciler/privsep.py was added)")
    parser.add_argument("--memory", default="128M")
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: without root there is no privilege to drop")
    rev = args.before or before_rev()
    root = Path(tempfile.mkdtemp(prefix="rbench-priv-", dir="/tmp"))
    try:
        guest = stage_guest(root, GUEST_DIR)
        manifests = root / "m"
        manifests.mkdir()
        (manifests / "vm.yaml").write_text(vm_manifest(VM_NAME, guest, memory=args.memory))
        arms = [Arm("before", export(rev, root / "before"), root, manifests),
                Arm("after", REPO, root, manifests)]
        short = short_rev(rev)
        print(f"before: {rev} ({short}); after: this checkout ({REPO})")
        print(f"{args.runs} rounds, guest memory {args.memory}, order alternating")
        got: dict[str, dict[str, list[float]]] = {
            a.name: {"spawn": [], "up": [], "noop": []} for a in arms}
        baseline: list[float] = []
        for i in range(args.runs):
            order = arms if i % 2 == 0 else arms[::-1]
            for arm in order:
                started = arm.start(args.timeout)
                got[arm.name]["spawn"].append(started["spawn"])
                got[arm.name]["up"].append(started["up"])
                got[arm.name]["noop"].append(arm.noop(started["state"]))
                if arm.name == "after" and i == args.runs - 1:
                    print(describe_qemu(started["pid"]))
                kill_qemu(started["pid"], str(started["state"]))
            baseline.append(python_pass())
        print()
        print(before_after_table([("spawn", "launch -> QEMU spawned"),
                                  ("up", "launch -> guest up"), ("noop", "no-op --once")],
                                 got, median(baseline)))
        return 0
    finally:
        finish(root, keep=args.keep)


if __name__ == "__main__":
    run_main(main, "privsep")
