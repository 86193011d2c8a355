"""Many hosts on etcd: one desired state, hosts under leases, one scheduler at a time.

Keys, under the prefix (`/reconciler` by default):

  vms/<vm>            a pushed VM: its document (paths absolute) and where it was written
  push                the last push: commit, time, how many VMs
  hosts/<host>        a member: capacity and labels; under the member's lease
  scheduler           the member that places VMs; under its lease (the election)
  placement/<vm>      the host a VM runs on, written by the scheduler in a transaction
  unschedulable/<vm>  why no host takes it
  lost/<host>         when the scheduler saw that host's lease end
  status/<host>       what the member reports of its VMs; under its lease
  armed/<host>        the failover VMs that host's watchdog would kill (not under a lease)
  drain/<host>        `reconcile drain`: the host gets no VMs, and its VMs move away
  migration/<vm>      a live migration under way: where the target QEMU listens

A move (drain) is written by the scheduler as placement {host: SOURCE, to: TARGET,
mode}: `live` (a running VM whose disks are all shared, without NICs or seed: QMP
`migrate` to a QEMU the target started with `-incoming`) or `cold` (the source stops
it, then it starts on the target). The source flips the placement to the target only
once its own copy is stopped (cold) or the migration has completed (live; its QEMU
then only holds a stopped copy and is ended).

A member writes the VMs placed on it as manifest files into its state dir and runs the
ordinary daemon on them: one loop, one planner, whether the VMs come from a directory
or from etcd. Our promise: a VM never runs on two hosts. A member that cannot renew its
lease kills its failover VMs before the lease can run out (`Fence`, and the watchdog
process of `reconciler.fence`); the scheduler moves a VM only once the lease has ended
and --fence-grace has passed, only if that host had said it would fence this VM
(`armed/<host>`: a VM made failover while its host was unreachable is not moved), and
only in a transaction that checks the old host is still absent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from reconciler import desired as desired_mod
from reconciler import fence, kvm
from reconciler.desired import VM, Manifests
from reconciler.observed import Record, StateDir, atomic_write, is_alive
from reconciler.placement import Host, Want, place, unfit

log = logging.getLogger("reconciler")

DEFAULT_PREFIX = "/reconciler"


class ClusterError(Exception):
    """etcd cannot be reached or refused what was asked; the message says which."""


# --- the store -------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    value: dict[str, Any]
    mod_revision: int
    lease: int = 0


class Store:
    """etcd through its /v3 HTTP gateway (etcd3gw), JSON values under one prefix.

    Several URLs: the next one is tried when one cannot be reached."""

    def __init__(self, urls: Sequence[str], prefix: str = DEFAULT_PREFIX, *,
                 timeout: float = 5.0) -> None:
        import etcd3gw

        if not urls:
            raise ClusterError("--etcd needs at least one URL")
        self.urls = list(urls)
        self.prefix = "/" + prefix.strip("/")
        self.timeout = timeout
        self._clients = []
        for url in self.urls:
            parts = urlsplit(url if "://" in url else f"http://{url}")
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ClusterError(f"--etcd {url}: not an http(s)://HOST:PORT URL")
            self._clients.append(etcd3gw.Etcd3Client(
                host=parts.hostname, port=parts.port or 2379, protocol=parts.scheme,
                timeout=timeout, api_path="/v3/"))
        self._current = 0

    def key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    def _call(self, what: Callable[[Any], Any]) -> Any:
        from etcd3gw import exceptions

        errors = []
        for step in range(len(self._clients)):
            index = (self._current + step) % len(self._clients)
            try:
                found = what(self._clients[index])
            except (exceptions.ConnectionFailedError, exceptions.ConnectionTimeoutError) as err:
                errors.append(f"{self.urls[index]}: {_short(err)}")
                continue
            except exceptions.Etcd3Exception as err:
                raise ClusterError(f"etcd at {self.urls[index]}: {_short(err)}") from err
            self._current = index
            return found
        raise ClusterError("cannot reach etcd: " + "; ".join(errors))

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]) -> bool:
        return self.txn_rev(compare, success)[0]

    def txn_rev(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]
                ) -> tuple[bool, int]:
        """A transaction: whether it succeeded, and the store's revision after it."""
        found = self._call(lambda c: c.transaction(
            {"compare": compare, "success": success, "failure": []}))
        revision = int(found.get("header", {}).get("revision", 0))
        return bool(found.get("succeeded")), revision

    def range(self, part: str) -> tuple[dict[str, Entry], int]:
        """Every key under prefix/part (names relative to it), and the store's revision."""
        base = self.key(part)
        start = base.encode()
        end = _next(start)
        found = self._call(lambda c: c.post(c.get_url("/kv/range"), json={
            "key": _b64(start), "range_end": _b64(end)}))
        entries = {}
        for kv in found.get("kvs", []):
            entry = _entry(kv)
            if entry is not None:
                entries[_unb64(kv["key"]).decode()[len(base):]] = entry
        return entries, int(found.get("header", {}).get("revision", 0))

    def get(self, *parts: str) -> Entry | None:
        """The entry at prefix/parts..., or None (absent, or not a JSON object)."""
        key = self.key(*parts).encode()
        found = self._call(lambda c: c.post(c.get_url("/kv/range"), json={"key": _b64(key)}))
        kvs = found.get("kvs", [])
        return _entry(kvs[0]) if kvs else None

    def grant(self, ttl: int) -> int:
        found = self._call(lambda c: c.post(c.get_url("/lease/grant"), json={"TTL": ttl}))
        return int(found["ID"])

    def keepalive(self, lease: int) -> int:
        """The lease's TTL after renewing it; 0 or less: it has ended."""
        found = self._call(lambda c: c.post(c.get_url("/lease/keepalive"),
                                            json={"ID": lease}))
        return int(found.get("result", {}).get("TTL", -1))

    def revoke(self, lease: int) -> None:
        self._call(lambda c: c.post(c.get_url("/kv/lease/revoke"), json={"ID": lease}))

    def watch(self, on_event: Callable[[], None], stop: threading.Event) -> None:
        """Call on_event for each change under the prefix until stop (a thread's body).
        A broken stream is opened again; on_event also runs then (a change may have
        been missed)."""
        start, end = self.prefix.encode() + b"/", _next(self.prefix.encode() + b"/")
        while not stop.is_set():
            client = self._clients[self._current]
            try:
                response = client.session.post(
                    client.get_url("/watch"), stream=True, timeout=(self.timeout, None),
                    json={"create_request": {"key": _b64(start), "range_end": _b64(end)}})
                with response:
                    for chunk in response.iter_content(chunk_size=None):
                        if stop.is_set():
                            return
                        if b'"events"' in chunk:
                            on_event()
            except Exception as err:  # requests' many errors: the stream is gone
                log.debug("etcd watch: %s", err)
            if not stop.is_set():
                on_event()
                self._current = (self._current + 1) % len(self._clients)
                stop.wait(1.0)


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def _entry(kv: dict[str, Any]) -> Entry | None:
    """A key-value of etcd's as an Entry; None if its value is not a JSON object (not
    ours: ignored, never trusted)."""
    try:
        value = json.loads(_unb64(kv.get("value", "")))
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    return Entry(value, int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))


