#!/usr/bin/env python3
"""Many hosts on etcd: push -> spawn, failover, live migration, and the scheduler.

Debian's etcd runs in a network namespace of its own (data on tmpfs); three members
(`reconcile --etcd ... --host mN --address ...`), each in a namespace joined to etcd's
by a veth pair and with a state dir of its own, run the real daemon; the VMs are the
test guest under TCG. Measured, each with a baseline from the same run:

  push -> spawn   `reconcile push` of one more VM -> its QEMU spawned on the chosen
                  host (the record's started_at); baseline: `reconcile --once` of one
                  VM on one host, launch -> spawn, without etcd.
  failover        a member and its VMs SIGKILLed -> its failover VM spawned on another
                  member, and ready there; baseline: --lease-ttl + --fence-grace, the
                  wait the promise requires.
  migration       `reconcile drain` of the host of a running VM: QEMU's own downtime
                  and total time (query-migrate), and drain -> placed on the target;
                  baseline: QEMU's default downtime limit (300 ms).
  scheduler       1,000 VMs on 50 simulated hosts (host keys under a lease, no QEMU):
                  one scheduling round through etcd (read, place, one transaction per
                  VM); baseline: the placement decision alone (pure, in memory).

Usage: python bench/cluster.py [--runs N] [--failovers N] [--migrations N]   (root)
Exit status: 0 when the figures were measured, 1 on errors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    GUEST_DIR,
    BenchError,
    median,
    ms,
    reconcile_cmd,
    run_main,
    stage_guest,
    table,
)

ETCD_IP = "10.202.0.1"
ETCD = f"http://{ETCD_IP}:2379"
TTL, GRACE = 4, 1
PY = [sys.executable, "-m", "reconciler"]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def vm_doc(name: str, guest: Path, **fields: str) -> str:
    extra = "".join(f"{k}: {v}\n" for k, v in fields.items())
    return (f"name: {name}\nmemory: 96M\n{extra}boot:\n  kernel: {guest}/vmlinuz\n"
            f"  initrd: {guest}/initrd.img\n  cmdline: console=ttyS0 quiet\n"
            "ready: {serial: \"reconciler-guest: up\", timeout: 90s}\nstop_timeout: 3s\n")


class Cluster:
    def __init__(self, root: Path, guest: Path, members: int) -> None:
        self.root, self.guest = root, guest
        self.tag = uuid.uuid4().hex[:5]
        self.etcd_ns = f"rb{self.tag}e"
        self.made: list[str] = []
        self.data = Path(tempfile.mkdtemp(prefix="rbench-etcd-", dir="/dev/shm"))
        self.names = [f"m{i}" for i in range(1, members + 1)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.etcd: subprocess.Popen[bytes] | None = None
        self.manifests = root / "desired"
        self.manifests.mkdir()
        self.docs: dict[str, str] = {}

    def ns(self, name: str) -> str:
        return f"rb{self.tag}{name}"

    def state(self, name: str) -> Path:
        return self.root / f"state-{name}"

    def up(self) -> None:
        sh("ip", "netns", "add", self.etcd_ns)
        self.made.append(self.etcd_ns)
        for args in (("link", "set", "lo", "up"), ("link", "add", "br0", "type", "bridge"),
                     ("addr", "add", f"{ETCD_IP}/24", "dev", "br0"),
                     ("link", "set", "br0", "up")):
            sh("ip", "-n", self.etcd_ns, *args)
        for i, name in enumerate(self.names, 1):
            ns = self.ns(name)
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "-n", ns, "link", "add", f"e{self.tag}{i}", "type", "veth", "peer",
               "name", f"v{self.tag}{i}", "netns", self.etcd_ns)
            sh("ip", "-n", ns, "addr", "add", f"10.202.0.{10 + i}/24", "dev", f"e{self.tag}{i}")
            sh("ip", "-n", ns, "link", "set", f"e{self.tag}{i}", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", self.etcd_ns, "link", "set", f"v{self.tag}{i}", "master", "br0", "up")
        with open(self.root / "etcd.log", "ab") as log:
            self.etcd = subprocess.Popen(
                ["ip", "netns", "exec", self.etcd_ns, "etcd", "--name", "b", "--data-dir",
                 str(self.data), "--listen-client-urls", ETCD, "--advertise-client-urls", ETCD,
                 "--listen-peer-urls", "http://127.0.0.1:2380",
                 "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                 "--initial-cluster", "b=http://127.0.0.1:2380"],
                stdout=log, stderr=log, start_new_session=True)
        self.wait(lambda: subprocess.run(
            ["ip", "netns", "exec", self.etcd_ns, "etcdctl", "--endpoints", ETCD, "endpoint",
             "health"], capture_output=True).returncode == 0, 30, "etcd")
        for name in self.names:
            self.start(name)

    def start(self, name: str) -> None:
        i = self.names.index(name) + 1
        with open(self.root / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                ["ip", "netns", "exec", self.ns(name), *PY, "--etcd", ETCD, "--host", name,
                 "--state-dir", str(self.state(name)), "--vcpus", "64", "--lease-ttl",
                 str(TTL), "--fence-grace", str(GRACE), "--address", f"10.202.0.{10 + i}"],
                stdout=log, stderr=log, start_new_session=True)

    def kill(self, name: str) -> None:
        """The member and everything of its namespace (daemon, watchdog, QEMUs)."""
        pids = subprocess.run(["ip", "netns", "pids", self.ns(name)], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        self.procs[name].wait(timeout=30)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.etcd_ns, *PY, *args, "--etcd", ETCD,
                               "--state-dir", str(self.root / "pusher")],
                              capture_output=True, text=True, timeout=300)

    def push(self) -> None:
        (self.manifests / "vms.yaml").write_text("---\n".join(self.docs.values()))
        out = self.run("push", str(self.manifests))
        if out.returncode != 0:
            raise BenchError(f"push failed:\n{out.stdout}{out.stderr}")

    def vms(self) -> dict[str, dict[str, Any]]:
        out = self.run("status", "--json")
        if out.returncode != 0:
            raise BenchError(f"status failed:\n{out.stdout}{out.stderr}")
        return {v["name"]: v for v in json.loads(out.stdout)["vms"]}

    def record(self, vm: str) -> tuple[str, dict[str, Any]] | None:
        """(member, record) of vm's live record, if any member has one with a pid."""
        for name in self.names:
            path = self.state(name) / "vms" / vm / "record.json"
            with contextlib.suppress(OSError, ValueError):
                found = json.loads(path.read_text())
                pid = found.get("pid", 0)
                # A killed member leaves records naming dead processes (or zombies).
                if pid > 0 and found.get("exit") is None \
                        and Path(f"/proc/{pid}/cmdline").read_bytes():
                    return name, found
        return None

    @staticmethod
    def wait(predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")

    def down(self) -> None:
        for name, proc in self.procs.items():
            with contextlib.suppress(Exception):
                self.kill(name)
            proc.wait(timeout=30)
        for ns in self.made:
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                      text=True).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        if self.etcd is not None:
            self.etcd.wait(timeout=30)
        time.sleep(0.5)
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.data, ignore_errors=True)


