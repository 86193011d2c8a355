"""Loading a manifest directory through the validation cache (`reconciler.valcache`).

`load()` is `reconciler.desired.load` with the cache: while nothing validation read
has changed, the manifests come back from the state dir as they were validated, and
this run imports neither YAML nor pydantic nor the models (a no-op `--once` starts
that much sooner). On a miss it validates (`reconciler.desired`, imported then) and
keeps the result, its models made `Frozen` (plain values, their memoized results, and
each model pickled whole for whatever else is asked of it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from reconciler import valcache
from reconciler.declared import Frozen, Manifests, load_context
from reconciler.listing import DEFAULT_MAX_MANIFEST_BYTES, manifest_files, read_manifest

if TYPE_CHECKING:
    from pydantic import BaseModel

# The zero-argument methods whose results a Frozen keeps (the models memoize them or
# compute them from what they memoize: callers only read them).
FROZEN_CALLS = ("spec", "hardware", "spec_hash", "writable_disks")


def load(root: Path, *, max_bytes: int = DEFAULT_MAX_MANIFEST_BYTES,
         state_dir: Path | None = None, allow_dirs: Sequence[Path] = (),
         cache_dir: Path) -> Manifests:
    """Load and validate every manifest under root (as desired.load), through the
    cache in cache_dir."""
    listing = manifest_files(root)
    read = [(path, read_manifest(path, max_bytes=max_bytes)) for path in listing.files]
    context = load_context(state_dir, allow_dirs)
    slot = (os.path.abspath(root), context, max_bytes)
    try:
        routes = Path("/proc/net/route").read_bytes()
    except OSError:
        routes = b""
    key = valcache.key_of([
        slot, valcache.package_stamp(), _library_stamp(), os.environ.get("HOME"), routes,
        [str(e) for e in listing.errors],
        *((str(p), hashlib.sha256(d).digest() if isinstance(d, bytes) else str(d))
          for p, d in read)])
    cache = valcache.Cache(cache_dir, repr(slot))
    if isinstance(hit := cache.get(key), Manifests):
        return hit
    from reconciler import desired

    with valcache.noting() as noted:
        result = desired._load(listing, read, context)
    if any(d.vm.cloud_init is not None for d in result.vms.values()):
        return result  # its texts may hold secrets: they go into the seed, nowhere else
    try:
        kept = freeze(result)
    except Exception:  # something that does not pickle: only no cache
        return result
    cache.put(key, noted, kept)
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
