"""The validation cache: a hit is exactly what validating again would give, and
anything validation reads that changes (a manifest, a kernel file going away, a
symlink, this package) is a miss, never a stale answer; a seed's secrets are never
cached."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler import desired, manifests, valcache
from reconciler.declared import Frozen

MANIFEST = """\
name: web-1
memory: 128M
boot: {kernel: vmlinuz}
disks: [{path: disks/web.img, size: 8M}]
"""
SEEDED = """\
name: web-2
boot: {kernel: vmlinuz}
cloud_init: {user_data_file: user-data}
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "manifests"
    (root / "disks").mkdir(parents=True)
    (root / "vmlinuz").write_bytes(b"kernel")
    (root / "user-data").write_text("#cloud-config\nhostname: one\n")
    (root / "vms.yaml").write_text(MANIFEST)
    return root


class Counted:
    """desired._load, counting its calls: a hit does not call it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = desired._load

        def counted(*args: object, **kwargs: object) -> desired.Manifests:
            self.calls += 1
            return real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(desired, "_load", counted)


def load(root: Path, cache: Path) -> desired.Manifests:
    if not cache.parent.exists():
        cache.parent.mkdir()  # the state dir
    return manifests.load(root, state_dir=cache.parent, cache_dir=cache)


def assert_same(model: object, frozen: object) -> None:
    """Every field and property of model, recursively, is the frozen copy's too."""
    assert isinstance(frozen, Frozen)
    kind = type(model)
    names = [*kind.model_fields, *(n for c in kind.__mro__  # type: ignore[attr-defined]
                                   if c.__module__ == "reconciler.desired"
                                   for n, a in vars(c).items() if isinstance(a, property))]
    for name in names:
        mine, theirs = getattr(model, name), getattr(frozen, name)
        if isinstance(theirs, Frozen):
            assert_same(mine, theirs)
        elif isinstance(theirs, list):
            assert len(mine) == len(theirs), name
            for a, b in zip(mine, theirs, strict=True):
                if isinstance(b, Frozen):
                    assert_same(a, b)
                else:
                    assert a == b and type(a) is type(b), name
        else:
            assert mine == theirs and type(mine) is type(theirs), name


