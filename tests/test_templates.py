"""Templates and instances (vm.conf's `vm "web" instance "base"` with `allow instance`)
and `replicas: N`: expanded at load, every mistake a FILE:LINE error naming both places."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Run, alive, pid_of
from test_desired import tree, write

from reconciler import desired

__all__ = ["tree"]
Reconcile = Callable[..., Run]

BASE = """kind: Template
name: base
memory: 128M
boot: {kernel: vmlinuz}
disks:
  - path: disks/{name}.qcow2
    size: 64M
allow: [memory, state]
"""


def errors(root: Path) -> list[str]:
    return [str(e) for e in desired.load(root).errors]


def test_an_instance_inherits_and_replicas_expand_with_their_names(tree: Path) -> None:
    write(tree, "templates/base.yaml", BASE.replace("vmlinuz", "../vmlinuz"))
    (tree / "disks").mkdir()
    (tree / "templates" / "disks").mkdir()
    write(tree, "web.yaml", "name: web\ntemplate: base\nreplicas: 3\nmemory: 256M\n"
          "---\nname: db\ntemplate: base\n")
    loaded = desired.load(tree)
    assert loaded.errors == []
    vms = {n: d.vm for n, d in loaded.vms.items()}
    assert sorted(vms) == ["db", "web-1", "web-2", "web-3"]
    assert [vms[n].memory for n in sorted(vms)] == [128, 256, 256, 256]
    # the template's relative paths are its own file's, {name} each VM's name
    assert vms["web-2"].disks[0].path == tree / "templates" / "disks" / "web-2.qcow2"
    assert vms["db"].boot.kernel == tree / "vmlinuz"
    assert vms["web-1"].spec_hash() != vms["web-2"].spec_hash()


def test_overriding_a_field_the_template_does_not_allow_names_both_places(tree: Path) -> None:
    base = write(tree, "base.yaml", BASE)
    web = write(tree, "web.yaml", "name: web\ntemplate: base\nvcpus: 2\nboot: {kernel: x}\n")
    (tree / "disks").mkdir()
    assert errors(tree) == [
        f"{web}:4: vm 'web': boot: template 'base' ({base}:1) sets it and does not allow "
        "instances to override it (its allow: [memory, state])",
    ]  # vcpus is not set by the template: the instance may set it


@pytest.mark.parametrize(("text", "line", "message"), [
    ("name: a\ntemplate: nope\n", 2,
     "vm 'a': template: no template named 'nope' is declared (declared: base)"),
    ("name: a\ntemplate: base\nreplicas: 0\n", 3,
     "vm 'a': replicas must be a number from 1 to 256 (got 0)"),
    ("name: a\ntemplate: base\nreplicas: 'two'\n", 3,
     "vm 'a': replicas must be a number from 1 to 256 (got 'two')"),
    ("name: a\ntemplate: base\nreplicas: 2\ninterfaces: [{switch: lan, mac: "
     "'52:54:00:00:00:01'}]\n", 3, "vm 'a': replicas: an interface with its own mac: cannot "
     "be copied (each replica gets a MAC derived from its name)"),
    ("name: a\ntemplate: base\nmemory: 1M\n", 3,
     "vm 'a': memory must be at least 16M (got 1)"),
])
def test_bad_instances_are_file_line_errors(tree: Path, text: str, line: int,
                                            message: str) -> None:
    write(tree, "base.yaml", BASE)
    (tree / "disks").mkdir()
    path = write(tree, "vm.yaml", text)
    found = errors(tree)
    assert any(e.startswith(f"{path}:{line}: {message}") for e in found), found


def test_a_broken_template_is_reported_where_it_is_written(tree: Path) -> None:
    base = write(tree, "base.yaml", BASE.replace("memory: 128M", "memory: 1M")
                 .replace("allow: [memory, state]", "allow: []"))
    write(tree, "vm.yaml", "name: a\ntemplate: base\n")
    (tree / "disks").mkdir()
    assert errors(tree) == [f"{base}:3: vm 'a': memory must be at least 16M (got 1)"]
    odd = write(tree, "base.yaml", BASE.replace("allow: [memory, state]", "allow: [colour]"))
    assert errors(tree)[0].startswith(f"{odd}:8: template 'base': allow: unknown field "
                                      "'colour'")
    write(tree, "base.yaml", BASE.replace("memory: 128M", "template: other"))
    assert "unknown field 'template' for a template" in errors(tree)[0]


def test_a_template_declared_twice_is_an_error_at_the_second(tree: Path) -> None:
    first = write(tree, "a.yaml", BASE)
    second = write(tree, "b.yaml", BASE)
    assert errors(tree) == [f"{second}:1: template 'base' is also declared in {first}:1"]


@pytest.mark.qemu
def test_replicas_of_a_template_converge_and_follow_the_count(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile,
) -> None:
    manifests = tmp_path / "vms"
    manifests.mkdir()
    (manifests / "base.yaml").write_text(
        f"kind: Template\nname: small\nmemory: 96M\nboot:\n  kernel: {guest / 'vmlinuz'}\n"
        f"  initrd: {guest / 'initrd.img'}\n  cmdline: console=ttyS0 quiet\n"
        "allow: [memory]\n")
    web = manifests / "web.yaml"
    web.write_text("name: web\ntemplate: small\nreplicas: 2\n")
    check = reconcile("--once", "--check", manifests, check=2)
    assert [line.split()[:2] for line in check.out.splitlines()[:2]] == [
        ["web-1", "pending"], ["web-2", "pending"]], check
    reconcile("--once", manifests, check=0)
    pids = {n: pid_of(state_dir, n) for n in ("web-1", "web-2")}
    assert all(alive(p) for p in pids.values())
    assert "0 changed" in reconcile("--once", manifests, check=0).out
    web.write_text("name: web\ntemplate: small\nreplicas: 1\n")
    shrunk = reconcile("--once", manifests, check=0)
    assert "web-2" in shrunk.out and not alive(pids["web-2"]), shrunk
    assert pid_of(state_dir, "web-1") == pids["web-1"]
