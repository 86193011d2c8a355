#!/usr/bin/env python3
"""Cold start, before/after: launch -> spawn, no-ops, N paused VMs, a miss after an edit.

Two source trees of the package run side by side with this interpreter's
dependencies: `before` (`git archive` of --before into the temp dir; default the
parent of the commit that added reconciler/valcache.py, which caches validated
manifests in the state dir and defers pydantic's validator builds) and `after`
(this checkout, uncommitted edits included; --after REV exports a commit instead).
Each round, arms in alternating order, every command spawn to exit:

  spawn     `reconcile --once DIR` of one VM (128M, the test guest) with a fresh
            state dir: launch -> QEMU spawned (the record's started_at); the VM is
            killed at once. A fresh state dir has no cache: a miss by nature;
  examples  the no-op `reconcile --once` of a copy of examples/vms.yaml (2 VMs,
            both guests in user space); each run must recap `2 ok, 0 changed`;
  N VMs     on --vms N (default 200) paused VMs (`state: paused`, 64M: QEMU
            started with -S, the guest never runs): the no-op `--once`, `status`
            and `--once --check`, and `--once` after an edit (a comment added to
            the manifest: a miss, nothing to do), then an untimed run on the
            manifest as it was (in --runs-200 rounds only);
  pass      `python -c pass`: the interpreter's own start, the baseline.

Both VM sets are started once, by the after arm, and both arms time their commands
against the same state dir and manifests: records are compatible, which is checked
(the before arm's no-op must recap `N ok, 0 changed` and the after arm's next one
too; if not, the before arm gets state dirs and VMs of its own, and the script
says so). The cache is warm for both arms (an untimed run of each first), and a
before run neither reads nor writes the after arm's entry: its `--once` runs pass
`--max-manifest-size` one byte over the default, which gives it an entry (a file)
of its own. The after arm's cache entry is checked to stay the same file through
the timed no-op runs (a miss replaces it): a miss is reported. Up to fec3e2d
(`--before fec3e2d`), a miss validated in the command itself, and a hit unpickled
pydantic models; since, a child validates while the command imports the rest and
the VMs are observed, and a hit imports no pydantic. Up to fba60fe (`--before
fba60fe`), that child was forked after the arguments were parsed and the manifests
read; since, the validator is forked first thing and imports while the command
parses them, and a kernel QEMU's user may read is handed to it without a copy.

Bytecode: this environment may set PYTHONDONTWRITEBYTECODE=1, with which every
run compiles every module not already cached. The children run without it (nor
PYTHONPYCACHEPREFIX), and both trees are precompiled first (`python -m compileall
-q TREE/reconciler`), so both arms load .pyc files as an installed package does.

examples/cloud/ is left out (it needs a Debian image, root networking and a
switch): only examples/vms.yaml is copied, next to a copy of guest/out/.

Goals (after arm, medians): launch -> spawn <= 150 ms; examples no-op <= 150 ms;
N VMs no-op <= 500 ms. At the end the VMs are stopped with `reconcile down`, and
anything of ours still alive is killed.

Usage: python bench/cold_start.py [--runs N] [--runs-200 N] [--vms N] [--before REV]
Exit status: 0 when the figures were measured (goals met or not), 1 on errors.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    GUEST_DIR,
    INITRD,
    KERNEL,
    REPO,
    BenchError,
    LogWatcher,
    before_after_table,
    bytecode_env,
    command,
    export,
    finish,
    kill_qemu,
    median,
    precompile,
    python_pass,
    read_record,
    recap,
    rev_before_adding,
    run,
    run_main,
    short_rev,
    stage_guest,
    vm_manifest,
    wait_for_marker,
)

VM_NAME = "bench-cold"
GOALS_MS = {"spawn": 150.0, "examples": 150.0, "many": 500.0}


class Arm:
    """One source tree's `reconcile`, run with bytecode_env()."""

    def __init__(self, name: str, tree: Path, *, own_cache: bool = False) -> None:
        self.name, self.tree, self.cmd = name, tree, command(tree)
        self.env = bytecode_env()
        # The cache entry's file is named by the directory and the options: a limit one
        # byte over the default (no manifest here comes near it) gives this arm an entry
        # of its own. Else two arms on one cache format replace each other's entry on
        # every run, and every no-op of both is a miss.
        self.options = (["--max-manifest-size", str((1 << 20) + 1)]
                        if own_cache and (tree / "reconciler" / "valcache.py").exists() else [])

    def run(self, argv: list[str], *, timeout: float = 120.0
            ) -> tuple[subprocess.CompletedProcess[str], float]:
        t0 = time.perf_counter()
        out = run([*self.cmd, *argv], timeout=timeout, env=self.env)
        return out, time.perf_counter() - t0

    def once(self, manifests: Path, state: Path, *extra: str, expect: tuple[int, ...],
             timeout: float = 120.0, rc: int = 0) -> float:
        """`--once [extra] DIR`: its wall time; BenchError unless it exits rc with
        recap (ok, changed, pending, failed) == expect."""
        out, took = self.run(["--once", *extra, *self.options, str(manifests),
                              "--state-dir", str(state)], timeout=timeout)
        got = recap(out)
        if out.returncode != rc or got != expect:
            raise BenchError(f"{self.name}: reconcile {' '.join(['--once', *extra])} exited "
                             f"{out.returncode}, recap {got} (expected {expect}):\n"
                             f"{out.stdout}{out.stderr}")
        return took

    def status(self, state: Path, count: int) -> float:
        out, took = self.run(["status", "--state-dir", str(state)])
        paused = sum(1 for line in out.stdout.splitlines() if line.split()[1:2] == ["paused"])
        if out.returncode != 0 or paused != count:
            raise BenchError(f"{self.name}: reconcile status exited {out.returncode} with "
                             f"{paused} paused VMs (expected {count}):\n"
                             f"{out.stdout[-2000:]}{out.stderr}")
        return took

    def spawn(self, manifests: Path, state: Path) -> float:
        """launch -> QEMU spawned, for one VM and a fresh state dir; then kill it."""
        t0_wall = time.time()
        out, _ = self.run(["--once", str(manifests), "--state-dir", str(state)])
        record = read_record(state / "vms" / VM_NAME / "record.json")
        try:
            if out.returncode != 0 or record is None:
                raise BenchError(f"{self.name}: reconcile --once exited {out.returncode}"
                                 f"{'' if record else ', no record'}:\n"
                                 f"{out.stdout}{out.stderr}")
        finally:
            if record is not None:
                kill_qemu(int(record["pid"]), str(state))
        return float(record["started_at"]) - t0_wall


