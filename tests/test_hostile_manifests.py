"""Hostile manifests: every problem is a `FILE:LINE: ...` error, never a traceback, the work
is bounded, and a path that cannot be read as a manifest is an error, never a deletion.

Each case sits next to a valid `ok.yaml`, which must still load: one bad file breaks only
itself. The last tests are property tests over generated and mutated manifests.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import resource
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler import desired
from reconciler.desired import ManifestError, Manifests

VM = "name: a\nboot: {kernel: vmlinuz}\n"  # what a case adds starts on line 3
OK = "name: ok\nboot: {kernel: vmlinuz}\n"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "ok.yaml").write_text(OK)
    return tmp_path


def write(root: Path, name: str, text: str | bytes) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogatepass")
    path.write_bytes(text)
    return path


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging the suite) if the block blocks."""
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"blocked for over {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def load_beside_ok(root: Path, **kwargs: object) -> Manifests:
    with deadline(10):
        loaded = desired.load(root, **kwargs)  # type: ignore[arg-type]
    assert "ok" in loaded.vms, "the valid sibling must still load"
    for error in loaded.errors:
        assert error.line >= 0
        str(error).encode("utf-8")
    return loaded


def the_error(root: Path, path: Path, **kwargs: object) -> ManifestError:
    """The one error of the tree, which must be about path."""
    loaded = load_beside_ok(root, **kwargs)
    assert [e.file for e in loaded.errors] == [path], loaded.errors
    assert not any(d.file == path for d in loaded.vms.values())
    return loaded.errors[0]


# --- YAML that used to raise ---------------------------------------------------------

