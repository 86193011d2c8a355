"""One reconcile pass: load desired, observe, plan, apply.

`reconcile_once()` is the unit: `--once` calls it once, the daemon (daemon.py) on
every wake-up. This is the only place where desired, observed and plan meet the
driver (`kvm.py`), the disks (`storage.py`) and the network (`net.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from ipaddress import IPv4Network
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from reconciler import cgroups, faults, kvm, probes
from reconciler.declared import Declared, Manifests, State, host_routes, parse_cpus
from reconciler.listing import DEFAULT_MAX_MANIFEST_BYTES
from reconciler.manifests import load as load_manifests
from reconciler.observed import (
    Exit,
    ExitReason,
    Interrupted,
    ObservedVM,
    Readiness,
    Record,
    StateDir,
    StateDirError,
    Status,
    atomic_write,
    console_since,
    console_tail,
    is_alive,
    observe,
    post_mortem,
    read_json,
)
from reconciler.plan import (
    BACKOFF_RESET_AFTER,
    FREEING,
    READY_RECHECK,
    STARTING,
    Action,
    Kind,
    describe,
    plan,
)
from reconciler.specdiff import spec_diff

if TYPE_CHECKING:
    from reconciler.desired import VM, Switch

log = logging.getLogger("reconciler")

# vmd's "staggered start parallel N": starts run concurrently up to this many.
DEFAULT_PARALLEL = 4
READY_POLL = 0.05


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
    after: str | None = None  # the exit an automatic restart follows


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    retry_at: float | None = None  # the earliest backed-off restart
    states: dict[str, str] = field(default_factory=dict)  # each VM's state after the pass
    diffs: dict[str, str] = field(default_factory=dict)  # `--diff`: VM -> its spec's diff

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
            **({"diffs": self.diffs} if self.diffs else {}),
        }


async def reconcile_once(
    manifests: Path, state: StateDir, *, check: bool = False,
    parallel: int | None = None, wait: bool = False,
    max_bytes: int = DEFAULT_MAX_MANIFEST_BYTES,
    allow_dirs: Sequence[Path] = (), diff: bool = False, stagger: float | None = None,
    inflight: Inflight | None = None, empty_ok: bool = False,
) -> Report:
    """Load, observe, plan and (unless check) apply, once; `wait`: until ready;
    `diff`: with each changed VM's spec diff (recorded -> declared). `parallel` and
    `stagger` (starts at most that many at once, that many seconds apart) override
    the directory's `kind: Settings`. `inflight` (the daemon's): each VM's action runs
    as a task of its own; the pass returns when its wake-up event is set, leaving the
    actions still running to finish by themselves, and the next pass leaves those VMs
    alone until they have. `empty_ok`: the directory is written by the reconciler
    itself (a cluster member's), so no manifests means no VMs, and they are pruned.
    """
    # Observing (records, /proc, each VM's QMP) needs nothing of the manifests: it
    # runs while they load (validation, or a validation ahead being waited for).
    now = time.time()
    observing = asyncio.ensure_future(observe(state, kvm.query_status, now=now))
    try:
        loaded = await asyncio.to_thread(
            load_manifests, manifests, state_dir=state.root, max_bytes=max_bytes,
            allow_dirs=allow_dirs, cache_dir=state.cache_dir)
    finally:
        seen, unreadable = await observing
    report = Report(errors=[str(e) for e in loaded.errors])
    if not loaded.files and not loaded.errors and not empty_ok:
        report.errors.append(f"{manifests}: no *.yaml or *.yml manifests found; "
                             "nothing is pruned (`reconcile down` stops every VM)")
    busy = set(inflight.tasks) if inflight is not None else set()
    if not check and await _recover(state, seen, now=now, busy=busy):
        now = time.time()
        seen, unreadable = await observe(state, kvm.query_status, now=now)
    seen = await assess(state, seen, now=now, persist=not check)
    report.errors += unreadable.values()
    actions = plan({name: d.vm for name, d in loaded.vms.items()}, seen,
                   prune=not report.errors, keep=_not_prunable(manifests, loaded, seen),
                   hold=unreadable, now=now)
    report.retry_at = min((a.retry_at for a in actions if a.retry_at), default=None)
    if diff:
        report.diffs = _diffs(loaded.vms, seen, actions)
    if check:
        report.results = [_unapplied(a, Outcome.PENDING if a.changes else Outcome.OK)
                          for a in actions]
        return report
    skipped = [a for a in actions if a.vm in busy]
    actions = [a for a in actions if a.vm not in busy]
    _count_silence(state, seen, now=now)
    given = loaded.settings
    if parallel is None:
        parallel = (given.parallel if given else None) or DEFAULT_PARALLEL
    if stagger is None:
        stagger = (given.stagger if given else None) or 0.0
    applier = _Applier(state, loaded.vms, seen, parallel=parallel, stagger=stagger,
                       bridges={n: d.switch.bridge for n, d in loaded.switches.items()},
                       local={n: d.switch for n, d in loaded.switches.items()
                              if d.switch.local},
                       prune=not report.errors, inflight=inflight)
    try:
        report.results = await applier.apply(actions)
        report.errors += applier.errors
    finally:
        applier.close()
    if inflight is not None:
        report.results += inflight.drain()  # what earlier passes left running, now done
        report.results += [Result(a.vm, Outcome.OK, Kind.NONE, f"busy: its "
                                  f"{inflight.kinds[a.vm]} is still under way; looked at "
                                  "again when it is done")
                           for a in skipped if a.vm in inflight.kinds]
    if wait:
        report.results = await _wait_ready(state, report.results)
    report.states = _states_after(report.results, loaded.vms, seen, now=now)
    # A VM started now with a `ready:` probe is looked at again soon, not only at the
    # next resync: its readiness (status, a cluster's report, priority groups) follows.
    started = [r.vm for r in report.results if r.outcome is Outcome.CHANGED
               and r.action in STARTING and r.vm in loaded.vms
               and loaded.vms[r.vm].vm.ready is not None]
    if started:
        again = time.time() + READY_RECHECK
        report.retry_at = min(report.retry_at or again, again)
    return report


def _diffs(declared: dict[str, Declared], seen: dict[str, ObservedVM],
           actions: Sequence[Action]) -> dict[str, str]:
    """Each VM whose spec changes in this pass: its diff, recorded -> declared."""
    acted = {a.vm for a in actions if a.changes}
    found = {}
    for name in sorted(set(declared) | acted):
        old = seen[name].record.spec if name in seen else None
        new = declared[name].vm.spec() if name in declared else None
        if name in acted or (old is not None and old != new):
            text = spec_diff(name, old, new)
            if text:
                found[name] = text
    return found


async def _recover(state: StateDir, seen: dict[str, ObservedVM], *, now: float,
                   busy: Iterable[str] = ()) -> bool:
    """Finish what a reconciler killed mid-step left half done; True if anything was.

    - a QEMU spawned before its pid reached the record is adopted (never a twin);
    - a QEMU that saved its state but was not yet quit is quit (the file holds it);
    - a restore that has loaded lets go of its file (the state lives in QEMU now);
      one that did not load in time is killed (its guest never ran: the file stays).
    """
    acted = False
    skip = set(busy)  # being acted on right now (the daemon's actions still running)
    for vm in seen.values():
        if vm.name in skip:
            continue
        record, paths = vm.record, state.paths(vm.name)
        try:
            if vm.adopted:
                state.write(record)
                log.warning("vm '%s': adopted QEMU pid %d, which its record did not name "
                            "(a start was interrupted)", vm.name, record.pid)
                acted = True
            if vm.interrupted is Interrupted.SAVE:
                how = await kvm.quit_qemu(record, paths)
                log.warning("vm '%s': finished an interrupted save: QEMU %s", vm.name, how)
                acted = True
            elif vm.interrupted is Interrupted.RESTORE:
                acted |= await _finish_restore(state, vm, now=now)
            elif vm.qmp_status == "postmigrate":  # killed between migrate and record
                acted |= await _finish_save(state, vm)
        except (kvm.DriverError, OSError) as err:
            log.warning("vm '%s': cannot finish an interrupted step: %s", vm.name, err)
    return acted


async def _finish_restore(state: StateDir, vm: ObservedVM, *, now: float) -> bool:
    record, paths = vm.record, state.paths(vm.name)
    assert record.saved is not None
    saved = Path(record.saved)
    if vm.qmp_answered and vm.qmp_status != "inmigrate":  # loaded, still paused
        state.update(vm.name, record.pid, saved=None, saved_pid=0)
        saved.unlink(missing_ok=True)
        log.warning("vm '%s': an interrupted restore had loaded; %s removed", vm.name, saved)
        return True
    try:
        timeout = kvm.restore_timeout(saved.stat().st_size)
    except OSError:
        timeout = kvm.LAUNCH_TIMEOUT
    if now < record.started_at + timeout:
        return False  # still loading: the next pass looks again
    state.update(vm.name, record.pid, exit=Exit(
        ExitReason.CRASHED, f"restore did not load within {timeout:.0f}s", now))
    await kvm.quit_qemu(record, paths)
    log.warning("vm '%s': an interrupted restore did not load in %.0fs; QEMU ended, "
                "%s kept", vm.name, timeout, saved)
    return True


async def _finish_save(state: StateDir, vm: ObservedVM) -> bool:
    """A save cut short after QMP `migrate` began: keep it if complete, else undo it."""
    record, paths = vm.record, state.paths(vm.name)
    partial = kvm.partial_of(paths.saved_state)
    status = await kvm.migration_status(paths)
    if status in ("active", "setup", "pre-switchover", "device"):
        return False  # still writing: the next pass looks again
    if status == "completed" and partial.is_file():
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, paths.saved_state)
        state.update(vm.name, record.pid, saved=str(paths.saved_state), saved_pid=record.pid,
                     stopping=True)
        how = await kvm.quit_qemu(record, paths)
        log.warning("vm '%s': finished an interrupted save to %s: QEMU %s", vm.name,
                    paths.saved_state, how)
        return True
    # Not complete (or its file is gone): as if never asked; the plan asks again.
    partial.unlink(missing_ok=True)
    await kvm.unpause(paths)
    state.update(vm.name, record.pid, stopping=False)
    log.warning("vm '%s': an interrupted save did not complete (%s); the guest resumes",
                vm.name, status)
    return True


async def assess(state: StateDir, seen: dict[str, ObservedVM], *, now: float,
                 persist: bool) -> dict[str, ObservedVM]:
    """Each running VM's readiness (probes.assess); `persist`: keep what the probes
    found in the records (a pass does; `status` and --check only look)."""

    async def one(vm: ObservedVM) -> ObservedVM:
        if vm.status not in (Status.RUNNING, Status.PAUSED) or vm.interrupted:
            return vm
        verdict = await probes.assess(vm.record, state, now=now)
        if persist and verdict.changes:
            state.update(vm.name, vm.record.pid, **verdict.changes)
        return replace(vm, ready=verdict.ready, ready_detail=verdict.detail)

    assessed = await asyncio.gather(*(one(vm) for vm in seen.values()))
    return {vm.name: vm for vm in assessed}


async def look(state: StateDir, *, now: float) -> tuple[
        dict[str, ObservedVM], dict[str, list[probes.Address]], dict[str, str]]:
    """What `status` shows: every VM observed and assessed, with its addresses (by
    name), and the unreadable records; nothing is written."""
    seen, problems = await observe(state, kvm.query_status, now=now, a_pass=False)
    seen = await assess(state, seen, now=now, persist=False)
    live = [vm for vm in seen.values() if vm.status in (Status.RUNNING, Status.PAUSED)]
    found = await asyncio.gather(*(probes.addresses(state, vm.record) for vm in live))
    return seen, {vm.name: a for vm, a in zip(live, found, strict=True)}, problems


def _count_silence(state: StateDir, seen: dict[str, ObservedVM], *, now: float) -> None:
    """Remember for how many passes (and since when) each VM's QMP has not answered."""
    for vm in seen.values():
        record = vm.record
        if vm.status not in (Status.RUNNING, Status.PAUSED):
            continue
        if not vm.qmp_answered:
            state.update(vm.name, record.pid, qmp_failures=record.qmp_failures + 1,
                         qmp_silent_since=record.qmp_silent_since or now)
        elif record.qmp_failures or record.qmp_silent_since is not None:
            state.update(vm.name, record.pid, qmp_failures=0, qmp_silent_since=None)


def _not_prunable(manifests: Path, loaded: Manifests,
                  seen: dict[str, ObservedVM]) -> dict[str, str]:
    """Undeclared VMs that stay: a VM is pruned only on evidence.

    The evidence: its source file no longer exists at all, or was read and no longer
    declares it. So `reconcile --once vms/web.yaml` leaves the VMs of vms/db.yaml
    alone, a file that became empty keeps its VMs (an editor's truncate-then-write is
    not a deletion: delete the file to remove them), and so does a file that exists
    but was not read (hidden, another suffix, unreadable).
    """
    root = manifests.absolute()
    read = {str(path.absolute()) for path in loaded.files}
    empty = {str(path.absolute()) for path in loaded.empty}
    keep = {}
    for name, vm in seen.items():
        source = Path(vm.record.source)
        if name in loaded.vms:
            continue
        if source != root and root not in source.parents:
            keep[name] = f"declared in {source}, outside {manifests}: left as it is"
        elif str(source) in empty:
            keep[name] = (f"{source} is empty: left as it is (delete the file to remove "
                          "its VMs)")
        elif str(source) not in read and os.path.lexists(source):
            keep[name] = (f"{source} exists but is not read as a manifest (hidden, not "
                          "*.yaml/*.yml, or unreadable): left as it is")
    return keep


def _unapplied(action: Action, outcome: Outcome) -> Result:
    return Result(action.vm, Outcome.FAILED if action.problem else outcome, action.kind,
                  action.reason)


def _states_after(results: Iterable[Result], declared: dict[str, Declared],
                  seen: dict[str, ObservedVM], *, now: float) -> dict[str, str]:
    """Each VM's state once the pass is done: declared where it changed, else as seen."""
    states = {}
    for result in results:
        if result.outcome is Outcome.CHANGED:
            if result.vm in declared:
                wanted = declared[result.vm].vm.state
                states[result.vm] = "stopped" if wanted is State.STOPPED else str(wanted)
        elif result.vm in seen:
            states[result.vm] = describe(seen[result.vm], now=now)
    return states


class Inflight:
    """The daemon's VM actions in progress, across passes: at most one per VM.

    A pass that is woken (`wake`: a VM exit, a manifest change) returns without waiting
    for its slow actions (a guest taking its stop_timeout to power off); they go on as
    tasks, and when one ends it wakes the daemon, its result goes into the next report.
    """

    def __init__(self, wake: asyncio.Event) -> None:
        self.wake = wake
        self.tasks: dict[str, asyncio.Task[Result]] = {}
        self.kinds: dict[str, str] = {}
        self._done: list[Result] = []
        self._detached: set[asyncio.Task[Result]] = set()

    def add(self, name: str, kind: str, task: asyncio.Task[Result]) -> None:
        self.tasks[name], self.kinds[name] = task, kind

        def finished(done: asyncio.Task[Result]) -> None:
            if self.tasks.get(name) is done:
                del self.tasks[name], self.kinds[name]
            if done in self._detached:  # its pass is over: report it in the next
                self._detached.discard(done)
                if not done.cancelled() and done.exception() is None:
                    self._done.append(done.result())
                self.wake.set()

        task.add_done_callback(finished)

    def detach(self, tasks: Iterable[asyncio.Task[Result]]) -> None:
        self._detached.update(t for t in tasks if not t.done())

    def drain(self) -> list[Result]:
        done, self._done = self._done, []
        return done

    async def settle(self) -> None:
        """Until every action under way has ended (the daemon's exit)."""
        while self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)


