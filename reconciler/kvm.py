"""The VM driver: QEMU's command line, launch, QMP control, terminate, accelerator choice.

Apply stage of desired -> observed -> plan -> apply: the only module that starts or
signals QEMU. QMP goes through `qemu.qmp`, QEMU's own client.

Exceptions (library errors are translated once, here, at the boundary)::

    DriverError
     ├── LaunchError    QEMU did not come up: exit code, command line, output tail
     └── ControlError   a QMP command failed or QMP did not answer
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler import faults, privsep, storage
from reconciler.declared import Accel
from reconciler.observed import (
    MAX_SOCKET_PATH,
    Exit,
    ExitReason,
    Record,
    VMPaths,
    find_qemu,
    open_pidfd,
    opt,
    process_start_time,
)
from reconciler.privsep import Handoff, Identity, PrivsepError

if TYPE_CHECKING:
    from qemu.qmp import QMPClient

    from reconciler.desired import VM

# qemu.qmp and tenacity are imported where used: a start spawns QEMU first and pays
# for them while QEMU boots; commands that never talk to QMP do not pay at all.

log = logging.getLogger("reconciler.kvm")

QEMU = "qemu-system-x86_64"
QMP_TIMEOUT = 5.0
LAUNCH_TIMEOUT = 15.0
QUIT_TIMEOUT = 5.0
KILL_TIMEOUT = 5.0
POWER_BUTTON_REPEAT = 5.0
AGENT_TIMEOUT = 3.0  # for the guest agent to take guest-shutdown
AGENT_GRACE = 0.5  # of stop_timeout, for the guest to go after guest-shutdown
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


class DriverError(Exception):
    """Something the driver was asked to do did not happen."""


class LaunchError(DriverError):
    def __init__(self, message: str, *, argv: Sequence[str], exit_code: int | None,
                 output: str) -> None:
        self.argv, self.exit_code, self.output = list(argv), exit_code, output
        super().__init__(message)

    def __str__(self) -> str:
        lines = [self.args[0]]
        if self.exit_code is not None:
            lines.append(f"exit code: {self.exit_code}")
        if self.argv:
            lines.append("command: " + " ".join(self.argv))
        if self.output.strip():
            lines.append("output:\n  " + "\n  ".join(self.output.strip().splitlines()[-10:]))
        return "\n".join(lines)


class ControlError(DriverError):
    pass


# --- accelerator ----------------------------------------------------------

def choose_accel(requested: Accel, *, sys_module: Path = Path("/sys/module"),
                 dev_kvm: Path = Path("/dev/kvm")) -> str:
    """`auto` picks KVM only with hardware virtualization (kvm_intel/kvm_amd).

    A `/dev/kvm` backed by kvm_pvm runs only PVM-enabled guest kernels (a stock
    kernel hangs there), so it counts as no KVM: TCG.
    """
    if requested is not Accel.AUTO:
        return requested.value
    if not os.access(dev_kvm, os.R_OK | os.W_OK):
        return "tcg"
    hardware = any((sys_module / m).exists() for m in ("kvm_intel", "kvm_amd"))
    return "kvm" if hardware else "tcg"


# --- command line ---------------------------------------------------------

def qemu_argv(vm: VM, paths: VMPaths, *, accel: str, paused: bool, files: Handoff,
              binary: str = QEMU, taps: Sequence[tuple[int, str]] = ()) -> list[str]:
    """The QEMU command line for vm, as an argv list (never a shell).

    Every file and socket QEMU uses comes from `files` (opened here, by us, as it
    names them: privsep), so QEMU needs no path of the host. `taps`: (descriptor,
    MAC) for each of vm's interfaces, in order.
    """
    console_log = files.log(paths.serial_log)  # its tag names the VM (observed.runs_vm)
    argv = [
        binary, "-nodefaults", "-no-user-config",
        "-name", f"guest={opt(vm.name)}",
        "-machine", "pc", "-accel", accel,
        "-m", f"{vm.memory}M", "-smp", str(vm.vcpus),
        "-display", "none",
        "-chardev", f"socket,id=qmp,fd={files.listen(paths.qmp)},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", (f"socket,id=serial0,fd={files.listen(paths.serial)},server=on,wait=off,"
                     f"logfile={console_log},logappend=on"),
        "-serial", "chardev:serial0",
        # Exits the loop can explain: a reset ends QEMU, a panic is seen (pvpanic) and
        # fails it, the shutdown cause is traced to qemu.log, and so is a clean exit
        # (a kill traces nothing). No pidfile: QEMU may write no path of the host.
        "-no-reboot",
        "-device", "pvpanic",
        "-action", "panic=exit-failure",
        "-trace", "qemu_system_shutdown_request",
        "-trace", "vm_state_notify",
        "-sandbox", SANDBOX,
    ]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    # -kernel, -initrd and -append take their argument verbatim (no option parsing).
    if vm.boot.kernel is not None:
        argv += ["-kernel", files.copy(vm.boot.kernel, mapped=False)]
    if vm.boot.initrd is not None:
        argv += ["-initrd", files.copy(vm.boot.initrd, mapped=True)]
    if vm.boot.cmdline:
        argv += ["-append", vm.boot.cmdline]
    argv += _storage_args(vm, files)
    if vm.cloud_init is not None:  # after the disks: the guest's root stays /dev/vda
        argv += _drive("seed", files.fdset(paths.seed, writable=False), fmt="raw",
                       readonly=True, driver="ide-cd")
    if vm.agent:
        argv += [
            "-chardev", f"socket,id=qga0,fd={files.listen(paths.agent)},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]
    for index, (tap, mac) in enumerate(taps):
        argv += ["-netdev", f"tap,id=net{index},fd={tap}",
                 "-device", _json({"driver": "virtio-net-pci", "netdev": f"net{index}",
                                   "mac": mac, "id": f"nic{index}"})]
    if paused:
        argv.append("-S")
    return [*argv, *files.options]


def _json(value: dict[str, Any]) -> str:
    """A -blockdev/-device value as JSON: file names need no escaping, inject nothing."""
    return json.dumps(value, separators=(",", ":"))


def _storage_args(vm: VM, files: Handoff) -> list[str]:
    """-blockdev/-device for the disks and the cdrom, formats always explicit."""
    argv: list[str] = []
    boot = {"disk": "disk0", "cdrom": "cd0"}.get(vm.boot.device or "")
    for i, disk in enumerate(vm.disks):
        node = f"disk{i}"
        backing = None
        if disk.base is not None and storage.backing_of(disk) is not None:
            # The declared base, as the overlay names it: handed over, not opened by name.
            backing = f"{node}-base"
            argv += _blockdevs(backing, files.fdset(disk.base, writable=False),
                               fmt=disk.base_format.value, readonly=True)
        argv += _blockdevs(node, files.fdset(disk.path, writable=not disk.readonly),
                           fmt=disk.format.value, readonly=disk.readonly, backing=backing)
        argv += _device(node, "virtio-blk-pci" if disk.bus == "virtio" else "ide-hd",
                        boot=node == boot)
    if vm.cdrom is not None:
        argv += _drive("cd0", files.fdset(vm.cdrom, writable=False), fmt="raw",
                       readonly=True, driver="ide-cd", boot=boot == "cd0")
    return argv


def _blockdevs(node: str, filename: str, *, fmt: str, readonly: bool,
               backing: str | None = None) -> list[str]:
    """-blockdev file, then format, for one image."""
    image: dict[str, Any] = {"driver": fmt, "file": f"{node}-file", "node-name": node,
                             "read-only": readonly}
    if backing is not None:
        image["backing"] = backing
    return [
        "-blockdev", _json({"driver": "file", "filename": filename,
                            "node-name": f"{node}-file", "read-only": readonly}),
        "-blockdev", _json(image),
    ]


def _device(node: str, driver: str, *, boot: bool = False) -> list[str]:
    device: dict[str, Any] = {"driver": driver, "drive": node, "id": f"{node}-dev"}
    if boot:
        device["bootindex"] = 1
    return ["-device", _json(device)]


def _drive(node: str, filename: str, *, fmt: str, readonly: bool, driver: str,
           boot: bool = False) -> list[str]:
    """-blockdev (file, then format) and -device for one image, as JSON."""
    return [*_blockdevs(node, filename, fmt=fmt, readonly=readonly),
            *_device(node, driver, boot=boot)]


# --- QMP ------------------------------------------------------------------

@functools.cache
def _client_class() -> type[QMPClient]:
    """QMPClient, without pretty-printing each message for a debug log that is off.

    Its message hooks (`_cb_outbound`, `_cb_inbound`: "intended for subclasses")
    format every message as indented JSON before the logger decides to drop it: a
    third of the CPU time of asking 200 VMs for their status.
    """
    from qemu.qmp import QMPClient

    class Client(QMPClient):
        def _cb_outbound(self, msg: Any) -> Any:
            return super()._cb_outbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

        def _cb_inbound(self, msg: Any) -> Any:
            return super()._cb_inbound(msg) if self.logger.isEnabledFor(logging.DEBUG) else msg

    return Client


@contextlib.asynccontextmanager
async def qmp(paths: VMPaths, *, timeout: float = QMP_TIMEOUT) -> AsyncIterator[QMPClient]:
    """A short QMP session with one VM (QEMU serves one client at a time)."""
    from qemu.qmp import QMPError

    client = _client_class()(paths.dir.name)
    try:
        await asyncio.wait_for(client.connect(str(paths.qmp)), timeout)
    except (QMPError, OSError, TimeoutError, AssertionError) as err:
        # AssertionError: qemu.qmp's connect() asserts its session is running once
        # established; a QEMU that quits at that moment (a VM ending while its power
        # button is pressed again) fails the assertion instead of raising an error.
        with contextlib.suppress(Exception):
            await client.disconnect()
        why = str(err) or ("the session ended as it began"
                           if isinstance(err, AssertionError) else "timed out")
        raise ControlError(f"cannot connect to QMP at {paths.qmp}: {why}") from err
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()


async def execute(paths: VMPaths, command: str, arguments: dict[str, Any] | None = None) -> Any:
    from qemu.qmp import QMPError

    async with qmp(paths) as client:
        try:
            return await asyncio.wait_for(client.execute(command, arguments), QMP_TIMEOUT)
        except (QMPError, OSError, TimeoutError) as err:
            raise ControlError(f"QMP {command} failed: {str(err) or 'timed out'}") from err


async def query_status(paths: VMPaths) -> str:
    reply = await execute(paths, "query-status")
    return str(reply["status"])


async def pin_vcpus(paths: VMPaths, cpus: frozenset[int]) -> list[int]:
    """Each vCPU thread (QMP query-cpus-fast) onto the host CPUs given: their thread ids."""
    online = os.sched_getaffinity(0) | set(range(os.cpu_count() or 1))
    missing = sorted(cpus - online)
    if missing:
        raise ControlError(f"cpus: host CPU {missing[0]} does not exist here "
                           f"(this host has 0-{(os.cpu_count() or 1) - 1})")
    found = await execute(paths, "query-cpus-fast")
    threads = [int(cpu["thread-id"]) for cpu in found if "thread-id" in cpu]
    for thread in threads:
        try:
            os.sched_setaffinity(thread, cpus)
        except OSError as err:
            raise ControlError(f"cannot pin vCPU thread {thread}: {err.strerror}") from err
    return threads


async def pause(paths: VMPaths) -> None:
    await execute(paths, "stop")


async def unpause(paths: VMPaths) -> None:
    await execute(paths, "cont")


# --- launch ---------------------------------------------------------------

def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# Our QEMU children, until reaped: a Popen dropped while its child runs would be
# waited on by the subprocess module behind reap()'s back.
_children: dict[int, subprocess.Popen[bytes]] = {}


def _spawn(argv: list[str], paths: VMPaths, who: Identity | None, fds: Sequence[int]
           ) -> int:
    """Start QEMU in its own session, as who, output to qemu.log: it outlives this process.

    The child drops to who's uid, gid and groups before exec (no capability survives
    setuid from root) and gets exactly `fds` beyond stdio. Its umask lets who's group
    in (the group is the VM's: privsep).
    """
    binary = shutil.which(argv[0])
    if binary is None:
        raise LaunchError(f"{argv[0]} not found; install qemu-system-x86",
                          argv=argv, exit_code=None, output="")
    out = os.open(paths.qemu_log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                  0o600)
    drop: dict[str, Any] = {}
    if who is not None:
        privsep.owns(paths.qemu_log, who, mode=0o640, fd=out)
        drop = {"user": who.uid, "group": who.gid, "extra_groups": list(who.groups)}
    try:
        child = subprocess.Popen(
            argv, executable=binary, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            pass_fds=fds, start_new_session=True, umask=0o007, **drop)
    except OSError as err:
        raise LaunchError(f"cannot run {binary}: {err.strerror}", argv=argv,
                          exit_code=None, output="") from err
    finally:
        os.close(out)
    _children[child.pid] = child
    return child.pid


def reap(pid: int) -> int | None:
    """Exit status of our child pid once ended: the code, or -N for signal N.

    None while it runs, or when it is not our child (an adopted VM).
    """
    if pid <= 0:  # waitpid would take any child of ours
        return None
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if not done:
        return None
    code = os.waitstatus_to_exitcode(status)
    if (child := _children.pop(pid, None)) is not None:
        child.returncode = code  # reaped: the subprocess module must not wait on it
    return code


RESTORE_RATE = 64 * 1024**2  # bytes/s a restore is given at least (slow disks, TCG)


def restore_timeout(size: int) -> float:
    """How long a restore may take to load a saved state of size bytes."""
    return LAUNCH_TIMEOUT + size / RESTORE_RATE


async def start(vm: VM, paths: VMPaths, *, source: str, paused: bool,
                remember: Callable[[Record], None], history: Mapping[str, int],
                restore_from: Path | None = None, taps: Sequence[tuple[str, str]] = (),
                keep: Mapping[str, Any] | None = None,
                turn: Callable[[], Awaitable[float]] | None = None,
                incoming: bool = False) -> Record:
    """Launch QEMU for vm and wait until QMP answers (and a restore has loaded).

    `remember` gets the record before the spawn (an intent: no pid yet), again as
    soon as the process exists, and with the exit when the launch fails, so a
    reconciler that dies at any point leaves a record its successor can follow
    (`observed.find_qemu` adopts a QEMU spawned before its pid was recorded).
    `restore_from`: a file written by `save()`, handed to QEMU as `-incoming fd:N`;
    the guest then stays paused until the caller resumes it. `keep`: record fields
    carried into the new record (a restore keeps `saved` until it has loaded).
    `turn`: awaited right before the spawn (staggered starts); its time is started_at.
    `incoming`: QEMU waits for a live migration (`-incoming defer`; `listen_incoming`).
    """
    if len(str(paths.serial)) > MAX_SOCKET_PATH:
        raise LaunchError(
            f"vm '{vm.name}': socket path {paths.serial} is longer than unix sockets allow "
            f"({MAX_SOCKET_PATH}); use a shorter --state-dir or VM name",
            argv=[], exit_code=None, output="")
    paths.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Under the state dir's lock no other start runs, and the pass has looked for an
    # orphan already (observe): its pidfile is the last thing to check.
    if (running := find_qemu(paths, scan=False)) is not None:
        raise LaunchError(f"vm '{vm.name}': a QEMU for it already runs (pid {running[0]}) "
                          "that its record does not name; not started twice", argv=[],
                          exit_code=None, output="")
    try:
        serial_offset = paths.serial_log.stat().st_size
    except FileNotFoundError:
        serial_offset = 0
    for disk in vm.disks:
        try:
            created = await asyncio.to_thread(storage.ensure_disk, disk)
        except storage.StorageError as err:
            raise LaunchError(f"vm '{vm.name}': {err}", argv=[], exit_code=None,
                              output="") from err
        if created:
            log.info("vm '%s': %s", vm.name, created)
    accel = choose_accel(vm.accel)
    try:
        who = privsep.identity(vm.owner)
        if accel == "kvm" and not privsep.can_open_kvm(who):
            raise PrivsepError(f"user {who.user if who else os.geteuid()} may not open "
                               "/dev/kvm: add it to group kvm (and give /dev/kvm to that "
                               "group), or declare accel: tcg")
        privsep.prepare_dir(paths, who)
    except (PrivsepError, OSError) as err:
        raise LaunchError(f"vm '{vm.name}': {err}", argv=[], exit_code=None,
                          output="") from err
    files = Handoff(who)
    try:
        return await _launch(vm, paths, source=source, paused=paused, remember=remember,
                             history=history, restore_from=restore_from, taps=taps,
                             keep=keep, accel=accel, files=files,
                             serial_offset=serial_offset, turn=turn, incoming=incoming)
    finally:
        files.close()


async def _launch(vm: VM, paths: VMPaths, *, source: str, paused: bool,
                  remember: Callable[[Record], None], history: Mapping[str, int],
                  restore_from: Path | None, taps: Sequence[tuple[str, str]],
                  keep: Mapping[str, Any] | None, accel: str, files: Handoff,
                  serial_offset: int, turn: Callable[[], Awaitable[float]] | None,
                  incoming: bool = False) -> Record:
    for stale in (paths.qmp, paths.serial, paths.pidfile, paths.agent):  # none alive
        stale.unlink(missing_ok=True)
    try:
        argv = qemu_argv(vm, paths, accel=accel, paused=paused, files=files,
                         taps=[(files.tap(tap), mac) for tap, mac in taps])
    except PrivsepError as err:
        raise LaunchError(f"vm '{vm.name}': {err}", argv=[], exit_code=None,
                          output="") from err
    timeout = LAUNCH_TIMEOUT
    if restore_from is not None:
        timeout = restore_timeout(restore_from.stat().st_size)
    started_at = await turn() if turn is not None else time.time()
    record = Record(
        name=vm.name, spec=vm.spec(), spec_hash=vm.spec_hash(),
        source=source, pid=0, start_time=0, started_at=started_at,
        accel=accel, argv=argv, serial_offset=serial_offset,
        restarts=history.get("restarts", 0), reboots=history.get("reboots", 0),
        backoff=history.get("backoff", 0), taps=[tap for tap, _ in taps],
        macs=[mac for _, mac in taps],
    )
    record = replace(record, **(keep or {}))
    remember(record)  # the intent, before anything runs
    faults.hit("before-spawn")
    if restore_from is not None:
        saved = os.open(restore_from, os.O_RDONLY | os.O_CLOEXEC)
        files.fds.append(saved)
        argv = [*argv, "-incoming", f"fd:{saved}"]
    elif incoming:
        argv = [*argv, "-incoming", "defer"]
    pid = _spawn(argv, paths, files.who, files.fds)
    files.close(keep_copies=True)  # QEMU has its own: if it dies, its sockets close
    faults.hit("after-spawn")
    try:
        record = replace(record, pid=pid, start_time=process_start_time(pid) or 0, argv=argv)
        remember(record)
        if restore_from is not None:
            faults.hit("mid-restore")
        await _wait_up(record, paths, timeout=timeout, restoring=restore_from is not None,
                       incoming=incoming)
        files.loaded()
    except ControlError as err:
        await _kill(pid)
        what = "restore did not load" if restore_from else "QMP did not answer"
        failure: BaseException = LaunchError(
            f"vm '{vm.name}': {what} within {timeout:.0f}s",
            argv=argv, exit_code=None, output=_tail(paths.qemu_log))
        remember(replace(record, exit=Exit(ExitReason.CRASHED, str(failure.args[0]),
                                           time.time())))
        raise failure from err
    except LaunchError as err:  # not a reboot: say so, or the policy would retry it as one
        remember(replace(record, exit=Exit(ExitReason.CRASHED, str(err.args[0]),
                                           time.time())))
        raise
    except BaseException:
        await _kill(pid)
        raise
    return record


async def _wait_up(record: Record, paths: VMPaths, *, timeout: float, restoring: bool,
                   incoming: bool = False) -> None:
    """Until QMP answers (and a restore has loaded; `incoming`: a QEMU waiting for a
    migration is up as soon as it answers); LaunchError if QEMU exits first."""
    from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

    async for attempt in AsyncRetrying(
        stop=stop_after_delay(timeout),
        wait=wait_exponential(multiplier=0.002, max=0.02 if not restoring else 0.1),
        retry=retry_if_exception_type(ControlError),
        reraise=True,
    ):
        with attempt:
            code = reap(record.pid)
            if code is not None:
                what = "restore" if restoring else "start"
                raise LaunchError(f"vm '{record.name}': QEMU exited during {what}",
                                  argv=record.argv, exit_code=code,
                                  output=_tail(paths.qemu_log))
            if await query_status(paths) == "inmigrate" and not incoming:
                raise ControlError("still loading its saved state")


async def _kill(pid: int) -> None:
    """SIGKILL our child pid and reap it, without blocking the event loop."""
    if reap(pid) is not None:
        return
    try:
        pidfd = os.pidfd_open(pid)  # our unreaped child: the pid cannot be reused
    except ProcessLookupError:
        return
    try:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        await _wait_exit(pidfd, KILL_TIMEOUT)
    finally:
        os.close(pidfd)
        reap(pid)


# --- terminate ------------------------------------------------------------

def _ended(pidfd: int) -> bool:
    """Whether the process behind pidfd has ended (a pidfd polls readable then)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


async def _wait_exit(pidfd: int, timeout: float) -> bool:
    """True when the process behind pidfd ends within timeout (0: has it ended?)."""
    if _ended(pidfd):
        return True
    if timeout <= 0:
        return False
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(pidfd, readable)
    try:
        await asyncio.wait_for(ended, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(pidfd)


async def terminate(record: Record, paths: VMPaths, *, timeout: float) -> str:
    """Ask the guest to power off, then QMP `quit`, then SIGKILL; says which ended it."""
    return await _ending(record, lambda pidfd: _shutdown(record, paths, pidfd,
                                                         timeout=timeout))


async def quit_qemu(record: Record, paths: VMPaths) -> str:
    """End QEMU without asking the guest (after a save): QMP quit, then SIGKILL."""
    return await _ending(record, lambda pidfd: _quit(record, paths, pidfd))


async def _ending(record: Record, end: Callable[[int], Awaitable[str]]) -> str:
    """Run end(pidfd) on the VM's live process; the process is reaped when it is ours."""
    pidfd = open_pidfd(record)
    if pidfd is None:
        return "process already gone"
    try:
        return await end(pidfd)
    finally:
        os.close(pidfd)
        reap(record.pid)


async def _running(paths: VMPaths) -> bool:
    try:
        return await query_status(paths) == "running"
    except ControlError:
        return False


async def _agent_shutdown(record: Record, paths: VMPaths, pidfd: int, *, timeout: float
                          ) -> bool:
    """The guest agent's guest-shutdown, first: True if the guest powered off in time."""
    from reconciler import qga

    try:
        await qga.shutdown(paths.agent, timeout=min(timeout, AGENT_TIMEOUT))
    except qga.AgentError as err:
        log.info("vm '%s': guest agent did not take the shutdown (%s); pressing the power "
                 "button", record.name, err)
        return False
    faults.hit("mid-terminate")
    return await _wait_exit(pidfd, timeout)


async def _shutdown(record: Record, paths: VMPaths, pidfd: int, *, timeout: float) -> str:
    name = record.name
    deadline = time.monotonic() + timeout
    # With an agent, its shutdown comes first; the power button follows if the guest
    # has not gone within AGENT_GRACE of the grace period.
    if record.spec.get("agent") and await _running(paths) and await _agent_shutdown(
            record, paths, pidfd, timeout=timeout * AGENT_GRACE):
        return "guest powered off (guest agent)"
    while (left := deadline - time.monotonic()) > 0:
        try:
            if await query_status(paths) != "running":
                await unpause(paths)  # a paused guest cannot see its power button
            await execute(paths, "system_powerdown")
            faults.hit("mid-terminate")
        except ControlError as err:
            log.debug("vm '%s': power button not pressed: %s", name, err)
            if await _wait_exit(pidfd, 0):
                break
        if await _wait_exit(pidfd, min(left, POWER_BUTTON_REPEAT)):
            return "guest powered off"
    if await _wait_exit(pidfd, 0):
        return "guest powered off"
    log.info("vm '%s': guest did not power off within %.0fs; quitting QEMU", name, timeout)
    how = await _quit(record, paths, pidfd)
    return f"quit after {timeout:.0f}s grace" if how == "quit" else how


async def _quit(record: Record, paths: VMPaths, pidfd: int) -> str:
    """QMP `quit`, then SIGKILL: "quit" or "killed"."""
    with contextlib.suppress(ControlError):
        await execute(paths, "quit")
    if await _wait_exit(pidfd, QUIT_TIMEOUT):
        return "quit"
    log.info("vm '%s': QEMU did not quit; killing it", record.name)
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    if await _wait_exit(pidfd, KILL_TIMEOUT):
        return "killed"
    raise ControlError(f"vm '{record.name}': pid {record.pid} survived SIGKILL")


# --- save (vmd's send) ----------------------------------------------------

SAVE_POLL = 0.02
SAVE_BANDWIDTH = 100 * 1024**3  # bytes/s: no cap


def partial_of(target: Path) -> Path:
    """Where a save writes until it is complete (then renamed to target)."""
    return target.with_name(f".{target.name}.partial")


async def migration_status(paths: VMPaths) -> str:
    """QMP `query-migrate`'s status: none, active, completed, failed, cancelled, ..."""
    info = await execute(paths, "query-migrate")
    return str(info.get("status", "none")) if isinstance(info, dict) else "none"


async def save(record: Record, paths: VMPaths, target: Path, *, timeout: float = 600.0
               ) -> float:
    """Write the VM's memory and device state to target, then end QEMU; the seconds taken.

    The file goes to QEMU over the QMP socket (getfd), the guest is stopped and
    migrated to `fd:`; target appears (atomically) only once complete. Disks are
    not touched.
    """
    began = time.monotonic()
    partial = partial_of(target)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        async with qmp(paths) as client:
            was = (await client.execute("query-status"))["status"]  # type: ignore[index]
            try:
                client.send_fd_scm(fd)
                await client.execute("getfd", {"fdname": "saved-state"})
                # QEMU's default cap (128 MiB/s) is for live links; a stopped guest
                # going to a local file is only bounded by the disk.
                await client.execute("migrate-set-parameters",
                                     {"max-bandwidth": SAVE_BANDWIDTH})
                await client.execute("stop")
                await client.execute("migrate", {"uri": "fd:saved-state"})
                faults.hit("mid-save")
                await _migration_done(client, timeout=timeout)
            except Exception as err:  # the guest goes on as it was
                with contextlib.suppress(Exception):
                    await client.execute("migrate_cancel")
                if was == "running":
                    with contextlib.suppress(Exception):
                        await client.execute("cont")
                raise ControlError(f"vm '{record.name}': save failed: {err}") from err
        os.fsync(fd)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    os.replace(partial, target)
    return time.monotonic() - began


async def listen_incoming(paths: VMPaths, host: str) -> str:
    """A QEMU started with `incoming` listens on host (a port of its choosing): the
    `tcp:` URI the source migrates to."""
    await execute(paths, "migrate-incoming", {"uri": f"tcp:{host}:0"})
    info = await execute(paths, "query-migrate")
    for address in info.get("socket-address", []) if isinstance(info, dict) else []:
        if address.get("type") == "inet" and address.get("port"):
            return f"tcp:{host}:{address['port']}"
    raise ControlError(f"QEMU did not say where it listens for the migration: {info!r}")


async def migrate(record: Record, paths: VMPaths, uri: str, *, timeout: float
                  ) -> dict[str, Any]:
    """Live-migrate the guest to the QEMU listening at uri; the last `query-migrate`
    (`downtime` and `total-time` in ms). Afterwards this QEMU holds a stopped copy
    (postmigrate): end it with quit_qemu. On failure the guest goes on here."""
    async with qmp(paths) as client:
        try:
            await client.execute("migrate", {"uri": uri})
            return await _migration_done(client, timeout=timeout)
        except Exception as err:
            with contextlib.suppress(Exception):
                await client.execute("migrate_cancel")
            raise ControlError(f"vm '{record.name}': live migration to {uri} failed: "
                               f"{err}") from err


async def _migration_done(client: QMPClient, *, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await client.execute("query-migrate")
        if not isinstance(info, dict):
            raise ControlError(f"query-migrate answered {info!r}")
        status = info.get("status")
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            raise ControlError(f"migration {status}: {info.get('error-desc', 'no reason')}")
        await asyncio.sleep(SAVE_POLL)
    raise ControlError(f"migration did not complete within {timeout:.0f}s")
