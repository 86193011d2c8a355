"""What the manifests declare, as the rest of the program sees it, without pydantic.

The models (`reconciler.desired`) validate; this module holds what a pass needs
afterwards and what the validation cache keeps: the enums of the VM's fields, the
`Declared*` wrappers (a valid document and where it was written) and `Manifests`
(everything a directory declares). A run that finds its manifests in the cache
(`reconciler.manifests`) imports this and never pydantic or YAML; a validated model
comes back from the cache as a `Frozen` view of it.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Network
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.listing import ManifestError, shown

if TYPE_CHECKING:
    from reconciler.desired import VM, Settings, Switch

log = logging.getLogger("reconciler")

QCOW2_MAGIC = b"QFI\xfb"  # a qcow2 image's first bytes
MAX_CPU = 4095


class State(StrEnum):
    RUNNING = "running"
    STOPPED = "stopped"
    PAUSED = "paused"
    SAVED = "saved"  # memory and device state in a file, no process (vmd's send)


class Restart(StrEnum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


class OnChange(StrEnum):
    RESTART = "restart"
    DEFER = "defer"


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


class DiskFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"


def parse_cpus(text: str) -> frozenset[int]:
    """A CPU list as in taskset and cgroups ("0-1,3") -> the CPU numbers (pure)."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"must be a CPU list like 0-1,3 (got {shown(text)})")
        low, high = int(first), int(last) if dash else int(first)
        if low > high or high > MAX_CPU:
            raise ValueError(f"{part}: not a CPU range (at most {MAX_CPU})")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def host_routes(table: Path = Path("/proc/net/route"), *,
                text: str | None = None) -> list[tuple[IPv4Network, str]]:
    """The IPv4 routes of this network namespace as (destination, device), default
    route left out; from `text` (the table as read before) when given."""
    routes = []
    if text is None:
        try:
            text = table.read_text()
        except OSError:
            return []
    lines = text.splitlines()[1:]
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            dest = int(fields[1], 16).to_bytes(4, "little")
            mask = int(fields[7], 16).to_bytes(4, "little")
            network = IPv4Network((int.from_bytes(dest, "big"),
                                   bin(int.from_bytes(mask, "big")).count("1")), strict=False)
        except ValueError:
            continue
        if network.prefixlen:
            routes.append((network, fields[0]))
    return routes


def validation_context(state_dir: Path | None) -> dict[str, Any]:
    """What the path validators need besides the value: the state dir as written and real."""
    if state_dir is None:
        return {}
    written = os.path.normpath(state_dir.absolute())
    return {"state_dir": written,
            "state_dirs": tuple(dict.fromkeys((written, os.path.realpath(written))))}


def load_context(state_dir: Path | None, allow_dirs: Sequence[Path]) -> dict[str, Any]:
    """validation_context(), and the --allow-dir roots (real paths)."""
    context = validation_context(state_dir)
    context["allow_dirs"] = tuple(dict.fromkeys(os.path.realpath(d) for d in allow_dirs))
    return context


@dataclass(frozen=True)
class Declared:
    """A valid VM document and where it was written."""

    vm: VM
    file: Path
    line: int
    # The line of each interfaces[i].switch (for "no such switch"); not the whole node
    # graph, which would hold a few KiB per VM.
    switch_lines: tuple[int, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class DeclaredSwitch:
    """A valid Switch document and where it was written."""

    switch: Switch
    file: Path
    line: int
    subnet_line: int = field(default=0, compare=False)


@dataclass
class Manifests:
    """Everything a manifest directory declares, and what is wrong with it."""

    vms: dict[str, Declared] = field(default_factory=dict)
    switches: dict[str, DeclaredSwitch] = field(default_factory=dict)
    errors: list[ManifestError] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)  # the files that were read
    empty: set[Path] = field(default_factory=set)  # files that hold no document at all
    settings: Settings | None = None  # the directory's `kind: Settings`, if any

    @property
    def broken_files(self) -> set[Path]:
        return {e.file for e in self.errors}


class Frozen:
    """A validated model read back from the validation cache, without pydantic.

    Its fields are plain attributes (a nested model is a Frozen too; lists, dicts
    and other values as validated), and so are the results of its memoized methods
    (`calls`: spec(), spec_hash(), hardware() of a VM). Anything else (another
    method, a property, model_dump) is the model's own: the first such use unpickles
    the real model (importing pydantic) and asks it, so a Frozen never answers
    differently from the model it was made of. It is as read-only as the model.
    """

    def __init__(self, kind: str, fields: dict[str, Any], calls: dict[str, Any],
                 real: bytes) -> None:
        self.__dict__.update(fields)
        self.__dict__["_frozen"] = (kind, calls, real)

    def __getattr__(self, name: str) -> Any:  # only names that are not fields
        if name.startswith("__") or name == "_frozen":
            raise AttributeError(name)
        kind, calls, real = self.__dict__["_frozen"]
        if name in calls:
            value = calls[name]
            return lambda: value
        model = self.__dict__.get("_model")
        if model is None:
            log.debug("%s: %s() needs the model itself: unpickling it", kind, name)
            model = self.__dict__["_model"] = pickle.loads(real)
        return getattr(model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self.__dict__['_frozen'][0]} is frozen")

    def __repr__(self) -> str:
        kind = self.__dict__["_frozen"][0]
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items()
                           if not k.startswith("_"))
        return f"Frozen {kind}({fields})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Frozen):
            mine: bytes = self.__dict__["_frozen"][2]
            theirs: bytes = other.__dict__["_frozen"][2]
            return mine == theirs
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.__dict__["_frozen"][2])