RAISED = {
    # id: (text, line, what the message says)
    "int_over_4300_digits": (VM + "vcpus: 1" + "0" * 5000 + "\n", 3, "out of range"),
    "hex_int_of_20000_bits": (VM + "vcpus: 0x" + "f" * 5000 + "\n", 3, "out of range"),
    "bool_maybe": (VM + "labels: {a: !!bool maybe}\n", 3, "'maybe' is not a valid !!bool"),
    "int_abc": (VM + "vcpus: !!int abc\n", 3, "'abc' is not a valid !!int"),
    "float_x": (VM + "stop_timeout: !!float x\n", 3, "'x' is not a valid !!float"),
    "null_x": (VM + "labels: !!null x\n", 3, "'x' is not a valid !!null"),
    "stop_timeout_huge_int": (VM + "stop_timeout: 1" + "0" * 400 + "\n", 3, "out of range"),
    "stop_timeout_1e999": (VM + "stop_timeout: 1e999\n", 3,
                           "stop_timeout: must be a duration like 30s or 2m (got inf)"),
    "stop_timeout_huge_string": (VM + "stop_timeout: '" + "9" * 400 + "s'\n", 3,
                                 "stop_timeout: must be a duration"),
    "stop_timeout_nan": (VM + "stop_timeout: .nan\n", 3, "must be a duration"),
    "memory_nan": (VM + "memory: .nan\n", 3, "memory: must be a size like 256M"),
    "memory_inf": (VM + "memory: -.inf\n", 3, "memory: must be a size like 256M"),
    "memory_huge_kib": (VM + "memory: " + "9" * 40 + "k\n", 3, "memory: must be a size"),
    "lone_surrogate_escape": (VM + 'labels: {a: "\\ud800"}\n', 3,
                              "invalid Unicode character escape code"),
    "timestamp_tag": (VM + "labels: {a: !!timestamp x}\n", 3, "unsupported tag '!!timestamp'"),
    "binary_tag": (VM + "labels: {a: !!binary aGVsbG8=}\n", 3, "unsupported tag '!!binary'"),
    "set_tag": (VM + "labels: !!set {a, b}\n", 3, "unsupported tag '!!set'"),
    "python_tag": (VM + "labels: !!python/object:os.system {}\n", 3, "unsupported tag"),
    "local_tag": (VM + "cdrom: !include x.iso\n", 3, "unsupported tag '!include'"),
    "nul_in_a_path": ('name: a\nboot: {kernel: "vm\\0linuz"}\n', 2, "contains a NUL character"),
    "nul_in_a_cmdline": (VM.replace("}", ', cmdline: "a\\0b"}'), 2, "NUL"),
    "path_of_5000_characters": ("name: a\nboot: {kernel: " + "a" * 5000 + "}\n", 2,
                                "cannot check"),
    "path_of_3000_components": ("name: a\nboot: {kernel: " + "a/" * 3000 + "x}\n", 2,
                                "boot.kernel:"),
    "sequence_as_key": (VM + "? [a, b]\n: 1\n", 3, "a key must be a string, not a list"),
    "mapping_as_key": (VM + "labels: {{a: b}: 1}\n", 3, "a key must be a string, not a mapping"),
    "int_as_key": (VM + "labels: {1: x}\n", 3, "key '1' must be a string"),
    "null_as_key": (VM + "labels: {~: x}\n", 3, "key '~' must be a string"),
    "merge_of_a_scalar": (VM + "<<: 5\n", 3, "<< merges a mapping or a list of mappings"),
    "merge_of_a_list_of_scalars": (VM + "<<: [1, 2]\n", 3, "<< merges a mapping"),
    "recursive_alias_list": (VM + "labels: &a [*a]\n", 3, "recursive alias"),
    "recursive_alias_map": (VM + "labels: &a {x: *a}\n", 3, "recursive alias"),
    "undefined_alias": (VM + "labels: *nope\n", 3, "YAML syntax error: found undefined alias"),
    "duplicate_anchor": (VM + "x: &a 1\ny: &a 2\n", 4, "found duplicate anchor"),
    "flow_nesting_500": (VM + "labels: " + "[" * 500 + "]" * 500 + "\n", 3,
                         "nested over 64 levels deep"),
    "flow_nesting_5000": (VM + "labels: " + "[" * 5000 + "]" * 5000 + "\n", 3,
                          "exceeded maximum nesting depth"),
    "block_nesting_300": (VM + "labels:\n  " + "- " * 300 + "x\n", 4,
                          "nested over 64 levels deep"),
    "block_nesting_by_indentation": (
        VM + "labels:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 100)), 67,
        "nested over 64 levels deep"),
    "regex_repeat_overflow": (VM + "ready: {serial: 'a{99999999999}'}\n", 3,
                              "ready.serial: not a usable regular expression"),
    "regex_nested_too_deep": (VM + "ready: {serial: '" + "(" * 500 + ")" * 500 + "'}\n", 3,
                              "ready.serial: not a usable regular expression"),
    "regex_too_long": (VM + "ready: {serial: " + "a" * 2000 + "}\n", 3,
                       "ready.serial: String should have at most 1024 characters"),
    "too_many_disks": (VM + "disks: [&d {path: x.qcow2, size: 1G}" + ", *d" * 20 + "]\n",
                       3, "disks: List should have at most 16 items"),
    "merge_bomb": ("a: &a {x: 1}\n" + "".join(
        f"b{i}: &b{i} {{<<: [{', '.join(['*a' if i == 0 else f'*b{i - 1}'] * 5)}]}}\n"
        for i in range(70)) + VM, 40, "nested over 64 levels deep"),
    "bad_utf8": (VM.encode() + b"labels: {a: \xff}\n", 3, "invalid leading UTF-8 octet"),
    "control_character": (VM + "labels: {a: \x01}\n", 3, "control characters are not allowed"),
    "yaml_2_0": ("%YAML 2.0\n---\n" + VM, 1, "incompatible YAML document"),
    "cloud_init_string": (VM + "cloud_init: yes\n", 3, "cloud_init: Input should be"),
    "user_data_list": (VM + "cloud_init: {user_data: [a]}\n", 3,
                       "cloud_init.user_data must be a string"),
    "user_data_bomb": (VM + "cloud_init: {user_data: \"#cloud-config\\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\\n" for p, c in zip("abcdefg", "bcdefgh",
                                                                      strict=True))
        .replace("*a", "1") + "\"}\n", 3, "aliases are expanded"),
    "user_data_file_is_a_device": (VM + "cloud_init: {user_data_file: /dev/zero}\n", 3,
                                   "user_data_file: /dev/zero is under /dev"),
    "user_data_file_is_a_directory": (VM + "cloud_init: {user_data_file: /tmp}\n", 3,
                                      "user_data_file: file not found: /tmp"),
    "keys_file_proc": (VM + "cloud_init: {ssh_authorized_keys_file: /proc/self/environ}\n",
                       3, "is under /proc"),
    "subnet_ipv6": ("kind: Switch\nname: s\nmode: local\nsubnet: 'fd00::/64'\n", 4,
                    "is not IPv4"),
    "subnet_garbage": ("kind: Switch\nname: s\nmode: local\nsubnet: 300.1.2.0/24\n", 4,
                       "not an IPv4 subnet"),
    "subnet_int": ("kind: Switch\nname: s\nmode: local\nsubnet: 7\n", 4, "subnet"),
    "tcp_port_zero": (VM + "interfaces: []\nready: {tcp: 0}\n", 4,
                      "ready.tcp must be at least 1"),
    "meta_data_instance_id": (VM + "cloud_init: {meta_data: {instance-id: x}}\n", 3,
                              "instance-id is set by the reconciler"),
}


