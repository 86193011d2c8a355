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

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import re
import signal
import stat
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from reconciler.statepath import StateDirError as StateDirError
from reconciler.statepath import cache_dir, state_root
from reconciler.statepath import default_state_dir as default_state_dir

# sockaddr_un.sun_path is 108 bytes including the NUL.
MAX_SOCKET_PATH = 107


class Status(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    EXITED = "exited"
    SAVED = "saved"  # no process; its state waits in a file to be restored


class ExitReason(StrEnum):
    """Why a VM's QEMU process ended (vmd's SIGCHLD path)."""

    REBOOT = "reboot"  # guest reset: with -no-reboot, QEMU exits
    POWEROFF = "poweroff"  # the guest powered itself off
    PANIC = "panic"  # guest kernel panic, seen through pvpanic
    KILLED = "killed"  # a signal from the host
    CRASHED = "crashed"  # QEMU itself failed
    QUIT = "quit"  # a QMP quit nobody here asked for

    @property
    def failure(self) -> bool:
        return self not in (ExitReason.REBOOT, ExitReason.POWEROFF)


@dataclass(frozen=True)
class Exit:
    reason: ExitReason
    detail: str
    at: float
    requested: bool = False  # this reconciler asked for it (terminate, save)


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
    serial_offset: int = 0  # serial.log size at start: this boot's output follows
    restarts: int = 0  # automatic restarts after exits (reboots not counted)
    reboots: int = 0
    backoff: int = 0  # automatic restarts in a row without 10 min of running
    stopping: bool = False  # a stop was asked for (vmd's VM_STATE_SHUTDOWN)
    exit: Exit | None = None
    saved: str | None = None  # the file its state was saved to, until a restore loads it
    saved_pid: int = 0  # the process that saved it (the restoring one has another pid)
    taps: list[str] = field(default_factory=list)  # its tap devices, removed when it ends
    qmp_silent_since: float | None = None  # QMP stopped answering then (None: it answers)
    qmp_failures: int = 0  # passes in a row in which QMP did not answer
    macs: list[str] = field(default_factory=list)  # each interface's guest MAC, in order
    ready_at: float | None = None  # when `ready` first passed (kept across save/restore)
    ready_passed: list[str] = field(default_factory=list)  # probes passed so far
    console_scanned: int = 0  # serial.log offset up to which `ready.serial` was sought
    limits: dict[str, str] | None = None  # `resources:`: applied or pending (cgroups)

    @property
    def intent(self) -> bool:
        """Written before the spawn: no pid yet (a QEMU may exist: see find_qemu)."""
        return self.pid <= 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Record:
        """A record as written by to_json; every field's type is checked.

        A record as to_json wrote it (every value already of its field's type) is
        built directly; anything else goes to pydantic, which converts what it can and
        says what is wrong, as it always did (and a pass that reads only our own
        records does not import it)."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):  # pydantic says why (nested too deep)
            data = None
        found = _exact(cls, data) if _tame(data) else None
        if isinstance(found, Record):
            return found
        record: Record = _record_adapter().validate_json(text)
        return record


@functools.cache
def _record_adapter() -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(Record)


# Record's (and Exit's) annotations -> the exact JSON values that are that type.
_EXACT: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: type(v) is str,
    "int": lambda v: type(v) is int,
    "float": lambda v: type(v) is float,
    "bool": lambda v: type(v) is bool,
    "list[str]": lambda v: type(v) is list and all(type(x) is str for x in v),
    "dict[str, Any]": lambda v: type(v) is dict,
    "dict[str, str]": lambda v: type(v) is dict and all(type(x) is str for x in v.values()),
}


def _tame(value: Any, depth: int = 0) -> bool:
    """JSON nested no deeper than 100 (pydantic's parser stops at 200) whose strings
    are all valid UTF-8 (pydantic refuses a lone surrogate): what the fast path takes;
    anything else is left to pydantic."""
    if isinstance(value, str):
        return value.isascii() or _utf8(value)
    if depth > 100:
        return False
    if isinstance(value, dict):
        return all(_tame(k, depth + 1) and _tame(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_tame(v, depth + 1) for v in value)
    return True


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _exact(kind: type[Any], data: Any) -> Any:
    """kind (Record, Exit) built from JSON data whose every value is exactly of its
    field's type, with no field unknown or missing without a default; None when not
    so (pydantic then decides). Only annotations it knows: any other is None too."""
    if type(data) is not dict:
        return None
    fields = {f.name: f for f in dataclasses.fields(kind)}
    if not data.keys() <= fields.keys():
        return None
    values: dict[str, Any] = {}
    for name, value in data.items():
        annotation = str(fields[name].type)
        if value is None and annotation.endswith(" | None"):
            values[name] = None
            continue
        annotation = annotation.removesuffix(" | None")
        if annotation == "Exit":
            value = _exact(Exit, value)
        elif annotation == "ExitReason":
            value = ExitReason(value) if type(value) is str and value in _REASONS else None
        elif not _EXACT.get(annotation, lambda v: False)(value):
            return None
        if value is None:
            return None
        values[name] = value
    missing = [f for f in fields.values() if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    return None if missing else kind(**values)


_REASONS = frozenset(r.value for r in ExitReason)


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

    @property
    def pidfile(self) -> Path:
        """Written only by a QEMU started before privilege separation (-pidfile)."""
        return self.dir / "qemu.pid"

    @property
    def saved_state(self) -> Path:
        return self.dir / "saved.state"

    @property
    def agent(self) -> Path:
        """The guest agent's channel (virtio-serial org.qemu.guest_agent.0)."""
        return self.dir / "qga.sock"

    @property
    def seed(self) -> Path:
        """The cloud-init NoCloud seed (ISO 9660, volume cidata): secrets inside, 0600."""
        return self.dir / "seed.iso"

    @property
    def host_key(self) -> Path:
        """The guest's SSH host key (ed25519), generated here and pinned in known_hosts."""
        return self.dir / "ssh_host_ed25519_key"

    @property
    def host_key_public(self) -> Path:
        return self.host_key.with_suffix(".pub")

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    def runtime_files(self) -> list[Path]:
        """What `forget` removes: the record and what QEMU made, never anything else."""
        return [self.record, self.qmp, self.serial, self.serial_log, self.qemu_log,
                self.pidfile, self.dir / ".saved.state.partial",
                self.agent, self.seed, self.seed.with_suffix(".sha256"), self.host_key,
                self.host_key_public, self.known_hosts]


class StateDir:
    def __init__(self, root: Path) -> None:
        self.root = state_root(root)
        self.vms_dir = self.root / "vms"
        self.switches_dir = self.root / "switches"  # local switches: dnsmasq, leases
        self.cache_dir = cache_dir(self.root)
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
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)  # an existing dir
            self.vms_dir.mkdir(exist_ok=True, mode=0o700)  # (/tmp, ~) keeps its mode
            # Each VM's directory is closed to all but its group (privsep): owners may
            # reach theirs and list the names (as `ps` shows them anyway).
            os.chmod(self.vms_dir, 0o755 if os.geteuid() == 0 else 0o700)
            _let_owners_through(self.root)
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
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

    def records(self) -> tuple[dict[str, Record], dict[str, str]]:
        """Every VM record, and (by VM name) why each unreadable one cannot be read.

        A VM with an unreadable record is left alone: neither started (it may be
        running) nor pruned.
        """
        found: dict[str, Record] = {}
        problems: dict[str, str] = {}
        if not self.vms_dir.is_dir():
            return found, problems
        for entry in sorted(self.vms_dir.iterdir()):
            if entry.name.startswith(".") or not entry.is_dir():
                continue  # not a VM's directory (.DS_Store, an editor's backup, ...)
            path = VMPaths(entry).record
            try:
                found[entry.name] = Record.from_json(path.read_text())
            except (FileNotFoundError, PermissionError):
                continue  # none, or another owner's VM (a user's `status` shows their own)
            except (OSError, ValueError) as err:
                reason = _why_unreadable(err)
                problems[entry.name] = (f"{path}: unreadable record ({reason}); vm "
                                        f"'{entry.name}' is left alone until it is fixed "
                                        "or removed")
        return found, problems

    def write(self, record: Record) -> None:
        paths = self.paths(record.name)
        paths.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The VM's group (privsep.prepare_dir: its owner's) may read its record.
        group = paths.dir.stat().st_gid
        atomic_write(paths.record, record.to_json(),
                     group=group if group != os.getegid() else None)

    @property
    def _bridges_file(self) -> Path:
        return self.root / "bridges.json"

    def created_bridges(self) -> set[str]:
        """Bridges this reconciler created: the only ones it may remove."""
        try:
            return set(json.loads(self._bridges_file.read_text()))
        except (OSError, ValueError):
            return set()

    def set_created_bridges(self, bridges: set[str]) -> None:
        atomic_write(self._bridges_file, json.dumps(sorted(bridges)) + "\n")

    def update(self, name: str, pid: int, **changes: Any) -> Record | None:
        """Change the record of process pid as it is on disk now, not a stale copy.

        None (and nothing written) when the record is gone or is another process's.
        """
        try:
            current = Record.from_json(self.paths(name).record.read_text())
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if current.pid != pid:
            return None
        new = replace(current, **changes)
        self.write(new)
        return new

    def forget(self, name: str) -> Path | None:
        """Drop a VM's record and runtime files, and nothing else (never a disk).

        A saved state is not deleted: it moves to `orphaned/`, and its new path is
        returned, so a renamed or mistyped VM loses nothing. A VM whose QEMU still
        runs is not forgotten.
        """
        paths = self.paths(name)
        if (found := find_qemu(paths)) is not None:
            raise StateDirError(f"vm '{name}': QEMU pid {found[0]} still runs; not forgotten")
        kept = None
        if paths.saved_state.exists():
            orphans = self.root / "orphaned"
            orphans.mkdir(exist_ok=True, mode=0o700)
            kept = orphans / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.state"
            os.replace(paths.saved_state, kept)
        for leftover in [*paths.runtime_files(), *paths.dir.glob(".record.json.*")]:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        with contextlib.suppress(OSError):  # only if nothing else is in it
            paths.dir.rmdir()
        return kept


