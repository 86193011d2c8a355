"""The plan: a purely computational function from (desired, observed) to ordered actions.

Third stage of desired -> observed -> plan -> apply. No I/O and no clock here: the
same inputs always give the same plan, and every decision carries the reason that
is printed to the user, a "nothing to do" included.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from reconciler.declared import OnChange, Restart, State
from reconciler.observed import (
    ExitReason,
    ObservedVM,
    Readiness,
    Record,
    Status,
)
from reconciler.specdiff import show

if TYPE_CHECKING:
    from reconciler.desired import VM

# Restarts after exits back off: the first at once, then 1 s doubling up to 5 min;
# a VM that ran for 10 min before it ended starts over at once.
BACKOFF_FIRST = 1.0
BACKOFF_CAP = 300.0
BACKOFF_RESET_AFTER = 600.0
# A failed restore is tried again after 5 s, doubling up to 5 min (its file is kept).
RESTORE_BACKOFF_FIRST = 5.0
# While a VM's probes have not all passed, the daemon looks again this soon.
READY_RECHECK = 2.0
# A save or restore cut short and still in progress is looked at again this soon.
INTERRUPTED_RETRY = 1.0


class Kind(StrEnum):
    NONE = "none"
    TERMINATE = "terminate"
    SAVE = "save"
    FORGET = "forget"
    RESTART = "restart"
    PAUSE = "pause"
    UNPAUSE = "unpause"
    RESTORE = "restore"
    START = "start"


# Actions that end a VM's process: they run before the others.
FREEING = frozenset({Kind.TERMINATE, Kind.SAVE, Kind.FORGET})
# Actions that start a QEMU process with the declared hardware.
STARTING = frozenset({Kind.START, Kind.RESTART, Kind.RESTORE})


# "Stop the tasks first, start later -- not vice versa": free resources first.
_ORDER = {kind: rank for rank, kind in enumerate(Kind)}
_ORDER[Kind.NONE] = len(_ORDER)


@dataclass(frozen=True)
class Action:
    kind: Kind
    vm: str
    reason: str
    problem: bool = False  # nothing to do now, but the VM is not as declared
    retry_at: float | None = None  # when a backed-off restart falls due
    after: ExitReason | None = None  # a start that restarts a VM after this exit

    @property
    def changes(self) -> bool:
        return self.kind is not Kind.NONE


def plan(
    desired: Mapping[str, VM],
    observed: Mapping[str, ObservedVM],
    *,
    prune: bool = True,
    keep: Mapping[str, str] | None = None,
    hold: Mapping[str, str] | None = None,
    now: float = 0.0,
) -> list[Action]:
    """One action per VM in desired or observed, terminations first, then by name.

    `prune=False` (the manifests had errors) leaves undeclared VMs as they are, and
    so does `keep` (name -> why) for the VMs it names; `hold` (name -> why) leaves
    VMs alone whether declared or not, as a problem (their record cannot be read:
    one may be running); `now` (wall clock seconds) times backed-off restarts.
    """
    conflicts = disk_conflicts(desired)
    keep, hold = keep or {}, hold or {}
    actions = []
    for name in desired.keys() | observed.keys() | hold.keys():
        if name in hold:
            actions.append(Action(Kind.NONE, name, hold[name], problem=True))
            continue
        if name not in desired and name in keep:
            actions.append(Action(Kind.NONE, name, keep[name]))
            continue
        action = decide(desired.get(name), observed.get(name), name=name, prune=prune,
                        now=now)
        if name in conflicts and action.kind in STARTING:
            action = Action(Kind.NONE, name, conflicts[name], problem=True)
        actions.append(action)
    return sorted(actions, key=lambda a: (_ORDER[a.kind], a.vm))


def disk_conflicts(desired: Mapping[str, VM]) -> dict[str, str]:
    """VMs that would share a disk one of them writes to, with the reason (pure).

    QEMU's image locking would refuse the second one too; this says why, with both
    names, before any disk is touched.
    """
    users: dict[str, list[tuple[str, bool]]] = {}
    for name, vm in desired.items():
        for disk in vm.disks:
            users.setdefault(disk.real_path, []).append((name, not disk.readonly))
    conflicts: dict[str, str] = {}
    for path, using in sorted(users.items()):
        names = sorted({name for name, _ in using})
        if len(names) < 2 or not any(writes for _, writes in using):
            continue
        writers = sorted({name for name, writes in using if writes})
        for name in names:
            others = ", ".join(f"vm '{n}'" for n in names if n != name)
            conflicts.setdefault(name, (
                f"disk {path} is also declared by {others}, and written by "
                f"{', '.join(repr(w) for w in writers)}: a writable disk belongs to one VM "
                "(make it readonly everywhere, or give each VM its own)"))
    return conflicts


def backoff_delay(record: Record, ended_at: float) -> float:
    """Seconds between an exit and the automatic restart that follows it."""
    if ended_at - record.started_at >= BACKOFF_RESET_AFTER or record.backoff == 0:
        return 0.0
    return float(min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (record.backoff - 1)))


def restore_delay(record: Record) -> float:
    """Seconds between a failed restore and the next try (record.backoff: earlier fails)."""
    return float(min(BACKOFF_CAP, RESTORE_BACKOFF_FIRST * 2 ** record.backoff))


def describe(seen: ObservedVM, *, now: float) -> str:
    """The state `reconcile status` shows, like vmctl's (pure).

    An exited VM is judged by the restart policy it was started with.
    """
    if seen.unresponsive:
        return "unresponsive"
    if seen.status in (Status.PAUSED, Status.SAVED):
        return str(seen.status)
    if seen.status is Status.RUNNING:
        return str(seen.ready or "running")
    gone = seen.exit
    if gone is None or gone.requested:
        return "stopped"
    try:
        policy = Restart(seen.record.spec.get("restart", Restart.ALWAYS))
    except ValueError:  # a record from another version: the default policy
        policy = Restart.ALWAYS
    if gone.reason is ExitReason.POWEROFF and policy is not Restart.ALWAYS:
        return "stopped"
    if gone.reason.failure and policy is Restart.NEVER:
        return "exited"
    if now < gone.at + backoff_delay(seen.record, gone.at):
        return "crash-loop"
    return "exited"


def decide(vm: VM | None, seen: ObservedVM | None, *, name: str, prune: bool,
           now: float = 0.0) -> Action:
    """The convergence table of DESIGN.md, one rung per row."""
    if vm is None:
        assert seen is not None
        return _undeclared(seen, prune=prune)
    # Declared, and not running at all.
    if seen is None or seen.status is Status.EXITED:
        if vm.state is State.STOPPED:
            return Action(Kind.NONE, name, "stopped as desired")
        if vm.state is State.SAVED:
            return Action(Kind.NONE, name, "not running: nothing to save")
        return _start(vm, seen, now=now)
    # Saved to a file: restored (with the hardware it was saved with) when declared
    # running or paused, unless that hardware changed and must be restarted; else kept.
    if seen.status is Status.SAVED:
        changed = seen.record.spec_hash != vm.spec_hash()
        failed = seen.record.exit
        if vm.state in (State.RUNNING, State.PAUSED) and failed and not failed.requested:
            due = failed.at + restore_delay(seen.record)
            if now < due:  # the file is kept; trying again at once would fail again
                return Action(Kind.NONE, name, f"restore failed: {failed.detail}; retry in "
                              f"{due - now:.1f}s", problem=True, retry_at=due)
        if vm.state in (State.RUNNING, State.PAUSED):
            if changed and vm.on_change is OnChange.RESTART:
                summary = "; ".join(spec_changes(seen.record.spec, vm.hardware()))
                return Action(Kind.RESTART, name, f"spec changed while saved: {summary}; "
                                                  "restoring it to shut it down cleanly")
            return Action(Kind.RESTORE, name, f"saved but declared {vm.state}")
        if vm.state is State.SAVED:
            return Action(Kind.NONE, name, "saved as desired")
        return Action(Kind.NONE, name, f"stopped; its saved state is kept ({seen.detail})")
    # A save or restore cut short (the reconciler was killed) that the loop could not
    # finish yet: the guest must not run (its memory image would go stale), so nothing
    # else happens to it until it is finished.
    if seen.interrupted is not None:
        return Action(Kind.NONE, name, f"an interrupted {seen.interrupted} is being "
                      f"finished ({seen.detail or 'QMP status ' + seen.qmp_status})",
                      problem=True, retry_at=now + INTERRUPTED_RETRY)
    # Declared stopped or saved, but running or paused.
    if vm.state is State.STOPPED:
        return Action(Kind.TERMINATE, name, f"{seen.status} but declared stopped")
    if vm.state is State.SAVED:
        return Action(Kind.SAVE, name, f"{seen.status} but declared saved")
    # Running or paused with other hardware than declared.
    changes = spec_changes(seen.record.spec, vm.hardware())
    if seen.record.spec_hash != vm.spec_hash():
        summary = "; ".join(changes) or "spec changed"
        if vm.on_change is OnChange.DEFER:
            silent = "" if seen.qmp_answered else f"; {seen.detail}"
            return Action(Kind.NONE, name, f"restart required ({summary}); on_change: "
                          f"defer{silent}", problem=not seen.qmp_answered)
        return Action(Kind.RESTART, name, f"spec changed: {summary}")
    # QMP does not answer: its run state is unknown, and it is not "ok".
    if not seen.qmp_answered:
        return Action(Kind.NONE, name, seen.detail, problem=True)
    # Same hardware: only the run state may differ.
    if vm.state is State.RUNNING and seen.status is Status.PAUSED:
        return Action(Kind.UNPAUSE, name, "paused but declared running")
    if vm.state is State.PAUSED and seen.status is Status.RUNNING:
        return Action(Kind.PAUSE, name, "running but declared paused")
    if seen.ready is Readiness.UNREADY:
        return Action(Kind.NONE, name, seen.ready_detail, problem=True)
    detail = f" ({seen.detail})" if seen.detail else ""
    ready = f", {seen.ready}" if seen.ready else ""
    # Starting: the daemon looks again soon, so a probe's pass is recorded (and the
    # console scanned) while it is fresh, not at the next resync.
    again = now + READY_RECHECK if seen.ready is Readiness.STARTING else None
    if seen.ready is Readiness.STARTING and seen.ready_detail:
        detail = f" ({seen.ready_detail})"
    return Action(Kind.NONE, name, f"{vm.state} as desired{ready}{detail}", retry_at=again)


def _start(vm: VM, seen: ObservedVM | None, *, now: float) -> Action:
    """Declared running or paused, not running: start, as the restart policy allows."""
    name = vm.name
    paused = "; starting paused" if vm.state is State.PAUSED else ""
    gone = seen.exit if seen else None
    # Never started, or stopped by us: declared running is reason enough.
    if seen is None or gone is None or gone.requested:
        return Action(Kind.START, name, f"not running{paused}")
    # A guest reboot is an exit only to QEMU (-no-reboot): always start again.
    if gone.reason is ExitReason.POWEROFF and vm.restart is not Restart.ALWAYS:
        return Action(Kind.NONE, name,
                      f"stopped by the guest ({gone.detail}); restart: {vm.restart}")
    if gone.reason.failure and vm.restart is Restart.NEVER:
        return Action(Kind.NONE, name, f"exited: {gone.detail}; restart: never", problem=True)
    due = gone.at + backoff_delay(seen.record, gone.at)
    if now < due:
        return Action(Kind.NONE, name,
                      f"crash-loop: {gone.detail}; restart {seen.record.restarts + 1} "
                      f"in {due - now:.1f}s", problem=True, retry_at=due)
    count = "starting again" if gone.reason is ExitReason.REBOOT else (
        f"restart {seen.record.restarts + 1} (restart: {vm.restart})")
    return Action(Kind.START, name, f"{gone.detail}; {count}{paused}", after=gone.reason)


def _undeclared(seen: ObservedVM, *, prune: bool) -> Action:
    if not prune:
        return Action(Kind.NONE, seen.name, "not declared, left as it is: manifests have errors")
    if seen.status is Status.SAVED:
        return Action(Kind.FORGET, seen.name, "no longer declared; saved state dropped")
    if seen.status is Status.EXITED:
        return Action(Kind.FORGET, seen.name, "no longer declared; process already gone")
    return Action(Kind.TERMINATE, seen.name, "no longer declared")


def spec_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`field: old -> new` for each hardware field that differs (pure)."""
    return [
        f"{key}: {_show(key, before)} -> {_show(key, after)}"
        for key, before, after in _diff(old, new, prefix="")
        if before != after
    ]


def _diff(
    old: Mapping[str, Any], new: Mapping[str, Any], *, prefix: str
) -> Iterator[tuple[str, Any, Any]]:
    for key in sorted(new):
        before, after = old.get(key), new.get(key)
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            yield from _diff(before, after, prefix=f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", before, after


def _show(key: str, value: Any) -> str:
    """With its unit (`memory: 96M -> 112M`), as the manifest says it."""
    return "unset" if value is None else show(key.rsplit(".", 1)[-1], value)
