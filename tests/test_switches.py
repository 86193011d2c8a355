"""Switches and interfaces with real QEMU, inside a network namespace the test makes:
two guests ping each other through a bridge; taps and reconciler-made bridges go away
with their VMs; a bridge that existed before is never removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Run, netns, vm_manifest, wait_for, wait_for_serial

pytestmark = pytest.mark.qemu
__all__ = ["netns"]  # the fixture


def in_ns(ns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def links(ns: str) -> dict[str, dict[str, object]]:
    return {link["ifname"]: link for link in json.loads(in_ns(ns, "ip", "-j", "link"))}


@pytest.fixture
def reconcile_in(netns: str, state_dir: Path) -> Callable[..., Run]:
    def run(*args: str | Path) -> Run:
        env = dict(os.environ, RECONCILER_STATE_DIR=str(state_dir))
        proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "reconciler",
                               *map(str, args)], capture_output=True, text=True, env=env,
                              timeout=300)
        return Run(proc.returncode, proc.stdout, proc.stderr)

    return run


def nic_vm(name: str, guest: Path, switch: str, cmdline: str) -> str:
    text = vm_manifest(name, guest).replace("console=ttyS0 quiet",
                                            f"console=ttyS0 quiet {cmdline}")
    return text + f"interfaces:\n  - switch: {switch}\n"


def test_guests_on_a_switch_ping_and_their_network_goes_with_them(
    tmp_path: Path, guest: Path, state_dir: Path, netns: str,
    reconcile_in: Callable[..., Run]
) -> None:
    in_ns(netns, "ip", "link", "add", "br-pre", "type", "bridge")
    vms = tmp_path / "vms"
    vms.mkdir()
    (vms / "switches.yaml").write_text(
        "kind: Switch\nname: lan\n---\nkind: Switch\nname: pre\nbridge: br-pre\n")
    (vms / "a.yaml").write_text(nic_vm("a", guest, "lan", "rg.ip=10.99.0.1/24"))
    (vms / "b.yaml").write_text(nic_vm("b", guest, "lan",
                                       "rg.ip=10.99.0.2/24 rg.ping=10.99.0.1"))
    (vms / "c.yaml").write_text(nic_vm("c", guest, "pre", "rg.ip=10.99.1.1/24"))
    run = reconcile_in("--once", vms)
    assert run.code == 0, run
    wait_for_serial(state_dir, "b", "reconciler-guest: ping 10.99.0.(1 ok|1 failed)")
    wait_for_serial(state_dir, "b", "reconciler-guest: ping 10.99.0.1 ok", timeout=1)

    seen = links(netns)
    assert {"br-lan", "br-pre", "vma.0", "vmb.0", "vmc.0"} <= set(seen)
    assert seen["vma.0"]["master"] == "br-lan" and seen["vmc.0"]["master"] == "br-pre"
    assert seen["vmb.0"]["operstate"] in ("UP", "UNKNOWN")

    (vms / "b.yaml").unlink()
    assert reconcile_in("--once", vms).code == 0
    assert "vmb.0" not in links(netns) and "br-lan" in links(netns)  # a still uses it

    (vms / "a.yaml").unlink()
    (vms / "c.yaml").unlink()
    run = reconcile_in("--once", vms)
    assert run.code == 0, run
    wait_for(lambda: not {"vma.0", "vmc.0", "br-lan"} & set(links(netns)), timeout=5,
             what="taps and the made bridge gone")
    assert "br-pre" in links(netns)  # it was there before: never removed


def test_an_interface_on_an_undeclared_switch_is_a_manifest_error(
    tmp_path: Path, guest: Path, reconcile_in: Callable[..., Run]
) -> None:
    (tmp_path / "a.yaml").write_text(nic_vm("a", guest, "lan", ""))
    run = reconcile_in("validate", tmp_path)
    assert run.code == 1
    assert run.err.strip() == (
        f"{tmp_path / 'a.yaml'}:8: vm 'a': interfaces.0.switch: no valid switch 'lan' is "
        "declared (add a document with kind: Switch, name: lan)")
