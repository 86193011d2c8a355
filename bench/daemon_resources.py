#!/usr/bin/env python3
"""Daemon resources: its RSS and open fds after 1,000 passes over 20 VMs, against after 10.

Declares --vms (default 20) running VMs, one manifest file each (the test guest,
--memory, default 96M), and runs one `reconcile DIR` daemon on them with
`--resync 0` (passes back to back) and `--metrics 127.0.0.1:PORT`. Its first
pass starts them all; the script waits until every VM's record exists with a
live QEMU (the guests may still be booting), then follows
`reconciler_passes_total` on the metrics endpoint and samples the daemon's
/proc/PID/status (VmRSS, RssAnon, Threads) and /proc/PID/fd (count, and what
each points to) as soon as it reaches 10, 100, 250, 500 and --passes (default
1000) passes.

Goal: flat, from the 10th pass to the last: no more open fds, and less than
2 MiB more RSS (see bench/README.md for why those bounds). A leak of one fd or
one QMP connection per pass, or of a few KiB per pass, fails it.

All the VMs are killed by the pid in their record (after checking that its
command line is one of ours) at the end, on errors and Ctrl-C too.

Usage: python bench/daemon_resources.py [--passes N] [--vms N]
Exit status: 0 when the figures were measured (flat or not), 1 on errors.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    GUEST_DIR,
    BenchError,
    Daemon,
    fd_kind,
    fd_targets,
    file_tail,
    finish,
    free_port,
    kib,
    kill_qemus,
    median,
    our_qemus,
    proc_alive,
    proc_status,
    read_record,
    reconcile_cmd,
    recorded_pids,
    run_main,
    scrape,
    stage_guest,
    table,
    vm_manifest,
)

CHECKPOINTS = (10, 100, 250, 500)
FLAT_RSS_KIB = 2048  # "flat": RSS grows less than this from the first sample to the last
PASSES = "reconciler_passes_total"
READ_EVERY = 0.005  # /proc reads within a sample's window


class Bench:
    def __init__(self, root: Path, guest: Path, cmd: list[str],
                 args: argparse.Namespace) -> None:
        self.root, self.args = root, args
        self.manifests = root / "m"
        self.manifests.mkdir()
        self.names = [f"vm-{i + 1:02d}" for i in range(args.vms)]
        for name in self.names:
            (self.manifests / f"{name}.yaml").write_text(
                vm_manifest(name, guest, memory=args.memory))
        self.state = root / "s"
        self.address = f"127.0.0.1:{args.port or free_port()}"
        self.daemon = Daemon([*cmd, str(self.manifests), "--state-dir", str(self.state),
                              "--resync", "0", "--metrics", self.address],
                             root / "daemon.log")
        self.scrapes: list[float] = []  # how long each scrape took

    def metrics(self) -> dict[str, float]:
        self.daemon.check()
        began = time.monotonic()
        values = scrape(self.address)
        self.scrapes.append(time.monotonic() - began)
        return values

    def wait_all_alive(self) -> float:
        """Until every VM has a record with a live QEMU: seconds since the daemon started."""
        began = time.monotonic()
        deadline = began + self.args.timeout
        while True:
            self.daemon.check()
            pids = {}
            for name in self.names:
                record = read_record(self.state / "vms" / name / "record.json")
                if record is not None and proc_alive(int(record["pid"])):
                    pids[name] = int(record["pid"])
            if len(pids) == len(self.names):
                return time.monotonic() - began
            if time.monotonic() > deadline:
                missing = sorted(set(self.names) - set(pids))
                raise BenchError(f"{len(missing)} VM(s) not running after "
                                 f"{self.args.timeout:.0f}s: {', '.join(missing)}; daemon "
                                 "log:\n  " + (file_tail(self.daemon.log) or "(no output)"))
            time.sleep(0.02)

    def sample(self, target: int, values: dict[str, float], *, window: float
               ) -> dict[str, Any]:
        """/proc of the daemon, read every READ_EVERY for `window` seconds.

        A pass holds transient fds (a QMP socket per VM while it observes, a
        /proc/PID/stat being read): the sample keeps the read with the fewest fds,
        what stays open between passes, and the lowest RSS; the highest fd count
        seen is kept too.
        """
        pid = self.daemon.pid
        reads = []
        end = time.monotonic() + window
        while True:
            status = proc_status(pid)
            targets = fd_targets(pid)
            reads.append((len(targets), kib(status["VmRSS"]), status, targets))
            if time.monotonic() >= end:
                break
            time.sleep(READ_EVERY)
        fewest = min(reads, key=lambda r: r[0])
        status, targets = fewest[2], fewest[3]
        alive = sum(proc_alive(p) for p in recorded_pids(self.state))
        actions = sum(v for k, v in values.items()
                      if k.startswith("reconciler_actions_total"))
        return {
            "target": target, "passes": int(values[PASSES]), "t": time.monotonic(),
            "rss": min(r[1] for r in reads), "rss_max": max(r[1] for r in reads),
            "anon": kib(status["RssAnon"]), "hwm": kib(status["VmHWM"]),
            "threads": int(status["Threads"]), "reads": len(reads),
            "fds": fewest[0], "fds_max": max(r[0] for r in reads),
            "kinds": Counter(fd_kind(t) for t in targets),
            "metrics_rss": values.get("process_resident_memory_bytes", 0) / 1024,
            "metrics_fds": values.get("process_open_fds", 0),
            "actions": actions, "alive": alive,
            "pass_avg": (values.get("reconciler_pass_duration_seconds_sum", 0)
                         / max(1.0, values.get("reconciler_pass_duration_seconds_count", 0))),
        }

    def follow(self, targets: list[int]) -> list[dict[str, Any]]:
        """Sample as soon as passes_total reaches each target."""
        samples: list[dict[str, Any]] = []
        deadline = time.monotonic() + self.args.max_seconds
        last: tuple[float, int] | None = None
        rate = 5.0  # passes/s, until measured
        for target in targets:
            while True:
                values = self.metrics()
                passes, now = int(values[PASSES]), time.monotonic()
                if last is not None and now > last[0] and passes > last[1]:
                    rate = (passes - last[1]) / (now - last[0])
                if passes >= target:
                    # Long enough to span a few passes: the fewest fds is between passes.
                    window = min(3.0, max(0.2, 3 / rate))
                    samples.append(self.sample(target, values, window=window))
                    late = passes - target
                    print(f"  {target} passes: RSS {samples[-1]['rss']} KiB, "
                          f"{samples[-1]['fds']} fds"
                          + (f" (sampled at {passes}: {late} late)" if late else ""),
                          flush=True)
                    break
                last = (now, passes)
                if now > deadline:
                    raise BenchError(f"only {passes} passes after {self.args.max_seconds:.0f}s")
                # Scrape often near a target only: scrapes cost the daemon a little.
                time.sleep(min(1.0, max(0.01, (target - passes) / rate * 0.5)))
        return samples

    def cleanup(self) -> list[str]:
        notes = self.daemon.stop()
        killed = kill_qemus(recorded_pids(self.state), str(self.root))
        leftovers = kill_qemus(our_qemus(str(self.root)), str(self.root))
        if leftovers:
            notes.append(f"killed leftover QEMU pids {leftovers}")
        if killed:
            notes.append(f"killed {len(killed)} VM(s) of ours by pid")
        return notes


def kinds_diff(first: Counter[str], last: Counter[str]) -> list[str]:
    lines = []
    for kind in sorted(set(first) | set(last)):
        if first[kind] != last[kind]:
            lines.append(f"  {kind}: {first[kind]} -> {last[kind]} "
                         f"({last[kind] - first[kind]:+d})")
    return lines


def report(samples: list[dict[str, Any]], scrapes: list[float], args: argparse.Namespace
           ) -> None:
    first, last = samples[0], samples[-1]
    rows = []
    prev: dict[str, Any] | None = None
    for s in samples:
        rate = ("-" if prev is None else
                f"{(s['passes'] - prev['passes']) / (s['t'] - prev['t']):.1f}")
        rows.append([str(s["target"]), str(s["passes"]), f"{s['t'] - first['t']:.1f}",
                     str(s["rss"]), f"{s['rss'] - first['rss']:+d}", str(s["rss_max"]),
                     str(s["anon"]), str(s["fds"]), str(s["fds_max"]), str(s["threads"]),
                     f"{s['metrics_rss']:.0f}", f"{s['metrics_fds']:.0f}",
                     f"{s['pass_avg'] * 1000:.0f}", rate, str(s["alive"])])
        prev = s
    print()
    print(table(["target", "passes", "t s", "RSS KiB", "growth", "RSS max", "anon KiB", "fds",
                 "fds max", "threads", "m RSS", "m fds", "pass ms", "passes/s", "VMs"], rows))
    print(f"""
