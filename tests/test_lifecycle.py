"""The lifecycle with real QEMU: exits, restart policies, reboots, crash loops, adoption,
readiness. The daemon (`reconcile DIR`) notices exits through pidfds, not by polling."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    MARKER,
    Daemon,
    Run,
    alive,
    pid_of,
    record,
    serial,
    status_rows,
    type_on_console,
    vm_manifest,
    wait_for,
    wait_for_serial,
)

pytestmark = pytest.mark.qemu

Reconcile = Callable[..., Run]
StartDaemon = Callable[..., Daemon]
# A long resync: anything faster than it comes from the exit events.
EVENTS_ONLY = ("--resync", "600")


def one_vm(tmp_path: Path, guest: Path, name: str = "solo", *, cmdline: str = "",
           **fields: str) -> Path:
    manifests = tmp_path / "vms"
    manifests.mkdir(exist_ok=True)
    text = vm_manifest(name, guest, **fields)
    if cmdline:
        text = text.replace("console=ttyS0 quiet", f"console=ttyS0 quiet {cmdline}")
    (manifests / f"{name}.yaml").write_text(text)
    return manifests


def wait_for_new_pid(state_dir: Path, name: str, old: int, *, timeout: float = 30) -> int:
    def replaced() -> bool:
        try:
            pid = pid_of(state_dir, name)
        except (FileNotFoundError, ValueError):
            return False
        return pid != old and alive(pid)

    wait_for(replaced, timeout=timeout, what=f"vm {name} to come back")
    return pid_of(state_dir, name)


def test_a_killed_vm_with_restart_always_comes_back_at_once(
    tmp_path: Path, guest: Path, state_dir: Path, daemon: StartDaemon
) -> None:
    d = daemon(one_vm(tmp_path, guest, restart="always"), *EVENTS_ONLY)
    wait_for_serial(state_dir, "solo")
    old = pid_of(state_dir, "solo")
    os.kill(old, signal.SIGKILL)
    wait_for_new_pid(state_dir, "solo", old, timeout=10)
    wait_for_serial(state_dir, "solo", count=2)
    row = status_rows(state_dir)["solo"]
    assert (row["state"], row["restarts"], row["reboots"]) == ("running", 1, 0)
    assert "killed by SIGKILL; restart 1 (restart: always)" in d.text()


def test_a_killed_vm_with_restart_never_stays_exited_and_says_why(
    tmp_path: Path, guest: Path, state_dir: Path, daemon: StartDaemon
) -> None:
    daemon(one_vm(tmp_path, guest, restart="never"), *EVENTS_ONLY)
    wait_for_serial(state_dir, "solo")
    pid = pid_of(state_dir, "solo")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: status_rows(state_dir)["solo"]["state"] == "exited", timeout=10,
             what="status exited")
    row = status_rows(state_dir)["solo"]
    assert (row["pid"], row["exit"], row["detail"]) == (None, "killed", "killed by SIGKILL")
    assert pid_of(state_dir, "solo") == pid


@pytest.mark.parametrize("restart", ["always", "on-failure"])
def test_a_reboot_inside_the_guest_brings_it_back_as_a_reboot(
    tmp_path: Path, guest: Path, state_dir: Path, daemon: StartDaemon, restart: str
) -> None:
    daemon(one_vm(tmp_path, guest, restart=restart), *EVENTS_ONLY)
    wait_for_serial(state_dir, "solo")
    old = pid_of(state_dir, "solo")
    type_on_console(state_dir, "solo", "\nreboot -f\n")
    wait_for_new_pid(state_dir, "solo", old)
    wait_for_serial(state_dir, "solo", count=2)
    rec = record(state_dir, "solo")
    assert (rec["reboots"], rec["restarts"]) == (1, 0)


@pytest.mark.parametrize(("restart", "back"), [
    ("always", True), ("on-failure", False), ("never", False)])
def test_a_poweroff_inside_the_guest_restarts_only_with_always(
    tmp_path: Path, guest: Path, state_dir: Path, daemon: StartDaemon, restart: str,
    back: bool
) -> None:
    daemon(one_vm(tmp_path, guest, restart=restart), *EVENTS_ONLY)
    wait_for_serial(state_dir, "solo")
    old = pid_of(state_dir, "solo")
    type_on_console(state_dir, "solo", "\npoweroff -f\n")
    if back:
        wait_for_new_pid(state_dir, "solo", old)
        assert record(state_dir, "solo")["restarts"] == 1
        return
    wait_for(lambda: not alive(old), timeout=10, what="the guest to power off")
    wait_for(lambda: status_rows(state_dir)["solo"]["exit"] == "poweroff", timeout=10,
             what="the exit to be recorded")
    row = status_rows(state_dir)["solo"]
    assert (row["state"], row["detail"]) == ("stopped", "guest powered off")
    assert pid_of(state_dir, "solo") == old


def test_a_pending_stop_wins_over_a_guest_that_reboots_instead(
    tmp_path: Path, guest: Path, state_dir: Path, daemon: StartDaemon
) -> None:
    # This guest's power button reboots it: vmd's EAGAIN case.
    manifests = one_vm(tmp_path, guest, cmdline="rg.powerbtn=reboot")
    daemon(manifests, "--resync", "0.5")
    wait_for_serial(state_dir, "solo")
    pid = pid_of(state_dir, "solo")
    path = manifests / "solo.yaml"
    path.write_text(path.read_text() + "state: stopped\n")
    wait_for(lambda: not alive(pid), timeout=20, what="the VM to end")
    wait_for(lambda: status_rows(state_dir)["solo"]["state"] == "stopped", timeout=10,
             what="status stopped")
    assert "power button pressed, rebooting" in serial(state_dir, "solo")
    assert pid_of(state_dir, "solo") == pid
    assert serial(state_dir, "solo").count(MARKER) == 1


def test_a_guest_that_panics_at_once_goes_into_a_crash_loop(
    tmp_path: Path, guest: Path, state_dir: Path, daemon: StartDaemon
) -> None:
    daemon(one_vm(tmp_path, guest, cmdline="rg.action=panic"), *EVENTS_ONLY)
    rows: list[dict[str, object]] = []  # the row that said so: the next restart may follow

    def crash_loop() -> bool:
        rows[:] = [status_rows(state_dir).get("solo", {})]
        return rows[0].get("state") == "crash-loop"

    wait_for(crash_loop, timeout=60, what="status crash-loop")
    row = rows[0]
    assert row["exit"] == "panic" and isinstance(row["restarts"], int) and row["restarts"] >= 1
    assert row["pid"] is None


def test_vms_outlive_the_daemon_and_are_adopted_unchanged(
    tmp_path: Path, guest: Path, state_dir: Path, daemon: StartDaemon
) -> None:
    manifests = one_vm(tmp_path, guest, "one")
    one_vm(tmp_path, guest, "two")
    first = daemon(manifests, *EVENTS_ONLY)
    for name in ("one", "two"):
        wait_for_serial(state_dir, name)
    pids = {name: pid_of(state_dir, name) for name in ("one", "two")}
    assert first.stop(signal.SIGTERM) == 0

    for n, how in enumerate((signal.SIGKILL, signal.SIGTERM), 2):
        again = daemon(manifests, *EVENTS_ONLY)  # the daemons share one log
        wait_for(lambda d=again, n=n: d.text().count("watching") == n, timeout=30,
                 what="daemon up")
        wait_for(lambda: all(r["state"] == "running" for r in status_rows(state_dir).values()),
                 timeout=10, what="both running")
        again.stop(how)
        rows = status_rows(state_dir)
        assert {n: (r["pid"], r["restarts"]) for n, r in rows.items()} == {
            n: (pid, 0) for n, pid in pids.items()}
    assert "started (pid" not in first.log.read_text().split("watching")[-1]


def test_ready_serial_marks_the_vm_ready(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile
) -> None:
    manifests = one_vm(tmp_path, guest, ready="{serial: 'guest: up uptime=[0-9.]+', timeout: 60s}")
    run = reconcile("--once", "--wait", manifests, check=0)
    assert "started (pid" in run.out and "; ready after " in run.out
    assert MARKER in serial(state_dir, "solo")
    assert status_rows(state_dir)["solo"]["state"] == "ready"


def test_a_ready_pattern_that_never_shows_fails_with_the_console_tail(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile
) -> None:
    manifests = one_vm(tmp_path, guest, ready="{serial: 'login:', timeout: 6s}")
    run = reconcile("--once", "--wait", manifests)
    assert run.code == 1, run
    assert "not ready within 6s: serial: no 'login:' on the console yet; console tail:" in run.out
    assert MARKER in run.out  # the tail shows how far the guest got
    again = reconcile("--once", manifests)
    assert again.code == 1 and "not ready" in again.out
    assert status_rows(state_dir)["solo"]["state"] == "unready"


def test_saved_then_running_resumes_the_same_boot(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile
) -> None:
    manifests = one_vm(tmp_path, guest, cmdline="rg.bootid=1", memory="256M")
    reconcile("--once", manifests, check=0)
    wait_for_serial(state_dir, "solo")
    boot_id = re.search(r"boot-id (\w+)", serial(state_dir, "solo"))
    assert boot_id is not None
    path = manifests / "solo.yaml"
    running = path.read_text()
    old_pid = pid_of(state_dir, "solo")

    path.write_text(running + "state: saved\n")
    saved = reconcile("--once", manifests, check=0)
    assert "changed  running but declared saved: saved to " in saved.out
    state_file = state_dir / "vms" / "solo" / "saved.state"
    assert state_file.stat().st_size > 0 and not alive(old_pid)
    assert status_rows(state_dir)["solo"]["state"] == "saved"
    assert "saved as desired" in reconcile("--once", manifests, check=0).out

    path.write_text(running)
    restored = reconcile("--once", manifests, check=0)
    assert "changed  saved but declared running: restored from " in restored.out
    assert not state_file.exists()
    assert status_rows(state_dir)["solo"]["state"] == "running"
    type_on_console(state_dir, "solo", "\necho alive-$((40+2))\n")
    wait_for_serial(state_dir, "solo", "alive-42", timeout=20)
    console = serial(state_dir, "solo")
    assert re.findall(r"boot-id (\w+)", console) == [boot_id[1]]  # no new boot
    assert console.count(MARKER) == 1


def test_a_guest_ready_when_saved_is_ready_when_restored(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile
) -> None:
    # The restored guest never prints its boot marker again: readiness is kept.
    manifests = one_vm(tmp_path, guest, ready="{serial: 'guest: up uptime', timeout: 20s}")
    reconcile("--once", "--wait", manifests, check=0)
    path = manifests / "solo.yaml"
    running = path.read_text()
    path.write_text(running + "state: saved\n")
    reconcile("--once", manifests, check=0)
    path.write_text(running)
    restored = reconcile("--once", "--wait", manifests, check=0)
    assert "restored from " in restored.out and "ready after" in restored.out, restored
    assert status_rows(state_dir)["solo"]["state"] == "ready"
    time.sleep(21)  # past the timeout: still ready, and --once still converged
    again = reconcile("--once", manifests, check=0)
    assert "running as desired, ready" in again.out, again
    assert serial(state_dir, "solo").count(MARKER) == 1
