#!/usr/bin/env python3
"""Usable machines: what cloud-init seeds, local switches and `status` cost.

Each figure is paired with a baseline measured in the same run:

  ssh       Debian guest, declared -> `ssh true` succeeds: `reconcile --once` on a
            manifest (seed, local switch, dnsmasq, agent) versus the same guest started
            directly (same kernel, disk overlay, seed cdrom, agent channel, NIC) with a
            seed made by genisoimage, on a bridge, tap and dnsmasq set up by hand; both
            inside a network namespace of their own.
  seed      reconciler.seed (render + pycdlib ISO + atomic write) versus genisoimage
            writing the same three files.
  dnsmasq   LocalSwitch.ensure on a fresh switch (spawn -> DHCP socket open, NAT table)
            versus spawning the same dnsmasq argv directly until its socket is open.
  status    `reconcile status` with 20 busybox VMs on a local switch versus
            `python -c pass`. The VMs are declared `paused` (QEMU -S): 20 booted TCG
            guests on 2 cores would measure CPU contention, not status.

Usage: python bench/cloud.py [--runs N] [--only ssh,seed,dnsmasq,status]
Needs root (namespaces), genisoimage, dnsmasq, nft, the Debian guest in
guest/out-debian/ (guest/build-debian.sh) and the busybox guest in guest/out/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import GUEST_DIR, REPO, BenchError, reconcile_cmd, vm_manifest

DEBIAN = REPO / "guest" / "out-debian"
SUBNET = "100.64.60.0/24"


@contextlib.contextmanager
def netns() -> Iterator[str]:
    name = f"rb-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
    try:
        yield name
    finally:
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.2)
        subprocess.run(["ip", "netns", "del", name], check=False)


def ns(name: str, *argv: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", name, *argv], capture_output=True,
                          text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(name: str, ours: list[float], base: list[float], unit: str = "ms") -> None:
    scale = 1000.0 if unit == "ms" else 1.0
    o, b = median(ours) * scale, median(base) * scale
    print(f"{name:8s} reconciler {o:9.1f} {unit}   baseline {b:9.1f} {unit}   "
          f"overhead {o - b:+9.1f} {unit}   ratio {o / b:5.2f}   (median of "
          f"{len(ours)}/{len(base)})", flush=True)


def wait_ssh(ns_name: str, address: str, key: Path, known: Path, user: str,
             deadline: float) -> float:
    """Until `ssh true` succeeds (host key checked against `known`)."""
    while time.monotonic() < deadline:
        probe = ns(ns_name, sys.executable, "-c",
                   f"import socket; socket.create_connection(('{address}', 22), 1)")
        if probe.returncode == 0:
            done = ns(ns_name, "ssh", "-i", str(key), "-o", "BatchMode=yes",
                      "-o", f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                      "-o", "ConnectTimeout=5", f"{user}@{address}", "true", timeout=30,
                      stdin=subprocess.DEVNULL)
            if done.returncode == 0:
                return time.monotonic()
        time.sleep(0.2)
    raise BenchError(f"ssh to {address} did not succeed in time")


# --- ssh: declared -> ssh answers ------------------------------------------------

MANIFEST = """\
kind: Switch
name: lan
mode: local
subnet: {subnet}
nat: false
---
name: c1
memory: 1G
agent: true
boot:
  kernel: {debian}/vmlinuz
  initrd: {debian}/initrd.img
  cmdline: root=/dev/vda console=ttyS0
