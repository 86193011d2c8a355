"""Manifest files: finding and reading them, bounded, and the errors they give.

Part of the first stage of desired -> observed -> plan -> apply, with no YAML and no
models (a run that finds its manifests in the validation cache imports nothing else):
`manifest_files()` lists a manifest directory, `read_manifest()` reads one file.
What cannot be read becomes a `ManifestError`, never a traceback.

Manifests are untrusted input: a file is read only if it is a regular file of at
most `max_bytes` (opened non-blocking and checked before any read, so a FIFO is
refused, never waited on).
"""

from __future__ import annotations

import errno
import os
import re
import reprlib
import stat
from dataclasses import dataclass
from pathlib import Path

MANIFEST_SUFFIXES = (".yaml", ".yml")
DEFAULT_MAX_MANIFEST_BYTES = 1 << 20  # per file; a bigger one is an error, not read


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlong = 40
_REPR.maxlist = _REPR.maxdict = 6
_REPR.maxlevel = 3


def shown(value: object) -> str:
    """repr() cut to a line: values from a manifest can be as big as the file."""
    return _REPR.repr(value)


def clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} characters)"


_UNPRINTABLE = re.compile(r"[\ud800-\udfff]")


def printable(text: str) -> str:
    """text that encodes to UTF-8: a file name's undecodable bytes (surrogate escapes) as
    \\xNN, any other lone surrogate as \\uNNNN."""
    def escape(match: re.Match[str]) -> str:
        code = ord(match[0])
        return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"

    return _UNPRINTABLE.sub(escape, text)


@dataclass(frozen=True)
class ManifestError:
    file: Path
    line: int  # 0: the file as a whole (it cannot be read, or is not a file)
    message: str
    vm: str | None = None  # the name of the object at fault, when it has one
    kind: str = "vm"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        who = f"{self.kind} '{clip(self.vm, 100)}': " if self.vm else ""
        return printable(f"{where}: {who}{self.message}")


# --- Finding and reading the files ------------------------------------------------
#
# A path that should hold a manifest but cannot be read as one is an error, never
# skipped: skipping it would read as "its VMs were deleted" and prune them.


@dataclass(frozen=True)
class Listing:
    files: list[Path]  # regular files, to be read
    errors: list[ManifestError]  # entries that look like manifests but cannot be read


def manifest_files(root: Path) -> Listing:
    """`*.yaml`/`*.yml` under root, recursively; hidden files and dirs skipped.

    Symlinked directories are followed, each real directory once (a symlink loop
    ends there). An entry named like a manifest that is not a regular file once
    symlinks are resolved, and a directory that cannot be listed, are errors.
    root itself may be a file of any name.
    """
    files: list[Path] = []
    errors: list[ManifestError] = []
    try:
        found = os.stat(root)
    except (OSError, ValueError) as err:
        errors.append(ManifestError(root, 0, _unreadable(root, err)))
        return Listing(files, errors)
    if not stat.S_ISDIR(found.st_mode):
        if stat.S_ISREG(found.st_mode):
            files.append(root)
        else:
            errors.append(ManifestError(root, 0, _not_regular(found.st_mode)))
        return Listing(files, errors)
    seen = {(found.st_dev, found.st_ino)}
    todo = [root]
    while todo:
        directory = todo.pop()
        try:
            with os.scandir(directory) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as err:
            errors.append(ManifestError(directory, 0,
                                        f"cannot list this directory: {err.strerror}"))
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            is_manifest = path.suffix in MANIFEST_SUFFIXES
            try:
                found = entry.stat()  # follows symlinks
            except OSError as err:
                vanished = err.errno == errno.ENOENT and not entry.is_symlink()
                dangling = err.errno in (errno.ENOENT, errno.ENOTDIR)
                if not vanished and (is_manifest or not dangling):  # a loop may be a dir
                    errors.append(ManifestError(path, 0, _unreadable(path, err)))
                continue
            if is_manifest:
                if stat.S_ISREG(found.st_mode):
                    files.append(path)
                else:
                    errors.append(ManifestError(path, 0, _not_regular(found.st_mode)))
            elif stat.S_ISDIR(found.st_mode) and (found.st_dev, found.st_ino) not in seen:
                seen.add((found.st_dev, found.st_ino))
                subdirs.append(path)
        todo += reversed(subdirs)
    return Listing(sorted(files), errors)


def read_manifest(path: Path, *, max_bytes: int) -> bytes | ManifestError | None:
    """The bytes of a manifest file; an error if it is not a readable regular file of at
    most max_bytes; None if it is gone.

    Opened non-blocking and checked with fstat before any read: a FIFO put in its place
    after it was listed is refused, never waited on.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError as err:
        return ManifestError(path, 0, _unreadable(path, err)) if os.path.islink(path) else None
    except (OSError, ValueError) as err:
        return ManifestError(path, 0, _unreadable(path, err))
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            return ManifestError(path, 0, _not_regular(found.st_mode))
        chunks: list[bytes] = []
        size = 0
        while found.st_size <= max_bytes and size <= max_bytes:
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        return ManifestError(path, 0, f"larger than {max_bytes} bytes, the limit for a "
                             "manifest file (--max-manifest-size): not read")
    except OSError as err:
        return ManifestError(path, 0, f"cannot read: {err.strerror}")
    finally:
        os.close(fd)


Read = list[tuple[Path, bytes | ManifestError | None]]


def read_manifests(root: Path, *, max_bytes: int) -> tuple[Listing, Read]:
    """The manifest files under root, and each one's bytes (or why not), as read now."""
    listing = manifest_files(root)
    return listing, [(path, read_manifest(path, max_bytes=max_bytes)) for path in listing.files]


def _unreadable(path: Path, err: OSError | ValueError) -> str:
    """Why stat() or open() of a manifest path failed, for a user."""
    if isinstance(err, ValueError):
        return f"cannot read: {err}"
    if err.errno == errno.ENOENT:
        if os.path.islink(path):
            return f"dangling symlink (to {clip(os.readlink(path))}): fix or remove it"
        return "no such file or directory"
    if err.errno == errno.ELOOP:
        return "symlink loop: cannot be read"
    return f"cannot read: {err.strerror}"


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int) -> str:
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
    return f"is {kind}, not a regular file: a manifest must be a regular file"
