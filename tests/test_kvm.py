"""The driver's pure parts: the QEMU command line and the accelerator choice."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path

import pytest

from reconciler import kvm
from reconciler.desired import VM, Accel
from reconciler.kvm import choose_accel, opt
from reconciler.kvm import qemu_argv as _qemu_argv
from reconciler.observed import VMPaths
from reconciler.privsep import Handoff, Identity


def qemu_argv(vm: VM, paths: VMPaths, **options: object) -> list[str]:
    """The command line, its files opened by a real Handoff (closed at once)."""
    paths.dir.mkdir(parents=True, exist_ok=True)
    files = Handoff(None)
    try:
        return _qemu_argv(vm, paths, files=files, **options)  # type: ignore[arg-type]
    finally:
        files.close()


def make_vm(tmp_path: Path, **fields: object) -> VM:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    return VM.model_validate({"name": "web", "boot": {"kernel": str(kernel)}, **fields})


def value_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_the_command_line_is_locked_down(tmp_path: Path) -> None:
    argv = qemu_argv(make_vm(tmp_path, memory="512M", vcpus=2), VMPaths(tmp_path / "web"),
                     accel="tcg", paused=False)
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert value_after(argv, "-m") == ["512M"]
    assert value_after(argv, "-smp") == ["2"]
    assert value_after(argv, "-accel") == ["tcg"]
    assert value_after(argv, "-sandbox")[0].startswith("on,")
    assert "spawn=deny" in value_after(argv, "-sandbox")[0]
    assert "-S" not in argv
    assert "-cpu" not in argv


def test_a_paused_start_adds_dash_s(tmp_path: Path) -> None:
    assert "-S" in qemu_argv(make_vm(tmp_path), VMPaths(tmp_path), accel="tcg", paused=True)


def test_kvm_uses_the_host_cpu(tmp_path: Path) -> None:
    argv = qemu_argv(make_vm(tmp_path), VMPaths(tmp_path), accel="kvm", paused=False)
    assert value_after(argv, "-cpu") == ["host"]


def test_commas_in_paths_cannot_inject_options(tmp_path: Path) -> None:
    evil = tmp_path / "a,server=off,path=-evil"
    argv = qemu_argv(make_vm(tmp_path), VMPaths(evil), accel="tcg", paused=False)
    (tag,) = [v for v in value_after(argv, "-add-fd") if "serial.log" in v]
    assert tag.endswith(f",opaque={tmp_path}/a,,server=off,,path=-evil/serial.log")
    assert opt("a,b,,c") == "a,,b,,,,c"


def test_qemu_gets_descriptors_never_host_paths(tmp_path: Path) -> None:
    """privsep: sockets, logs, images and the kernel are opened by us and handed over."""
    vm = make_vm(tmp_path, disks=[{"path": str(tmp_path / "d.raw"), "format": "raw",
                                   "size": "1M"}])
    (tmp_path / "d.raw").write_bytes(b"")
    argv = qemu_argv(vm, VMPaths(tmp_path / "web"), accel="tcg", paused=False)
    chardevs = value_after(argv, "-chardev")
    assert all(",fd=" in c and "path=" not in c for c in chardevs)
    assert "logfile=/dev/fdset/" in chardevs[1]
    assert value_after(argv, "-kernel")[0].startswith("/proc/self/fd/")
    assert "-pidfile" not in argv
    files = [json.loads(v)["filename"] for v in value_after(argv, "-blockdev")
             if json.loads(v)["driver"] == "file"]
    assert files == ["/dev/fdset/2"]
    sets = [v for v in value_after(argv, "-add-fd") if "set=2," in v]
    assert len(sets) == 2  # writable: a read-write and a read-only descriptor
    joined = " ".join(argv)
    assert str(tmp_path / "vmlinuz") not in joined


def test_kernel_initrd_and_cmdline_are_passed_verbatim(tmp_path: Path) -> None:
    weird = tmp_path / "-k,x"
    weird.mkdir()
    (weird / "vmlinuz").write_bytes(b"k")
    vm = VM.model_validate({"name": "w", "boot": {
        "kernel": str(weird / "vmlinuz"), "initrd": str(weird / "vmlinuz"),
        "cmdline": "console=ttyS0,115200 quiet"}})
    argv = qemu_argv(vm, VMPaths(tmp_path), accel="tcg", paused=False)
    assert [v.rsplit("/", 1)[0] for v in value_after(argv, "-kernel") + value_after(
        argv, "-initrd")] == ["/proc/self/fd"] * 2  # copies: QEMU may not read the file
    assert value_after(argv, "-append") == ["console=ttyS0,115200 quiet"]


def _acl_denying(uid: int) -> bytes:
    """A POSIX access ACL (the kernel's xattr form) that gives user uid nothing."""
    entries = [(0x01, 6, 0xFFFFFFFF), (0x02, 0, uid), (0x04, 4, 0xFFFFFFFF),
               (0x10, 4, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_a_kernel_qemu_may_read_is_handed_as_itself_any_other_is_copied(
        tmp_path: Path) -> None:
    """QEMU reopens /proc/self/fd/N with its own permissions: the kernel itself goes
    only where its mode bits let QEMU's user read it (the owner's bits for the owner,
    the group's for its groups, else the others'), and never with an ACL; the initrd
    is always a copy (QEMU maps it)."""
    who = Identity(user="q", uid=12345, gid=12345, groups=(23456,))
    cases = [  # (mode, uid, gid, handed as itself)
        (0o644, 0, 0, True), (0o600, 0, 0, False), (0o640, 0, 23456, True),
        (0o640, 0, 0, False), (0o004, 12345, 0, False), (0o400, 12345, 0, True),
        (0o440, 0, 12345, True)]
    for index, (mode, uid, gid, itself) in enumerate(cases):
        kernel = tmp_path / f"vmlinuz-{index}"
        kernel.write_bytes(b"kernel")
        os.chown(kernel, uid, gid)
        kernel.chmod(mode)
        files = Handoff(who)
        try:
            name = files.copy(kernel, mapped=False)
            link = os.readlink(name.replace("self", str(os.getpid())))
            assert (link == str(kernel)) == itself, (oct(mode), uid, gid, link)
            assert link == str(kernel) or link.startswith("/memfd:"), link
            initrd = os.readlink(files.copy(kernel, mapped=True))
            assert initrd.startswith("/memfd:"), initrd
        finally:
            files.close()
    kernel = tmp_path / "vmlinuz-acl"
    kernel.write_bytes(b"kernel")
    kernel.chmod(0o644)
    try:
        os.setxattr(kernel, "system.posix_acl_access", _acl_denying(12345))
    except OSError as err:
        pytest.skip(f"no POSIX ACLs here: {err}")
    files = Handoff(who)
    try:
        assert os.readlink(files.copy(kernel, mapped=False)).startswith("/memfd:")
    finally:
        files.close()


@pytest.mark.parametrize(("modules", "expected"), [
    (["kvm", "kvm_intel"], "kvm"),
    (["kvm", "kvm_amd"], "kvm"),
    (["kvm", "kvm_pvm"], "tcg"),
    ([], "tcg"),
])
def test_auto_picks_kvm_only_with_hardware_virtualization(
    tmp_path: Path, modules: list[str], expected: str
) -> None:
    sys_module = tmp_path / "module"
    for module in modules:
        (sys_module / module).mkdir(parents=True)
    dev_kvm = tmp_path / "kvm"
    dev_kvm.touch()
    assert choose_accel(Accel.AUTO, sys_module=sys_module, dev_kvm=dev_kvm) == expected


def test_auto_without_dev_kvm_is_tcg(tmp_path: Path) -> None:
    (tmp_path / "kvm_intel").mkdir()
    assert choose_accel(Accel.AUTO, sys_module=tmp_path, dev_kvm=tmp_path / "none") == "tcg"


def test_an_explicit_accelerator_is_respected(tmp_path: Path) -> None:
    assert choose_accel(Accel.KVM, sys_module=tmp_path, dev_kvm=tmp_path / "none") == "kvm"
    assert choose_accel(Accel.TCG) == "tcg"


def test_disks_cdrom_and_nics_go_to_qemu_as_json_with_explicit_formats(tmp_path: Path) -> None:
    import json

    iso = tmp_path / "install,x.iso"
    iso.write_bytes(b"iso")
    (tmp_path / "base.raw").write_bytes(b"")
    (tmp_path / "a.qcow2").write_bytes(b"")
    (tmp_path / "b.raw").write_bytes(b"")
    vm = VM.model_validate({
        "name": "hw", "boot": {"device": "cdrom"}, "cdrom": str(iso),
        "disks": [{"path": str(tmp_path / "a.qcow2"), "size": "1G"},
                  {"path": str(tmp_path / "b.raw"), "format": "raw", "size": "1G",
                   "readonly": False, "bus": "ide"}],
        "interfaces": [{"switch": "lan"}],
    })
    argv = qemu_argv(vm, VMPaths(tmp_path), accel="tcg", paused=False,
                     taps=[(99, "52:54:00:aa:bb:cc")])
    blockdevs = [json.loads(v) for v in value_after(argv, "-blockdev")]
    devices = [json.loads(v) for v in value_after(argv, "-device") if v.startswith("{")]
    assert [(b["driver"], b.get("read-only")) for b in blockdevs] == [
        ("file", False), ("qcow2", False), ("file", False), ("raw", False),
        ("file", True), ("raw", True)]
    assert blockdevs[4]["filename"] == "/dev/fdset/4"
    assert f"opaque={str(iso).replace(',', ',,')}" in " ".join(value_after(argv, "-add-fd"))
    assert [(d["driver"], d.get("bootindex")) for d in devices] == [
        ("virtio-blk-pci", None), ("ide-hd", None), ("ide-cd", 1),
        ("virtio-net-pci", None)]
    assert devices[3]["mac"] == "52:54:00:aa:bb:cc"
    assert value_after(argv, "-netdev") == ["tap,id=net0,fd=99"]
    assert "-kernel" not in argv


def test_firmware_boot_from_a_disk_marks_the_first_disk(tmp_path: Path) -> None:
    import json

    vm = VM.model_validate({"name": "fw", "boot": {"device": "disk"},
                            "disks": [{"path": str(tmp_path / "a.qcow2"), "size": "1G"}]})
    (tmp_path / "a.qcow2").write_bytes(b"")
    argv = qemu_argv(vm, VMPaths(tmp_path), accel="tcg", paused=False)
    (device,) = [json.loads(v) for v in value_after(argv, "-device") if v.startswith("{")]
    assert device["bootindex"] == 1 and device["drive"] == "disk0"


def test_waiting_zero_seconds_on_an_ended_process_says_it_ended() -> None:
    """`_wait_exit(pidfd, 0)` is a poll: on Python 3.11, wait_for(..., 0) never ran the
    reader callback, so an ended process looked alive."""
    import asyncio
    import os
    import subprocess
    import sys

    from reconciler.kvm import _wait_exit

    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as proc:
        pidfd = os.pidfd_open(proc.pid)
        try:
            assert asyncio.run(_wait_exit(pidfd, 0)) is False
            proc.kill()
            proc.wait()
            assert asyncio.run(_wait_exit(pidfd, 0)) is True
        finally:
            os.close(pidfd)


# --- QMP: a QEMU that quits while a session begins --------------------------------

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                "package": ""}, "capabilities": []}}


