"""Shared fixtures: the test guest, temp state dirs, and the `reconcile` command."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GUEST = REPO / "guest" / "out"
MARKER = "reconciler-guest: up"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}--- stderr\n{self.err}"


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    """`cli.main` sets umask 077 for the process; a test calling it in-process must
    not change the files of the tests after it."""
    mask = os.umask(0o022)
    os.umask(mask)
    yield
    os.umask(mask)


@pytest.fixture(scope="session")
def guest() -> Path:
    """The test guest built by guest/build.sh; its absence is a set-up error, not a skip."""
    for name in ("vmlinuz", "initrd.img"):
        if not (GUEST / name).is_file():
            pytest.fail(f"test guest missing: {GUEST / name}; run guest/build.sh (./setup.sh does)")
    return GUEST


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh state dir; every VM still alive in it is killed at teardown."""
    state = tmp_path / "state"
    yield state
    for record in state.glob("vms/*/record.json"):
        try:
            pid = int(json.loads(record.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a test broke it on purpose
        if pid <= 0:  # an intent record: os.kill(0) would hit pytest's own group
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    for switch in state.glob("switches/*/dnsmasq.json"):  # a local switch's DHCP
        try:
            os.kill(int(json.loads(switch.read_text())["pid"]), signal.SIGKILL)
        except (OSError, ValueError, KeyError, TypeError):
            continue


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of its own; what runs in it is killed at teardown."""
    name = f"rt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), 9)
    subprocess.run(["ip", "netns", "del", name], check=True)


def run_reconcile(state_dir: Path, *args: str | Path, env: dict[str, str] | None = None,
                  check: int | None = None) -> Run:
    """The real command line in a subprocess, on state_dir; `env` adds variables."""
    full = {k: v for k, v in os.environ.items() if k != "RECONCILER_FAULT"}
    full.update(env or {}, RECONCILER_STATE_DIR=str(state_dir))
    proc = subprocess.run([sys.executable, "-m", "reconciler", *map(str, args)],
                          capture_output=True, text=True, env=full, timeout=300)
    result = Run(proc.returncode, proc.stdout, proc.stderr)
    if check is not None:
        assert result.code == check, str(result)
    return result


@pytest.fixture
def reconcile(state_dir: Path) -> Callable[..., Run]:
    """Run the real command line in a subprocess, against the test's state dir."""

    def run(*args: str | Path, check: int | None = None) -> Run:
        return run_reconcile(state_dir, *args, check=check)

    return run


def vm_manifest(name: str, guest: Path, **fields: str) -> str:
    """One VM document on the test guest (fields override the 96M default memory)."""
    lines = [f"name: {name}"]
    lines += [f"{k}: {v}" for k, v in {"memory": "96M", **fields}.items()]
    lines += [
        "boot:",
        f"  kernel: {guest / 'vmlinuz'}",
        f"  initrd: {guest / 'initrd.img'}",
        "  cmdline: console=ttyS0 quiet",
    ]
    return "\n".join(lines) + "\n"


def deaf_manifest(name: str, guest: Path, **fields: str) -> str:
    """A VM whose guest ignores its power button: rdinit=/bin/sh, a bare shell as init,
    so no acpid listens (its prompt on the console says it is up)."""
    return vm_manifest(name, guest, **fields).replace(
        "console=ttyS0 quiet", "console=ttyS0 quiet rdinit=/bin/sh")


DEAF_PROMPT = "~ #|/ #"


def record(state_dir: Path, name: str) -> dict[str, object]:
    return json.loads((state_dir / "vms" / name / "record.json").read_text())  # type: ignore[no-any-return]


def pid_of(state_dir: Path, name: str) -> int:
    return int(record(state_dir, name)["pid"])  # type: ignore[call-overload]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_for(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def serial(state_dir: Path, name: str) -> str:
    path = state_dir / "vms" / name / "serial.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for_serial(state_dir: Path, name: str, pattern: str = MARKER, *,
                    count: int = 1, timeout: float = 90) -> None:
    wait_for(lambda: len(re.findall(pattern, serial(state_dir, name))) >= count,
             timeout=timeout, what=f"{pattern!r} x{count} on vm {name}'s console")


def status_rows(state_dir: Path) -> dict[str, dict[str, object]]:
    """`reconcile status --json`, managed VMs by name."""
    env = dict(os.environ, RECONCILER_STATE_DIR=str(state_dir))
    out = subprocess.run([sys.executable, "-m", "reconciler", "status", "--json"],
                         capture_output=True, text=True, env=env, timeout=60).stdout
    return {row["name"]: row for row in json.loads(out) if row["managed"]}


def type_on_console(state_dir: Path, name: str, text: str) -> None:
    """Type a line on a VM's serial console (its busybox shell reads it)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(state_dir / "vms" / name / "serial.sock"))
        sock.sendall(text.encode())
        time.sleep(0.2)


class Daemon:
    """`reconcile DIR` running in the background, as a host would run it."""

    def __init__(self, manifests: Path, state_dir: Path, log: Path, *args: str) -> None:
        env = dict(os.environ, RECONCILER_STATE_DIR=str(state_dir))
        self.log = log
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", str(manifests), *args],
            stdout=self._out, stderr=subprocess.STDOUT, env=env)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        code = self.proc.wait(timeout=60)
        self._out.close()
        return code


@pytest.fixture
def daemon(state_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons on a manifest dir; each is stopped (SIGTERM) at teardown."""
    started: list[Daemon] = []

    def start(manifests: Path, *args: str) -> Daemon:
        d = Daemon(manifests, state_dir, tmp_path / "daemon.log", *args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