def _next(key: bytes) -> bytes:
    """The end of the range of every key starting with key."""
    return key[:-1] + bytes([key[-1] + 1])


def _short(err: Exception) -> str:
    text = " ".join(str(a) for a in err.args if a) or type(err).__name__
    return text if len(text) < 300 else text[:297] + "..."


def _encoded(value: dict[str, Any]) -> str:
    return _b64(json.dumps(value, sort_keys=True).encode())


def put(key: str, value: dict[str, Any], *, lease: int = 0) -> dict[str, Any]:
    request: dict[str, Any] = {"key": _b64(key.encode()), "value": _encoded(value)}
    if lease:
        request["lease"] = lease
    return {"request_put": request}


def delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": _b64(key.encode())}}


def unchanged(key: str, mod_revision: int) -> dict[str, Any]:
    """A compare: key's last change is still mod_revision (0: it does not exist)."""
    return {"key": _b64(key.encode()), "target": "MOD", "result": "EQUAL",
            "mod_revision": mod_revision}


def exists(key: str) -> dict[str, Any]:
    return {"key": _b64(key.encode()), "target": "VERSION", "result": "GREATER",
            "version": 0}


def absent(key: str) -> dict[str, Any]:
    return {"key": _b64(key.encode()), "target": "VERSION", "result": "EQUAL",
            "version": 0}


# --- push ------------------------------------------------------------------


def document(vm: VM) -> dict[str, Any]:
    """A VM as pushed: the fields its manifest set (templates and replicas expanded,
    paths made absolute), without what validation computed."""
    return vm.model_dump(mode="json", exclude_unset=True)


def git_commit(path: Path) -> str | None:
    where = path if path.is_dir() else path.parent
    try:
        found = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.stdout.strip() or None if found.returncode == 0 else None


def push_errors(loaded: Manifests, shared_dirs: Sequence[Path]) -> list[str]:
    """What --once would accept but a cluster cannot run."""
    errors = [str(e) for e in loaded.errors]
    for name, switch in sorted(loaded.switches.items()):
        if switch.switch.local:
            errors.append(f"{switch.file}:{switch.line}: switch '{name}': mode: local "
                          "(gateway, DHCP, NAT) is per host, not with --etcd; a plain "
                          "bridge (mode: bridge) is made on every host")
    shared = [os.path.realpath(d) for d in shared_dirs]
    for name, decl in sorted(loaded.vms.items()):
        vm = decl.vm
        if not vm.failover:
            continue
        paths = [d.path for d in vm.disks] + ([vm.cdrom] if vm.cdrom else [])
        for path in paths:
            if not _under(path, shared):
                where = ", ".join(str(d) for d in shared_dirs) or "none given"
                errors.append(f"{decl.file}:{decl.line}: vm '{name}': failover: true needs "
                              f"its disks on storage every host reaches (--shared-dir: "
                              f"{where}); {path} is not")
    return errors


@dataclass(frozen=True)
class PushPlan:
    """Keys relative to the prefix: vms/NAME and switches/NAME."""

    added: list[str]
    changed: list[str]
    removed: list[str]
    values: dict[str, dict[str, Any]]
    revision: int  # of the `push` key as read (0: none yet)

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.removed)


def _under(path: Path, tops: Sequence[str]) -> bool:
    """path, symlinks resolved, lies under one of tops (realpaths)."""
    real = os.path.realpath(path)
    return any(desired_mod.inside(real, top) for top in tops)


