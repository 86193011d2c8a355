"""`--diff`: a unified diff of each changed VM's spec, units shown, secrets masked."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Run, pid_of, vm_manifest

from reconciler.specdiff import MASK, spec_diff

Reconcile = Callable[..., Run]


def test_a_memory_change_reads_with_its_units() -> None:
    old = {"name": "a", "memory": 1024, "stop_timeout": 30.0,
           "disks": [{"path": "/v/a.qcow2", "size": 4096}], "labels": {}}
    new = {**old, "memory": 1025}
    assert spec_diff("a", old, new).splitlines() == [
        "--- a (recorded)", "+++ a (declared)", "@@ -2,6 +2,6 @@",
        "   - path: /v/a.qcow2", "     size: 4096M", " labels: {}",
        "-memory: 1024M", "+memory: 1025M", " name: a", " stop_timeout: 30s"]
    assert spec_diff("a", old, dict(old)) == ""


def test_new_and_removed_vms_diff_against_nothing_and_secrets_are_masked() -> None:
    spec = {"name": "b", "cloud_init": {"user": "ops", "user_data": "#cloud-config\npw: x"}}
    created = spec_diff("b", None, spec)
    assert created.splitlines()[:2] == ["--- /dev/null", "+++ b (declared)"]
    assert f"+  user_data: {MASK}" in created and "pw: x" not in created
    assert spec_diff("b", spec, None).splitlines()[1] == "+++ /dev/null"


def test_a_value_that_looks_like_yaml_is_quoted() -> None:
    text = spec_diff("c", None, {"name": "c", "boot": {"cmdline": "console=ttyS0, x: y"}})
    assert '+  cmdline: "console=ttyS0, x: y"' in text


@pytest.mark.qemu
def test_check_diff_shows_a_memory_change_of_a_running_vm(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile,
) -> None:
    manifests = tmp_path / "vms"
    manifests.mkdir()
    (manifests / "a.yaml").write_text(vm_manifest("a", guest, memory="96M"))
    reconcile("--once", manifests, check=0)
    pid = pid_of(state_dir, "a")
    (manifests / "a.yaml").write_text(vm_manifest("a", guest, memory="97M"))
    run = reconcile("--once", "--check", "--diff", manifests, check=2)
    assert "-memory: 96M\n+memory: 97M" in run.out, run
    assert "--- a (recorded)\n+++ a (declared)" in run.out
    as_json = json.loads(reconcile("--once", "--check", "--diff", "--json", manifests,
                                   check=2).out)
    assert "+memory: 97M" in as_json["diffs"]["a"]
    applied = reconcile("--once", "--diff", manifests, check=0)
    assert "+memory: 97M" in applied.out and pid_of(state_dir, "a") != pid
    assert "memory" not in reconcile("--once", "--diff", manifests, check=0).out
