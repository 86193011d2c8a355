"""Desired state: the manifest models and the loader of a manifest directory.

First stage of desired -> observed -> plan -> apply. Nothing here touches a VM:
`load()` turns a directory of YAML files into validated `VM` specs, and every
user mistake becomes a `ManifestError` (`FILE:LINE: vm 'NAME': what is wrong`),
all of them reported at once, never a traceback.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
MANIFEST_SUFFIXES = (".yaml", ".yml")


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


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_MIB_PER_UNIT = {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024 * 1024}


def parse_mebibytes(value: object) -> int:
    """`256M`, `2G`, `1048576K` or a bare number (MiB, as QEMU's -m) -> MiB.

    M and G are binary units, as in vm.conf and QEMU.
    """
    if isinstance(value, bool):
        raise ValueError(f"must be a size like 256M or 2G (got {value!r})")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"must be a size like 256M or 2G (got {value!r})")
    mib = int(match[1]) * _MIB_PER_UNIT[match[2].lower()]
    if mib != int(mib):
        raise ValueError(f"must be a whole number of MiB (got {value!r})")
    return int(mib)


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0}


def parse_seconds(value: object) -> float:
    """`30s`, `500ms`, `2m`, `1h` or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration like 30s or 2m (got {value!r})")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION_RE.match(str(value))
    if not match:
        raise ValueError(f"must be a duration like 30s or 2m (got {value!r})")
    return float(match[1]) * _SECONDS_PER_UNIT[match[2] or ""]


MiB = Annotated[int, BeforeValidator(parse_mebibytes)]
Seconds = Annotated[float, BeforeValidator(parse_seconds)]


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the manifest file."""
    base = (info.context or {}).get("base_dir")
    try:
        path = value.expanduser()
    except RuntimeError as err:  # ~nosuchuser
        raise ValueError(str(err)) from None
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return Path(os.path.normpath(path.absolute()))  # lexically: symlinks stay as written


def _resolve_file(value: Path, info: ValidationInfo) -> Path:
    """A path (relative to the manifest file) to a file that must exist."""
    path = _resolve_path(value, info)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    return path


class Boot(BaseModel):
    """Direct kernel boot (QEMU's -kernel, -initrd, -append) or firmware boot from a device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    device: Literal["disk", "cdrom"] | None = None

    @field_validator("kernel", "initrd")
    @classmethod
    def _exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve_file(value, info)

    @model_validator(mode="after")
    def _one_way(self) -> Boot:
        if (self.kernel is None) == (self.device is None):
            raise ValueError("give either kernel: (direct boot) or device: disk|cdrom "
                             "(firmware boot)")
        if self.device is not None and (self.initrd is not None or self.cmdline):
            raise ValueError("initrd: and cmdline: go with kernel:, not with device:")
        return self


class DiskFormat(StrEnum):
    QCOW2 = "qcow2"
    RAW = "raw"


class Disk(BaseModel):
    """A disk image: created when missing (size:, or an overlay on base:), never deleted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    format: DiskFormat = DiskFormat.QCOW2
    size: MiB | None = Field(None, ge=1)
    base: Path | None = None
    base_format: DiskFormat = DiskFormat.QCOW2
    readonly: bool = False
    bus: Literal["virtio", "ide"] = "virtio"
    # The file behind the path, symlinks resolved: two paths to one disk are one disk.
    _real_path: str = PrivateAttr("")

    def model_post_init(self, context: Any) -> None:
        self._real_path = os.path.realpath(self.path)

    @property
    def real_path(self) -> str:
        return self._real_path

    @field_validator("path")
    @classmethod
    def _path(cls, value: Path, info: ValidationInfo) -> Path:
        path = _resolve_path(value, info)
        if not path.parent.is_dir():
            raise ValueError(f"directory not found: {path.parent}")
        if path.exists() and not path.is_file():
            raise ValueError(f"not a regular file: {path}")
        return path

    @field_validator("base")
    @classmethod
    def _base(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve_file(value, info)

    @model_validator(mode="after")
    def _creatable(self) -> Disk:
        if self.base is not None and self.format is not DiskFormat.QCOW2:
            raise ValueError("an overlay on base: must be format: qcow2")
        if not self.path.exists():
            if self.readonly:
                raise ValueError(f"{self.path} does not exist, and a readonly disk is not "
                                 "created")
            if self.size is None and self.base is None:
                raise ValueError(f"{self.path} does not exist: give size: to create it, "
                                 "or base: to create an overlay")
        return self


MAC_PATTERN = r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$"


class Interface(BaseModel):
    """A NIC on a switch: a tap device on the switch's bridge (vmd's opentap)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    switch: str = Field(pattern=NAME_PATTERN)
    mac: str | None = Field(None, pattern=MAC_PATTERN)

    @field_validator("mac", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("mac")
    @classmethod
    def _unicast(cls, value: str | None) -> str | None:
        if value is not None and int(value[:2], 16) & 1:
            raise ValueError(f"{value} is a multicast address; use a unicast one "
                             "such as 52:54:00:12:34:56")
        return value


class Switch(BaseModel):
    """One `kind: Switch` document: a Linux bridge."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["Switch"]
    name: str = Field(pattern=NAME_PATTERN)
    bridge: str = Field("", pattern=r"^([A-Za-z0-9_.-]{1,15})?$")

    @model_validator(mode="after")
    def _bridge(self) -> Switch:
        if self.bridge in (".", ".."):
            raise ValueError(f"bridge {self.bridge!r} is not a valid interface name")
        if not self.bridge:
            default = f"br-{self.name}"
            if len(default) > 15:
                raise ValueError(f"bridge name {default!r} would be over 15 characters; "
                                 "give bridge: explicitly")
            object.__setattr__(self, "bridge", default)
        return self


class Ready(BaseModel):
    """When is the guest up: a regex seen on its serial console within a timeout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    serial: str
    timeout: Seconds = Field(60.0, gt=0, le=24 * 3600)

    @field_validator("serial")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from None
        return value


class VM(BaseModel):
    """One `kind: VM` document."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["VM"] = "VM"
    name: str = Field(pattern=NAME_PATTERN)
    state: State = State.RUNNING
    restart: Restart = Restart.ALWAYS
    on_change: OnChange = OnChange.RESTART
    memory: MiB = Field(256, ge=16, le=1024 * 1024)
    vcpus: int = Field(1, ge=1, le=255)
    accel: Accel = Accel.AUTO
    boot: Boot
    disks: list[Disk] = Field(default_factory=list)
    cdrom: Path | None = None
    interfaces: list[Interface] = Field(default_factory=list, max_length=8)
    stop_timeout: Seconds = Field(30.0, ge=0, le=3600)
    ready: Ready | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    # Fields a running VM can follow without a restart; every other field is
    # hardware, and a change to it changes the spec hash.
    LIVE_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"kind", "state", "restart", "on_change", "stop_timeout", "ready", "labels"}
    )

    @field_validator("cdrom")
    @classmethod
    def _cdrom(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve_file(value, info)

    @model_validator(mode="after")
    def _boot_device(self) -> VM:
        if self.boot.device == "disk" and not self.disks:
            raise ValueError("boot: {device: disk} needs a disk in disks:")
        if self.boot.device == "cdrom" and self.cdrom is None:
            raise ValueError("boot: {device: cdrom} needs cdrom:")
        return self

    def writable_disks(self) -> list[Path]:
        return [d.path for d in self.disks if not d.readonly]

    def hardware(self) -> dict[str, Any]:
        """The part of the spec that QEMU was started with (JSON-ready)."""
        return self.model_dump(mode="json", exclude=set(self.LIVE_FIELDS))

    def spec_hash(self) -> str:
        blob = json.dumps(self.hardware(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Declared:
    """A valid VM document and where it was written."""

    vm: VM
    file: Path
    line: int
    node: yaml.Node | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class DeclaredSwitch:
    """A valid Switch document and where it was written."""

    switch: Switch
    file: Path
    line: int


@dataclass(frozen=True)
class ManifestError:
    file: Path
    line: int
    message: str
    vm: str | None = None  # the name of the object at fault, when it has one
    kind: str = "vm"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        who = f"{self.kind} '{self.vm}': " if self.vm else ""
        return f"{where}: {who}{self.message}"


@dataclass
class Manifests:
    """Everything a manifest directory declares, and what is wrong with it."""

    vms: dict[str, Declared] = field(default_factory=dict)
    switches: dict[str, DeclaredSwitch] = field(default_factory=dict)
    errors: list[ManifestError] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    empty: set[Path] = field(default_factory=set)  # files that hold no document at all

    @property
    def broken_files(self) -> set[Path]:
        return {e.file for e in self.errors}


def manifest_files(root: Path) -> list[Path]:
    """`*.yaml`/`*.yml` under root, recursively, hidden files and dirs skipped."""
    if root.is_file():
        return [root]
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix in MANIFEST_SUFFIXES and path.is_file():
            found.append(path)
    return sorted(found)


DEFAULT_MAX_MANIFEST_BYTES = 1 << 20


def load(root: Path, *, state_dir: Path | None = None,
         max_bytes: int = DEFAULT_MAX_MANIFEST_BYTES) -> Manifests:
    """Load and validate every manifest under root; collect every error."""
    result = Manifests()
    if not root.exists():
        result.errors.append(ManifestError(root, 0, "no such file or directory"))
        return result
    result.files = manifest_files(root)
    vms: dict[str, Declared] = {}
    switches: dict[str, DeclaredSwitch] = {}
    for path in result.files:
        items = list(_load_file(path))
        if not items:
            result.empty.add(path)
        for item in items:
            if isinstance(item, ManifestError):
                result.errors.append(item)
            elif isinstance(item, Declared):
                _add_unique(vms, item.vm.name, item, result.errors, kind="vm")
            else:
                _add_unique(switches, item.switch.name, item, result.errors, kind="switch")
    # A file with any error contributes nothing: its VMs stay exactly as they are.
    # A VM whose switch is missing (or in a broken file) breaks its own file in turn.
    while True:
        broken = result.broken_files
        result.vms = {n: d for n, d in vms.items() if d.file not in broken}
        result.switches = {n: d for n, d in switches.items() if d.file not in broken}
        missing = list(_unknown_switches(result))
        if not missing:
            break
        result.errors += missing
    result.errors.sort(key=lambda e: (str(e.file), e.line))
    return result


def _add_unique(seen: dict[str, Any], name: str, item: Declared | DeclaredSwitch,
                errors: list[ManifestError], *, kind: str) -> None:
    """Names are unique across the directory: a second one is an error at both places."""
    other = seen.get(name)
    if other is None:
        seen[name] = item
        return
    errors.append(ManifestError(
        item.file, item.line, f"name already declared at {other.file}:{other.line}; "
        f"{kind} names must be unique across the directory", vm=name, kind=kind))
    errors.append(ManifestError(
        other.file, other.line, f"name declared again at {item.file}:{item.line}",
        vm=name, kind=kind))


def _unknown_switches(result: Manifests) -> Iterator[ManifestError]:
    for decl in result.vms.values():
        for index, nic in enumerate(decl.vm.interfaces):
            if nic.switch not in result.switches:
                line = _line_of(decl.node, ("interfaces", index, "switch")) \
                    if decl.node is not None else decl.line
                yield ManifestError(
                    decl.file, line, f"interfaces.{index}.switch: no valid switch "
                    f"{nic.switch!r} is declared (add a document with kind: Switch, "
                    f"name: {nic.switch})", vm=decl.vm.name)


def _load_file(path: Path) -> Iterator[Declared | DeclaredSwitch | ManifestError]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        yield ManifestError(path, 0, f"cannot read: {err}")
        return
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else 0
        problem = " ".join(filter(None, [err.context, err.problem]))
        yield ManifestError(path, line, f"YAML syntax error: {problem}")
        return
    except yaml.YAMLError as err:
        yield ManifestError(path, 0, f"YAML error: {err}")
        return
    for node in nodes:
        if node is not None:
            yield from _load_document(path, node)


def _load_document(path: Path, node: yaml.Node
                   ) -> Iterator[Declared | DeclaredSwitch | ManifestError]:
    line = node.start_mark.line + 1
    try:
        data = yaml.SafeLoader("").construct_document(node)
    except yaml.YAMLError as err:
        yield ManifestError(path, line, f"YAML error: {err}")
        return
    if not isinstance(data, dict):
        kind = type(data).__name__
        yield ManifestError(path, line, f"a document must be a mapping of fields (got {kind})")
        return
    name = data.get("name") if isinstance(data.get("name"), str) else None
    kind = data.get("kind", "VM")
    model: type[VM] | type[Switch]
    if kind == "VM":
        model = VM
    elif kind == "Switch":
        model = Switch
    else:
        where = _line_of(node, ("kind",))
        yield ManifestError(path, where, f"unknown kind {kind!r} (expected VM or Switch)",
                            vm=name)
        return
    try:
        obj = model.model_validate(data, context={"base_dir": path.parent})
    except ValidationError as err:
        for error in err.errors():
            where = _line_of(node, tuple(error["loc"]))
            yield ManifestError(path, where, _describe(error, model), vm=name,
                                kind=kind.lower())
        return
    if isinstance(obj, Switch):
        yield DeclaredSwitch(switch=obj, file=path, line=line)
    else:
        yield Declared(vm=obj, file=path, line=line, node=node)


def _line_of(node: yaml.Node, loc: Sequence[int | str]) -> int:
    """The line of the deepest node on loc's path (the key's line for a field)."""
    line = node.start_mark.line + 1
    for step in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == step:
                    line, node = key.start_mark.line + 1, value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int):
            if step >= len(node.value):
                return line
            node = node.value[step]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _model_at(model: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    for step in loc:
        info = model.model_fields.get(str(step))
        inner = info.annotation if info else None
        candidates = getattr(inner, "__args__", (inner,))
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _describe(error: Any, model: type[BaseModel]) -> str:
    """Turn one pydantic error into `field: what is wrong (what to write instead)`."""
    loc = tuple(error["loc"])
    where = ".".join(str(p) for p in loc)
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        known = sorted(k for k in parent.model_fields if k.islower()) if parent else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        advice = f"did you mean '{hint[0]}'?" if hint else f"known fields: {', '.join(known)}"
        return f"unknown field '{where}' ({advice})"
    if kind == "string_type":
        return f"{where} must be a string, but YAML read {value!r}: put the value in quotes"
    if kind == "missing":
        return f"{where} is required"
    if kind == "enum":
        return f"{where} must be one of {error['ctx']['expected']} (got {value!r})"
    if kind == "string_pattern_mismatch" and loc == ("name",):
        return (f"name {value!r} is not valid: use 1-63 lowercase letters, digits and "
                "dashes, starting with a letter or digit")
    if kind in ("greater_than_equal", "less_than_equal"):
        bound = "at least" if kind == "greater_than_equal" else "at most"
        limit = error["ctx"]["ge" if kind == "greater_than_equal" else "le"]
        unit = "M" if loc == ("memory",) else ""
        return f"{where} must be {bound} {limit}{unit} (got {value!r})"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