_T = TypeVar("_T")


class _Interrupted(Exception):
    """The daemon was woken while this pass waited on its actions."""


class _Applier:
    """Carries out a plan: terminations first, then the rest, each bounded in parallel."""

    def __init__(self, state: StateDir, declared: dict[str, Declared],
                 seen: dict[str, ObservedVM], *, parallel: int,
                 bridges: dict[str, str], local: dict[str, Switch] | None = None,
                 prune: bool = False, stagger: float = 0.0,
                 inflight: Inflight | None = None) -> None:
        self.state, self.declared, self.seen = state, declared, seen
        self.inflight = inflight
        self._mine: list[asyncio.Task[Result]] = []  # this pass's actions
        self.slots = asyncio.Semaphore(parallel)
        self.stagger = stagger  # seconds between two QEMU launches (vmd's delay)
        self._launch_lock = asyncio.Lock()
        self._next_launch = 0.0
        self.bridges = bridges  # switch name -> bridge
        self.local = local or {}  # the local switches declared (vmd's local interface)
        self.prune = prune  # undeclared local switches may go (no manifest has errors)
        self.network = Network(state)
        self.errors: list[str] = []  # what went wrong outside any one VM

    def close(self) -> None:
        """Once every action of this pass has ended (some may outlive it: Inflight)."""
        running = [t for t in self._mine if not t.done()]
        if not running:
            self.network.close()
            return
        for task in running:
            task.add_done_callback(lambda _: self.close() if all(
                t.done() for t in self._mine) else None)

    def _run(self, action: Action) -> asyncio.Task[Result]:
        task = asyncio.ensure_future(self._one(action))
        self._mine.append(task)
        if self.inflight is not None:
            self.inflight.add(action.vm, action.kind.value, task)
        return task

    async def _all(self, actions: Iterable[Action]) -> list[Result]:
        """Each action as a task of its own; their results. With the daemon's Inflight,
        _Interrupted as soon as it is woken, the tasks going on by themselves."""
        tasks = [self._run(a) for a in actions]
        if not tasks:
            return []
        try:
            return await self._unless_woken(asyncio.gather(*tasks))
        except _Interrupted:
            assert self.inflight is not None
            self.inflight.detach(tasks)  # they go on, and report in a later pass
            raise

    async def _unless_woken(self, work: asyncio.Future[_T]) -> _T:
        """work's result; with the daemon's Inflight, _Interrupted if the daemon is woken
        first (work is left running: the caller decides what becomes of it)."""
        if self.inflight is None:
            return await work
        woken: asyncio.Future[Any] = asyncio.ensure_future(self.inflight.wake.wait())
        either: list[asyncio.Future[Any]] = [work, woken]
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
        if not work.done():
            raise _Interrupted
        return work.result()

    async def apply(self, actions: Iterable[Action]) -> list[Result]:
        results: list[Result] = []
        try:
            await self._apply(list(actions), results)
        except _Interrupted:
            log.info("woken while actions run: they go on; a new pass starts now")
        return results

    async def _apply(self, actions: list[Action], results: list[Result]) -> None:
        """Stops first, lowest priority first, a priority group at a time; then starts,
        highest priority first: a group whose VMs declare `ready` is waited for (ready
        or failed) before the next; the other actions run alongside."""
        freeing = [a for a in actions if a.kind in FREEING]
        starting = [a for a in actions if a.kind in STARTING]
        rest = [a for a in actions if a not in freeing and a not in starting]
        for group in self._groups(freeing, highest_first=False):
            results += await self._all(group)
        await self._local_switches()
        others = asyncio.ensure_future(self._all(rest))
        try:
            groups = self._groups(starting, highest_first=True)
            for index, group in enumerate(groups):
                done = await self._all(group)
                results += done
                if index < len(groups) - 1:
                    await self._until_ready(self._priority(groups[index + 1][0].vm))
        finally:
            results += await others
        try:
            if self.prune:
                await asyncio.to_thread(self.network.remove_local, set(self.local))
            await asyncio.to_thread(self.network.collect_bridges)
        except Exception as err:  # the VMs' outcomes stand; the bridge waits for a pass
            log.debug("bridge collection failed", exc_info=True)
            self.errors.append(f"switches: cannot remove unused bridges: {err}")

    def _priority(self, name: str) -> int:
        if name in self.declared:
            return self.declared[name].vm.priority
        seen = self.seen.get(name)
        value = seen.record.spec.get("priority", 0) if seen is not None else 0
        return value if isinstance(value, int) else 0

    def _groups(self, actions: list[Action], *, highest_first: bool) -> list[list[Action]]:
        """actions by their VMs' priority, one group per priority, in order."""
        by: dict[int, list[Action]] = {}
        for action in actions:
            by.setdefault(self._priority(action.vm), []).append(action)
        return [by[p] for p in sorted(by, reverse=highest_first)]

    async def _until_ready(self, below: int) -> None:
        """Before VMs of priority `below` start: every running VM of a higher priority
        that declares `ready`, until ready or failed (started now or by an earlier pass)."""
        records, _ = self.state.records()
        waiting = [name for name, decl in self.declared.items()
                   if decl.vm.priority > below and decl.vm.ready is not None
                   and name in records and is_alive(records[name])]
        wait = asyncio.gather(*(wait_ready(self.state, n) for n in waiting))
        try:
            verdicts = await self._unless_woken(wait)
        except _Interrupted:
            wait.cancel()  # the next pass waits again, for what is still starting
            raise
        for name, (verdict, _) in zip(waiting, verdicts, strict=True):
            log.info("vm '%s': %s; the next priority group may start", name, verdict)

    async def _launch_turn(self) -> float:
        """Wait for this launch's turn, at least `stagger` seconds after the last one:
        the time it is taken (the record's started_at; QEMU is spawned right after)."""
        async with self._launch_lock:
            while (wait := self._next_launch - time.time()) > 0:
                await asyncio.sleep(wait)
            now = time.time()
            self._next_launch = now + self.stagger
            return now

    def _turn(self) -> Callable[[], Awaitable[float]] | None:
        return self._launch_turn if self.stagger else None

    async def _local_switches(self) -> None:
        """Each local switch's address, DHCP and NAT, before any VM on it starts."""
        if not self.local and not self.state.switches_dir.is_dir():
            return
        running = [vm.record for vm in self.seen.values() if vm.status is not Status.EXITED]
        try:
            for line in await asyncio.to_thread(self.network.ensure_local, self.local,
                                                self.declared, running):
                log.info("%s", line)
        except Exception as err:  # VMs on other switches go on; this is reported
            log.debug("local switches failed", exc_info=True)
            self.errors.append(f"switches: {err}")

    async def _one(self, action: Action) -> Result:
        try:
            if not action.changes:
                await self._refresh(action.vm)
                return _unapplied(action, Outcome.OK)
            step: Callable[[Action], Awaitable[str]] = getattr(self, f"_{action.kind.value}")
            async with self.slots:
                detail = await step(action)
        except (kvm.DriverError, OSError, StateDirError) as err:
            log.warning("vm '%s': %s failed: %s", action.vm, action.kind, err)
            return Result(action.vm, Outcome.FAILED, action.kind, action.reason, str(err))
        except Exception as err:  # a bug in one action must not stop the others
            log.debug("vm '%s': %s crashed", action.vm, action.kind, exc_info=True)
            detail = f"internal error: {type(err).__name__}: {err}"
            return Result(action.vm, Outcome.FAILED, action.kind, action.reason, detail)
        log.info("vm '%s': %s (%s): %s", action.vm, action.kind, action.reason, detail)
        return Result(action.vm, Outcome.CHANGED, action.kind, action.reason, detail,
                      after=action.after)

    async def _refresh(self, name: str) -> None:
        """Keep a running VM's record in step with the fields it follows live."""
        seen, decl = self.seen.get(name), self.declared.get(name)
        if seen is None or decl is None or seen.status is Status.EXITED:
            return
        spec, source = decl.vm.spec(), str(decl.file.absolute())
        fresh = seen.record.spec == spec and seen.record.source == source
        if not fresh and seen.record.spec_hash == decl.vm.spec_hash():
            live = seen.status in (Status.RUNNING, Status.PAUSED)
            placed = ("cpus", "resources")
            if live and any(spec.get(k) != seen.record.spec.get(k) for k in placed):
                detail = await self._place(decl.vm, seen.record.pid)
                if detail:
                    log.info("vm '%s': %s", name, detail.lstrip("; "))
            dropped = {"limits": None} if decl.vm.resources is None else {}
            self.state.update(name, seen.record.pid, spec=spec, source=source, **dropped)

    async def _start(self, action: Action) -> str:
        decl = self.declared[action.vm]
        vm = decl.vm
        taps = await asyncio.to_thread(self.network.plug, vm, self.bridges)
        try:
            if vm.cloud_init is not None:
                await asyncio.to_thread(build_seed, self.state, vm, [m for _, m in taps])
            record = await kvm.start(
                vm, self.state.paths(vm.name), source=str(decl.file.absolute()),
                paused=vm.state is State.PAUSED, remember=self.state.write,
                history=self._history(action), taps=taps, turn=self._turn(),
            )
        except BaseException:
            self.network.remove_taps(vm.name, [tap for tap, _ in taps])
            raise
        how = "started paused" if vm.state is State.PAUSED else "started"
        return f"{how} (pid {record.pid}, {record.accel}){await self._place(vm, record.pid)}"

    async def _place(self, vm: VM, pid: int) -> str:
        """vCPU threads onto `cpus:` (sched_setaffinity; works without cgroups), and the
        process into its cgroup with its `resources:` (or pending, with the reason)."""
        detail = ""
        if vm.cpus is not None:
            threads = await kvm.pin_vcpus(self.state.paths(vm.name), parse_cpus(vm.cpus))
            detail = f"; {len(threads)} vCPU thread(s) pinned to CPUs {vm.cpus}"
        limits = None
        if vm.resources is not None:  # most VMs: no thread hop on every start
            limits = await asyncio.to_thread(cgroups.place, vm.name, vm.resources, pid)
        if limits is not None:
            self.state.update(vm.name, pid, limits=limits.to_json())
        if limits is not None and limits.state == "pending":
            log.warning("vm '%s': resources pending: %s", vm.name, limits.reason)
            detail += f"; resources pending: {limits.reason}"
        elif limits is not None:
            detail += f"; resources applied in {limits.cgroup}"
        return detail

    async def _save(self, action: Action) -> str:
        return await save_vm(self.state, self.seen[action.vm].record, self.network)

    async def _restore(self, action: Action) -> str:
        """vmd's receive: start from the saved file; it is deleted only once loaded.

        Until the restore has loaded, the record keeps the file (a restore that fails
        or is killed leaves it to be tried again, with backoff); once loaded, the
        record lets go of it before the guest runs, so a later exit can never bring
        back that old memory image over disks that moved on.
        """
        decl, old = self.declared[action.vm], self.seen[action.vm].record
        assert old.saved is not None
        saved = Path(old.saved)
        from pydantic import ValidationError

        from reconciler.desired import VM

        try:  # the hardware it was saved with; a later pass applies any change
            hardware = VM.model_validate({**old.spec, **decl.vm.model_dump(
                mode="json", include=set(VM.LIVE_FIELDS))}, context={"from_record": True})
        except ValidationError as err:
            raise kvm.DriverError(f"cannot restore from {saved}: the spec it was saved "
                                  f"with is no longer valid: {err}") from err
        history = self._history(action)
        failed = old.exit is not None and not old.exit.requested
        history["backoff"] = old.backoff + 1 if failed else 0
        began = time.monotonic()
        paths = self.state.paths(action.vm)
        taps = await asyncio.to_thread(self.network.plug, hardware, self.bridges)
        try:
            record = await kvm.start(
                hardware, paths, source=str(decl.file.absolute()),
                paused=decl.vm.state is State.PAUSED, history=history,
                remember=self.state.write, restore_from=saved, taps=taps, turn=self._turn(),
                keep={"saved": old.saved, "saved_pid": old.saved_pid,
                      # ready when saved: ready when restored (no second boot marker)
                      "ready_at": old.ready_at, "ready_passed": old.ready_passed},
            )
        except BaseException:
            self.network.remove_taps(action.vm, [tap for tap, _ in taps])
            raise
        self.state.write(replace(record, saved=None, saved_pid=0))
        saved.unlink(missing_ok=True)
        await self._place(decl.vm, record.pid)
        faults.hit("after-restore")
        if decl.vm.state is not State.PAUSED:
            await kvm.unpause(paths)  # a saved guest was stopped: it loads paused
        return f"restored from {saved} in {time.monotonic() - began:.2f}s (pid {record.pid})"

    def _history(self, action: Action) -> dict[str, int]:
        """Counters the new record carries over from the last run of the VM."""
        seen = self.seen.get(action.vm)
        if seen is None:
            return {}
        old = seen.record
        history = {"restarts": old.restarts, "reboots": old.reboots, "backoff": 0}
        if action.after is not None and seen.exit is not None:
            ran = seen.exit.at - old.started_at
            history["backoff"] = 0 if ran >= BACKOFF_RESET_AFTER else old.backoff + 1
            key = "reboots" if action.after is ExitReason.REBOOT else "restarts"
            history[key] += 1
        return history

    async def _terminate(self, action: Action) -> str:
        seen = self.seen[action.vm]
        vm: VM | None = self.declared[action.vm].vm if action.vm in self.declared else None
        how = await terminate(self.state, seen.record,
                              timeout=vm.stop_timeout if vm else None, network=self.network)
        if vm is None:
            self.state.forget(action.vm)
        return f"terminated: {how}"

    async def _forget(self, action: Action) -> str:
        await asyncio.to_thread(self.network.unplug, self.seen[action.vm].record)
        kept = self.state.forget(action.vm)
        return "record removed" + (f"; its saved state was kept at {kept}" if kept else "")

    async def _restart(self, action: Action) -> str:
        seen = self.seen[action.vm]
        restored = ""
        if seen.status is Status.SAVED:
            # The guest gets to shut down cleanly (its page cache is in the saved state).
            restored = await self._restore(action) + "; "
            records, _ = self.state.records()
            self.seen[action.vm] = replace(seen, status=Status.RUNNING,
                                           record=records[action.vm])
        stopped = await self._terminate(action)
        started = await self._start(action)
        return f"{restored}{stopped}; {started}"

    async def _pause(self, action: Action) -> str:
        await kvm.pause(self.state.paths(action.vm))
        return "paused"

    async def _unpause(self, action: Action) -> str:
        await kvm.unpause(self.state.paths(action.vm))
        return "resumed"


