"""Readiness probes and addresses, against files and sockets made by the test."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

from reconciler import probes
from reconciler.observed import Readiness, Record, StateDir

MAC = "52:54:00:aa:bb:01"


def make(tmp_path: Path, ready: dict[str, object], *, agent: bool = False,
         **fields: object) -> tuple[StateDir, Record]:
    state = StateDir(tmp_path / "state")
    spec = {"ready": ready, "agent": agent, "interfaces": [{"switch": "lan", "mac": None}]}
    record = Record(name="v", spec=spec, spec_hash="x", source="s", pid=1, start_time=1,
                    started_at=time.time(), accel="tcg", macs=[MAC], **fields)  # type: ignore[arg-type]
    state.paths("v").dir.mkdir(parents=True)
    return state, record


def lease(state: StateDir, ip: str) -> None:
    switch = state.switches_dir / "lan"
    switch.mkdir(parents=True)
    (switch / "addresses.json").write_text(json.dumps({MAC: ip}))


def test_the_console_is_scanned_from_where_the_last_pass_stopped(tmp_path: Path) -> None:
    state, record = make(tmp_path, {"serial": "up$", "timeout": 60})
    log = state.paths("v").serial_log
    log.write_bytes(b"booting\n" * 1000)
    first = asyncio.run(probes.assess(record, state, now=time.time()))
    assert first.ready is Readiness.STARTING and first.scanned == log.stat().st_size
    assert "serial: no 'up$' on the console yet" in first.detail
    with log.open("ab") as f:
        f.write(b"guest is up\n")
    record = Record(**{**record.__dict__, "console_scanned": first.scanned})
    second = asyncio.run(probes.assess(record, state, now=time.time()))
    assert second.ready is Readiness.READY and second.changes["ready_passed"] == ["serial"]


def test_a_flood_on_the_console_is_read_a_bounded_amount_per_pass(tmp_path: Path) -> None:
    state, record = make(tmp_path, {"serial": "never", "timeout": 60})
    state.paths("v").serial_log.write_bytes(b"x" * (3 * probes.SCAN_LIMIT))
    verdict = asyncio.run(probes.assess(record, state, now=time.time()))
    assert verdict.scanned == probes.SCAN_LIMIT


def test_tcp_passes_once_the_port_at_the_leased_address_answers(tmp_path: Path) -> None:
    state, record = make(tmp_path, {"tcp": 1, "timeout": 60})
    lease(state, "127.0.0.1")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    record = Record(**{**record.__dict__, "spec": {**record.spec, "ready": {"tcp": port}}})
    closed = asyncio.run(probes.assess(record, state, now=time.time()))
    assert closed.ready is Readiness.STARTING
    assert f"tcp 127.0.0.1:{port}: " in closed.detail
    listener.listen()
    try:
        opened = asyncio.run(probes.assess(record, state, now=time.time()))
    finally:
        listener.close()
    assert opened.ready is Readiness.READY and opened.ready_at is not None


def test_past_the_timeout_the_failing_probe_is_named(tmp_path: Path) -> None:
    state, record = make(tmp_path, {"tcp": 22, "agent": True, "timeout": 5}, agent=True)
    record = Record(**{**record.__dict__, "started_at": time.time() - 10})
    verdict = asyncio.run(probes.assess(record, state, now=time.time()))
    assert verdict.ready is Readiness.UNREADY
    assert verdict.detail.startswith("not ready within 5s: tcp 22: no address known yet")
    assert "agent: cannot connect" in verdict.detail


def test_a_guest_that_was_ready_stays_ready(tmp_path: Path) -> None:
    state, record = make(tmp_path, {"serial": "never", "timeout": 1}, ready_at=123.0)
    record = Record(**{**record.__dict__, "started_at": time.time() - 100})
    verdict = asyncio.run(probes.assess(record, state, now=time.time()))
    assert verdict.ready is Readiness.READY and verdict.changes == {}


def test_addresses_come_from_the_static_lease(tmp_path: Path) -> None:
    state, record = make(tmp_path, {"serial": "x"})
    lease(state, "100.64.9.7")
    found = asyncio.run(probes.addresses(state, record))
    assert [a.to_json() for a in found] == [
        {"interface": "eth0", "mac": MAC, "ipv4": "100.64.9.7", "source": "lease"}]
