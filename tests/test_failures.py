"""Failure paths through the real command line, with a fake QEMU (tests/fake_qemu.py).

No guest boots here: the fake answers QMP at once and misbehaves as FAKE_QEMU says,
so a launch that fails, a QMP that never answers, a VM that ignores every way to stop
it but SIGKILL, a record that cannot be read and a restore that fails are quick to test.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fake_qemu
import pytest
from conftest import Run, alive, pid_of, record, run_reconcile, vm_manifest, wait_for

from reconciler import kvm


class Fake:
    """`reconcile` with the fake QEMU first on PATH; what the fakes did, in FAKE_QEMU_LOG."""

    def __init__(self, tmp_path: Path, state_dir: Path, guest: Path) -> None:
        self.state_dir, self.guest = state_dir, guest
        self.manifests = tmp_path / "vms"
        self.manifests.mkdir()
        self.log = tmp_path / "fake-qemu.jsonl"
        self.bin = tmp_path / "bin"
        fake_qemu.install(self.bin)
        # The fakes run as the unprivileged QEMU user: they reach the wrapper and the log
        # through the test's dirs (search only) and append to the log.
        for up in (tmp_path, *tmp_path.parents[:2]):
            up.chmod(up.stat().st_mode | 0o011)
        self.log.touch()
        self.log.chmod(0o666)

    def declare(self, name: str, **fields: str) -> Path:
        path = self.manifests / f"{name}.yaml"
        path.write_text(vm_manifest(name, self.guest, **fields))
        return path

    def run(self, *args: str | Path, qemu: str = "", check: int | None = None,
            env: dict[str, str] | None = None) -> Run:
        """`reconcile ARGS` with FAKE_QEMU=qemu for the fakes it starts (and env)."""
        full = {"PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                "FAKE_QEMU": qemu, "FAKE_QEMU_LOG": str(self.log), **(env or {})}
        return run_reconcile(self.state_dir, *args, env=full, check=check)

    def once(self, *, qemu: str = "", check: int | None = None) -> Run:
        return self.run("--once", self.manifests, qemu=qemu, check=check)

    def starts(self) -> list[dict[str, Any]]:
        return fake_qemu.log_entries(self.log, "start")

    def commands(self, pid: int) -> list[str]:
        return [e["execute"] for e in fake_qemu.log_entries(self.log, "qmp") if e["pid"] == pid]

    def live(self) -> list[int]:
        """The fakes of this test still running."""
        return fake_qemu.processes_with("fake_qemu.py", str(self.state_dir))


@pytest.fixture
def fake(tmp_path: Path, state_dir: Path, guest: Path) -> Iterator[Fake]:
    f = Fake(tmp_path, state_dir, guest)
    yield f
    # Before state_dir's own teardown, which reads every record: leave none it cannot.
    fake_qemu.kill_all(f.live())
    for path in state_dir.glob("vms/*/record.json"):
        path.unlink()


def vm_text(run: Run, name: str) -> str:
    """The VM's line of a run's output, without its name, with its continuation lines."""
    lines = run.out.splitlines()
    for i, line in enumerate(lines):
        if line.split(None, 1)[:1] == [name]:
            rest = []
            for m in lines[i + 1:]:
                if not m.startswith(" "):
                    break
                rest.append(m.strip())
            return "\n".join([line.split(None, 1)[1], *rest])
    raise AssertionError(f"no line for vm {name}:\n{run}")


def saved_file(state_dir: Path, name: str) -> Path:
    return state_dir / "vms" / name / "saved.state"


# --- launch ---------------------------------------------------------------------

def test_a_qemu_that_cannot_start_fails_with_its_output_then_backs_off(fake: Fake) -> None:
    fake.declare("boom")
    first = fake.once(qemu="exit-at-once", check=1)
    text = vm_text(first, "boom")
    assert text.startswith("failed"), first
    assert "fake-qemu: boom: cannot open /dev/fake" in text, first

    # The first restart is at once (a one-off failure costs nothing) ...
    again = fake.once(qemu="exit-at-once")
    assert again.code == 1 and "restart 1" in vm_text(again, "boom"), again
    assert len(fake.starts()) == 2
    # ... then it backs off instead of hammering.
    third = fake.once(qemu="exit-at-once")
    assert third.code == 1, third
    assert "crash-loop" in vm_text(third, "boom"), third
    assert re.search(r" in \d+(\.\d+)?s", vm_text(third, "boom")), third
    assert len(fake.starts()) == 2


@pytest.mark.parametrize("qemu", ["no-qmp", "deaf-qmp"])
def test_a_qemu_whose_qmp_never_answers_is_killed_after_the_launch_timeout(
    fake: Fake, qemu: str
) -> None:
    fake.declare("mute")
    began = time.monotonic()
    run = fake.once(qemu=qemu, check=1)
    took = time.monotonic() - began
    text = vm_text(run, "mute")
    assert text.startswith("failed") and "QMP" in text, run
    assert took >= kvm.LAUNCH_TIMEOUT, f"gave up after {took:.1f}s"
    (start,) = fake.starts()
    assert not alive(start["pid"]) and fake.live() == []


# --- terminate ------------------------------------------------------------------

def test_a_vm_deaf_to_powerdown_quit_and_sigterm_is_killed(fake: Fake, state_dir: Path) -> None:
    fake.declare("stubborn", stop_timeout="1s")
    fake.once(qemu="ignore-powerdown,ignore-quit,ignore-sigterm", check=0)
    pid = pid_of(state_dir, "stubborn")
    assert alive(pid)

    fake.declare("stubborn", stop_timeout="1s", state="stopped")
    run = fake.once(check=0)
    assert vm_text(run, "stubborn") == (
        "changed  running but declared stopped: terminated: killed"), run
    assert not alive(pid) and fake.live() == []
    assert {"system_powerdown", "quit"} <= set(fake.commands(pid))


# --- the state dir --------------------------------------------------------------

def test_an_unreadable_record_is_named_and_its_vm_is_not_started_twice(
    fake: Fake, state_dir: Path
) -> None:
    fake.declare("kept")
    fake.once(check=0)
    pid = pid_of(state_dir, "kept")
    path = state_dir / "vms" / "kept" / "record.json"
    path.write_text("{this is not json")

    run = fake.once()
    assert run.code != 0, run
    assert str(path) in run.out + run.err, run
    assert alive(pid) and fake.live() == [pid]
    assert [s["pid"] for s in fake.starts()] == [pid]


def test_a_net_error_while_collecting_bridges_is_reported_not_raised(
    tmp_path: Path, guest: Path, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reconciler import loop, net
    from reconciler.loop import Outcome, reconcile_once
    from reconciler.observed import StateDir
    from reconciler.plan import Kind

    class BrokenNet:
        """Every netlink call fails, as with a bridge that vanished under us."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def close(self) -> None:
            pass

        def __getattr__(self, name: str) -> Any:
            def fail(*args: object, **kwargs: object) -> Any:
                raise net.NetError("cannot remove bridge br0: Device or resource busy",
                                   ifname="br0")

            return fail

    monkeypatch.setattr(net, "Net", BrokenNet)
    if hasattr(loop, "Net"):
        monkeypatch.setattr(loop, "Net", BrokenNet)
    (tmp_path / "vm.yaml").write_text(vm_manifest("quiet", guest, state="stopped"))
    state = StateDir(state_dir)
    state.vms_dir.mkdir(parents=True)
    state.set_created_bridges({"br0"})

    report = asyncio.run(reconcile_once(tmp_path / "vm.yaml", state))
    assert [(r.vm, r.outcome, r.action, r.reason) for r in report.results] == [
        ("quiet", Outcome.OK, Kind.NONE, "stopped as desired")]
    assert any("br0" in error for error in report.errors), report.errors


