"""net.py: tap names and MACs (pure), bridges and taps (in a private network namespace).

The effect tests never touch the host's interfaces: each creates its own network namespace
(`ip netns add rtest-...`), runs its code there with `ip netns exec NS python -c ...`, reads
the result as JSON, and deletes the namespace.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import re
import signal
import string
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from reconciler.net import (
    MAX_IFNAME,
    VM_NAME,
    bridge_mac,
    check_ifname,
    mac_address,
    tap_host_mac,
    tap_name,
)

REPO = Path(__file__).resolve().parent.parent

vm_names = st.from_regex(VM_NAME, fullmatch=True)
indexes = st.integers(min_value=0, max_value=99)


# --- pure: tap names --------------------------------------------------------

def test_tap_name_short_names_are_kept() -> None:
    assert tap_name("web-1", 0) == "vmweb-1.0"
    assert tap_name("db", 3) == "vmdb.3"
    assert tap_name("a" * 11, 7) == "vm" + "a" * 11 + ".7"  # exactly 15
    assert tap_name("a" * 10, 12) == "vm" + "a" * 10 + ".12"


def test_tap_name_long_names_are_shortened() -> None:
    name = "webserver-production-01"
    tap = tap_name(name, 0)
    assert re.fullmatch(r"vmwe_[a-z2-7]{8}\.0", tap), tap
    assert len(tap) == MAX_IFNAME
    assert tap_name(name, 1) == tap[:-1] + "1"
    assert tap_name("webserver-production-02", 0) != tap
    assert re.fullmatch(r"vmw_[a-z2-7]{8}\.10", tap_name(name, 10))
    assert tap_name("a" * 12, 0) != tap_name("a" * 13, 0)


def test_a_shortened_name_never_equals_a_full_one() -> None:
    # The shortened middle holds '_', which no VM name does: `vm<11-char name>.0` can
    # never be the short form of a longer name (a plain prefix + hex hash could).
    middle = tap_name("a-rather-long-vm-name", 0)[2:-2]
    assert len(middle) == 11
    assert not VM_NAME.fullmatch(middle)


@pytest.mark.parametrize("name", ["", "Web", "-a", "a_b", "a.b", "a/b", "a b", "a" * 64])
def test_tap_name_rejects_invalid_vm_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid VM name"):
        tap_name(name, 0)
    with pytest.raises(ValueError, match="invalid VM name"):
        mac_address(name, 0)


def test_tap_name_rejects_bad_indexes() -> None:
    with pytest.raises(ValueError, match="negative"):
        tap_name("web-1", -1)
    with pytest.raises(ValueError, match="too large"):
        tap_name("a" * 20, 10**7)


@given(vm_names, indexes)
def test_tap_name_is_a_valid_deterministic_ifname(name: str, index: int) -> None:
    tap = tap_name(name, index)
    assert len(tap) <= MAX_IFNAME
    assert check_ifname(tap) == tap
    assert tap.startswith("vm") and tap.endswith(f".{index}")
    assert tap_name(name, index) == tap
    full = f"vm{name}.{index}"
    assert tap == full if len(full) <= MAX_IFNAME else "_" in tap


@given(vm_names, indexes, vm_names, indexes)
def test_tap_names_of_different_interfaces_differ(a: str, i: int, b: str, j: int) -> None:
    assume((a, i) != (b, j))
    assert tap_name(a, i) != tap_name(b, j)


_FIRST = string.ascii_lowercase + string.digits
_REST = _FIRST + "-"
# Real fleets share long prefixes; shortening must still tell them apart.
_HEADS = ["webserver-prod-", "db-replica-", "k8s-node-worker-", "a" * 20, "0"]


def _random_vm_names(rng: random.Random, count: int) -> set[str]:
    names: set[str] = set()
    while len(names) < count:
        if rng.random() < 0.5:
            head = rng.choice(_HEADS)
            tail = rng.randint(1, 63 - len(head))
            name = head + "".join(rng.choices(_REST, k=tail))
        else:
            length = rng.randint(1, 63)
            name = rng.choice(_FIRST) + "".join(rng.choices(_REST, k=length - 1))
        names.add(name)
    return names


@settings(max_examples=3, deadline=None)
@given(st.integers(min_value=0, max_value=2**64))
def test_tap_names_of_10000_vms_are_unique(seed: int) -> None:
    names = _random_vm_names(random.Random(seed), 10_000)
    assert all(VM_NAME.fullmatch(n) for n in names)
    taps = {tap_name(n, i) for n in names for i in range(8)}
    assert len(taps) == 10_000 * 8
    assert max(map(len, taps)) <= MAX_IFNAME


# --- pure: MAC addresses and interface names --------------------------------

def test_mac_address_is_stable() -> None:
    # Pinned: a VM keeps its MAC across runs, hosts and versions of this code.
    assert mac_address("web-1", 0) == "52:54:00:ef:18:5f"
    assert mac_address("web-1", 1) != mac_address("web-1", 0)
    assert mac_address("web-2", 0) != mac_address("web-1", 0)


@given(vm_names, indexes)
def test_mac_address_is_locally_administered_unicast(name: str, index: int) -> None:
    mac = mac_address(name, index)
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", mac)
    first = int(mac[:2], 16)
    assert first & 0b10 and not first & 0b01
    assert tap_host_mac(mac) == "fe" + mac[2:]


def test_tap_host_mac() -> None:
    assert tap_host_mac("52:54:00:AB:cd:EF") == "fe:54:00:ab:cd:ef"
    for bad in ("01:00:5e:00:00:01", "52:54:00:12:34", "52-54-00-12-34-56", "zz:54:00:12:34:56"):
        with pytest.raises(ValueError):
            tap_host_mac(bad)


def test_bridge_mac() -> None:
    mac = bridge_mac("br-lan")
    assert re.fullmatch(r"02(:[0-9a-f]{2}){5}", mac)
    assert bridge_mac("br-lan") == mac != bridge_mac("br-wan")
    with pytest.raises(ValueError):
        bridge_mac("x" * 16)


@pytest.mark.parametrize("name", ["br0", "br-lan", "x" * 15, "vmweb-1.0", "a_b"])
def test_check_ifname_accepts(name: str) -> None:
    assert check_ifname(name) == name


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", "a b", "a\tb", "a:b", ".", "..",
                                  "é" * 8])
def test_check_ifname_rejects(name: str) -> None:
    with pytest.raises(ValueError, match="bridge name"):
        check_ifname(name, "bridge")


def test_import_does_not_load_pyroute2() -> None:
    code = ("import sys, reconciler.net; "
            "print(sorted(m for m in ('pyroute2', 'tenacity') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout
    assert out.strip() == "[]"


# --- effects, inside a private network namespace ------------------------------

PRELUDE = """\
import json, logging, sys
import reconciler.net as net_module
from reconciler.net import Net, NetError, bridge_mac, mac_address, tap_host_mac
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="LOG %(message)s")