def paused_manifest(count: int, guest: Path) -> str:
    return "".join(
        f"---\nname: p{i:03d}\nmemory: 64M\nstate: paused\n"
        f"boot: {{kernel: {guest / KERNEL.name}, initrd: {guest / INITRD.name}, "
        "cmdline: console=ttyS0 quiet}\n"
        f"labels: {{team: t{i % 10}}}\n" for i in range(count))


def cache_stamp(state: Path) -> list[tuple[str, int, int]]:
    """The state dir's valcache entries: (name, inode, mtime_ns); a miss replaces one."""
    found = []
    for path in sorted((state / "cache").glob("manifests-*.pickle")):
        info = path.stat()
        found.append((path.name, info.st_ino, info.st_mtime_ns))
    return found


class Fleet:
    """VMs of one manifest dir, started by the after arm; a state dir per arm
    (the same one when the before arm's no-op is a no-op there too)."""

    def __init__(self, label: str, manifests: Path, root: Path, count: int) -> None:
        self.label, self.manifests, self.root, self.count = label, manifests, root, count
        self.states: dict[str, Path] = {}
        self.timeout = max(120.0, 2.0 * count)
        self.note = ""

    def start(self, arm: Arm, state: Path, *, boot_timeout: float | None) -> float:
        n = self.count
        took = self.once(arm, state, "--parallel", "8", expect=(0, n, 0, 0))
        if boot_timeout is not None:  # wait for the guests' user space: no CPU eaten later
            t0 = time.perf_counter()
            for name in sorted(p.name for p in (state / "vms").iterdir()):
                watcher = LogWatcher(state / "vms" / name / "serial.log")
                try:
                    wait_for_marker(watcher, t0, timeout=boot_timeout)
                finally:
                    watcher.close()
        return took

    def once(self, arm: Arm, state: Path, *extra: str, expect: tuple[int, ...]) -> float:
        return arm.once(self.manifests, state, *extra, expect=expect, timeout=self.timeout)

    def setup(self, before: Arm, after: Arm, *, boot_timeout: float | None) -> None:
        noop = (self.count, 0, 0, 0)
        shared = self.root / f"{self.label}-s"
        self.states = {"before": shared, "after": shared}
        took = self.start(after, shared, boot_timeout=boot_timeout)
        print(f"{self.label}: {self.count} VMs started by the after arm in {took:.1f} s")
        self.once(after, shared, expect=noop)  # untimed: the cache is warm from here on
        try:
            self.once(before, shared, expect=noop)
            self.once(after, shared, expect=noop)
        except BenchError as err:
            first = str(err).splitlines()[0]
            self.note = (f"{self.label}: separate state dirs: a before-arm no-op on the "
                         f"after arm's state dir was not one ({first})")
            print(self.note)
            after.run(["--once", str(self.manifests), "--state-dir", str(shared)],
                      timeout=self.timeout)  # the after arm's records again, then a no-op
            self.once(after, shared, expect=noop)
            own = self.root / f"{self.label}-b"
            self.states["before"] = own
            took = self.start(before, own, boot_timeout=boot_timeout)
            print(f"{self.label}: {self.count} VMs started by the before arm in {took:.1f} s")
            self.once(before, own, expect=noop)