def plan_push(store: Store, loaded: Manifests, shared_dirs: Sequence[Path] = ()) -> PushPlan:
    shared = [os.path.realpath(d) for d in shared_dirs]
    values: dict[str, dict[str, Any]] = {
        f"vms/{name}": {"spec": document(d.vm), "source": f"{d.file}:{d.line}",
                        "shared": all(_under(disk.path, shared) for disk in d.vm.disks)}
        for name, d in loaded.vms.items()}
    values.update({f"switches/{name}": {
        "spec": d.switch.model_dump(mode="json", exclude_unset=True),
        "source": f"{d.file}:{d.line}"} for name, d in loaded.switches.items()})
    current = {f"{part}/{name}": entry for part in ("vms", "switches")
               for name, entry in store.range(f"{part}/")[0].items()}
    meta = store.get("push")
    return PushPlan(
        added=sorted(set(values) - set(current)),
        changed=sorted(n for n in set(values) & set(current) if current[n].value != values[n]),
        removed=sorted(set(current) - set(values)),
        values=values, revision=meta.mod_revision if meta else 0)


def push(store: Store, plan: PushPlan, *, commit: str | None) -> bool:
    """Write the plan in one transaction; False if another push came first."""
    ops = [put(store.key(n), plan.values[n]) for n in plan.added + plan.changed]
    ops += [delete(store.key(n)) for n in plan.removed]
    ops.append(put(store.key("push"), {"commit": commit, "at": time.time(),
                                       "vms": sum(n.startswith("vms/") for n in plan.values)}))
    return store.txn([unchanged(store.key("push"), plan.revision)], ops)


# --- members ----------------------------------------------------------------


def capacity(reserve_mib: int = 0) -> tuple[int, int]:
    """This host's memory (MiB, from /proc/meminfo) less reserve, and its CPUs."""
    memory = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) // 1024
    return max(memory - reserve_mib, 0), os.cpu_count() or 1


def want_of(name: str, spec: dict[str, Any]) -> Want:
    placement = spec.get("placement") or {}
    memory = spec.get("memory", 256)
    return Want(name=name, memory=memory if isinstance(memory, int)
                else desired_mod.parse_mebibytes(memory),
                vcpus=int(spec.get("vcpus", 1)), host=placement.get("host"),
                labels=dict(placement.get("labels") or {}), spread=placement.get("spread"),
                priority=int(spec.get("priority", 0)))


@dataclass
class View:
    """One read of the whole cluster."""

    vms: dict[str, Entry]
    hosts: dict[str, Entry]
    placement: dict[str, Entry]
    unschedulable: dict[str, Entry]
    lost: dict[str, Entry]
    status: dict[str, Entry]
    armed: dict[str, Entry]
    drain: dict[str, Entry]
    migration: dict[str, Entry]
    switches: dict[str, Entry]
    scheduler: Entry | None
    revision: int

    @classmethod
    def read(cls, store: Store) -> View:
        everything, revision = store.range("")
        parts: dict[str, dict[str, Entry]] = {
            k: {} for k in ("vms", "hosts", "placement", "unschedulable", "lost", "status",
                            "armed", "drain", "migration", "switches")}
        scheduler = None
        for key, entry in everything.items():
            head, _, name = key.lstrip("/").partition("/")
            if head in parts and name:
                parts[head][name] = entry
            elif head == "scheduler" and not name:
                scheduler = entry
        return cls(**parts, scheduler=scheduler, revision=revision)

    def armed_on(self, host: str) -> set[str]:
        entry = self.armed.get(host)
        found = entry.value.get("vms") if entry else None
        return {n for n in found if isinstance(n, str)} if isinstance(found, list) else set()

    def host_of(self, vm: str) -> str | None:
        entry = self.placement.get(vm)
        host = entry.value.get("host") if entry else None
        return host if isinstance(host, str) else None

    def moving_to(self, vm: str) -> str | None:
        entry = self.placement.get(vm)
        to = entry.value.get("to") if entry else None
        return to if isinstance(to, str) else None

    def running(self, vm: str) -> bool:
        """Its host reports it running (or ready)."""
        host = self.host_of(vm)
        report = self.status.get(host) if host else None
        found = (report.value.get("vms") or {}).get(vm) if report else None
        if not isinstance(found, dict):
            return False
        return str(found.get("state", "")).split(" ")[0] in ("running", "ready", "starting")


def staying(placement: dict[str, Any]) -> dict[str, Any]:
    """A placement value with its move taken off: the VM stays on its host."""
    return {k: v for k, v in placement.items() if k not in ("to", "mode")}


def migratable(value: dict[str, Any]) -> bool:
    """A pushed VM that can move live: its disks are all on shared storage, and it has
    no NICs or seed (their host side is not set up on a target yet)."""
    spec = value.get("spec") or {}
    return bool(value.get("shared")) and not spec.get("interfaces") \
        and not spec.get("cloud_init")


