"""Manifest models and loader: every mistake named by file, line and VM, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler import desired
from reconciler.desired import State, parse_mebibytes, parse_seconds


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    return tmp_path


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def messages(root: Path) -> list[str]:
    return [str(e) for e in desired.load(root).errors]


def test_a_valid_document_becomes_a_vm_with_defaults(tree: Path) -> None:
    write(tree, "vms.yaml", "name: web-1\nboot: {kernel: vmlinuz}\n")
    loaded = desired.load(tree)
    assert loaded.errors == []
    vm = loaded.vms["web-1"].vm
    assert (vm.state, vm.memory, vm.vcpus, vm.stop_timeout) == (State.RUNNING, 256, 1, 30.0)
    assert vm.boot.kernel == tree / "vmlinuz"
    assert loaded.vms["web-1"].line == 1


def test_relative_paths_are_relative_to_the_manifest_file(tree: Path) -> None:
    write(tree, "sub/dir/vms.yaml", "name: a\nboot: {kernel: ../../vmlinuz}\n")
    assert desired.load(tree).vms["a"].vm.boot.kernel == tree / "vmlinuz"


def test_an_unknown_field_names_file_line_vm_and_the_likely_fix(tree: Path) -> None:
    path = write(tree, "vms.yaml", "name: web-1\nmemroy: 256M\nboot: {kernel: vmlinuz}\n")
    assert messages(tree) == [
        f"{path}:2: vm 'web-1': unknown field 'memroy' (did you mean 'memory'?)"
    ]


def test_every_error_of_every_file_is_reported_at_once(tree: Path) -> None:
    a = write(tree, "a.yaml", (
        "name: a\nboot: {kernel: vmlinuz}\n---\n"
        "name: b\nstate: runing\nmemory: 8M\nboot:\n  kernel: missing\n"
    ))
    b = write(tree, "b.yml", "name: c\nvcpus: 0\nboot: {kernel: vmlinuz}\n")
    assert messages(tree) == [
        f"{a}:5: vm 'b': state must be one of 'running', 'stopped', 'paused' or 'saved' "
        "(got 'runing')",
        f"{a}:6: vm 'b': memory must be at least 16M (got 8)",
        f"{a}:8: vm 'b': boot.kernel: file not found: {tree / 'missing'}",
        f"{b}:2: vm 'c': vcpus must be at least 1 (got 0)",
    ]


def test_a_file_with_any_error_contributes_no_vm(tree: Path) -> None:
    write(tree, "a.yaml", "name: a\nboot: {kernel: vmlinuz}\n---\nname: b\nbogus: 1\n")
    write(tree, "c.yaml", "name: c\nboot: {kernel: vmlinuz}\n")
    loaded = desired.load(tree)
    assert sorted(loaded.vms) == ["c"]
    assert loaded.broken_files == {tree / "a.yaml"}


def test_a_yaml_syntax_error_names_its_line(tree: Path) -> None:
    path = write(tree, "vms.yaml", "name: a\nboot: {kernel: vmlinuz}\n  oops: [\n")
    (error,) = desired.load(tree).errors
    assert (error.file, error.line) == (path, 3)
    assert "YAML syntax error" in error.message


def test_duplicate_names_name_both_places(tree: Path) -> None:
    a = write(tree, "a.yaml", "name: web\nboot: {kernel: vmlinuz}\n")
    b = write(tree, "b.yaml", "# comment\nname: web\nboot: {kernel: vmlinuz}\n")
    assert messages(tree) == [
        f"{a}:1: vm 'web': name declared again at {b}:2",
        f"{b}:2: vm 'web': name already declared at {a}:1; vm names must be unique across "
        "the directory",
    ]
    assert desired.load(tree).vms == {}


def test_bad_names_kinds_and_shapes_are_errors(tree: Path) -> None:
    path = write(tree, "vms.yaml", (
        "name: Web_1\nboot: {kernel: vmlinuz}\n---\n"
        "kind: Router\nname: r\n---\n"
        "- just\n- a list\n---\n"
        "boot: {kernel: vmlinuz}\n"
    ))
    assert messages(tree) == [
        f"{path}:1: vm 'Web_1': name 'Web_1' is not valid: use 1-63 lowercase letters, "
        "digits and dashes, starting with a letter or digit",
        f"{path}:4: vm 'r': unknown kind 'Router' (expected VM, Switch, Template or Settings)",
        f"{path}:7: a document must be a mapping of fields (got list)",
        f"{path}:10: name is required",
    ]


def test_hidden_files_and_dirs_and_other_suffixes_are_ignored(tree: Path) -> None:
    write(tree, ".git/x.yaml", "garbage: [")
    write(tree, ".swap.yaml", "garbage: [")
    write(tree, "notes.txt", "garbage: [")
    write(tree, "vms.yml", "name: a\nboot: {kernel: vmlinuz}\n")
    loaded = desired.load(tree)
    assert loaded.errors == [] and list(loaded.vms) == ["a"]


def test_a_missing_path_is_an_error(tmp_path: Path) -> None:
    (error,) = desired.load(tmp_path / "nope").errors
    assert "no such file or directory" in str(error)


@pytest.mark.parametrize(("text", "mib"), [
    ("256M", 256), ("2G", 2048), ("1g", 1024), ("512MiB", 512), ("1048576K", 1024), (128, 128),
    ("64", 64),
])
def test_memory_sizes_are_binary_units(text: object, mib: int) -> None:
    assert parse_mebibytes(text) == mib


@pytest.mark.parametrize("text", ["lots", "1.5G", "1000K", True, "-5M"])
def test_bad_memory_sizes_are_rejected(text: object) -> None:
    with pytest.raises(ValueError):
        parse_mebibytes(text)


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("500ms", 0.5), ("2m", 120), (5, 5)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_seconds(text) == seconds


def test_the_spec_hash_changes_with_hardware_only(tree: Path) -> None:
    write(tree, "a.yaml", "name: a\nboot: {kernel: vmlinuz}\n")
    base = desired.load(tree).vms["a"].vm
    same = base.model_copy(update={"state": State.PAUSED, "labels": {"x": "y"}})
    other = base.model_copy(update={"memory": 512})
    assert same.spec_hash() == base.spec_hash()
    assert other.spec_hash() != base.spec_hash()


def test_a_yaml_boolean_where_a_string_belongs_says_to_quote_it(tree: Path) -> None:
    path = write(tree, "vms.yaml", "name: false\nboot: {kernel: vmlinuz}\n")
    assert messages(tree) == [
        f"{path}:1: name must be a string, but YAML read False: put the value in quotes"]


def test_yaml_1_2_core_schema_keeps_yes_no_and_macs_strings(tree: Path) -> None:
    write(tree, "vms.yaml", (
        "name: off\nboot: {kernel: vmlinuz}\nlabels: {a: yes, b: no, c: on}\n"
        "interfaces:\n  - {switch: lan, mac: 52:54:00:12:34:56}\n---\n"
        "kind: Switch\nname: lan\n"))
    loaded = desired.load(tree)
    assert loaded.errors == []
    vm = loaded.vms["off"].vm
    assert vm.labels == {"a": "yes", "b": "no", "c": "on"}
    assert vm.interfaces[0].mac == "52:54:00:12:34:56"


def test_hardware_mistakes_are_named(tree: Path) -> None:
    path = write(tree, "vms.yaml", (
        "name: a\nboot: {kernel: vmlinuz, device: disk}\n---\n"
        "name: b\nboot: {device: cdrom}\n---\n"
        "name: c\nboot: {kernel: vmlinuz}\ndisks:\n  - {path: nope.qcow2}\n---\n"
        "name: d\nboot: {kernel: vmlinuz}\ndisks:\n  - {path: x.raw, format: raw, "
        "base: vmlinuz}\n---\n"
        "name: e\nboot: {kernel: vmlinuz}\ninterfaces:\n  - {switch: lan, mac: "
        "'01:00:5e:00:00:01'}\n---\n"
        "kind: Switch\nname: lan\n"
    ))
    assert messages(tree) == [
        f"{path}:2: vm 'a': boot: give either kernel: (direct boot) or device: disk|cdrom "
        "(firmware boot)",
        f"{path}:4: vm 'b': boot: {{device: cdrom}} needs cdrom:",
        f"{path}:10: vm 'c': disks.0: {tree / 'nope.qcow2'} does not exist: give size: to "
        "create it, or base: to create an overlay",
        f"{path}:15: vm 'd': disks.0: an overlay on base: must be format: qcow2",
        f"{path}:20: vm 'e': interfaces.0.mac: 01:00:5e:00:00:01 is a multicast address; "
        "use a unicast one such as 52:54:00:12:34:56",
    ]
