"""Many hosts on a real etcd: push, placement by capacity, failover with self-fencing,
restarts. Debian's etcd runs in a network namespace of its own; three members, each
in its own namespace joined to etcd's by a veth pair (so one can be cut off), each
with its own state dir, run the real daemon. VMs are the test guest under TCG.

One cluster serves the whole module and the tests run in file order, each leaving it
as the next expects. All along, a sampler looks at every QEMU of the module every
100 ms: no VM name may ever have two live QEMU processes (the promise of failover).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import MARKER, Run, serial, type_on_console, wait_for

pytestmark = pytest.mark.qemu

ETCD_IP = "10.201.0.1"
ETCD = f"http://{ETCD_IP}:2379"
TTL, GRACE = 6, 2
OFFERS = {"m1": 512, "m2": 1024, "m3": 1536}  # MiB each member offers


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


def total_mib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("MemTotal"))


@dataclass
class Member:
    name: str
    ns: str
    veth: str  # its end in etcd's namespace: down = cut off
    state: Path
    log: Path
    address: str
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class Cluster:
    tag: str
    root: Path
    etcd_ns: str
    etcd_data: Path
    members: dict[str, Member]
    etcd: subprocess.Popen[bytes] | None = None
    violations: list[str] = field(default_factory=list)
    migrating: set[str] = field(default_factory=set)  # two QEMUs by design, for a moment

    def run(self, ns: str, *args: str | Path, timeout: float = 120) -> Run:
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "reconciler",
                               *map(str, args)], capture_output=True, text=True,
                              timeout=timeout)
        return Run(proc.returncode, proc.stdout, proc.stderr)

    def push(self, directory: Path, *extra: str) -> Run:
        return self.run(self.etcd_ns, "push", directory, "--etcd", ETCD, "--state-dir",
                        self.root / "pusher", *extra)

    def status(self) -> dict[str, list[dict[str, object]]]:
        found = self.run(self.etcd_ns, "status", "--etcd", ETCD, "--json",
                         "--state-dir", self.root / "pusher")
        assert found.code == 0, str(found)
        result: dict[str, list[dict[str, object]]] = json.loads(found.out)
        return result

    def vms(self) -> dict[str, dict[str, object]]:
        return {str(v["name"]): v for v in self.status()["vms"]}

    def etcdctl(self, *args: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.etcd_ns, "etcdctl", "--endpoints",
                               ETCD, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout

    def start_etcd(self) -> None:
        with open(self.root / "etcd.log", "a") as log:
            self.etcd = subprocess.Popen(
                ["ip", "netns", "exec", self.etcd_ns, "etcd", "--name", "t", "--data-dir",
                 str(self.etcd_data), "--listen-client-urls", ETCD,
                 "--advertise-client-urls", ETCD, "--listen-peer-urls",
                 "http://127.0.0.1:2380", "--initial-advertise-peer-urls",
                 "http://127.0.0.1:2380", "--initial-cluster", "t=http://127.0.0.1:2380"],
                stdout=log, stderr=log, start_new_session=True)
        wait_for(lambda: subprocess.run(
            ["ip", "netns", "exec", self.etcd_ns, "etcdctl", "--endpoints", ETCD,
             "endpoint", "health"], capture_output=True).returncode == 0,
            timeout=30, what="etcd to answer")

    def stop_etcd(self) -> None:
        if self.etcd is not None:
            os.killpg(self.etcd.pid, signal.SIGTERM)  # ip netns exec execs etcd: one pid
            self.etcd.wait(timeout=30)

    def start(self, name: str) -> None:
        member = self.members[name]
        reserve = total_mib() - OFFERS[name]
        with open(member.log, "a") as log:
            member.proc = subprocess.Popen(
                ["ip", "netns", "exec", member.ns, sys.executable, "-m", "reconciler",
                 "--etcd", ETCD, "--host", name, "--state-dir", str(member.state),
                 "--reserve", f"{reserve}M", "--vcpus", "4", "--lease-ttl", str(TTL),
                 "--fence-grace", str(GRACE), "--resync", "5", "--address", member.address,
                 "--metrics", "127.0.0.1:9477",  # its own namespace's loopback
                 "--shared-dir", str(self.root / "shared")],
                stdout=log, stderr=log, start_new_session=True)

    def term(self, name: str) -> None:
        member = self.members[name]
        if member.proc is not None and member.proc.poll() is None:
            member.proc.terminate()
            member.proc.wait(timeout=60)

    def qemus(self) -> dict[int, tuple[str, str]]:
        """pid -> (VM name, member) of every live QEMU of this module's members."""
        found = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not argv or b"qemu-system" not in argv[0]:
                continue
            text = [a.decode(errors="replace") for a in argv]
            for member in self.members.values():
                if any(str(member.state) in a for a in text) and "-name" in text:
                    name = text[text.index("-name") + 1].split(",")[0].removeprefix("guest=")
                    found[int(entry.name)] = (name, member.name)
        return found

    def where(self) -> dict[str, list[str]]:
        """VM name -> the members running a QEMU of it."""
        found: dict[str, list[str]] = {}
        for name, member in self.qemus().values():
            found.setdefault(name, []).append(member)
        return found


