"""What a running guest is up to: its readiness probes and its addresses.

Observe stage of desired -> observed -> plan -> apply, for what QMP cannot tell:
`observed.observe` says a VM's QEMU runs; `assess` says whether its guest is `ready`
(every probe in its `ready:` passed), and `addresses` where it can be reached.

Probes, all bounded: `serial` scans the console log from where the last pass stopped
(at most SCAN_LIMIT bytes a pass, so a guest flooding its console costs a bounded
amount of regex work), `tcp` connects from the host to the VM's address, `agent`
asks the guest agent for guest-ping. A probe that passed stays passed for that run
of the guest (readiness is "came up", not a health check), and a guest that was
ready when saved is ready when restored (its boot marker will not print again): the
record keeps `ready_at` and the probes passed so far.

Addresses come from the static lease of a local switch (known before the guest
boots), dnsmasq's lease file, and the guest agent (any switch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler import qga
from reconciler.observed import (
    Readiness,
    Record,
    StateDir,
    VMPaths,
    console_since,
    console_tail,
    read_json,
)

log = logging.getLogger("reconciler.probes")

SCAN_LIMIT = 1 << 20  # console bytes a `serial` probe reads per pass
SCAN_OVERLAP = 4096  # bytes re-read before the last offset: a match may span reads
PROBE_TIMEOUT = 1.0  # seconds for one tcp connect or one guest-ping
AGENT_TIMEOUT = 2.0  # seconds for guest-network-get-interfaces


@dataclass(frozen=True)
class Address:
    interface: str  # the guest's name for it when the agent told, else ethN
    mac: str
    ipv4: str
    source: str  # "lease" | "agent"

    def to_json(self) -> dict[str, str]:
        return {"interface": self.interface, "mac": self.mac, "ipv4": self.ipv4,
                "source": self.source}


@dataclass(frozen=True)
class Verdict:
    """One look at a guest's readiness, and what the record should remember of it."""

    ready: Readiness | None
    detail: str = ""  # what is still failing (starting), or why it is unready
    passed: tuple[str, ...] = ()
    scanned: int = 0
    ready_at: float | None = None
    changes: dict[str, Any] = field(default_factory=dict)  # record fields to persist


def _switch_dir(state: StateDir, switch: str) -> Path:
    return state.root / "switches" / switch


def lease_addresses(state: StateDir, record: Record) -> list[Address]:
    """The addresses local switches give this VM's MACs (static leases, then dnsmasq's)."""
    from reconciler.localnet import SwitchPaths, parse_leases

    found = []
    nics = record.spec.get("interfaces") or []
    for index, (nic, mac) in enumerate(zip(nics, record.macs, strict=False)):
        paths = SwitchPaths(_switch_dir(state, str(nic.get("switch", ""))))
        ip = read_json(paths.addresses).get(mac)
        if ip is None:
            with contextlib.suppress(OSError):
                ip = parse_leases(paths.leases.read_text()).get(mac, (None, 0))[0]
        if isinstance(ip, str):
            found.append(Address(f"eth{index}", mac, ip, "lease"))
    return found


async def agent_addresses(paths: VMPaths, record: Record, *,
                          timeout: float = AGENT_TIMEOUT) -> list[Address]:
    """The guest's own IPv4 addresses on our NICs, as its agent reports them."""
    try:
        interfaces = await qga.interfaces(paths.agent, timeout=timeout)
    except qga.AgentError as err:
        log.debug("vm '%s': no addresses from the agent: %s", record.name, err)
        return []
    ours = set(record.macs)
    return [Address(i.name, i.mac, ip, "agent")
            for i in interfaces if i.mac in ours for ip in i.ipv4]


async def addresses(state: StateDir, record: Record, *, agent: bool = True
                    ) -> list[Address]:
    """Every known IPv4 address of a VM: leases first, then what its agent says (the
    same address from both is listed twice: the agent confirms the guest has it)."""
    found = lease_addresses(state, record) if record.macs else []
    if agent and record.spec.get("agent"):
        found += await agent_addresses(state.paths(record.name), record)
    return found