def _let_owners_through(root: Path) -> None:
    """Root's state dir: others may pass through it (not list it) to reach their VMs."""
    found = root.stat()
    if os.geteuid() == 0 and found.st_uid == 0 and not found.st_mode & 0o002:
        os.chmod(root, stat.S_IMODE(found.st_mode) | 0o011)


def _why_unreadable(err: Exception) -> str:
    """One line: the first field pydantic refused, or the error's own first line."""
    if callable(getattr(err, "errors", None)):  # pydantic's ValidationError
        first = err.errors()[0]  # type: ignore[attr-defined]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}" if where else str(first["msg"])
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def atomic_write(path: Path, data: str | bytes, *, group: int | None = None) -> None:
    """path holds data entirely or not at all (a temp file, fsync, rename); 0600, or
    0640 readable by `group`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if group is not None:
            os.fchown(fd, -1, group)
            os.fchmod(fd, 0o640)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from path; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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
    return not record.intent and process_start_time(record.pid) == record.start_time


def open_pidfd(record: Record) -> int | None:
    """A pidfd on the record's process, or None when it is gone.

    The pidfd comes first and the start time is checked after: a pid reused between
    the two can only fail the check, never be signalled in the VM's place.
    """
    if record.intent:
        return None
    try:
        pidfd = os.pidfd_open(record.pid)
    except (ProcessLookupError, OSError):
        return None
    if process_start_time(record.pid) != record.start_time:
        os.close(pidfd)
        return None
    return pidfd


def opt(value: object) -> str:
    """A value inside a QEMU `key=value,...` option: commas are doubled, never separators."""
    return str(value).replace(",", ",,")


def runs_vm(pid: int, paths: VMPaths) -> int | None:
    """The start time of pid if it is the live QEMU of this VM in this state dir.

    Known by its argv (`-name guest=NAME` and this VM's QMP socket), read between two
    reads of its start time, so a pid reused meanwhile is never taken for the VM.
    """
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # The console log's fd set is tagged with its path (privsep.Handoff); a QEMU started
    # before privilege separation named its QMP socket instead.
    markers = [f"{key}={opt(path)}".encode(errors="surrogateescape")
               for key, path in (("opaque", paths.serial_log), ("path", paths.qmp))]
    if not any(arg.endswith(m) or m + b"," in arg for arg in args for m in markers):
        return None
    name = f"guest={paths.dir.name}".encode()
    if not any(arg == name or arg.startswith(name + b",") for arg in args):
        return None
    return process_start_time(pid)


def find_qemu(paths: VMPaths, *, scan: bool = True) -> tuple[int, int] | None:
    """(pid, start time) of a live QEMU of this VM that its record may not know of.

    Its pidfile first, then (`scan`) every process's argv (`-name guest=NAME` and this
    state dir's QMP socket): QEMU may not have written its pidfile yet.
    """
    candidates: list[int] = []
    with contextlib.suppress(OSError, ValueError):
        candidates.append(int(paths.pidfile.read_text().strip()))
    if scan:
        with contextlib.suppress(OSError):
            candidates += [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    for pid in candidates:
        if pid == os.getpid():
            continue
        before = process_start_time(pid)
        if before is not None and runs_vm(pid, paths) == before:
            return pid, before
    return None


# --- exits ----------------------------------------------------------------

# QEMU's ShutdownCause, as traced by `-trace qemu_system_shutdown_request` to its log.
_SHUTDOWN_CAUSES = {
    1: (ExitReason.CRASHED, "QEMU host error"),
    2: (ExitReason.QUIT, "quit over QMP"),
    4: (ExitReason.KILLED, "host signal"),
    6: (ExitReason.POWEROFF, "guest powered off"),
    7: (ExitReason.REBOOT, "guest rebooted"),
    8: (ExitReason.PANIC, "guest panicked"),
}
_CAUSE_RE = re.compile(r"qemu_system_shutdown_request reason=(\d+)")
_SIGNAL_RE = re.compile(r"terminating on signal (\d+)")
# `-trace vm_state_notify`: a running guest stopped for QEMU's clean exit.
_CLEAN_EXIT_RE = re.compile(r"vm_state_notify running 0 reason \d+ \(shutdown\)")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def exit_cause(*, qemu_log: str, pidfile_left: bool, status: int | None
               ) -> tuple[ExitReason, str]:
    """Why QEMU ended (pure): the exit status when we reaped it, the shutdown cause
    QEMU traced to its log, and whether it left its pidfile (`pidfile_left`: True for
    a QEMU without one) and no trace of a clean exit.

    A guest reset under -no-reboot is the one clean exit that traces no cause.
    """
    if status is not None and status < 0:
        return ExitReason.KILLED, f"killed by {_signal_name(-status)}"
    if match := _SIGNAL_RE.search(qemu_log):
        return ExitReason.KILLED, f"terminated by {_signal_name(int(match[1]))}"
    causes = _CAUSE_RE.findall(qemu_log)
    if causes and int(causes[-1]) in _SHUTDOWN_CAUSES:
        return _SHUTDOWN_CAUSES[int(causes[-1])]
    if status is not None and status > 0:
        errors = [line for line in qemu_log.splitlines() if "qemu_system_" not in line]
        last = f": {errors[-1].strip()}" if errors else ""
        return ExitReason.CRASHED, f"QEMU exited with code {status}{last}"
    if pidfile_left and not _CLEAN_EXIT_RE.search(qemu_log):
        return ExitReason.KILLED, "ended without a clean exit (killed or crashed)"
    return ExitReason.REBOOT, "guest rebooted"


def post_mortem(record: Record, paths: VMPaths, *, status: int | None = None,
                at: float | None = None) -> Exit:
    """The Exit of a VM whose process is gone, from what it left behind."""
    try:
        log_text = paths.qemu_log.read_text(errors="replace")
    except OSError:
        log_text = ""
    # A QEMU started before privilege separation removed its pidfile on a clean exit;
    # today's traces it (vm_state_notify ... (shutdown)), and a kill traces nothing.
    left = paths.pidfile.exists() if "-pidfile" in record.argv else True
    reason, detail = exit_cause(qemu_log=log_text, pidfile_left=left, status=status)
    if at is None:  # the last sign of life it left
        times = [record.started_at]
        for path in (paths.qemu_log, paths.serial_log):
            with contextlib.suppress(OSError):
                times.append(path.stat().st_mtime)
        at = max(times)
    return Exit(reason, detail, at, requested=record.stopping)


# --- readiness ------------------------------------------------------------

class Readiness(StrEnum):
    STARTING = "starting"
    READY = "ready"
    UNREADY = "unready"  # its timeout passed with a probe still failing


def console_since(paths: VMPaths, offset: int, *, limit: int = 1 << 20) -> str:
    """This boot's console output (the log is appended across boots), at most limit bytes."""
    try:
        with paths.serial_log.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def console_tail(text: str, lines: int = 10) -> str:
    clean = [line.rstrip("\r") for line in text.splitlines() if line.strip()]
    return "\n".join(clean[-lines:])


# --- interpretation -------------------------------------------------------

def status_from_qmp(qmp_status: str) -> Status:
    """QMP `query-status` -> our status (pure). Not running means paused."""
    return Status.RUNNING if qmp_status == "running" else Status.PAUSED


def _recordless_qemus(state: StateDir, known: set[str]) -> dict[str, str]:
    """VMs whose directory has no record but whose QEMU runs: held, never twinned."""
    held: dict[str, str] = {}
    if not state.vms_dir.is_dir():
        return held
    for entry in state.vms_dir.iterdir():
        if entry.name in known or entry.name.startswith(".") or not entry.is_dir():
            continue
        if not os.access(entry, os.X_OK):
            continue  # another owner's VM: not ours to look into
        paths = VMPaths(entry)
        if paths.record.exists():
            continue  # unreadable: records() said so
        if (found := find_qemu(paths)) is not None:
            held[entry.name] = (f"vm '{entry.name}': QEMU pid {found[0]} runs but "
                                f"{paths.record} is missing; it is left alone (stop it, "
                                "e.g. with kill, to let the reconciler start the VM)")
    return held


# QMP silent for this many passes in a row, or this long, makes a VM `unresponsive`.
UNRESPONSIVE_PASSES = 3
UNRESPONSIVE_AFTER = 30.0


class Interrupted(StrEnum):
    """A save or restore that a killed reconciler left half done (the loop finishes it)."""

    SAVE = "save"  # the state is saved, but the QEMU that saved it still runs
    RESTORE = "restore"  # a restoring QEMU runs, its record still points at the file


@dataclass(frozen=True)
class ObservedVM:
    name: str
    status: Status
    record: Record
    detail: str = ""
    exit: Exit | None = None  # why it ended, when EXITED
    ready: Readiness | None = None  # with `ready:`, when running (see probes.assess)
    ready_detail: str = ""  # the probes still failing, or why it is unready
    adopted: bool = False  # a QEMU its record did not know of (the record is behind)
    qmp_answered: bool = True
    unresponsive: bool = False  # QMP silent for UNRESPONSIVE_PASSES or UNRESPONSIVE_AFTER
    interrupted: Interrupted | None = None
    qmp_status: str = ""  # QMP's own word, when it answered


QueryStatus = Callable[[VMPaths], Awaitable[str]]


async def observe(state: StateDir, query_status: QueryStatus, *, now: float,
                  a_pass: bool = True) -> tuple[dict[str, ObservedVM], dict[str, str]]:
    """Every managed VM with its status, and (by name) the VMs whose record is unreadable.

    `a_pass`: this is a reconcile pass, so a QMP that does not answer now counts as one
    more silent pass (`status` only looks: it counts the passes recorded).

    Problems are reported, not raised. A QEMU that runs for a VM whose record does
    not name it (a start killed between spawn and record) is found and adopted.
    """
    import asyncio  # here: `reconcile` imports this module before it needs asyncio

    records, problems = state.records()
    problems.update(await asyncio.to_thread(_recordless_qemus, state, set(records)))

    async def one(record: Record) -> ObservedVM:
        paths = state.paths(record.name)
        adopted = False
        if not is_alive(record) and (record.intent or record.exit is None):
            found = await asyncio.to_thread(find_qemu, paths)
            if found is not None:
                record = replace(record, pid=found[0], start_time=found[1])
                adopted = True
        if not is_alive(record):
            if record.saved and Path(record.saved).is_file():
                return ObservedVM(record.name, Status.SAVED, record, f"saved to {record.saved}")
            if record.intent:  # a start that never spawned: nothing ran
                return ObservedVM(record.name, Status.EXITED, record, "not started")
            gone = record.exit or post_mortem(record, paths)
            return ObservedVM(record.name, Status.EXITED, record, gone.detail, exit=gone)
        interrupted = None
        if record.saved:
            interrupted = Interrupted.SAVE if record.saved_pid == record.pid \
                else Interrupted.RESTORE
        try:
            qmp_status = await query_status(paths)
        except Exception as err:  # a live VM whose QMP fails is still there
            since = record.qmp_silent_since or now
            passes = record.qmp_failures + a_pass
            silent = passes >= UNRESPONSIVE_PASSES or now - since >= UNRESPONSIVE_AFTER
            detail = (f"unresponsive: QMP has not answered for {now - since:.0f}s "
                      f"({passes} passes): {err}" if silent
                      else f"QMP not answering: {err}")
            return ObservedVM(record.name, Status.RUNNING, record, detail,
                              adopted=adopted, qmp_answered=False,
                              unresponsive=silent, interrupted=interrupted)
        usual = qmp_status in ("running", "paused", "prelaunch")
        detail = "" if usual else f"QMP status {qmp_status}"
        return ObservedVM(record.name, status_from_qmp(qmp_status), record, detail,
                          adopted=adopted,
                          interrupted=interrupted, qmp_status=qmp_status)

    seen = await asyncio.gather(*(one(r) for r in records.values()))
    return {vm.name: vm for vm in seen}, problems
