#!/usr/bin/env python3
"""Save and restore: `state: saved` and back, on a 256 MiB guest that is up.

Each run starts from nothing (fresh temp state dir): `reconcile --once` boots
one VM (`memory: 256M` by default, the test guest) and the script waits for
the guest's `reconciler-guest: up` line, then --settle seconds (default 1).
Then:

  save     `state: saved` is added to the manifest and `reconcile --once` is
           timed (wall, spawn to exit); the `saved to ... in X.XXs` it prints
           is the save itself (QMP migration to the file, fsync, rename).
           The size of <state>/vms/<name>/saved.state is taken now.
  restore  `state: saved` is removed again and `reconcile --once` is timed; it
           prints `restored from ... in X.XXs`: QEMU spawned with -incoming,
           the state loaded, QMP answering, the guest resumed.

Each run is checked: the saved QEMU is gone, the file exists, the restore
removed it and its QEMU runs. At the end of the run `reconcile down` presses
the restored guest's power button: a guest that powers off (and did not boot a
second time: one `up` line in its serial log) was really resumed. No goal:
the figures are reported.

Usage: python bench/save_restore.py [--runs N] [--memory 256M]
Exit status: 0 when the figures were measured, 1 on errors.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    GUEST_DIR,
    MARKER,
    BenchError,
    LogWatcher,
    file_tail,
    finish,
    kill_qemu,
    median,
    ms,
    our_qemus,
    proc_alive,
    read_record,
    reconcile_cmd,
    run,
    run_main,
    stage_guest,
    table,
    vm_manifest,
    wait_for_marker,
)

VM_NAME = "bench-save"
SAVED = re.compile(r"saved to (\S+) in ([0-9.]+)s; QEMU (.+)$", re.M)
RESTORED = re.compile(r"restored from (\S+) in ([0-9.]+)s \(pid (\d+)\)", re.M)
MIB = 1024 * 1024


def fs_type(path: Path) -> str:
    """The file system type of path (tmpfs makes the fsync of a save free), from mounts."""
    best, kind = "", "?"
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        mount = fields[1].replace("\\040", " ")
        inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def timed(argv: list[str], what: str) -> tuple[float, str]:
    """Run a `reconcile` command that must exit 0: (wall seconds, stdout)."""
    t0 = time.perf_counter()
    out = run(argv, timeout=900)
    took = time.perf_counter() - t0
    if out.returncode != 0:
        raise BenchError(f"{what}: reconcile exited {out.returncode}:\n"
                         f"{out.stdout}{out.stderr}".rstrip())
    return took, out.stdout


def one_run(root: Path, guest: Path, cmd: list[str], args: argparse.Namespace
            ) -> dict[str, Any]:
    manifests = root / "m"
    manifests.mkdir(parents=True)
    path = manifests / "vm.yaml"
    running = vm_manifest(VM_NAME, guest, memory=args.memory)
    state = root / "s"
    vm_dir = state / "vms" / VM_NAME
    once = [*cmd, "--once", str(manifests), "--state-dir", str(state)]
    try:
        path.write_text(running)
        boot, _ = timed(once, "boot")
        record = read_record(vm_dir / "record.json")
        if record is None:
            raise BenchError(f"no record in {vm_dir} after the boot")
        pid = int(record["pid"])

        def check() -> None:
            if not proc_alive(pid):
                raise BenchError(f"QEMU (pid {pid}) exited before the guest was up\n  "
                                 "qemu.log: " + (file_tail(vm_dir / "qemu.log") or "(empty)"))

        watcher = LogWatcher(vm_dir / "serial.log")
        try:
            up, _ = wait_for_marker(watcher, time.perf_counter(), timeout=args.timeout,
                                    check=check)
        finally:
            watcher.close()
        time.sleep(args.settle)
        check()

        path.write_text(running + "state: saved\n")
        save_wall, out = timed(once, "save")
        match = SAVED.search(out)
        if not match:
            raise BenchError(f"save: no 'saved to ... in X.XXs' in the output:\n{out}")
        state_file = vm_dir / "saved.state"
        if match[1] != str(state_file) or not state_file.is_file():
            raise BenchError(f"save: expected {state_file}, the output says {match[1]}")
        if proc_alive(pid):
            raise BenchError(f"save: QEMU pid {pid} still runs after the save")
        size = state_file.stat().st_size

        path.write_text(running)
        restore_wall, out = timed(once, "restore")
        back = RESTORED.search(out)
        if not back:
            raise BenchError(f"restore: no 'restored from ... in X.XXs' in the output:\n{out}")
        new_pid = int(back[3])
        if state_file.exists() or not proc_alive(new_pid):
            raise BenchError(f"restore: saved.state still there ({state_file.exists()}) or "
                             f"QEMU pid {new_pid} not running ({proc_alive(new_pid)})")

        # The restored guest must be the same boot, alive: it powers off on the button.
        out = run([*cmd, "down", "--state-dir", str(state)], timeout=120)
        down = out.stdout.strip().removeprefix(VM_NAME).strip() or out.stderr.strip()
        boots = len(MARKER.findall((vm_dir / "serial.log").read_bytes()))
        if out.returncode != 0 or boots != 1:
            raise BenchError(f"after the restore: reconcile down exited {out.returncode} "
                             f"({down}); {boots} boots in the serial log (expected 1)")
        return {"boot": boot, "up": up, "save_wall": save_wall, "save": float(match[2]),
                "quit": match[3], "size": size, "restore_wall": restore_wall,
                "restore": float(back[2]), "down": down}
    finally:
        record = read_record(vm_dir / "record.json") if vm_dir.is_dir() else None
        if record is not None:
            kill_qemu(int(record["pid"]), str(root))
        for pid in our_qemus(str(root)):
            kill_qemu(pid, str(root))
            print(f"  cleanup: killed leftover QEMU pid {pid}", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, metavar="N",
                        help="save/restore cycles, each on a freshly booted VM (default 3)")
    parser.add_argument("--memory", default="256M", help="guest memory (default 256M)")
    parser.add_argument("--settle", type=float, default=1.0, metavar="S",
                        help="seconds between the guest's up line and the save (default 1)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for the guest to boot (default 60)")
    parser.add_argument("--tmp", type=Path, default=Path("/tmp"), metavar="DIR",
                        help="where the temp dir (state dir, saved file) goes; it must be "
                             "short enough for unix socket paths (default /tmp)")
    parser.add_argument("--guest", type=Path, default=GUEST_DIR, metavar="DIR",
                        help="test guest dir (vmlinuz, initrd.img) to copy and boot "
                             f"(default {GUEST_DIR})")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    cmd = reconcile_cmd()
    root = Path(tempfile.mkdtemp(prefix="rbench-save-", dir=args.tmp))
    try:
        guest = stage_guest(root, args.guest)
        fs = fs_type(root)
        print(f"reconcile command: {' '.join(cmd)}")
        print(f"guest memory {args.memory}, {args.runs} runs, save >= {args.settle:g}s after "
              f"the guest is up, temp dir {root} ({fs})\n")
        results = []
        for i in range(args.runs):
            got = one_run(root / f"r{i + 1}", guest, cmd, args)
            results.append(got)
            print(f"  run {i + 1}/{args.runs}: save {got['save']:.2f}s ({ms(got['save_wall'])}"
                  f" ms wall), {got['size'] / MIB:.1f} MiB, restore {got['restore']:.2f}s "
                  f"({ms(got['restore_wall'])} ms wall); down: {got['down']}", flush=True)
            if not args.keep:
                shutil.rmtree(root / f"r{i + 1}", ignore_errors=True)

        def row(label: str, r: dict[str, Any]) -> list[str]:
            return [label, ms(r["boot"]), ms(r["up"]), f"{r['size'] / MIB:.1f}",
                    ms(r["save"]), ms(r["save_wall"]), ms(r["save_wall"] - r["save"]),
                    ms(r["restore"]), ms(r["restore_wall"]),
                    ms(r["restore_wall"] - r["restore"])]

        keys = ("boot", "up", "size", "save", "save_wall", "restore", "restore_wall")
        med = {k: median([r[k] for r in results]) for k in keys}
        rows = [row(str(i + 1), r) for i, r in enumerate(results)]
        med_row = row("median", med)
        # The rest columns of the median row: medians of the per-run differences.
        med_row[6] = ms(median([r["save_wall"] - r["save"] for r in results]))
        med_row[9] = ms(median([r["restore_wall"] - r["restore"] for r in results]))
        rows.append(med_row)
        print()
        print(table(["run", "boot ms", "up ms", "file MiB", "save ms", "save wall ms",
                     "rest ms", "restore ms", "restore wall ms", "rest ms"], rows))
        print("""
boot ms: `reconcile --once` that starts the VM (spawn to exit); up ms: then until
  the guest's up line in the serial log.
file MiB: saved.state between the two steps (zero pages take almost no room).
save ms: what `reconcile --once` reports as `saved to ... in X.XXs` (10 ms
  resolution): migration to the file, fsync and rename; save wall ms: the whole
  command, spawn to exit; rest ms: wall - reported (interpreter, manifests,
  observing, QMP quit of the saved QEMU).
restore ms: `restored from ... in X.XXs`: spawn with -incoming, state loaded,
  QMP answering, guest resumed, record written, file removed; restore wall ms /
  rest ms: as for the save (rest: interpreter, manifests, observing).""")
        print(f"\nsave median: {med['save'] * 1000:.0f} ms ({med['save_wall'] * 1000:.0f} ms "
              f"wall), restore median: {med['restore'] * 1000:.0f} ms "
              f"({med['restore_wall'] * 1000:.0f} ms wall), saved state "
              f"{med['size'] / MIB:.1f} MiB for {args.memory} of guest memory")
        return 0
    finally:
        finish(root, keep=args.keep)


if __name__ == "__main__":
    run_main(main, "save_restore")
