"""Where the state dir is: its default, and the cache of validated manifests in it.

Under `observed` (which has the rest of the state dir: records, lock, VM paths). The
command needs no more than this to start validating ahead (`manifests.ahead`), which
it does before it imports anything it can do without until then.
"""

from __future__ import annotations

import os
from pathlib import Path


class StateDirError(Exception):
    """The state dir cannot be used (in use, unwritable, path too long)."""


def default_state_dir() -> Path:
    if env := os.environ.get("RECONCILER_STATE_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/reconciler")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "reconciler"


def state_root(given: Path | None) -> Path:
    """The state dir, given or the default, resolved: one state dir has one spelling,
    in records and in QEMU's argv, so an orphan QEMU is recognised whichever way the
    dir was named (../state, a link)."""
    return (given or default_state_dir()).resolve()


def cache_dir(root: Path) -> Path:
    """Validated manifests (`reconciler.valcache`) in the state dir root."""
    return root / "cache"
