"""Disks with real QEMU: created when missing, kept across restarts, overlays, no sharing,
and no option injection through a file name."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    Daemon,
    Run,
    alive,
    pid_of,
    record,
    type_on_console,
    vm_manifest,
    wait_for,
    wait_for_serial,
)

from reconciler.desired import Disk, DiskFormat
from reconciler.storage import StorageError, create_argv, ensure_disk

Reconcile = Callable[..., Run]
StartDaemon = Callable[..., Daemon]


def with_disks(name: str, guest: Path, disks: str, **fields: str) -> str:
    return vm_manifest(name, guest, **fields) + "disks:\n" + disks


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_in_guest(state_dir: Path, name: str, command: str, done: str, *, count: int = 1
                 ) -> None:
    type_on_console(state_dir, name, f"\n{command} && echo {done}-$((6*7))\n")
    wait_for_serial(state_dir, name, f"{done}-42", count=count, timeout=60)


MKFS = "mkdir -p /mnt && mke2fs -q /dev/vda"
WRITE = "mount -t ext4 /dev/vda /mnt && echo {text} > /mnt/file && umount /mnt && sync"
READ = "mkdir -p /mnt && mount -t ext4 /dev/vda /mnt && cat /mnt/file && umount /mnt"


def test_qemu_img_command_lines() -> None:
    blank = Disk.model_construct(path=Path("/d/a.qcow2"), format=DiskFormat.QCOW2, size=4096,
                                 base=None, base_format=DiskFormat.QCOW2)
    assert create_argv(blank, Path("/d/.a")) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "/d/.a", "4096M"]
    overlay = Disk.model_construct(path=Path("/d/a.qcow2"), format=DiskFormat.QCOW2,
                                   size=None, base=Path("/i/base.raw"),
                                   base_format=DiskFormat.RAW)
    assert create_argv(overlay, Path("/d/.a")) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-b", "/i/base.raw", "-F", "raw", "/d/.a"]


def blank(path: Path) -> Disk:
    return Disk.model_construct(path=path, format=DiskFormat.QCOW2, size=16, base=None,
                                base_format=DiskFormat.QCOW2)


def fake_qemu_img(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> Path:
    """A `qemu-img` first on PATH that runs script (sh; for a blank disk the target is "$5");
    its standard output goes to the returned file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "fake.log"
    fake = bin_dir / "qemu-img"
    fake.write_text(f"#!/bin/sh\nexec >>{log}\n{script}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def test_a_new_disk_is_made_in_a_private_dir_then_linked_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = fake_qemu_img(tmp_path, monkeypatch, (
        'dir=$(dirname "$5"); stat -c "%a %U %n" "$dir"; echo image > "$5"'))
    disk = tmp_path / "data.qcow2"
    assert ensure_disk(blank(disk)) == f"created {disk} (qcow2, 16M)"
    assert disk.read_text() == "image\n" and disk.stat().st_nlink == 1
    mode, owner, private = log.read_text().split()
    assert (mode, owner) == ("700", "root") or os.geteuid() != 0
    assert Path(private).parent == tmp_path and Path(private).name.startswith(".reconciler-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "data.qcow2", "fake.log"]


def test_a_disk_that_appears_meanwhile_is_never_clobbered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = tmp_path / "data.qcow2"
    fake_qemu_img(tmp_path, monkeypatch, f'echo theirs > {disk}; echo ours > "$5"')
    assert ensure_disk(blank(disk)) is None
    assert disk.read_text() == "theirs\n"
    assert not list(tmp_path.glob(".reconciler-*"))


def test_a_failed_qemu_img_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_qemu_img(tmp_path, monkeypatch, 'echo half > "$5"; echo "no space left" >&2; exit 1')
    disk = tmp_path / "data.qcow2"
    with pytest.raises(StorageError, match=f"^cannot create {disk}: no space left$"):
        ensure_disk(blank(disk))
    assert not disk.exists() and not list(tmp_path.glob(".reconciler-*"))


def test_a_disk_dir_that_cannot_be_written_is_a_storage_error(tmp_path: Path) -> None:
    disk = tmp_path / "missing-dir" / "data.qcow2"
    with pytest.raises(StorageError, match=f"^cannot create {disk}: No such file or directory$"):
        ensure_disk(blank(disk))


def test_real_qemu_img_creates_a_blank_image(tmp_path: Path) -> None:
    disk = tmp_path / "data.qcow2"
    assert ensure_disk(blank(disk)) == f"created {disk} (qcow2, 16M)"
    info = subprocess.run(["qemu-img", "info", "--output=json", str(disk)],
                          capture_output=True, text=True, check=True).stdout
    assert '"virtual-size": 16777216' in info
    assert ensure_disk(blank(disk)) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.qcow2"]


@pytest.mark.qemu
def test_a_file_written_to_a_disk_survives_restarts(
    tmp_path: Path, guest: Path, state_dir: Path, daemon: StartDaemon
) -> None:
    manifests = tmp_path / "vms"
    manifests.mkdir()
    disk = tmp_path / "data.qcow2"
    path = manifests / "vm.yaml"
    path.write_text(with_disks("store", guest, f"  - {{path: {disk}, size: 64M}}\n"))
    daemon(manifests, "--resync", "600")
    wait_for_serial(state_dir, "store")
    assert disk.exists()
    run_in_guest(state_dir, "store", f"{MKFS} && {WRITE.format(text='kept-1')}", "wrote")

    old = pid_of(state_dir, "store")  # a crash and its restart
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: pid_of(state_dir, "store") != old, timeout=30, what="restart")
    wait_for_serial(state_dir, "store", count=2)
    run_in_guest(state_dir, "store", READ, "read")
    wait_for_serial(state_dir, "store", "\nkept-1")

    second = pid_of(state_dir, "store")  # a spec change that restarts it
    path.write_text(path.read_text().replace("memory: 96M", "memory: 112M"))
    wait_for(lambda: pid_of(state_dir, "store") != second, timeout=30, what="spec restart")
    wait_for_serial(state_dir, "store", count=3)
    run_in_guest(state_dir, "store", READ, "again", count=1)
    assert "112M" in record(state_dir, "store")["argv"]  # type: ignore[operator]


