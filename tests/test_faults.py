"""The reconciler SIGKILLed at each step of a VM's life (reconciler/faults.py), real QEMU.

Each test runs `reconcile --once` with RECONCILER_FAULT naming a point, so it dies
there as from a power cut or an OOM kill (exit -9), then runs it again without the
fault, twice, and checks what must hold whatever the step: one QEMU per VM at most,
never two; the VM ends as declared; a saved state is never restored twice; a disk
nothing may write is unchanged.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import fake_qemu
import pytest
from conftest import (
    MARKER,
    Run,
    alive,
    pid_of,
    record,
    run_reconcile,
    serial,
    status_rows,
    type_on_console,
    vm_manifest,
    wait_for,
    wait_for_serial,
)

pytestmark = pytest.mark.qemu


def cli(state_dir: Path, *args: str | Path, fault: str | None = None,
        check: int | None = None) -> Run:
    """`reconcile ARGS` on state_dir; with fault, it SIGKILLs itself at that point."""
    env = {"RECONCILER_FAULT": fault} if fault is not None else {}
    return run_reconcile(state_dir, *args, env=env, check=check)


def qemus(state_dir: Path, name: str) -> list[int]:
    """The live QEMU processes of vm name in this test's state dir (zombies ignored)."""
    return fake_qemu.processes_with(f"guest={name}", str(state_dir))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def vm_line(run: Run, name: str) -> str:
    for line in run.out.splitlines():
        if line.split(None, 1)[:1] == [name]:
            return line.split(None, 1)[1]
    raise AssertionError(f"no line for vm {name}:\n{run}")


@pytest.fixture(autouse=True)
def no_leftovers(state_dir: Path) -> Iterator[None]:
    """Every QEMU of the test killed, records removed: a record left without a pid
    (an intent) must not reach state_dir's teardown, which signals the record's pid."""
    yield
    fake_qemu.kill_all(fake_qemu.processes_with(str(state_dir)))
    for path in state_dir.glob("vms/*/record.json"):
        path.unlink()


class Scenario:
    """One VM, 'fx', on the test guest, with a 16M raw data disk of random bytes."""

    name = "fx"

    def __init__(self, tmp_path: Path, guest: Path, state_dir: Path) -> None:
        self.guest, self.state_dir = guest, state_dir
        self.manifests = tmp_path / "vms"
        self.manifests.mkdir()
        self.disk = tmp_path / "data.raw"
        self.disk.write_bytes(os.urandom(16 << 20))
        self.disk_sha = sha256(self.disk)

    def declare(self, state: str = "running") -> None:
        text = vm_manifest(self.name, self.guest, state=state,
                           disks=f"[{{path: {self.disk}, format: raw}}]")
        (self.manifests / f"{self.name}.yaml").write_text(text)

    def run(self, *, fault: str | None = None, check: int | None = None) -> Run:
        return cli(self.state_dir, "--once", self.manifests, fault=fault, check=check)

    def crash_at(self, point: str) -> Run:
        crashed = self.run(fault=point)
        assert crashed.code == -signal.SIGKILL, f"not killed at {point}: {crashed}"
        return crashed

    def boots(self) -> int:
        return serial(self.state_dir, self.name).count(MARKER)

    def qemus(self) -> list[int]:
        return qemus(self.state_dir, self.name)

    def started(self) -> int:
        """Declared running, started, booted to user space: its pid."""
        self.declare("running")
        self.run(check=0)
        wait_for_serial(self.state_dir, self.name)
        (pid,) = self.qemus()
        return pid

    def saved(self) -> Path:
        """Started, then saved: the saved state file."""
        old = self.started()
        self.declare("saved")
        self.run(check=0)
        assert not alive(old) and self.qemus() == []
        return self.state_dir / "vms" / self.name / "saved.state"

    def converged(self, state: str) -> Run:
        """A second rerun finds nothing to do."""
        again = self.run(check=0)
        assert vm_line(again, self.name).startswith(f"ok       {state} as desired"), again
        return again

    def responds(self) -> None:
        """The guest runs: its shell answers on the console."""
        type_on_console(self.state_dir, self.name, "\necho alive-$((40+2))\n")
        wait_for_serial(self.state_dir, self.name, "alive-42", timeout=30)

    def killed_boots_fresh(self) -> None:
        """A SIGKILLed QEMU is started afresh (a new boot), never restored again."""
        (pid,) = self.qemus()
        boots = self.boots()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not alive(pid), timeout=10, what="the QEMU to die")
        run = self.run(check=0)
        assert "restored" not in run.out, run
        wait_for_serial(self.state_dir, self.name, count=boots + 1)
        assert len(self.qemus()) == 1
        assert record(self.state_dir, self.name).get("saved") is None


