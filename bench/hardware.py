#!/usr/bin/env python3
"""Hardware: what disks and NICs cost, in disk creation and in VM start time.

Two parts:

  disks     `reconciler.storage.ensure_disk()` on a `Disk` (validated as the
            loader does, relative to a temp dir) for (a) a new 4G qcow2 blank
            disk and (b) a qcow2 overlay on a 64M raw base; `--runs` fresh
            files each, paired with the bare `qemu-img create` of the same
            image (the order alternates), so the difference is the
            reconciler's own cost on top of qemu-img.
  start     a VM with two NICs (on one switch) and two new 1G qcow2 disks
            ("hw") against the same VM with neither ("none"): paired runs, the
            order alternating, each with a fresh state dir and fresh disks.
            Timed from the launch of `ip netns exec NS reconcile -v --once
            DIR` to (i) its exit and (ii) the guest's `reconciler-guest: up`
            line in the serial log.

Everything network-related happens inside a network namespace this script
creates (`ip netns add`) and deletes at the end, with anything still running
in it: bridges and taps never touch the host's interfaces. After each run the
VM is killed (by the pid in its record, after checking its command line) and
every interface the reconciler left in the namespace is deleted, so each run
starts from nothing. Needs root (for `ip netns`). No goal: it reports.

Usage: python bench/hardware.py [--runs N] [--memory 128M]
Exit status: 0 when the figures were measured, 1 on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    file_tail,
    kill_qemu,
    log_lines,
    median,
    ms,
    netns_add,
    netns_delete,
    netns_flush_links,
    netns_links,
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

VM_NAME = "bench-hw"
SWITCH, BRIDGE = "lan", "br-lan"
TAPS = [f"vm{VM_NAME}.0", f"vm{VM_NAME}.1"]
DISKS = ["d1.qcow2", "d2.qcow2"]
HARDWARE = (
    "disks:\n"
    + "".join(f"  - {{path: {d}, size: 1G}}\n" for d in DISKS)
    + "interfaces:\n"
    + f"  - {{switch: {SWITCH}}}\n" * 2
    + f"---\nkind: Switch\nname: {SWITCH}\n"
)
BLANK_SIZE, BASE_SIZE = "4G", "64M"


def fs_type(path: Path) -> str:
    """The file system type of path, from the mount table (disk creation depends on it)."""
    best, kind = "", "?"
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        mount = fields[1].replace("\\040", " ")
        inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def stats(values: list[float]) -> list[str]:
    """median, min, max in ms."""
    return [ms(median(values)), ms(min(values)), ms(max(values))]


def signed(values: list[float]) -> list[str]:
    return [f"{median(values) * 1000:+.1f}", f"{min(values) * 1000:+.1f}",
            f"{max(values) * 1000:+.1f}"]


# --- part 1: disks ------------------------------------------------------------

def qemu_img_info(path: Path) -> dict[str, Any]:
    done = run(["qemu-img", "info", "-U", "--output=json", str(path)], timeout=30)
    if done.returncode != 0:
        raise BenchError(f"qemu-img info {path}: {done.stderr.strip()}")
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def disk_part(root: Path, runs: int) -> None:
    try:
        from reconciler.desired import Disk
        from reconciler.storage import create_argv, ensure_disk
    except ImportError as err:
        raise BenchError(f"cannot import reconciler ({err}): run this with the interpreter "
                         "the package is installed in (.venv/bin/python)") from err
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise BenchError("qemu-img not found; install qemu-utils")
    d = root / "disks"
    d.mkdir()
    base = d / "base.raw"
    done = run([qemu_img, "create", "-q", "-f", "raw", str(base), BASE_SIZE])
    if done.returncode != 0:
        raise BenchError(f"cannot create the base image: {done.stderr.strip()}")
    ctx = {"base_dir": str(d)}
    kinds: dict[str, dict[str, Any]] = {
        "blank": {"label": f"blank {BLANK_SIZE} qcow2",
                  "spec": {"size": BLANK_SIZE},
                  "raw": lambda p: [qemu_img, "create", "-q", "-f", "qcow2", str(p), "4096M"]},
        "overlay": {"label": f"qcow2 overlay on {BASE_SIZE} raw",
                    "spec": {"base": base.name, "base_format": "raw"},
                    "raw": lambda p: [qemu_img, "create", "-q", "-f", "qcow2", "-b", str(base),
                                      "-F", "raw", str(p)]},
    }
    count = [0]

    def one(kind: str, how: str) -> tuple[float, float, Path]:
        """(seconds of the creation, seconds of the validation, the new file)."""
        count[0] += 1
        path = d / f"{kind}-{how}-{count[0]}.qcow2"
        spec = kinds[kind]
        t0 = time.perf_counter()
        disk = Disk.model_validate({"path": path.name, **spec["spec"]}, context=ctx)
        valid = time.perf_counter() - t0
        if disk.path != path:
            raise BenchError(f"Disk resolved {path.name} to {disk.path}, not {path}")
        if how == "ensure":
            t0 = time.perf_counter()
            said = ensure_disk(disk)
            took = time.perf_counter() - t0
            if said is None or not said.startswith(f"created {path}"):
                raise BenchError(f"ensure_disk({path}) said {said!r}")
        else:
            argv = spec["raw"](path)
            if argv != create_argv(disk, path, binary=qemu_img):
                raise BenchError(f"not the reconciler's command: {argv} vs "
                                 f"{create_argv(disk, path, binary=qemu_img)}")
            t0 = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                  stdin=subprocess.DEVNULL, check=False)
            took = time.perf_counter() - t0
            if done.returncode != 0:
                raise BenchError(f"{' '.join(argv)}: {done.stderr.strip()}")
        # Outside the clock: the image is what was asked for.
        info = qemu_img_info(path)
        want = 4096 * 2**20 if kind == "blank" else 64 * 2**20
        backing = info.get("backing-filename") or info.get("full-backing-filename")
        if (info.get("format") != "qcow2" or info.get("virtual-size") != want
                or (kind == "overlay") != (backing == str(base))):
            raise BenchError(f"{path} is not the {spec['label']} asked for: {info}")
        return took, valid, path

    print(f"disks: {runs} runs of each, in {d} ({fs_type(d)}); qemu-img {qemu_img}")
    for kind in kinds:  # warm-up, not counted: qemu-img and its libraries in the page cache
        for how in ("ensure", "raw"):
            one(kind, how)
    times: dict[tuple[str, str], list[float]] = {(k, h): [] for k in kinds
                                                 for h in ("ensure", "raw")}
    valid: dict[str, list[float]] = {k: [] for k in kinds}
    rows = []
    for i in range(runs):
        row = [str(i + 1)]
        for kind in kinds:
            order = ("ensure", "raw") if i % 2 == 0 else ("raw", "ensure")
            for how in order:
                took, v, _ = one(kind, how)
                times[kind, how].append(took)
                if how == "ensure":
                    valid[kind].append(v)
            row += [ms(times[kind, "ensure"][-1]), ms(times[kind, "raw"][-1]),
                    f"{(times[kind, 'ensure'][-1] - times[kind, 'raw'][-1]) * 1000:+.1f}"]
        rows.append(row)
    leftovers = sorted(p.name for p in d.iterdir() if ".creating-" in p.name)
    print(table(["run", "blank ensure ms", "blank qemu-img ms", "diff ms",
                 "overlay ensure ms", "overlay qemu-img ms", "diff ms"], rows))
    print()
    summary = []
    for kind, spec in kinds.items():
        ens, raw = times[kind, "ensure"], times[kind, "raw"]
        summary.append([spec["label"], "ensure_disk()", *stats(ens)])
        summary.append(["", "qemu-img create", *stats(raw)])
        summary.append(["", "overhead (paired)",
                        *signed([a - b for a, b in zip(ens, raw, strict=True)])])
        summary.append(["", "Disk validation", *stats(valid[kind])])
    print(table(["disk", "what", "median ms", "min ms", "max ms"], summary, right=2))
    print("""