@dataclass
class Scheduler:
    """Places VMs; only the member holding the `scheduler` key acts."""

    store: Store
    me: str
    fence_grace: float
    placed_total: int = 0
    moved_total: int = 0

    def run(self, view: View, lease: int) -> None:
        if view.scheduler is None:
            if self.store.txn([absent(self.store.key("scheduler"))],
                              [put(self.store.key("scheduler"), {"host": self.me},
                                   lease=lease)]):
                log.info("this host now places VMs (scheduler)")
            view = View.read(self.store)
        if view.scheduler is None or view.scheduler.value.get("host") != self.me:
            return
        self.schedule(view)

    def schedule(self, view: View) -> None:
        store, now = self.store, time.time()
        hosts = [Host(name, int(e.value.get("memory", 0)), int(e.value.get("vcpus", 0)),
                      dict(e.value.get("labels") or {})) for name, e in sorted(view.hosts.items())
                 if name not in view.drain]  # a draining host takes nothing new
        wants = {name: want_of(name, e.value.get("spec") or {}) for name, e in view.vms.items()}
        gone = [name for name in view.placement if name not in view.vms]
        for name in gone:  # no longer pushed: its host stops it (its file goes)
            store.txn([unchanged(store.key("placement", name), view.placement[name].mod_revision)],
                      [delete(store.key("placement", name))])
        for name in view.unschedulable:
            if name not in view.vms:
                store.txn([], [delete(store.key("unschedulable", name))])
        # Lost hosts: noted once; their failover VMs move after --fence-grace.
        lost_hosts = {view.host_of(n) for n in view.placement} - set(view.hosts) - {None}
        for host in sorted(h for h in lost_hosts if h is not None):
            if host not in view.lost:
                store.txn([absent(store.key("lost", host))],
                          [put(store.key("lost", host), {"since": now})])
                log.warning("host %s: its lease ended; failover VMs move after %.0fs",
                            host, self.fence_grace)
        for host in view.lost:
            if host in view.hosts or host not in lost_hosts:
                store.txn([], [delete(store.key("lost", host))])
        placed: dict[str, str] = {}
        movable: dict[str, str] = {}  # vm -> the lost host it leaves
        for name in view.vms:
            on = view.host_of(name)
            if on is None:
                continue
            if on in view.hosts:
                placed[name] = on
                continue
            since = view.lost.get(on)
            spec = view.vms[name].value.get("spec") or {}
            ready = since is not None and now - float(since.value.get("since", now)) \
                >= self.fence_grace
            if spec.get("failover") and name in view.armed_on(on) and ready:
                movable[name] = on
            else:
                placed[name] = on  # stays on its lost host: reported host-lost
        self._drain(view, wants, hosts, placed, now)
        decision = place(list(wants.values()), hosts, placed)
        for name, host in sorted(decision.placed.items()):
            key = store.key("placement", name)
            entry = view.placement.get(name)
            checks = [unchanged(key, entry.mod_revision if entry else 0),
                      exists(store.key("hosts", host)),
                      unchanged(store.key("scheduler"), view.scheduler.mod_revision
                                if view.scheduler else 0)]
            if name in movable:  # only while the old host is still gone
                checks.append(absent(store.key("hosts", movable[name])))
            value: dict[str, Any] = {"host": host, "at": now, "by": self.me}
            if name in movable:
                value["from"] = movable[name]
            if store.txn(checks, [put(key, value),
                                  delete(store.key("unschedulable", name))]):
                self.placed_total += 1
                if name in movable:
                    self.moved_total += 1
                    log.warning("vm '%s': failover from lost host %s to %s", name,
                                movable[name], host)
                else:
                    log.info("vm '%s': placed on %s", name, host)
        self._unschedulable(view, decision.unschedulable)

    def _drain(self, view: View, wants: dict[str, Want], hosts: list[Host],
               placed: dict[str, str], now: float) -> None:
        """Each VM of a draining host, and each VM whose `placement:` no longer allows
        its host (an edit), gets a target; a move whose target is gone is called off."""
        store = self.store
        for name, entry in sorted(view.placement.items()):
            source, to = view.host_of(name), view.moving_to(name)
            if to is not None and to not in view.hosts and source in view.hosts:
                store.txn([unchanged(store.key("placement", name), entry.mod_revision)],
                          [put(store.key("placement", name), staying(entry.value)),
                           delete(store.key("migration", name))])
                log.warning("vm '%s': move to %s called off: that host is gone", name, to)
                continue
            if to is not None or source not in view.hosts or name not in wants \
                    or entry.value.get("move_failed"):
                continue
            here = view.hosts[source].value
            misplaced = unfit(wants[name], Host(source, 0, 0, dict(here.get("labels") or {})))
            if source not in view.drain and misplaced is None:
                continue
            others = {n: h for n, h in placed.items() if n != name}
            decision = place([wants[name]], hosts, others)
            target = decision.placed.get(name)
            if target is None:
                self._unschedulable(view, {name: "cannot leave draining host "
                                           f"{source}: " + decision.unschedulable[name]})
                continue
            pushed, running = view.vms[name].value, view.running(name)
            live = running and migratable(pushed) \
                and bool(view.hosts[target].value.get("address"))
            shared_dir = view.hosts[source].value.get("shared_dir")
            save = running and bool(pushed.get("shared")) \
                and not (pushed.get("spec") or {}).get("cloud_init") and bool(shared_dir) \
                and shared_dir == view.hosts[target].value.get("shared_dir")
            mode = "live" if live else "save" if save else "cold"
            value = {**entry.value, "to": target, "mode": mode, "at": now, "by": self.me}
            if store.txn([unchanged(store.key("placement", name), entry.mod_revision),
                          exists(store.key("hosts", target))],
                         [put(store.key("placement", name), value)]):
                placed[name] = target  # counts on the target from now on
                why = "draining" if misplaced is None else f"placement: {misplaced}"
                log.info("vm '%s': moves from %s to %s (%s; %s)", name, source, target,
                         mode, why)

    def _unschedulable(self, view: View, why: dict[str, str]) -> None:
        store = self.store
        for name, reason in sorted(why.items()):
            entry = view.unschedulable.get(name)
            if entry is None or entry.value.get("reason") != reason:
                store.txn([], [put(store.key("unschedulable", name), {"reason": reason})])
                log.warning("vm '%s': unschedulable: %s", name, reason)