@pytest.fixture
def vm(tmp_path: Path, guest: Path, state_dir: Path) -> Scenario:
    return Scenario(tmp_path, guest, state_dir)


@pytest.mark.parametrize("point", ["before-spawn", "after-spawn"])
def test_a_start_killed_around_the_spawn_ends_with_one_qemu(vm: Scenario, point: str) -> None:
    vm.declare("running")
    vm.crash_at(point)
    orphans = vm.qemus()  # after-spawn: a QEMU whose pid the record does not hold yet
    assert len(orphans) == (1 if point == "after-spawn" else 0)

    vm.run(check=0)
    wait_for_serial(vm.state_dir, vm.name)
    (pid,) = vm.qemus()
    if orphans:
        assert orphans == [pid], "the orphan was not adopted"
    assert pid_of(vm.state_dir, vm.name) == pid
    vm.converged("running")
    assert vm.qemus() == [pid]
    vm.responds()
    assert vm.boots() == 1
    assert sha256(vm.disk) == vm.disk_sha


@pytest.mark.parametrize("point", ["after-ahead", "mid-validation"])
def test_a_validation_ahead_killed_loses_nothing(vm: Scenario, point: str) -> None:
    """A miss validates ahead in a child. The reconciler killed while that child
    still validates: the next run, at once, finds the state dir free (the child holds
    nothing of its parent's). The child killed before it keeps its result: the
    reconciler validates itself. Either way the VM starts once."""
    vm.declare("running")
    if point == "after-ahead":
        vm.crash_at(point)
        assert vm.qemus() == []
        run = vm.run(check=0)  # at once: the child may be validating still
    else:
        run = vm.run(fault=point, check=0)  # only the child dies
    assert vm_line(run, vm.name).startswith("changed  not running: started"), run
    wait_for_serial(vm.state_dir, vm.name)
    (pid,) = vm.qemus()
    vm.converged("running")
    assert vm.qemus() == [pid] and vm.boots() == 1


def test_a_terminate_killed_midway_ends_stopped_with_no_qemu(vm: Scenario) -> None:
    pid = vm.started()
    vm.declare("stopped")
    vm.crash_at("mid-terminate")

    vm.run(check=0)
    assert vm.qemus() == [] and not alive(pid)
    vm.converged("stopped")
    assert status_rows(vm.state_dir)[vm.name]["state"] == "stopped"
    assert vm.qemus() == []


def test_a_save_killed_before_qemu_quits_stays_saved_and_restores_once(
    vm: Scenario
) -> None:
    pid = vm.started()
    vm.declare("saved")
    vm.crash_at("after-save")
    state_file = vm.state_dir / "vms" / vm.name / "saved.state"
    assert state_file.stat().st_size > 0

    vm.run(check=0)
    assert vm.qemus() == [] and not alive(pid)
    vm.converged("saved")
    assert status_rows(vm.state_dir)[vm.name]["state"] == "saved"
    assert state_file.stat().st_size > 0
    assert sha256(vm.disk) == vm.disk_sha  # nothing ran after the save

    vm.declare("running")
    restored = vm.run(check=0)
    assert "restored from" in vm_line(restored, vm.name), restored
    assert len(vm.qemus()) == 1 and not state_file.exists()
    assert record(vm.state_dir, vm.name).get("saved") is None
    vm.responds()
    assert vm.boots() == 1  # the same boot, resumed
    vm.killed_boots_fresh()


@pytest.mark.parametrize("point", ["mid-restore", "after-restore"])
def test_a_restore_killed_midway_runs_once_and_never_restores_again(
    vm: Scenario, point: str
) -> None:
    state_file = vm.saved()
    assert sha256(vm.disk) == vm.disk_sha
    vm.declare("running")
    vm.crash_at(point)
    assert len(vm.qemus()) <= 1

    vm.run(check=0)
    assert len(vm.qemus()) == 1
    vm.converged("running")
    (pid,) = vm.qemus()
    assert pid_of(vm.state_dir, vm.name) == pid
    assert status_rows(vm.state_dir)[vm.name]["state"] == "running"
    vm.responds()
    # Running from the restored state (no new boot) or freshly booted: either way once.
    assert vm.boots() in (1, 2)
    assert record(vm.state_dir, vm.name).get("saved") is None
    assert not state_file.exists() or vm.boots() == 2
    vm.killed_boots_fresh()
