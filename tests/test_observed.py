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
    assert records == {"web": make_record(1, 2)} and problems == {}
    assert [p.name for p in (tmp_path / "vms" / "web").iterdir()] == ["record.json"]


def test_an_unreadable_record_is_reported_not_raised(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.write(make_record(1, 2))
    (tmp_path / "vms" / "web" / "record.json").write_text("{not json")
    records, problems = state.records()
    assert records == {}
    assert list(problems) == ["web"] and "unreadable record" in problems["web"]
    assert "left alone" in problems["web"]


def test_a_record_with_wrong_types_is_unreadable_not_trusted(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.write(make_record(1, 2))
    path = tmp_path / "vms" / "web" / "record.json"
    path.write_text(path.read_text().replace('"pid": 1', '"pid": "one"'))
    records, problems = state.records()
    assert records == {} and "pid" in problems["web"]


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


def test_an_intent_record_is_not_alive_and_has_no_pidfd() -> None:
    from reconciler.observed import open_pidfd

    intent = make_record(0, 0)
    assert intent.intent and not is_alive(intent) and open_pidfd(intent) is None


def test_a_pidfd_is_refused_for_a_reused_pid() -> None:
    from reconciler.observed import open_pidfd

    me, start = os.getpid(), process_start_time(os.getpid())
    assert start is not None
    fd = open_pidfd(make_record(me, start))
    assert fd is not None
    os.close(fd)
    assert open_pidfd(make_record(me, start + 1)) is None


def test_a_qemu_the_record_does_not_name_is_found_by_its_argv(tmp_path: Path) -> None:
    from reconciler.observed import find_qemu

    state = StateDir(tmp_path)
    paths = state.paths("web")
    paths.dir.mkdir(parents=True)
    # Anything with the VM's -name and QMP socket in its argv (here: a sleeping python).
    argv = [sys.executable, "-c", "import time; time.sleep(30)", "-name", "guest=web",
            "-chardev", f"socket,id=qmp,path={paths.qmp},server=on,wait=off"]
    other = [sys.executable, "-c", "import time; time.sleep(30)", "-name", "guest=db",
             "-chardev", f"socket,id=qmp,path={state.paths('db').qmp},server=on,wait=off"]
    assert find_qemu(paths) is None
    with subprocess.Popen(argv) as proc, subprocess.Popen(other) as decoy:
        try:
            found = find_qemu(paths)
            assert found is not None and found[0] == proc.pid
            assert found[1] == process_start_time(proc.pid)
        finally:
            proc.kill()
            decoy.kill()


def test_forget_removes_only_runtime_files_and_keeps_a_disk(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    state.write(make_record(1, 2))
    vm_dir = tmp_path / "vms" / "web"
    (vm_dir / "serial.log").write_text("console")
    (vm_dir / "disk.qcow2").write_text("precious")  # manifests refuse this; still kept
    state.forget("web")
    assert [p.name for p in vm_dir.iterdir()] == ["disk.qcow2"]