@pytest.mark.parametrize(("text", "line", "fragment"), list(RAISED.values()), ids=list(RAISED))
def test_yaml_that_used_to_raise_is_an_error_with_its_line(
    tree: Path, text: str | bytes, line: int, fragment: str
) -> None:
    path = write(tree, "bad.yaml", text)
    error = the_error(tree, path)
    assert error.line == line, str(error)
    assert fragment in str(error)
    assert str(error).startswith(f"{path}:{line}: ")


def test_an_error_names_the_vm_of_its_document(tree: Path) -> None:
    path = write(tree, "bad.yaml", VM + "vcpus: !!int abc\n")
    assert str(the_error(tree, path)) == (
        f"{path}:3: vm 'a': 'abc' is not a valid !!int (YAML 1.2 core schema)")


def test_a_value_in_an_error_is_cut_to_a_line(tree: Path) -> None:
    path = write(tree, "bad.yaml", "name: a\nboot: {kernel: vmlinuz}\nstate: " + "x" * 10000)
    message = str(the_error(tree, path))
    assert "state must be one of" in message and len(message) < 400


# --- Unbounded work ------------------------------------------------------------------

ALIAS_BOMB = "a: &a [x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 7)}]\n" for i in range(11))


def test_an_alias_bomb_is_measured_not_expanded(tree: Path) -> None:
    assert len(ALIAS_BOMB) < 600
    path = write(tree, "bomb.yaml", ALIAS_BOMB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    error = the_error(tree, path)
    assert time.monotonic() - started < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 20_000  # KiB
    assert (error.line, error.message) == (  # f: 7**6 values
        6, "over 100000 values once aliases are expanded; a manifest needs a few dozen")


def test_aliases_within_the_limits_are_fine(tree: Path) -> None:
    write(tree, "vms.yaml", "name: a\nboot: {kernel: vmlinuz}\nlabels: {a: &v web, b: *v}\n")
    loaded = load_beside_ok(tree)
    assert loaded.errors == []
    assert loaded.vms["a"].vm.labels == {"a": "web", "b": "web"}


def test_an_alias_to_another_document_is_an_error(tree: Path) -> None:
    path = write(tree, "vms.yaml", VM + "labels: &l {team: web}\n---\n" + VM.replace(
        "name: a", "name: b") + "labels: *l\n")
    assert [str(e) for e in load_beside_ok(tree).errors] == [
        f"{path}:7: YAML syntax error: found undefined alias"]
    assert sorted(desired.load(tree).vms) == ["ok"]


def test_a_file_over_the_size_limit_is_an_error_and_not_read(tree: Path) -> None:
    limit = desired.DEFAULT_MAX_MANIFEST_BYTES
    assert limit == 1 << 20
    text = "name: a\nboot: {kernel: vmlinuz}\n"
    exact = write(tree, "exact.yaml", text + "#" * (limit - len(text) - 1) + "\n")
    assert exact.stat().st_size == limit
    path = write(tree, "big.yaml", text + "#" * (limit - len(text)) + "\n")
    assert path.stat().st_size == limit + 1
    error = the_error(tree, path)
    assert str(error) == (f"{path}:0: larger than {limit} bytes, the limit for a manifest "
                          "file (--max-manifest-size): not read")
    assert path not in desired.load(tree).files


def test_the_size_limit_is_a_parameter(tree: Path) -> None:
    path = write(tree, "vms.yaml", VM + "#" * 100 + "\n")
    assert desired.load(tree, max_bytes=200).errors == []
    assert the_error(tree, path, max_bytes=100).line == 0


def test_a_file_that_composes_too_many_nodes_is_refused_while_composing(tree: Path) -> None:
    path = write(tree, "wide.yaml", VM + "labels: [" + "1," * 100_001 + "]\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert str(the_error(tree, path)) == (
        f"{path}:0: over 100000 values in this file; split it into smaller files")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 60_000  # KiB


def test_a_file_of_over_a_thousand_documents_is_refused(tree: Path) -> None:
    docs = [f"name: v{i}\nboot: {{kernel: vmlinuz}}\n" for i in range(1001)]
    path = write(tree, "many.yaml", "---\n".join(docs))
    started = time.monotonic()
    loaded = load_beside_ok(tree)
    assert time.monotonic() - started < 1
    assert [str(e) for e in loaded.errors] == [
        f"{path}:3001: over 1000 documents in this file; split it into smaller files"]
    write(tree, "many.yaml", "---\n".join(docs[:1000]))
    assert len(load_beside_ok(tree).vms) == 1001


def test_many_errors_in_a_file_are_cut_to_a_hundred_and_a_count(tree: Path) -> None:
    path = write(tree, "bad.yaml", VM + "".join(f"k{i}: 1\n" for i in range(5000)))
    started = time.monotonic()
    loaded = load_beside_ok(tree)
    assert time.monotonic() - started < 2
    assert len(loaded.errors) == 101 and {e.file for e in loaded.errors} == {path}
    assert str(loaded.errors[0]) == f"{path}:0: 4900 more errors in this file not shown"


# --- Silent typos --------------------------------------------------------------------

def test_a_duplicate_key_names_both_lines(tree: Path) -> None:
    path = write(tree, "dup.yaml", "name: a\nmemory: 1G\nboot: {kernel: vmlinuz}\nmemory: 2G\n")
    assert str(the_error(tree, path)) == (
        f"{path}:4: vm 'a': duplicate key 'memory' (first at line 2)")


def test_a_duplicate_key_in_a_nested_mapping_is_an_error(tree: Path) -> None:
    path = write(tree, "dup.yaml", "name: a\nboot:\n  kernel: vmlinuz\n  kernel: other\n")
    assert str(the_error(tree, path)) == (
        f"{path}:4: vm 'a': duplicate key 'kernel' (first at line 3)")


def test_keys_merged_with_double_angle_may_be_overridden(tree: Path) -> None:
    write(tree, "vms.yaml", (
        "name: c\nboot: {kernel: vmlinuz}\n"
        "ready: {serial: &base {team: web, tier: db}}\n"
        "labels:\n  <<: *base\n  tier: cache\n"))
    errors = load_beside_ok(tree).errors
    assert [(e.line, e.message) for e in errors] == [
        (3, "ready.serial must be a string, but YAML read {'team': 'web', 'tier': 'db'}: put the "
            "value in quotes")]
    write(tree, "vms.yaml", (
        "name: c\nboot: {kernel: vmlinuz}\n"
        "labels:\n  <<: {team: web, tier: db}\n  tier: cache\n"))
    loaded = load_beside_ok(tree)
    assert loaded.errors == []
    assert loaded.vms["c"].vm.labels == {"team": "web", "tier": "cache"}
    write(tree, "vms.yaml", (
        "name: b\n<<: [{memory: 1G, vcpus: 2}, {vcpus: 3, accel: tcg}]\nmemory: 2G\n"
        "boot: {kernel: vmlinuz}\n"))
    vm = load_beside_ok(tree).vms["b"].vm
    assert (vm.memory, vm.vcpus, vm.accel) == (2048, 2, "tcg")


def test_the_readme_mac_and_yes_no_on_off_stay_strings(tree: Path) -> None:
    write(tree, "vms.yaml", (
        "name: a\nboot: {kernel: vmlinuz}\nlabels: {a: yes, b: No, c: on, d: OFF}\n"
        "interfaces:\n  - switch: lan\n    mac: 52:54:00:12:34:56\n---\n"
        "kind: Switch\nname: lan\n"))
    loaded = load_beside_ok(tree)
    assert loaded.errors == []
    vm = loaded.vms["a"].vm
    assert vm.interfaces[0].mac == "52:54:00:12:34:56"
    assert vm.labels == {"a": "yes", "b": "No", "c": "on", "d": "OFF"}


@pytest.mark.parametrize(("text", "value"), [
    ("012", 12), ("0o17", 15), ("0x1F", 31), ("-5", -5), ("+5", 5), ("1_000", "1_000"),
    ("0b101", "0b101"), ("1:30", "1:30"), ("1.5", 1.5), ("1e3", 1000.0), (".5", 0.5),
    ("-.inf", float("-inf")), ("yes", "yes"), ("True", True), ("FALSE", False), ("~", None),
    ("Null", None), ("2024-01-01", "2024-01-01"), ("=", "="), ("<<", "<<"),
])
def test_plain_scalars_follow_the_yaml_1_2_core_schema(text: str, value: object) -> None:
    (node,) = desired.compose_documents(f"x: {text}\n".encode())
    assert desired.check_document(node) == []
    got = desired.construct(node)["x"]
    assert got == value and type(got) is type(value)


def test_empty_documents_are_skipped(tree: Path) -> None:
    write(tree, "a.yaml", "---\n" + VM + "---\n")
    write(tree, "b.yaml", "name: b\nboot: {kernel: vmlinuz}\n---\n# only a comment\n---\n...\n")
    loaded = load_beside_ok(tree)
    assert loaded.errors == [] and sorted(loaded.vms) == ["a", "b", "ok"]


def test_a_file_with_no_document_is_empty_not_an_error(tree: Path) -> None:
    for name, text in [("c.yaml", ""), ("d.yaml", "# nothing\n"), ("e.yaml", "---\n")]:
        write(tree, name, text)
    loaded = load_beside_ok(tree)
    assert loaded.errors == []
    assert loaded.empty == {tree / "c.yaml", tree / "d.yaml", tree / "e.yaml"}


def test_a_utf16_manifest_with_a_bom_loads(tree: Path) -> None:
    write(tree, "u.yaml", (VM + "labels: {a: é}\n").encode("utf-16"))
    loaded = load_beside_ok(tree)
    assert loaded.errors == [] and loaded.vms["a"].vm.labels == {"a": "é"}


# --- Paths that cannot be read as manifests --------------------------------------------

def assert_unreadable(tree: Path, path: Path, fragment: str) -> None:
    error = the_error(tree, path)
    assert error.line == 0 and fragment in error.message, str(error)
    assert path not in desired.load(tree).files


def test_a_manifest_named_directory_is_an_error(tree: Path) -> None:
    (tree / "b.yaml").mkdir()
    write(tree, "b.yaml/c.yaml", VM)  # not looked into
    assert_unreadable(tree, tree / "b.yaml", "is a directory, not a regular file")


def test_a_dangling_symlink_is_an_error(tree: Path) -> None:
    (tree / "b.yaml").symlink_to(tree / "gone.yaml")
    assert_unreadable(tree, tree / "b.yaml", f"dangling symlink (to {tree / 'gone.yaml'})")


def test_a_symlink_loop_is_an_error(tree: Path) -> None:
    (tree / "b.yaml").symlink_to(tree / "c.yml")
    (tree / "c.yml").symlink_to(tree / "b.yaml")
    loaded = load_beside_ok(tree)
    assert [(e.file.name, e.line, e.message) for e in loaded.errors] == [
        ("b.yaml", 0, "symlink loop: cannot be read"), ("c.yml", 0, "symlink loop: cannot be read")]


def test_a_fifo_is_an_error_and_never_blocks(tree: Path) -> None:
    os.mkfifo(tree / "b.yaml")
    assert_unreadable(tree, tree / "b.yaml", "is a FIFO, not a regular file")


def test_a_fifo_swapped_in_after_listing_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "b.yaml")
    with deadline(5):
        error = desired.read_manifest(tmp_path / "b.yaml", max_bytes=100)
    assert isinstance(error, ManifestError) and "is a FIFO" in error.message