disks: [{{path: disks/c1.qcow2, base: {debian}/debian.raw, base_format: raw}}]
interfaces: [{{switch: lan}}]
cloud_init: {{user: ops, ssh_authorized_keys_file: ops.pub}}
"""


def ssh_reconcile(tmp: Path, key: Path) -> float:
    manifests = tmp / "vms"
    (manifests / "disks").mkdir(parents=True)
    (manifests / "ops.pub").write_text(key.with_suffix(".pub").read_text())
    (manifests / "c1.yaml").write_text(MANIFEST.format(subnet=SUBNET, debian=DEBIAN))
    state = tmp / "state"
    env = dict(os.environ, RECONCILER_STATE_DIR=str(state))
    with netns() as name:
        began = time.monotonic()
        run = subprocess.run(["ip", "netns", "exec", name, *reconcile_cmd(), "--once",
                              str(manifests)], capture_output=True, text=True, env=env)
        if run.returncode != 0:
            raise BenchError(f"reconcile failed: {run.stdout}{run.stderr}")
        record = json.loads((state / "vms" / "c1" / "record.json").read_text())
        leases = json.loads((state / "switches" / "lan" / "addresses.json").read_text())
        address = leases[record["macs"][0]]
        public = (state / "vms" / "c1" / "ssh_host_ed25519_key.pub").read_text().split()
        known = tmp / "known_hosts"
        known.write_text(f"{address} {public[0]} {public[1]}\n")
        done = wait_ssh(name, address, key, known, "ops", began + 600)
        return done - began


def ssh_direct(tmp: Path, key: Path) -> float:
    """The same guest, by hand: bridge, tap, dnsmasq, genisoimage seed, QEMU."""
    host = tmp / "hostkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host)],
                   check=True)
    mac, address = "52:54:00:60:00:10", "100.64.60.10"
    seed_dir = tmp / "seed"
    seed_dir.mkdir()
    user_data = {
        "hostname": "c1", "users": ["default", {
            "name": "ops", "sudo": "ALL=(ALL) NOPASSWD:ALL", "shell": "/bin/bash",
            "ssh_authorized_keys": [key.with_suffix(".pub").read_text().strip()]}],
        "ssh_keys": {"ed25519_private": host.read_text(),
                     "ed25519_public": host.with_suffix(".pub").read_text().strip()}}
    (seed_dir / "user-data").write_text("#cloud-config\n" + json.dumps(user_data))
    (seed_dir / "meta-data").write_text("instance-id: iid-bench\nlocal-hostname: c1\n")
    (seed_dir / "network-config").write_text(json.dumps({"version": 1, "config": [
        {"type": "physical", "name": "eth0", "mac_address": mac,
         "subnets": [{"type": "dhcp"}]}]}))
    disk = tmp / "c1.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b",
                    str(DEBIAN / "debian.raw"), str(disk)], check=True)
    with netns() as name:
        began = time.monotonic()
        subprocess.run(["genisoimage", "-quiet", "-output", str(tmp / "seed.iso"), "-volid",
                        "cidata", "-joliet", "-rock", str(seed_dir / "user-data"),
                        str(seed_dir / "meta-data"), str(seed_dir / "network-config")],
                       check=True)
        for argv in (["ip", "link", "add", "br0", "type", "bridge"],
                     ["ip", "link", "set", "br0", "up"],
                     ["ip", "addr", "add", "100.64.60.1/24", "dev", "br0"],
                     ["ip", "tuntap", "add", "tap0", "mode", "tap"],
                     ["ip", "link", "set", "tap0", "master", "br0", "up"]):
            ns(name, *argv, check=True)
        subprocess.Popen(["ip", "netns", "exec", name, "dnsmasq", "--keep-in-foreground",
                          "--conf-file=/dev/null", "--pid-file", "--interface=br0",
                          "--bind-dynamic", "--port=0",
                          "--dhcp-range=100.64.60.0,static,255.255.255.0",
                          f"--dhcp-host={mac},{address}",
                          f"--dhcp-leasefile={tmp / 'leases'}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        subprocess.Popen(["ip", "netns", "exec", name, "qemu-system-x86_64", "-nodefaults",
                          "-machine", "pc", "-accel", "tcg", "-m", "1024M", "-display", "none",
                          "-serial", f"file:{tmp / 'serial.log'}",
                          "-kernel", str(DEBIAN / "vmlinuz"),
                          "-initrd", str(DEBIAN / "initrd.img"),
                          "-append", "root=/dev/vda console=ttyS0",
                          "-drive", f"file={disk},format=qcow2,if=virtio",
                          "-drive", f"file={tmp / 'seed.iso'},format=raw,media=cdrom,"
                                    "readonly=on",
                          "-chardev", f"socket,id=qga0,path={tmp / 'qga.sock'},server=on,"
                                      "wait=off",
                          "-device", "virtio-serial-pci",
                          "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
                          "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                          "-device", f"virtio-net-pci,netdev=n0,mac={mac}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        known = tmp / "known_hosts"
        public = " ".join(host.with_suffix(".pub").read_text().split()[:2])
        known.write_text(f"{address} {public}\n")
        done = wait_ssh(name, address, key, known, "ops", began + 600)
        return done - began


# --- seed build ------------------------------------------------------------------

def seed_pair(tmp: Path, runs: int) -> tuple[list[float], list[float]]:
    from reconciler import seed

    files = seed.render(hostname="c1", user="ops",
                        ssh_authorized_keys=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKx3 me"],
                        user_data="#cloud-config\nruncmd: [[touch, /x]]\n",
                        network_config=None, meta_data={}, macs=["52:54:00:00:00:01"],
                        host_key=None)
    src = tmp / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    ours, base = [], []
    for index in range(runs):
        target = tmp / f"ours-{index}.iso"
        began = time.perf_counter()
        fresh = seed.render(hostname="c1", user="ops",
                            ssh_authorized_keys=["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKx3 me"],
                            user_data="#cloud-config\nruncmd: [[touch, /x]]\n",
                            network_config=None, meta_data={}, macs=["52:54:00:00:00:01"],
                            host_key=None)
        seed.write_seed(target, fresh)
        ours.append(time.perf_counter() - began)
        began = time.perf_counter()
        subprocess.run(["genisoimage", "-quiet", "-output", str(tmp / f"base-{index}.iso"),
                        "-volid", "cidata", "-joliet", "-rock",
                        *(str(src / n) for n in files)], check=True)
        base.append(time.perf_counter() - began)
    return ours, base


# --- dnsmasq start ---------------------------------------------------------------

DRIVER = """
import sys, time
from ipaddress import IPv4Network
from pathlib import Path
from reconciler.localnet import LocalSwitch, SwitchPaths
switch = LocalSwitch(SwitchPaths(Path(sys.argv[1])), name="b", bridge="br-b",
                     subnet=IPv4Network("100.64.61.0/24"), nat=True, dns=False)
