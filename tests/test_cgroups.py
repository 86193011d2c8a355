"""Per-VM resource limits (issue 10): which cgroup v2 files a `resources:` writes, into
a group of its own; and where the host has no v2 controllers (this build machine), the
limits are `pending` with the reason, in the record and in `status`, never silently."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Run, pid_of, record, vm_manifest

from reconciler import cgroups
from reconciler.desired import VM, Resources

Reconcile = Callable[..., Run]


def test_each_limit_becomes_its_cgroup_file() -> None:
    found = cgroups.files(Resources(cpu_weight=50, cpu_max="50%", memory_max="512M",
                                    io_weight=200, pids_max=128))
    assert found == {
        "cpu.weight": ("cpu", "50"), "cpu.max": ("cpu", "50000 100000"),
        "memory.max": ("memory", str(512 * 1024 * 1024)),
        "io.weight": ("io", "default 200"), "pids.max": ("pids", "128"),
    }
    assert cgroups.files(Resources(cpu_max="250%"))["cpu.max"] == ("cpu", "250000 100000")
    assert cgroups.files(Resources(cpu_max="max"))["cpu.max"] == ("cpu", "max 100000")
    assert cgroups.files(Resources()) == {}


def fake_v2(tmp_path: Path, controllers: str) -> tuple[Path, Path]:
    """A cgroup2 mount (a plain dir) and a mounts file naming it."""
    root = tmp_path / "cgroup2"
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
                      f"cgroup2 {root} cgroup2 rw,nsdelegate 0 0\n")
    return root, mounts


def test_limits_go_into_the_vms_own_group_with_its_process(tmp_path: Path) -> None:
    root, mounts = fake_v2(tmp_path, "cpuset cpu io memory pids")
    limits = cgroups.place("web-1", Resources(cpu_max="50%", memory_max="300M"), 4242,
                           mounts=mounts)
    group = root / "reconciler.slice" / "web-1"
    assert limits == cgroups.Limits("applied", cgroup=str(group))
    assert (root / "cgroup.subtree_control").read_text() == "+cpu +memory"
    assert (root / "reconciler.slice" / "cgroup.subtree_control").read_text() == "+cpu +memory"
    assert (group / "cpu.max").read_text() == "50000 100000"
    assert (group / "memory.max").read_text() == str(300 * 1024 * 1024)
    assert (group / "cgroup.procs").read_text() == "4242"
    assert not (group / "pids.max").exists()  # only what was declared
    assert cgroups.place("web-1", None, 4242, mounts=mounts) is None
    (group / "cgroup.procs").unlink()
    (group / "cpu.max").unlink()
    cgroups.remove(str(group))  # not empty: kept (the kernel says EBUSY while in use)
    assert group.exists()
    (group / "memory.max").unlink()
    cgroups.remove(str(group))
    assert not group.exists()
    cgroups.remove(str(group))  # already gone: fine


def test_a_missing_controller_leaves_every_limit_pending_with_the_reason(
    tmp_path: Path,
) -> None:
    root, mounts = fake_v2(tmp_path, "")  # this machine: the controllers are on v1
    limits = cgroups.place("a", Resources(cpu_weight=10, pids_max=64), 1, mounts=mounts)
    assert limits is not None and limits.state == "pending"
    assert limits.reason == (f"cgroup v2 at {root} has no cpu, pids controller (on this "
                             "host it is on cgroup v1); limits are not applied")
    assert not (root / "reconciler.slice").exists()  # nothing half applied
    (tmp_path / "v1only").write_text("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n")
    none = cgroups.place("a", Resources(cpu_weight=10), 1, mounts=tmp_path / "v1only")
    assert none == cgroups.Limits("pending", "this host has no cgroup v2 hierarchy; limits "
                                  "are not applied")


@pytest.mark.parametrize(("resources", "message"), [
    ({"cpu_max": "0.5%"}, "must be at least 1% (or max)"),
    ({"cpu_max": "half"}, "String should match pattern"),
    ({"memory_max": "128M"}, "resources.memory_max (128M) must be above memory (128M)"),
    ({"cpu_weight": 0}, "greater than or equal to 1"),
    ({"pids_max": 2}, "greater than or equal to 16"),
])
def test_bad_limits_are_manifest_errors(resources: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        VM.model_validate({"name": "a", "memory": "128M", "boot": {"kernel": "/etc/hostname"},
                           "resources": resources})


@pytest.mark.qemu
def test_status_says_the_limits_this_host_cannot_apply_are_pending(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile,
) -> None:
    manifests = tmp_path / "vms"
    manifests.mkdir()
    (manifests / "a.yaml").write_text(
        vm_manifest("a", guest) + "resources: {cpu_max: 50%, pids_max: 256}\n")
    run = reconcile("--once", manifests, check=0)
    mount = cgroups.v2_mount()
    reason = cgroups.why_pending({"cpu", "pids"}, mount)
    if reason is None:  # a host with cgroup v2 controllers: the limits are in its files
        group = mount / "reconciler.slice" / "a"  # type: ignore[operator]
        assert (group / "cpu.max").read_text().split() == ["50000", "100000"]
        assert (group / "pids.max").read_text().strip() == "256"
        assert str(pid_of(state_dir, "a")) in (group / "cgroup.procs").read_text().split()
        return
    assert f"resources pending: {reason}" in run.out, run
    assert record(state_dir, "a")["limits"] == {"state": "pending", "reason": reason}
    rows = json.loads(reconcile("status", "--json", check=0).out)
    assert rows[0]["resources"] == {"state": "pending", "reason": reason}
    table = reconcile("status", check=0).out
    assert f"resources pending: {reason}" in table, table
    assert os.path.exists(f"/proc/{pid_of(state_dir, 'a')}")  # it runs, unlimited