def baseline_spawn(root: Path, guest: Path, runs: int) -> list[float]:
    """`reconcile --once` of one VM on one host: launch -> spawn, no etcd."""
    found = []
    for i in range(runs):
        directory = root / f"single{i}"
        directory.mkdir()
        (directory / "vm.yaml").write_text(vm_doc(f"s{i}", guest))
        state = root / f"single-state{i}"
        t0 = time.time()
        out = subprocess.run([*reconcile_cmd(), "--once", str(directory), "--state-dir",
                              str(state)], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise BenchError(f"--once failed:\n{out.stdout}{out.stderr}")
        record = json.loads((state / "vms" / f"s{i}" / "record.json").read_text())
        found.append(record["started_at"] - t0)
        subprocess.run([*reconcile_cmd(), "down", "--state-dir", str(state)],
                       capture_output=True, timeout=120)
    return found


def scheduler_round(vms: int, hosts: int) -> dict[str, float]:
    """Run inside etcd's namespace: fake hosts and VMs, one scheduling round."""
    from reconciler import cluster
    from reconciler.placement import Host, place

    store = cluster.Store([ETCD], f"/bench-{uuid.uuid4().hex[:6]}", timeout=30)
    lease = store.grant(300)
    for i in range(hosts):
        store.txn([], [cluster.put(store.key("hosts", f"h{i:02d}"), {
            "memory": 65536, "vcpus": 256, "labels": {"zone": "ab"[i % 2]}}, lease=lease)])
    for start in range(0, vms, 100):
        store.txn([], [cluster.put(store.key("vms", f"v{i:04d}"), {
            "spec": {"name": f"v{i:04d}", "memory": 256 + 64 * (i % 8), "vcpus": 1 + i % 2,
                     "placement": {"spread": f"g{i % 20}"}}, "source": "bench:1",
            "shared": True}) for i in range(start, min(start + 100, vms))])
    scheduler = cluster.Scheduler(store, "bench", fence_grace=1.0)
    t0 = time.perf_counter()
    view = cluster.View.read(store)
    read = time.perf_counter() - t0
    wants = [cluster.want_of(n, e.value["spec"]) for n, e in view.vms.items()]
    hosts_ = [Host(n, 65536, 256) for n in view.hosts]
    t1 = time.perf_counter()
    decision = place(wants, hosts_, {})
    pure = time.perf_counter() - t1
    view.scheduler = cluster.Entry({"host": "bench"}, 0)
    t2 = time.perf_counter()
    scheduler.schedule(view)
    total = time.perf_counter() - t2
    placed = len(cluster.View.read(store).placement)
    store.revoke(lease)
    return {"read": read, "pure": pure, "round": total, "placed": placed,
            "decided": len(decision.placed)}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--scheduler-round":
        print(json.dumps(scheduler_round(int(sys.argv[2]), int(sys.argv[3]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="pushes timed (default 10)")
    parser.add_argument("--failovers", type=int, default=3)
    parser.add_argument("--migrations", type=int, default=5)
    parser.add_argument("--vms", type=int, default=1000, help="scheduler: VMs (1000)")
    parser.add_argument("--hosts", type=int, default=50, help="scheduler: hosts (50)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("run as root: network namespaces")
    if shutil.which("etcd") is None:
        raise BenchError("etcd missing: apt-get install etcd-server etcd-client")
    root = Path(tempfile.mkdtemp(prefix="rbench-cluster-", dir="/tmp"))
    guest = stage_guest(root, GUEST_DIR)
    world = Cluster(root, guest, 3)
    rows: list[list[str]] = []
    try:
        world.up()
        print(f"etcd {ETCD} in netns {world.etcd_ns}; members {', '.join(world.names)}; "
              f"lease ttl {TTL}s, fence grace {GRACE}s")
        base = baseline_spawn(root, guest, args.runs)
        spawn = []
        for i in range(args.runs):
            name = f"p{i}"
            world.docs[name] = vm_doc(name, guest)
            t0 = time.time()
            world.push()
            world.wait(lambda n=name: world.record(n) is not None, 120, f"{name} spawned")
            found = world.record(name)
            assert found is not None
            spawn.append(found[1]["started_at"] - t0)
        rows.append(["push -> QEMU spawned on its host", ms(median(spawn)),
                     f"--once launch -> spawn {ms(median(base))}",
                     f"{median(spawn) / median(base):.1f}x"])
        world.docs = {}
        world.push()  # the push VMs go: a lighter machine for what follows
        world.docs["f"] = vm_doc("f", guest, failover="true")
        world.push()
        world.wait(lambda: world.vms().get("f", {}).get("state") == "ready", 120, "f ready")
        elsewhere, ready = [], []
        for _ in range(args.failovers):
            host = world.vms()["f"]["host"]
            t0 = time.time()
            world.kill(host)
            world.wait(lambda h=host: (world.record("f") or ("", {}))[0] not in ("", h), 120,
                       "f spawned elsewhere")
            elsewhere.append(world.record("f")[1]["started_at"] - t0)  # type: ignore[index]
            world.wait(lambda h=host: world.vms()["f"]["state"] == "ready"
                       and world.vms()["f"]["host"] != h, 120, "f ready elsewhere")
            ready.append(time.time() - t0)
            world.start(host)
            world.wait(lambda h=host: {x["host"]: x["lease"] for x in json.loads(world.run(
                "status", "--json").stdout)["hosts"]}.get(h) == "alive", 60, f"{host} back")
        rows.append(["member killed -> failover VM spawned elsewhere", ms(median(elsewhere)),
                     f"ttl + grace {(TTL + GRACE) * 1000:.0f}",
                     f"{median(elsewhere) / (TTL + GRACE):.2f}x"])
        rows.append(["member killed -> failover VM ready elsewhere", ms(median(ready)),
                     f"ttl + grace {(TTL + GRACE) * 1000:.0f}",
                     f"{median(ready) / (TTL + GRACE):.2f}x"])
        downtime, total, drain = [], [], []
        for _ in range(args.migrations):
            source = world.vms()["f"]["host"]
            t0 = time.monotonic()
            out = world.run("drain", source, "--wait", "120")
            if out.returncode != 0:
                raise BenchError(f"drain failed:\n{out.stdout}{out.stderr}")
            drain.append(time.monotonic() - t0)
            row = world.vms()["f"]
            if not row.get("migrated"):
                raise BenchError(f"f moved but not live: {row}")
            downtime.append(row["migrated"]["downtime_ms"] / 1000)
            total.append(row["migrated"]["total_ms"] / 1000)
            world.run("drain", source, "--undo")
            world.wait(lambda: world.vms()["f"]["state"] == "ready", 60, "f ready")
        rows.append(["live migration: downtime (QEMU)", ms(median(downtime)),
                     "QEMU's downtime limit 300", f"{median(downtime) / 0.3:.2f}x"])
        rows.append(["live migration: total (QEMU)", ms(median(total)), "", ""])
        rows.append(["drain --wait (one VM, live)", ms(median(drain)), "", ""])
        sched = subprocess.run(["ip", "netns", "exec", world.etcd_ns, sys.executable,
                                __file__, "--scheduler-round", str(args.vms), str(args.hosts)],
                               capture_output=True, text=True, timeout=600)
        if sched.returncode != 0:
            raise BenchError(f"scheduler round failed:\n{sched.stdout}{sched.stderr}")
        figures = json.loads(sched.stdout.strip().splitlines()[-1])
        if figures["placed"] != args.vms:
            raise BenchError(f"placed {figures['placed']} of {args.vms}")
        rows.append([f"scheduler: {args.vms} VMs on {args.hosts} hosts, one round",
                     ms(figures["round"]), f"place() alone {ms(figures['pure'])}",
                     f"{figures['round'] / figures['pure']:.0f}x"])
        rows.append(["scheduler: reading the cluster (View.read)", ms(figures["read"]), "", ""])
        print()
        print(table(["figure (median)", "ms", "baseline (same run) ms", "ratio"], rows))
        print(f"\n{args.runs} pushes, {args.failovers} failovers, {args.migrations} "
              "migrations; test guest (96 MiB) under TCG")
        return 0
    finally:
        world.down()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    run_main(main, "cluster")
