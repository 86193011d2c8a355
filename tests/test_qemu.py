"""End to end with real QEMU VMs booting the test guest (TCG here), through the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    DEAF_PROMPT,
    REPO,
    Run,
    alive,
    deaf_manifest,
    netns,
    pid_of,
    serial,
    vm_manifest,
    wait_for_serial,
)

from reconciler import kvm
from reconciler.observed import VMPaths

__all__ = ["netns"]  # the fixture

pytestmark = pytest.mark.qemu

Reconcile = Callable[..., Run]


def qmp_status(state_dir: Path, name: str) -> str:
    return asyncio.run(kvm.query_status(VMPaths(state_dir / "vms" / name)))


def lines_by_vm(run: Run) -> dict[str, str]:
    rows = [line.split(None, 1) for line in run.out.splitlines() if not line.startswith("recap")]
    return {row[0]: row[1] for row in rows if len(row) == 2}


@pytest.fixture
def two_vms(tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile) -> Path:
    """alpha and beta, each in its own file, started and booted to user space."""
    manifests = tmp_path / "vms"
    manifests.mkdir()
    (manifests / "alpha.yaml").write_text(vm_manifest("alpha", guest))
    (manifests / "beta.yaml").write_text(vm_manifest("beta", guest))
    reconcile("--once", manifests, check=0)
    for name in ("alpha", "beta"):
        wait_for_serial(state_dir, name)
    return manifests


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """A copy of examples/ beside a link to guest/ (its relative paths hold), with a key
    for examples/cloud: the repo's own copy may be in use by ./setup.sh's VMs."""
    shutil.copytree(REPO / "examples", tmp_path / "examples",
                    ignore=shutil.ignore_patterns("*.qcow2", "ops*"))
    (tmp_path / "guest").symlink_to(REPO / "guest")
    key = tmp_path / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    shutil.copy(key.with_suffix(".pub"), tmp_path / "examples" / "cloud" / "ops.pub")
    return tmp_path / "examples"


@pytest.mark.debian
def test_the_example_starts_real_vms_and_a_second_run_changes_nothing(
    examples: Path, state_dir: Path, netns: str,
) -> None:
    def reconcile(*args: str | Path) -> Run:
        env = dict(os.environ, RECONCILER_STATE_DIR=str(state_dir))
        proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m",
                               "reconciler", *map(str, args)], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        return Run(proc.returncode, proc.stdout, proc.stderr)

    names = ("web-1", "db-1", "cloud-1")
    first = reconcile("--once", "--wait", examples)  # as ./setup.sh does
    assert set(lines_by_vm(first)) == set(names)
    assert all(v.startswith("changed") and "; ready after" in v
               for v in lines_by_vm(first).values()), first
    pids = {name: pid_of(state_dir, name) for name in names}

    second = reconcile("--once", examples)
    assert lines_by_vm(second) == {name: "ok       running as desired, ready"
                                   for name in names}
    assert "recap: 3 ok, 0 changed, 0 pending, 0 failed" in second.out
    reconcile("--once", "--check", examples)
    assert {name: pid_of(state_dir, name) for name in pids} == pids

    status = json.loads(reconcile("status", "--json").out)
    managed = {row["name"]: row for row in status if row["managed"]}
    assert {n: (r["state"], r["pid"]) for n, r in managed.items()} == {
        n: ("ready", pid) for n, pid in pids.items()}
    assert [a["source"] for a in managed["cloud-1"]["addresses"]] == ["lease", "agent"]
    hello = reconcile("ssh", "cloud-1", "-i", examples.parent / "key", "--",
                      "cloud-init status --wait >/dev/null; cat /etc/motd")
    assert hello.out == "cloud-1: declared by reconciler\n"
    assert "guest powered off (guest agent)" in reconcile("down").out


def test_a_memory_change_restarts_that_vm_only(
    two_vms: Path, state_dir: Path, reconcile: Reconcile
) -> None:
    beta_pid, alpha_pid = pid_of(state_dir, "beta"), pid_of(state_dir, "alpha")
    path = two_vms / "alpha.yaml"
    path.write_text(path.read_text().replace("memory: 96M", "memory: 128M"))

    check = reconcile("--once", "--check", two_vms, check=2)
    assert lines_by_vm(check)["alpha"].startswith("pending  would restart: spec changed: "
                                                  "memory: 96M -> 128M")
    assert lines_by_vm(check)["beta"].startswith("ok")

    applied = reconcile("--once", two_vms, check=0)
    assert "restart" not in lines_by_vm(applied)["beta"]
    assert lines_by_vm(applied)["alpha"].startswith("changed")
    assert pid_of(state_dir, "beta") == beta_pid
    assert pid_of(state_dir, "alpha") != alpha_pid and not alive(alpha_pid)
    assert "-m" in (argv := json.loads((state_dir / "vms/alpha/record.json").read_text())["argv"])
    assert argv[argv.index("-m") + 1] == "128M"
    wait_for_serial(state_dir, "alpha", count=2)


def test_deleting_a_document_terminates_its_vm(
    two_vms: Path, state_dir: Path, reconcile: Reconcile
) -> None:
    beta_pid = pid_of(state_dir, "beta")
    (two_vms / "beta.yaml").unlink()
    run = reconcile("--once", two_vms, check=0)
    assert lines_by_vm(run)["beta"].startswith("changed  no longer declared: terminated")
    assert not alive(beta_pid)
    assert not (state_dir / "vms" / "beta").exists()
    assert lines_by_vm(reconcile("--once", two_vms, check=0)) == {
        "alpha": "ok       running as desired"}


def test_state_stopped_shuts_the_guest_down_through_acpi(
    two_vms: Path, state_dir: Path, reconcile: Reconcile
) -> None:
    pid = pid_of(state_dir, "alpha")
    path = two_vms / "alpha.yaml"
    path.write_text(path.read_text() + "state: stopped\n")
    run = reconcile("--once", two_vms, check=0)
    assert lines_by_vm(run)["alpha"] == (
        "changed  running but declared stopped: terminated: guest powered off")
    assert not alive(pid)
    console = serial(state_dir, "alpha")
    assert "reconciler-guest: power button pressed, shutting down" in console
    assert "reboot: Power down" in console
    again = reconcile("--once", two_vms, check=0)
    assert lines_by_vm(again)["alpha"] == "ok       stopped as desired"


def test_paused_then_running_keeps_the_same_process(
    two_vms: Path, state_dir: Path, reconcile: Reconcile
) -> None:
    pid = pid_of(state_dir, "alpha")
    path = two_vms / "alpha.yaml"
    running = path.read_text()
    path.write_text(running + "state: paused\n")
    assert lines_by_vm(reconcile("--once", two_vms, check=0))["alpha"].startswith("changed")
    assert qmp_status(state_dir, "alpha") == "paused"
    assert lines_by_vm(reconcile("--once", two_vms, check=0))["alpha"] == (
        "ok       paused as desired")

    path.write_text(running)
    reconcile("--once", two_vms, check=0)
    assert qmp_status(state_dir, "alpha") == "running"
    assert pid_of(state_dir, "alpha") == pid


def test_a_new_paused_vm_starts_paused(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile
) -> None:
    (tmp_path / "vm.yaml").write_text(vm_manifest("gamma", guest, state="paused"))
    reconcile("--once", tmp_path / "vm.yaml", check=0)
    assert qmp_status(state_dir, "gamma") == "prelaunch"
    assert lines_by_vm(reconcile("--once", tmp_path / "vm.yaml", check=0))["gamma"] == (
        "ok       paused as desired")


@pytest.mark.parametrize("breakage", [
    pytest.param("name: beta\n  memory: [\n", id="yaml-syntax"),
    pytest.param("name: beta\nmemroy: 128M\n", id="unknown-field"),
])
def test_a_broken_manifest_terminates_nothing(
    two_vms: Path, state_dir: Path, reconcile: Reconcile, breakage: str
) -> None:
    pids = {name: pid_of(state_dir, name) for name in ("alpha", "beta")}
    path = two_vms / "beta.yaml"
    good = path.read_text()
    path.write_text(breakage)
    (two_vms / "alpha.yaml").unlink()  # even a real removal waits while anything is broken

    for args in (("--once",), ("--once", "--check")):
        run = reconcile(*args, two_vms)
        assert run.code == 1, run
        assert "Traceback" not in run.err + run.out
        assert f"{path}:2: " in run.err
    assert all(alive(pid) for pid in pids.values())
    assert {name: pid_of(state_dir, name) for name in pids} == pids

    path.write_text(good)  # fixed: normal work resumes, the removal included
    run = reconcile("--once", two_vms, check=0)
    assert lines_by_vm(run)["alpha"].startswith("changed  no longer declared: terminated")
    assert lines_by_vm(run)["beta"] == "ok       running as desired"
    assert alive(pids["beta"]) and not alive(pids["alpha"])


def test_validate_reports_every_error_without_touching_vms(
    tmp_path: Path, guest: Path, reconcile: Reconcile
) -> None:
    (tmp_path / "a.yaml").write_text(vm_manifest("a", guest, vcpus="0", colour="blue"))
    run = reconcile("validate", tmp_path)
    assert run.code == 1 and run.out == ""
    assert run.err.splitlines() == [
        f"{tmp_path / 'a.yaml'}:3: vm 'a': vcpus must be at least 1 (got 0)",
        f"{tmp_path / 'a.yaml'}:4: vm 'a': unknown field 'colour' (known fields: accel, agent, "
        "boot, cdrom, cloud_init, cpus, disks, failover, interfaces, kind, labels, memory, "
        "name, on_change, owner, placement, priority, ready, resources, restart, state, "
        "stop_timeout, vcpus)",
    ]


def test_a_guest_that_ignores_the_power_button_is_quit_after_its_grace(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile
) -> None:
    text = deaf_manifest("deaf", guest, stop_timeout="1s")
    (tmp_path / "vm.yaml").write_text(text)
    reconcile("--once", tmp_path, check=0)
    wait_for_serial(state_dir, "deaf", DEAF_PROMPT)
    pid = pid_of(state_dir, "deaf")
    (tmp_path / "vm.yaml").write_text(text + "state: stopped\n")
    run = reconcile("--once", tmp_path, check=0)
    assert lines_by_vm(run)["deaf"] == (
        "changed  running but declared stopped: terminated: quit after 1s grace")
    assert not alive(pid)


def test_a_narrower_path_or_an_emptied_file_prunes_nothing(
    two_vms: Path, state_dir: Path, reconcile: Reconcile
) -> None:
    pids = {name: pid_of(state_dir, name) for name in ("alpha", "beta")}
    narrow = reconcile("--once", two_vms / "alpha.yaml", check=0)
    assert lines_by_vm(narrow)["beta"].startswith("ok       declared in ")
    assert "outside" in lines_by_vm(narrow)["beta"]

    (two_vms / "beta.yaml").write_text("# emptied by an editor, about to be written\n")
    emptied = reconcile("--once", two_vms, check=0)
    assert "is empty: left as it is (delete the file to remove its VMs)" in (
        lines_by_vm(emptied)["beta"])
    assert {name: pid_of(state_dir, name) for name in pids} == pids
    assert all(alive(pid) for pid in pids.values())
