"""Disk images: created when missing, never deleted, truncated or recreated.

Apply stage, beside the driver: `ensure_disk()` runs `qemu-img create` for a disk
that does not exist yet (a blank image of its size, or a qcow2 overlay on its base)
and does nothing to a disk that exists. The image is made in a private directory
(mode 0700, made by mkdtemp next to the disk: nobody else can plant a symlink or a
file in it) and hard-linked into place, so a disk that appears meanwhile is never
overwritten and a half-made image never has the disk's name.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.declared import QCOW2_MAGIC

if TYPE_CHECKING:
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
    try:
        private = tempfile.mkdtemp(dir=disk.path.parent, prefix=".reconciler-")
    except OSError as err:
        raise StorageError(f"cannot create {disk.path}: {err.strerror}") from err
    try:
        temp = Path(private) / disk.path.name
        done = _run(create_argv(disk, temp, binary=binary), disk)
        if done.returncode != 0:
            raise StorageError(f"cannot create {disk.path}: {done.stderr.strip()}")
        try:
            os.link(temp, disk.path)  # fails if the disk appeared meanwhile: never clobber
        except FileExistsError:
            return None
        except OSError as err:
            raise StorageError(f"cannot create {disk.path}: {err.strerror}") from err
    finally:
        shutil.rmtree(private, ignore_errors=True)
    what = f"overlay on {disk.base}" if disk.base else f"{disk.size}M"
    return f"created {disk.path} ({disk.format.value}, {what})"


def _run(argv: list[str], disk: Disk) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        raise StorageError(f"cannot create {disk.path}: qemu-img took over "
                           f"{err.timeout:.0f}s") from err


def backing_of(disk: Disk) -> str | None:
    """The backing file a qcow2 disk's header names, resolved, if it is disk's declared
    base: the only backing the reconciler opens for QEMU (privsep); None otherwise."""
    if disk.base is None or disk.format.value != "qcow2":
        return None
    try:
        with open(disk.path, "rb") as image:
            header = image.read(20)
            if len(header) < 20 or header[:4] != QCOW2_MAGIC:
                return None
            offset = int.from_bytes(header[8:16], "big")
            size = int.from_bytes(header[16:20], "big")
            if not offset or not 0 < size <= 1023:
                return None
            image.seek(offset)
            name = os.fsdecode(image.read(size))
    except OSError:
        return None
    found = os.path.realpath(os.path.join(disk.path.parent, name))
    return found if found == os.path.realpath(disk.base) else None
