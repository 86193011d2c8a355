"""The safety promises with real QEMU: a manifest that cannot be read is never a deletion,
a frozen QEMU is never "ok", one poisoned file stops nothing else, files stay private.

One VM is booted for the whole module and every case is tried against it in turn.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    Daemon,
    Run,
    alive,
    pid_of,
    run_reconcile,
    vm_manifest,
    wait_for,
    wait_for_serial,
)

pytestmark = pytest.mark.qemu


class World:
    """A state dir, a manifest dir with a.yaml (kept as is) and b.yaml, two VMs."""

    def __init__(self, root: Path, guest: Path) -> None:
        self.root, self.guest = root, guest
        self.state = root / "state"
        self.vms = root / "vms"
        self.vms.mkdir()
        self.a_text = vm_manifest("va", guest)
        self.b_text = vm_manifest("vb", guest)
        (self.vms / "a.yaml").write_text(self.a_text)
        (self.vms / "b.yaml").write_text(self.b_text)

    def run(self, *args: str | Path) -> Run:
        return run_reconcile(self.state, *args)

    def restore_b(self) -> None:
        b = self.vms / "b.yaml"
        if b.is_symlink() or b.is_file() or (b.exists() and not b.is_dir()):
            b.unlink()
        elif b.is_dir():
            shutil.rmtree(b)
        b.write_text(self.b_text)

    def kill_all(self) -> None:
        for record in self.state.glob("vms/*/record.json"):
            pid = json.loads(record.read_text())["pid"]
            if pid > 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, guest: Path) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("safety"), guest)
    first = w.run("--once", w.vms)
    assert first.code == 0, first
    wait_for_serial(w.state, "va")
    wait_for_serial(w.state, "vb")
    yield w
    w.kill_all()


def _directory(b: Path) -> None:
    b.unlink()
    b.mkdir()


def _dangling(b: Path) -> None:
    b.unlink()
    b.symlink_to(b.parent / "nowhere.yaml")


def _loop(b: Path) -> None:
    b.unlink()
    b.symlink_to(b)


def _fifo(b: Path) -> None:
    b.unlink()
    os.mkfifo(b)


def _socket(b: Path) -> None:
    b.unlink()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(b))


UNREADABLE: dict[str, Callable[[Path], None]] = {
    "a directory": _directory, "a dangling symlink": _dangling, "a symlink loop": _loop,
    "a FIFO": _fifo, "a socket": _socket,
}


@pytest.mark.parametrize("what", list(UNREADABLE))
def test_a_manifest_that_is_not_a_readable_file_is_an_error_not_a_deletion(
    world: World, what: str
) -> None:
    pids = {name: pid_of(world.state, name) for name in ("va", "vb")}
    UNREADABLE[what](world.vms / "b.yaml")
    try:
        run = world.run("--once", world.vms)
        assert run.code == 1, run
        assert "b.yaml" in run.err and "Traceback" not in run.err, run
        assert {n: pid_of(world.state, n) for n in pids} == pids
        assert all(alive(pid) for pid in pids.values())
    finally:
        world.restore_b()


def test_files_the_loader_skips_keep_their_vms(world: World) -> None:
    """Started from a file the directory walk skips (given directly, hidden, another
    suffix): a later run over the directory keeps that VM, since its file still exists."""
    hidden = world.vms / ".hidden"
    hidden.mkdir()
    (hidden / "c.yaml").write_text(vm_manifest("vc", world.guest))
    other = world.vms / "d.txt"
    other.write_text(vm_manifest("vd", world.guest))
    try:
        assert world.run("--once", hidden / "c.yaml").code == 0
        assert world.run("--once", other).code == 0
        pids = {name: pid_of(world.state, name) for name in ("vc", "vd")}
        run = world.run("--once", world.vms)
        assert run.code == 0, run
        assert "exists but is not read as a manifest" in run.out, run
        assert {n: pid_of(world.state, n) for n in pids} == pids
        assert all(alive(pid) for pid in pids.values())
        # Deleting the file is the evidence: now it goes.
        other.unlink()
        run = world.run("--once", world.vms)
        assert "vd" in run.out and "no longer declared" in run.out, run
        wait_for(lambda: not alive(pids["vd"]), timeout=60, what="vd terminated")
    finally:
        shutil.rmtree(hidden)
        other.unlink(missing_ok=True)
        world.run("--once", world.vms)  # prunes vc: its file is gone now


def test_duplicate_keys_are_an_error_and_change_nothing(world: World) -> None:
    pid = pid_of(world.state, "vb")
    b = world.vms / "b.yaml"
    b.write_text(world.b_text + "memory: 16M\n")
    try:
        run = world.run("--once", world.vms)
        assert run.code == 1 and "duplicate key 'memory'" in run.err, run
        assert pid_of(world.state, "vb") == pid and alive(pid)
    finally:
        world.restore_b()


def test_an_unreadable_record_leaves_its_running_vm_alone(world: World) -> None:
    pid = pid_of(world.state, "vb")
    record = world.state / "vms" / "vb" / "record.json"
    good = record.read_text()
    record.write_text("{ torn")
    try:
        run = world.run("--once", world.vms)
        assert run.code == 1 and "unreadable record" in run.err, run
        assert "vb" in run.out and "failed" in run.out, run
        assert alive(pid)
        cmdlines = [p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline")
                    if _readable(p)]
        assert sum(b"guest=vb\0" in c and str(world.state).encode() in c
                   for c in cmdlines) == 1
    finally:
        record.write_text(good)
    assert world.run("--once", world.vms).code == 0


def _readable(path: Path) -> bool:
    try:
        path.read_bytes()
    except OSError:
        return False
    return True


def test_a_frozen_qemu_is_a_failure_then_unresponsive_never_ok(world: World) -> None:
    pid = pid_of(world.state, "vb")
    os.kill(pid, signal.SIGSTOP)
    try:
        for _attempt in range(3):
            run = world.run("--once", world.vms)
            assert run.code == 1, run
            line = next(x for x in run.out.splitlines() if x.startswith("vb "))
            assert "failed" in line and "QMP" in line, run
            assert " ok " not in line
        assert "unresponsive" in line, run
        status = world.run("status", "--json")
        assert status.code == 1
        row = next(r for r in json.loads(status.out) if r["name"] == "vb")
        assert row["state"] == "unresponsive" and row["pid"] == pid
    finally:
        os.kill(pid, signal.SIGCONT)
    run = world.run("--once", world.vms)
    assert run.code == 0 and pid_of(world.state, "vb") == pid, run


def test_state_files_are_private(world: World) -> None:
    # Owners may pass through the state dir and see names in vms/ (privsep), but a
    # VM without an owner keeps its directory to root.
    assert stat.S_IMODE(world.state.stat().st_mode) == 0o711
    assert stat.S_IMODE((world.state / "vms").stat().st_mode) == 0o755
    vm_dir = world.state / "vms" / "va"
    assert stat.S_IMODE(vm_dir.stat().st_mode) == 0o700
    for name in ("serial.log", "qemu.log", "record.json"):
        mode = stat.S_IMODE((vm_dir / name).stat().st_mode)
        assert mode & 0o077 == 0, f"{name} is {oct(mode)}"
    for name in ("qmp.sock", "serial.sock"):
        mode = stat.S_IMODE((vm_dir / name).stat().st_mode)
        assert mode & 0o077 == 0, f"{name} is {oct(mode)}"


def test_a_daemon_with_a_poisoned_file_still_restarts_a_killed_vm(
    world: World, tmp_path: Path
) -> None:
    poison = world.vms / "poison.yaml"
    poison.write_text("name: p\nmemory: " + "9" * 5000 + "\n")
    env_state = world.state
    daemon = Daemon(world.vms, env_state, tmp_path / "daemon.log", "--resync", "30")
    try:
        wait_for(lambda: "poison.yaml" in daemon.text(), timeout=60,
                 what="the daemon reports the poisoned file")
        old = pid_of(world.state, "va")
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: pid_of(world.state, "va") != old and alive(pid_of(world.state, "va")),
                 timeout=60, what="the killed VM restarted by the daemon")
        assert "Traceback" not in daemon.text()
        assert "pass failed" not in daemon.text()
        assert alive(pid_of(world.state, "vb"))
    finally:
        assert daemon.stop() == 0
        poison.unlink()
    wait_for_serial(world.state, "va", count=2)
