"""Local switches: addresses decided before boot, dnsmasq serving exactly those, NAT by
its rules; the real ones inside network namespaces the tests make."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler import localnet
from reconciler.localnet import assign_addresses, default_subnet, gateway, parse_leases

SUBNET = IPv4Network("100.64.9.0/24")


def test_a_default_subnet_is_stable_and_avoids_what_is_taken() -> None:
    first = default_subnet("lan", taken=[])
    assert first == default_subnet("lan", taken=[]) and first.prefixlen == 24
    assert first.subnet_of(localnet.POOL)
    moved = default_subnet("lan", taken=[first, IPv4Network("100.64.0.0/16")])
    assert moved != first and not moved.overlaps(IPv4Network("100.64.0.0/16"))


def test_addresses_are_kept_and_never_the_gateway_network_or_broadcast() -> None:
    small = IPv4Network("10.0.0.0/29")  # .2 to .6 for VMs
    macs = [f"52:54:00:00:00:0{i}" for i in range(5)]
    found = assign_addresses(small, macs, previous={})
    assert sorted(found.values()) == [f"10.0.0.{i}" for i in range(2, 7)]
    with pytest.raises(ValueError, match="full"):
        assign_addresses(small, [*macs, "52:54:00:00:00:09"], previous={})
    kept = assign_addresses(SUBNET, ["52:54:00:00:00:01"],
                            previous={"52:54:00:00:00:01": "100.64.9.77"})
    assert kept == {"52:54:00:00:00:01": "100.64.9.77"}
    assert gateway(SUBNET).with_prefixlen == "100.64.9.1/24"


@given(st.lists(st.from_regex(r"52:54:00(:[0-9a-f]{2}){3}", fullmatch=True), max_size=60),
       st.lists(st.from_regex(r"52:54:00(:[0-9a-f]{2}){3}", fullmatch=True), max_size=20))
def test_assignment_is_distinct_inside_and_stable_as_vms_come(old: list[str], new: list[str]
                                                               ) -> None:
    before = assign_addresses(SUBNET, old, previous={})
    after = assign_addresses(SUBNET, old + new, previous=before)
    assert len(set(after.values())) == len(after) == len(set(old + new))
    for ip in after.values():
        assert IPv4Address(ip) in SUBNET and ip not in ("100.64.9.0", "100.64.9.1",
                                                         "100.64.9.255")
    assert all(after[mac] == ip for mac, ip in before.items())


def test_dnsmasq_serves_static_leases_only_and_dns_only_when_asked() -> None:
    argv = localnet.dnsmasq_argv(bridge="br-a", subnet=SUBNET, leases={"52:54:00:00:00:01":
                                 "100.64.9.7"}, names={"52:54:00:00:00:01": "web"},
                                 lease_file=Path("/s/leases"), dns=False, nat=True)
    assert "--dhcp-range=100.64.9.0,static,255.255.255.0,12h" in argv
    assert "--dhcp-host=52:54:00:00:00:01,100.64.9.7,web" in argv
    assert "--port=0" in argv and "--interface=br-a" in argv
    assert "--dhcp-option=option:router,100.64.9.1" in argv
    isolated = localnet.dnsmasq_argv(bridge="br-a", subnet=SUBNET, leases={}, names={},
                                     lease_file=Path("/s/leases"), dns=True, nat=False)
    assert "--dhcp-option=option:router" in isolated and "--port=0" not in isolated


def test_the_lease_file_is_read_tolerantly() -> None:
    text = ("1795895558 52:54:00:AA:BB:01 100.64.9.86 vm 01:52:54:00:aa:bb:01\n"
            "junk\n\n0 52:54:00:aa:bb:02 not-an-ip x y\n")
    assert parse_leases(text) == {"52:54:00:aa:bb:01": ("100.64.9.86", 1795895558)}


def test_the_nat_table_masquerades_the_subnet_out_of_other_interfaces() -> None:
    rules = localnet.nft_ruleset(table="reconciler-a", subnet=SUBNET, bridge="br-a")
    assert 'ip saddr 100.64.9.0/24 oifname != "br-a" masquerade' in rules


# --- real dnsmasq and nft, in namespaces ----------------------------------------

needs_tools = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("dnsmasq", "nft", "busybox")),
    reason="needs root, dnsmasq, nft and busybox")

DRIVER = """
import json, sys
from ipaddress import IPv4Network
from pathlib import Path
from reconciler.localnet import LocalSwitch, SwitchPaths, assign_addresses, gateway
from reconciler.net import Net
root, action, macs = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
subnet = IPv4Network("100.64.9.0/24")
switch = LocalSwitch(SwitchPaths(root), name="t", bridge="br-t", subnet=subnet, nat=True,
                     dns=False)
if action == "remove":
    print(json.dumps({"done": switch.remove()}))
    raise SystemExit
