"""`reconcile list`: every VM on the host, ours or not: QEMU processes and KVM VMs of
any hypervisor (debugfs), with `managed` telling which this state dir runs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Run, pid_of, vm_manifest, wait_for

from reconciler.inventory import kvm_vms, qemu_facts

Reconcile = Callable[..., Run]


@pytest.mark.parametrize(("args", "expected"), [
    (["qemu-system-x86_64", "-name", "guest=web,debug-threads=on", "-m", "512M", "-smp", "2"],
     ("web", 2, 512)),
    (["qemu-system-x86_64", "-name", "legacy", "-m", "size=1G", "-smp", "cpus=4,sockets=1"],
     ("legacy", 4, 1024)),
    (["qemu-system-x86_64", "-m", "256"], (None, 1, 256)),
    (["qemu-system-x86_64"], (None, 1, 128)),  # QEMU's defaults
])
def test_a_qemu_command_line_says_name_vcpus_and_memory(
    args: list[str], expected: tuple[str | None, int, int],
) -> None:
    assert qemu_facts(args) == expected


def test_debugfs_lists_kvm_vms_by_pid_with_their_vcpus(tmp_path: Path) -> None:
    for vm, vcpus in (("123-11", 2), ("123-14", 1), ("456-9", 0)):
        for n in range(vcpus):
            (tmp_path / vm / f"vcpu{n}").mkdir(parents=True)
        (tmp_path / vm).mkdir(exist_ok=True)
    (tmp_path / "exits").write_text("0\n")  # a global counter, not a VM
    assert kvm_vms(tmp_path) == {123: 3, 456: 0}
    assert kvm_vms(None) == {}


TINY_KVM_VM = textwrap.dedent("""
    import fcntl, os, sys, time
    kvm = os.open("/dev/kvm", os.O_RDWR)
    vm = fcntl.ioctl(kvm, 0xAE01, 0)          # KVM_CREATE_VM
    for n in range(2):
        fcntl.ioctl(vm, 0xAE41, n)            # KVM_CREATE_VCPU
    print("ready", flush=True)
    time.sleep(120)
""")


@pytest.mark.qemu
def test_list_shows_a_foreign_qemu_a_bare_kvm_vm_and_ours(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile,
) -> None:
    if not Path("/dev/kvm").exists():
        pytest.skip("no /dev/kvm on this host")
    manifests = tmp_path / "vms"
    manifests.mkdir()
    (manifests / "a.yaml").write_text(vm_manifest("ours", guest))
    reconcile("--once", manifests, check=0)
    foreign = subprocess.Popen(
        ["qemu-system-x86_64", "-name", "guest=foreign-vm", "-nodefaults", "-machine", "pc",
         "-accel", "tcg", "-m", "64M", "-smp", "2", "-display", "none", "-S"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bare = subprocess.Popen([sys.executable, "-c", TINY_KVM_VM], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert bare.stdout is not None and bare.stdout.readline().strip() == "ready"
        wait_for(lambda: Path(f"/proc/{foreign.pid}/comm").read_text().startswith("qemu"),
                 timeout=10, what="the foreign QEMU")
        rows = {r["pid"]: r for r in json.loads(reconcile("list", "--json", check=0).out)}
        assert rows[foreign.pid] | {"pid": 0} == {
            "pid": 0, "command": "qemu-system-x86", "name": "foreign-vm", "vcpus": 2,
            "memory": 64, "kvm": False, "managed": False}
        assert rows[bare.pid]["kvm"] is True and rows[bare.pid]["vcpus"] == 2
        assert rows[bare.pid]["managed"] is False and rows[bare.pid]["name"] is None
        ours = rows[pid_of(state_dir, "ours")]
        assert (ours["name"], ours["managed"], ours["memory"]) == ("ours", True, 96)
        table = reconcile("list", check=0).out
        assert any(line.split()[:2] == [str(foreign.pid), "foreign-vm"]
                   for line in table.splitlines()), table
    finally:
        for proc in (foreign, bare):
            proc.kill()
            proc.wait()
        if bare.stdout is not None:
            bare.stdout.close()