class Fence:
    """The member's lease, renewed from a thread of its own (with a store of its own,
    whose timeout is short). After each renewal the new deadline goes to the lease
    file the watchdog (`reconciler.fence`) enforces; when renewals fail for so long
    that the lease could end, this thread also kills the failover VMs, and
    `on_fenced` takes their files away so that the local daemon does not restart them.
    """

    def __init__(self, store: Store, state: StateDir, ttl: int, *,
                 on_fenced: Callable[[], None]) -> None:
        self.store = Store(store.urls, store.prefix, timeout=max(0.5, ttl / 5))
        self.state, self.ttl = state, ttl
        self.on_fenced = on_fenced
        self.lease = 0
        self.deadline = 0.0  # monotonic: the lease cannot have ended before this
        self.fenced = False
        self.stop = threading.Event()
        # Kill this long before the deadline: a renewal's own timeout plus slack.
        self.margin = max(1.0, ttl / 4)

    def hold(self, lease: int, granted_at: float) -> None:
        self.lease, self.deadline, self.fenced = lease, granted_at + self.ttl, False
        self._publish()

    def _publish(self) -> None:
        fence.write_lease(self.state, lease=self.lease, ttl=self.ttl,
                          deadline=self.deadline, margin=self.margin)

    def run(self) -> None:
        """The thread's body."""
        interval = max(self.ttl / 4, 0.2)
        while not self.stop.is_set():
            sent = time.monotonic()
            if self.lease and not self.fenced:
                try:
                    left = self.store.keepalive(self.lease)
                except Exception as err:  # unreachable, timed out: the deadline decides
                    log.debug("lease renewal failed: %s", err)
                    left = None
                if left is not None and left > 0:
                    self.deadline = sent + self.ttl
                    self._publish()
                elif left is not None:
                    self.deadline = 0.0  # ended: etcd says so
            if self.lease and time.monotonic() >= self.deadline - self.margin:
                if not self.fenced:
                    self.fenced = True
                    log.error("cannot renew this host's etcd lease: killing its failover "
                              "VMs before the lease ends (self-fencing)")
                    self.on_fenced()
                killed = fence.kill_failover_vms(self.state)
                if killed:
                    log.error("fenced: killed %s", ", ".join(killed))
            self.stop.wait(0.1 if self.fenced else interval)


MIGRATION_TIMEOUT = 600.0


@dataclass(frozen=True)
class Move:
    """This host's side of a move under way: a live migration, or a save to hand over."""

    vm: str
    role: str  # "in"/"out": receives/sends a live migration; "save": saves it for the target
    peer: str  # the other host
    revision: int  # the placement's, when the move was written
    spec: dict[str, Any] = field(default_factory=dict)  # in: the VM's document
    uri: str | None = None  # out: where the target listens