with Net() as net:
    net.ensure_bridge("br-t")
    net.ensure_address("br-t", str(gateway(subnet).ip), 24)
leases = assign_addresses(subnet, macs, previous=switch.addresses())
print(json.dumps({"leases": leases, "done": switch.ensure(leases)}))
"""


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """A namespace for the switch and one for a DHCP client on a veth into its bridge."""
    tag = uuid.uuid4().hex[:6]
    host, client = f"rln-{tag}", f"rlc-{tag}"
    for ns in (host, client):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        yield host, client, tmp_path / "switch"
    finally:
        for ns in (host, client):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                  text=True).stdout
            for pid in pids.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], check=False)


def in_ns(ns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def drive(host: str, root: Path, action: str, *macs: str) -> dict[str, object]:
    out = in_ns(host, sys.executable, "-c", DRIVER, str(root), action, *macs)
    return json.loads(out)  # type: ignore[no-any-return]


def plug_client(host: str, client: str, mac: str) -> None:
    in_ns(host, "ip", "link", "add", "vh", "type", "veth", "peer", "name", "vc")
    in_ns(host, "ip", "link", "set", "vc", "netns", client)
    in_ns(host, "ip", "link", "set", "vh", "master", "br-t", "up")
    in_ns(client, "ip", "link", "set", "vc", "address", mac, "up")


def dhcp(client: str, tmp: Path) -> str | None:
    script = tmp / "udhcpc.sh"
    script.write_text('#!/bin/sh\n[ "$1" = bound ] && echo "GOT $ip"\n')
    script.chmod(0o755)
    out = subprocess.run(["ip", "netns", "exec", client, "busybox", "udhcpc", "-i", "vc",
                          "-n", "-q", "-f", "-t", "3", "-T", "1", "-s", str(script)],
                         capture_output=True, text=True, timeout=60).stdout
    for line in out.splitlines():
        if line.startswith("GOT "):
            return line.split()[1]
    return None


def dnsmasq_pid(root: Path) -> int:
    return int(json.loads((root / "dnsmasq.json").read_text())["pid"])


@needs_tools
def test_a_client_gets_exactly_its_static_lease_and_a_stranger_nothing(
    lan: tuple[str, str, Path], tmp_path: Path,
) -> None:
    host, client, root = lan
    mac = "52:54:00:aa:bb:01"
    first = drive(host, root, "ensure", mac)
    assert first["done"] == [f"started dnsmasq (pid {dnsmasq_pid(root)})",
                             "turned IPv4 forwarding on",
                             "NAT table reconciler-t masquerades 100.64.9.0/24"]
    plug_client(host, client, mac)
    assert dhcp(client, tmp_path) == first["leases"][mac]  # type: ignore[index]
    in_ns(client, "ip", "link", "set", "vc", "address", "52:54:00:aa:bb:99")
    assert dhcp(client, tmp_path) is None


@needs_tools
def test_dnsmasq_is_adopted_restarted_when_dead_and_the_leases_hold(
    lan: tuple[str, str, Path], tmp_path: Path,
) -> None:
    host, client, root = lan
    mac = "52:54:00:aa:bb:01"
    leases = drive(host, root, "ensure", mac)["leases"]
    pid = dnsmasq_pid(root)
    assert drive(host, root, "ensure", mac) == {"leases": leases, "done": []}  # adopted
    os.kill(pid, signal.SIGKILL)
    again = drive(host, root, "ensure", mac)
    assert again["leases"] == leases
    assert again["done"] == [f"restarted dnsmasq: pid {pid} had died (pid {dnsmasq_pid(root)})"]
    plug_client(host, client, mac)
    assert dhcp(client, tmp_path) == leases[mac]  # type: ignore[index]
    more = drive(host, root, "ensure", mac, "52:54:00:aa:bb:02")
    assert more["leases"][mac] == leases[mac]  # type: ignore[index]
    assert "its leases or options changed" in str(more["done"])


@needs_tools
def test_the_nat_rules_are_in_a_table_of_their_own_and_go_with_the_switch(
    lan: tuple[str, str, Path],
) -> None:
    host, _, root = lan
    drive(host, root, "ensure", "52:54:00:aa:bb:01")
    table = in_ns(host, "nft", "list", "table", "ip", "reconciler-t")
    assert 'ip saddr 100.64.9.0/24 oifname != "br-t" masquerade' in table
    assert in_ns(host, "cat", "/proc/sys/net/ipv4/ip_forward").strip() == "1"
    pid = dnsmasq_pid(root)
    done = drive(host, root, "remove")["done"]
    assert done == [f"stopped dnsmasq (pid {pid})", "removed NAT table reconciler-t"]
    assert "reconciler-t" not in in_ns(host, "nft", "list", "tables")
    assert not root.exists()
