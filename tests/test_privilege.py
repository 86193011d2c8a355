"""Least privilege (issue 10), as far as it is built: image roots (`--allow-dir`: a path
outside them, symlinks resolved, is a manifest error before anything is touched; without
any root each run says so) and vCPU pinning (`cpus:`, applied live)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, Run, pid_of, vm_manifest
from test_desired import tree, write

from reconciler import desired

__all__ = ["tree"]  # the fixture, shared with test_desired
Reconcile = Callable[..., Run]


def test_allow_dir_refuses_paths_outside_its_roots_even_through_a_symlink(
    tree: Path, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "vmlinuz").write_bytes(b"k")
    (outside / "seed.yaml").write_text("#cloud-config\n{}\n")
    (tree / "images").mkdir()
    (tree / "images" / "link").symlink_to(outside / "vmlinuz")
    path = write(tree, "vm.yaml", f"name: a\nboot: {{kernel: {outside}/vmlinuz}}\n"
                 "---\nname: b\nboot: {kernel: images/link}\n"
                 f"---\nname: c\nboot: {{kernel: vmlinuz}}\ncdrom: /etc/shadow\n"
                 f"---\nname: d\nboot: {{kernel: vmlinuz}}\n"
                 f"cloud_init: {{user_data_file: {outside}/seed.yaml}}\n")
    loaded = desired.load(tree, allow_dirs=[tree])
    found = [str(e) for e in loaded.errors]
    root = os.path.realpath(tree)
    assert found == [
        f"{path}:2: vm 'a': boot.kernel: {outside}/vmlinuz is outside the allowed dirs "
        f"(--allow-dir {root})",
        f"{path}:5: vm 'b': boot.kernel: {tree}/images/link (a symlink to {outside}/vmlinuz) "
        f"is outside the allowed dirs (--allow-dir {root})",
        f"{path}:9: vm 'c': cdrom: /etc/shadow is outside the allowed dirs "
        f"(--allow-dir {root})",
        f"{path}:13: vm 'd': cloud_init.user_data_file: {outside}/seed.yaml is outside the "
        f"allowed dirs (--allow-dir {root})",
    ], found
    assert loaded.vms == {}  # the file is broken: nothing in it is started or pruned
    ok = desired.load(tree, allow_dirs=[tree, outside, Path("/etc")])
    assert ok.errors == [] and sorted(ok.vms) == ["a", "b", "c", "d"]



@pytest.mark.qemu
def test_a_vm_outside_the_roots_is_refused_and_no_vm_is_touched(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile,
) -> None:
    manifests = tmp_path / "vms"
    manifests.mkdir()
    (manifests / "a.yaml").write_text(vm_manifest("a", guest))
    first = reconcile("--once", "--allow-dir", REPO / "guest", manifests, check=0)
    assert "no --allow-dir" not in first.err
    pid = pid_of(state_dir, "a")
    (tmp_path / "x.iso").write_bytes(b"\0" * 2048)
    path = manifests / "a.yaml"
    path.write_text(vm_manifest("a", guest) + f"cdrom: {tmp_path / 'x.iso'}\n")
    refused = reconcile("--once", "--allow-dir", REPO / "guest", manifests, check=1)
    assert f"{path}:7: vm 'a': cdrom: {tmp_path / 'x.iso'} is outside the allowed dirs" \
        in refused.err, refused
    assert pid_of(state_dir, "a") == pid and os.path.exists(f"/proc/{pid}")
    unrestricted = reconcile("--once", manifests, check=0)
    assert "WARNING reconciler: no --allow-dir given" in unrestricted.err
    assert pid_of(state_dir, "a") != pid  # the cdrom is hardware: a restart


def cpus_allowed(pid: int) -> dict[int, str]:
    """Cpus_allowed_list of each thread of pid."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found[int(task.name)] = line.split()[1]
    return found


@pytest.mark.qemu
def test_vcpu_threads_are_pinned_and_follow_a_change_without_a_restart(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile,
) -> None:
    last = (os.cpu_count() or 1) - 1
    manifests = tmp_path / "vms"
    manifests.mkdir()
    (manifests / "a.yaml").write_text(vm_manifest("a", guest, vcpus="2", cpus=f"'{last}'"))
    run = reconcile("--once", manifests, check=0)
    assert f"2 vCPU thread(s) pinned to CPUs {last}" in run.out, run
    pid = pid_of(state_dir, "a")
    pinned = [t for t, cpus in cpus_allowed(pid).items() if cpus == str(last)]
    assert len(pinned) == 2  # the vCPU threads only; QEMU's others keep every CPU
    (manifests / "a.yaml").write_text(vm_manifest("a", guest, vcpus="2", cpus="'0'"))
    again = reconcile("--once", manifests, check=0)
    assert "ok" in again.out and pid_of(state_dir, "a") == pid
    assert sorted(cpus_allowed(pid)[t] for t in pinned) == ["0", "0"]
    (manifests / "a.yaml").write_text(vm_manifest("a", guest, vcpus="2", cpus="'0-99'"))
    assert "cpus: host CPU" in reconcile("--once", manifests, check=1).out
