"""Observed state: the VMs this reconciler manages, as its state dir, /proc and QMP see them.

Second stage of desired -> observed -> plan -> apply. Collecting (reading records,
/proc and asking QMP) is split from interpreting (pure functions on what was read),
so the interpretation is tested with recorded inputs.

The state dir holds one directory per VM: `record.json` (the spec it was started
with and its hash, the source manifest, pid and process start time), the QMP
socket, the serial console socket and its log, and QEMU's own output. Writes are
atomic (temp file + rename); one reconciler at a time holds the dir's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

# sockaddr_un.sun_path is 108 bytes including the NUL.
MAX_SOCKET_PATH = 107


class StateDirError(Exception):
    """The state dir cannot be used (in use, unwritable, path too long)."""


class Status(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"


def default_state_dir() -> Path:
    if env := os.environ.get("RECONCILER_STATE_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/reconciler")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "reconciler"


@dataclass(frozen=True)
class Record:
    """What the state dir remembers of one started VM."""

    name: str
    spec: dict[str, Any]
    spec_hash: str
    source: str
    pid: int
    start_time: int
    started_at: float
    accel: str
    argv: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Record:
        data = json.loads(text)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass(frozen=True)
class VMPaths:
    """The files of one VM in the state dir."""

    dir: Path

    @property
    def record(self) -> Path:
        return self.dir / "record.json"

    @property
    def qmp(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def serial(self) -> Path:
        return self.dir / "serial.sock"

    @property
    def serial_log(self) -> Path:
        return self.dir / "serial.log"

    @property
    def qemu_log(self) -> Path:
        return self.dir / "qemu.log"


class StateDir:
    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.vms_dir = self.root / "vms"
        if len(str(self.paths("x").serial)) > MAX_SOCKET_PATH:
            raise StateDirError(
                f"state dir {self.root} is too long for the unix sockets of its VMs; "
                "choose a shorter --state-dir"
            )

    def paths(self, name: str) -> VMPaths:
        return VMPaths(self.vms_dir / name)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state dir's lock: one reconciler at a time."""
        try:
            self.vms_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StateDirError(f"cannot use state dir {self.root}: {err.strerror}") from err
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise StateDirError(
                    f"state dir {self.root} is in use by another reconciler (pid {holder})"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    def records(self) -> tuple[dict[str, Record], list[str]]:
        """Every VM record, and a message for each record that cannot be read."""
        found: dict[str, Record] = {}
        problems: list[str] = []
        if not self.vms_dir.is_dir():
            return found, problems
        for entry in sorted(self.vms_dir.iterdir()):
            path = VMPaths(entry).record
            try:
                found[entry.name] = Record.from_json(path.read_text())
            except FileNotFoundError:
                continue
            except (OSError, ValueError, TypeError, KeyError) as err:
                problems.append(f"{path}: unreadable record, VM left alone: {err}")
        return found, problems

    def write(self, record: Record) -> None:
        paths = self.paths(record.name)
        paths.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(paths.record, record.to_json())

    def forget(self, name: str) -> None:
        """Drop a VM's record and runtime files (never a disk: none live here)."""
        shutil.rmtree(self.paths(name).dir, ignore_errors=True)


def atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --- liveness -------------------------------------------------------------

def parse_proc_stat(text: str) -> tuple[str, int]:
    """(state letter, start time in clock ticks) from /proc/PID/stat (pure)."""
    # comm may hold spaces and parentheses: fields resume after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def process_start_time(pid: int) -> int | None:
    """The start time of a live (non-zombie) process, None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, start = parse_proc_stat(text)
    return None if state in ("Z", "X") else start


def is_alive(record: Record) -> bool:
    """Alive and the same process: a reused pid has another start time."""
    return process_start_time(record.pid) == record.start_time


# --- interpretation -------------------------------------------------------

def status_from_qmp(qmp_status: str) -> Status:
    """QMP `query-status` -> our status (pure). Not running means paused."""
    return Status.RUNNING if qmp_status == "running" else Status.PAUSED


@dataclass(frozen=True)
class ObservedVM:
    name: str
    status: Status
    record: Record
    detail: str = ""


QueryStatus = Callable[[VMPaths], Awaitable[str]]


async def observe(state: StateDir, query_status: QueryStatus) -> tuple[
    dict[str, ObservedVM], list[str]
]:
    """Every managed VM with its status; problems are reported, not raised."""
    records, problems = state.records()

    async def one(record: Record) -> ObservedVM:
        if not is_alive(record):
            return ObservedVM(record.name, Status.EXITED, record, "process is gone")
        try:
            qmp_status = await query_status(state.paths(record.name))
        except Exception as err:  # a live VM whose QMP fails is still there
            return ObservedVM(record.name, Status.RUNNING, record, f"QMP not answering: {err}")
        usual = qmp_status in ("running", "paused", "prelaunch")
        detail = "" if usual else f"QMP status {qmp_status}"
        return ObservedVM(record.name, status_from_qmp(qmp_status), record, detail)

    seen = await asyncio.gather(*(one(r) for r in records.values()))
    return {vm.name: vm for vm in seen}, problems