def out(**result):
    print("RESULT " + json.dumps(result), flush=True)

def error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except (NetError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return None
"""


class NS:
    """A network namespace made for one test."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, code: str) -> tuple[dict[str, Any], str]:
        """Run Python in the namespace; the dict it passed to out(), and its stderr."""
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c",
             PRELUDE + textwrap.dedent(code)],
            capture_output=True, text=True, cwd=REPO, timeout=60,
        )
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        results = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert results, proc.stdout + proc.stderr
        return json.loads(results[-1].removeprefix("RESULT ")), proc.stderr

    def __call__(self, code: str) -> dict[str, Any]:
        return self.run(code)[0]

    def sh(self, *argv: str) -> str:
        proc = subprocess.run(["ip", "netns", "exec", self.name, *argv],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{argv}: {proc.stderr}"
        return proc.stdout

    def links(self) -> dict[str, dict[str, Any]]:
        """`ip -d -j link` in the namespace, by name."""
        return {link["ifname"]: link for link in json.loads(self.sh("ip", "-d", "-j", "link"))}


@pytest.fixture
def ns() -> Iterator[NS]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    name = f"rtest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        yield NS(name)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def test_bridge_is_created_once_and_up(ns: NS) -> None:
    result = ns("""
        with Net() as net:
            first = net.ensure_bridge("rbr0")
            second = net.ensure_bridge("rbr0")
        out(first=first, second=second)
    """)
    assert result == {"first": True, "second": False}
    br = ns.links()["rbr0"]
    assert br["linkinfo"]["info_kind"] == "bridge"
    assert "UP" in br["flags"]
    assert br["address"] == bridge_mac("rbr0")

    ns.sh("ip", "link", "set", "rbr0", "down")
    assert ns("out(created=Net().ensure_bridge('rbr0'))") == {"created": False}
    assert "UP" in ns.links()["rbr0"]["flags"]


def test_tap_is_created_attached_and_up(ns: NS) -> None:
    mac = mac_address("web-1", 0)
    result = ns(f"""
        with Net() as net:
            net.ensure_bridge("rbr0")
            net.ensure_tap("vmweb-1.0", "rbr0", {mac!r})
            out(ports=net.bridge_ports("rbr0"), exists=net.exists("vmweb-1.0"))
    """)
    assert result == {"ports": ["vmweb-1.0"], "exists": True}
    links = ns.links()
    tap = links["vmweb-1.0"]
    assert tap["linkinfo"]["info_kind"] == "tun"
    assert tap["linkinfo"]["info_data"]["type"] == "tap"
    assert tap["linkinfo"]["info_data"]["persist"] is True
    assert tap["master"] == "rbr0"
    assert "UP" in tap["flags"]
    assert tap["address"] == tap_host_mac(mac) != mac
    # A port joining does not change the bridge's own address.
    assert links["rbr0"]["address"] == bridge_mac("rbr0")


def test_ensure_tap_is_idempotent(ns: NS) -> None:
    code = """
        with Net() as net:
            net.ensure_bridge("rbr0")
            net.ensure_bridge("rbr1")
            net.ensure_tap("vmdb.0", "{bridge}", "52:54:00:00:00:01")
            out(ports=net.bridge_ports("{bridge}"))
    """
    assert ns(code.format(bridge="rbr0")) == {"ports": ["vmdb.0"]}
    index = ns.links()["vmdb.0"]["ifindex"]

    assert ns(code.format(bridge="rbr0")) == {"ports": ["vmdb.0"]}
    assert ns.links()["vmdb.0"]["ifindex"] == index  # not recreated

    ns.sh("ip", "link", "set", "vmdb.0", "down", "nomaster")
    assert ns(code.format(bridge="rbr0")) == {"ports": ["vmdb.0"]}
    tap = ns.links()["vmdb.0"]
    assert (tap["ifindex"], tap["master"], "UP" in tap["flags"]) == (index, "rbr0", True)

    assert ns(code.format(bridge="rbr1")) == {"ports": ["vmdb.0"]}  # moved
    assert ns("out(ports=Net().bridge_ports('rbr0'))") == {"ports": []}
    assert ns.links()["vmdb.0"]["ifindex"] == index


def test_remove_tap_and_bridge(ns: NS) -> None:
    result = ns("""
        with Net() as net:
            net.ensure_bridge("rbr0")
            for tap in ("vma.0", "vmb.0", "vmb.1"):
                net.ensure_tap(tap, "rbr0")
            ports = net.bridge_ports("rbr0")
            net.remove_tap("vmb.0")
            net.remove_tap("vmb.0")  # gone already: fine
            after = net.bridge_ports("rbr0")
            gone = net.exists("vmb.0")
            net.remove_bridge("rbr0")
            net.remove_bridge("rbr0")
            out(ports=ports, after=after, gone=gone, bridge=net.exists("rbr0"),
                tap=net.exists("vma.0"), missing=net.bridge_ports("rbr0"))
    """)
    assert result == {"ports": ["vma.0", "vmb.0", "vmb.1"], "after": ["vma.0", "vmb.1"],
                      "gone": False, "bridge": False, "tap": True, "missing": []}
    links = ns.links()
    assert "rbr0" not in links and "vmb.0" not in links
    assert "master" not in links["vma.0"]  # a removed bridge releases its taps


def test_other_kinds_of_interfaces_are_left_alone(ns: NS) -> None:
    ns.sh("ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
    result = ns("""
        with Net() as net:
            net.ensure_bridge("rbr0")
            out(bridge=error(net.ensure_bridge, "veth0"),
                tap=error(net.ensure_tap, "veth0", "rbr0"),
                remove_tap=error(net.remove_tap, "veth0"),
                remove_bridge=error(net.remove_bridge, "veth0"),
                not_a_bridge=error(net.ensure_tap, "vmx.0", "veth0"),
                ports=error(net.bridge_ports, "veth0"),
                no_bridge=error(net.ensure_tap, "vmx.0", "nobridge"),
                tap_not_bridge=error(net.remove_tap, "rbr0"))
    """)
    assert result["bridge"] == ("NetError: veth0 exists and is not a bridge (kind veth); "
                                "choose another bridge name")
    assert result["tap"] == ("NetError: veth0 exists and is not a tap (kind veth); "
                             "it is left alone")
    assert result["remove_tap"] == "NetError: veth0 is not a tap (kind veth); it is left alone"
    assert result["remove_bridge"] == ("NetError: veth0 is not a bridge (kind veth); "
                                       "it is left alone")
    assert result["not_a_bridge"] == ("NetError: cannot attach tap vmx.0: veth0 is not a bridge "
                                      "(kind veth)")
    assert result["ports"] == "NetError: veth0 is not a bridge (kind veth)"
    assert result["no_bridge"] == ("NetError: cannot attach tap vmx.0: "
                                   "bridge nobridge does not exist")
    assert result["tap_not_bridge"] == ("NetError: rbr0 is not a tap (kind bridge); "
                                        "it is left alone")
    links = ns.links()
    assert "rbr0" in links
    assert "veth0" in links and "master" not in links["veth0"]
    assert "vmx.0" not in links


def test_invalid_names_are_refused_before_anything_is_done(ns: NS) -> None:
    result = ns("""
        net = Net()
        out(errors=[error(net.ensure_bridge, name) for name in ("x" * 16, "a/b", "a b", "")]
                   + [error(net.ensure_tap, "vmx.0", "rbr0", "01:00:5e:00:00:01"),
                      error(net.ensure_tap, "x" * 16, "rbr0"),
                      error(net.exists, "a:b")],
            opened=net._pool is not None)
    """)
    assert all(e and e.startswith("ValueError: ") for e in result["errors"]), result
    assert result["errors"][0] == ("ValueError: bridge name 'xxxxxxxxxxxxxxxx' must be 1 to 15 "
                                   "bytes long")
    assert result["opened"] is False
    assert set(ns.links()) == {"lo"}


def test_tap_owner(ns: NS) -> None:
    ns("""
        with Net() as net:
            net.ensure_bridge("rbr0")
            net.ensure_tap("vmo.0", "rbr0", owner=65534)
        out()
    """)
    try:
        nobody = pwd.getpwuid(65534).pw_name
    except KeyError:
        nobody = "65534"
    assert ns.links()["vmo.0"]["linkinfo"]["info_data"]["user"] == nobody
    index = ns.links()["vmo.0"]["ifindex"]
    ns("Net().ensure_tap('vmo.0', 'rbr0', owner=0); out()")
    tap = ns.links()["vmo.0"]
    assert tap["linkinfo"]["info_data"]["user"] == "root"
    assert tap["ifindex"] == index and tap["master"] == "rbr0"


def test_a_tap_in_use_is_kept_and_busy_is_retried(ns: NS) -> None:
    result, log = ns.run("""
import fcntl, os, struct
net_module.RETRY_WAIT = 0.001
with Net() as net:
    net.ensure_bridge("rbr0")
    net.ensure_tap("vmb.0", "rbr0")
    # Attach to the tap the way QEMU does: TUNSETIFF(IFF_TAP | IFF_NO_PI).
    held = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(held, 0x400454CA, struct.pack("16sH", b"vmb.0", 0x0002 | 0x1000))
    again = error(net.ensure_tap, "vmb.0", "rbr0", "52:54:00:00:00:02")
    busy = error(net.ensure_tap, "vmb.0", "rbr0", owner=65534)
    out(again=again, busy=busy)
""")
    assert result["again"] is None  # an attached tap is re-ensured without recreating it
    assert result["busy"] == ("NetError: cannot set the owner of tap vmb.0: "
                              "Device or resource busy (EBUSY)")
    retries = [line for line in log.splitlines() if "retrying" in line]
    assert len(retries) == 4, log
    assert retries[0] == ("LOG cannot set the owner of tap vmb.0: Device or resource busy "
                          "(EBUSY), retrying (attempt 2 of 5)")


def test_transient_errors_are_retried_others_are_not(ns: NS) -> None:
    # pyroute2 replaced by a fake whose deletes fail; nothing reaches the kernel.
    result, log = ns.run("""
        import errno
        from pyroute2.netlink.exceptions import NetlinkError
        net_module.RETRY_WAIT = 0.001

        class Attrs:
            def __init__(self, **attrs):
                self.attrs = attrs
            def get_attr(self, name):
                return self.attrs.get(name)

        class Link(Attrs):
            def __getitem__(self, key):
                return {"index": 7, "flags": 1}[key]

        class FakeIPRoute:
            def __init__(self, failures):
                self.failures, self.deletes = failures, 0
            def link(self, command, **kwargs):
                if command == "get":
                    info = Attrs(IFLA_INFO_KIND="tun", IFLA_INFO_DATA=Attrs(IFLA_TUN_TYPE=2))
                    return [Link(IFLA_IFNAME=kwargs["ifname"], IFLA_LINKINFO=info)]
                assert command == "del"
                self.deletes += 1
                if self.failures:
                    raise NetlinkError(self.failures.pop(0))
            def close(self):
                pass

        results = {}
        for case, failures in {"busy_twice": [errno.EBUSY, errno.EBUSY],
                               "eperm": [errno.EPERM]}.items():
            fake = FakeIPRoute(failures)
            Net._open = lambda self, fake=fake: fake
            with Net() as net:
                results[case] = [error(net.remove_tap, "vmf.0"), fake.deletes]
        out(**results)
    """)
    assert result["busy_twice"] == [None, 3]
    assert result["eperm"] == ["NetError: cannot delete tap vmf.0: Operation not permitted (EPERM)",
                               1]
    assert log.count("retrying") == 2


def test_net_works_inside_a_running_event_loop(ns: NS) -> None:
    # pyroute2's own sync IPRoute raises there; Net runs it on its own thread.
    result = ns("""
        import asyncio

        async def main(net):
            created = net.ensure_bridge("rbr0")
            await asyncio.to_thread(net.ensure_tap, "vme.0", "rbr0")
            return created, net.bridge_ports("rbr0")

        with Net() as net:
            created, ports = asyncio.run(main(net))
            out(created=created, ports=ports, after_loop=net.exists("vme.0"))
    """)
    assert result == {"created": True, "ports": ["vme.0"], "after_loop": True}


@pytest.mark.qemu
def test_a_guest_uses_the_tap(ns: NS, guest: Path, tmp_path: Path) -> None:
    """QEMU as root opens the persistent tap by name; the guest pings the bridge."""
    mac = mac_address("net-1", 0)
    tap = tap_name("net-1", 0)
    ns(f"""
        with Net() as net:
            net.ensure_bridge("rbr0")
            net.ensure_tap({tap!r}, "rbr0", {mac!r})
        out()
    """)
    ns.sh("ip", "addr", "add", "10.99.0.254/24", "dev", "rbr0")
    console = tmp_path / "serial.log"
    qemu = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, "qemu-system-x86_64", "-nodefaults", "-display", "none",
         "-machine", "pc", "-accel", "tcg", "-m", "128",
         "-kernel", str(guest / "vmlinuz"), "-initrd", str(guest / "initrd.img"),
         "-append", "console=ttyS0 quiet rg.ip=10.99.0.1/24 rg.ping=10.99.0.254",
         "-serial", f"file:{console}",
         "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
         "-device", f"virtio-net-pci,netdev=n0,mac={mac}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        text = ""
        while "reconciler-guest: up" not in text and time.monotonic() < deadline:
            assert qemu.poll() is None, qemu.communicate()[1]
            time.sleep(0.2)
            text = console.read_text(errors="replace") if console.exists() else ""
        assert "reconciler-guest: ping 10.99.0.254 ok" in text, text
        attached = ns.links()[tap]
        assert "LOWER_UP" in attached["flags"]  # carrier while QEMU holds it
        assert attached["linkinfo"]["info_data"]["vnet_hdr"] is True  # QEMU's flags
    finally:
        qemu.send_signal(signal.SIGKILL)
        qemu.wait(timeout=30)
        if qemu.stderr:
            qemu.stderr.close()
    after = ns.links()[tap]  # persistent: outlives QEMU, still in the bridge
    assert after["master"] == "rbr0" and "NO-CARRIER" in after["flags"]
