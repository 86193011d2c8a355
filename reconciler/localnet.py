"""Local switches (vmd's `local interface`): DHCP with static leases, and NAT.

Apply stage of desired -> observed -> plan -> apply: for a `mode: local` switch the
loop gives the bridge its gateway address (net.Net) and then `LocalSwitch.ensure`:
- dnsmasq (Debian `dnsmasq-base`) bound to that bridge only, serving a static lease
  per VM MAC (`--dhcp-range=NET,static`: nobody else gets an address). It is
  supervised like a VM: spawned in its own session (it outlives the reconciler), its
  pid, process start time and argv recorded in the switch's state dir, adopted by
  the next run, started again when it died, restarted when its argv changed (a VM
  was added: the leases are in the argv, and the lease file survives the restart);
- with `nat`, an nftables table of its own (`ip reconciler-NAME`) that masquerades
  the subnet to the host's other interfaces, and IPv4 forwarding on (this netns).

Addresses are decided before any guest boots (`assign_addresses`): a MAC keeps the
address it had; a new one gets one derived from a hash of it. So a VM's address is
known before it boots and never changes.

Pure: `default_subnet`, `gateway`, `assign_addresses`, `dnsmasq_argv`, `nft_ruleset`,
`parse_leases`. Effects: `LocalSwitch`. Errors: LocalNetError.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from reconciler.observed import atomic_write, process_start_time, read_json

log = logging.getLogger("reconciler.localnet")

POOL = IPv4Network("100.64.0.0/10")  # vmd's `local prefix`
LEASE_TIME = "12h"
STOP_TIMEOUT = 3.0


class LocalNetError(Exception):
    """A local switch's DHCP or NAT could not be set up; names the command and cause."""


# --- pure -----------------------------------------------------------------

def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def default_subnet(name: str, *, taken: Iterable[IPv4Network]) -> IPv4Network:
    """A /24 of POOL for switch `name`: from a hash of the name, the first free one."""
    taken = list(taken)
    count = 2 ** (24 - POOL.prefixlen)
    start = _hash(name) % count
    for step in range(count):
        base = int(POOL.network_address) + ((start + step) % count) * 256
        candidate = IPv4Network((base, 24))
        if not any(candidate.overlaps(other) for other in taken):
            return candidate
    raise ValueError(f"no free /24 left in {POOL} for switch '{name}'; give subnet:")


def gateway(subnet: IPv4Network) -> IPv4Interface:
    """The bridge's own address: the subnet's first."""
    return IPv4Interface((subnet.network_address + 1, subnet.prefixlen))


def assign_addresses(subnet: IPv4Network, macs: Iterable[str], *,
                     previous: Mapping[str, Any]) -> dict[str, str]:
    """mac -> address: kept when it had one in the subnet, else from a hash of the mac
    (probing to the next free one). Never the network, gateway or broadcast address."""
    first = int(subnet.network_address) + 2
    size = subnet.num_addresses - 3
    if size <= 0:
        raise ValueError(f"subnet {subnet} has no room for VMs")
    wanted = sorted(set(macs))
    result: dict[str, str] = {}
    used: set[int] = set()
    for mac in wanted:
        try:
            old = int(IPv4Address(str(previous.get(mac))))
        except ValueError:
            continue
        if first <= old < first + size and old not in used:
            result[mac] = str(IPv4Address(old))
            used.add(old)
    for mac in wanted:
        if mac in result:
            continue
        if len(used) >= size:
            raise ValueError(f"subnet {subnet} is full: no address left for {mac}")
        offset = _hash(mac) % size
        while first + offset in used:
            offset = (offset + 1) % size
        used.add(first + offset)
        result[mac] = str(IPv4Address(first + offset))
    return result


def dnsmasq_argv(*, bridge: str, subnet: IPv4Network, leases: Mapping[str, str],
                 names: Mapping[str, str], lease_file: Path, dns: bool, nat: bool,
                 binary: str = "dnsmasq") -> list[str]:
    """dnsmasq for one bridge: static leases only; DNS only with `dns`, a router only
    with `nat`. Runs in the foreground (its pid is the one spawned; no pidfile)."""
    gw = gateway(subnet).ip
    argv = [
        binary, "--keep-in-foreground", "--conf-file=/dev/null", "--pid-file",
        f"--interface={bridge}", "--bind-dynamic", "--except-interface=lo",
        f"--dhcp-range={subnet.network_address},static,{subnet.netmask},{LEASE_TIME}",
        f"--dhcp-leasefile={lease_file}", "--dhcp-authoritative", "--log-facility=-",
        f"--dhcp-option=option:router{',' + str(gw) if nat else ''}",
    ]
    if dns:
        argv += ["--no-hosts", "--domain-needed", "--bogus-priv",
                 f"--dhcp-option=option:dns-server,{gw}"]
    else:
        argv += ["--port=0"]
    for mac in sorted(leases):
        name = names.get(mac)
        argv.append(f"--dhcp-host={mac},{leases[mac]}" + (f",{name}" if name else ""))
    return argv


