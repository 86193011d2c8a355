"""A cache of validated manifests in the state dir, so that `--once` on manifests that
did not change skips YAML, pydantic's validation and the building of its validators.

An entry is keyed by everything validation reads as input: the manifest files'
bytes, the options (directory, state dir, --allow-dir, --max-manifest-size), $HOME,
the routing table, this package's source files and pydantic's version. Validation
also looks at the host (a kernel file exists, a user exists, a user-data file's
text): each path it looks at is noted (`note`), with what about it mattered, and an
entry is used only while every noted path still looks the same. Anything odd (an
entry that is unreadable, corrupt, not ours or writable by others) is a miss, and a
miss only means validating again. Manifests with a VM that has a `cloud_init` are not
cached: its texts (user-data, keys) may hold secrets, which go into the seed and nowhere
else.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import stat
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

FORMAT = 2  # bump when the pickled classes change shape (2: models kept as Frozen)
_PACKAGE = Path(__file__).resolve().parent
_PREFIX = "manifests-"  # an entry's file name: then its slot's hash

# The paths validation looked at: path -> whether its content mattered (True) or only
# what it is (a regular file, a directory, nothing; where its symlinks lead).
_noted: ContextVar[dict[str, bool] | None] = ContextVar("_noted", default=None)


def note(path: str | os.PathLike[str], *, content: bool = False) -> None:
    """Validation looked at path (content: read it, not only checked it is there)."""
    noted = _noted.get()
    if noted is not None:
        key = os.fspath(path)
        noted[key] = noted.get(key, False) or content


@contextlib.contextmanager
def noting() -> Iterator[dict[str, bool]]:
    noted: dict[str, bool] = {}
    token = _noted.set(noted)
    try:
        yield noted
    finally:
        _noted.reset(token)


Look = tuple[object, ...]


def look(path: str, content: bool) -> Look:
    """What validation could have seen of path: where it leads and what is there."""
    try:
        found = os.stat(path)
    except OSError as err:
        return (os.path.realpath(path), err.errno)
    seen: Look = (os.path.realpath(path), stat.S_IFMT(found.st_mode))
    if content:
        seen += (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns,
                 found.st_ctime_ns, stat.S_IMODE(found.st_mode))
    return seen


def package_stamp() -> list[tuple[str, int, int]]:
    """This package's source files, so a new version (or a edited checkout) misses."""
    with os.scandir(_PACKAGE) as scan:
        return sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                      for e in scan if e.name.endswith(".py"))


def key_of(parts: Iterable[object]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def holds_entries(directory: Path) -> bool:
    """Whether directory holds any entry (of any manifest directory)."""
    try:
        with os.scandir(directory) as scan:
            return any(e.name.startswith(_PREFIX) for e in scan)
    except OSError:
        return False


class Cache:
    """One entry per manifest directory and options (`slot`), replaced on each miss."""

    def __init__(self, directory: Path, slot: str) -> None:
        self.directory = directory
        self.path = directory / f"{_PREFIX}{key_of([FORMAT, slot])[:20]}.pickle"

    def get(self, key: str) -> Any | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            found = os.fstat(fd)
            # Unpickling runs code: only a file this user wrote and nobody else may change.
            if (not stat.S_ISREG(found.st_mode) or found.st_uid != os.geteuid()
                    or found.st_mode & 0o022):
                return None
            with os.fdopen(os.dup(fd), "rb") as f:
                entry = f.read()
        except OSError:
            return None
        finally:
            os.close(fd)
        return self.take(entry, key)

    @staticmethod
    def take(entry: bytes, key: str) -> Any | None:
        """The value an entry (as `entry` made it) holds for key, if every path noted
        still looks the same; None if not, or if it is not such an entry."""
        try:
            found = pickle.loads(entry)
        except Exception:  # corrupt, truncated, from another version: validate again
            return None
        if not (isinstance(found, tuple) and len(found) == 4 and found[0] == FORMAT
                and found[1] == key):
            return None
        _, _, looks, value = found
        if any(look(path, content) != seen for path, content, seen in looks):
            return None
        return value

    @staticmethod
    def entry(key: str, noted: dict[str, bool], value: Any) -> bytes | None:
        """The entry for value under key, the paths noted as they look now (None if
        the value does not pickle)."""
        looks = [(path, content, look(path, content)) for path, content in noted.items()]
        try:
            return pickle.dumps((FORMAT, key, looks, value), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            return None

    def store(self, entry: bytes) -> None:
        """Keep an entry (replacing the one before); quietly nothing when the state
        dir cannot take it (read-only, someone else's)."""
        import tempfile

        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        except OSError:
            return
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(entry)
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
