"""Staggered starts and priorities (vm.conf's `staggered start parallel N delay S`,
Incus's autostart priority): higher priority first, a group that declares `ready`
waited for, launches `--stagger` seconds apart; the same from a `kind: Settings`."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Run, record, vm_manifest
from test_desired import tree, write

from reconciler import desired

__all__ = ["tree"]
Reconcile = Callable[..., Run]


def test_settings_are_read_once_per_directory(tree: Path) -> None:
    write(tree, "settings.yaml", "kind: Settings\nparallel: 2\nstagger: 1.5s\n")
    loaded = desired.load(tree)
    assert loaded.errors == [] and loaded.settings is not None
    assert (loaded.settings.parallel, loaded.settings.stagger) == (2, 1.5)
    second = write(tree, "zz-more.yaml", "kind: Settings\nparallel: 3\n")
    found = [str(e) for e in desired.load(tree).errors]
    assert found == [f"{second}:1: a second kind: Settings (the first is in "
                     f"{tree / 'settings.yaml'}:1); one per directory"], found
    second.unlink()
    bad = write(tree, "settings.yaml", "kind: Settings\nparallel: 0\nwhat: 1\n")
    found = [str(e) for e in desired.load(tree).errors]
    assert any(e.startswith(f"{bad}:2: ") and "parallel" in e for e in found), found
    assert any(e.startswith(f"{bad}:3: ") and "unknown field 'what'" in e for e in found)
    assert desired.load(tree).settings is None  # a broken Settings is not applied


@pytest.mark.qemu
@pytest.mark.parametrize("how", ["flags", "settings"])
def test_starts_follow_priority_one_at_a_time_two_seconds_apart(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile, how: str,
) -> None:
    manifests = tmp_path / "vms"
    manifests.mkdir()
    priorities = {"p-low": -1, "p-top": 5, "p-mid": 2, "p-none": 0}
    for name, priority in priorities.items():
        extra = {"ready": "{serial: 'up uptime'}"} if name == "p-top" else {}
        (manifests / f"{name}.yaml").write_text(
            vm_manifest(name, guest, priority=str(priority), **extra))
    if how == "settings":
        (manifests / "settings.yaml").write_text("kind: Settings\nparallel: 1\nstagger: 2s\n")
        reconcile("--once", manifests, check=0)
    else:
        reconcile("--once", "--parallel", "1", "--stagger", "2", manifests, check=0)
    started = {n: float(record(state_dir, n)["started_at"]) for n in priorities}  # type: ignore[arg-type]
    order = sorted(started, key=started.__getitem__)
    assert order == ["p-top", "p-mid", "p-none", "p-low"], started
    gaps = [started[b] - started[a] for a, b in itertools.pairwise(order)]
    assert all(gap >= 2.0 for gap in gaps), gaps
    # p-top declares ready: the next group started only once it was ready
    ready_at = record(state_dir, "p-top")["ready_at"]
    assert isinstance(ready_at, float) and started["p-mid"] >= ready_at, (ready_at, started)