async def _hang_up_after_negotiation(reader: asyncio.StreamReader,
                                     writer: asyncio.StreamWriter) -> None:
    """A QMP server that quits (closes) right after answering qmp_capabilities, as a
    QEMU ending at that moment does."""
    writer.write(json.dumps(GREETING).encode() + b"\r\n")
    await writer.drain()
    asked = json.loads(await reader.read(4096))  # qmp_capabilities
    writer.write(json.dumps({"return": {}, "id": asked.get("id")}).encode() + b"\r\n")
    await writer.drain()
    writer.close()


def test_a_qemu_quitting_as_its_session_begins_is_a_control_error(tmp_path: Path) -> None:
    """qemu.qmp's connect() fails an assertion (its session no longer running) when the
    server hangs up right after negotiating: seen as `reconcile down` exiting 70 with
    200 VMs ending at once. Each attempt is a ControlError, never an AssertionError."""
    paths = VMPaths(tmp_path / "vm")
    paths.dir.mkdir()

    async def attempts() -> list[str]:
        server = await asyncio.start_unix_server(_hang_up_after_negotiation,
                                                 path=str(paths.qmp))
        found = []
        try:
            for _ in range(30):
                try:
                    await kvm.query_status(paths)
                    found.append("answered")
                except kvm.ControlError as err:
                    found.append(str(err))
        finally:
            server.close()
        return found

    found = asyncio.run(attempts())
    assert len(found) == 30 and "answered" not in found
    assert any("the session ended as it began" in f for f in found), found[:3]