def _scan(record: Record, paths: VMPaths, pattern: str) -> tuple[bool, int]:
    """Whether pattern shows in this boot's console output, and how far it was read."""
    start = max(record.serial_offset, record.console_scanned - SCAN_OVERLAP)
    try:
        with paths.serial_log.open("rb") as f:
            f.seek(start)
            chunk = f.read(SCAN_LIMIT)
    except OSError:
        return False, record.console_scanned
    text = chunk.decode(errors="replace")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = re.search(pattern, text, re.MULTILINE) is not None
    return found, start + len(chunk)


async def _tcp(host: str, port: int) -> str | None:
    """None when a TCP connect to host:port succeeds, else why not."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                           PROBE_TIMEOUT)
    except TimeoutError:
        return f"no answer within {PROBE_TIMEOUT:g}s"
    except OSError as err:
        return err.strerror or str(err)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def _probe(name: str, spec: dict[str, Any], record: Record, state: StateDir
                 ) -> str | None:
    """None when probe `name` passes now, else what it saw."""
    paths = state.paths(record.name)
    if name == "agent":
        try:
            await qga.ping(paths.agent, timeout=PROBE_TIMEOUT)
        except qga.AgentError as err:
            return f"agent: {err}"
        return None
    port = int(spec["tcp"])
    found = await addresses(state, record)
    if not found:
        return f"tcp {port}: no address known yet (no lease; no answer from the agent)"
    why = await _tcp(found[0].ipv4, port)
    return None if why is None else f"tcp {found[0].ipv4}:{port}: {why}"


async def assess(record: Record, state: StateDir, *, now: float) -> Verdict:
    """starting/ready/unready for a VM with `ready:`; what still fails, and the record's
    new probe state (persisted by the caller: `status` only looks)."""
    spec = record.spec.get("ready")
    if not spec:
        return Verdict(None)
    if record.ready_at is not None:
        return Verdict(Readiness.READY, ready_at=record.ready_at)
    passed = list(record.ready_passed)
    scanned = record.console_scanned
    failing: list[str] = []
    if spec.get("serial") and "serial" not in passed:
        found, scanned = await asyncio.to_thread(_scan, record, state.paths(record.name),
                                                 str(spec["serial"]))
        if found:
            passed.append("serial")
        else:
            failing.append(f"serial: no {spec['serial']!r} on the console yet")
    for name in ("tcp", "agent"):
        if spec.get(name) and name not in passed:
            why = await _probe(name, spec, record, state)
            if why is None:
                passed.append(name)
            else:
                failing.append(why)
    changes: dict[str, Any] = {}
    if tuple(passed) != tuple(record.ready_passed):
        changes["ready_passed"] = passed
    if scanned != record.console_scanned:
        changes["console_scanned"] = scanned
    if not failing:
        changes["ready_at"] = now
        return Verdict(Readiness.READY, passed=tuple(passed), scanned=scanned,
                       ready_at=now, changes=changes)
    if now > record.started_at + float(spec.get("timeout", 60)):
        detail = unready_message(failing, float(spec.get("timeout", 60)),
                                 console_tail(console_since(state.paths(record.name),
                                                           record.serial_offset, limit=8192))
                                 if spec.get("serial") else "")
        return Verdict(Readiness.UNREADY, detail, tuple(passed), scanned, changes=changes)
    return Verdict(Readiness.STARTING, "waiting for " + "; ".join(failing), tuple(passed),
                   scanned, changes=changes)


def unready_message(failing: list[str], timeout: float, tail: str) -> str:
    """What a VM whose probes did not pass in time is told (with its console, if used)."""
    message = f"not ready within {timeout:g}s: {'; '.join(failing)}"
    return f"{message}; console tail:\n{tail}" if tail else message

