"""Per-VM resource limits with cgroup v2: `reconciler.slice/<vm>` under the v2 mount.

Apply stage, beside the driver. `place()` makes the VM's group, writes its limits and
moves the QEMU process (every thread) into it; a change is written again, live. A host
whose v2 hierarchy lacks a controller a limit needs (these build machines mount the
controllers on cgroup v1 and leave the v2 tree at /sys/fs/cgroup/unified empty) gets
nothing half applied: the VM's limits are `pending`, with the reason, in its record and
in `status`. Which limit needs which controller, and the values written, are pure.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reconciler.desired import Resources

SLICE = "reconciler.slice"
MOUNTS = Path("/proc/self/mounts")
CPU_PERIOD = 100_000  # µs: cpu.max's period; "50%" is a quota of half of it


class CgroupError(Exception):
    """A limit could not be written; the message names the file."""


@dataclass(frozen=True)
class Limits:
    """What became of a VM's `resources:`; the record's `limits` field, as JSON."""

    state: str  # applied | pending
    reason: str = ""
    cgroup: str = ""

    def to_json(self) -> dict[str, str]:
        found = {"state": self.state, "reason": self.reason, "cgroup": self.cgroup}
        return {k: v for k, v in found.items() if v}


def files(resources: Resources) -> dict[str, tuple[str, str]]:
    """Each cgroup file to write: (controller it needs, value) (pure)."""
    found: dict[str, tuple[str, str]] = {}
    if resources.cpu_weight is not None:
        found["cpu.weight"] = ("cpu", str(resources.cpu_weight))
    if resources.cpu_max is not None:
        if resources.cpu_max == "max":
            found["cpu.max"] = ("cpu", f"max {CPU_PERIOD}")
        else:
            share = float(resources.cpu_max.rstrip("%")) / 100
            found["cpu.max"] = ("cpu", f"{max(1000, round(share * CPU_PERIOD))} {CPU_PERIOD}")
    if resources.memory_max is not None:
        found["memory.max"] = ("memory", str(resources.memory_max * 1024 * 1024))
    if resources.io_weight is not None:
        found["io.weight"] = ("io", f"default {resources.io_weight}")
    if resources.pids_max is not None:
        found["pids.max"] = ("pids", str(resources.pids_max))
    return found


def v2_mount(mounts: Path = MOUNTS) -> Path | None:
    """Where the cgroup v2 hierarchy is mounted, if it is."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1].replace("\\040", " "))
    return None


def why_pending(needed: set[str], root: Path | None) -> str | None:
    """Why limits needing `needed` controllers cannot be applied under root; None: they can."""
    if root is None:
        return "this host has no cgroup v2 hierarchy; limits are not applied"
    try:
        available = set((root / "cgroup.controllers").read_text().split())
    except OSError as err:
        return f"cannot read {root}/cgroup.controllers: {err.strerror}"
    missing = sorted(needed - available)
    if missing:
        return (f"cgroup v2 at {root} has no {', '.join(missing)} controller (on this host "
                "it is on cgroup v1); limits are not applied")
    return None


def place(name: str, resources: Resources | None, pid: int, *,
          root: Path | None = None, mounts: Path = MOUNTS) -> Limits | None:
    """VM `name`'s QEMU (pid) into its group with its limits; None when it declares none."""
    if resources is None:
        return None
    wanted = files(resources)
    if not wanted:
        return None
    root = root if root is not None else v2_mount(mounts)
    needed = {controller for controller, _ in wanted.values()}
    reason = why_pending(needed, root)
    if reason is not None or root is None:
        return Limits("pending", reason or "no cgroup v2")
    enable = " ".join(f"+{c}" for c in sorted(needed))
    group = root / SLICE / name
    try:
        (root / SLICE).mkdir(exist_ok=True)
        _write(root / "cgroup.subtree_control", enable)
        _write(root / SLICE / "cgroup.subtree_control", enable)
        group.mkdir(exist_ok=True)
        for file, (_, value) in sorted(wanted.items()):
            _write(group / file, value)
        _write(group / "cgroup.procs", str(pid))
    except CgroupError as err:
        return Limits("pending", str(err))
    return Limits("applied", cgroup=str(group))


def remove(group: str) -> None:
    """A VM's group, once its QEMU has ended: the kernel refuses while a process is in
    it (EBUSY), and that is no error (the next end of the VM removes it)."""
    try:
        os.rmdir(group)
    except OSError as err:
        if err.errno not in (errno.ENOENT, errno.EBUSY, errno.ENOTEMPTY):
            raise CgroupError(f"cannot remove {group}: {err.strerror}") from err


def _write(path: Path, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as err:
        raise CgroupError(f"cannot write {value!r} to {path}: {err.strerror}") from err