def table_name(switch: str) -> str:
    return f"reconciler-{switch}"


def nft_ruleset(*, table: str, subnet: IPv4Network, bridge: str) -> str:
    """The NAT table: masquerade the subnet leaving by another interface, and forward
    its traffic (and the answers) whatever the host's own forward policy is."""
    return (
        f"table ip {table} {{\n"
        f"  chain postrouting {{\n"
        f"    type nat hook postrouting priority srcnat; policy accept;\n"
        f"    ip saddr {subnet} oifname != \"{bridge}\" masquerade\n"
        f"  }}\n"
        f"  chain forward {{\n"
        f"    type filter hook forward priority filter; policy accept;\n"
        f"    iifname \"{bridge}\" accept\n"
        f"    oifname \"{bridge}\" ct state established,related accept\n"
        f"  }}\n"
        f"}}\n")


def parse_leases(text: str) -> dict[str, tuple[str, int]]:
    """dnsmasq's lease file (`EXPIRY MAC IP NAME CLIENTID`): mac -> (ip, expiry)."""
    found: dict[str, tuple[str, int]] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or not fields[0].isdigit():
            continue
        try:
            IPv4Address(fields[2])
        except ValueError:
            continue
        found[fields[1].lower()] = (fields[2], int(fields[0]))
    return found


# --- effects --------------------------------------------------------------

@dataclass(frozen=True)
class SwitchPaths:
    """The files of one local switch in the state dir."""

    dir: Path

    @property
    def record(self) -> Path:
        return self.dir / "dnsmasq.json"  # pid, start time, argv of its dnsmasq

    @property
    def leases(self) -> Path:
        return self.dir / "leases"  # dnsmasq's lease file

    @property
    def log(self) -> Path:
        return self.dir / "dnsmasq.log"

    @property
    def addresses(self) -> Path:
        return self.dir / "addresses.json"  # the static assignment, mac -> ip

    @property
    def nat(self) -> Path:
        return self.dir / "nat.nft"  # the ruleset last applied


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _alive(pid: int, start_time: int) -> bool:
    if pid <= 0:
        return False
    _reap(pid)  # our child that died is a zombie until reaped
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X") and process_start_time(pid) == start_time


