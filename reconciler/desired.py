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
    ValidationError,
    ValidationInfo,
    field_validator,
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


def _resolve_file(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the manifest file; the file must exist."""
    base = (info.context or {}).get("base_dir")
    path = value.expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    path = Path(os.path.normpath(path.absolute()))  # lexically: symlinks stay as written
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    return path


class Boot(BaseModel):
    """Direct kernel boot: QEMU's -kernel, -initrd and -append."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""

    @field_validator("kernel", "initrd")
    @classmethod
    def _exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve_file(value, info)


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
    stop_timeout: Seconds = Field(30.0, ge=0, le=3600)
    ready: Ready | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    # Fields a running VM can follow without a restart; every other field is
    # hardware, and a change to it changes the spec hash.
    LIVE_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"kind", "state", "restart", "on_change", "stop_timeout", "ready", "labels"}
    )

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


@dataclass(frozen=True)
class ManifestError:
    file: Path
    line: int
    message: str
    vm: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        who = f"vm '{self.vm}': " if self.vm else ""
        return f"{where}: {who}{self.message}"


@dataclass
class Manifests:
    """Everything a manifest directory declares, and what is wrong with it."""

    vms: dict[str, Declared] = field(default_factory=dict)
    errors: list[ManifestError] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

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


def load(root: Path) -> Manifests:
    """Load and validate every manifest under root; collect every error."""
    result = Manifests()
    if not root.exists():
        result.errors.append(ManifestError(root, 0, "no such file or directory"))
        return result
    result.files = manifest_files(root)
    first_seen: dict[str, Declared] = {}
    for path in result.files:
        for item in _load_file(path):
            if isinstance(item, ManifestError):
                result.errors.append(item)
                continue
            name = item.vm.name
            if name in first_seen:
                other = first_seen[name]
                result.errors.append(ManifestError(
                    item.file, item.line,
                    f"name already declared at {other.file}:{other.line}; "
                    "VM names must be unique across the directory",
                    vm=name,
                ))
                result.errors.append(ManifestError(
                    other.file, other.line,
                    f"name declared again at {item.file}:{item.line}",
                    vm=name,
                ))
                continue
            first_seen[name] = item
    result.errors.sort(key=lambda e: (str(e.file), e.line))
    broken = result.broken_files
    # A file with any error contributes nothing: its VMs stay exactly as they are.
    result.vms = {n: d for n, d in first_seen.items() if d.file not in broken}
    return result


def _load_file(path: Path) -> Iterator[Declared | ManifestError]:
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


def _load_document(path: Path, node: yaml.Node) -> Iterator[Declared | ManifestError]:
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
    if kind != "VM":
        where = _line_of(node, ("kind",))
        yield ManifestError(path, where, f"unknown kind {kind!r} (expected VM)", vm=name)
        return
    try:
        vm = VM.model_validate(data, context={"base_dir": path.parent})
    except ValidationError as err:
        for error in err.errors():
            where = _line_of(node, tuple(error["loc"]))
            yield ManifestError(path, where, _describe(error, VM), vm=name)
        return
    yield Declared(vm=vm, file=path, line=line)


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
