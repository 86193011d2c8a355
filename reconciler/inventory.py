"""`reconcile list`: every VM on this host, ours or not (vmd's get_info_vm, host-wide).

Two sources: QEMU processes (`/proc/*/comm` qemu-system-*, with what their command
line says: `-name`, `-smp`, `-m`), and KVM VMs of any hypervisor, from debugfs
(`/sys/kernel/debug/kvm/<pid>-<fd>/vcpu*`; debugfs is mounted when it is not). A
process in both is one row. `managed` says whether this state dir's records name it.
Parsing the command line is pure.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from reconciler.observed import process_start_time

DEBUGFS = Path("/sys/kernel/debug")
_SIZE = re.compile(r"^(?:size=)?(\d+(?:\.\d+)?)([kKmMgGtT]?)[bB]?$")
_UNIT = {"": 1, "k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}


@dataclass(frozen=True)
class HostVM:
    pid: int
    command: str  # the process's comm
    name: str | None  # QEMU's -name guest=
    vcpus: int | None
    memory: int | None  # MiB
    kvm: bool  # KVM runs it (debugfs knows it)
    managed: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def qemu_facts(args: list[str]) -> tuple[str | None, int | None, int | None]:
    """(-name guest, vCPUs, memory MiB) from a QEMU command line (pure; None: unsaid)."""
    name = vcpus = memory = None
    for flag, value in itertools.pairwise(args):
        if flag == "-name":
            first = value.split(",")[0]  # guest=NAME,... or the legacy bare NAME
            name = first.removeprefix("guest=") if first.startswith("guest=") or \
                "=" not in first else None
        elif flag == "-smp":
            for part in value.split(","):
                key, _, number = part.rpartition("=")
                if key in ("", "cpus") and number.isdigit():
                    vcpus = int(number)
        elif flag == "-m":
            for part in value.split(","):
                if (match := _SIZE.match(part.strip())) is not None:
                    memory = int(float(match[1]) * _UNIT[match[2].lower()])
                    break
    # QEMU's defaults: one vCPU, 128 MiB
    return name, 1 if vcpus is None else vcpus, 128 if memory is None else memory


def debugfs_kvm(root: Path = DEBUGFS, *, mount: bool = True) -> Path | None:
    """debugfs's kvm directory, mounting debugfs first if it is not (root only)."""
    kvm = root / "kvm"
    if kvm.is_dir():
        return kvm
    if mount:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["mount", "-t", "debugfs", "debugfs", str(root)],
                           capture_output=True, timeout=10, check=False)
    return kvm if kvm.is_dir() else None


def kvm_vms(kvm: Path | None) -> dict[int, int]:
    """pid -> vCPUs of every KVM VM debugfs lists (`<pid>-<fd>/vcpuN`)."""
    found: dict[int, int] = {}
    if kvm is None:
        return found
    with contextlib.suppress(OSError):
        for entry in kvm.iterdir():
            pid, sep, fd = entry.name.partition("-")
            if not (sep and pid.isdigit() and fd.isdigit()):
                continue
            with contextlib.suppress(OSError):
                vcpus = sum(1 for v in entry.iterdir() if v.name.startswith("vcpu"))
                found[int(pid)] = found.get(int(pid), 0) + vcpus
    return found


def host_vms(managed: set[int], *, proc: Path = Path("/proc"),
             kvm: Path | None = None, ours: Path | None = None) -> list[HostVM]:
    """Every QEMU and every KVM VM on the host, by pid; `managed`: our live pids.

    `ours`: a state dir's vms/: a QEMU tagged with it (privsep's fd sets) is left out
    when `managed` does not name it (another owner's VM: neither ours to show nor
    foreign)."""
    tag = f"opaque={ours}/" if ours is not None else None
    in_kvm = kvm_vms(kvm)
    rows: list[HostVM] = []
    seen: set[int] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            comm = (entry / "comm").read_text().strip()
            if not comm.startswith("qemu-system") and pid not in in_kvm:
                continue
            args = [a.decode(errors="replace")
                    for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if process_start_time(pid) is None:  # gone, or a zombie
            continue
        if tag is not None and pid not in managed and any(tag in a for a in args):
            continue
        seen.add(pid)
        if comm.startswith("qemu-system"):
            name, vcpus, memory = qemu_facts(args)
            vcpus = in_kvm.get(pid, vcpus) or vcpus
        else:
            name, vcpus, memory = None, in_kvm[pid], None
        rows.append(HostVM(pid, comm, name, vcpus, memory, pid in in_kvm, pid in managed))
    return sorted(rows, key=lambda r: r.pid)
