"""Fault injection for the crash tests: SIGKILL this process at a named point.

Test-only. When the environment variable RECONCILER_FAULT names a point, the
reconciler kills itself with SIGKILL the first time it reaches that point, as a
power cut, an OOM kill or systemd's `TimeoutStopSec` would. The tests then run it
again and check that nothing was lost and no VM runs twice. Unset (always, outside
the tests), `hit()` costs one dictionary lookup.

The points, in the order a VM's life meets them:

    after-ahead     a miss: the validator (a child) is given the manifests, and runs on
    mid-validation  (in the validator) validated, the result not yet sent
    before-spawn    the start record (intent) is written, QEMU is not yet spawned
    after-spawn     QEMU is spawned, its pid is not yet in the record
    mid-terminate   the power button was pressed, the VM has not ended yet
    mid-save        QMP migrate to the save file has begun, nothing is recorded yet
    after-save      the saved state is complete and recorded, QEMU not yet quit
    mid-restore     the restoring QEMU is spawned, its saved state not yet loaded
    after-restore   the saved state has loaded, the guest is not yet resumed
"""

from __future__ import annotations

import os
import signal

ENV = "RECONCILER_FAULT"
POINTS = frozenset({"after-ahead", "mid-validation", "before-spawn", "after-spawn",
                    "mid-terminate", "mid-save", "after-save", "mid-restore", "after-restore"})


def hit(point: str) -> None:
    """SIGKILL this process if RECONCILER_FAULT names point (tests only)."""
    assert point in POINTS, point
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
