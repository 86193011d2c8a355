"""Exits and restarts: why a VM ended, what the policy does, and the backoff schedule."""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_plan import seen, vm

from reconciler.observed import Exit, ExitReason, ObservedVM, Readiness, Status, exit_cause
from reconciler.plan import Kind, backoff_delay, describe, plan

# --- why QEMU ended, from what it left behind ---------------------------------

TRACE = "qemu_system_shutdown_request reason={}\n"


@pytest.mark.parametrize(("log", "pidfile_left", "status", "expected"), [
    (TRACE.format(6), False, 0, (ExitReason.POWEROFF, "guest powered off")),
    (TRACE.format(8), False, 1, (ExitReason.PANIC, "guest panicked")),
    (TRACE.format(2), False, 0, (ExitReason.QUIT, "quit over QMP")),
    ("", False, 0, (ExitReason.REBOOT, "guest rebooted")),
    ("", False, None, (ExitReason.REBOOT, "guest rebooted")),
    ("", True, -9, (ExitReason.KILLED, "killed by SIGKILL")),
    ("", True, None, (ExitReason.KILLED, "ended without a clean exit (killed or crashed)")),
    # Without a pidfile (privsep), a reset's clean exit is known by its trace alone.
    ("vm_state_notify running 1 reason 9 (running)\n"
     "vm_state_notify running 0 reason 11 (shutdown)\n", True, None,
     (ExitReason.REBOOT, "guest rebooted")),
    ("vm_state_notify running 1 reason 9 (running)\n", True, None,
     (ExitReason.KILLED, "ended without a clean exit (killed or crashed)")),
    ("qemu-system-x86_64: terminating on signal 15 from pid 7 (kill)\n", False, 0,
     (ExitReason.KILLED, "terminated by SIGTERM")),
    ("qemu: could not load kernel 'x'\n", False, 1,
     (ExitReason.CRASHED, "QEMU exited with code 1: qemu: could not load kernel 'x'")),
])
def test_exit_causes_are_read_from_trace_pidfile_and_status(
    log: str, pidfile_left: bool, status: int | None, expected: tuple[ExitReason, str]
) -> None:
    assert exit_cause(qemu_log=log, pidfile_left=pidfile_left, status=status) == expected


def test_reboots_and_poweroffs_are_not_failures() -> None:
    assert [r for r in ExitReason if not r.failure] == [ExitReason.REBOOT, ExitReason.POWEROFF]


# --- restart policy -----------------------------------------------------------

def exited(reason: ExitReason, *, restart: str = "always", at: float = 100.0,
           backoff: int = 0, started_at: float = 99.0, requested: bool = False) -> ObservedVM:
    base = seen(vm(restart=restart), Status.EXITED)
    record = replace(base.record, started_at=started_at, backoff=backoff)
    gone = Exit(reason, reason.value, at, requested=requested)
    return ObservedVM(base.name, Status.EXITED, record, gone.detail, exit=gone)


def decide(observed: ObservedVM, *, now: float = 100.0, **fields: object):  # type: ignore[no-untyped-def]
    fields.setdefault("restart", observed.record.spec["restart"])
    (action,) = plan({"web": vm(**fields)}, {"web": observed}, now=now)
    return action


@pytest.mark.parametrize("restart", ["always", "on-failure", "never"])
def test_a_guest_reboot_starts_the_vm_again_whatever_the_policy(restart: str) -> None:
    action = decide(exited(ExitReason.REBOOT, restart=restart))
    assert (action.kind, action.after, action.reason) == (
        Kind.START, ExitReason.REBOOT, "reboot; starting again")


def test_a_pending_stop_wins_over_a_reboot() -> None:
    action = decide(exited(ExitReason.REBOOT, requested=True), state="stopped")
    assert (action.kind, action.reason) == (Kind.NONE, "stopped as desired")


@pytest.mark.parametrize(("restart", "kind"), [
    ("always", Kind.START), ("on-failure", Kind.NONE), ("never", Kind.NONE)])
def test_a_guest_poweroff_restarts_only_with_always(restart: str, kind: Kind) -> None:
    action = decide(exited(ExitReason.POWEROFF, restart=restart))
    assert action.kind is kind and not action.problem
    if kind is Kind.NONE:
        assert action.reason == f"stopped by the guest (poweroff); restart: {restart}"


@pytest.mark.parametrize("reason", [ExitReason.KILLED, ExitReason.PANIC, ExitReason.CRASHED])
def test_failures_restart_unless_never(reason: ExitReason) -> None:
    assert decide(exited(reason, restart="on-failure")).kind is Kind.START
    assert decide(exited(reason, restart="always")).kind is Kind.START
    never = decide(exited(reason, restart="never"))
    assert (never.kind, never.problem) == (Kind.NONE, True)
    assert never.reason == f"exited: {reason.value}; restart: never"


def test_a_vm_stopped_by_the_reconciler_starts_when_declared_running_again() -> None:
    action = decide(exited(ExitReason.QUIT, restart="never", requested=True))
    assert (action.kind, action.after) == (Kind.START, None)


# --- backoff, on a fake clock -------------------------------------------------

def test_the_backoff_schedule_is_0_then_1s_doubling_capped_at_300s() -> None:
    record = seen(vm()).record
    delays = [backoff_delay(replace(record, started_at=0, backoff=n), 5.0) for n in range(12)]
    assert delays == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]


def test_ten_minutes_of_running_resets_the_backoff() -> None:
    record = replace(seen(vm()).record, started_at=0, backoff=8)
    assert backoff_delay(record, 599.0) == 128
    assert backoff_delay(record, 600.0) == 0


def test_a_crash_loop_waits_for_its_due_time_then_restarts() -> None:
    crashed = exited(ExitReason.PANIC, at=100.0, backoff=3)  # due at 100 + 4
    waiting = decide(crashed, now=101.0)
    assert (waiting.kind, waiting.problem, waiting.retry_at) == (Kind.NONE, True, 104.0)
    assert waiting.reason == "crash-loop: panic; restart 1 in 3.0s"
    assert describe(crashed, now=101.0) == "crash-loop"
    due = decide(crashed, now=104.0)
    assert (due.kind, due.after) == (Kind.START, ExitReason.PANIC)


@pytest.mark.parametrize(("observed", "expected"), [
    (exited(ExitReason.POWEROFF, restart="on-failure"), "stopped"),
    (exited(ExitReason.KILLED, restart="never"), "exited"),
    (exited(ExitReason.KILLED, requested=True), "stopped"),
    (exited(ExitReason.KILLED, backoff=0), "exited"),
    (seen(vm(), Status.PAUSED), "paused"),
    (seen(vm()), "running"),
    (replace(seen(vm()), ready=Readiness.STARTING), "starting"),
    (replace(seen(vm()), ready=Readiness.READY), "ready"),
])
def test_status_describes_each_state(observed: ObservedVM, expected: str) -> None:
    assert describe(observed, now=100.0) == expected