Each sample reads the daemon's /proc/PID/status and /proc/PID/fd every
{READ_EVERY * 1000:.0f} ms for a window spanning about 3 passes (0.2-3 s), right after the
scrape that showed `passes`. A pass holds transient fds (a QMP socket per VM while it
observes), so fds is the fewest seen (what stays open between passes), fds max the most;
RSS KiB the lowest VmRSS seen, RSS max the highest; growth: RSS - RSS at the first
sample; anon: RssAnon at the read with the fewest fds.
m RSS, m fds: process_resident_memory_bytes (KiB) and process_open_fds from that scrape
  (one instant). pass ms: mean pass duration so far (metrics).
passes/s: since the previous sample. VMs: declared VMs with a live QEMU.""")
    print(f"\nopen fds at {first['passes']} passes, by target:")
    for kind, count in sorted(first["kinds"].items()):
        print(f"  {count:4d}  {kind}")
    changed = kinds_diff(first["kinds"], last["kinds"])
    print(f"changes at {last['passes']} passes:" if changed else
          f"the same at {last['passes']} passes")
    for line in changed:
        print(line)
    if last["actions"] != first["actions"] or last["alive"] != args.vms:
        print(f"\nwarning: actions_total {first['actions']:.0f} -> {last['actions']:.0f}, "
              f"{last['alive']}/{args.vms} VMs alive: VMs were (re)started during the "
              "samples, which is not a pure steady state")
    span = last["passes"] - first["passes"]
    seconds = last["t"] - first["t"]
    grow_rss, grow_fds = last["rss"] - first["rss"], last["fds"] - first["fds"]
    mid = next((s for s in samples if s["target"] >= 250), first)
    if last["passes"] > mid["passes"]:
        slope = (last["rss"] - mid["rss"]) * 1024 / (last["passes"] - mid["passes"])
        print(f"\nRSS slope from {mid['passes']} to {last['passes']} passes: "
              f"{slope:+.0f} bytes/pass")
    if scrapes:
        print(f"metrics scrapes: {len(scrapes)}, median {median(scrapes) * 1000:.1f} ms, "
              f"max {max(scrapes) * 1000:.1f} ms")
    print(f"passes per second: {span / seconds:.1f} ({span} passes over {args.vms} VMs in "
          f"{seconds:.1f}s)")
    flat = grow_fds <= 0 and grow_rss < FLAT_RSS_KIB
    print(f"\nRSS {grow_rss:+d} KiB, fds {grow_fds:+d} from {first['target']} to "
          f"{last['target']} passes (goal: flat: fds +0, RSS < +{FLAT_RSS_KIB} KiB): "
          f"{'OK' if flat else 'GROWING'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=1000, metavar="N",
                        help="the last sample, in passes (default 1000; at least 20)")
    parser.add_argument("--vms", type=int, default=20, metavar="N",
                        help="VMs declared (default 20)")
    parser.add_argument("--memory", default="96M",
                        help="guest memory (default 96M; at least 96M for this guest)")
    parser.add_argument("--port", type=int, default=0,
                        help="the daemon's metrics port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds to wait until every VM runs (default 180)")
    parser.add_argument("--max-seconds", type=float, default=3600.0, metavar="S",
                        help="give up when the passes take longer than this (default 3600)")
    parser.add_argument("--guest", type=Path, default=GUEST_DIR, metavar="DIR",
                        help="test guest dir (vmlinuz, initrd.img) to copy and boot "
                             f"(default {GUEST_DIR})")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temp dir (daemon, serial and QEMU logs)")
    args = parser.parse_args()
    if args.passes < 20 or args.vms < 1:
        parser.error("--passes must be at least 20, --vms at least 1")
    # 10, 100, 250, 500, then 1000, 2000, 4000, ... below the last: a leak shows as a
    # steady climb, a warm-up as a step that stops.
    doubling = [1000 * 2**k for k in range(32) if 1000 * 2**k < args.passes]
    targets = sorted({t for t in (*CHECKPOINTS, *doubling) if t < args.passes}
                     | {args.passes})

    cmd = reconcile_cmd()
    # Short, under /tmp: the state dir must fit unix socket paths (107 bytes).
    root = Path(tempfile.mkdtemp(prefix="rbench-res-", dir="/tmp"))
    bench: Bench | None = None
    try:
        guest = stage_guest(root, args.guest)
        bench = Bench(root, guest, cmd, args)
        print(f"reconcile command: {' '.join(cmd)}")
        print(f"{args.vms} VMs of {args.memory}, daemon --resync 0, metrics {bench.address}, "
              f"samples at {', '.join(map(str, targets))} passes, temp dir {root}\n")
        bench.daemon.start()
        took = bench.wait_all_alive()
        print(f"  all {args.vms} VMs running {took:.1f}s after the daemon's start "
              f"(daemon pid {bench.daemon.pid})", flush=True)
        samples = bench.follow(targets)
        report(samples, bench.scrapes, args)
        return 0
    finally:
        if bench is not None:
            for note in bench.cleanup():
                print(f"cleanup: {note}", file=sys.stderr)
        finish(root, keep=args.keep)


if __name__ == "__main__":
    run_main(main, "daemon_resources")
