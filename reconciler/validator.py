"""The validator: a child process that validates the manifests while the command does
the rest.

A cold `reconcile --once` spends most of its time importing what validation needs
(PyYAML, pydantic, the models), and none of that depends on the arguments. On a state
dir without any cache (a first run), the command forks the validator first thing
(`start`), before it parses its arguments: the child imports all that at once, on the
second core, and waits for its job, while the command parses its arguments, reads the
manifests, imports the loop and observes the VMs. Elsewhere a hit is likely, and a
child forked for nothing would cost it more than it saves a miss: `manifests.ahead`
forks one only once the cache has missed. Either way `ahead` gives the child the job
(`give`: what to read), or sends it away (`dismiss`: the cache had the manifests, or
they are not to be cached); `manifests.load` takes its result (`collect`): the cache
entry, which the command keeps in the cache.

Above `manifests` (the child runs its `serve`); the command holds a `Validator`. The
child holds nothing of its parent's (every inherited descriptor is closed, its stdio
is /dev/null), writes nothing but its result down its pipe, and ends without running
the parent's exit handlers. Only `os` and `gc` are imported here: whatever the command
imports before the fork is a cost the child shares.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal


class Validator:
    """The command's end of one validator child."""

    def __init__(self, pid: int, job: int, result: int) -> None:
        self.pid, self._job, self._result = pid, job, result
        self._done = False

    def give(self, job: bytes) -> None:
        """Send the child its job (once; a few hundred bytes: what to read, not what was
        read, so the pipe never makes the command wait); the child validates, then
        sends its result."""
        try:
            view = memoryview(job)
            while view:
                view = view[os.write(self._job, view):]
        except OSError:
            pass  # it has died: collect() gets nothing, and load validates
        finally:
            self._close_job()

    def collect(self) -> bytes:
        """The child's result, once it has ended: nothing if it had none or died."""
        if self._done:
            return b""
        chunks = []
        try:
            while chunk := os.read(self._result, 1 << 20):
                chunks.append(chunk)
        except OSError:
            chunks = []
        self._end(kill=False)
        return b"".join(chunks)

    def dismiss(self) -> None:
        """No job, or no more waiting for it: the child is killed (if still there)."""
        if not self._done:
            self._end(kill=True)

    def _close_job(self) -> None:
        if self._job >= 0:
            with contextlib.suppress(OSError):
                os.close(self._job)
            self._job = -1

    def _end(self, *, kill: bool) -> None:
        self._done = True
        self._close_job()
        with contextlib.suppress(OSError):
            os.close(self._result)
        with contextlib.suppress(OSError):
            if kill:
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)


def start() -> Validator | None:
    """Fork the validator (None if the system cannot: the command validates itself)."""
    try:
        job_in, job_out = os.pipe()
    except OSError:
        return None
    try:
        result_in, result_out = os.pipe()
    except OSError:
        os.close(job_in)
        os.close(job_out)
        return None
    try:
        pid = os.fork()
    except OSError:
        for fd in (job_in, job_out, result_in, result_out):
            os.close(fd)
        return None
    if pid:
        os.close(job_in)
        os.close(result_out)
        return Validator(pid, job_out, result_in)
    try:  # the child: holding nothing of the parent's, quiet
        # Short-lived, and mostly importing: the cyclic collector would only scan the
        # growing heap again and again (~6% of the imports' time); it exits instead.
        gc.disable()
        keep = sorted((job_in, result_out))
        os.closerange(3, keep[0])
        os.closerange(keep[0] + 1, keep[1])
        os.closerange(keep[1] + 1, os.sysconf("SC_OPEN_MAX"))
        quiet = os.open(os.devnull, os.O_RDWR)
        for stdio in (0, 1, 2):
            os.dup2(quiet, stdio)
        os.close(quiet)
        from reconciler import manifests

        manifests.serve(job_in, result_out)
    finally:
        os._exit(0)
