"""The command line's contract: exit codes, messages, and no tracebacks for mistakes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from conftest import Run

Reconcile = Callable[..., Run]


def test_wait_without_once_is_a_usage_error(tmp_path: Path, reconcile: Reconcile) -> None:
    run = reconcile("--wait", tmp_path)
    assert run.code == 64 and "--wait and --json go with --once" in run.err


def test_bad_usage_exits_64_not_2(reconcile: Reconcile) -> None:
    run = reconcile("--once", "--bogus", ".")
    assert run.code == 64 and "unrecognized arguments" in run.err


def test_a_missing_manifest_dir_fails_and_prunes_nothing(
    tmp_path: Path, reconcile: Reconcile
) -> None:
    run = reconcile("--once", tmp_path / "nope")
    assert run.code == 1
    assert f"{tmp_path / 'nope'}:0: no such file or directory" in run.err
    assert "Traceback" not in run.err


def test_an_empty_manifest_dir_is_an_error(tmp_path: Path, reconcile: Reconcile) -> None:
    run = reconcile("--once", "--check", tmp_path)
    assert run.code == 1 and "no *.yaml or *.yml manifests found" in run.err


def test_json_output_is_machine_readable(tmp_path: Path, reconcile: Reconcile) -> None:
    (tmp_path / "a.yaml").write_text("name: a\nboot: {kernel: missing}\n")
    run = reconcile("--once", "--check", "--json", tmp_path)
    assert run.code == 1
    out = json.loads(run.out)
    assert out["converged"] is False and out["results"] == []
    assert out["errors"] == [
        f"{tmp_path / 'a.yaml'}:2: vm 'a': boot.kernel: file not found: {tmp_path / 'missing'}"]


def test_status_of_an_empty_state_dir(reconcile: Reconcile) -> None:
    rows = json.loads(reconcile("status", "--json", check=0).out)
    assert all(row["managed"] is False for row in rows)


def test_schema_is_json_schema(reconcile: Reconcile) -> None:
    schema = json.loads(reconcile("schema", check=0).out)
    assert schema["title"] == "VM" and "memory" in schema["properties"]


def test_a_too_long_state_dir_is_a_message_not_a_traceback(
    tmp_path: Path, reconcile: Reconcile
) -> None:
    run = reconcile("status", "--state-dir", tmp_path / ("x" * 120))
    assert run.code == 1 and "too long for the unix sockets" in run.err
    assert "Traceback" not in run.err
