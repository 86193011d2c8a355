"""The state dir and liveness: records, locking, and pids that get reused."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.observed import (
    Exit,
    ExitReason,
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


# --- Reading records: built directly when exact, else by pydantic -------------------

_texts = st.text(max_size=8)
_floats = st.floats(allow_nan=False, allow_infinity=False)
_exits = st.builds(Exit, reason=st.sampled_from(list(ExitReason)), detail=_texts, at=_floats,
                   requested=st.booleans())
_records = st.builds(
    Record, name=_texts, spec=st.dictionaries(_texts, st.integers() | _texts, max_size=3),
    spec_hash=_texts, source=_texts, pid=st.integers(), start_time=st.integers(),
    started_at=_floats, accel=_texts, argv=st.lists(_texts, max_size=3),
    exit=st.none() | _exits, saved=st.none() | _texts, qmp_silent_since=st.none() | _floats,
    limits=st.none() | st.dictionaries(_texts, _texts, max_size=2),
    ready_passed=st.lists(_texts, max_size=2))
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | _floats | _texts,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_texts, kids, max_size=3),
    max_leaves=6)


def _by_pydantic(text: str) -> Record | str:
    from pydantic import TypeAdapter, ValidationError

    try:
        found: Record = TypeAdapter(Record).validate_json(text)
    except ValidationError:
        return "refused"
    return found


def _by_us(text: str) -> Record | str:
    try:
        return Record.from_json(text)
    except ValueError:  # pydantic's ValidationError is a ValueError
        return "refused"


@settings(max_examples=300, deadline=None)
@given(_records)
def test_a_record_as_written_reads_back_the_same_as_pydantic_reads_it(record: Record) -> None:
    text = record.to_json()
    assert _by_us(text) == _by_pydantic(text) == record


@settings(max_examples=300, deadline=None)
@given(_records, st.sampled_from([f.name for f in dataclasses.fields(Record)]) | _texts,
       _json_values | _exits.map(dataclasses.asdict) | st.just("__drop__"))
def test_a_changed_record_reads_as_pydantic_reads_it(record: Record, key: str,
                                                     value: object) -> None:
    """Whatever a record file holds: the same Record, or refused, as with pydantic."""
    data = dataclasses.asdict(record)
    if value == "__drop__":
        data.pop(key, None)
    else:
        data[key] = value
    text = json.dumps(data)
    assert _by_us(text) == _by_pydantic(text)


@pytest.mark.parametrize("change", ["nested 150", "nested 250", "nested 3000",
                                    "lone surrogate", "surrogate pair"])
def test_records_pydantic_refuses_are_refused(change: str, tmp_path: Path) -> None:
    """Deep nesting (pydantic's parser stops at 200 levels; json's at about 1000, with
    a RecursionError) and lone surrogates (from a file name that is not UTF-8): the
    same answer as pydantic's, and an unreadable record, never a crash of the pass."""
    data = dataclasses.asdict(make_record(1, 1))
    if change.startswith("nested"):
        depth = int(change.split()[1])
        text = json.dumps(data).replace('"spec": {', '"spec": {"x": ' + "[" * depth
                                        + "]" * depth + ", ", 1)
    else:
        data["source"] = "\udcff.yaml" if change == "lone surrogate" else "\U0001f600.yaml"
        text = json.dumps(data)
    assert _by_us(text) == _by_pydantic(text)
    state = StateDir(tmp_path / "state")
    (state.vms_dir / "web").mkdir(parents=True)
    (state.vms_dir / "web" / "record.json").write_text(text)
    found, problems = state.records()
    if _by_pydantic(text) == "refused":
        assert not found and "unreadable record" in problems["web"]
    else:
        assert found["web"] == _by_pydantic(text) and not problems