ensure_disk(): the reconciler's call (exists? which qemu-img, qemu-img create to a
  temp name, link into place, unlink the temp name); qemu-img create: the same
  argv (checked against storage.create_argv) run with subprocess.run directly;
  overhead: ensure_disk - qemu-img of the same run. Disk validation:
  Disk.model_validate() (done at manifest load, not in ensure_disk).""")
    if leftovers:
        print(f"WARNING: temp files left behind by ensure_disk: {leftovers}")
    print()


# --- part 2: VM start, with and without hardware --------------------------------

class StartBench:
    def __init__(self, root: Path, guest: Path, ns: str, *, memory: str,
                 timeout: float) -> None:
        self.root = root
        self.ns = ns
        self.timeout = timeout
        self.cmd = reconcile_cmd()
        self.manifest = {
            "none": vm_manifest(VM_NAME, guest, memory=memory),
            "hw": vm_manifest(VM_NAME, guest, memory=memory) + HARDWARE,
        }
        self.count = 0

    def run(self, arm: str) -> dict[str, Any]:
        self.count += 1
        run_dir = self.root / f"{arm}{self.count}"
        manifests, state = run_dir / "m", run_dir / "s"
        manifests.mkdir(parents=True)
        (manifests / "vm.yaml").write_text(self.manifest[arm])
        vm_dir = state / "vms" / VM_NAME
        before = set(netns_links(self.ns))
        if before != {"lo"}:
            raise BenchError(f"netns {self.ns} not clean before the run: {sorted(before)}")
        argv = ["ip", "netns", "exec", self.ns, *self.cmd, "-v", "--once", str(manifests)]
        env = dict(os.environ, RECONCILER_STATE_DIR=str(state))
        watcher = LogWatcher(vm_dir / "serial.log")
        exited: dict[str, Any] = {}
        pid: list[int] = []
        last_alive_check = [0.0]

        t0_wall = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)

        def finish(now: float) -> None:
            exited["t"] = now - t0
            exited["out"], exited["err"] = proc.communicate()
            if proc.returncode != 0:
                raise BenchError(f"{arm}: reconcile --once exited {proc.returncode}:\n"
                                 f"{exited['out']}{exited['err']}".rstrip())

        def check() -> None:
            now = time.perf_counter()
            if "t" not in exited and proc.poll() is not None:
                finish(now)
            if "t" in exited and now - last_alive_check[0] > 0.05:
                last_alive_check[0] = now
                if not pid:
                    record = read_record(vm_dir / "record.json")
                    if record is None:
                        raise BenchError(f"{arm}: no record.json after reconcile --once")
                    pid.append(int(record["pid"]))
                if not proc_alive(pid[0]):
                    raise BenchError(f"{arm}: QEMU (pid {pid[0]}) exited before the guest "
                                     "reached user space\n  qemu.log: "
                                     + (file_tail(vm_dir / "qemu.log") or "(empty)"))

        links: dict[str, dict[str, Any]] = {}
        try:
            took, uptime = wait_for_marker(watcher, t0, timeout=self.timeout, check=check,
                                           check_every=0)
            if "t" not in exited:
                proc.wait(timeout=60)
                finish(time.perf_counter())
            links = netns_links(self.ns)
        finally:
            watcher.close()
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
            record = read_record(vm_dir / "record.json") if vm_dir.is_dir() else None
            if record is not None:
                kill_qemu(int(record["pid"]), str(self.root))
            left = netns_flush_links(self.ns)
        record = read_record(vm_dir / "record.json")
        assert record is not None
        self._check(arm, record, links, left, manifests)
        result = {"t": took, "uptime": uptime, "exit": exited["t"],
                  "spawn": record["started_at"] - t0_wall}
        if arm == "hw":
            result.update(self._phases(exited["err"], t0_wall, record["started_at"]))
        return result

    def _check(self, arm: str, record: dict[str, Any], links: dict[str, dict[str, Any]],
               left: list[str], manifests: Path) -> None:
        """Outside the clock: the VM got the hardware it asked for, and only that."""
        argv = record["argv"]
        netdevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-netdev"]
        files = [a for a in argv if '"driver":"file"' in a]
        if arm == "none":
            if netdevs or files or set(links) != {"lo"} or record.get("taps"):
                raise BenchError(f"none: unexpected hardware: netdevs {netdevs}, disks {files}"
                                 f", links {sorted(links)}")
            return
        if len(netdevs) != 2 or any(f"ifname={t}," not in n
                                    for t, n in zip(TAPS, netdevs, strict=True)):
            raise BenchError(f"hw: QEMU's -netdev args are {netdevs}")
        if [json.loads(f)["filename"] for f in files] != [str(manifests / d) for d in DISKS]:
            raise BenchError(f"hw: QEMU's disks are {files}")
        kind = links.get(BRIDGE, {}).get("linkinfo", {}).get("info_kind")
        masters = [links.get(t, {}).get("master") for t in TAPS]
        if kind != "bridge" or masters != [BRIDGE, BRIDGE] or record.get("taps") != TAPS:
            raise BenchError(f"hw: in netns {self.ns}: {BRIDGE} kind {kind}, taps' masters "
                             f"{masters}, record taps {record.get('taps')}")
        if sorted(left) != sorted([BRIDGE, *TAPS]):
            raise BenchError(f"hw: left in netns {self.ns} after the kill: {left}")
        for disk in DISKS:
            if not (manifests / disk).is_file():
                raise BenchError(f"hw: {manifests / disk} missing")

    @staticmethod
    def _phases(log: str, t0_wall: float, started_at: float) -> dict[str, float]:
        """From the -v log (1 ms, truncated): launch -> bridge made -> taps -> disks -> spawn."""
        lines = log_lines(log)

        def last(pred: Any) -> float:
            found = [t for t, msg in lines if pred(msg)]
            if not found:
                raise BenchError(f"hw: an expected line is missing from the log:\n{log}")
            return found[-1] - t0_wall

        bridge = last(lambda m: m == f"bridge {BRIDGE} created")
        taps = last(lambda m: m.startswith("tap ") and m.endswith(" created"))
        disks = last(lambda m: m.startswith(f"vm '{VM_NAME}': created "))
        return {"p_bridge": bridge, "p_taps": taps - bridge, "p_disks": disks - taps,
                "p_spawn": (started_at - t0_wall) - disks}


def baselines(ns: str, runs: int) -> dict[str, list[float]]:
    """What every `ip netns exec ... reconcile` pays, and what only the hw arm pays."""
    py = sys.executable
    cmds = {
        "ip netns exec NS true": ["ip", "netns", "exec", ns, "true"],
        "python -c pass (in NS)": ["ip", "netns", "exec", ns, py, "-c", "pass"],
        "python: pyroute2 IPRoute() (in NS)": [
            "ip", "netns", "exec", ns, py, "-c",
            "from pyroute2 import IPRoute; IPRoute().close()"],
    }
    out: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(runs + 1):  # the first round warms the page cache: dropped
        for key, argv in cmds.items():
            t0 = time.perf_counter()
            done = run(argv, timeout=60)
            out[key].append(time.perf_counter() - t0)
            if done.returncode != 0:
                raise BenchError(f"{' '.join(argv)}: exit {done.returncode}: "
                                 f"{done.stderr.strip()}")
    return {k: v[1:] for k, v in out.items()}


def start_part(root: Path, guest: Path, ns: str, args: argparse.Namespace) -> None:
    bench = StartBench(root, guest, ns, memory=args.memory, timeout=args.timeout)
    print(f"start: reconcile command: ip netns exec {ns} {' '.join(bench.cmd)} -v --once DIR")
    print(f"guest memory {args.memory}, {args.runs} pairs, log poll interval "
          f"{POLL_INTERVAL * 1000:.0f} ms (resolution bound)")
    base = baselines(ns, args.runs)
    print(table(["baseline (wall, spawn to exit)", "median ms", "min ms", "max ms"],
                [[k, *stats(v)] for k, v in base.items()]))
    print("warm-up (not counted): one run of each arm")
    for arm in ("none", "hw"):
        warm = bench.run(arm)
        print(f"  warm-up {arm}: exit {ms(warm['exit'])} ms, marker {ms(warm['t'])} ms")
        time.sleep(args.settle)
    print()

    pairs: list[dict[str, Any]] = []
    for i in range(args.runs):
        order = ("none", "hw") if i % 2 == 0 else ("hw", "none")
        got: dict[str, dict[str, Any]] = {}
        for arm in order:
            got[arm] = bench.run(arm)
            time.sleep(args.settle)
        pairs.append({"order": order, **got})
        n, h = got["none"], got["hw"]
        print(f"  pair {i + 1}/{args.runs}: exit {ms(n['exit'])} -> {ms(h['exit'])} ms, "
              f"up {ms(n['t'])} -> {ms(h['t'])} ms", flush=True)

    def col(arm: str, key: str) -> list[float]:
        return [p[arm][key] for p in pairs]

    def diff(key: str) -> list[float]:
        return [p["hw"][key] - p["none"][key] for p in pairs]

    # The up difference with each guest's own uptime subtracted.
    boot_adj = [(p["hw"]["t"] - p["hw"]["uptime"]) - (p["none"]["t"] - p["none"]["uptime"])
                for p in pairs]

    rows = []
    for i, p in enumerate(pairs):
        n, h = p["none"], p["hw"]
        rows.append([str(i + 1), " then ".join(p["order"]),
                     ms(n["exit"]), ms(h["exit"]), f"{(h['exit'] - n['exit']) * 1000:+.1f}",
                     ms(n["t"]), ms(h["t"]), f"{(h['t'] - n['t']) * 1000:+.1f}",
                     f"{boot_adj[i] * 1000:+.0f}",
                     ms(n["spawn"]), ms(h["spawn"]), f"{n['uptime']:.2f}/{h['uptime']:.2f}"])
    rows.append(["median", "", ms(median(col("none", "exit"))), ms(median(col("hw", "exit"))),
                 f"{median(diff('exit')) * 1000:+.1f}", ms(median(col("none", "t"))),
                 ms(median(col("hw", "t"))), f"{median(diff('t')) * 1000:+.1f}",
                 f"{median(boot_adj) * 1000:+.0f}",
                 ms(median(col("none", "spawn"))), ms(median(col("hw", "spawn"))), ""])
    print()
    print(table(["pair", "order", "none exit ms", "hw exit ms", "diff ms", "none up ms",
                 "hw up ms", "diff ms", "boot-adj ms", "none spawn ms", "hw spawn ms",
                 "uptime n/h s"], rows, right=2))
    phases = [[str(i + 1), ms(p["hw"]["p_bridge"]), ms(p["hw"]["p_taps"]),
               ms(p["hw"]["p_disks"]), ms(p["hw"]["p_spawn"]), ms(p["hw"]["spawn"]),
               ms(p["none"]["spawn"])] for i, p in enumerate(pairs)]
    phases.append(["median", *(ms(median([p["hw"][k] for p in pairs]))
                               for k in ("p_bridge", "p_taps", "p_disks", "p_spawn", "spawn")),
                   ms(median(col("none", "spawn")))])
    print()
    print(table(["pair", "hw: bridge made ms", "2 taps ms", "2 disks ms", "-> spawn ms",
                 "hw spawn ms", "none spawn ms"], phases))
    spawn_diff = median(diff("spawn")) * 1000
    print(f"""
