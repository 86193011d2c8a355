"""The planner: the convergence table as data, and properties over random worlds."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.desired import VM, OnChange, State
from reconciler.observed import ObservedVM, Record, Status
from reconciler.plan import FREEING, Action, Kind, plan, spec_changes

KERNEL = Path(tempfile.mkdtemp(prefix="reconciler-plan-")) / "vmlinuz"
KERNEL.write_bytes(b"kernel")


def vm(name: str = "web", **fields: object) -> VM:
    return VM.model_validate({"name": name, "boot": {"kernel": str(KERNEL)}, **fields})


def seen(spec: VM, status: Status = Status.RUNNING) -> ObservedVM:
    record = Record(
        name=spec.name, spec=spec.model_dump(mode="json"), spec_hash=spec.spec_hash(),
        source="vms.yaml", pid=100, start_time=1, started_at=0.0, accel="tcg",
    )
    return ObservedVM(spec.name, status, record)


def one(desired: VM | None, observed: ObservedVM | None, *, prune: bool = True) -> Action:
    d = {desired.name: desired} if desired else {}
    o = {observed.name: observed} if observed else {}
    (action,) = plan(d, o, prune=prune)
    return action


# --- the table, one row per test ----------------------------------------------

def test_a_declared_vm_that_is_absent_is_started() -> None:
    assert one(vm(), None) == Action(Kind.START, "web", "not running")


def test_a_declared_paused_vm_that_is_absent_is_started_paused() -> None:
    assert one(vm(state="paused"), None) == Action(
        Kind.START, "web", "not running; starting paused")


def test_an_exited_vm_is_started_again() -> None:
    assert one(vm(), seen(vm(), Status.EXITED)).kind is Kind.START


def test_a_running_vm_with_the_same_spec_needs_nothing_and_says_why() -> None:
    assert one(vm(), seen(vm())) == Action(Kind.NONE, "web", "running as desired")


def test_a_spec_change_restarts_and_names_the_change() -> None:
    action = one(vm(memory="512M"), seen(vm(memory="256M")))
    assert action == Action(Kind.RESTART, "web", "spec changed: memory: 256M -> 512M")


def test_a_spec_change_with_on_change_defer_is_only_reported() -> None:
    action = one(vm(memory="512M", on_change="defer"), seen(vm()))
    assert action == Action(
        Kind.NONE, "web", "restart required (memory: 256M -> 512M); on_change: defer")


def test_label_and_policy_changes_do_not_restart() -> None:
    action = one(vm(labels={"a": "b"}, restart="never", stop_timeout="5s"), seen(vm()))
    assert action.kind is Kind.NONE


def test_paused_but_declared_running_is_unpaused() -> None:
    assert one(vm(), seen(vm(), Status.PAUSED)).kind is Kind.UNPAUSE


def test_running_but_declared_paused_is_paused() -> None:
    assert one(vm(state="paused"), seen(vm())).kind is Kind.PAUSE


def test_declared_stopped_terminates_running_and_paused_vms() -> None:
    assert one(vm(state="stopped"), seen(vm())).kind is Kind.TERMINATE
    assert one(vm(state="stopped"), seen(vm(), Status.PAUSED)).kind is Kind.TERMINATE
    assert one(vm(state="stopped"), seen(vm(), Status.EXITED)) == Action(
        Kind.NONE, "web", "stopped as desired")


def test_an_undeclared_vm_is_pruned_and_an_exited_one_forgotten() -> None:
    assert one(None, seen(vm())) == Action(Kind.TERMINATE, "web", "no longer declared")
    assert one(None, seen(vm(), Status.EXITED)).kind is Kind.FORGET


def test_nothing_is_pruned_while_manifests_have_errors() -> None:
    action = one(None, seen(vm()), prune=False)
    assert action == Action(
        Kind.NONE, "web", "not declared, left as it is: manifests have errors")


def test_terminations_come_before_starts_then_by_name() -> None:
    desired = {"b": vm("b"), "a": vm("a"), "c": vm("c", memory="1G")}
    observed = {"z": seen(vm("z")), "y": seen(vm("y")), "c": seen(vm("c"))}
    kinds = [(a.kind, a.vm) for a in plan(desired, observed)]
    assert kinds == [
        (Kind.TERMINATE, "y"), (Kind.TERMINATE, "z"), (Kind.RESTART, "c"),
        (Kind.START, "a"), (Kind.START, "b"),
    ]


def test_spec_changes_walk_nested_fields() -> None:
    old = {"memory": 1, "boot": {"kernel": "/a", "cmdline": ""}}
    new = {"memory": 1, "boot": {"kernel": "/b", "cmdline": "x"}}
    assert spec_changes(old, new) == ['boot.cmdline: "" -> x', "boot.kernel: /a -> /b"]


# --- properties ---------------------------------------------------------------

names = st.sampled_from(["a", "b", "c", "d", "e"])
specs = st.builds(
    lambda state, memory, on_change: {"state": state, "memory": memory, "on_change": on_change},
    st.sampled_from(list(State)), st.sampled_from([64, 128]), st.sampled_from(list(OnChange)),
)
desired_worlds = st.dictionaries(names, specs).map(
    lambda d: {name: vm(name, **fields) for name, fields in d.items()})
observed_worlds = st.dictionaries(
    names, st.tuples(st.sampled_from(list(Status)), st.sampled_from([64, 128]))
).map(lambda d: {n: seen(vm(n, memory=m), s) for n, (s, m) in d.items()})


def apply_fake(desired: Mapping[str, VM], world: dict[str, ObservedVM],
               actions: list[Action]) -> dict[str, ObservedVM]:
    """What each action does to a world, with no QEMU behind it."""
    world = dict(world)
    for action in actions:
        name, spec = action.vm, desired.get(action.vm)
        if action.kind in (Kind.START, Kind.RESTART):
            assert spec is not None
            status = Status.PAUSED if spec.state is State.PAUSED else Status.RUNNING
            world[name] = seen(spec, status)
        elif action.kind is Kind.TERMINATE and spec is not None:
            world[name] = seen(spec, Status.EXITED)
        elif action.kind in (Kind.TERMINATE, Kind.FORGET):
            del world[name]
        elif action.kind is Kind.SAVE:
            world[name] = ObservedVM(name, Status.SAVED, world[name].record)
        elif action.kind is Kind.RESTORE:
            assert spec is not None
            status = Status.PAUSED if spec.state is State.PAUSED else Status.RUNNING
            world[name] = ObservedVM(name, status, world[name].record)
        elif action.kind is Kind.PAUSE:
            world[name] = ObservedVM(name, Status.PAUSED, world[name].record)
        elif action.kind is Kind.UNPAUSE:
            world[name] = ObservedVM(name, Status.RUNNING, world[name].record)
    return world


def converged(desired: Mapping[str, VM]) -> dict[str, ObservedVM]:
    status = {State.RUNNING: Status.RUNNING, State.PAUSED: Status.PAUSED,
              State.STOPPED: Status.EXITED, State.SAVED: Status.SAVED}
    return {n: seen(v, status[v.state]) for n, v in desired.items()}


@settings(max_examples=300, deadline=None)
@given(desired_worlds)
def test_on_a_converged_world_the_plan_changes_nothing(desired: dict[str, VM]) -> None:
    assert [a for a in plan(desired, converged(desired)) if a.changes] == []


@settings(max_examples=300, deadline=None)
@given(desired_worlds, observed_worlds)
def test_applying_a_plan_converges_a_world_in_one_pass(
    desired: dict[str, VM], observed: dict[str, ObservedVM]
) -> None:
    after = apply_fake(desired, observed, plan(desired, observed))
    assert [a for a in plan(desired, after) if a.changes] == []


@settings(max_examples=300, deadline=None)
@given(desired_worlds, observed_worlds, st.booleans())
def test_a_plan_has_one_action_per_vm_and_never_starts_and_terminates_one(
    desired: dict[str, VM], observed: dict[str, ObservedVM], prune: bool
) -> None:
    actions = plan(desired, observed, prune=prune)
    assert sorted(a.vm for a in actions) == sorted(desired.keys() | observed.keys())
    assert all(a.reason for a in actions)
    if not prune:
        assert not any(a.kind in (Kind.TERMINATE, Kind.FORGET) and a.vm not in desired
                       for a in actions)
    kinds = [a.kind for a in actions]
    last_free = max((i for i, k in enumerate(kinds) if k in FREEING), default=-1)
    assert all(i > last_free for i, k in enumerate(kinds) if k in (Kind.START, Kind.RESTORE))


def test_save_and_restore_rows() -> None:
    saved = seen(vm(), Status.SAVED)
    assert one(vm(state="saved"), seen(vm())).kind is Kind.SAVE
    assert one(vm(state="saved"), seen(vm(), Status.PAUSED)).kind is Kind.SAVE
    assert one(vm(state="saved"), saved) == Action(Kind.NONE, "web", "saved as desired")
    assert one(vm(), saved) == Action(Kind.RESTORE, "web", "saved but declared running")
    assert one(vm(state="paused"), saved).kind is Kind.RESTORE
    assert one(vm(state="stopped"), saved).kind is Kind.NONE  # the saved state is kept
    assert one(vm(state="saved"), None) == Action(
        Kind.NONE, "web", "not running: nothing to save")
    assert one(None, saved).kind is Kind.FORGET


def test_a_spec_change_while_saved_restarts_afresh_or_with_defer_restores() -> None:
    saved = seen(vm(), Status.SAVED)
    restart = one(vm(memory="512M"), saved)
    assert restart == Action(Kind.RESTART, "web", "spec changed while saved: memory: 256M -> "
                             "512M; restoring it to shut it down cleanly")
    assert one(vm(memory="512M", on_change="defer"), saved).kind is Kind.RESTORE


def test_vms_kept_by_the_caller_are_never_pruned() -> None:
    (action,) = plan({}, {"web": seen(vm())}, keep={"web": "declared elsewhere"})
    assert action == Action(Kind.NONE, "web", "declared elsewhere")


def test_two_paths_to_one_writable_disk_are_one_disk(tmp_path: Path) -> None:
    (tmp_path / "a.qcow2").write_bytes(b"")
    (tmp_path / "link.qcow2").symlink_to(tmp_path / "a.qcow2")
    a = vm("a", disks=[{"path": str(tmp_path / "a.qcow2")}])
    b = vm("b", disks=[{"path": str(tmp_path / "link.qcow2")}])
    c = vm("c", disks=[{"path": str(tmp_path / "a.qcow2"), "readonly": True}])
    d = vm("d", disks=[{"path": str(tmp_path / "link.qcow2"), "readonly": True}])
    actions = {x.vm: x for x in plan({"a": a, "b": b}, {})}
    assert actions["a"].problem and actions["b"].problem
    assert actions["a"].reason.startswith(f"disk {tmp_path / 'a.qcow2'} is also declared by "
                                          "vm 'b'")
    assert all(x.kind is Kind.START for x in plan({"c": c, "d": d}, {}))  # readers share


# --- safety rungs: unreadable records, silent QMP, failed restores -------------

def test_a_vm_whose_record_is_unreadable_is_held_declared_or_not() -> None:
    why = "vms/web/record.json: unreadable record; left alone"
    (action,) = plan({"web": vm()}, {}, hold={"web": why})
    assert action == Action(Kind.NONE, "web", why, problem=True)
    (action,) = plan({}, {}, hold={"web": why})
    assert action.kind is Kind.NONE and action.problem


def test_a_vm_whose_qmp_does_not_answer_is_a_problem_never_ok() -> None:
    from dataclasses import replace

    silent = replace(seen(vm()), qmp_answered=False, detail="QMP not answering: timed out")
    assert one(vm(), silent) == Action(Kind.NONE, "web", "QMP not answering: timed out",
                                       problem=True)
    # It can still be stopped: terminate falls back to quit and SIGKILL.
    assert one(vm(state="stopped"), silent).kind is Kind.TERMINATE


def test_an_unresponsive_vm_is_described_so() -> None:
    from dataclasses import replace

    from reconciler.plan import describe

    silent = replace(seen(vm()), qmp_answered=False, unresponsive=True)
    assert describe(silent, now=0.0) == "unresponsive"


def test_a_failed_restore_backs_off_and_keeps_its_file() -> None:
    from dataclasses import replace

    from reconciler.observed import Exit, ExitReason
    from reconciler.plan import RESTORE_BACKOFF_FIRST

    saved = seen(vm(), Status.SAVED)
    failed = Exit(ExitReason.CRASHED, "QEMU exited during restore", at=100.0)
    saved = replace(saved, record=replace(saved.record, exit=failed, saved="/s"))
    early = plan({"web": vm()}, {"web": saved}, now=101.0)[0]
    assert early.kind is Kind.NONE and early.problem
    assert early.retry_at == 100.0 + RESTORE_BACKOFF_FIRST and "retry in" in early.reason
    assert plan({"web": vm()}, {"web": saved}, now=106.0)[0].kind is Kind.RESTORE
    twice = replace(saved, record=replace(saved.record, backoff=1))
    assert plan({"web": vm()}, {"web": twice}, now=106.0)[0].kind is Kind.NONE
    # A save's own exit (asked for) is no failure: restored at once.
    asked = replace(saved, record=replace(saved.record, exit=replace(failed, requested=True)))
    assert plan({"web": vm()}, {"web": asked}, now=100.5)[0].kind is Kind.RESTORE


def test_a_deferred_change_on_a_silent_qemu_is_still_a_problem() -> None:
    from dataclasses import replace

    silent = replace(seen(vm(memory="256M")), qmp_answered=False, detail="QMP not answering")
    action = one(vm(memory="512M", on_change="defer"), silent)
    assert action.kind is Kind.NONE and action.problem and "QMP not answering" in action.reason


def test_an_interrupted_save_or_restore_is_never_acted_on_until_finished() -> None:
    from dataclasses import replace

    from reconciler.observed import Interrupted

    for state in ("running", "stopped", "paused"):
        half = replace(seen(vm(), Status.PAUSED), interrupted=Interrupted.RESTORE,
                       qmp_status="inmigrate")
        action = plan({"web": vm(state=state)}, {"web": half}, now=10.0)[0]
        assert action.kind is Kind.NONE and action.problem and action.retry_at == 11.0


def test_a_record_from_another_version_does_not_break_status() -> None:
    from dataclasses import replace

    from reconciler.observed import Exit, ExitReason
    from reconciler.plan import describe

    gone = seen(vm(), Status.EXITED)
    odd = replace(gone.record, spec={**gone.record.spec, "restart": "sometimes"})
    gone = replace(gone, record=odd, exit=Exit(ExitReason.CRASHED, "x", 1.0))
    assert describe(gone, now=100.0) == "exited"