began = time.perf_counter()
switch.ensure({"52:54:00:00:00:01": "100.64.61.7"})
print(time.perf_counter() - began)
"""


def dnsmasq_pair(tmp: Path, runs: int) -> tuple[list[float], list[float]]:
    ours, base = [], []
    for index in range(runs):
        with netns() as name:
            ns(name, "ip", "link", "add", "br-b", "type", "bridge", check=True)
            ns(name, "ip", "link", "set", "br-b", "up", check=True)
            ns(name, "ip", "addr", "add", "100.64.61.1/24", "dev", "br-b", check=True)
            out = ns(name, sys.executable, "-c", DRIVER, str(tmp / f"sw-{index}"), check=True)
            ours.append(float(out.stdout.strip()))
            argv = json.loads((tmp / f"sw-{index}" / "dnsmasq.json").read_text())["argv"]
            os.kill(json.loads((tmp / f"sw-{index}" / "dnsmasq.json").read_text())["pid"],
                    signal.SIGKILL)
            argv = [a.replace(f"sw-{index}", f"base-{index}") for a in argv]
            (tmp / f"base-{index}").mkdir()
            began = time.perf_counter()
            proc = subprocess.Popen(["ip", "netns", "exec", name, *argv],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while not _has_socket(proc.pid):
                time.sleep(0.001)
            base.append(time.perf_counter() - began)
            proc.kill()
            proc.wait()
    return ours, base


def _has_socket(pid: int) -> bool:
    """ip netns exec execs dnsmasq in place: the pid is dnsmasq's once exec'd."""
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
                   for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


# --- status with 20 VMs ------------------------------------------------------------

def status_pair(tmp: Path, runs: int, vms: int = 20) -> tuple[list[float], list[float]]:
    manifests = tmp / "vms"
    manifests.mkdir()
    text = f"kind: Switch\nname: lan\nmode: local\nsubnet: {SUBNET}\nnat: false\n"
    for index in range(vms):
        text += "---\n" + vm_manifest(f"v{index:02d}", GUEST_DIR, memory="96M") + \
            "state: paused\ninterfaces: [{switch: lan}]\n"
    (manifests / "vms.yaml").write_text(text)
    env = dict(os.environ, RECONCILER_STATE_DIR=str(tmp / "state"))
    ours, base = [], []
    with netns() as name:
        run = subprocess.run(["ip", "netns", "exec", name, *reconcile_cmd(), "--once",
                              str(manifests)], capture_output=True, text=True, env=env)
        if run.returncode != 0:
            raise BenchError(f"reconcile failed: {run.stdout}{run.stderr}")
        for _ in range(runs):
            began = time.perf_counter()
            done = subprocess.run(["ip", "netns", "exec", name, *reconcile_cmd(), "status"],
                                  capture_output=True, text=True, env=env)
            ours.append(time.perf_counter() - began)
            if done.returncode != 0 or done.stdout.count("100.64.60.") != vms:
                raise BenchError(f"status failed: {done.stdout}{done.stderr}")
            began = time.perf_counter()
            subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", "pass"],
                           check=True)
            base.append(time.perf_counter() - began)
        subprocess.run(["ip", "netns", "exec", name, *reconcile_cmd(), "down"],
                       capture_output=True, env=env)
    return ours, base


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="pairs for ssh (default 2); "
                        "the other figures use 10x as many")
    parser.add_argument("--only", default="seed,dnsmasq,status,ssh")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/cloud.py: needs root (network namespaces)")
    wanted = args.only.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-cloud-") as name:
        tmp = Path(name)
        steps: list[tuple[str, Callable[[Path], tuple[list[float], list[float]]], str]] = [
            ("seed", lambda d: seed_pair(d, args.runs * 10), "ms"),
            ("dnsmasq", lambda d: dnsmasq_pair(d, args.runs * 5), "ms"),
            ("status", lambda d: status_pair(d, args.runs * 5), "ms"),
        ]
        for step, fn, unit in steps:
            if step in wanted:
                (tmp / step).mkdir()
                report(step, *fn(tmp / step), unit=unit)
        if "ssh" in wanted:
            key = tmp / "id_ed25519"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                           check=True)
            ours, base = [], []
            for index in range(args.runs):  # alternate which arm goes first
                arms = [("r", ssh_reconcile), ("d", ssh_direct)]
                for tag, arm in arms if index % 2 == 0 else arms[::-1]:
                    work = tmp / f"ssh-{tag}-{index}"
                    work.mkdir()
                    (ours if tag == "r" else base).append(arm(work, key))
            report("ssh", ours, base, unit="s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as err:
        print(f"bench/cloud.py: {err}", file=sys.stderr)
        sys.exit(1)
