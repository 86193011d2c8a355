"""A real Debian 12 guest (cloud-init, systemd, openssh, qemu-guest-agent from Debian's
own packages) declared with a seed, a local switch and probes, inside a network
namespace the test makes: a person or a CI job can log into it and use it.

One VM is booted for the whole module (a boot takes a minute or two under TCG) and
the checks share it, in order: they read like one user's session. A second boot
comes from changing its user-data, which must restart it with cloud-init run anew.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, Run, vm_manifest

pytestmark = [pytest.mark.qemu, pytest.mark.debian]

DEBIAN = REPO / "guest" / "out-debian"
SECRET = f"s3cret-{uuid.uuid4().hex}"
SUBNET = "100.64.50.0/24"


@dataclass
class World:
    ns: str
    root: Path
    manifests: Path
    state: Path
    key: Path
    runs: list[Run] = field(default_factory=list)

    def reconcile(self, *args: str | Path, timeout: float = 900) -> Run:
        env = dict(os.environ, RECONCILER_STATE_DIR=str(self.state))
        env.pop("RECONCILER_FAULT", None)
        proc = subprocess.run(["ip", "netns", "exec", self.ns, sys.executable, "-m",
                               "reconciler", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=timeout,
                              stdin=subprocess.DEVNULL, start_new_session=True)
        run = Run(proc.returncode, proc.stdout, proc.stderr)
        self.runs.append(run)
        return run

    def ssh(self, command: str) -> Run:
        return self.reconcile("ssh", "c1", "-i", self.key, "--", command, timeout=120)

    def record(self) -> dict[str, object]:
        return json.loads((self.state / "vms" / "c1" / "record.json").read_text())  # type: ignore[no-any-return]

    def pid(self) -> int:
        return int(self.record()["pid"])  # type: ignore[call-overload]

    def status(self) -> dict[str, dict[str, object]]:
        run = self.reconcile("status", "--json")
        return {row["name"]: row for row in json.loads(run.out)}

    def lease(self) -> str:
        leases = json.loads((self.state / "switches" / "lan" / "addresses.json").read_text())
        return str(leases[str(self.record()["macs"][0])])  # type: ignore[index]

    def in_ns(self, *argv: str) -> str:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], capture_output=True,
                              text=True, check=True, timeout=60).stdout


def cloud_vm(user_data: str) -> str:
    return f"""\
kind: Switch
name: lan
mode: local
subnet: {SUBNET}
nat: true
---
name: c1
memory: 1G
agent: true
stop_timeout: 60s
boot:
  kernel: {DEBIAN / 'vmlinuz'}
  initrd: {DEBIAN / 'initrd.img'}
  cmdline: root=/dev/vda console=ttyS0
disks:
  - path: disks/c1.qcow2
    base: {DEBIAN / 'debian.raw'}
    base_format: raw
interfaces: [{{switch: lan}}]
cloud_init:
  user: ops
  ssh_authorized_keys_file: ops.pub
  user_data_file: {user_data}
ready: {{tcp: 22, agent: true, timeout: 600s}}
"""


USER_DATA = """\
#cloud-config
write_files:
  - path: /etc/reconciler-secret
    permissions: "0600"
    content: {secret}
runcmd:
  - [touch, /var/tmp/{marker}]