exit ms: launch of `ip netns exec NS reconcile -v --once DIR` -> it exited (QEMU
  spawned, QMP answered, record written; for hw also 2 disks, the bridge, 2 taps).
up ms: launch -> `reconciler-guest: up` in the serial log (time to user space).
diff ms: hw - none of the same pair; median row: median of the pairs' differences.
boot-adj ms: the up difference with each guest's own uptime subtracted (less
  sensitive to guest-boot jitter; uptime has 10 ms resolution).
spawn ms: launch -> QEMU spawned (record.json started_at).
hw phases, from the reconciler's -v log (1 ms resolution, truncated), from launch:
  bridge made (interpreter, imports, manifests, observe, plan, pyroute2 import,
  netlink socket, bridge created), then the 2 taps, the 2 disks (qemu-img create
  each), and the rest up to QEMU's spawn (argv, posix_spawn).

spawn difference median (hw - none): {spawn_diff:+.0f} ms (the reconciler's own work
  for the hardware before QEMU runs; baseline: pyroute2 import + IPRoute() costs
  {(median(base['python: pyroute2 IPRoute() (in NS)'])
    - median(base['python -c pass (in NS)'])) * 1000:.0f} ms over `python -c pass`)""")
    print(f"hardware start cost median: {median(diff('exit')) * 1000:+.0f} ms on `--once` "
          f"wall ({ms(median(col('none', 'exit')))} -> {ms(median(col('hw', 'exit')))} ms), "
          f"{median(diff('t')) * 1000:+.0f} ms to guest up "
          f"({ms(median(col('none', 't')))} -> {ms(median(col('hw', 't')))} ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, metavar="N",
                        help="disks of each kind, and (none, hw) VM pairs (default 5)")
    parser.add_argument("--memory", default="128M",
                        help="guest memory (default 128M; 64M is too little for this guest)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for a marker (default 60)")
    parser.add_argument("--settle", type=float, default=0.3,
                        help="pause in seconds after each VM run (default 0.3)")
    parser.add_argument("--tmp", type=Path, default=Path("/tmp"), metavar="DIR",
                        help="where the temp dir (disks, state dirs) goes; it must be short "
                             "enough for unix socket paths (default /tmp)")
    parser.add_argument("--guest", type=Path, default=GUEST_DIR, metavar="DIR",
                        help="test guest dir (vmlinuz, initrd.img) to copy and boot "
                             f"(default {GUEST_DIR})")
    parser.add_argument("--skip-disks", action="store_true", help="only the start part")
    parser.add_argument("--skip-start", action="store_true", help="only the disk part")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if os.geteuid() != 0 and not args.skip_start:
        raise BenchError("the start part needs root (ip netns add); --skip-start runs "
                         "the disk part alone")
    if shutil.which("ip") is None:
        raise BenchError("ip (iproute2) not found")

    root = Path(tempfile.mkdtemp(prefix="rbench-hw-", dir=args.tmp))
    ns = ""
    try:
        print(f"temp dir {root} ({fs_type(root)})\n")
        if not args.skip_disks:
            disk_part(root, args.runs)
        if not args.skip_start:
            guest = stage_guest(root, args.guest)
            ns = netns_add("rbench-hw")
            print(f"network namespace {ns} (bridges and taps live in it only)")
            start_part(root, guest, ns, args)
        return 0
    finally:
        leftovers = our_qemus(str(root))
        for pid in leftovers:
            kill_qemu(pid, str(root))
        if leftovers:
            print(f"cleanup: killed leftover QEMU pids {leftovers}", file=sys.stderr)
        if ns:
            killed = netns_delete(ns)
            if killed:
                print(f"cleanup: killed pids {killed} left in netns {ns}", file=sys.stderr)
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    run_main(main, "hardware")
