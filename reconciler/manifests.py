"""Loading a manifest directory through the validation cache (`reconciler.valcache`).

`load()` is `reconciler.desired.load` with the cache: while nothing validation read
has changed, the manifests come back from the state dir as they were validated, and
this run imports neither YAML nor pydantic nor the models (a no-op `--once` starts
that much sooner). On a miss it validates (`reconciler.desired`, imported then) and
keeps the result, its models made `Frozen` (plain values, their memoized results, and
each model pickled whole for whatever else is asked of it).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from reconciler import faults, valcache
from reconciler.declared import Frozen, Manifests, load_context
from reconciler.listing import DEFAULT_MAX_MANIFEST_BYTES, Listing, Read, read_manifests

if TYPE_CHECKING:
    from pydantic import BaseModel

# The zero-argument methods whose results a Frozen keeps (the models memoize them or
# compute them from what they memoize: callers only read them).
FROZEN_CALLS = ("spec", "hardware", "spec_hash", "writable_disks")


# What `ahead` found or started, by cache file: (key, the hit or the child's pid).
_ahead: dict[Path, tuple[str, Manifests | int]] = {}


@dataclass(frozen=True)
class _Input:
    """What validation reads of a manifest directory, and its cache key."""

    listing: Listing
    read: Read
    context: dict[str, Any]
    routes: bytes  # /proc/net/route as the key has it: what validation is given too
    key: str
    cache: valcache.Cache


def _input(root: Path, *, max_bytes: int, state_dir: Path | None,
           allow_dirs: Sequence[Path], cache_dir: Path) -> _Input:
    listing, read = read_manifests(root, max_bytes=max_bytes)
    context = load_context(state_dir, allow_dirs)
    slot = (os.path.abspath(root), context, max_bytes)
    try:
        routes = Path("/proc/net/route").read_bytes()
    except OSError:
        routes = b""
    key = valcache.key_of([
        slot, valcache.package_stamp(), _library_stamp(), sys.version, os.environ.get("HOME"),
        routes,
        [str(e) for e in listing.errors],
        *((str(p), hashlib.sha256(d).digest() if isinstance(d, bytes) else str(d))
          for p, d in read)])
    return _Input(listing, read, context, routes, key, valcache.Cache(cache_dir, repr(slot)))


def load(root: Path, *, max_bytes: int = DEFAULT_MAX_MANIFEST_BYTES,
         state_dir: Path | None = None, allow_dirs: Sequence[Path] = (),
         cache_dir: Path) -> Manifests:
    """Load and validate every manifest under root (as desired.load), through the
    cache in cache_dir (filled ahead by a child process when `ahead` started one)."""
    given = _input(root, max_bytes=max_bytes, state_dir=state_dir, allow_dirs=allow_dirs,
                   cache_dir=cache_dir)
    key, found = _ahead.pop(given.cache.path, ("", None))
    if isinstance(found, int):
        with contextlib.suppress(ChildProcessError, InterruptedError):
            os.waitpid(found, 0)
    elif found is not None and key == given.key:
        return found  # ahead's hit, a moment ago
    if isinstance(hit := given.cache.get(given.key), Manifests):
        return hit
    return _validate(given)


def ahead(root: Path, *, max_bytes: int = DEFAULT_MAX_MANIFEST_BYTES,
          state_dir: Path | None = None, allow_dirs: Sequence[Path] = (),
          cache_dir: Path) -> None:
    """On a miss, validate in a child process (fork) that fills the cache, while this
    one goes on importing the rest (the driver, asyncio, QMP); `load` then waits for
    it and takes the entry. Two cores do in parallel what one did in turn: the import
    of pydantic and the models, and the validation, no longer precede the rest.
    Nothing on a hit, when the result would not be cached (a `cloud_init`, as far as a
    look at the bytes tells) or when it cannot fork: `load` validates then, as always.
    """
    given = _input(root, max_bytes=max_bytes, state_dir=state_dir, allow_dirs=allow_dirs,
                   cache_dir=cache_dir)
    if given.cache.path in _ahead or any(isinstance(d, bytes) and b"cloud_init" in d
                                         for _, d in given.read):
        return
    if isinstance(hit := given.cache.get(given.key), Manifests):
        _ahead[given.cache.path] = (given.key, hit)
        return
    try:
        ready, told = os.pipe()
    except OSError:
        return
    try:
        pid = os.fork()
    except OSError:
        os.close(ready)
        os.close(told)
        return
    if pid:
        os.close(told)
        os.read(ready, 1)  # the child has let go of our files (the state dir's lock)
        os.close(ready)
        _ahead[given.cache.path] = (given.key, pid)
        faults.hit("after-ahead")
        return
    try:  # the child: holding nothing of the parent's, quiet, and gone without
        # running the parent's exit handlers
        os.closerange(3, told)
        os.closerange(told + 1, os.sysconf("SC_OPEN_MAX"))
        os.write(told, b".")
        os.close(told)
        quiet = os.open(os.devnull, os.O_RDWR)
        os.dup2(quiet, 0)
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        _validate(given, child=True)
    finally:
        os._exit(0)


def _validate(given: _Input, *, child: bool = False) -> Manifests:
    """Validate (importing the models), and keep the result in the cache if it may be."""
    from reconciler import desired

    with valcache.noting() as noted:
        result = desired._load(given.listing, given.read, given.context,
                               route_table=given.routes.decode(errors="replace"))
    if any(d.vm.cloud_init is not None for d in result.vms.values()):
        return result  # its texts may hold secrets: they go into the seed, nowhere else
    try:
        kept = freeze(result)
    except Exception:  # something that does not pickle: only no cache
        return result
    if child:
        faults.hit("mid-validation")
    given.cache.put(given.key, noted, kept)
    return result


def _library_stamp() -> list[tuple[str, int, int]]:
    """pydantic's and PyYAML's version files, as found (not imported): another version
    of either may validate differently."""
    found = []
    for name, member in (("pydantic", "version.py"), ("pydantic_core", "__init__.py"),
                         ("yaml", "__init__.py")):
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        if origin is None:
            continue
        path = os.path.join(os.path.dirname(origin), member)
        try:
            info = os.stat(path)
        except OSError:
            continue
        found.append((path, info.st_size, info.st_mtime_ns))
    return found


def freeze(result: Manifests) -> Manifests:
    """result with each model a Frozen (what the cache keeps)."""
    return replace(
        result,
        vms={n: replace(d, vm=cast(Any, _frozen(d.vm))) for n, d in result.vms.items()},
        switches={n: replace(d, switch=cast(Any, _frozen(d.switch)))
                  for n, d in result.switches.items()},
        settings=cast(Any, _frozen(result.settings)) if result.settings else None)


def _frozen(model: BaseModel) -> Frozen:
    kind = type(model)
    fields = {name: _plain(getattr(model, name)) for name in kind.model_fields}
    for klass in kind.__mro__:  # the models' own properties, as values
        if klass.__module__ == kind.__module__:
            fields.update((name, _plain(getattr(model, name)))
                          for name, attr in vars(klass).items() if isinstance(attr, property))
    calls = {name: getattr(model, name)() for name in FROZEN_CALLS if hasattr(kind, name)}
    return Frozen(kind.__name__, fields, calls,
                  pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))


def _plain(value: Any) -> Any:
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return _frozen(value)
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