"""


@pytest.fixture(scope="module")
def debian() -> Path:
    for name in ("vmlinuz", "initrd.img", "debian.raw"):
        if not (DEBIAN / name).is_file():
            pytest.fail(f"Debian guest missing: {DEBIAN / name}; run guest/build-debian.sh "
                        "(./setup.sh does)")
    return DEBIAN


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, debian: Path) -> Iterator[World]:
    root = tmp_path_factory.mktemp("cloud")
    ns = f"rcg-{uuid.uuid4().hex[:8]}"
    manifests = root / "vms"
    (manifests / "disks").mkdir(parents=True)
    key = root / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (manifests / "ops.pub").write_text(key.with_suffix(".pub").read_text())
    (manifests / "c1.cloud-config").write_text(USER_DATA.format(secret=SECRET, marker="ran-1"))
    (manifests / "c1.yaml").write_text(cloud_vm("c1.cloud-config"))
    subprocess.run(["ip", "netns", "add", ns], check=True)
    world = World(ns, root, manifests, root / "state", key)
    try:
        world.in_ns("ip", "link", "set", "lo", "up")
        yield world
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            world.reconcile("down", timeout=120)
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                              text=True).stdout
        for pid in pids.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_the_first_pass_is_ready_only_once_sshd_and_the_agent_answer(world: World) -> None:
    run = world.reconcile("--once", "--wait", "-v", world.manifests)
    assert run.code == 0, run
    assert re.search(r"c1 +changed .*started .*ready after [0-9.]+s", run.out), run
    # ready means sshd answers: a connection succeeds at once, with no retry
    address = world.lease()
    world.in_ns(sys.executable, "-c",
                f"import socket; socket.create_connection(('{address}', 22), 5)")
    assert world.status()["c1"]["state"] == "ready"


def test_the_declared_user_logs_in_by_key_and_the_host_key_is_the_pinned_one(
    world: World,
) -> None:
    run = world.ssh("cloud-init status --wait >/dev/null; hostname; id -un; "
                    "test -e /var/tmp/ran-1 && echo runcmd-ran; "
                    "sudo -n true && echo sudo-ok; ip -4 -o addr show scope global")
    assert run.code == 0, run
    lines = run.out.splitlines()
    assert lines[:4] == ["c1", "ops", "runcmd-ran", "sudo-ok"], run
    assert "unable to resolve" not in run.err, run
    # StrictHostKeyChecking=yes with only the pinned key known: a match, not TOFU
    pinned = (world.state / "vms" / "c1" / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    known = (world.state / "vms" / "c1" / "known_hosts").read_text().split()
    assert known == [world.lease(), *pinned]
    served = world.in_ns("ssh-keyscan", "-t", "ed25519", world.lease()).split()
    assert served[1:3] == pinned


def test_status_shows_the_static_lease_which_is_the_address_the_guest_has(
    world: World,
) -> None:
    row = world.status()["c1"]
    lease = world.lease()
    assert lease.startswith("100.64.50.") and lease not in ("100.64.50.0", "100.64.50.1")
    sources = {(a["ipv4"], a["source"]) for a in row["addresses"]}  # type: ignore[union-attr]
    assert (lease, "lease") in sources and (lease, "agent") in sources, row
    inside = world.ssh("ip -4 -o addr show scope global").out
    assert f" {lease}/24 " in inside


def test_nat_is_a_table_of_its_own_masquerading_the_subnet(world: World) -> None:
    table = world.in_ns("nft", "list", "table", "ip", "reconciler-lan")
    assert re.search(rf"ip saddr {re.escape(SUBNET)} .*masquerade", table), table


def test_bad_input_is_reported_with_file_and_line_and_touches_nothing(world: World) -> None:
    pid, user_data = world.pid(), world.manifests / "c1.cloud-config"
    good = user_data.read_text()
    try:
        user_data.write_text("#cloud-config\nruncmd:\n  - [touch, /x\n")
        run = world.reconcile("--once", world.manifests)
        assert run.code == 1 and f"c1.yaml:20: vm 'c1': cloud_init: user_data_file " \
            f"{user_data}:4: YAML syntax error" in run.err + run.out, run
        user_data.unlink()
        run = world.reconcile("--once", world.manifests)
        assert run.code == 1 and "c1.yaml:23: vm 'c1': cloud_init.user_data_file: file " \
            "not found" in run.err + run.out, run
    finally:
        user_data.write_text(good)
    other = world.manifests / "other.yaml"
    other.write_text("kind: Switch\nname: other\nmode: local\nsubnet: 100.64.50.128/25\n")
    try:
        run = world.reconcile("--once", world.manifests)
        assert run.code == 1 and f"{other}:4: switch 'other': subnet 100.64.50.128/25 " \
            "overlaps switch 'lan'" in run.err + run.out, run
    finally:
        other.unlink()
    assert world.pid() == pid and world.status()["c1"]["state"] == "ready"


def test_a_port_that_never_opens_ends_unready_naming_the_probe(world: World) -> None:
    from conftest import GUEST

    extra = world.manifests / "b1.yaml"
    extra.write_text(vm_manifest("b1", GUEST) + "interfaces: [{switch: lan}]\n"
                     "ready: {tcp: 2222, timeout: 8s}\n")
    try:
        run = world.reconcile("--once", "--wait", world.manifests)
        assert run.code == 1, run
        assert re.search(r"b1 +failed .*not ready within 8s: tcp 100\.64\.50\.[0-9]+:2222: ",
                         run.out), run
    finally:
        extra.unlink()
    assert "b1  changed" in world.reconcile("--once", world.manifests).out.replace("   ", "  ")


def test_dnsmasq_killed_by_hand_is_restarted_and_the_lease_holds(world: World) -> None:
    dnsmasq = json.loads((world.state / "switches" / "lan" / "dnsmasq.json").read_text())
    lease = world.lease()
    os.kill(int(dnsmasq["pid"]), signal.SIGKILL)
    run = world.reconcile("--once", "-v", world.manifests)
    assert run.code == 0 and "died" in run.err, run
    again = json.loads((world.state / "switches" / "lan" / "dnsmasq.json").read_text())
    assert again["pid"] != dnsmasq["pid"] and Path(f"/proc/{again['pid']}").exists()
    assert world.lease() == lease
    assert world.ssh("true").code == 0


def test_changed_user_data_restarts_it_through_the_agent_and_cloud_init_runs_again(
    world: World,
) -> None:
    before = world.ssh("cat /var/lib/cloud/data/instance-id").out.strip()
    pid = world.pid()
    (world.manifests / "c1.cloud-config").write_text(
        USER_DATA.format(secret=SECRET, marker="ran-2"))
    check = world.reconcile("--once", "--check", "--json", world.manifests)
    assert check.code == 2 and "cloud_init.digest" in check.out, check
    run = world.reconcile("--once", "--wait", "-v", world.manifests)
    assert run.code == 0, run
    assert "guest powered off (guest agent)" in run.out, run
    assert world.pid() != pid
    after = world.ssh("cloud-init status --wait >/dev/null; cat /var/lib/cloud/data/"
                      "instance-id; test -e /var/tmp/ran-2 && echo ran-again").out.split()
    assert after[1:] == ["ran-again"] and after[0] != before, after


def test_stopped_is_carried_out_by_the_guest_agent(world: World) -> None:
    path = world.manifests / "c1.yaml"
    path.write_text(path.read_text() + "state: stopped\n")
    offset = (world.state / "vms" / "c1" / "serial.log").stat().st_size
    run = world.reconcile("--once", world.manifests)
    assert run.code == 0 and "terminated: guest powered off (guest agent)" in run.out, run
    console = (world.state / "vms" / "c1" / "serial.log").read_bytes()[offset:].decode(
        errors="replace")
    assert "reboot: Power down" in console, console[-2000:]


def test_the_secret_is_in_the_seed_and_nowhere_else(world: World) -> None:
    assert SECRET.encode() in (world.state / "vms" / "c1" / "seed.iso").read_bytes()
    for run in world.runs:
        assert SECRET not in run.out and SECRET not in run.err
    for path in world.state.rglob("*"):
        if path.is_file() and path.name != "seed.iso":
            assert SECRET.encode() not in path.read_bytes(), path