# --- saved state ----------------------------------------------------------------

@pytest.fixture
def saved(fake: Fake, state_dir: Path) -> Path:
    """VM 'sv' started on the fake, then saved: its saved.state, written by the fake."""
    fake.declare("sv")
    fake.once(check=0)
    fake.declare("sv", state="saved")
    run = fake.once(check=0)
    assert "saved to " in vm_text(run, "sv"), run
    path = saved_file(state_dir, "sv")
    assert path.read_bytes().startswith(fake_qemu.SAVED_MAGIC)
    assert fake.live() == []
    return path


def test_the_fake_saves_and_restores_as_qemu_does(fake: Fake, saved: Path, state_dir: Path
                                                   ) -> None:
    fake.declare("sv")
    run = fake.once(check=0)
    assert vm_text(run, "sv").startswith("changed  saved but declared running: restored from")
    assert not saved.exists()
    pid = pid_of(state_dir, "sv")
    assert fake.live() == [pid]
    assert "-incoming" in fake.starts()[-1]["argv"]
    assert fake.commands(pid)[-1] == "cont"


def test_a_saved_state_whose_vm_is_no_longer_declared_is_kept_in_orphaned(
    fake: Fake, saved: Path, state_dir: Path
) -> None:
    content = saved.read_bytes()
    fake.declare("other", state="stopped")  # the dir must not be empty, or nothing is pruned
    (fake.manifests / "sv.yaml").unlink()
    run = fake.once(check=0)
    assert "orphaned" in vm_text(run, "sv"), run
    (kept,) = (state_dir / "orphaned").iterdir()
    assert kept.read_bytes() == content
    assert str(kept) in run.out
    assert not (state_dir / "vms" / "sv").exists()


