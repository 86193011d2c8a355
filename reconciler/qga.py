"""The QEMU guest agent (qemu-guest-agent in the guest), over QEMU's unix socket.

Observe and apply stages: `probes` asks it for guest-ping (readiness) and the guest's
addresses; `kvm` asks it first to shut the guest down. QEMU serves the virtio-serial
port `org.qemu.guest_agent.0` on `qga.sock` in the VM's state dir.

The protocol has no greeting and the agent may hold half a command or a stale answer
from an abandoned session, so each session starts with a 0xFF byte (the agent's
parser drops what it had) and `guest-sync-delimited` with a random id: the answer
comes after a 0xFF byte, and answers before it are skipped. A guest without a
running agent still has its socket accepted by QEMU and never answers, so every
call is bounded by a timeout. QEMU serves one client at a time: sessions are short
and, within this process, one at a time per socket. The guest is untrusted: lines
are bounded and malformed JSON is an error like any other.

Exceptions::

    AgentError
     ├── AgentUnavailable   no socket, refused, or no answer in time
     └── AgentCommandError  the agent answered with an error
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("reconciler.qga")

MAX_LINE = 1 << 20
DELIMITER = b"\xff"
SHUTDOWN_SETTLE = 0.5  # an error reply to guest-shutdown comes within this, or none

# One session at a time per socket, per event loop (a lock belongs to one loop).
_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = \
    weakref.WeakKeyDictionary()


class AgentError(Exception):
    """The guest agent did not do what was asked."""


class AgentUnavailable(AgentError):
    pass


class AgentCommandError(AgentError):
    pass


@dataclass(frozen=True)
class GuestInterface:
    name: str
    mac: str
    ipv4: tuple[str, ...]


def _lock(socket: Path) -> asyncio.Lock:
    locks = _locks.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault(str(socket), asyncio.Lock())


async def _read_json(reader: asyncio.StreamReader) -> Any:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError as err:
        raise AgentError(f"the agent sent a line over {MAX_LINE} bytes") from err
    except asyncio.IncompleteReadError as err:
        raise AgentUnavailable("the agent's channel closed") from err
    try:
        return json.loads(line.strip(DELIMITER + b" \r\n").decode(errors="replace") or "null")
    except (ValueError, RecursionError) as err:  # [[[[... from a hostile guest
        raise AgentError(f"the agent sent malformed JSON: {line[:80]!r}") from err


async def _sync(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    token = random.randrange(1, 2**31)
    writer.write(DELIMITER + json.dumps({"execute": "guest-sync-delimited",
                                         "arguments": {"id": token}}).encode() + b"\n")
    await writer.drain()
    while True:  # everything before the delimiter is a stale answer
        try:
            await reader.readuntil(DELIMITER)
        except asyncio.LimitOverrunError as err:
            await reader.readexactly(err.consumed)  # discard, then wait for more
            continue
        except asyncio.IncompleteReadError as err:
            raise AgentUnavailable("the agent's channel closed") from err
        break
    while True:  # until our token; anything else (stale, garbled) is skipped
        try:
            answer = await _read_json(reader)
        except AgentUnavailable:
            raise
        except AgentError as err:
            if isinstance(err.__cause__, asyncio.LimitOverrunError):
                raise  # the line stays in the buffer: retrying would spin, never await
            continue
        if isinstance(answer, dict) and answer.get("return") == token:
            return


async def _session(socket: Path, command: str, arguments: Mapping[str, Any] | None, *,
                   expect_reply: bool) -> Any:
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket), limit=MAX_LINE)
    except OSError as err:
        raise AgentUnavailable(f"cannot connect to {socket}: {err.strerror or err}") from err
    try:
        await _sync(reader, writer)
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        if not expect_reply:
            with contextlib.suppress(TimeoutError, AgentUnavailable):
                answer = await asyncio.wait_for(_read_json(reader), SHUTDOWN_SETTLE)
                _check(command, answer)
            return None
        answer = await _read_json(reader)
        return _check(command, answer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _check(command: str, answer: Any) -> Any:
    if not isinstance(answer, dict):
        raise AgentError(f"{command}: unexpected answer {str(answer)[:80]}")
    if "error" in answer:
        error = answer["error"] if isinstance(answer["error"], dict) else {}
        raise AgentCommandError(f"{command}: {error.get('class', 'Error')}: "
                                f"{error.get('desc', answer['error'])}")
    return answer.get("return")


async def call(socket: Path, command: str, arguments: Mapping[str, Any] | None = None, *,
               timeout: float = 3.0, expect_reply: bool = True) -> Any:
    """One command in a session of its own, all of it within timeout seconds."""
    try:
        async with asyncio.timeout(timeout):
            async with _lock(socket):
                return await _session(socket, command, arguments, expect_reply=expect_reply)
    except TimeoutError:
        raise AgentUnavailable(f"no answer from the guest agent within {timeout:g}s "
                               "(is qemu-guest-agent running in the guest?)") from None
    except OSError as err:
        raise AgentUnavailable(f"guest agent channel: {err}") from err


async def ping(socket: Path, *, timeout: float = 3.0) -> None:
    await call(socket, "guest-ping", timeout=timeout)


async def interfaces(socket: Path, *, timeout: float = 3.0) -> list[GuestInterface]:
    """The guest's interfaces with their IPv4 addresses (loopback left out)."""
    found = await call(socket, "guest-network-get-interfaces", timeout=timeout)
    result = []
    for item in found if isinstance(found, list) else []:
        if not isinstance(item, dict):
            continue
        mac = str(item.get("hardware-address", "")).lower()
        if not mac or mac == "00:00:00:00:00:00":
            continue
        addresses = item.get("ip-addresses")
        ipv4 = tuple(str(a.get("ip-address")) for a in addresses
                     if isinstance(a, dict) and a.get("ip-address-type") == "ipv4") \
            if isinstance(addresses, list) else ()
        result.append(GuestInterface(str(item.get("name", "")), mac, ipv4))
    return result


async def shutdown(socket: Path, *, mode: str = "powerdown", timeout: float = 3.0) -> None:
    """guest-shutdown: no answer on success (the guest goes down); an error raises."""
    await call(socket, "guest-shutdown", {"mode": mode}, timeout=timeout,
               expect_reply=False)