def build_seed(state: StateDir, vm: VM, macs: list[str]) -> None:
    """The VM's cloud-init seed in its state dir (0600), with its pinned SSH host key;
    rewritten only when its content changed."""
    from reconciler import seed

    assert vm.cloud_init is not None
    paths = state.paths(vm.name)
    paths.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ci, texts = vm.cloud_init, vm.cloud_init.texts()
    try:
        key = seed.ensure_host_key(paths.dir, comment=f"{vm.name} (reconciler)")
        files = seed.render(
            hostname=vm.hostname, user=ci.user, ssh_authorized_keys=ci.authorized_keys(),
            user_data=texts.get("user_data"), network_config=texts.get("network_config"),
            meta_data=ci.meta_data, macs=macs, host_key=key)
        if seed.write_seed(paths.seed, files):
            log.info("vm '%s': wrote its cloud-init seed %s", vm.name, paths.seed)
    except seed.SeedError as err:
        raise kvm.DriverError(f"vm '{vm.name}': cloud-init seed: {err}") from err


async def terminate(state: StateDir, record: Record, *, timeout: float | None,
                    network: Network) -> str:
    """Mark the VM as stopping (so its exit is not a failure), terminate it, unplug it."""
    if timeout is None:
        timeout = float(record.spec.get("stop_timeout", 30))
    state.update(record.name, record.pid, stopping=True)
    if record.saved:  # a saved or restoring QEMU: its guest must not run again
        how = await kvm.quit_qemu(record, state.paths(record.name))
    else:
        how = await kvm.terminate(record, state.paths(record.name), timeout=timeout)
    await asyncio.to_thread(network.unplug, record)
    return how


