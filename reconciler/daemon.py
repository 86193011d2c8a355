"""The daemon: `reconcile PATH` runs `reconcile_once()` on every wake-up.

Above the loop (cli -> daemon -> loop): vmd's vmm process made declarative. It wakes
on a manifest change (watchfiles), a VM process ending (a pidfd per VM, reaped with
waitpid when it is our child), a backed-off restart falling due, SIGHUP, and the
resync timer; wake-ups during a pass are merged into one following pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from reconciler import desired as desired_mod
from reconciler import kvm
from reconciler.loop import Inflight, Report, reconcile_once
from reconciler.notify import notify, watchdog_interval
from reconciler.observed import StateDir, is_alive, open_pidfd, post_mortem

log = logging.getLogger("reconciler")


class Watch:
    """The daemon: a pass on every manifest change, VM exit, due restart and resync tick.

    Wake-ups that arrive during a pass are merged into one following pass. VMs are
    never stopped when it exits: the next run adopts them.
    """

    def __init__(self, manifests: Path, state: StateDir, *, resync: float = 30.0,
                 parallel: int | None = None,
                 on_report: Callable[[Report, float], None] | None = None,
                 max_bytes: int = desired_mod.DEFAULT_MAX_MANIFEST_BYTES,
                 allow_dirs: Sequence[Path] = (), stagger: float | None = None,
                 empty_ok: bool = False) -> None:
        self.manifests, self.state = manifests, state
        self.stagger = stagger
        self.allow_dirs = tuple(allow_dirs)
        self.empty_ok = empty_ok  # a cluster member's directory: empty is no VMs
        self.resync, self.parallel, self.max_bytes = resync, parallel, max_bytes
        self.on_report = on_report or (lambda report, seconds: None)
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.passes = 0
        self.retry_at: float | None = None  # when the next backed-off restart is due
        self._pidfds: dict[int, int] = {}  # pid -> pidfd of every live VM
        self.inflight = Inflight(self.wake)  # VM actions that outlived their pass

    async def run(self) -> None:
        helpers = [asyncio.create_task(self._watch_manifests())]
        if (interval := watchdog_interval()) is not None:
            helpers.append(asyncio.create_task(self._watchdog(interval)))
        # One step for the watcher task: watchfiles sets up its inotify watches there,
        # so a change made during the first pass's load is seen, not lost.
        await asyncio.sleep(0)
        try:
            while not self.stopping.is_set():
                self.wake.clear()
                await self._pass()
                if self.passes == 1:
                    notify("READY=1", f"STATUS=watching {self.manifests}")
                self._watch_exits()
                await self._sleep()
        finally:
            notify("STOPPING=1")
            if self.inflight.tasks:  # never left half done
                log.info("waiting for %s to finish", ", ".join(
                    f"vm '{n}' ({k})" for n, k in sorted(self.inflight.kinds.items())))
                await self.inflight.settle()
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            for pid in list(self._pidfds):
                self._unwatch(pid)

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def poke(self, why: str) -> None:
        """Run a pass now (SIGHUP: re-read everything)."""
        log.info("%s: reconciling now", why)
        self.wake.set()

    async def _pass(self) -> None:
        began = time.monotonic()
        self.retry_at = None
        try:
            report = await reconcile_once(self.manifests, self.state, parallel=self.parallel,
                                          max_bytes=self.max_bytes, stagger=self.stagger,
                                          allow_dirs=self.allow_dirs, inflight=self.inflight,
                                          empty_ok=self.empty_ok)
        except Exception as err:  # one bad pass must not end the daemon
            log.error("pass failed: %s: %s", type(err).__name__, err)
            log.debug("pass failed", exc_info=True)
        else:
            self.retry_at = report.retry_at
            self.on_report(report, time.monotonic() - began)
        self.passes += 1

    async def _sleep(self) -> None:
        timeout = self.resync
        if self.retry_at is not None:
            timeout = min(timeout, max(0.0, self.retry_at - time.time()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout)

    async def _watch_manifests(self) -> None:
        """watchfiles on the manifest directory: a (debounced) change wakes the loop."""
        from watchfiles import awatch

        only_manifests = ManifestFilter(self.manifests)
        root = only_manifests.root
        while not self.stopping.is_set():
            try:
                async for changes in awatch(
                    root, watch_filter=only_manifests,
                    debounce=DEBOUNCE_MS, step=STEP_MS, stop_event=self.stopping,
                ):
                    names = sorted({os.path.relpath(path, root) for _, path in changes})
                    log.info("manifests changed: %s", ", ".join(names))
                    self.wake.set()
            except OSError as err:  # not there (yet): the resync keeps looking
                log.error("cannot watch %s: %s", root, err)
                await asyncio.sleep(self.resync)

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 while the event loop is alive (a hung loop misses it)."""
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _watch_exits(self) -> None:
        """A pidfd per live VM: its exit wakes the loop at once, no polling."""
        records, _ = self.state.records()
        live = {r.pid: r for r in records.values() if is_alive(r)}
        for pid in set(self._pidfds) - set(live):
            self._unwatch(pid)
        for record in records.values():  # ended before a watcher was set up
            if (record.pid not in live and not record.intent and record.exit is None
                    and not record.saved):
                self._record_exit(record.name, record.pid, at=None)
        loop = asyncio.get_running_loop()
        for pid, record in live.items():
            if pid in self._pidfds:
                continue
            pidfd = open_pidfd(record)  # pidfd first, then its start time: no reused pid
            if pidfd is None:
                continue
            self._pidfds[pid] = pidfd
            loop.add_reader(pidfd, self._exited, record.name, pid)

    def _unwatch(self, pid: int) -> None:
        pidfd = self._pidfds.pop(pid, None)
        if pidfd is not None:
            asyncio.get_running_loop().remove_reader(pidfd)
            os.close(pidfd)

    def _exited(self, name: str, pid: int) -> None:
        """vmd's vmm_sighdlr: an exit wakes the loop at once."""
        self._unwatch(pid)
        self._record_exit(name, pid, at=time.time())

    def _record_exit(self, name: str, pid: int, *, at: float | None) -> None:
        """Reap the process (when ours), record why the VM ended, wake the loop.

        `at=None`: it ended unseen; its files tell when. An end this reconciler asked
        for (terminate, save) is the pass's own doing: it needs no other pass.
        """
        status = kvm.reap(pid)
        records, _ = self.state.records()
        record = records.get(name)
        if record is None or record.pid != pid or record.exit is not None:
            return
        gone = post_mortem(record, self.state.paths(name), status=status, at=at)
        self.state.update(name, pid, exit=gone)
        if gone.requested:
            log.debug("vm '%s': process %d ended as asked: %s", name, pid, gone.detail)
            return
        log.info("vm '%s': process %d ended: %s", name, pid, gone.detail)
        self.wake.set()


# Manifest changes are grouped for up to DEBOUNCE_MS, and yielded STEP_MS after the last.
DEBOUNCE_MS = 100
STEP_MS = 20


class ManifestFilter:
    """Only manifest files count: not .git/, editor swap and backup files, other files."""

    def __init__(self, manifests: Path) -> None:
        from watchfiles import DefaultFilter

        self.default = DefaultFilter()
        self.root = manifests if manifests.is_dir() else manifests.parent
        self.only = None if manifests.is_dir() else manifests.name

    def __call__(self, change: Any, path: str) -> bool:
        if not self.default(change, path):
            return False
        rel = Path(os.path.relpath(path, self.root))
        if any(part.startswith(".") for part in rel.parts):
            return False
        if self.only is not None:
            return rel.name == self.only
        return rel.suffix in desired_mod.MANIFEST_SUFFIXES
