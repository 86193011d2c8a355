"""The scheduler's decision (pure): fits, honours placement:, spreads, explains."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.placement import Host, Want, place

HOSTS = [Host("small", 512, 2), Host("big", 2048, 4, {"zone": "b"}),
         Host("mid", 1024, 2, {"zone": "a", "ssd": "yes"})]


def test_each_vm_goes_where_it_fits_least_loaded_first() -> None:
    wants = [Want(f"v{i}", 256, 1) for i in range(6)]
    decision = place(wants, HOSTS, {})
    assert decision.unschedulable == {}
    counts = {h.name: list(decision.placed.values()).count(h.name) for h in HOSTS}
    # By the share of memory left; big runs out of vCPUs (4) first.
    assert counts == {"big": 4, "mid": 2, "small": 0}


def test_placement_host_and_labels_are_honoured() -> None:
    wants = [Want("pinned", 128, 1, host="small"), Want("ssd", 128, 1, labels={"ssd": "yes"}),
             Want("zone-b", 128, 1, labels={"zone": "b"})]
    assert place(wants, HOSTS, {}).placed == {"pinned": "small", "ssd": "mid",
                                              "zone-b": "big"}


def test_a_spread_group_lands_on_different_hosts_before_doubling_up() -> None:
    wants = [Want(f"web-{i}", 128, 1, spread="web") for i in range(3)]
    assert sorted(place(wants, HOSTS, {}).placed.values()) == ["big", "mid", "small"]


def test_what_is_placed_already_counts_and_stays() -> None:
    wants = [Want("old", 2000, 1), Want("new", 256, 1)]
    decision = place(wants, HOSTS, {"old": "big"})
    assert decision.placed == {"new": "mid"}  # big has 48 MiB left


def test_a_vm_that_fits_nowhere_says_why_for_each_host() -> None:
    decision = place([Want("huge", 4096, 1), Want("nowhere", 64, 1, host="gone")], HOSTS, {})
    assert decision.placed == {}
    assert decision.unschedulable["huge"] == (
        "no live host fits: big: 2048 MiB free, needs 4096; mid: 1024 MiB free, needs "
        "4096; small: 512 MiB free, needs 4096")
    assert "small: not gone" in decision.unschedulable["nowhere"]
    assert place([Want("any", 64, 1)], [], {}).unschedulable == {"any": "no live host"}


def test_higher_priority_is_placed_first_when_room_is_short() -> None:
    hosts = [Host("one", 512, 4)]
    wants = [Want("low", 512, 1, priority=0), Want("high", 512, 1, priority=10)]
    decision = place(wants, hosts, {})
    assert decision.placed == {"high": "one"} and "low" in decision.unschedulable


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 1500), st.integers(1, 3)), max_size=30),
       st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 6)), min_size=1, max_size=6))
def test_no_host_is_ever_given_more_than_it_offers(
        vms: list[tuple[int, int]], offers: list[tuple[int, int]]) -> None:
    hosts = [Host(f"h{i}", memory, vcpus) for i, (memory, vcpus) in enumerate(offers)]
    wants = [Want(f"v{i}", memory, vcpus) for i, (memory, vcpus) in enumerate(vms)]
    decision = place(wants, hosts, {})
    assert set(decision.placed) | set(decision.unschedulable) == {w.name for w in wants}
    for host in hosts:
        mine = [w for w in wants if decision.placed.get(w.name) == host.name]
        assert sum(w.memory for w in mine) <= host.memory
        assert sum(w.vcpus for w in mine) <= host.vcpus
