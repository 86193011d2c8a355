#!/usr/bin/env python3
"""No-op time: `reconcile --once` on an already converged copy of examples/vms.yaml.

Copies examples/vms.yaml (not examples/cloud/: it needs a Debian image, root
networking and a switch) into a temp dir next to a copy of guest/out/ (so the
manifest's relative `../guest/out/...` paths resolve), starts its 2 VMs with a
temp state dir, waits until both guests reached user space (so booting guests
do not eat the CPU being measured), then times N further `reconcile --once`
runs; each must report `ok` for both VMs and change nothing. Goal: median < 300 ms.

For a baseline measured in the same run (the commands are interleaved, round
by round, so drift hits all of them alike) it also times `python -c pass`,
`python -c 'import reconciler.cli'`, `python -c 'import reconciler.loop'` (what
`--once` imports: pydantic, PyYAML, qemu.qmp, tenacity), `reconcile validate
DIR` and `reconcile --once --check DIR`, so the table shows where the time goes.
The VMs are shut down with `reconcile down` at the end, on error too.

Usage: python bench/noop.py [--runs N]
Exit status: 0 when the figures were measured (goal met or not), 1 on errors.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    GUEST_DIR,
    REPO,
    BenchError,
    LogWatcher,
    kill_qemu,
    median,
    ms,
    our_qemus,
    recap,
    reconcile_cmd,
    run,
    run_main,
    stage_guest,
    table,
    verdict,
    wait_for_marker,
)

GOAL_MS = 300.0


def setup(root: Path, guest: Path) -> Path:
    """root/examples/vms.yaml and root/guest/out: copies, so ../guest/out/... resolves.

    Only vms.yaml: examples/cloud/ needs a Debian image, root networking and a switch.
    """
    examples = root / "examples"
    examples.mkdir()
    shutil.copyfile(REPO / "examples" / "vms.yaml", examples / "vms.yaml")
    stage_guest(root, guest)
    return examples


def down(cmd: list[str], state: Path, root: Path) -> None:
    """`reconcile down`, then SIGKILL whatever of ours survived it."""
    if (state / "vms").is_dir():
        try:
            out = run([*cmd, "down", "--state-dir", str(state)], timeout=120)
            text = (out.stdout + out.stderr).strip()
            print(f"cleanup: reconcile down -> exit {out.returncode}"
                  + (": " + text.replace("\n", "; ") if text else ""), file=sys.stderr)
        except subprocess.TimeoutExpired:
            print("cleanup: reconcile down timed out", file=sys.stderr)
    leftovers = our_qemus(str(root))
    for pid in leftovers:
        kill_qemu(pid, str(root))
    if leftovers:
        print(f"cleanup: killed leftover QEMU pids {leftovers}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, metavar="N",
                        help="timed runs of each command (default 10)")
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="seconds to wait for the guests to boot (default 90)")
    parser.add_argument("--guest", type=Path, default=GUEST_DIR, metavar="DIR",
                        help="test guest dir (vmlinuz, initrd.img) to copy and boot "
                             f"(default {GUEST_DIR})")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    cmd = reconcile_cmd()
    py = sys.executable
    root = Path(tempfile.mkdtemp(prefix="rbench-noop-", dir="/tmp"))
    state = root / "state"
    try:
        examples = setup(root, args.guest)
        sdir = ["--state-dir", str(state)]
        print(f"reconcile command: {' '.join(cmd)}")
        print(f"manifests {examples} (copy of examples/), state dir {state}")

        t0 = time.perf_counter()
        first = run([*cmd, "--once", str(examples), *sdir])
        took = time.perf_counter() - t0
        ok, changed, pending, failed = recap(first)
        if first.returncode != 0 or changed == 0 or failed or pending:
            raise BenchError(f"the first reconcile --once did not start the VMs "
                             f"(exit {first.returncode}):\n{first.stdout}{first.stderr}")
        print(f"first run (starts {changed} VMs): {ms(took)} ms")
        names = sorted(p.name for p in (state / "vms").iterdir())
        start = time.perf_counter()
        for name in names:
            watcher = LogWatcher(state / "vms" / name / "serial.log")
            try:
                wait_for_marker(watcher, start, timeout=args.timeout)
            finally:
                watcher.close()
        print(f"guests {', '.join(names)} in user space after "
              f"{ms(time.perf_counter() - start)} ms more; timing {args.runs} rounds\n")

        commands: list[tuple[str, list[str]]] = [
            ("python -c pass", [py, "-c", "pass"]),
            ("python -c 'import reconciler.cli'", [py, "-c", "import reconciler.cli"]),
            ("python -c 'import reconciler.loop'", [py, "-c", "import reconciler.loop"]),
            ("reconcile validate DIR", [*cmd, "validate", str(examples)]),
            ("reconcile --once --check DIR", [*cmd, "--once", "--check", str(examples), *sdir]),
            ("reconcile --once DIR  (the no-op)", [*cmd, "--once", str(examples), *sdir]),
        ]
        on_path = shutil.which("reconcile")
        if on_path and os.path.realpath(on_path) != os.path.realpath(cmd[0]):
            commands.append((f"--once via PATH ({on_path})",
                             [on_path, "--once", str(examples), *sdir]))
        expect_rc = {"reconcile --once --check DIR": 0}
        times: dict[str, list[float]] = {label: [] for label, _ in commands}
        for _ in range(args.runs):
            for label, argv in commands:
                t0 = time.perf_counter()
                out = run(argv)
                times[label].append(time.perf_counter() - t0)
                if out.returncode != expect_rc.get(label, 0):
                    raise BenchError(f"{label} exited {out.returncode}:\n"
                                     f"{out.stdout}{out.stderr}")
                if "--once" in label:
                    ok, changed, pending, failed = recap(out)
                    if (ok, changed, pending, failed) != (len(names), 0, 0, 0):
                        raise BenchError(f"{label} was not a no-op:\n{out.stdout}{out.stderr}")

        base = median(times["python -c pass"])
        rows = []
        for label, _ in commands:
            med = median(times[label])
            rows.append([label, ms(med), ms(min(times[label])), ms(max(times[label])),
                         f"{(med - base) * 1000:+.1f}"])
        print(table(["command", "median ms", "min ms", "max ms", "vs python ms"], rows))
        noop = times["reconcile --once DIR  (the no-op)"]
        med_ms, min_ms = median(noop) * 1000, min(noop) * 1000
        print(f"\n{args.runs} runs each, interleaved; wall time of the whole process "
              "(spawn to exit), including interpreter start-up.")
        print(f"\nno-op median: {med_ms:.0f} ms, min {min_ms:.0f} ms "
              f"(goal < {GOAL_MS:.0f} ms): {verdict(med_ms, GOAL_MS)}")
        return 0
    finally:
        down(cmd, state, root)
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    run_main(main, "noop")
