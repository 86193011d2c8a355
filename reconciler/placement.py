"""Which host each VM runs on (pure): the scheduler's decision, without etcd.

Every unplaced VM goes to a live host that fits its declared memory and vCPUs and
honours its `placement:` (a named host, labels the host must carry); among those, the
one with the fewest VMs of the same `spread` group, then the least loaded (the
largest share of memory left), then by name. VMs are taken biggest first within a
priority, so large ones are not left with only crumbs. A VM that fits nowhere is
unschedulable, with each host's reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Host:
    name: str
    memory: int  # MiB the host offers (its capacity minus --reserve)
    vcpus: int
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Want:
    """What placement needs to know of one declared VM."""

    name: str
    memory: int
    vcpus: int
    host: str | None = None  # placement.host
    labels: Mapping[str, str] = field(default_factory=dict)  # placement.labels
    spread: str | None = None  # placement.spread
    priority: int = 0


@dataclass
class _Load:
    memory: int = 0
    vcpus: int = 0
    groups: dict[str, int] = field(default_factory=dict)

    def add(self, want: Want) -> None:
        self.memory += want.memory
        self.vcpus += want.vcpus
        if want.spread:
            self.groups[want.spread] = self.groups.get(want.spread, 0) + 1


@dataclass(frozen=True)
class Decision:
    placed: dict[str, str]  # VM -> host, for the VMs placed by this decision
    unschedulable: dict[str, str]  # VM -> why no host takes it


def loads(wants: Mapping[str, Want], placed: Mapping[str, str]) -> dict[str, _Load]:
    found: dict[str, _Load] = {}
    for name, host in placed.items():
        if name in wants:
            found.setdefault(host, _Load()).add(wants[name])
    return found


def unfit(want: Want, host: Host) -> str | None:
    """Why want's placement: rules out host, whatever its load (None: they do not)."""
    if want.host is not None and want.host != host.name:
        return f"not {want.host}"
    for key, value in want.labels.items():
        if host.labels.get(key) != value:
            return f"no label {key}={value}"
    return None


def refusal(want: Want, host: Host, load: _Load) -> str | None:
    """Why host cannot take want (None: it can)."""
    if (why := unfit(want, host)) is not None:
        return why
    free_memory, free_vcpus = host.memory - load.memory, host.vcpus - load.vcpus
    if want.memory > free_memory:
        return f"{max(free_memory, 0)} MiB free, needs {want.memory}"
    if want.vcpus > free_vcpus:
        return f"{max(free_vcpus, 0)} vCPUs free, needs {want.vcpus}"
    return None


def place(wants: Sequence[Want], hosts: Sequence[Host], placed: Mapping[str, str]
          ) -> Decision:
    """Place every want not in `placed` (VM -> host, on live hosts) onto `hosts`."""
    by_name = {w.name: w for w in wants}
    load = loads(by_name, placed)
    decision = Decision({}, {})
    todo = sorted((w for w in wants if w.name not in placed),
                  key=lambda w: (-w.priority, -w.memory, -w.vcpus, w.name))
    for want in todo:
        reasons: list[str] = []
        best: tuple[tuple[int, float, str], Host] | None = None
        for host in hosts:
            here = load.setdefault(host.name, _Load())
            why = refusal(want, host, here)
            if why is not None:
                reasons.append(f"{host.name}: {why}")
                continue
            left = (host.memory - here.memory - want.memory) / max(host.memory, 1)
            rank = (here.groups.get(want.spread, 0) if want.spread else 0, -left, host.name)
            if best is None or rank < best[0]:
                best = (rank, host)
        if best is None:
            decision.unschedulable[want.name] = (
                "no live host fits: " + "; ".join(sorted(reasons)) if reasons
                else "no live host")
            continue
        decision.placed[want.name] = best[1].name
        load[best[1].name].add(want)
    return decision
