"""`reconcile --etcd URL --host NAME`: the daemon as one member of a cluster.

Three threads and the daemon: the lease is renewed (and the host fenced when it cannot
be) by `cluster.Fence`; a watch on etcd wakes a sync; each sync writes the VMs placed
here as manifest files, which the ordinary daemon (`daemon.Watch`) converges on. The
sync runs on every change in etcd and every ttl/2 seconds besides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import TYPE_CHECKING, Any

from reconciler.cluster import ClusterError, Member, Move, cluster_rows
from reconciler.daemon import Watch
from reconciler.loop import Network, Outcome, Report, Result, save_vm
from reconciler.observed import is_alive
from reconciler.plan import Kind

if TYPE_CHECKING:  # prometheus_client only with --metrics
    from reconciler.metrics import Metrics

log = logging.getLogger("reconciler")


def states_of(report: Report) -> dict[str, dict[str, Any]]:
    details = {r.vm: r.detail or r.reason for r in report.results}
    return {name: {"state": state, "detail": details.get(name, "")}
            for name, state in sorted(report.states.items())}


async def run_member(member: Member, watch: Watch, metrics: Metrics | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    poke = asyncio.Event()

    def changed() -> None:
        loop.call_soon_threadsafe(poke.set)

    fenced = member.fence.on_fenced

    def on_fenced() -> None:
        fenced()
        changed()

    member.fence.on_fenced = on_fenced
    await asyncio.to_thread(member.register, stop)
    threads = [threading.Thread(target=member.fence.run, name="lease", daemon=True),
               threading.Thread(target=member.store.watch, args=(changed, stop),
                                name="etcd-watch", daemon=True)]
    for thread in threads:
        thread.start()
    shown = watch.on_report

    def on_report(report: Report, seconds: float) -> None:
        shown(report, seconds)
        states = states_of(report)
        loop.run_in_executor(None, _report, member, states)

    watch.on_report = on_report
    await _sync(member, stop, watch, metrics)  # files there before the daemon's first pass
    daemon = asyncio.create_task(watch.run())
    try:
        while not daemon.done():
            poke.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(poke.wait(), max(member.ttl / 2, 0.5))
            if not daemon.done():
                await _sync(member, stop, watch, metrics)
    finally:
        stop.set()  # the watch thread; the lease is renewed until member.leave()
        watch.stop()
        with contextlib.suppress(Exception):
            await daemon


async def _sync(member: Member, stop: threading.Event, watch: Watch,
                metrics: Metrics | None) -> None:
    try:
        view = await asyncio.to_thread(member.sync, stop)
        moves = await asyncio.to_thread(member.moves, view)
    except ClusterError as err:
        log.error("etcd: %s", err)
        return
    if metrics is not None:
        hosts, _ = cluster_rows(view)
        metrics.observe_cluster(
            {"alive": sum(h["lease"] == "alive" for h in hosts),
             "lost": sum(h["lease"] == "lost" for h in hosts),
             "draining": sum(bool(h["draining"]) for h in hosts)},
            len(view.unschedulable), placed=member.scheduler.placed_total,
            failovers=member.scheduler.moved_total)
    for move in moves:
        if move.vm in watch.inflight.tasks:
            continue  # this move's task (or another action) is under way
        task = asyncio.ensure_future(_move(member, move))
        watch.inflight.add(move.vm, f"migration ({move.role})", task)
        watch.inflight.detach([task])  # its result goes into the next pass's report


async def _move(member: Member, move: Move) -> Result:
    kind = Kind.START if move.role == "in" else Kind.SAVE if move.role == "save" \
        else Kind.TERMINATE
    reason = f"live migration from {move.peer}" if move.role == "in" \
        else f"live migration to {move.peer}" if move.role == "out" \
        else f"move to {move.peer} through a saved state"
    log.info("vm '%s': %s", move.vm, reason)
    try:
        detail = await (member.receive(move) if move.role == "in" else member.send(move)
                        if move.role == "out" else _save_out(member, move))
    except Exception as err:  # reported; the VM stays where it was
        log.error("vm '%s': %s failed: %s", move.vm, reason, err)
        return Result(move.vm, Outcome.FAILED, kind, reason, str(err))
    log.info("vm '%s': %s", move.vm, detail)
    return Result(move.vm, Outcome.CHANGED, kind, reason, detail)


async def _save_out(member: Member, move: Move) -> str:
    """Save the VM to the shared dir (vmd's send), then hand it over with the file."""
    name = move.vm
    records, _ = member.state.records()
    record = records.get(name)
    if record is None or not is_alive(record) or member.shared_dir is None:
        await asyncio.to_thread(member.call_off, name, move.revision, "not running here")
        raise ClusterError(f"vm '{name}' is not running here")
    target = member.shared_dir / ".reconciler-moves" / f"{name}.state"
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    network = Network(member.state)
    try:
        detail = await save_vm(member.state, record, network, target=target)
    except BaseException as err:
        await asyncio.to_thread(member.call_off, name, move.revision, str(err))
        raise
    finally:
        network.close()
    # The file is the target's now: this record must not keep (or forget) it.
    member.state.update(name, record.pid, saved=None, saved_pid=0)
    handed = await asyncio.to_thread(member.depart, name, move.revision, move.peer, {
        "saved": str(target), "moved": {"ready_at": record.ready_at,
                                        "ready_passed": record.ready_passed}})
    if not handed:
        raise ClusterError(f"vm '{name}': saved to {target}, but its placement changed "
                           "meanwhile; it is not restored anywhere by itself")
    return f"{detail}; handed to {move.peer}"


def _report(member: Member, states: dict[str, dict[str, Any]]) -> None:
    try:
        member.report(states)
    except ClusterError as err:
        log.debug("could not report to etcd: %s", err)