def test_a_failed_restore_keeps_the_saved_state_and_backs_off(
    fake: Fake, saved: Path
) -> None:
    fake.declare("sv")
    run = fake.once(qemu="fail-incoming")
    assert run.code == 1, run
    assert vm_text(run, "sv").startswith("failed"), run
    assert "load of migration failed" in run.out, run
    assert saved.exists() and fake.live() == []
    starts = len(fake.starts())
    assert "-incoming" in fake.starts()[-1]["argv"]

    again = fake.once(qemu="fail-incoming")
    assert "retry in" in vm_text(again, "sv"), again
    assert len(fake.starts()) == starts
    assert saved.exists()


@pytest.mark.slow  # the restore timeout, 15 s, must pass
def test_a_restore_slower_than_its_timeout_fails_and_keeps_the_saved_state(
    fake: Fake, saved: Path
) -> None:
    fake.declare("sv")
    began = time.monotonic()
    run = fake.once(qemu="slow-incoming=40")
    took = time.monotonic() - began
    assert run.code == 1, run
    assert vm_text(run, "sv").startswith("failed"), run
    assert kvm.LAUNCH_TIMEOUT <= took < 40, f"took {took:.1f}s: {run}"
    assert saved.exists() and fake.live() == []


# --- saves and restores cut short (found by trying to break them) ---------------

def test_a_restore_still_loading_after_a_kill_is_never_resumed_early(
    fake: Fake, saved: Path, state_dir: Path
) -> None:
    fake.declare("sv")
    killed = fake.run("--once", fake.manifests, qemu="slow-incoming=3",
                      env={"RECONCILER_FAULT": "mid-restore"})
    assert killed.code == -9, killed
    (pid,) = fake.live()
    # Still loading: left alone, the guest is not resumed, the record keeps the file.
    run = fake.once()
    assert run.code == 1 and "interrupted restore" in vm_text(run, "sv"), run
    assert "cont" not in fake.commands(pid)
    assert record(state_dir, "sv")["saved"] == str(saved) and saved.exists()
    # Loaded: the record lets go of the file first, then the guest resumes.
    wait_for(lambda: fake.once().code == 0, timeout=30, what="the restore finished")
    assert record(state_dir, "sv")["saved"] is None and not saved.exists()
    assert fake.live() == [pid] and fake.commands(pid)[-1] == "cont"


def test_down_after_a_killed_save_quits_qemu_and_keeps_the_state(
    fake: Fake, state_dir: Path
) -> None:
    fake.declare("sv")
    fake.once(check=0)
    pid = pid_of(state_dir, "sv")
    fake.declare("sv", state="saved")
    killed = fake.run("--once", fake.manifests, env={"RECONCILER_FAULT": "after-save"})
    assert killed.code == -9, killed
    down = fake.run("down")
    assert down.code == 0, down
    assert "system_powerdown" not in fake.commands(pid) and "cont" not in fake.commands(pid)
    assert fake.live() == [] and saved_file(state_dir, "sv").exists()
    fake.declare("sv")
    run = fake.once(check=0)
    assert "restored from" in vm_text(run, "sv"), run


def test_a_save_killed_after_migrate_began_is_finished_not_stuck(
    fake: Fake, state_dir: Path
) -> None:
    fake.declare("sv")
    fake.once(check=0)
    fake.declare("sv", state="saved")
    killed = fake.run("--once", fake.manifests, env={"RECONCILER_FAULT": "mid-save"})
    assert killed.code == -9, killed
    run = fake.once(check=0)
    assert "saved as desired" in vm_text(run, "sv"), run
    assert "finished an interrupted save" in run.err, run
    assert saved_file(state_dir, "sv").read_bytes().startswith(fake_qemu.SAVED_MAGIC)
    assert fake.live() == []


def test_one_state_dir_spelled_two_ways_never_runs_a_vm_twice(
    fake: Fake, tmp_path: Path, state_dir: Path
) -> None:
    state_dir.mkdir()
    link = tmp_path / "state-link"
    link.symlink_to(state_dir)
    fake.declare("tw")
    killed = fake.run("--once", fake.manifests, "--state-dir", link,
                      env={"RECONCILER_FAULT": "after-spawn"})
    assert killed.code == -9, killed
    run = fake.once(check=0)  # the same dir, by its real path
    assert len(fake.live()) == 1 and len(fake.starts()) == 1, run


def test_a_live_qemu_whose_record_is_missing_is_held_not_twinned(
    fake: Fake, state_dir: Path
) -> None:
    fake.declare("mr")
    fake.once(check=0)
    (state_dir / "vms" / "mr" / "record.json").unlink()  # and QEMU writes no pidfile
    run = fake.once()
    assert run.code == 1 and "record.json is missing" in run.err, run
    assert len(fake.live()) == 1 and len(fake.starts()) == 1


def test_a_stray_file_in_the_state_dir_is_not_a_vm(fake: Fake, state_dir: Path) -> None:
    fake.declare("ok")
    fake.once(check=0)
    (state_dir / "vms" / ".DS_Store").write_text("")
    (state_dir / "vms" / "notes.txt").write_text("")
    run = fake.once(check=0)
    assert "unreadable" not in run.err, run
