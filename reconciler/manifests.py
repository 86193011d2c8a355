"""Loading a manifest directory through the validation cache (`reconciler.valcache`).

`load()` is `reconciler.desired.load` with the cache: while nothing validation read
has changed, the manifests come back from the state dir as they were validated, and
this run imports neither YAML nor pydantic nor the models (a no-op `--once` starts
that much sooner). On a miss the validator (`reconciler.validator`, a child process)
validates, given the job by `ahead`, or else this process does (`reconciler.desired`,
imported then); the result is kept, its models made `Frozen` (plain values, their
memoized results, and each model pickled whole for whatever else is asked of it).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from reconciler import faults, valcache
from reconciler.declared import Frozen, Manifests, load_context
from reconciler.listing import DEFAULT_MAX_MANIFEST_BYTES, Listing, Read, read_manifests

if TYPE_CHECKING:
    from pydantic import BaseModel

    from reconciler.validator import Validator

# The zero-argument methods whose results a Frozen keeps (the models memoize them or
# compute them from what they memoize: callers only read them).
FROZEN_CALLS = ("spec", "hardware", "spec_hash", "writable_disks")


# What `ahead` found or gave its validator, by cache file: (key, the hit or the
# validator that validates it).
_ahead: dict[Path, tuple[str, Manifests | Validator]] = {}


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
    cache in cache_dir, or from the validator `ahead` gave them to (its result is
    kept in the cache)."""
    given = _input(root, max_bytes=max_bytes, state_dir=state_dir, allow_dirs=allow_dirs,
                   cache_dir=cache_dir)
    key, found = _ahead.pop(given.cache.path, ("", None))
    if isinstance(found, Manifests):
        if key == given.key:
            return found  # ahead's hit, a moment ago
    elif found is not None:
        sent = found.collect()
        if sent and isinstance(value := given.cache.take(sent, given.key), Manifests):
            given.cache.store(sent)
            return value
    if isinstance(hit := given.cache.get(given.key), Manifests):
        return hit
    result, entry = _validate(given)
    if entry is not None:
        given.cache.store(entry)
    return result


@contextlib.contextmanager
def ahead(root: Path, *, validator: Validator | None = None,
          start: Callable[[], Validator | None] | None = None,
          max_bytes: int = DEFAULT_MAX_MANIFEST_BYTES, state_dir: Path | None = None,
          allow_dirs: Sequence[Path] = (), cache_dir: Path) -> Iterator[None]:
    """On a miss, have a validator (`reconciler.validator`: a child process; the one
    started with the command, importing pydantic and the models since, or else one
    `start` forks now) validate while this process goes on importing the rest (the
    driver, asyncio, QMP) and observing; `load`, inside the block, takes its result.
    Two cores do in parallel what one did in turn. The validator is sent away at once
    on a hit or when the result would not be cached (a `cloud_init`, as far as a look
    at the bytes tells), else when the block ends (an error before `load`). Without
    one, `load` validates itself, as always.
    """
    given = _input(root, max_bytes=max_bytes, state_dir=state_dir, allow_dirs=allow_dirs,
                   cache_dir=cache_dir)
    try:
        if given.cache.path not in _ahead and not any(
                isinstance(d, bytes) and b"cloud_init" in d for _, d in given.read):
            if isinstance(hit := given.cache.get(given.key), Manifests):
                _ahead[given.cache.path] = (given.key, hit)
            elif (child := validator or (start() if start else None)) is not None:
                validator = None  # given its job: now _ahead's
                child.give(pickle.dumps(
                    {"root": root, "max_bytes": max_bytes, "state_dir": state_dir,
                     "allow_dirs": list(allow_dirs), "cache_dir": cache_dir}))
                _ahead[given.cache.path] = (given.key, child)
                faults.hit("after-ahead")
        if validator is not None:
            validator.dismiss()  # no job for it
        yield
    finally:
        left = _ahead.pop(given.cache.path, ("", None))[1]
        if left is not None and not isinstance(left, Manifests):
            left.dismiss()


def serve(job: int, result: int) -> None:
    """The validator's side (in the child): import what validation needs, wait for
    the job (nothing: dismissed), read and validate the manifests it names, and send
    the cache entry down result (nothing if the result may not be cached)."""
    from reconciler import desired  # noqa: F401  (the imports: the point of starting early)

    chunks = []
    while chunk := os.read(job, 1 << 16):
        chunks.append(chunk)
    if not chunks:
        return
    given = _input(**pickle.loads(b"".join(chunks)))
    _, entry = _validate(given)
    faults.hit("mid-validation")
    if entry is not None:
        with os.fdopen(result, "wb") as out:
            out.write(entry)


def _validate(given: _Input) -> tuple[Manifests, bytes | None]:
    """Validate (importing the models): the result, and its cache entry if it may be
    kept."""
    from reconciler import desired

    with valcache.noting() as noted:
        result = desired._load(given.listing, given.read, given.context,
                               route_table=given.routes.decode(errors="replace"))
    if any(d.vm.cloud_init is not None for d in result.vms.values()):
        return result, None  # its texts may hold secrets: they go into the seed only
    try:
        kept = freeze(result)
    except Exception:  # something that does not pickle: only no cache
        return result, None
    return result, given.cache.entry(given.key, noted, kept)


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
