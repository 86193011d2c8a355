"""Disk images: created when missing, never deleted, truncated or recreated.

Apply stage, beside the driver: `ensure_disk()` runs `qemu-img create` for a disk
that does not exist yet (a blank image of its size, or a qcow2 overlay on its base)
and does nothing to a disk that exists. The image is made under a temporary name and
linked into place, so a disk that appears meanwhile is never overwritten.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from reconciler.desired import Disk


class StorageError(Exception):
    pass


def create_argv(disk: Disk, target: Path, *, binary: str = "qemu-img") -> list[str]:
    """The qemu-img command line that creates disk at target (pure)."""
    argv = [binary, "create", "-q", "-f", disk.format.value]
    if disk.base is not None:
        argv += ["-b", str(disk.base), "-F", disk.base_format.value]
    argv.append(str(target))
    if disk.size is not None:
        argv.append(f"{disk.size}M")
    return argv


def ensure_disk(disk: Disk) -> str | None:
    """Create disk if it does not exist; say what was created (None: it existed)."""
    if disk.path.exists():
        return None
    binary = shutil.which("qemu-img")
    if binary is None:
        raise StorageError("qemu-img not found; install qemu-utils")
    temp = disk.path.with_name(f".{disk.path.name}.creating-{os.getpid()}")
    argv = create_argv(disk, temp, binary=binary)
    try:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            raise StorageError(f"cannot create {disk.path}: qemu-img took over "
                               f"{err.timeout:.0f}s") from err
        if done.returncode != 0:
            raise StorageError(f"cannot create {disk.path}: {done.stderr.strip()}")
        try:
            os.link(temp, disk.path)  # fails if the disk appeared meanwhile: never clobber
        except FileExistsError:
            return None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    what = f"overlay on {disk.base}" if disk.base else f"{disk.size}M"
    return f"created {disk.path} ({disk.format.value}, {what})"
