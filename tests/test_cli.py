"""The command line's contract: exit codes, messages, and no tracebacks for mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
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


def test_global_options_work_before_or_after_the_subcommand(
    tmp_path: Path, reconcile: Reconcile
) -> None:
    state = tmp_path / "elsewhere"
    for argv in (("--state-dir", state, "status", "--json"),
                 ("status", "--state-dir", state, "--json"),
                 ("status", "--json", f"--state-dir={state}")):
        run = reconcile(*argv)
        assert run.code == 0 and json.loads(run.out) is not None, run
    run = reconcile("--state-dir", state, "down")  # never a daemon watching "down"
    assert run.code == 0 and "watching" not in run.err, run
    (tmp_path / "a.yaml").write_text("name: a\nboot: {kernel: missing}\n")
    run = reconcile("--state-dir", state, "validate", tmp_path / "a.yaml")
    assert run.code == 1 and "boot.kernel: file not found" in run.err, run
    run = reconcile("validate", tmp_path / "a.yaml", "--state-dir", state, "-v")
    assert run.code == 1 and "boot.kernel: file not found" in run.err, run


def test_a_subcommand_is_never_read_as_a_manifest_path(
    tmp_path: Path, reconcile: Reconcile
) -> None:
    run = reconcile("--once", "status")
    assert run.code == 64 and "is a command, not a manifest path" in run.err
    assert "./status" in run.err


def test_an_unexpected_error_is_one_line_and_a_traceback_only_with_debug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from reconciler import cli

    def boom(args: object) -> int:
        raise RuntimeError("a bug of ours")

    monkeypatch.setattr(cli, "_schema", boom)
    with pytest.raises(SystemExit) as exited:
        cli.main(["schema"])
    err = capsys.readouterr().err
    assert exited.value.code == cli.EX_SOFTWARE
    assert err == ("reconcile: internal error: RuntimeError: a bug of ours "
                   "(run with --debug for the traceback)\n")
    with pytest.raises(SystemExit):
        cli.main(["schema", "--debug"])
    assert "Traceback" in capsys.readouterr().err


def test_a_directory_named_like_a_subcommand_is_reached_with_dot_slash(
    tmp_path: Path, state_dir: Path
) -> None:
    (tmp_path / "status").mkdir()
    (tmp_path / "status" / "a.yaml").write_text("name: a\nboot: {kernel: missing}\n")
    proc = subprocess.run([sys.executable, "-m", "reconciler", "--once", "--check",
                           "./status"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "RECONCILER_STATE_DIR": str(state_dir)})
    assert proc.returncode == 1 and "boot.kernel: file not found" in proc.stderr, proc


def test_an_existing_state_dir_keeps_its_own_mode(tmp_path: Path, reconcile: Reconcile
                                                  ) -> None:
    import stat

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o1777)
    (tmp_path / "a.yaml").write_text("name: a\nstate: stopped\nboot: {kernel: k}\n")
    (tmp_path / "k").write_text("kernel")
    run = reconcile("--once", tmp_path / "a.yaml", "--state-dir", shared)
    assert run.code == 0, run
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    # vms/ lists names (as `ps` shows them); each VM's own dir is closed (privsep)
    assert stat.S_IMODE((shared / "vms").stat().st_mode) == 0o755
