"""One reconcile pass: load desired, observe, plan, apply; and what it reports.

`reconcile_once()` is the unit: `--once` calls it once, watch mode on each wake-up.
It sits on top of desired -> observed -> plan -> apply and is the only place
where their results meet the driver (`kvm.py`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from reconciler import desired as desired_mod
from reconciler import kvm
from reconciler.desired import VM, Declared, State
from reconciler.observed import ObservedVM, StateDir, observe
from reconciler.plan import Action, Kind, plan

log = logging.getLogger("reconciler")

# vmd's "staggered start parallel N": starts run concurrently up to this many.
DEFAULT_PARALLEL = 4


class Outcome(StrEnum):
    OK = "ok"
    CHANGED = "changed"
    PENDING = "pending"
    FAILED = "failed"


@dataclass(frozen=True)
class Result:
    """What one pass did (or, with --check, would do) to one VM."""

    vm: str
    outcome: Outcome
    action: Kind
    reason: str
    detail: str = ""


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def count(self, outcome: Outcome) -> int:
        return sum(r.outcome is outcome for r in self.results)

    @property
    def failed(self) -> bool:
        return bool(self.errors) or self.count(Outcome.FAILED) > 0

    @property
    def pending(self) -> bool:
        return self.count(Outcome.PENDING) > 0

    def exit_code(self) -> int:
        """0 converged, 1 anything failed, 2 changes pending (--check)."""
        if self.failed:
            return 1
        return 2 if self.pending else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "converged": not self.failed and not self.pending,
            "errors": self.errors,
            "results": [asdict(r) for r in self.results],
        }


async def reconcile_once(
    manifests: Path, state: StateDir, *, check: bool = False, parallel: int = DEFAULT_PARALLEL
) -> Report:
    """Load, observe, plan and (unless check) apply, once."""
    loaded = desired_mod.load(manifests)
    report = Report(errors=[str(e) for e in loaded.errors])
    if not loaded.files and not loaded.errors:
        report.errors.append(f"{manifests}: no *.yaml or *.yml manifests found")
    seen, problems = await observe(state, kvm.query_status)
    report.errors += problems
    actions = plan(
        {name: d.vm for name, d in loaded.vms.items()}, seen, prune=not report.errors
    )
    if check:
        report.results = [
            Result(a.vm, Outcome.PENDING if a.changes else Outcome.OK, a.kind, a.reason)
            for a in actions
        ]
        return report
    applier = _Applier(state, loaded.vms, seen, parallel=parallel)
    report.results = await applier.apply(actions)
    return report


class _Applier:
    """Carries out a plan: terminations first, then the rest, each bounded in parallel."""

    def __init__(self, state: StateDir, declared: dict[str, Declared],
                 seen: dict[str, ObservedVM], *, parallel: int) -> None:
        self.state, self.declared, self.seen = state, declared, seen
        self.slots = asyncio.Semaphore(parallel)

    async def apply(self, actions: Iterable[Action]) -> list[Result]:
        actions = list(actions)
        freeing = [a for a in actions if a.kind in (Kind.TERMINATE, Kind.FORGET)]
        rest = [a for a in actions if a not in freeing]
        results = await asyncio.gather(*(self._one(a) for a in freeing))
        results += await asyncio.gather(*(self._one(a) for a in rest))
        return list(results)

    async def _one(self, action: Action) -> Result:
        if not action.changes:
            return Result(action.vm, Outcome.OK, action.kind, action.reason)
        step: Callable[[Action], Awaitable[str]] = getattr(self, f"_{action.kind.value}")
        try:
            async with self.slots:
                detail = await step(action)
        except (kvm.DriverError, OSError) as err:
            log.info("vm '%s': %s failed: %s", action.vm, action.kind, err)
            return Result(action.vm, Outcome.FAILED, action.kind, action.reason, str(err))
        except Exception as err:  # a bug in one action must not stop the others
            log.debug("vm '%s': %s crashed", action.vm, action.kind, exc_info=True)
            detail = f"internal error: {type(err).__name__}: {err}"
            return Result(action.vm, Outcome.FAILED, action.kind, action.reason, detail)
        log.info("vm '%s': %s: %s", action.vm, action.kind, detail)
        return Result(action.vm, Outcome.CHANGED, action.kind, action.reason, detail)

    async def _start(self, action: Action) -> str:
        decl = self.declared[action.vm]
        vm = decl.vm
        record = await kvm.start(
            vm, self.state.paths(vm.name), source=str(decl.file),
            paused=vm.state is State.PAUSED, remember=self.state.write,
        )
        how = "started paused" if vm.state is State.PAUSED else "started"
        return f"{how} (pid {record.pid}, {record.accel})"

    async def _terminate(self, action: Action) -> str:
        seen = self.seen[action.vm]
        vm: VM | None = self.declared[action.vm].vm if action.vm in self.declared else None
        timeout = vm.stop_timeout if vm else float(seen.record.spec.get("stop_timeout", 30))
        how = await kvm.terminate(seen.record, self.state.paths(action.vm), timeout=timeout)
        if vm is None:
            self.state.forget(action.vm)
        return f"terminated: {how}"

    async def _forget(self, action: Action) -> str:
        self.state.forget(action.vm)
        return "record removed"

    async def _restart(self, action: Action) -> str:
        stopped = await self._terminate(action)
        started = await self._start(action)
        return f"{stopped}; {started}"

    async def _pause(self, action: Action) -> str:
        await kvm.pause(self.state.paths(action.vm))
        return "paused"

    async def _unpause(self, action: Action) -> str:
        await kvm.unpause(self.state.paths(action.vm))
        return "resumed"


async def down(state: StateDir) -> list[tuple[str, str]]:
    """Terminate every managed VM gracefully (vmd's vmm_shutdown); records are kept."""
    seen, _ = await observe(state, kvm.query_status)

    async def one(vm: ObservedVM) -> tuple[str, str]:
        if vm.status.value == "exited":
            return vm.name, "not running"
        timeout = float(vm.record.spec.get("stop_timeout", 30))
        try:
            how = await kvm.terminate(vm.record, state.paths(vm.name), timeout=timeout)
        except (kvm.DriverError, OSError) as err:
            return vm.name, f"failed: {err}"
        return vm.name, f"terminated: {how}"

    return list(await asyncio.gather(*(one(vm) for vm in sorted(seen.values(),
                                                                  key=lambda v: v.name))))