class LocalSwitch:
    """dnsmasq and NAT of one local switch (its bridge and address are the loop's)."""

    def __init__(self, paths: SwitchPaths, *, name: str, bridge: str, subnet: IPv4Network,
                 nat: bool, dns: bool) -> None:
        self.paths, self.name, self.bridge = paths, name, bridge
        self.subnet, self.nat, self.dns = subnet, nat, dns

    def dnsmasq_pid(self) -> int | None:
        record = read_json(self.paths.record)
        pid, start = int(record.get("pid", 0)), int(record.get("start_time", 0))
        return pid if _alive(pid, start) else None

    def addresses(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in read_json(self.paths.addresses).items()}

    def leases(self) -> dict[str, str]:
        try:
            text = self.paths.leases.read_text()
        except OSError:
            return {}
        now = time.time()
        return {mac: ip for mac, (ip, expiry) in parse_leases(text).items()
                if expiry == 0 or expiry > now}

    def ensure(self, leases: Mapping[str, str], names: Mapping[str, str] | None = None
               ) -> list[str]:
        """Converge dnsmasq and NAT; one sentence per change ([] when none was needed)."""
        self.paths.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.addresses() != dict(leases):
            atomic_write(self.paths.addresses, json.dumps(dict(sorted(leases.items())),
                                                          indent=2) + "\n")
        done = self._dnsmasq(leases, names or {})
        done += self._nat()
        return done

    def _dnsmasq(self, leases: Mapping[str, str], names: Mapping[str, str]) -> list[str]:
        argv = dnsmasq_argv(bridge=self.bridge, subnet=self.subnet, leases=leases,
                            names=names, lease_file=self.paths.leases, dns=self.dns,
                            nat=self.nat)
        record = read_json(self.paths.record)
        pid = self.dnsmasq_pid()
        if pid is not None and record.get("argv") == argv:
            return []  # adopted as it runs
        if pid is not None:
            self._stop(pid)
            why = "restarted dnsmasq: its leases or options changed"
        elif record.get("pid"):
            why = f"restarted dnsmasq: pid {record['pid']} had died"
        else:
            why = "started dnsmasq"
        pid = self._spawn(argv)
        return [f"{why} (pid {pid})"]

    def _spawn(self, argv: list[str]) -> int:
        binary = shutil.which(argv[0])
        if binary is None:
            raise LocalNetError("dnsmasq not found; install Debian's dnsmasq-base")
        out = os.open(self.paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:  # its own session, like QEMU: it outlives this process
            pid = os.posix_spawn(binary, argv, os.environ, setsid=True, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, out, 1), (os.POSIX_SPAWN_DUP2, out, 2)])
        except OSError as err:
            raise LocalNetError(f"cannot run dnsmasq: {err}") from err
        finally:
            os.close(out)
        atomic_write(self.paths.record, json.dumps(
            {"pid": pid, "start_time": process_start_time(pid) or 0, "argv": argv}) + "\n")
        # dnsmasq checks its options and binds at once: a mistake shows within moments.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                ended, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                ended, status = pid, 0
            if ended:
                raise LocalNetError(f"dnsmasq exited at once (status {status}): "
                                    f"{self._log_tail()}")
            if self._listening(pid):
                break
            time.sleep(0.001)
        return pid

    @staticmethod
    def _listening(pid: int) -> bool:
        """Whether dnsmasq has its DHCP socket (any socket) open yet."""
        try:
            return any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
                       for fd in os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.paths.log.read_text(errors="replace").splitlines()[-3:])
        except OSError:
            return ""

    def _stop(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        start = process_start_time(pid) or 0
        while time.monotonic() < deadline and _alive(pid, start):
            time.sleep(0.01)
        if _alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _reap(pid)

    def _nft(self, script: str) -> None:
        try:
            done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True,
                                  text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as err:
            raise LocalNetError(f"cannot run nft (Debian: nftables): {err}") from err
        if done.returncode != 0:
            raise LocalNetError(f"nft -f failed: {done.stderr.strip()}")

    def _table_exists(self) -> bool:
        try:
            return subprocess.run(["nft", "list", "table", "ip", table_name(self.name)],
                                  capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False

    def _nat(self) -> list[str]:
        table = table_name(self.name)
        if not self.nat:
            if self.paths.nat.exists() or self._table_exists():
                self._nft(f"table ip {table} {{}}\ndelete table ip {table}\n")
                self.paths.nat.unlink(missing_ok=True)
                return [f"removed NAT table {table}"]
            return []
        ruleset = nft_ruleset(table=table, subnet=self.subnet, bridge=self.bridge)
        forward = Path("/proc/sys/net/ipv4/ip_forward")
        done = []
        try:
            if forward.read_text().strip() != "1":
                forward.write_text("1\n")
                done.append("turned IPv4 forwarding on")
        except OSError as err:
            raise LocalNetError(f"cannot turn IPv4 forwarding on: {err.strerror}") from err
        try:
            applied = self.paths.nat.read_text()
        except OSError:
            applied = ""
        if applied == ruleset and self._table_exists():
            return done
        # Atomic: the old table (made empty if absent) goes as the new one comes.
        self._nft(f"table ip {table} {{}}\ndelete table ip {table}\n{ruleset}")
        atomic_write(self.paths.nat, ruleset)
        return [*done, f"NAT table {table} masquerades {self.subnet}"]

    def remove(self) -> list[str]:
        """Stop dnsmasq and drop the NAT table and the switch's state (leases too)."""
        done = []
        if (pid := self.dnsmasq_pid()) is not None:
            self._stop(pid)
            done.append(f"stopped dnsmasq (pid {pid})")
        if self.paths.nat.exists() or self._table_exists():
            self._nft(f"table ip {table_name(self.name)} {{}}\n"
                      f"delete table ip {table_name(self.name)}\n")
            done.append(f"removed NAT table {table_name(self.name)}")
        for path in (self.paths.record, self.paths.leases, self.paths.log,
                     self.paths.addresses, self.paths.nat, self.paths.dir / "switch.json"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.paths.dir.rmdir()
        return done