def down(after: Arm, states: list[Path]) -> None:
    """`reconcile down` of each state dir with VMs (finish() kills what survives)."""
    for state in states:
        if not (state / "vms").is_dir():
            continue
        try:
            out, took = after.run(["down", "--state-dir", str(state)], timeout=300)
            text = (out.stdout + out.stderr).strip()
            why = [line for line in text.splitlines() if line.startswith("reconcile:")]
            print(f"cleanup: reconcile down {state.name} -> exit {out.returncode} in "
                  f"{took:.1f} s" + ("" if out.returncode == 0 else
                                     ": " + ("; ".join(why) or text[-500:])),
                  file=sys.stderr)
        except subprocess.TimeoutExpired:
            print(f"cleanup: reconcile down {state} timed out", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, metavar="N",
                        help="rounds of spawn, examples and pass (default 7)")
    parser.add_argument("--runs-200", type=int, default=5, metavar="N",
                        help="rounds of the N-VM commands (default 5)")
    parser.add_argument("--vms", type=int, default=200, metavar="N",
                        help="paused VMs (default 200)")
    parser.add_argument("--before", default=None, metavar="REV",
                        help="the commit to compare with (default: the parent of the "
                             "one that added reconciler/valcache.py)")
    parser.add_argument("--after", default=None, metavar="REV",
                        help="a commit to measure instead of this checkout")
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="seconds to wait for the example guests to boot (default 90)")
    parser.add_argument("--guest", type=Path, default=GUEST_DIR, metavar="DIR",
                        help=f"test guest dir (vmlinuz, initrd.img; default {GUEST_DIR})")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()
    if args.runs < 1 or args.runs_200 < 1 or args.vms < 1:
        parser.error("--runs, --runs-200 and --vms must be at least 1")
    rev = args.before or rev_before_adding("reconciler/valcache.py")
    root = Path(tempfile.mkdtemp(prefix="rbench-cold-", dir="/tmp"))
    fleets: list[Fleet] = []
    after: Arm | None = None
    try:
        guest = stage_guest(root, args.guest)
        one = root / "one"
        one.mkdir()
        (one / "vm.yaml").write_text(vm_manifest(VM_NAME, guest, memory="128M"))
        examples = root / "examples"
        examples.mkdir()
        (examples / "vms.yaml").write_bytes((REPO / "examples" / "vms.yaml").read_bytes())
        many = root / "many"
        many.mkdir()
        (many / "vms.yaml").write_text(paused_manifest(args.vms, guest))

        before = Arm("before", export(rev, root / "before"), own_cache=True)
        after = Arm("after", export(args.after, root / "after") if args.after else REPO)
        for arm in (before, after):
            precompile(arm.tree)
        print(f"before: {rev} ({short_rev(rev)}); after: "
              + (f"{args.after} ({short_rev(args.after)})" if args.after
                 else f"this checkout ({REPO})"))
        print(f"children without PYTHONDONTWRITEBYTECODE, both trees precompiled; "
              f"{args.runs} rounds ({args.runs_200} with the {args.vms}-VM commands), "
              "order alternating")

        ex = Fleet("examples", examples, root, 2)
        fleets.append(ex)
        ex.setup(before, after, boot_timeout=args.timeout)
        vms = Fleet("many", many, root, args.vms)
        fleets.append(vms)
        vms.setup(before, after, boot_timeout=None)
        stamps = {f.label: cache_stamp(f.states["after"]) for f in fleets}
        for label, stamp in stamps.items():
            if not stamp:
                raise BenchError(f"{label}: no valcache entry after the after arm's runs")

        labels = {"spawn": "launch -> QEMU spawned (1 VM, fresh state)",
                  "examples": "no-op --once examples/vms.yaml (2 up)",
                  "many": f"no-op --once, {args.vms} paused VMs",
                  "status": f"status, {args.vms} paused VMs",
                  "check": f"--once --check, {args.vms} paused VMs",
                  "edited": f"--once after an edit (a miss), {args.vms} paused VMs"}
        got: dict[str, dict[str, list[float]]] = {
            a.name: {k: [] for k in labels} for a in (before, after)}
        baseline: list[float] = []
        noop_many = (args.vms, 0, 0, 0)
        misses = 0
        original = (many / "vms.yaml").read_bytes()
        for i in range(max(args.runs, args.runs_200)):
            order = (before, after) if i % 2 == 0 else (after, before)
            for arm in order:
                figures = got[arm.name]
                if i < args.runs:
                    figures["spawn"].append(arm.spawn(one, root / f"spawn-{arm.name}-{i}"))
                    figures["examples"].append(
                        ex.once(arm, ex.states[arm.name], expect=(2, 0, 0, 0)))
                if i < args.runs_200:
                    state = vms.states[arm.name]
                    figures["many"].append(vms.once(arm, state, expect=noop_many))
                    figures["status"].append(arm.status(state, args.vms))
                    figures["check"].append(vms.once(arm, state, "--check", expect=noop_many))
                if arm is after:  # so far every after run should have been a hit
                    for fleet in fleets:
                        now = cache_stamp(fleet.states["after"])
                        if now != stamps[fleet.label]:
                            misses += 1
                            stamps[fleet.label] = now
                if i < args.runs_200:  # a comment added: a miss, nothing declared changes
                    (many / "vms.yaml").write_bytes(original + f"# edit {i}\n".encode())
                    figures["edited"].append(vms.once(arm, state, expect=noop_many))
                    (many / "vms.yaml").write_bytes(original)
                    vms.once(arm, state, expect=noop_many)  # untimed: warm again
                    stamps["many"] = cache_stamp(vms.states["after"])
            baseline.append(python_pass(after.env))

        base = median(baseline)
        print()
        print(before_after_table(list(labels.items()), got, base))
        print(f"\nmedians of {args.runs} rounds ({args.runs_200} for the {args.vms}-VM "
              "figures); wall time spawn to exit, interpreter start-up included")
        print("\nper round, ms (before / after):")
        for key, label in labels.items():
            print(f"  {label}:\n    " + " / ".join(
                " ".join(f"{t * 1000:.0f}" for t in got[arm][key]) for arm in got))
        print("  python -c pass: " + " ".join(f"{t * 1000:.0f}" for t in baseline) + "\n")
        for fleet in fleets:
            shared = fleet.states["before"] == fleet.states["after"]
            print(f"{fleet.label}: " + ("one state dir for both arms" if shared
                                        else "a state dir per arm"))
        if misses:
            print(f"WARNING: the after arm's cache entry was replaced {misses} times during "
                  "the timed runs (cache misses: source or manifests changed?)")
        met = 0
        for key in GOALS_MS:
            value = median(got["after"][key]) * 1000
            ok = value <= GOALS_MS[key]
            met += ok
            print(f"goal {labels[key]} <= {GOALS_MS[key]:.0f} ms: after {value:.0f} ms "
                  f"(before {median(got['before'][key]) * 1000:.0f} ms): "
                  f"{'OK' if ok else 'MISSED'}")
        print(f"goals met: {met}/{len(GOALS_MS)}: {'OK' if met == len(GOALS_MS) else 'MISSED'}")
        return 0
    finally:
        try:
            if after is not None:
                down(after, [s for f in fleets for s in dict.fromkeys(f.states.values())])
        finally:
            finish(root, keep=args.keep)


if __name__ == "__main__":
    run_main(main, "cold_start")
