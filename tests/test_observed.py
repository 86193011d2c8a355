"""The state dir and liveness: records, locking, and pids that get reused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.observed import (
    Record,
    StateDir,
    StateDirError,
    Status,
    is_alive,
    parse_proc_stat,
    process_start_time,
    status_from_qmp,
)


def make_record(pid: int, start_time: int, name: str = "web") -> Record:
    return Record(name=name, spec={"memory": 64}, spec_hash="h", source="a.yaml", pid=pid,
                  start_time=start_time, started_at=1.0, accel="tcg", argv=["qemu"])


def test_proc_stat_is_parsed_past_a_comm_with_spaces_and_parentheses() -> None:
    text = "42 (qemu (x) y) S 1 42 42 0 -1 4194560 " + " ".join(["0"] * 12) + " 987654 rest"
    assert parse_proc_stat(text) == ("S", 987654)


def test_a_live_process_is_alive_only_with_its_own_start_time() -> None:
    me = os.getpid()
    start = process_start_time(me)
    assert start is not None
    assert is_alive(make_record(me, start))
    assert not is_alive(make_record(me, start + 1))  # the same pid, reused by another process


def test_a_gone_process_is_not_alive() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert process_start_time(proc.pid) is None


def test_records_round_trip_atomically(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.write(make_record(1, 2))
    records, problems = state.records()
    assert records == {"web": make_record(1, 2)} and problems == []
    assert [p.name for p in (tmp_path / "vms" / "web").iterdir()] == ["record.json"]


def test_an_unreadable_record_is_reported_not_raised(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.write(make_record(1, 2))
    (tmp_path / "vms" / "web" / "record.json").write_text("{not json")
    records, problems = state.records()
    assert records == {}
    assert len(problems) == 1 and "unreadable record" in problems[0]


def test_one_reconciler_per_state_dir_and_the_message_names_the_holder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from reconciler.observed import StateDir\n"
         f"with StateDir(Path({str(tmp_path)!r})).locked():\n"
         "    print('locked', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        expected = f"in use by another reconciler \\(pid {holder.pid}\\)"
        with pytest.raises(StateDirError, match=expected), StateDir(tmp_path).locked():
            pass
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout:
            holder.stdout.close()
    with StateDir(tmp_path).locked():
        pass


def test_a_state_dir_too_long_for_sockets_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StateDirError, match="too long for the unix sockets"):
        StateDir(tmp_path / ("x" * 100))


def test_qmp_statuses_map_to_running_or_paused() -> None:
    assert status_from_qmp("running") is Status.RUNNING
    for status in ("paused", "prelaunch", "suspended"):
        assert status_from_qmp(status) is Status.PAUSED