def test_a_hit_is_what_validating_gives_and_skips_validation(
        tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "state" / "cache"
    counted = Counted(monkeypatch)
    first = load(tree, cache)
    second = load(tree, cache)
    assert counted.calls == 1
    assert first.errors == second.errors == []
    one, two = first.vms["web-1"], second.vms["web-1"]
    assert (one.file, one.line) == (two.file, two.line)
    assert isinstance(two.vm, Frozen) and not isinstance(one.vm, Frozen)
    assert one.vm.spec() == two.vm.spec()
    assert one.vm.spec_hash() == two.vm.spec_hash()
    assert one.vm.hardware() == two.vm.hardware()
    assert two.vm.disks[0].real_path == one.vm.disks[0].real_path
    assert_same(one.vm, two.vm)
    assert two.vm.model_dump() == one.vm.model_dump()  # not kept: the model's own answer
    assert oct(cache.stat().st_mode & 0o777) == "0o700"
    assert [oct(p.stat().st_mode & 0o777) for p in cache.iterdir()] == ["0o600"]


@pytest.mark.parametrize("change", [
    "manifest", "kernel gone", "kernel a directory", "disk dir gone",
    "disk dir a symlink elsewhere", "package", "manifest added", "allow-dir"])
def test_whatever_validation_read_changes_is_a_miss(
        tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    cache = tmp_path / "state" / "cache"
    counted = Counted(monkeypatch)
    allow: list[Path] = []
    load(tree, cache)
    if change == "manifest":
        (tree / "vms.yaml").write_text(MANIFEST.replace("128M", "129M"))
    elif change == "kernel gone":
        (tree / "vmlinuz").unlink()
    elif change == "kernel a directory":
        (tree / "vmlinuz").unlink()
        (tree / "vmlinuz").mkdir()
    elif change == "disk dir gone":
        (tree / "disks").rmdir()
    elif change == "disk dir a symlink elsewhere":
        (tree / "disks").rmdir()
        (tmp_path / "elsewhere").mkdir()
        (tree / "disks").symlink_to(tmp_path / "elsewhere")
    elif change == "package":
        real = valcache.package_stamp
        monkeypatch.setattr(valcache, "package_stamp",
                            lambda: [*real(), ("new.py", 1, 1)])
    elif change == "manifest added":
        (tree / "more.yaml").write_text("name: web-2\nboot: {kernel: vmlinuz}\n")
    elif change == "allow-dir":
        allow = [tmp_path / "elsewhere"]
        allow[0].mkdir()
    again = manifests.load(tree, state_dir=cache.parent, cache_dir=cache, allow_dirs=allow)
    fresh = desired.load(tree, state_dir=cache.parent, allow_dirs=allow)
    assert counted.calls == 3, "the change was not noticed: the cache answered"
    assert [str(e) for e in again.errors] == [str(e) for e in fresh.errors]
    assert {n: d.vm.spec() for n, d in again.vms.items()} == \
        {n: d.vm.spec() for n, d in fresh.vms.items()}
    if change in ("kernel gone", "kernel a directory", "disk dir gone", "allow-dir"):
        assert again.errors and not again.vms  # the error shows, as without a cache


def test_manifests_with_a_seed_are_not_cached_its_secrets_stay_out(
        tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hunter2-not-in-the-cache"
    (tree / "user-data").write_text(f"#cloud-config\npassword: {secret}\n")
    (tree / "seeded.yaml").write_text(SEEDED)
    cache = tmp_path / "state" / "cache"
    counted = Counted(monkeypatch)
    first, second = load(tree, cache), load(tree, cache)
    assert counted.calls == 2  # validated each time
    assert second.vms["web-2"].vm.cloud_init is not None
    assert secret in second.vms["web-2"].vm.cloud_init.texts()["user_data"]
    assert first.errors == second.errors == []
    for path in tmp_path.joinpath("state").rglob("*"):
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path


def test_an_entry_that_is_corrupt_or_writable_by_others_is_ignored(
        tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "state" / "cache"
    counted = Counted(monkeypatch)
    load(tree, cache)
    (entry,) = cache.iterdir()
    entry.chmod(0o622)
    assert load(tree, cache).vms and counted.calls == 2
    entry.write_bytes(entry.read_bytes()[:50])  # truncated
    assert load(tree, cache).vms and counted.calls == 3
    entry.write_bytes(b"not a pickle at all")
    assert load(tree, cache).vms and counted.calls == 4
    assert load(tree, cache).vms and counted.calls == 4  # rewritten, and a hit again


def test_an_unwritable_cache_dir_only_means_no_cache(
        tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "state"
    blocked.write_text("a file where the state dir's cache would go")
    counted = Counted(monkeypatch)
    assert load(tree, blocked / "cache").vms
    assert load(tree, blocked / "cache").vms
    assert counted.calls == 2


def test_a_noop_once_from_the_cache_imports_neither_pydantic_nor_yaml(
        tree: Path, tmp_path: Path) -> None:
    """What makes the cached no-op fast, checked without timing it: the run that finds
    its manifests in the cache never imports pydantic, PyYAML or the models (a record
    read back is built without pydantic too), nor does one that misses (the validator
    child validates), even when the cache cannot be written; unless the validator dies
    before it sends its result."""
    state = tmp_path / "state"
    (tree / "vms.yaml").write_text(MANIFEST.replace("name: web-1", "name: web-1\nstate: stopped"))
    script = (
        "import sys\n"
        "from reconciler.cli import main\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('imported:', sorted(m for m, module in sys.modules.items() if "
        "(m.split('.')[0] in ('pydantic', 'pydantic_core', 'yaml') or m == 'reconciler.desired')"
        " and getattr(module, '__file__', None)))\n")  # not the plugin loader cli stands in
    argv = [sys.executable, "-c", script, "--once", str(tree), "--state-dir", str(state)]
    blocked = [*argv[:-1], str(tmp_path / "blocked")]
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "cache").write_text("no cache here")
    uncached = subprocess.run(blocked, capture_output=True, text=True, timeout=60)
    assert "recap: 1 ok" in uncached.stdout, uncached.stdout + uncached.stderr
    assert "imported: []" in uncached.stdout  # the validator's result, not kept
    assert (tmp_path / "blocked" / "cache").read_text() == "no cache here"
    died = subprocess.run(blocked, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RECONCILER_FAULT": "mid-validation"})
    assert "recap: 1 ok" in died.stdout, died.stdout + died.stderr
    assert "'pydantic'" in died.stdout.rpartition("imported:")[2]  # validating needs it
    assert "'yaml'" in died.stdout.rpartition("imported:")[2]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    second = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert "recap: 1 ok" in first.stdout, first.stdout + first.stderr
    assert "imported: []" in first.stdout  # a miss: validated by the validator
    assert "recap: 1 ok" in second.stdout, second.stdout + second.stderr
    assert "imported: []" in second.stdout  # a hit


def _ahead_then_load(tree: Path, state: Path, *, fault: str = "", early: bool = True
                     ) -> subprocess.CompletedProcess[str]:
    """A validator started first (early) or by manifests.ahead, then load, in a
    process of their own: what the process imported and what it loaded."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from reconciler import validator\n"
        f"child = validator.start() if {early} else None\n"
        "from reconciler import manifests\n"
        "from reconciler.observed import StateDir\n"
        "tree, state = Path(sys.argv[1]), StateDir(Path(sys.argv[2]))\n"
        "with manifests.ahead(tree, validator=child, start=validator.start,\n"
        "                     state_dir=state.root, cache_dir=state.cache_dir):\n"
        "    with state.locked():  # taken while the child validates\n"
        "        got = manifests.load(tree, state_dir=state.root, cache_dir=state.cache_dir)\n"
        "print('pydantic:', 'pydantic' in sys.modules)\n"
        "print('errors:', [str(e) for e in got.errors])\n"
        "print('specs:', sorted((n, d.vm.spec_hash()) for n, d in got.vms.items()))\n")
    env = {**os.environ, "RECONCILER_FAULT": fault} if fault else None
    return subprocess.run([sys.executable, "-c", script, str(tree), str(state)],
                          capture_output=True, text=True, timeout=60, env=env)


def test_a_miss_validated_by_the_validator_is_what_validating_gives(
        tree: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    expected = desired.load(tree, state_dir=state)
    specs = sorted((n, d.vm.spec_hash()) for n, d in expected.vms.items())
    out = _ahead_then_load(tree, state)
    assert out.returncode == 0, out.stderr
    assert "pydantic: False" in out.stdout  # the child validated, the parent did not
    assert f"specs: {specs}" in out.stdout and "errors: []" in out.stdout
    assert list((state / "cache").glob("manifests-*.pickle"))  # the parent kept it
    (tree / "vms.yaml").write_text(MANIFEST.replace("boot: {kernel: vmlinuz}",
                                                    "boot: {kernel: nowhere}"))
    out = _ahead_then_load(tree, state, early=False)  # a miss: ahead forks one
    assert "pydantic: False" in out.stdout and "specs: []" in out.stdout
    assert "file not found" in out.stdout  # the error, as validating gives it


def test_when_the_validator_has_no_result_the_parent_validates(
        tree: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    out = _ahead_then_load(tree, state, fault="mid-validation")  # it died first
    assert out.returncode == 0, out.stderr
    assert "pydantic: True" in out.stdout and "('web-1'," in out.stdout
    (tree / "seeded.yaml").write_text(SEEDED)  # not cached (secrets): no job at all
    for entry in (state / "cache").iterdir():
        entry.unlink()
    out = _ahead_then_load(tree, state)
    assert "pydantic: True" in out.stdout and "('web-2'," in out.stdout
    assert not list((state / "cache").iterdir())


def _ours(marker: str) -> list[str]:
    """The processes (zombies too) whose command line holds marker."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_text():
                found.append(f"{proc.name}: {(proc / 'stat').read_text().split()[2]}")
        except OSError:
            continue
    return found


def test_the_validator_never_outlives_the_command(tree: Path, tmp_path: Path) -> None:
    """`--once` forks the validator before it parses its arguments: whatever the run
    ends in (a usage error, a state dir it cannot use, a hit, a miss, manifests with
    errors), the child is gone (killed or ended, and reaped) when the command is."""
    state = tmp_path / "s"
    (tree / "vms.yaml").write_text(MANIFEST.replace("name: web-1", "name: web-1\nstate: stopped"))
    base = [sys.executable, "-m", "reconciler.cli", "--state-dir", str(state)]
    too_long = [*base[:-1], str(state / ("x" * 100)), "--once", str(tree)]
    runs = [([*base, "--once", "--no-such-option", str(tree)], 64),
            (too_long, 1),  # given its job, then the state dir is refused
            ([*base, "--once", str(tree)], 0),  # a miss: validated by the child
            ([*base, "--once", str(tree)], 0),  # a hit: the child is sent away
            ([*base, "--check", str(tree / "vms.yaml")], 0)]
    for argv, code in runs:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == code, out.stdout + out.stderr
        assert _ours(str(state)) == [], argv
    (tree / "vms.yaml").write_text("name: [oops\n")
    out = subprocess.run([*base, "--once", str(tree)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "vms.yaml:2: YAML syntax error" in out.stderr
    assert _ours(str(state)) == []


def test_pydantic_finds_no_plugins_either_way() -> None:
    """The command stands in for pydantic's plugin loader when the environment turns
    plugins off (it would import importlib.metadata only to find none). The real one,
    told the same, finds none too; pydantic still takes get_plugins from it (if not,
    the stand-in is inert, and this fails); a validation with the stand-in imports no
    importlib.metadata; a variable naming plugins leaves pydantic's own loader."""
    script = (
        "import inspect, os, sys\n"
        "from reconciler import cli\n"
        "cli._no_pydantic_plugins()\n"
        "stand_in = sys.modules.get(cli.PYDANTIC_PLUGIN_LOADER)\n"
        "print('stand-in:', stand_in is not None and tuple(stand_in.get_plugins()))\n"
        "from reconciler import desired\n"
        "desired.VM.model_validate({'name': 'a', 'boot': {'kernel': '/bin/sh'}})\n"
        "print('metadata:', 'importlib.metadata' in sys.modules)\n"
        "del sys.modules[cli.PYDANTIC_PLUGIN_LOADER]\n"
        "from pydantic.plugin import _loader, _schema_validator\n"
        "print('real:', tuple(_loader.get_plugins()))\n"
        "print('taken:', 'from ._loader import get_plugins' in "
        "inspect.getsource(_schema_validator.create_schema_validator))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.stdout.split("\n")[:4] == ["stand-in: ()", "metadata: False", "real: ()",
                                          "taken: True"], out.stdout + out.stderr
    named = subprocess.run(
        [sys.executable, "-c", "import sys; from reconciler import cli; "
         "cli._no_pydantic_plugins(); print(cli.PYDANTIC_PLUGIN_LOADER in sys.modules)"],
        capture_output=True, text=True, timeout=60,
        env={**env, "PYDANTIC_DISABLE_PLUGINS": "some_plugin"})
    assert named.stdout.strip() == "False", named.stdout + named.stderr


def test_the_validator_starts_first_only_where_the_state_dir_has_no_cache(
        tmp_path: Path) -> None:
    """Forked before the arguments are parsed only for a pass on a state dir without
    any validated manifests (a hit is likely elsewhere, and a child forked for nothing
    costs a hit more than it saves a miss): the state dir found as argparse would."""
    from reconciler import cli

    state = tmp_path / "state"
    for argv in (["--once", "m", "--state-dir", str(state)],
                 ["--check", f"--state-dir={state}", "m"]):
        child = cli._validator_for(argv)
        assert child is not None, argv
        child.dismiss()
    assert cli._validator_for(["m", "--state-dir", str(state)]) is None  # the daemon
    assert cli._validator_for(["ssh", "vm", "--", "--once"]) is None
    (state / "cache").mkdir(parents=True)
    (state / "cache" / "manifests-0123.pickle").write_bytes(b"")
    assert cli._validator_for(["--once", "m", "--state-dir", str(state)]) is None