@dataclass
class Member:
    """`reconcile --etcd URL --host NAME`: this host's part of the cluster."""

    store: Store
    host: str
    state: StateDir
    labels: dict[str, str] = field(default_factory=dict)
    ttl: int = 10
    reserve: int = 0
    fence_grace: float = 5.0
    address: str | None = None
    vcpus: int | None = None  # offered; default: this host's CPUs
    shared_dir: Path | None = None  # storage every host reaches: saved states of moves
    allow_dirs: Sequence[Path] = ()  # --allow-dir, for VMs received live
    lease: int = 0
    scheduler: Scheduler = field(init=False)
    fence: Fence = field(init=False)
    manifests: Path = field(init=False)
    _reported: dict[str, Any] = field(default_factory=dict)
    _dog: subprocess.Popen[bytes] | None = None
    _armed: list[str] | None = None
    _files: threading.Lock = field(default_factory=threading.Lock)
    _departed: dict[str, int] = field(default_factory=dict)  # vm -> revision it left at

    def __post_init__(self) -> None:
        self.scheduler = Scheduler(self.store, self.host, self.fence_grace)
        self.fence = Fence(self.store, self.state, self.ttl, on_fenced=self._fenced)
        self.manifests = self.state.root / "cluster" / "vms"

    def info(self) -> dict[str, Any]:
        memory, vcpus = capacity(self.reserve)
        return {"memory": memory, "vcpus": self.vcpus or vcpus, "labels": self.labels,
                "address": self.address, "since": time.time(), "pid": os.getpid(),
                "shared_dir": str(self.shared_dir) if self.shared_dir else None}

    def register(self, stop: threading.Event) -> None:
        """Hold a lease with this host's key under it: the lease of this state dir's
        previous daemon if it is still alive (a restart changes nothing), else a new
        one. A key of this name under another live lease is another member's: wait
        until it ends."""
        if self._resume():
            self._watchdog()
            return
        warned = False
        while not stop.is_set():
            granted = time.monotonic()
            lease = self.store.grant(self.ttl)
            if self.store.txn([absent(self.store.key("hosts", self.host))],
                              [put(self.store.key("hosts", self.host), self.info(),
                                   lease=lease)]):
                self.lease = lease
                self.fence.hold(lease, granted)
                self._watchdog()
                log.info("joined the cluster as host %s (lease ttl %ds)", self.host, self.ttl)
                return
            self.store.revoke(lease)
            if not warned:
                log.warning("host %s is registered already (a member running, or this "
                            "one's previous lease): waiting for it to end", self.host)
                warned = True
            stop.wait(1.0)

    def _resume(self) -> bool:
        held = fence.read_lease(self.state)
        if held is None or self.fence.fenced:
            return False
        lease, sent = held.lease, time.monotonic()
        try:
            alive = self.store.keepalive(lease) > 0
        except ClusterError:
            return False
        mine = self.store.get("hosts", self.host)
        if not alive or mine is None or mine.lease != lease:
            return False
        self.lease = lease
        self.fence.hold(lease, sent)
        self.store.txn([], [put(self.store.key("hosts", self.host), self.info(), lease=lease)])
        log.info("host %s: carrying on with the previous daemon's lease", self.host)
        return True

    def _watchdog(self) -> None:
        """The fencing watchdog of this state dir (a second one exits at once)."""
        if self._dog is not None and self._dog.poll() is None:
            return
        log_path = self.state.root / "cluster" / "fence.log"
        with open(log_path, "a") as out:
            self._dog = subprocess.Popen(
                [sys.executable, "-m", "reconciler.fence", str(self.state.root)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)

    def _fenced(self) -> None:
        """Lost the lease: the failover VMs' files go, so nothing here restarts them."""
        for path in self._manifest_files():
            try:
                text = path.read_text()
                spec = json.loads(text[text.index("\n") + 1:])
            except (OSError, ValueError):
                continue
            if spec.get("failover"):
                path.unlink(missing_ok=True)
        self.lease = 0

    def _manifest_files(self) -> Iterator[Path]:
        if self.manifests.is_dir():
            yield from sorted(self.manifests.glob("*.yaml"))

    def sync(self, stop: threading.Event) -> View:
        """One round: hold a lease, maybe schedule, write this host's VMs' files."""
        if self.fence.fenced or not self.lease:
            self.register(stop)
        view = View.read(self.store)
        self.scheduler.run(view, self.lease)
        view = View.read(self.store)
        self.materialize(view)
        self._cold_moves(view)
        return view

    def _mine(self, view: View, name: str) -> bool:
        """Whether this host's daemon should have name's file (and run it)."""
        entry = view.placement.get(name)
        if entry is None or view.host_of(name) != self.host:
            return False
        if view.moving_to(name) and entry.value.get("mode") == "cold":
            return False  # stopped here first, then started there
        return view.revision >= self._departed.get(name, 0)  # not a view from before

    def materialize(self, view: View) -> None:
        """The VMs placed here, as manifest files for the local daemon."""
        with self._files:
            self._materialize(view)

    def _materialize(self, view: View) -> None:
        self.manifests.mkdir(parents=True, exist_ok=True, mode=0o700)
        mine = {name: e for name, e in view.vms.items() if self._mine(view, name)}
        present = list(self._manifest_files())
        wanted = {}
        for name, entry in mine.items():
            header = (f"# vm '{name}' pushed from {entry.value.get('source')}, placed on "
                      f"{self.host} by the cluster (etcd): do not edit\n")
            wanted[f"{name}.yaml"] = header + json.dumps(entry.value.get("spec") or {},
                                                         indent=2, sort_keys=True) + "\n"
            saved = view.placement[name].value.get("saved")
            if isinstance(saved, str) and self.manifests / f"{name}.yaml" not in present:
                self._arrive_saved(name, entry.value.get("spec") or {}, saved,
                                   view.placement[name].value)
        for name, entry in view.switches.items():  # plain bridges: on every host
            wanted[f"{name}.switch.yaml"] = (
                f"# switch '{name}' pushed from {entry.value.get('source')}: do not edit\n"
                + json.dumps(entry.value.get("spec") or {}, indent=2, sort_keys=True) + "\n")
        for path in present:
            if path.name not in wanted:
                path.unlink(missing_ok=True)
        for filename, text in wanted.items():
            path = self.manifests / filename
            try:
                if path.read_text() == text:
                    continue
            except OSError:
                pass
            atomic_write(path, text)

    def _arrive_saved(self, name: str, spec: dict[str, Any], saved: str,
                      view_value: dict[str, Any]) -> None:
        """A VM saved on its old host to shared storage: a record that says so comes
        before its file, so the daemon's first pass restores it (no fresh boot)."""
        records, _ = self.state.records()
        if name in records or not Path(saved).is_file():
            return
        try:
            vm = self._validated(name, spec)
        except ClusterError as err:
            log.error("%s", err)
            return
        moved = view_value.get("moved") or {}
        self.state.write(Record(
            name=name, spec=vm.spec(), spec_hash=vm.spec_hash(),
            source=str(self.manifests / f"{name}.yaml"), pid=0, start_time=0,
            started_at=time.time(), accel="", saved=saved,
            # ready when saved there: ready when restored here (no second boot)
            ready_at=moved.get("ready_at"), ready_passed=list(moved.get("ready_passed", []))))
        log.info("vm '%s': arrives saved in %s; restored from there", name, saved)

    def _cold_moves(self, view: View) -> None:
        """A VM moving cold from here goes to its target once it has stopped here."""
        records, _ = self.state.records()
        for name, entry in sorted(view.placement.items()):
            to = view.moving_to(name)
            if view.host_of(name) != self.host or to is None \
                    or entry.value.get("mode") != "cold":
                continue
            record = records.get(name)
            if record is not None and (record.intent or is_alive(record)):
                continue  # still being stopped by the daemon
            if self.depart(name, entry.mod_revision, to, {}):
                log.info("vm '%s': stopped here; moves to %s", name, to)

    def depart(self, name: str, revision: int, to: str, extra: dict[str, Any]) -> bool:
        """Hand name over to host `to` (placement, if unchanged since revision); its
        file here goes in the same breath, so no daemon pass starts it again."""
        key = self.store.key("placement", name)
        value = {"host": to, "from": self.host, "at": time.time(), "by": self.host, **extra}
        with self._files:
            done, after = self.store.txn_rev(
                [unchanged(key, revision)],
                [put(key, value), delete(self.store.key("migration", name))])
            if done:
                self._departed[name] = after
                (self.manifests / f"{name}.yaml").unlink(missing_ok=True)
        return done

    def call_off(self, name: str, revision: int, why: str) -> None:
        """A move that failed: the VM stays here, and the scheduler does not retry it."""
        key = self.store.key("placement", name)
        entry = self.store.get("placement", name)
        if entry is None or entry.mod_revision != revision:
            return
        self.store.txn([unchanged(key, revision)],
                       [put(key, {**staying(entry.value), "move_failed": why}),
                        delete(self.store.key("migration", name))])

    def moves(self, view: View) -> list[Move]:
        """The moves this host takes part in now (live either side, or saving it)."""
        found = []
        for name, entry in sorted(view.placement.items()):
            to, source = view.moving_to(name), view.host_of(name)
            mode = entry.value.get("mode")
            if to is None or mode not in ("live", "save") or name not in view.vms:
                continue
            if mode == "save":
                if source == self.host:
                    found.append(Move(name, "save", to, entry.mod_revision))
                continue
            if to == self.host and source is not None:
                found.append(Move(name, "in", source, entry.mod_revision,
                                  spec=view.vms[name].value.get("spec") or {}))
            elif source == self.host:
                migration = view.migration.get(name)
                if migration is None or migration.value.get("to") != to:
                    continue
                if migration.value.get("error"):
                    self.call_off(name, entry.mod_revision,
                                  f"{to}: {migration.value['error']}")
                elif migration.value.get("uri"):
                    found.append(Move(name, "out", to, entry.mod_revision,
                                      uri=str(migration.value["uri"])))
        return found

    async def receive(self, move: Move) -> str:
        """Start a QEMU waiting for the guest, say where it listens, and hold it until
        the guest runs here and its file is in place (or the move is called off)."""
        name, paths = move.vm, self.state.paths(move.vm)
        key = self.store.key("migration", name)
        try:
            if not self.address:
                raise ClusterError("this host has no --address to receive migrations on")
            vm = self._validated(name, move.spec)
            record = await kvm.start(vm, paths, source=str(self.manifests / f"{name}.yaml"),
                                     paused=False, remember=self.state.write, history={},
                                     incoming=True)
        except (ClusterError, kvm.DriverError, OSError) as err:
            await asyncio.to_thread(self.store.txn, [], [put(key, {
                "to": self.host, "from": move.peer, "error": str(err)})])
            raise
        try:
            uri = await kvm.listen_incoming(paths, self.address)
            await asyncio.to_thread(self.store.txn, [], [put(key, {
                "to": self.host, "from": move.peer, "uri": uri})])
            deadline = time.monotonic() + MIGRATION_TIMEOUT
            checked = 0.0
            while True:
                status = await kvm.query_status(paths)
                if status != "inmigrate" and (self.manifests / f"{name}.yaml").exists():
                    # The guest was ready there: it is the same guest here.
                    entry = await asyncio.to_thread(self.store.get, "placement", name)
                    moved = (entry.value.get("migrated") or {}) if entry else {}
                    if moved.get("ready_at") is not None:
                        self.state.update(name, record.pid, ready_at=moved["ready_at"],
                                          ready_passed=list(moved.get("ready_passed", [])))
                    return f"live migration from {move.peer} received ({status})"
                if time.monotonic() > deadline:
                    raise ClusterError(f"no migration within {MIGRATION_TIMEOUT:.0f}s")
                if time.monotonic() - checked > 1.0:
                    checked = time.monotonic()
                    entry = await asyncio.to_thread(self.store.get, "placement", name)
                    host = entry.value.get("host") if entry else None
                    if entry is None or (host != self.host
                                         and entry.value.get("to") != self.host):
                        raise ClusterError("the move was called off")
                await asyncio.sleep(0.1)
        except BaseException:
            await kvm.quit_qemu(record, paths)
            self.state.forget(name)
            raise

    async def send(self, move: Move) -> str:
        """Migrate the guest to the target's QEMU; then hand the VM over and end ours."""
        name, paths = move.vm, self.state.paths(move.vm)
        records, _ = self.state.records()
        record = records.get(name)
        if record is None or not is_alive(record):
            await asyncio.to_thread(self.call_off, name, move.revision, "not running here")
            raise ClusterError(f"vm '{name}' is not running here")
        assert move.uri is not None
        self.state.update(name, record.pid, stopping=True)
        try:
            info = await kvm.migrate(record, paths, move.uri, timeout=MIGRATION_TIMEOUT)
        except BaseException as err:
            self.state.update(name, record.pid, stopping=False)
            await asyncio.to_thread(self.call_off, name, move.revision, str(err))
            raise
        figures = {"downtime_ms": info.get("downtime"), "total_ms": info.get("total-time"),
                   "ready_at": record.ready_at, "ready_passed": record.ready_passed}
        handed = await asyncio.to_thread(self.depart, name, move.revision, move.peer,
                                         {"migrated": figures})
        how = await kvm.quit_qemu(record, paths)  # only a stopped copy is left here
        if not handed:
            raise ClusterError(f"vm '{name}': migrated, but its placement changed "
                               f"meanwhile; QEMU here {how}")
        return (f"live-migrated to {move.peer} (downtime {figures['downtime_ms']} ms, "
                f"total {figures['total_ms']} ms); QEMU here {how}")

    def _validated(self, name: str, spec: dict[str, Any]) -> VM:
        from pydantic import ValidationError

        context = desired_mod.validation_context(self.state.root)
        context["base_dir"] = self.manifests
        context["allow_dirs"] = tuple(os.path.realpath(d) for d in self.allow_dirs)
        try:
            return VM.model_validate(spec, context=context)
        except ValidationError as err:
            raise ClusterError(f"vm '{name}' is not valid on this host: {err}") from None

    def report(self, states: dict[str, dict[str, Any]]) -> None:
        """What this host runs, for `status --etcd` (under the lease: gone with it), and
        which VMs its watchdog would fence (what the records say: the watchdog reads
        those), for the scheduler: only those may fail over."""
        if not self.lease:
            return
        records, _ = self.state.records()
        armed = sorted(n for n, r in records.items() if r.spec.get("failover"))
        if armed != self._armed:
            self.store.txn([], [put(self.store.key("armed", self.host), {"vms": armed})])
            self._armed = armed
        if states != self._reported:
            self.store.txn([], [put(self.store.key("status", self.host),
                                    {"vms": states, "at": time.time()}, lease=self.lease)])
            self._reported = states

    def leave(self, *, vms_kept: bool) -> None:
        """The daemon stops. With its VMs stopped or saved, the lease ends now. With VMs
        kept running, the lease is left to run out: a daemon started again before then
        carries on with it; if none is, the watchdog fences the failover VMs first."""
        self.fence.stop.set()
        if vms_kept:
            if self.lease:
                left = max(self.fence.deadline - time.monotonic(), 0)
                log.info("host %s: lease left to run out (%.0fs); failover VMs are killed "
                         "before then unless the daemon is back", self.host, left)
            return
        fence.lease_file(self.state).unlink(missing_ok=True)  # the watchdog exits
        if self.lease:
            try:
                self.store.revoke(self.lease)
            except ClusterError as err:
                log.warning("could not end the lease: %s", err)


def cluster_rows(view: View, *, now: float | None = None) -> tuple[list[dict[str, Any]],
                                                                     list[dict[str, Any]]]:
    """`status --etcd`: one row per host and one per VM."""
    now = time.time() if now is None else now
    hosts = []
    used: dict[str, tuple[int, int]] = {}
    for name in view.vms:
        host = view.host_of(name)
        if host:
            want = want_of(name, view.vms[name].value.get("spec") or {})
            memory, vcpus = used.get(host, (0, 0))
            used[host] = (memory + want.memory, vcpus + want.vcpus)
    scheduler = view.scheduler.value.get("host") if view.scheduler else None
    for name in sorted(set(view.hosts) | set(view.lost)):
        entry = view.hosts.get(name)
        memory, vcpus = used.get(name, (0, 0))
        hosts.append({
            "host": name, "lease": "alive" if entry else "lost", "draining": name in view.drain,
            "memory": entry.value.get("memory") if entry else None, "memory_used": memory,
            "vcpus": entry.value.get("vcpus") if entry else None, "vcpus_used": vcpus,
            "labels": entry.value.get("labels", {}) if entry else {},
            "scheduler": name == scheduler,
            "lost_for": None if entry or name not in view.lost
            else round(now - float(view.lost[name].value.get("since", now)), 1)})
    vms = []
    for name in sorted(view.vms):
        host = view.host_of(name)
        spec = view.vms[name].value.get("spec") or {}
        row: dict[str, Any] = {"name": name, "host": host, "failover": bool(spec.get("failover"))}
        if host is None:
            why = view.unschedulable.get(name)
            row.update(state="unschedulable" if why else "pending",
                       detail=why.value.get("reason", "") if why else "not placed yet")
        elif host not in view.hosts:
            armed = name in view.armed_on(host)
            row.update(state="host-lost", detail=f"host {host}'s lease ended" + (
                "; moves to another host after --fence-grace" if row["failover"] and armed
                else "; not restarted elsewhere (failover: false)" if not row["failover"]
                else "; not restarted elsewhere: that host never armed its fencing"))
        elif view.moving_to(name):
            entry = view.placement[name]
            row.update(state="moving", detail=f"{entry.value.get('mode')} move to "
                                              f"{view.moving_to(name)}")
        else:
            report = view.status.get(host)
            vm = (report.value.get("vms") or {}).get(name) if report else None
            row.update(state=vm.get("state", "unknown") if vm else "placed",
                       detail=vm.get("detail", "") if vm else f"placed on {host}")
            failed = view.placement[name].value.get("move_failed")
            if failed:
                row["detail"] += f"; move failed: {failed}"
        placed = view.placement[name].value if name in view.placement else {}
        row["migrated"] = placed.get("migrated")
        row["via"] = None if "from" not in placed else "live" if placed.get("migrated") \
            else "saved" if placed.get("saved") else "moved"
        vms.append(row)
    return hosts, vms