def test_a_socket_is_an_error(tree: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tree / "b.yaml"))
        assert_unreadable(tree, tree / "b.yaml", "is a socket, not a regular file")


def test_a_device_is_an_error_and_not_opened(tree: Path) -> None:
    (tree / "b.yaml").symlink_to("/dev/null")
    assert_unreadable(tree, tree / "b.yaml", "is a character device, not a regular file")


def test_a_read_error_is_an_error(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tree, "b.yaml", VM)
    real_read = os.read

    def failing(fd: int, size: int) -> bytes:
        if os.fstat(fd).st_ino == path.stat().st_ino:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_read(fd, size)

    monkeypatch.setattr(os, "read", failing)
    assert_unreadable(tree, path, "cannot read: Input/output error")


def load_as_nobody(root: Path) -> tuple[list[str], list[str]]:
    """desired.load(root) in a child that runs as uid 65534: (errors, vm names)."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(reader)
            os.setgid(65534)
            os.setuid(65534)
            loaded = desired.load(root)
            os.write(writer, pickle.dumps(([str(e) for e in loaded.errors], sorted(loaded.vms))))
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)  # type: ignore[no-any-return]


@pytest.fixture
def shared_tree() -> Iterator[Path]:
    """A tree that uid 65534 may enter (pytest's tmp_path is private to root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to another uid")
    root = Path(tempfile.mkdtemp(prefix="reconciler-hostile-"))
    try:
        root.chmod(0o755)
        (root / "vmlinuz").write_bytes(b"kernel")
        (root / "ok.yaml").write_text(OK)
        yield root
    finally:
        for path in root.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(root)


def test_permission_denied_is_an_error(shared_tree: Path) -> None:
    path = write(shared_tree, "b.yaml", VM)
    path.chmod(0o600)
    errors, vms = load_as_nobody(shared_tree)
    assert errors == [f"{path}:0: cannot read: Permission denied"]
    assert vms == ["ok"]


def test_a_directory_that_cannot_be_listed_is_an_error(shared_tree: Path) -> None:
    write(shared_tree, "sub/b.yaml", VM)
    (shared_tree / "sub").chmod(0o700)
    errors, vms = load_as_nobody(shared_tree)
    assert errors == [f"{shared_tree / 'sub'}:0: cannot list this directory: Permission denied"]
    assert vms == ["ok"]


def test_symlinked_directories_are_followed_once(
    tree: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    write(elsewhere, "b.yaml", "name: b\nboot: {kernel: ../vmlinuz}\n")
    (elsewhere / "vmlinuz").write_bytes(b"kernel")
    (tree / "linked").symlink_to(elsewhere)
    (tree / "again").symlink_to(elsewhere)  # the same real dir: once
    (elsewhere / "loop").symlink_to(tree)  # back up: a loop, ended
    loaded = load_beside_ok(tree)
    assert loaded.errors == []
    assert sorted(loaded.vms) == ["b", "ok"]
    assert loaded.vms["b"].file == tree / "again" / "b.yaml"


def test_hidden_entries_are_skipped_even_when_broken(tree: Path) -> None:
    (tree / ".b.yaml").symlink_to(tree / "gone")
    os.mkfifo(tree / ".fifo.yaml")
    (tree / ".git").mkdir()
    write(tree, ".git/x.yaml", "garbage: [")
    assert load_beside_ok(tree).errors == []


def test_other_names_that_are_not_files_are_ignored(tree: Path) -> None:
    (tree / "notes").symlink_to(tree / "gone")
    os.mkfifo(tree / "pipe")
    assert load_beside_ok(tree).errors == []


@pytest.mark.parametrize("kind", ["fifo", "dangling", "loop", "dir-loop"])
def test_a_path_given_directly_that_is_not_a_manifest_is_an_error(tmp_path: Path,
                                                                  kind: str) -> None:
    path = tmp_path / "vms.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling":
        path.symlink_to(tmp_path / "gone")
    else:
        path.symlink_to(path)
    if kind == "dir-loop":
        path = path / "sub"
    with deadline(5):
        loaded = desired.load(path)
    (error,) = loaded.errors
    assert error.file == path and error.line == 0 and loaded.files == []


def test_an_undecodable_file_name_prints_as_utf8(tree: Path) -> None:
    path = tree / os.fsdecode(b"bad-\xff.yaml")
    write(tree, path.name, "name: a\nbogus: 1\n")
    loaded = load_beside_ok(tree)
    assert [e.file for e in loaded.errors] == [path, path]
    assert f"{tree}/bad-\\xff.yaml:1: vm 'a': boot is required" in [str(e) for e in loaded.errors]


# --- Disk and image paths --------------------------------------------------------------

def test_a_disk_in_the_state_dir_is_an_error(tree: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "vms" / "x").mkdir(parents=True)
    path = write(tree, "b.yaml", f"{VM}disks:\n  - {{path: {state}/vms/x/disk.qcow2, size: 1G}}\n")
    assert str(the_error(tree, path, state_dir=state)) == (
        f"{path}:4: vm 'a': disks.0.path: {state}/vms/x/disk.qcow2 is inside the state dir "
        f"{state}; keep disks and images elsewhere")


def test_a_symlink_into_the_state_dir_is_an_error(tree: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "saved.state").write_bytes(b"x")
    (tree / "image.iso").symlink_to(state / "saved.state")
    path = write(tree, "b.yaml", VM.replace("kernel: vmlinuz", "device: cdrom") + "cdrom: "
                 "image.iso\n")
    error = the_error(tree, path, state_dir=state)
    assert (error.line, error.message) == (3, (
        f"cdrom: {tree}/image.iso (a symlink to {state}/saved.state) is inside the state dir "
        f"{state}; keep disks and images elsewhere"))


def test_a_state_dir_reached_through_a_symlink_is_the_state_dir(tree: Path, tmp_path: Path
                                                                ) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "alias").symlink_to(state)
    (state / "k").write_bytes(b"x")
    path = write(tree, "b.yaml", f"name: a\nboot: {{kernel: {state}/k}}\n")
    assert "is inside the state dir" in str(the_error(tree, path, state_dir=tmp_path / "alias"))


@pytest.mark.parametrize(("field", "value"), [
    ("kernel", "/proc/self/environ"), ("initrd", "/sys/kernel/notes"), ("kernel", "/dev/null"),
])
def test_images_under_proc_sys_dev_are_errors(tree: Path, field: str, value: str) -> None:
    boot = f"{{kernel: vmlinuz, initrd: {value}}}" if field == "initrd" else f"{{kernel: {value}}}"
    path = write(tree, "b.yaml", f"name: a\nboot: {boot}\n")
    top = "/" + value.split("/")[1]
    assert f"boot.{field}: {value} is under {top}" in str(the_error(tree, path))


def test_a_disk_under_dev_is_an_error(tree: Path) -> None:
    path = write(tree, "b.yaml", VM + "disks: [{path: /dev/shm/x.qcow2, size: 1G}]\n")
    assert "disks.0.path: /dev/shm/x.qcow2 is under /dev" in str(the_error(tree, path))


# --- The command line, in process --------------------------------------------------------

def validate(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from reconciler import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["validate", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return exited.value.code, out, err  # type: ignore[return-value]


@pytest.mark.parametrize("case", ["int_over_4300_digits", "bool_maybe", "recursive_alias_map",
                                  "flow_nesting_5000", "bad_utf8", "nul_in_a_path"])
def test_validate_reports_hostile_yaml_and_exits_1(tree: Path, case: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    text, line, fragment = RAISED[case]
    path = write(tree, "bad.yaml", text)
    code, out, err = validate(path, capsys)
    assert code == 1 and out == ""
    assert err.startswith(f"{path}:{line}: ") and fragment in err


def test_validate_of_a_fifo_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.mkfifo(tmp_path / "vms.yaml")
    with deadline(10):
        code, _, err = validate(tmp_path / "vms.yaml", capsys)
    assert code == 1 and "is a FIFO" in err


# --- Property tests ----------------------------------------------------------------------

FIELDS = ["kind", "name", "state", "restart", "on_change", "memory", "vcpus", "accel", "boot",
          "disks", "cdrom", "interfaces", "stop_timeout", "ready", "labels"]
SCALARS = st.one_of(
    st.sampled_from(["~", "null", "true", "no", "yes", "on", "0", "012", "0x1F", "0o17", "1e999",
                     ".nan", "-.inf", "1_000", "52:54:00:12:34:56", "256M", "2G", "30s",
                     "running", "vmlinuz", "''", '""', "'a'", '"\\0"', '"\\x01"', "!!int abc",
                     "!!bool maybe", "!!float x", "!!str 1", "!!binary aGk=", "!!timestamp x",
                     "!!set {a}", "!foo bar", "*undefined", "1" * 50, "-", "?", "|", ">", "%",
                     "@", "`", "<<", "=", "[", "{", "]", "}", "#x", "&a", "&a x", "*a"]),
    st.integers(-(2**70), 2**70).map(str),
    st.floats().map(repr),
    st.text(max_size=20).map(lambda s: '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12),
)


@st.composite
def values(draw: st.DrawFn, depth: int = 0) -> str:
    """A YAML value in flow style: scalars, lists, mappings, anchors, aliases, tags."""
    if depth > 2 or draw(st.booleans()):
        return draw(SCALARS)
    items = draw(st.lists(values(depth + 1), max_size=3))  # type: ignore[call-arg]
    if draw(st.booleans()):
        body = "[" + ", ".join(items) + "]"
    else:
        keys = draw(st.lists(st.sampled_from([*FIELDS, "path", "size", "kernel", "x", "<<"]),
                             min_size=len(items), max_size=len(items)))
        body = "{" + ", ".join(f"{k}: {v}" for k, v in zip(keys, items, strict=True)) + "}"
    prefix = draw(st.sampled_from(["", "", "&a ", "&b ", "!!map ", "!!seq ", "!x "]))
    return prefix + body


@st.composite
def structured(draw: st.DrawFn) -> tuple[str, bool]:
    """A manifest of real fields with random values; (text, surely_invalid)."""
    lines = ["name: web", "boot: {kernel: vmlinuz}"]
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=6)):
        lines.append(f"{name}: {draw(values())}")  # type: ignore[call-arg]
    extra = draw(st.sampled_from(["", "memroy: 256M", "bogus: 1", "kernel: x"]))
    if extra:  # last: no flow collection or quote left open before it can swallow it
        lines.append(extra)
    return "\n".join(lines) + "\n", bool(extra)


VALID = (
    "# a comment\nname: web-1\nmemory: 128M\nvcpus: 2\nrestart: on-failure\n"
    "stop_timeout: 20s\nboot:\n  kernel: vmlinuz\n  cmdline: console=ttyS0 quiet\n"
    "disks:\n  - {path: disk.qcow2, size: 1G}\n"
    "interfaces:\n  - switch: lan\n    mac: 52:54:00:12:34:56\n"
    "ready: {serial: 'up', timeout: 60s}\nlabels: {team: &t web, owner: *t}\n---\n"
    "kind: Switch\nname: lan\n---\nname: db-1\nboot: &b {kernel: vmlinuz}\n"
)
SYNTAX = [*":-[]{},&*!|>'\"#%@`?\t\n ", "<<: ", "---\n", "...\n", "\\", "\\0", "!!int "]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bool]:
    """VALID with byte flips, YAML syntax inserted, a truncation or a repeated line."""
    data = bytearray(VALID.encode())
    surely_invalid = False
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "insert", "truncate", "repeat", "unknown"]))
        at = draw(st.integers(0, len(data)))
        if how == "flip" and data:
            data[min(at, len(data) - 1)] ^= 1 << draw(st.integers(0, 7))
        elif how == "insert":
            data[at:at] = draw(st.sampled_from(SYNTAX)).encode()
        elif how == "truncate":
            del data[at:]
        elif how == "repeat" and not surely_invalid:
            lines = bytes(data).split(b"\n")
            index = draw(st.integers(0, len(lines) - 1))
            data = bytearray(b"\n".join([*lines[:index + 1], lines[index], *lines[index + 1:]]))
        elif how == "unknown":
            data = bytearray(bytes(data) + b"\nnot_a_field: 1\n")
            surely_invalid = True
            break
    return bytes(data), surely_invalid


