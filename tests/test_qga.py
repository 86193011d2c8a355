"""The guest agent client against a fake agent that misbehaves as a guest may, and
against a real QEMU whose guest runs no agent at all."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler import qga


class FakeAgent:
    """qemu-guest-agent's protocol on a unix socket, with ways to misbehave."""

    def __init__(self, path: Path, *, mode: str = "ok") -> None:
        self.path, self.mode = path, mode
        self.connections = 0
        self.most = 0
        self.commands: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.most = max(self.most, self.connections)
        try:
            while line := await reader.readline():
                request = json.loads(line.strip(b"\xff \n"))
                command = request["execute"]
                self.commands.append(command)
                if self.mode == "silent":
                    continue
                if command == "guest-sync-delimited":
                    if self.mode == "huge-after-delimiter":
                        writer.write(b"\xff" + b"x" * (2 << 20) + b"\n")
                        await writer.drain()
                        continue
                    if self.mode == "stale":
                        writer.write(b'{"return": 7}\n\xffgarbage{"return": 1}\n')
                    writer.write(b"\xff" + json.dumps(
                        {"return": request["arguments"]["id"]}).encode() + b"\n")
                elif self.mode == "bad-json":
                    writer.write(b"{not json\n")
                elif self.mode == "huge":
                    writer.write(b"x" * (2 << 20) + b"\n")
                elif self.mode == "deep":
                    writer.write(b"[" * 100_000 + b"]" * 100_000 + b"\n")
                elif self.mode == "error":
                    writer.write(b'{"error": {"class": "GenericError", "desc": "nope"}}\n')
                elif command == "guest-shutdown":
                    break  # no answer: the guest goes down
                elif command == "guest-network-get-interfaces":
                    await asyncio.sleep(0.05)  # long enough for a second caller to queue
                    writer.write(json.dumps({"return": [
                        {"name": "lo", "hardware-address": "00:00:00:00:00:00",
                         "ip-addresses": [{"ip-address-type": "ipv4", "ip-address": "127.0.0.1",
                                           "prefix": 8}]},
                        {"name": "eth0", "hardware-address": "52:54:00:AA:00:01",
                         "ip-addresses": [
                             {"ip-address-type": "ipv4", "ip-address": "10.0.0.5", "prefix": 24},
                             {"ip-address-type": "ipv6", "ip-address": "fe80::1", "prefix": 64}]},
                    ]}).encode() + b"\n")
                else:
                    writer.write(b'{"return": {}}\n')
                await writer.drain()
        finally:
            self.connections -= 1
            writer.close()


def run(agent: FakeAgent, body: Callable[[], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        server = await asyncio.start_unix_server(agent.handle, path=str(agent.path))
        try:
            return await body()
        finally:
            server.close()

    return asyncio.run(main())


def test_ping_syncs_first_and_answers(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path / "qga.sock")
    run(agent, lambda: qga.ping(agent.path))
    assert agent.commands == ["guest-sync-delimited", "guest-ping"]


def test_stale_answers_before_the_delimiter_are_skipped(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path / "qga.sock", mode="stale")
    found = run(agent, lambda: qga.call(agent.path, "guest-info"))
    assert found == {}


def test_an_agent_that_never_answers_is_unavailable_within_the_timeout(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path / "qga.sock", mode="silent")
    began = time.monotonic()
    with pytest.raises(qga.AgentUnavailable, match=r"within 0\.5s"):
        run(agent, lambda: qga.ping(agent.path, timeout=0.5))
    assert time.monotonic() - began < 2.5


def test_a_missing_socket_is_unavailable_at_once(tmp_path: Path) -> None:
    with pytest.raises(qga.AgentUnavailable, match="cannot connect"):
        asyncio.run(qga.ping(tmp_path / "none.sock"))


@pytest.mark.parametrize(("mode", "error", "match"), [
    ("error", qga.AgentCommandError, "GenericError: nope"),
    ("bad-json", qga.AgentError, "malformed JSON"),
    ("huge", qga.AgentError, "over"),
    ("deep", qga.AgentError, "malformed JSON"),
    ("huge-after-delimiter", qga.AgentError, "over"),
])
def test_a_misbehaving_guest_gives_an_agent_error_and_nothing_else(
    tmp_path: Path, mode: str, error: type[Exception], match: str,
) -> None:
    agent = FakeAgent(tmp_path / "qga.sock", mode=mode)
    with pytest.raises(error, match=match):
        run(agent, lambda: qga.ping(agent.path))


def test_interfaces_are_the_guests_ipv4_addresses_by_mac_without_loopback(
    tmp_path: Path,
) -> None:
    agent = FakeAgent(tmp_path / "qga.sock")
    found = run(agent, lambda: qga.interfaces(agent.path))
    assert found == [qga.GuestInterface("eth0", "52:54:00:aa:00:01", ("10.0.0.5",))]


def test_shutdown_takes_no_answer_as_success_and_an_error_as_failure(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path / "qga.sock")
    run(agent, lambda: qga.shutdown(agent.path))
    assert agent.commands[-1] == "guest-shutdown"
    failing = FakeAgent(tmp_path / "qga2.sock", mode="error")
    with pytest.raises(qga.AgentCommandError):
        run(failing, lambda: qga.shutdown(failing.path))


def test_sessions_on_one_socket_take_turns(tmp_path: Path) -> None:
    agent = FakeAgent(tmp_path / "qga.sock")

    async def both() -> None:
        await asyncio.gather(*(qga.interfaces(agent.path) for _ in range(3)))

    run(agent, both)
    assert agent.most == 1 and agent.commands.count("guest-network-get-interfaces") == 3


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU")
def test_a_real_qemu_without_an_agent_in_its_guest_is_unavailable(tmp_path: Path) -> None:
    sock = tmp_path / "qga.sock"
    proc = subprocess.Popen([
        "qemu-system-x86_64", "-nodefaults", "-display", "none", "-machine", "pc",
        "-accel", "tcg", "-m", "64", "-S",
        "-chardev", f"socket,id=qga0,path={sock},server=on,wait=off",
        "-device", "virtio-serial-pci", "-device",
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"])
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        began = time.monotonic()
        with pytest.raises(qga.AgentUnavailable):
            asyncio.run(qga.ping(sock, timeout=1.0))
        assert time.monotonic() - began < 3
    finally:
        proc.kill()
        proc.wait()
        os.path.exists(sock)
