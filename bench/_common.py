"""Helpers shared by the benchmark scripts in bench/ (stdlib only).

Not a benchmark itself: the scripts next to it import it (they put bench/ on
sys.path by being run as scripts from it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = REPO / "guest" / "out"
KERNEL = GUEST_DIR / "vmlinuz"
INITRD = GUEST_DIR / "initrd.img"

# Printed by the test guest's /init on ttyS0 once user space is reached.
MARKER = re.compile(rb"reconciler-guest: up uptime=([0-9]+(?:\.[0-9]+)?)\r?\n")

# How often log files are polled. It bounds the resolution of every
# "time to marker" figure: a marker is seen up to one interval (plus the cost
# of one read) after QEMU wrote it.
POLL_INTERVAL = 0.002


class BenchError(Exception):
    """Something went wrong that makes the figures meaningless: exit 1."""


def reconcile_cmd() -> list[str]:
    """The `reconcile` console script next to this interpreter, else main() via -c.

    Next to sys.executable (not via PATH) so that a pyenv shim or another
    install on PATH is not what gets measured; works in a .venv too.
    """
    script = Path(sys.executable).parent / "reconcile"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from reconciler.cli import main; main()"]


def stage_guest(root: Path, source: Path = GUEST_DIR) -> Path:
    """Copy the test guest into root/guest/out; returns that dir.

    A private copy: a concurrent `guest/build.sh --force` (or a clean checkout)
    cannot pull the kernel from under a running benchmark.
    """
    files = [source / KERNEL.name, source / INITRD.name]
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise BenchError(
            f"test guest not built ({', '.join(map(str, missing))} missing); run guest/build.sh")
    out = root / "guest" / "out"
    out.mkdir(parents=True)
    for path in files:
        shutil.copyfile(path, out / path.name)
    return out


def vm_manifest(name: str, guest: Path, *, memory: str, stop_timeout: str = "5s") -> str:
    """A one-VM manifest on the test guest in dir `guest`, with absolute paths."""
    return (
        f"name: {name}\n"
        f"memory: {memory}\n"
        "vcpus: 1\n"
        f"stop_timeout: {stop_timeout}\n"
        "boot:\n"
        f"  kernel: {guest / KERNEL.name}\n"
        f"  initrd: {guest / INITRD.name}\n"
        "  cmdline: console=ttyS0 quiet\n"
    )


class LogWatcher:
    """Incrementally reads a (possibly not yet existing) log file, looking for MARKER."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self.data = b""

    def poll(self) -> re.Match[bytes] | None:
        if self._file is None:
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 (closed in close())
            except FileNotFoundError:
                return None
        chunk = self._file.read()
        if chunk:
            self.data += chunk
            return MARKER.search(self.data)
        return None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def wait_for_marker(
    watcher: LogWatcher, t0: float, *, timeout: float,
    check: Callable[[], None] | None = None, check_every: float = 0.05,
) -> tuple[float, float]:
    """Poll until the marker shows up: (seconds since t0, guest uptime in seconds).

    `check` is called every `check_every` seconds and raises BenchError when
    the thing being waited for can no longer produce the marker.
    """
    next_check = t0 + check_every
    while True:
        match = watcher.poll()
        now = time.perf_counter()
        if match:
            return now - t0, float(match[1])
        if now - t0 > timeout:
            tail = watcher.data.decode(errors="replace").strip().splitlines()[-5:]
            raise BenchError(f"no marker in {watcher.path} after {timeout:.0f}s"
                             + (":\n  " + "\n  ".join(tail) if tail else " (log empty)"))
        if check is not None and now >= next_check:
            check()
            next_check = now + check_every
        time.sleep(POLL_INTERVAL)


def exit_on_signals() -> None:
    """SIGTERM/SIGHUP (and SIGINT, even if inherited as ignored) unwind through
    `finally`, so the VMs a script started are cleaned up."""
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def read_record(path: Path) -> dict[str, Any] | None:
    """A VM's record.json as a dict; None while it does not exist (yet).

    The reconciler writes records atomically (temp file + rename), so a read
    never sees half a file.
    """
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None


def file_tail(path: Path, lines: int = 8) -> str:
    """The last lines of a log file, indented for an error message ('' if none)."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return "\n  ".join(text.splitlines()[-lines:])


# --- processes ------------------------------------------------------------

def proc_alive(pid: int) -> bool:
    """True for a live, non-zombie process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return text[text.rindex(")") + 2:].split()[0] not in ("Z", "X")


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def kill_qemu(pid: int, must_contain: str, *, timeout: float = 10.0) -> bool:
    """SIGKILL pid if it is a QEMU whose command line mentions must_contain.

    must_contain (a path inside one of our temp dirs) guards against a reused
    pid: only our own VMs are ever signalled. Waits until the process is gone
    (or a zombie: it is not our child, its new parent reaps it). True if killed.
    """
    if not proc_alive(pid):
        return False
    cmd = proc_cmdline(pid)
    if "qemu-system" not in cmd or must_contain not in cmd:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while proc_alive(pid):
        if time.monotonic() > deadline:
            raise BenchError(f"QEMU pid {pid} survived SIGKILL for {timeout:.0f}s")
        time.sleep(0.01)
    return True


def our_qemus(must_contain: str) -> list[int]:
    """Live QEMU processes whose command line mentions must_contain (our temp root)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and proc_alive(int(entry.name)):
            cmd = proc_cmdline(int(entry.name))
            if "qemu-system" in cmd and must_contain in cmd:
                found.append(int(entry.name))
    return found


def run(cmd: Sequence[str], *, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, check=False)


# --- reporting ------------------------------------------------------------

def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: int = 1) -> str:
    """A plain text table; columns from index `right` on are right-aligned."""
    cells = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        parts = [c.rjust(w) if i >= right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def verdict(value_ms: float, goal_ms: float) -> str:
    return "OK" if value_ms < goal_ms else "MISSED"