@pytest.mark.qemu
def test_an_overlay_leaves_its_base_unchanged(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile
) -> None:
    base = tmp_path / "base.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(base), "32M"], check=True)
    before = sha256(base)
    overlay = tmp_path / "overlay.qcow2"
    (tmp_path / "vm.yaml").write_text(with_disks(
        "layered", guest, "  - {path: overlay.qcow2, base: base.raw, base_format: raw}\n"))
    reconcile("--once", tmp_path / "vm.yaml", check=0)
    wait_for_serial(state_dir, "layered")
    run_in_guest(state_dir, "layered", f"{MKFS} && {WRITE.format(text='on-top')}", "wrote")
    reconcile("down", check=0)
    info = subprocess.run(["qemu-img", "info", "--output=json", str(overlay)],
                          capture_output=True, text=True, check=True).stdout
    assert str(base) in info and '"backing-filename-format": "raw"' in info
    assert sha256(base) == before


@pytest.mark.qemu
def test_two_vms_declaring_one_writable_disk_are_refused_and_nothing_is_touched(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile
) -> None:
    shared = tmp_path / "shared.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(shared), "16M"], check=True)
    before = (sha256(shared), shared.stat().st_mtime_ns)
    fresh = tmp_path / "fresh.qcow2"
    (tmp_path / "a.yaml").write_text(with_disks(
        "a", guest, f"  - {{path: {shared}}}\n  - {{path: {fresh}, size: 16M}}\n"))
    (tmp_path / "b.yaml").write_text(with_disks("b", guest, f"  - {{path: {shared}}}\n"))
    run = reconcile("--once", tmp_path)
    assert run.code == 1
    for name, other in (("a", "b"), ("b", "a")):
        assert f"{name}  failed   disk {shared} is also declared by vm '{other}'" in run.out
    assert not (state_dir / "vms").exists() or not list((state_dir / "vms").iterdir())
    assert (sha256(shared), shared.stat().st_mtime_ns) == before
    assert not fresh.exists()
    check = reconcile("--once", "--check", tmp_path)
    assert check.code == 1 and "also declared by vm 'b'" in check.out


@pytest.mark.qemu
def test_a_disk_path_with_a_comma_or_a_leading_dash_injects_nothing(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile
) -> None:
    weird = tmp_path / "-drive" / "x,file.locking=off,read-only=on,driver=raw.qcow2"
    weird.parent.mkdir()
    (tmp_path / "vm.yaml").write_text(with_disks(
        "weird", guest, f"  - {{path: '{weird}', size: 16M}}\n"))
    reconcile("--once", tmp_path / "vm.yaml", check=0)
    pid = pid_of(state_dir, "weird")
    assert weird.is_file() and alive(pid)
    opened = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert str(weird) in opened
    argv = record(state_dir, "weird")["argv"]
    assert "-drive" not in argv  # type: ignore[operator]
    assert not (tmp_path / "-drive" / "x").exists()
    wait_for_serial(state_dir, "weird")
    run_in_guest(state_dir, "weird", "dd if=/dev/zero of=/dev/vda bs=4k count=1 2>/dev/null",
                 "rw")  # writable: read-only=on did not slip in