def manifests(directory: Path, guest: Path, vms: dict[str, dict[str, str]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    docs = []
    for name, fields in vms.items():
        extra = "".join(f"{k}: {v}\n" for k, v in fields.items())
        docs.append(f"name: {name}\nmemory: 128M\n{extra}boot:\n  kernel: {guest}/vmlinuz\n"
                    f"  initrd: {guest}/initrd.img\n  cmdline: console=ttyS0 quiet\n"
                    f"ready: {{serial: \"{MARKER}\", timeout: 90s}}\nstop_timeout: 5s\n")
    (directory / "vms.yaml").write_text("---\n".join(docs))
    return directory


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, guest: Path) -> Iterator[Cluster]:
    if shutil.which("etcd") is None:  # a set-up error, not a skip
        pytest.fail("etcd missing: install Debian's etcd-server (./setup.sh does)")
    tag = uuid.uuid4().hex[:5]
    root = tmp_path_factory.mktemp("cluster")
    etcd_ns = f"rc{tag}e"
    sh("ip", "netns", "add", etcd_ns)
    made = [etcd_ns]
    # etcd's data on tmpfs: its fsyncs must not stall behind the guests' disk load
    data = Path(tempfile.mkdtemp(prefix=f"rc{tag}-etcd-", dir="/dev/shm"))
    found = Cluster(tag, root, etcd_ns, data, {})
    try:
        sh("ip", "-n", etcd_ns, "link", "set", "lo", "up")
        sh("ip", "-n", etcd_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", etcd_ns, "addr", "add", f"{ETCD_IP}/24", "dev", "br0")
        sh("ip", "-n", etcd_ns, "link", "set", "br0", "up")
        for i, name in enumerate(OFFERS, 1):
            ns = f"rc{tag}{name}"
            sh("ip", "netns", "add", ns)
            made.append(ns)
            inside, outside = f"e{tag}{i}", f"v{tag}{i}"
            sh("ip", "-n", ns, "link", "add", inside, "type", "veth", "peer", "name",
               outside, "netns", etcd_ns)
            sh("ip", "-n", ns, "addr", "add", f"10.201.0.{10 + i}/24", "dev", inside)
            sh("ip", "-n", ns, "link", "set", inside, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", etcd_ns, "link", "set", outside, "master", "br0", "up")
            found.members[name] = Member(name, ns, outside, root / f"state-{name}",
                                         root / f"{name}.log", f"10.201.0.{10 + i}")
        found.start_etcd()
        for name in found.members:
            found.start(name)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                for name, where in found.where().items():
                    if len(where) > 1 and name not in found.migrating:
                        found.violations.append(f"{time.strftime('%T')} vm '{name}' runs on "
                                                f"{', '.join(sorted(where))}")
                stop.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        yield found
        stop.set()
        sampler.join()
    finally:
        for name in list(found.members):
            with contextlib.suppress(Exception):
                found.term(name)
        for ns in made:  # members' watchdogs and QEMUs, etcd
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for pid in found.qemus():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in [found.etcd, *(m.proc for m in found.members.values())]:
            if proc is not None:
                proc.kill()
                proc.wait(timeout=30)
        time.sleep(0.5)
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


def logs(cluster: Cluster) -> str:
    parts = [f"--- {m.name}\n{m.log.read_text()[-3000:]}" for m in cluster.members.values()
             if m.log.exists()]
    parts += [f"--- {m.name} fence\n{(m.state / 'cluster' / 'fence.log').read_text()}"
              for m in cluster.members.values()
              if (m.state / "cluster" / "fence.log").exists()]
    return "\n".join(parts)


def wait_ready(cluster: Cluster, names: set[str], *, timeout: float,
               not_on: str | None = None) -> dict[str, dict[str, object]]:
    def ready() -> bool:
        vms = cluster.vms()
        return all(vms.get(n, {}).get("state") == "ready"
                   and vms.get(n, {}).get("host") != not_on for n in names)

    try:
        wait_for(ready, timeout=timeout, what=f"{sorted(names)} ready")
    except AssertionError:
        raise AssertionError(f"{cluster.vms()}\n{logs(cluster)}") from None
    return cluster.vms()


SIX = {"a1": {"failover": "true"}, "a2": {"failover": "true"}, "a3": {"failover": "true"},
       "b1": {}, "b2": {}, "b3": {}}


def test_a_broken_push_changes_nothing(cluster: Cluster, guest: Path, tmp_path: Path) -> None:
    broken = manifests(tmp_path / "broken", guest, {**SIX, "bad": {"memory": "1K"}})
    text = (broken / "vms.yaml").read_text().replace("memory: 128M\nmemory: 1K\n",
                                                     "memory: 1K\n")
    (broken / "vms.yaml").write_text(text)
    found = cluster.push(broken)
    assert found.code == 1, str(found)
    assert f"{broken / 'vms.yaml'}:" in found.err and "vm 'bad': memory" in found.err
    assert "nothing written" in found.err
    disk = manifests(tmp_path / "disk", guest, {"f1": {
        "failover": "true", "disks": f"[{{path: {tmp_path}/f1.qcow2, size: 64M}}]"}})
    found = cluster.push(disk, "--shared-dir", str(tmp_path / "shared"))
    assert found.code == 1 and "failover: true needs its disks on storage every host" \
        in found.err, str(found)
    assert cluster.etcdctl("get", "--prefix", "/reconciler/vms/", "--keys-only").strip() == ""


def test_push_places_six_vms_by_capacity_and_they_run(
        cluster: Cluster, guest: Path) -> None:
    directory = manifests(cluster.root / "desired", guest, SIX)
    check = cluster.push(directory, "--check")
    assert check.code == 2 and "6 to add" in check.out, str(check)
    assert cluster.etcdctl("get", "--prefix", "/reconciler/vms/", "--keys-only").strip() == ""
    first = cluster.push(directory)
    assert first.code == 0 and "6 added" in first.out, str(first)
    vms = wait_ready(cluster, set(SIX), timeout=120)
    hosts = {str(v["name"]): str(v["host"]) for v in vms.values()}
    counts = {m: list(hosts.values()).count(m) for m in OFFERS}
    assert counts["m3"] >= counts["m2"] >= counts["m1"], counts  # by capacity
    assert sum(counts.values()) == 6
    assert {n: sorted(w) for n, w in cluster.where().items()} == \
        {n: [h] for n, h in hosts.items()}  # each runs once, where it is placed
    revision = json.loads(cluster.etcdctl("get", "/reconciler/push", "-w", "json"))
    again = cluster.push(directory)
    assert again.code == 0 and "no changes" in again.out, str(again)
    assert json.loads(cluster.etcdctl("get", "/reconciler/push", "-w", "json"))["kvs"] == \
        revision["kvs"]
    hosts_table = {str(h["host"]): h for h in cluster.status()["hosts"]}
    assert {h: hosts_table[h]["lease"] for h in OFFERS} == {h: "alive" for h in OFFERS}
    assert sum(bool(h["scheduler"]) for h in hosts_table.values()) == 1
    scheduler = next(h for h, row in hosts_table.items() if row["scheduler"])
    scraped = subprocess.run(
        ["ip", "netns", "exec", cluster.members[scheduler].ns, sys.executable, "-c",
         "import urllib.request; print(urllib.request.urlopen("
         "'http://127.0.0.1:9477/metrics', timeout=10).read().decode())"],
        capture_output=True, text=True, timeout=30).stdout
    assert 'reconciler_hosts{state="alive"} 3.0' in scraped, scraped
    assert 'reconciler_placements_total{kind="placed"} 6.0' in scraped, scraped
    assert not cluster.violations, cluster.violations


def member_with_most(cluster: Cluster, names: set[str]) -> str:
    hosts = [str(v["host"]) for n, v in cluster.vms().items() if n in names]
    return max(sorted(set(hosts)), key=hosts.count)


def pids_of(cluster: Cluster) -> dict[str, int]:
    return {name: pid for pid, (name, _) in cluster.qemus().items()}


def test_a_killed_member_fails_over_its_armed_vms_and_the_rest_are_host_lost(
        cluster: Cluster) -> None:
    failover = {n for n, f in SIX.items() if f.get("failover")}
    victim = member_with_most(cluster, failover)
    before = cluster.vms()
    theirs = {n for n, v in before.items() if v["host"] == victim}
    member = cluster.members[victim]
    killed_at = time.monotonic()
    for pid in subprocess.run(["ip", "netns", "pids", member.ns], capture_output=True,
                              text=True).stdout.split():  # daemon, watchdog, QEMUs
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    assert member.proc is not None
    member.proc.wait(timeout=30)
    moving = theirs & failover
    vms = wait_ready(cluster, moving, timeout=TTL + GRACE + 90, not_on=victim)
    took = time.monotonic() - killed_at
    assert all(vms[n]["host"] not in (victim, None) for n in moving), vms
    assert took >= TTL, f"moved after {took:.1f}s, before the lease could end"
    staying = theirs - failover
    for name in staying:
        assert vms[name]["state"] == "host-lost", vms[name]
        assert "not restarted elsewhere" in str(vms[name]["detail"])
        assert name not in cluster.where()
    hosts = {str(h["host"]): h for h in cluster.status()["hosts"]}
    assert hosts[victim]["lease"] == "lost"
    # The member comes back: what stayed placed on it runs there again, nowhere else.
    cluster.start(victim)
    vms = wait_ready(cluster, set(SIX), timeout=120)
    assert {n: vms[n]["host"] for n in staying} == {n: victim for n in staying}
    assert all(len(w) == 1 for w in cluster.where().values()), cluster.where()
    assert not cluster.violations, cluster.violations


def test_a_cut_off_member_fences_its_failover_vms_before_its_lease_ends(
        cluster: Cluster) -> None:
    failover = {n for n, f in SIX.items() if f.get("failover")}
    victim = member_with_most(cluster, failover)
    member = cluster.members[victim]
    vms = cluster.vms()
    theirs = {n for n, v in vms.items() if v["host"] == victim}
    fenced, kept = theirs & failover, theirs - failover
    assert fenced, vms
    kept_pids = {n: p for n, p in pids_of(cluster).items() if n in kept}
    sh("ip", "-n", cluster.etcd_ns, "link", "set", member.veth, "down")
    cut_at = time.time()
    try:
        # A SIGKILLed QEMU may take a moment to be gone from /proc on a busy machine:
        # when it was killed is read from the logs, and must be before the lease ends.
        wait_for(lambda: not any(cluster.where().get(n) == [victim] for n in fenced),
                 timeout=TTL + 5, what="the cut-off member's failover VMs to be gone")
        killed_at = kill_times(member, fenced)
        assert set(killed_at) == fenced, member.log.read_text()[-2000:]
        late = {n: round(t - cut_at, 2) for n, t in killed_at.items() if t - cut_at >= TTL}
        assert not late, f"killed after the lease could have ended: {late}"
        moved = wait_ready(cluster, fenced, timeout=TTL + GRACE + 90, not_on=victim)
        assert all(moved[n]["host"] != victim for n in fenced), moved
        assert {n: p for n, p in pids_of(cluster).items() if n in kept} == kept_pids
        fence_log = (member.state / "cluster" / "fence.log").read_text()
        assert "fencing" in fence_log and "killed vm" in fence_log + member.log.read_text()
    finally:
        sh("ip", "-n", cluster.etcd_ns, "link", "set", member.veth, "up")
    wait_for(lambda: {str(h["host"]): h["lease"] for h in cluster.status()["hosts"]}
             .get(victim) == "alive", timeout=60, what=f"{victim} back in the cluster")
    vms = wait_ready(cluster, set(SIX), timeout=60)
    assert {n: p for n, p in pids_of(cluster).items() if n in kept} == kept_pids
    assert all(len(w) == 1 for w in cluster.where().values()), cluster.where()
    assert not cluster.violations, cluster.violations


def kill_times(member: Member, names: set[str]) -> dict[str, float]:
    """When the member's daemon or watchdog logged killing each of names (first time)."""
    found: dict[str, float] = {}
    fence_log = member.state / "cluster" / "fence.log"
    lines = member.log.read_text(errors="replace").splitlines() + (
        fence_log.read_text(errors="replace").splitlines() if fence_log.exists() else [])
    for line in sorted(lines):  # both start with the time, to the millisecond
        if "killed vm" not in line:
            continue
        stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) \
            + int(line[20:23]) / 1000
        for name in names:
            if f"vm '{name}'" in line:
                found.setdefault(name, stamp)
    return found


def test_restarting_etcd_restarts_no_vm(cluster: Cluster) -> None:
    before = pids_of(cluster)
    assert set(before) == set(SIX)
    cluster.stop_etcd()
    cluster.start_etcd()
    time.sleep(TTL + GRACE)  # past any lease the restart could have ended
    wait_ready(cluster, set(SIX), timeout=60)
    assert pids_of(cluster) == before
    assert {str(h["host"]): h["lease"] for h in cluster.status()["hosts"]} == \
        {h: "alive" for h in OFFERS}
    assert not cluster.violations, cluster.violations


def test_a_restarted_member_daemon_carries_on_with_its_lease_and_vms(
        cluster: Cluster) -> None:
    before = pids_of(cluster)
    name = "m2"
    cluster.term(name)
    cluster.start(name)
    wait_for(lambda: "carrying on with the previous daemon's lease"
             in cluster.members[name].log.read_text(), timeout=30, what="the lease resumed")
    time.sleep(TTL + GRACE)
    wait_ready(cluster, set(SIX), timeout=60)
    assert pids_of(cluster) == before
    assert not cluster.violations, cluster.violations


def uptime(cluster: Cluster, member: str, name: str) -> float:
    """The guest's /proc/uptime, typed on its console and read back from its log."""
    state = cluster.members[member].state
    token = f"up{uuid.uuid4().hex[:6]}"
    type_on_console(state, name, f"echo {token}-$(cut -d' ' -f1 /proc/uptime)\n")
    pattern = re.compile(rf"{token}-([0-9]+\.[0-9]+)")
    wait_for(lambda: bool(pattern.findall(serial(state, name))),
             timeout=20, what=f"{name}'s uptime on its console")
    return float(pattern.findall(serial(state, name))[-1])


def test_drain_live_migrates_running_vms_and_the_guest_carries_on(
        cluster: Cluster, guest: Path) -> None:
    source = "m2"
    vms = cluster.vms()
    theirs = sorted(n for n, v in vms.items() if v["host"] == source)
    assert theirs, vms
    name = theirs[0]
    before = uptime(cluster, source, name)
    cluster.migrating.update(theirs)
    try:
        drained = cluster.run(cluster.etcd_ns, "drain", source, "--etcd", ETCD, "--wait",
                              "120", "--state-dir", cluster.root / "pusher")
        assert drained.code == 0, f"{drained}\n{logs(cluster)}"
        moved = wait_ready(cluster, set(theirs), timeout=60, not_on=source)
    finally:
        cluster.migrating.difference_update(theirs)
    target = str(moved[name]["host"])
    assert moved[name]["migrated"], moved[name]  # live, with QEMU's figures
    state = cluster.members[target].state
    offset = int(json.loads((state / "vms" / name / "record.json").read_text())
                 ["serial_offset"])  # what that host's console logged before this QEMU
    log = (state / "vms" / name / "serial.log").read_bytes()[offset:].decode(errors="replace")
    assert MARKER not in log, f"the guest booted again on the target:\n{log}"
    after = uptime(cluster, target, name)
    assert after > before, (before, after)
    assert all(len(w) == 1 for w in cluster.where().values()), cluster.where()
    hosts = {str(h["host"]): h for h in cluster.status()["hosts"]}
    assert hosts[source]["draining"] and hosts[source]["memory_used"] == 0
    undo = cluster.run(cluster.etcd_ns, "drain", source, "--undo", "--etcd", ETCD,
                       "--state-dir", cluster.root / "pusher")
    assert undo.code == 0, str(undo)
    # A placement edit moves it back, live too.
    edited = {**SIX, name: {**SIX[name], "placement": f"{{host: {source}}}"}}
    cluster.migrating.add(name)
    try:
        pushed = cluster.push(manifests(cluster.root / "desired", guest, edited))
        assert pushed.code == 0 and " changed" in pushed.out, str(pushed)
        back = wait_ready(cluster, {name}, timeout=60, not_on=target)
    finally:
        cluster.migrating.discard(name)
    assert back[name]["host"] == source and back[name]["migrated"], back[name]
    assert uptime(cluster, source, name) > after
    assert all(len(w) == 1 for w in cluster.where().values()), cluster.where()
    assert not cluster.violations, cluster.violations


def test_a_vm_with_a_nic_moves_through_a_saved_state_on_shared_storage(
        cluster: Cluster, guest: Path) -> None:
    """A NIC rules out live migration (its host side is not made on a target yet); with
    a shared dir, the VM moves through a saved state there: the guest carries on."""
    directory = manifests(cluster.root / "desired", guest,
                          {**SIX, "n1": {"interfaces": "[{switch: lan}]"}})
    (directory / "switch.yaml").write_text("kind: Switch\nname: lan\nbridge: brlan\n")
    pushed = cluster.push(directory)
    assert pushed.code == 0 and "2 added" in pushed.out, str(pushed)
    source = str(wait_ready(cluster, {"n1"}, timeout=90)["n1"]["host"])
    before = uptime(cluster, source, "n1")
    # Its neighbours move live (two QEMUs for a moment); n1 itself is never twice.
    live = {n for n, v in cluster.vms().items() if v["host"] == source} - {"n1"}
    cluster.migrating.update(live)
    try:
        drained = cluster.run(cluster.etcd_ns, "drain", source, "--wait", "120", "--etcd",
                              ETCD, "--state-dir", cluster.root / "pusher")
        assert drained.code == 0, f"{drained}\n{logs(cluster)}"
        moved = wait_ready(cluster, {"n1"}, timeout=60, not_on=source)["n1"]
        wait_ready(cluster, live, timeout=60, not_on=source)
    finally:
        cluster.migrating.difference_update(live)
    assert moved["via"] == "saved", moved
    target = str(moved["host"])
    state = cluster.members[target].state
    offset = int(json.loads((state / "vms" / "n1" / "record.json").read_text())
                 ["serial_offset"])
    log = (state / "vms" / "n1" / "serial.log").read_bytes()[offset:].decode(errors="replace")
    assert MARKER not in log, f"the guest booted again on the target:\n{log}"
    assert uptime(cluster, target, "n1") > before
    assert not list((cluster.root / "shared").rglob("*.state")), "the saved state stayed"
    undo = cluster.run(cluster.etcd_ns, "drain", source, "--undo", "--etcd", ETCD,
                       "--state-dir", cluster.root / "pusher")
    assert undo.code == 0, str(undo)
    assert all(len(w) == 1 for w in cluster.where().values()), cluster.where()
    assert not cluster.violations, cluster.violations


def test_a_push_while_a_member_is_down_places_nothing_on_it(
        cluster: Cluster, guest: Path) -> None:
    down = "m3"
    cluster.term(down)  # VMs kept; the lease runs out (failover ones are fenced first)
    wait_for(lambda: {str(h["host"]): h["lease"] for h in cluster.status()["hosts"]}
             .get(down) == "lost", timeout=TTL + 10, what=f"{down}'s lease to end")
    more = {"c1": {}, "c2": {}}
    directory = manifests(cluster.root / "desired", guest, {**SIX, **more})
    pushed = cluster.push(directory)
    assert pushed.code == 0 and "2 added" in pushed.out, str(pushed)
    vms = wait_ready(cluster, set(more), timeout=90)
    assert {vms[n]["host"] for n in more} <= {"m1", "m2"}, vms
    assert not cluster.violations, cluster.violations
