"""Desired state: the manifest models and the loader of a manifest directory.

First stage of desired -> observed -> plan -> apply. Nothing here touches a VM:
`load()` turns a directory of YAML files into validated `VM` specs, and every
user mistake becomes a `ManifestError` (`FILE:LINE: vm 'NAME': what is wrong`),
all of them reported at once, never a traceback.

Manifests are untrusted input and the work on them is bounded; `reconciler.yamlfile`
finds, reads and parses the files, this module validates what they hold: a file is read
only if it is a regular file of at most `max_bytes`, its YAML is parsed by libyaml
with the YAML 1.2 core schema (an unquoted MAC or `yes` stays a string), and a
document's node graph is measured (depth, size with aliases expanded, cycles)
before any Python object or model is built from it.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import stat
import warnings
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

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

from reconciler import valcache
from reconciler.declared import QCOW2_MAGIC as QCOW2_MAGIC
from reconciler.declared import Accel as Accel
from reconciler.declared import Declared as Declared
from reconciler.declared import DeclaredSwitch as DeclaredSwitch
from reconciler.declared import DiskFormat as DiskFormat
from reconciler.declared import Manifests as Manifests
from reconciler.declared import OnChange as OnChange
from reconciler.declared import Restart as Restart
from reconciler.declared import State as State
from reconciler.declared import host_routes as host_routes
from reconciler.declared import load_context
from reconciler.declared import parse_cpus as parse_cpus
from reconciler.declared import validation_context as validation_context
from reconciler.listing import DEFAULT_MAX_MANIFEST_BYTES as DEFAULT_MAX_MANIFEST_BYTES
from reconciler.listing import MANIFEST_SUFFIXES as MANIFEST_SUFFIXES
from reconciler.listing import Listing, Read, clip, read_manifests, shown
from reconciler.listing import ManifestError as ManifestError
from reconciler.listing import manifest_files as manifest_files
from reconciler.listing import read_manifest as read_manifest
from reconciler.yamlfile import NULL_TAG, STR_TAG, NodeError, TooManyNodes
from reconciler.yamlfile import check_document as check_document
from reconciler.yamlfile import compose_documents as compose_documents
from reconciler.yamlfile import construct as construct

log = logging.getLogger("reconciler")

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
MAX_DOCUMENTS = 1000  # per file: each is a model to validate
MAX_ERRORS_PER_FILE = 100  # then one line that says how many more
MAX_DISKS = 16
MAX_LOCAL_PREFIX = 29  # a local switch's subnet holds at least the gateway and 5 VMs
MAX_CLOUD_INIT_FILE = 1 << 20  # user-data, network-config, key files: bytes


_SIZE_RE = re.compile(r"^\s*([0-9]{1,18})\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_KIB_PER_UNIT = {"k": 1, "": 1024, "m": 1024, "g": 1024**2, "t": 1024**3}


def parse_mebibytes(value: object) -> int:
    """`256M`, `2G`, `1048576K` or a bare number (MiB, as QEMU's -m) -> MiB.

    M and G are binary units, as in vm.conf and QEMU.
    """
    if isinstance(value, bool):
        raise ValueError(f"must be a size like 256M or 2G (got {value!r})")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(value) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"must be a size like 256M or 2G (got {shown(value)})")
    kib = int(match[1]) * _KIB_PER_UNIT[match[2].lower()]  # exact: no float on the way
    if kib % 1024:
        raise ValueError(f"must be a whole number of MiB (got {value!r})")
    return kib // 1024


_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_SECONDS_PER_UNIT = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0}


def parse_seconds(value: object) -> float:
    """`30s`, `500ms`, `2m`, `1h` or a bare number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration like 30s or 2m (got {value!r})")
    if isinstance(value, int | float):
        seconds = float(value) if abs(value) < 1e300 else math.inf  # no OverflowError
    else:
        match = _DURATION_RE.match(value) if isinstance(value, str) else None
        if not match:
            raise ValueError(f"must be a duration like 30s or 2m (got {shown(value)})")
        seconds = float(match[1]) * _SECONDS_PER_UNIT[match[2] or ""]
    if not math.isfinite(seconds):
        raise ValueError(f"must be a duration like 30s or 2m (got {shown(value)})")
    return seconds


# defer_build: a model's validator and serializer are built on first use, not on
# import; `--once` on cached manifests (valcache) uses neither and starts ~35 ms sooner.
_CONFIG = ConfigDict(extra="forbid", frozen=True, defer_build=True)

MiB = Annotated[int, BeforeValidator(parse_mebibytes)]
Seconds = Annotated[float, BeforeValidator(parse_seconds)]


# Where no disk or image is ever taken from: the kernel's own trees. The state dir
# (its records, sockets, saved states) is added from the validation context.
_SYSTEM_DIRS = ("/proc", "/sys", "/dev")


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the manifest file; never in the state dir or /proc."""
    context = info.context or {}
    text = str(value)
    if text.startswith("~"):
        valcache.note("/etc/nsswitch.conf", content=True)
        valcache.note("/etc/passwd", content=True)  # ~user
        try:
            text = str(value.expanduser())
        except RuntimeError as err:  # ~nosuchuser
            raise ValueError(str(err)) from None
    # Lexically normalised: symlinks stay as written.
    path = os.path.abspath(os.path.join(context.get("base_dir") or "", text))
    _check_placement(path, context.get("state_dir"), context.get("state_dirs", ()))
    _check_allowed(path, context.get("allow_dirs", ()))
    return Path(path)


def _check_placement(written: str, state_dir: object, state_dirs: Sequence[str]) -> None:
    """Refuse a path in the state dir or a kernel tree, as written or with symlinks resolved.

    state_dirs: the state dir as given and its realpath (`validation_context()`).
    """
    valcache.note(written)
    real = os.path.realpath(written)
    for candidate in dict.fromkeys((written, real)):
        via = "" if candidate == written else f" (a symlink to {clip(real)})"
        if any(inside(candidate, top) for top in state_dirs):
            raise ValueError(f"{clip(written)}{via} is inside the state dir {state_dir}; "
                             "keep disks and images elsewhere")
        for top in _SYSTEM_DIRS:
            if inside(candidate, top):
                raise ValueError(f"{clip(written)}{via} is under {top}; keep disks and "
                                 "images in regular files elsewhere")


def _check_allowed(written: str, roots: Sequence[str]) -> None:
    """With --allow-dir, a path (symlinks resolved) must lie under one of the roots."""
    if not roots:
        return
    valcache.note(written)
    real = os.path.realpath(written)
    if not any(inside(real, root) for root in roots):
        via = "" if real == written else f" (a symlink to {clip(real)})"
        raise ValueError(f"{clip(written)}{via} is outside the allowed dirs "
                         f"(--allow-dir {', '.join(roots)})")


def inside(path: str, top: str) -> bool:
    """path is top or lies under it (lexically: resolve symlinks first)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def _stat(path: Path) -> os.stat_result | None:
    """stat() that says None for "nothing there", and ValueError when it cannot tell."""
    valcache.note(path)
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:  # ENAMETOOLONG, ELOOP, EACCES, ...
        raise ValueError(f"cannot check {clip(str(path))}: {err.strerror}") from None


def _resolve_file(value: Path, info: ValidationInfo) -> Path:
    """A path (relative to the manifest file) to a file that must exist."""
    path = _resolve_path(value, info)
    found = _stat(path)
    if found is None or not stat.S_ISREG(found.st_mode):
        raise ValueError(f"file not found: {clip(str(path))}")
    return path


class Boot(BaseModel):
    """Direct kernel boot (QEMU's -kernel, -initrd, -append) or firmware boot from a device."""

    model_config = _CONFIG

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


class Disk(BaseModel):
    """A disk image: created when missing (size:, or an overlay on base:), never deleted."""

    model_config = _CONFIG

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
        valcache.note(self.path)
        self._real_path = os.path.realpath(self.path)

    @property
    def real_path(self) -> str:
        return self._real_path

    @field_validator("path")
    @classmethod
    def _path(cls, value: Path, info: ValidationInfo) -> Path:
        path = _resolve_path(value, info)
        parent = _stat(path.parent)
        if parent is None or not stat.S_ISDIR(parent.st_mode):
            raise ValueError(f"directory not found: {clip(str(path.parent))}")
        found = _stat(path)
        if found is not None and not stat.S_ISREG(found.st_mode):
            raise ValueError(f"not a regular file: {clip(str(path))}")
        return path

    @field_validator("base")
    @classmethod
    def _base(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve_file(value, info)

    @model_validator(mode="after")
    def _creatable(self) -> Disk:
        if self.base is not None and self.format is not DiskFormat.QCOW2:
            raise ValueError("an overlay on base: must be format: qcow2")
        if _stat(self.path) is None:
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

    model_config = _CONFIG

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
    """One `kind: Switch` document: a Linux bridge, plain L2 or a local network.

    `mode: local` is vmd's `local interface`: the bridge gets the subnet's first
    address, dnsmasq serves DHCP with a static lease per VM MAC, and with `nat` the
    subnet is masqueraded to the host's other interfaces (see reconciler.localnet).
    """

    model_config = _CONFIG

    kind: Literal["Switch"]
    name: str = Field(pattern=NAME_PATTERN)
    bridge: str = Field("", pattern=r"^([A-Za-z0-9_.-]{1,15})?$")
    mode: Literal["bridge", "local"] = "bridge"
    subnet: IPv4Network | None = None  # local: default a free /24 of 100.64.0.0/10
    nat: bool | None = None  # local: default true
    dns: bool | None = None  # local: default false

    @field_validator("subnet", mode="before")
    @classmethod
    def _subnet(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                network = ipaddress.ip_network(value.strip(), strict=True)
            except ValueError as err:
                raise ValueError(f"not an IPv4 subnet like 100.64.7.0/24: {err}") from None
            if not isinstance(network, IPv4Network):
                raise ValueError(f"{value} is not IPv4; local switches are IPv4 only")
            if network.prefixlen > MAX_LOCAL_PREFIX:
                raise ValueError(f"{value} is too small: give at most a "
                                 f"/{MAX_LOCAL_PREFIX} (room for the gateway and VMs)")
            return network
        if value is None or isinstance(value, IPv4Network):
            return value
        raise ValueError(f"must be an IPv4 subnet like 100.64.7.0/24 (got {shown(value)})")

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
        if self.mode == "bridge":
            given = [f for f in ("subnet", "nat", "dns") if getattr(self, f) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} go with mode: local (a plain "
                                 "bridge has no addresses of its own)")
        else:
            object.__setattr__(self, "nat", True if self.nat is None else self.nat)
            object.__setattr__(self, "dns", False if self.dns is None else self.dns)
        return self

    @property
    def local(self) -> bool:
        return self.mode == "local"


class Ready(BaseModel):
    """When is the guest up: every probe given passes within the timeout.

    `serial`: a regex seen on the serial console; `tcp`: a TCP connect from the host to
    the VM's address succeeds; `agent`: the guest agent answers guest-ping.
    """

    model_config = _CONFIG

    serial: str | None = Field(None, max_length=1024)
    tcp: int | None = Field(None, ge=1, le=65535)
    agent: bool = False
    timeout: Seconds = Field(60.0, gt=0, le=24 * 3600)

    @field_validator("serial")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # FutureWarning: possible nested set
                re.compile(value)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from None
        except (OverflowError, RecursionError) as err:  # a{99999999999}, ((((...
            raise ValueError(f"not a usable regular expression: {err}") from None
        return value

    @model_validator(mode="after")
    def _some_probe(self) -> Ready:
        if self.serial is None and self.tcp is None and not self.agent:
            raise ValueError("give at least one probe: serial: REGEX, tcp: PORT or "
                             "agent: true")
        return self


USER_PATTERN = r"^[a-z_][a-z0-9_-]{0,31}$"
HOSTNAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"


class CloudInitText(ValueError):
    """user-data that cloud-init would ignore: `line` is within the text itself."""

    def __init__(self, message: str, *, line: int) -> None:
        super().__init__(message)
        self.line = line


def _read_text(path: Path, what: str) -> str:
    """A file the seed carries (user-data, network-config, keys): bounded, UTF-8."""
    valcache.note(path, content=True)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CLOUD_INIT_FILE + 1)
    except OSError as err:
        raise ValueError(f"{what} {clip(str(path))}: {err.strerror}") from None
    if len(data) > MAX_CLOUD_INIT_FILE:
        raise ValueError(f"{what} {clip(str(path))} is over {MAX_CLOUD_INIT_FILE} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {clip(str(path))} is not UTF-8 text: {err.reason} "
                         f"at byte {err.start}") from None


class CloudInit(BaseModel):
    """A NoCloud seed for the guest's cloud-init (built by reconciler.seed at start).

    Secrets: the content of user_data and of the *_file fields is never dumped (not
    in records, --json, logs): only `digest`, a hash of it, which the reconciler
    sets, so a change to the content is a hardware change (a new spec hash).
    """

    model_config = _CONFIG

    user: str | None = Field(None, pattern=USER_PATTERN)
    ssh_authorized_keys: list[str] = Field(default_factory=list, max_length=100)
    ssh_authorized_keys_file: Path | None = None
    hostname: str | None = Field(None, pattern=HOSTNAME_PATTERN)
    user_data: str | None = Field(None, exclude=True, max_length=MAX_CLOUD_INIT_FILE)
    user_data_file: Path | None = None
    network_config: dict[str, Any] | None = None
    network_config_file: Path | None = None
    meta_data: dict[str, Any] = Field(default_factory=dict)
    digest: str = Field("", description="set by the reconciler: a hash of the seed's "
                        "secret content; never written in a manifest")
    _texts: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("ssh_authorized_keys_file", "user_data_file", "network_config_file")
    @classmethod
    def _file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is None or (info.context or {}).get("from_record"):
            return value
        return _resolve_file(value, info)

    @field_validator("ssh_authorized_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        for index, key in enumerate(value):
            if not _looks_like_key(key):
                raise ValueError(f"entry {index} is not an SSH public key (expected "
                                 "'ssh-ed25519 AAAA...' or similar)")
        return value

    @field_validator("meta_data")
    @classmethod
    def _meta(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in ("instance-id", "local-hostname"):
            if key in value:
                raise ValueError(f"{key} is set by the reconciler (instance-id follows "
                                 "the seed's content; use hostname: for local-hostname)")
        return value

    @model_validator(mode="after")
    def _contents(self, info: ValidationInfo) -> CloudInit:
        if (info.context or {}).get("from_record"):
            return self  # a record's spec: the content stays in the seed it built
        if self.digest:
            raise ValueError("digest is set by the reconciler; remove it")
        for one, other in (("user_data", "user_data_file"),
                           ("network_config", "network_config_file")):
            if getattr(self, one) is not None and getattr(self, other) is not None:
                raise ValueError(f"give {one} or {other}, not both")
        texts: dict[str, str] = {}
        if self.user_data is not None:
            texts["user_data"] = self.user_data
        if self.user_data_file is not None:
            texts["user_data"] = _read_text(self.user_data_file, "user_data_file")
        if self.network_config_file is not None:
            texts["network_config"] = _read_text(self.network_config_file,
                                                 "network_config_file")
        elif self.network_config is not None:
            texts["network_config"] = yaml.safe_dump(self.network_config, sort_keys=False)
        if self.ssh_authorized_keys_file is not None:
            text = _read_text(self.ssh_authorized_keys_file, "ssh_authorized_keys_file")
            keys = [line.strip() for line in text.splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
            bad = [n for n, key in enumerate(keys, 1) if not _looks_like_key(key)]
            if bad or not keys:
                where = clip(str(self.ssh_authorized_keys_file))
                what = f"key {bad[0]} is not an SSH public key" if bad else "no keys in it"
                raise ValueError(f"ssh_authorized_keys_file {where}: {what}")
            texts["keys"] = "\n".join(keys)
        if "user_data" in texts:
            _check_user_data(texts["user_data"], from_file=self.user_data_file)
        self._texts = texts
        digest = hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()
        object.__setattr__(self, "digest", digest[:32])
        return self

    def texts(self) -> dict[str, str]:
        """The seed's content read from the manifest and its files (secrets included)."""
        return dict(self._texts)

    def authorized_keys(self) -> list[str]:
        extra = self._texts.get("keys", "")
        return [*self.ssh_authorized_keys, *extra.splitlines()] if extra \
            else list(self.ssh_authorized_keys)


_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-", "sk-ssh-ed25519", "sk-ecdsa-sha2-",
              "ssh-dss")


def _looks_like_key(key: str) -> bool:
    parts = key.split()
    return len(parts) >= 2 and parts[0].startswith(_KEY_TYPES) and \
        re.fullmatch(r"[A-Za-z0-9+/]+={0,3}", parts[1]) is not None and "\n" not in key


def user_data_problem(text: str) -> tuple[int, str] | None:
    """None for user-data cloud-init uses: `#cloud-config` YAML that parses to a mapping,
    or a `#!` script; else (line within text, what is wrong). Cloud-init itself would
    ignore anything else silently."""
    if len(text.encode()) > MAX_CLOUD_INIT_FILE:
        return 1, f"user-data is over {MAX_CLOUD_INIT_FILE} bytes"
    first = text.split("\n", 1)[0].rstrip()
    if first.startswith("#!"):
        return None
    if first != "#cloud-config":
        return 1, ("user-data must start with '#cloud-config' or '#!' (cloud-init would "
                   "ignore it silently)")
    # Bounded like a manifest (depth, alias expansion): the seed builder parses it again.
    try:
        nodes = list(compose_documents(text.encode()))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = " ".join(filter(None, [err.context, err.problem]))
        return (mark.line + 1 if mark else 1), f"YAML syntax error in #cloud-config: {problem}"
    except (yaml.YAMLError, RecursionError) as err:
        return 1, f"YAML error in #cloud-config: {clip(str(err))}"
    if len(nodes) > 1:
        return nodes[1].start_mark.line + 1, "#cloud-config must be one YAML document"
    problems = check_document(nodes[0]) if nodes else []
    if problems:
        return problems[0].line, f"#cloud-config: {problems[0].message}"
    data = construct(nodes[0]) if nodes else None
    try:  # as cloud-init reads it (YAML 1.1): `when: 2001-02-30` is a date, and no day
        yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (yaml.YAMLError, ValueError) as err:
        return 1, f"#cloud-config does not load as cloud-init reads it: {clip(str(err))}"
    if data is not None and not isinstance(data, dict):
        return 1, "#cloud-config must be a mapping of cloud-init modules"
    return None


def _check_user_data(text: str, *, from_file: Path | None) -> None:
    problem = user_data_problem(text)
    if problem is None:
        return
    line, message = problem
    if from_file is not None:
        raise ValueError(f"user_data_file {clip(str(from_file))}:{line}: {message}")
    raise CloudInitText(f"user_data line {line}: {message}", line=line)


# vm.conf's owner: USER[:GROUP] (POSIX portable user and group names).
OWNER_PATTERN = r"^[a-z_][a-z0-9_.-]{0,31}(:[a-z_][a-z0-9_.-]{0,31})?$"


class Resources(BaseModel):
    """Per-VM limits, applied with cgroup v2 (`cgroups.place`); none are required."""

    model_config = _CONFIG

    cpu_weight: int | None = Field(None, ge=1, le=10000)
    cpu_max: str | None = Field(None, pattern=r"^(max|[0-9]{1,5}(\.[0-9]{1,2})?%)$")
    memory_max: MiB | None = Field(None, ge=16)
    io_weight: int | None = Field(None, ge=1, le=10000)
    pids_max: int | None = Field(None, ge=16, le=4_194_304)

    @field_validator("cpu_max")
    @classmethod
    def _cpu_max(cls, value: str | None) -> str | None:
        if value not in (None, "max") and float(value.rstrip("%")) < 1:
            raise ValueError("must be at least 1% (or max)")
        return value


class Placement(BaseModel):
    """Where a VM may run when hosts share one desired state (`reconcile --etcd`)."""

    model_config = _CONFIG

    host: str | None = Field(None, pattern=HOSTNAME_PATTERN)  # only this host
    labels: dict[str, str] = Field(default_factory=dict)  # hosts with these labels
    spread: str | None = Field(None, pattern=NAME_PATTERN)  # apart from its group


class VM(BaseModel):
    """One `kind: VM` document."""

    model_config = _CONFIG

    kind: Literal["VM"] = "VM"
    name: str = Field(pattern=NAME_PATTERN)
    state: State = State.RUNNING
    restart: Restart = Restart.ALWAYS
    on_change: OnChange = OnChange.RESTART
    memory: MiB = Field(256, ge=16, le=1024 * 1024)
    vcpus: int = Field(1, ge=1, le=255)
    accel: Accel = Accel.AUTO
    boot: Boot
    disks: list[Disk] = Field(default_factory=list, max_length=MAX_DISKS)
    cdrom: Path | None = None
    interfaces: list[Interface] = Field(default_factory=list, max_length=8)
    stop_timeout: Seconds = Field(30.0, ge=0, le=3600)
    ready: Ready | None = None
    agent: bool = False  # a virtio-serial channel for qemu-guest-agent
    cpus: str | None = Field(None, max_length=256)  # vCPU pinning: host CPUs "0-1,3"
    cloud_init: CloudInit | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    # vm.conf's owner: QEMU runs as USER[:GROUP], who may `status`/`console` this VM.
    owner: str | None = Field(None, pattern=OWNER_PATTERN)
    resources: Resources | None = None  # cgroup v2 limits, changed live
    priority: int = Field(0, ge=-1000, le=1000)  # higher starts first; stops run reversed
    # Many hosts (--etcd): where it may run, and whether it is restarted on another
    # host when its own is lost (its disks must then be on shared storage).
    placement: Placement | None = None
    failover: bool = False
    _spec: dict[str, Any] | None = PrivateAttr(None)  # spec(), once computed
    _hash: str = PrivateAttr("")  # spec_hash(), once computed

    # Fields a running VM can follow without a restart; every other field is
    # hardware, and a change to it changes the spec hash.
    LIVE_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"kind", "state", "restart", "on_change", "stop_timeout", "ready", "labels", "cpus",
         "resources", "priority", "placement", "failover"}
    )

    @field_validator("cpus")
    @classmethod
    def _cpus(cls, value: str | None) -> str | None:
        if value is not None:
            parse_cpus(value)
        return value

    @field_validator("owner")
    @classmethod
    def _owner(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or (info.context or {}).get("from_record"):
            return value
        import grp
        import pwd

        valcache.note("/etc/nsswitch.conf", content=True)
        valcache.note("/etc/passwd", content=True)
        valcache.note("/etc/group", content=True)
        user, _, group = value.partition(":")
        try:
            uid = pwd.getpwnam(user).pw_uid
        except KeyError:
            raise ValueError(f"user '{user}' does not exist on this host") from None
        if group:
            try:
                grp.getgrnam(group)
            except KeyError:
                raise ValueError(f"group '{group}' does not exist on this host") from None
        if uid == 0 or group == "root":
            raise ValueError("QEMU never runs as root: name an unprivileged user")
        return value

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
        if self.ready is not None and self.ready.agent and not self.agent:
            raise ValueError("ready: {agent: true} needs agent: true on the VM "
                             "(the guest agent's channel)")
        limit = self.resources.memory_max if self.resources else None
        if limit is not None and limit <= self.memory:
            raise ValueError(f"resources.memory_max ({limit}M) must be above memory "
                             f"({self.memory}M): QEMU needs its own memory on top of the "
                             "guest's")
        if self.ready is not None and self.ready.tcp is not None and not self.interfaces:
            raise ValueError(f"ready: {{tcp: {self.ready.tcp}}} needs an interface to "
                             "connect to (interfaces:)")
        return self

    @property
    def hostname(self) -> str:
        return (self.cloud_init.hostname if self.cloud_init else None) or self.name

    def writable_disks(self) -> list[Path]:
        return [d.path for d in self.disks if not d.readonly]

    def spec(self) -> dict[str, Any]:
        """The whole spec, JSON-ready, as recorded (computed once: the VM is frozen).
        Callers only read it."""
        if self._spec is None:
            self._spec = self.model_dump(mode="json")
        return self._spec

    def hardware(self) -> dict[str, Any]:
        """The part of the spec that QEMU was started with (JSON-ready)."""
        found = {k: v for k, v in self.spec().items() if k not in self.LIVE_FIELDS}
        if found.get("owner") is None:  # as before owners: a running VM is not restarted
            found.pop("owner", None)
        return found

    def spec_hash(self) -> str:
        if not self._hash:
            blob = json.dumps(self.hardware(), sort_keys=True, separators=(",", ":"))
            self._hash = hashlib.sha256(blob.encode()).hexdigest()[:16]
        return self._hash


class Settings(BaseModel):
    """One `kind: Settings` document: how the directory's VMs are started (vm.conf's
    `staggered start parallel N delay S`); --parallel and --stagger override it."""

    model_config = _CONFIG

    kind: Literal["Settings"]
    parallel: int | None = Field(None, ge=1, le=256)
    stagger: Seconds | None = Field(None, ge=0, le=3600)


@dataclass(frozen=True)
class DeclaredSettings:
    settings: Settings
    file: Path
    line: int


@dataclass(frozen=True)
class DeclaredTemplate:
    """A `kind: Template` document (vm.conf's `vm "base"` used with `instance`): VM
    fields its instances inherit, and the ones they may override (`allow:`)."""

    name: str
    fields: dict[str, Any]
    allow: frozenset[str]
    file: Path
    node: yaml.Node = field(compare=False, repr=False)


@dataclass(frozen=True)
class Deferred:
    """A VM document naming a template: validated once every template is known."""

    file: Path
    node: yaml.Node = field(compare=False, repr=False)
    data: dict[str, Any] = field(compare=False, repr=False)
    context: dict[str, Any] = field(compare=False, repr=False)


def load(root: Path, *, max_bytes: int = DEFAULT_MAX_MANIFEST_BYTES,
         state_dir: Path | None = None, allow_dirs: Sequence[Path] = ()) -> Manifests:
    """Load and validate every manifest under root; collect every error.

    A file over max_bytes is an error, not read; no disk or image path may point
    into state_dir (nor /proc, /sys, /dev); with allow_dirs, every such path must lie
    under one of them (symlinks resolved). `reconciler.manifests.load` is the same
    with the validation cache.
    """
    listing, read = read_manifests(root, max_bytes=max_bytes)
    return _load(listing, read, load_context(state_dir, allow_dirs))


def _load(listing: Listing, read: Read, context: dict[str, Any], *,
          route_table: str | None = None) -> Manifests:
    result = Manifests()
    result.errors += listing.errors
    vms: dict[str, Declared] = {}
    switches: dict[str, DeclaredSwitch] = {}
    context["referenced"] = referenced = set[Path]()  # cloud_init's *_file: data, not VMs
    templates: dict[str, DeclaredTemplate] = {}
    deferred: list[Deferred] = []
    settings: DeclaredSettings | None = None
    for path, data in read:
        if data is None:  # gone since it was listed: as if it had not been there
            continue
        if isinstance(data, ManifestError):
            result.errors.append(data)
            continue
        result.files.append(path)
        try:
            with _gc_paused():
                items = list(_load_file(path, data, {**context, "base_dir": path.parent}))
        except Exception as err:  # a bug of ours: this file is broken, the others load
            log.debug("loading %s failed", path, exc_info=True)
            items = [ManifestError(path, 0, f"internal error reading this file: "
                                   f"{type(err).__name__}: {clip(str(err))}")]
        if not items:
            result.empty.add(path)
        for item in items:
            if isinstance(item, ManifestError):
                result.errors.append(item)
            elif isinstance(item, Declared):
                _add_unique(vms, item.vm.name, item, result.errors, kind="vm")
            elif isinstance(item, DeclaredSwitch):
                _add_unique(switches, item.switch.name, item, result.errors, kind="switch")
            elif isinstance(item, DeclaredSettings):
                if settings is not None:
                    result.errors.append(ManifestError(
                        item.file, item.line, f"a second kind: Settings (the first is in "
                        f"{settings.file}:{settings.line}); one per directory", kind="settings"))
                else:
                    settings = item
            elif isinstance(item, DeclaredTemplate):
                if item.name in templates:
                    result.errors.append(ManifestError(
                        item.file, item.node.start_mark.line + 1, f"template '{item.name}' "
                        f"is also declared in {templates[item.name].file}:"
                        f"{templates[item.name].node.start_mark.line + 1}", kind="template"))
                templates.setdefault(item.name, item)
            else:
                deferred.append(item)
    for later in deferred:  # instances: every template is known now
        for item in _instances(later, templates):
            if isinstance(item, ManifestError):
                result.errors.append(item)
            else:
                _add_unique(vms, item.vm.name, item, result.errors, kind="vm")
    # A file a VM's cloud_init reads (user-data, network-config, keys) is data that
    # happens to sit in the directory, often as *.yaml: never a manifest of its own.
    if referenced:
        def is_data(file: Path) -> bool:
            return Path(os.path.abspath(file)) in referenced

        result.errors = [e for e in result.errors if not is_data(e.file)]
        vms = {n: d for n, d in vms.items() if not is_data(d.file)}
        switches = {n: d for n, d in switches.items() if not is_data(d.file)}
        result.files = [f for f in result.files if not is_data(f)]
        result.empty = {f for f in result.empty if not is_data(f)}
    routes = host_routes() if route_table is None else host_routes(text=route_table)
    result.errors += _subnet_overlaps(switches, routes=routes)
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
    if settings is not None and settings.file not in result.broken_files:
        result.settings = settings.settings
    result.errors.sort(key=lambda e: (str(e.file), e.line))
    return result


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Composing a big file allocates up to a few hundred thousand objects, none in a
    cycle: the cyclic collector would scan the growing heap again and again (a mapping
    of 50,000 keys composes in 0.43 s with it, 0.13 s without)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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


def _subnet_overlaps(switches: dict[str, DeclaredSwitch], *,
                     routes: Sequence[tuple[IPv4Network, str]]) -> Iterator[ManifestError]:
    """Local switches whose subnets overlap each other or a route of the host."""
    local = sorted((d for d in switches.values() if d.switch.subnet is not None),
                   key=lambda d: (str(d.file), d.line))
    for index, one in enumerate(local):
        assert one.switch.subnet is not None
        for other in local[index + 1:]:
            assert other.switch.subnet is not None
            if one.switch.subnet.overlaps(other.switch.subnet):
                for a, b in ((one, other), (other, one)):
                    yield ManifestError(
                        a.file, a.subnet_line, f"subnet {a.switch.subnet} overlaps switch "
                        f"'{b.switch.name}' ({b.switch.subnet}, {b.file}:{b.subnet_line}); "
                        "give each local switch a subnet of its own",
                        vm=a.switch.name, kind="switch")
        for network, device in routes:
            if device != one.switch.bridge and one.switch.subnet.overlaps(network):
                yield ManifestError(
                    one.file, one.subnet_line, f"subnet {one.switch.subnet} overlaps the "
                    f"host's route to {network} via {device}; choose another subnet",
                    vm=one.switch.name, kind="switch")


def _unknown_switches(result: Manifests) -> Iterator[ManifestError]:
    for decl in result.vms.values():
        for index, nic in enumerate(decl.vm.interfaces):
            if nic.switch not in result.switches:
                line = decl.switch_lines[index] if index < len(decl.switch_lines) \
                    else decl.line
                yield ManifestError(
                    decl.file, line, f"interfaces.{index}.switch: no valid switch "
                    f"{nic.switch!r} is declared (add a document with kind: Switch, "
                    f"name: {nic.switch})", vm=decl.vm.name)


def _identity(node: yaml.Node) -> tuple[str | None, str]:
    """The name and kind of a document's object, read from its nodes (for errors)."""
    name, kind = None, "vm"
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if not (isinstance(key, yaml.ScalarNode) and isinstance(value, yaml.ScalarNode)):
                continue
            if key.value == "name" and value.tag == STR_TAG:
                name = value.value
            elif key.value == "kind" and value.value in ("Switch", "Template", "Settings"):
                kind = value.value.lower()
    return name, kind


Loaded = (Declared | DeclaredSwitch | DeclaredTemplate | DeclaredSettings | Deferred
          | ManifestError)


def _load_file(path: Path, data: bytes, context: dict[str, Any]) -> Iterator[Loaded]:
    room = MAX_ERRORS_PER_FILE  # errors shown in full; the others are counted
    documents = compose_documents(data)
    count = 0
    while True:
        try:
            node = next(documents, None)
        except (yaml.YAMLError, RecursionError) as err:
            yield _yaml_error(path, data, err)
            break
        if node is None:
            break
        if isinstance(node, yaml.ScalarNode) and node.tag == NULL_TAG:
            continue  # an empty document: a trailing ---, or only comments
        count += 1
        if count > MAX_DOCUMENTS:
            yield ManifestError(path, node.start_mark.line + 1, f"over {MAX_DOCUMENTS} "
                                "documents in this file; split it into smaller files")
            break
        room -= yield from _load_document(path, node, context, room=max(room, 0))
    if room < 0:
        yield ManifestError(path, 0, f"{-room} more errors in this file not shown")


def _yaml_error(path: Path, data: bytes, err: Exception) -> ManifestError:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        problem = " ".join(filter(None, [err.context, err.problem]))
        return ManifestError(path, mark.line + 1 if mark else 0, f"YAML syntax error: {problem}")
    if isinstance(err, yaml.reader.ReaderError):  # bad UTF-8, control characters
        line = data.count(b"\n", 0, err.position) + 1 if isinstance(err.position, int) else 0
        return ManifestError(path, line, f"YAML error: {err.reason} "
                             f"(character {err.character!r})")
    if isinstance(err, TooManyNodes):
        return ManifestError(path, 0, str(err))
    return ManifestError(path, 0, f"YAML error: {err}")


def _load_document(path: Path, node: yaml.Node, context: dict[str, Any], *, room: int
                   ) -> Generator[Loaded, None, int]:
    """Validate one document; yield at most `room` errors, return how many there were."""
    line = node.start_mark.line + 1
    name, label = _identity(node)
    problems = check_document(node)
    if not problems:
        try:
            data = construct(node)
        except NodeError as err:
            problems = [err]
    if problems:
        for problem in problems[:room]:
            yield ManifestError(path, problem.line, problem.message, vm=name, kind=label)
        return len(problems)
    if isinstance(data, dict) and isinstance(data.get("cloud_init"), dict):
        for key in ("user_data_file", "network_config_file", "ssh_authorized_keys_file"):
            if isinstance(value := data["cloud_init"].get(key), str):
                context["referenced"].add(Path(os.path.abspath(path.parent / value)))
    if not isinstance(data, dict):
        kind = {list: "list", str: "string", int: "integer", float: "number",
                bool: "boolean"}.get(type(data), type(data).__name__)
        if room:
            yield ManifestError(path, line, f"a document must be a mapping of fields "
                                f"(got {kind})")
        return 1
    name = data.get("name") if isinstance(data.get("name"), str) else None
    kind = data.get("kind", "VM")
    if kind == "Template":
        found = _template(path, node, data)
        if isinstance(found, ManifestError):
            if room:
                yield found
            return 1
        yield found
        return 0
    if kind == "VM" and "template" in data:
        yield Deferred(path, node, data, context)
        return 0
    if kind == "VM":
        return (yield from _replicas(path, node, data, context, room=room))
    if kind == "Settings":
        settings, failed = yield from _validated(Settings, data, context, path, node,
                                                 room=room, name=None, kind="settings")
        if settings is not None:
            yield DeclaredSettings(settings, path, line)
        return failed
    if kind != "Switch":
        if room:
            yield ManifestError(path, _line_of(node, ("kind",)), f"unknown kind {shown(kind)} "
                                "(expected VM, Switch, Template or Settings)", vm=name)
        return 1
    switch, failed = yield from _validated(Switch, data, context, path, node, room=room,
                                           name=name, kind="switch")
    if switch is not None:
        yield DeclaredSwitch(switch=switch, file=path, line=line,
                             subnet_line=_line_of(node, ("subnet",)))
    return failed


_Model = TypeVar("_Model", bound=BaseModel)


def _validated(model: type[_Model], data: dict[str, Any], context: dict[str, Any],
               path: Path, node: yaml.Node, *, room: int, name: str | None, kind: str,
               origin: dict[str, tuple[Path, yaml.Node]] | None = None
               ) -> Generator[ManifestError, None, tuple[_Model | None, int]]:
    """data as model, or (None and) its errors at their FILE:LINE, at most `room` of
    them: the object, and how many errors there were. `origin`: fields written in
    another document (a template), where their errors point."""
    try:
        return model.model_validate(data, context=context), 0
    except ValidationError as err:
        errors = err.errors()
    for error in errors[:room]:
        where, at = path, node
        if origin and error["loc"] and error["loc"][0] in origin:
            where, at = origin[error["loc"][0]]
        yield ManifestError(where, _error_line(at, error), _describe(error, model),
                            vm=name, kind=kind)
    return None, len(errors)


MAX_REPLICAS = 256
# What a template may not carry: an instance's own identity.
_NOT_IN_TEMPLATES = frozenset({"name", "kind", "template", "replicas", "allow"})


def _template(path: Path, node: yaml.Node, data: dict[str, Any]
              ) -> DeclaredTemplate | ManifestError:
    """A `kind: Template` document, checked: its name, its allow list, its fields' names
    (their values are checked in each instance, where they become a VM)."""
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        return ManifestError(path, _line_of(node, ("name",)), "a template needs a name: "
                             "[a-z0-9][a-z0-9-]{0,62}", kind="template")
    known = set(VM.model_fields) - _NOT_IN_TEMPLATES
    allow = data.get("allow", [])
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        return ManifestError(path, _line_of(node, ("allow",)), "allow: must be a list of "
                             "VM field names", vm=name, kind="template")
    for index, field_name in enumerate(allow):
        if field_name not in known:
            return ManifestError(path, _line_of(node, ("allow", index)), f"allow: unknown "
                                 f"field {shown(field_name)} (known fields: "
                                 f"{', '.join(sorted(known))})", vm=name, kind="template")
    fields = {k: v for k, v in data.items() if k not in ("name", "kind", "allow")}
    for key in fields:
        if key not in known:
            return ManifestError(path, _line_of(node, (key,)), f"unknown field {shown(key)} "
                                 f"for a template (known fields: {', '.join(sorted(known))})",
                                 vm=name, kind="template")
    return DeclaredTemplate(name, fields, frozenset(allow), path, node)


def _instances(later: Deferred, templates: dict[str, DeclaredTemplate]
               ) -> Iterator[Declared | ManifestError]:
    """A VM naming a template: the template's fields, then the VM's own, where allowed."""
    data, node, path = later.data, later.node, later.file
    name = data.get("name") if isinstance(data.get("name"), str) else None
    wanted = data["template"]
    template = templates.get(wanted) if isinstance(wanted, str) else None
    if template is None:
        known = ", ".join(sorted(templates)) or "none"
        yield ManifestError(path, _line_of(node, ("template",)), f"template: no template "
                            f"named {shown(wanted)} is declared (declared: {known})", vm=name)
        return
    own = {k: v for k, v in data.items() if k != "template"}
    where = f"{template.file}:{template.node.start_mark.line + 1}"
    refused = False
    for key in own:
        if key in template.fields and key not in template.allow:
            refused = True
            yield ManifestError(
                path, _line_of(node, (key,)), f"{key}: template '{template.name}' ({where}) "
                f"sets it and does not allow instances to override it (its allow: "
                f"[{', '.join(sorted(template.allow))}])", vm=name)
    if refused:
        return
    inherited = _anchored(template.fields, template.file.parent)
    merged = {**inherited, **own}
    origin = {key: (template.file, template.node) for key in template.fields
              if key not in own}
    yield from _replicas(path, node, merged, later.context, room=MAX_ERRORS_PER_FILE,
                         origin=origin)


def _replicas(path: Path, node: yaml.Node, data: dict[str, Any], context: dict[str, Any],
              *, room: int, origin: dict[str, tuple[Path, yaml.Node]] | None = None
              ) -> Generator[Declared | ManifestError, None, int]:
    """One VM, or with `replicas: N` its N copies NAME-1..NAME-N; `{name}` in a disk's
    path or base is each VM's own name. `origin`: fields written elsewhere (a template),
    where their errors point."""
    name = data.get("name") if isinstance(data.get("name"), str) else None
    count = data.get("replicas")
    if count is None:
        names = [name]
    elif isinstance(count, bool) or not isinstance(count, int) or \
            not 1 <= count <= MAX_REPLICAS:
        if room:
            yield ManifestError(path, _line_of(node, ("replicas",)), f"replicas must be a "
                                f"number from 1 to {MAX_REPLICAS} (got {shown(count)})", vm=name)
        return 1
    elif any(isinstance(nic, dict) and "mac" in nic for nic in data.get("interfaces") or []):
        if room:
            yield ManifestError(path, _line_of(node, ("replicas",)), "replicas: an "
                                "interface with its own mac: cannot be copied (each replica "
                                "gets a MAC derived from its name)", vm=name)
        return 1
    else:
        names = [f"{name}-{i}" for i in range(1, count + 1)]
    base = {k: v for k, v in data.items() if k != "replicas"}
    made: list[Declared] = []
    for each in names:
        one = dict(base, name=each) if each is not None else base
        if isinstance(one.get("disks"), list):
            one["disks"] = [_named(d, each) for d in one["disks"]]
        vm, failed = yield from _validated(VM, one, context, path, node, room=room,
                                           name=each, kind="vm", origin=origin)
        if vm is None:
            return failed  # one replica's errors are every replica's
        switch_lines = tuple(_line_of(node, ("interfaces", index, "switch"))
                             for index in range(len(vm.interfaces)))
        made.append(Declared(vm=vm, file=path, line=node.start_mark.line + 1,
                             switch_lines=switch_lines))
    yield from made
    return 0


def _anchored(fields: dict[str, Any], directory: Path) -> dict[str, Any]:
    """A template's relative paths made relative to its own file, not its instances'."""
    def anchor(value: Any) -> Any:
        if isinstance(value, str) and value and not os.path.isabs(value):
            return str(directory / value)
        return value

    def paths_of(mapping: Any, keys: tuple[str, ...]) -> Any:
        if not isinstance(mapping, dict):
            return mapping
        return {k: anchor(v) if k in keys else v for k, v in mapping.items()}

    found = dict(fields)
    if "boot" in found:
        found["boot"] = paths_of(found["boot"], ("kernel", "initrd"))
    if "cdrom" in found:
        found["cdrom"] = anchor(found["cdrom"])
    if isinstance(found.get("disks"), list):
        found["disks"] = [paths_of(d, ("path", "base")) for d in found["disks"]]
    if "cloud_init" in found:
        found["cloud_init"] = paths_of(found["cloud_init"], (
            "user_data_file", "network_config_file", "ssh_authorized_keys_file"))
    return found


def _named(disk: Any, name: str | None) -> Any:
    """A disk's path and base with `{name}` made the VM's name."""
    if not isinstance(disk, dict) or name is None:
        return disk
    return {k: v.replace("{name}", name) if k in ("path", "base") and isinstance(v, str)
            else v for k, v in disk.items()}


def _error_line(node: yaml.Node, error: Any) -> int:
    """The manifest line of a pydantic error; for bad inline user-data, its own line."""
    loc = tuple(error["loc"])
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, CloudInitText):
        text = _node_at(node, (*loc, "user_data"))
        if isinstance(text, yaml.ScalarNode):
            if text.style in ("|", ">"):  # a block: its text starts on the next line
                return text.start_mark.line + 1 + cause.line
            if text.end_mark.line > text.start_mark.line:  # a multi-line flow scalar
                return text.start_mark.line + cause.line
            return text.start_mark.line + 1  # one line: "\n" escapes, no line breaks
    return _line_of(node, loc)


def _node_at(node: yaml.Node, loc: Sequence[int | str]) -> yaml.Node | None:
    for step in loc:
        if isinstance(node, yaml.MappingNode):
            found = [v for k, v in node.value if k.value == step]
            if not found:
                return None
            node = found[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) \
                and step < len(node.value):
            node = node.value[step]
        else:
            return None
    return node


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
    where = clip(".".join(str(p) for p in loc), 100)
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        known = sorted(k for k in parent.model_fields if k.islower()) if parent else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        advice = f"did you mean '{hint[0]}'?" if hint else f"known fields: {', '.join(known)}"
        return f"unknown field '{where}' ({advice})"
    if kind == "string_type":
        return f"{where} must be a string, but YAML read {shown(value)}: put the value in quotes"
    if kind == "missing":
        return f"{where} is required"
    if kind == "enum":
        return f"{where} must be one of {error['ctx']['expected']} (got {shown(value)})"
    if kind == "string_pattern_mismatch" and loc == ("name",):
        return (f"name {shown(value)} is not valid: use 1-63 lowercase letters, digits and "
                "dashes, starting with a letter or digit")
    if kind in ("greater_than_equal", "less_than_equal"):
        bound = "at least" if kind == "greater_than_equal" else "at most"
        limit = error["ctx"]["ge" if kind == "greater_than_equal" else "le"]
        unit = "M" if loc == ("memory",) else ""
        return f"{where} must be {bound} {limit}{unit} (got {shown(value)})"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
