"""The plan: a purely computational function from (desired, observed) to ordered actions.

Third stage of desired -> observed -> plan -> apply. No I/O and no clock here: the
same inputs always give the same plan, and every decision carries the reason that
is printed to the user, a "nothing to do" included.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from reconciler.desired import VM, OnChange, State
from reconciler.observed import ObservedVM, Status


class Kind(StrEnum):
    NONE = "none"
    TERMINATE = "terminate"
    FORGET = "forget"
    RESTART = "restart"
    PAUSE = "pause"
    UNPAUSE = "unpause"
    START = "start"


# "Stop the tasks first, start later -- not vice versa": free resources first.
_ORDER = {kind: rank for rank, kind in enumerate(Kind)}
_ORDER[Kind.NONE] = len(_ORDER)


@dataclass(frozen=True)
class Action:
    kind: Kind
    vm: str
    reason: str

    @property
    def changes(self) -> bool:
        return self.kind is not Kind.NONE


def plan(
    desired: Mapping[str, VM],
    observed: Mapping[str, ObservedVM],
    *,
    prune: bool = True,
) -> list[Action]:
    """One action per VM in desired or observed, terminations first, then by name.

    `prune=False` (the manifests had errors) leaves undeclared VMs as they are.
    """
    actions = [
        decide(desired.get(name), observed.get(name), name=name, prune=prune)
        for name in desired.keys() | observed.keys()
    ]
    return sorted(actions, key=lambda a: (_ORDER[a.kind], a.vm))


def decide(vm: VM | None, seen: ObservedVM | None, *, name: str, prune: bool) -> Action:
    """The convergence table of DESIGN.md, one rung per row."""
    if vm is None:
        assert seen is not None
        return _undeclared(seen, prune=prune)
    # Declared, and not running at all.
    if seen is None or seen.status is Status.EXITED:
        if vm.state is State.STOPPED:
            return Action(Kind.NONE, name, "stopped as desired")
        why = "not running" if seen is None else "process has exited"
        if vm.state is State.PAUSED:
            return Action(Kind.START, name, f"{why}; starting paused")
        return Action(Kind.START, name, why)
    # Declared stopped, but running or paused.
    if vm.state is State.STOPPED:
        return Action(Kind.TERMINATE, name, f"{seen.status} but declared stopped")
    # Running or paused with other hardware than declared.
    changes = spec_changes(seen.record.spec, vm.hardware())
    if seen.record.spec_hash != vm.spec_hash():
        summary = "; ".join(changes) or "spec changed"
        if vm.on_change is OnChange.DEFER:
            return Action(Kind.NONE, name, f"restart required ({summary}); on_change: defer")
        return Action(Kind.RESTART, name, f"spec changed: {summary}")
    # Same hardware: only the run state may differ.
    if vm.state is State.RUNNING and seen.status is Status.PAUSED:
        return Action(Kind.UNPAUSE, name, "paused but declared running")
    if vm.state is State.PAUSED and seen.status is Status.RUNNING:
        return Action(Kind.PAUSE, name, "running but declared paused")
    detail = f" ({seen.detail})" if seen.detail else ""
    return Action(Kind.NONE, name, f"{vm.state} as desired{detail}")


def _undeclared(seen: ObservedVM, *, prune: bool) -> Action:
    if not prune:
        return Action(Kind.NONE, seen.name, "not declared, left as it is: manifests have errors")
    if seen.status is Status.EXITED:
        return Action(Kind.FORGET, seen.name, "no longer declared; process already gone")
    return Action(Kind.TERMINATE, seen.name, "no longer declared")


def spec_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`field: old -> new` for each hardware field that differs (pure)."""
    return [
        f"{key}: {_show(before)} -> {_show(after)}"
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


def _show(value: Any) -> str:
    return "unset" if value is None else str(value)