class Network:
    """Switches and taps for the VMs of one pass; pyroute2 is loaded only when needed."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self._net: Any = None

    def _open(self) -> Any:
        if self._net is None:
            from reconciler.net import Net

            self._net = Net()
        return self._net

    def close(self) -> None:
        if self._net is not None:
            self._net.close()
            self._net = None

    def plug(self, vm: VM, bridges: dict[str, str]) -> list[tuple[str, str]]:
        """The bridge and a tap for each interface (vmd's opentap): (tap, MAC)s."""
        if not vm.interfaces:
            return []
        from reconciler.net import NetError, mac_address, tap_name

        net, plugged = self._open(), []
        try:
            for index, nic in enumerate(vm.interfaces):
                bridge = bridges[nic.switch]
                if net.ensure_bridge(bridge):
                    self.state.set_created_bridges(self.state.created_bridges() | {bridge})
                    log.info("switch '%s': created bridge %s", nic.switch, bridge)
                tap, mac = tap_name(vm.name, index), nic.mac or mac_address(vm.name, index)
                net.ensure_tap(tap, bridge, mac)
                plugged.append((tap, mac))
        except NetError as err:
            raise kvm.DriverError(f"vm '{vm.name}': {err}") from err
        return plugged

    def unplug(self, record: Record) -> None:
        """Remove the taps (and the cgroup) of a VM whose process has ended."""
        if is_alive(record):
            return
        if record.taps:
            self.remove_taps(record.name, record.taps)
        if record.limits and record.limits.get("cgroup"):
            try:
                cgroups.remove(record.limits["cgroup"])
            except cgroups.CgroupError as err:
                log.warning("vm '%s': %s", record.name, err)

    def remove_taps(self, vm: str, taps: list[str]) -> None:
        """Remove taps (a failure is only logged: the VM's own outcome stands)."""
        if not taps:
            return
        from reconciler.net import NetError

        net = self._open()
        for tap in taps:
            try:
                net.remove_tap(tap)
            except NetError as err:
                log.warning("vm '%s': %s", vm, err)

    def ensure_local(self, local: dict[str, Switch], declared: dict[str, Declared],
                     running: list[Record]) -> list[str]:
        """Converge every local switch: bridge, its address, dnsmasq with a static lease
        for each declared VM interface (and each running VM's, so a VM whose manifest
        broke keeps its address), NAT. One sentence per change."""
        from reconciler.localnet import (
            LocalNetError,
            assign_addresses,
            default_subnet,
            gateway,
        )

        done: list[str] = []
        net = self._open()
        ours = {s.bridge for s in local.values()}
        taken = [s.subnet for s in local.values() if s.subnet is not None]
        taken += [n for n, dev in host_routes() if dev not in ours]
        for name, switch in sorted(local.items()):
            if net.ensure_bridge(switch.bridge):
                self.state.set_created_bridges(self.state.created_bridges() | {switch.bridge})
                done.append(f"switch '{name}': created bridge {switch.bridge}")
            paths = self._switch_paths(name)
            config = read_json(paths.dir / "switch.json")
            subnet = switch.subnet
            if subnet is None:
                kept = _subnet(config.get("subnet"))
                free = kept is not None and not any(kept.overlaps(t) for t in taken)
                subnet = kept if free and kept else default_subnet(name, taken=taken)
            taken.append(subnet)
            atomic_write(paths.dir / "switch.json", json.dumps({
                "subnet": str(subnet), "bridge": switch.bridge, "nat": switch.nat,
                "dns": switch.dns}) + "\n")
            macs, names = _macs_on(name, declared, running)
            gw = gateway(subnet)
            if net.ensure_address(switch.bridge, str(gw.ip), gw.network.prefixlen):
                done.append(f"switch '{name}': {switch.bridge} has address {gw}")
            try:
                leases = assign_addresses(subnet, macs, previous=read_json(paths.addresses))
                done += [f"switch '{name}': {line}" for line in self._local(
                    paths, name, switch, subnet).ensure(leases, names)]
            except (LocalNetError, ValueError) as err:
                raise kvm.DriverError(f"switch '{name}': {err}") from err
        return done

    def remove_local(self, declared: set[str]) -> None:
        """Stop the DHCP and NAT of local switches no longer declared and no longer used."""
        root = self.state.switches_dir
        if not root.is_dir():
            return
        from reconciler.localnet import LocalNetError, gateway

        net = self._open()
        for entry in sorted(root.iterdir()):
            if entry.name in declared or entry.name.startswith(".") or not entry.is_dir():
                continue
            config = read_json(entry / "switch.json")
            bridge, subnet = str(config.get("bridge", "")), _subnet(config.get("subnet"))
            if subnet is None or (bridge and net.exists(bridge) and net.bridge_ports(bridge)):
                continue  # a VM still uses it: it goes when the VM has gone
            from reconciler.desired import Switch

            switch = Switch(kind="Switch", name=entry.name, bridge=bridge, mode="local",
                            subnet=subnet, nat=bool(config.get("nat")),
                            dns=bool(config.get("dns")))
            try:
                for line in self._local(self._switch_paths(entry.name), entry.name, switch,
                                        subnet).remove():
                    log.info("switch '%s': %s", entry.name, line)
                gw = gateway(subnet)
                if bridge and net.exists(bridge):
                    net.remove_address(bridge, str(gw.ip), gw.network.prefixlen)
            except LocalNetError as err:
                log.warning("switch '%s': %s", entry.name, err)

    def _switch_paths(self, name: str) -> Any:
        from reconciler.localnet import SwitchPaths

        paths = SwitchPaths(self.state.switches_dir / name)
        paths.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return paths

    @staticmethod
    def _local(paths: Any, name: str, switch: Switch, subnet: IPv4Network) -> Any:
        from reconciler.localnet import LocalSwitch

        return LocalSwitch(paths, name=name, bridge=switch.bridge, subnet=subnet,
                           nat=bool(switch.nat), dns=bool(switch.dns))

    def collect_bridges(self) -> None:
        """Remove the bridges this reconciler made once no VM uses them."""
        created = self.state.created_bridges()
        if not created:
            return
        net, left = self._open(), set(created)
        for bridge in sorted(created):
            if not net.exists(bridge):
                left.discard(bridge)
            elif not net.bridge_ports(bridge):
                net.remove_bridge(bridge)
                left.discard(bridge)
                log.info("removed bridge %s: no VM uses it", bridge)
        if left != created:
            self.state.set_created_bridges(left)


def _subnet(text: object) -> IPv4Network | None:
    try:
        return IPv4Network(str(text)) if text else None
    except ValueError:
        return None


def _macs_on(switch: str, declared: dict[str, Declared], running: list[Record]
             ) -> tuple[list[str], dict[str, str]]:
    """The guest MACs on a switch (declared VMs, and running ones as recorded), with the
    host name each should get from DHCP."""
    from reconciler.net import mac_address

    names: dict[str, str] = {}
    for decl in declared.values():
        for index, nic in enumerate(decl.vm.interfaces):
            if nic.switch == switch:
                names[nic.mac or mac_address(decl.vm.name, index)] = decl.vm.hostname
    for record in running:  # as observed this pass: no second read of the records
        nics = record.spec.get("interfaces") or []
        for nic, mac in zip(nics, record.macs, strict=False):
            if nic.get("switch") == switch:
                names.setdefault(mac, record.name)
    return sorted(names), names


async def _wait_ready(state: StateDir, results: list[Result]) -> list[Result]:
    """`--wait`: each VM started in this pass until ready (or failed), in parallel."""

    async def one(result: Result) -> Result:
        started = result.outcome is Outcome.CHANGED and result.action in (
            Kind.START, Kind.RESTART, Kind.RESTORE)
        if not started:
            return result
        verdict, ok = await wait_ready(state, result.vm)
        return replace(result, outcome=Outcome.CHANGED if ok else Outcome.FAILED,
                       detail=f"{result.detail}; {verdict}")

    return list(await asyncio.gather(*(one(r) for r in results)))


async def wait_ready(state: StateDir, name: str) -> tuple[str, bool]:
    """Until the VM's `ready:` probes pass (or time out): (what happened, ready?)."""
    paths = state.paths(name)
    scanned = 0  # how far the console was read: written to the record with the rest
    while True:
        records, _ = state.records()
        record = records.get(name)
        if record is None:
            return "its record is gone", False
        record = replace(record, console_scanned=max(record.console_scanned, scanned))
        if not is_alive(record):
            gone = post_mortem(record, paths)
            tail = console_tail(console_since(paths, record.serial_offset))
            return f"exited while starting: {gone.detail}; console tail:\n{tail}", False
        verdict = await probes.assess(record, state, now=time.time())
        if set(verdict.changes) - {"console_scanned"}:  # a probe passed
            state.update(name, record.pid, **verdict.changes)
        scanned = verdict.scanned
        if verdict.ready is None:
            return "running", True
        if verdict.ready is Readiness.READY:
            at = verdict.ready_at or time.time()
            return f"ready after {max(0.0, at - record.started_at):.1f}s", True
        if verdict.ready is Readiness.UNREADY:
            return verdict.detail, False
        await asyncio.sleep(READY_POLL)


async def save_vm(state: StateDir, record: Record, network: Network, *,
                  target: Path | None = None) -> str:
    """vmd's send: state to a file (in the state dir, or `target`), then the process
    ends."""
    state.update(record.name, record.pid, stopping=True)
    paths = state.paths(record.name)
    target = target or paths.saved_state
    try:
        seconds = await kvm.save(record, paths, target)
    except BaseException:  # the guest goes on: a later exit is not a stop of ours
        state.update(record.name, record.pid, stopping=False)
        raise
    # The file belongs to this pid: while it lives, the file is not a state to
    # restore but a save to finish (quit it); see observed.Interrupted.
    state.update(record.name, record.pid, saved=str(target), saved_pid=record.pid)
    faults.hit("after-save")
    how = await kvm.quit_qemu(record, paths)
    await asyncio.to_thread(network.unplug, record)
    return f"saved to {target} in {seconds:.2f}s; QEMU {how}"


async def down(state: StateDir, *, save: bool = False) -> list[tuple[str, str]]:
    """Terminate every managed VM gracefully (vmd's vmm_shutdown); records are kept.
    `save`: save each running or paused VM instead, all at once (libvirt-guests'
    ON_SHUTDOWN=suspend); the next pass restores those declared running.

    A save or restore cut short is finished first, so no saved guest runs again.
    """
    seen, _ = await observe(state, kvm.query_status, now=time.time())
    if await _recover(state, seen, now=time.time()):
        seen, _ = await observe(state, kvm.query_status, now=time.time())

    async def one(vm: ObservedVM) -> tuple[str, str]:
        if vm.status is Status.EXITED:
            return vm.name, "not running"
        if vm.status is Status.SAVED:
            return vm.name, "saved, not running"
        try:
            if save and vm.status in (Status.RUNNING, Status.PAUSED):
                return vm.name, await save_vm(state, vm.record, network)
            how = await terminate(state, vm.record, timeout=None, network=network)
        except (kvm.DriverError, OSError) as err:
            return vm.name, f"failed: {err}"
        return vm.name, f"terminated: {how}"

    network = Network(state)
    try:
        ordered = sorted(seen.values(), key=lambda v: v.name)
        results = list(await asyncio.gather(*(one(vm) for vm in ordered)))
        network.remove_local(set())  # dnsmasq and NAT of switches no VM uses now
        network.collect_bridges()
    finally:
        network.close()
    return results