def check_property(root: Path, data: bytes, surely_invalid: bool) -> None:
    (root / "vms.yaml").write_bytes(data)
    loaded = desired.load(root)  # never raises
    for error in loaded.errors:
        assert error.line >= 0
        str(error).encode("utf-8")
    if surely_invalid:
        assert loaded.errors, data


@pytest.fixture(scope="module")
def fuzz_root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "vmlinuz").write_bytes(b"kernel")
        yield Path(root)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=structured())
def test_structured_manifests_never_raise(fuzz_root: Path, case: tuple[str, bool]) -> None:
    text, surely_invalid = case
    check_property(fuzz_root, text.encode("utf-8", "surrogatepass"), surely_invalid)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated())
def test_mutated_manifests_never_raise(fuzz_root: Path, case: tuple[bytes, bool]) -> None:
    check_property(fuzz_root, *case)


def test_the_valid_manifest_the_mutations_start_from_is_valid(fuzz_root: Path) -> None:
    (fuzz_root / "vms.yaml").write_text(VALID)
    loaded = desired.load(fuzz_root)
    assert loaded.errors == [] and sorted(loaded.vms) == ["db-1", "web-1"]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=st.one_of(structured(), mutated()))
def test_validate_exits_0_or_1_and_prints_no_traceback(
    fuzz_root: Path, case: tuple[str | bytes, bool], capsys: pytest.CaptureFixture[str]
) -> None:
    data, surely_invalid = case
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    (fuzz_root / "vms.yaml").write_bytes(data)
    code, out, err = validate(fuzz_root / "vms.yaml", capsys)
    assert code in (0, 1)
    if surely_invalid:
        assert code == 1
    (err + out).encode("utf-8")


def test_random_bytes_never_raise(fuzz_root: Path) -> None:
    generator = random.Random(8)
    for _ in range(200):
        data = bytes(generator.randrange(256) for _ in range(generator.randrange(200)))
        check_property(fuzz_root, data, False)
        assert stat.S_ISREG((fuzz_root / "vms.yaml").stat().st_mode)


def test_a_bug_while_loading_one_file_breaks_that_file_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reconciler import desired

    real = desired._load_file

    def buggy(path: Path, data: bytes, context: dict[str, Any]) -> Any:
        if path.name == "bad.yaml":
            raise RuntimeError("a bug of ours")
        return real(path, data, context)

    monkeypatch.setattr(desired, "_load_file", buggy)
    (tmp_path / "bad.yaml").write_text("name: bad\n")
    (tmp_path / "good.yaml").write_text(f"name: good\nboot: {{kernel: {tmp_path / 'k'}}}\n")
    (tmp_path / "k").write_bytes(b"kernel")
    loaded = desired.load(tmp_path)
    assert [str(e) for e in loaded.errors] == [
        f"{tmp_path / 'bad.yaml'}:0: internal error reading this file: "
        "RuntimeError: a bug of ours"]
    assert list(loaded.vms) == ["good"]
