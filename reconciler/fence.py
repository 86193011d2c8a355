"""Self-fencing that does not depend on the daemon being alive.

A cluster member writes its lease's deadline to `cluster/lease.json` in its state dir
after every renewal (CLOCK_MONOTONIC, the same for every process of the host). This
watchdog, a process of its own (`python -m reconciler.fence STATE_DIR`, started by the
member, one per state dir), kills (SIGKILL) every failover VM of the host from
`margin` seconds before that deadline on, every 100 ms, until a renewal moves the
deadline again. So a daemon that hangs, is killed or stops keeping VMs still fences
them before another host may start them (Proxmox HA's watchdog-mux, in userspace).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from reconciler.observed import StateDir, find_qemu, is_alive, open_pidfd

TICK = 0.1


def lease_file(state: StateDir) -> Path:
    return state.root / "cluster" / "lease.json"


def write_lease(state: StateDir, *, lease: int, ttl: int, deadline: float,
                margin: float) -> None:
    """Atomically: the lease held and the monotonic time before which it cannot end.
    Not observed.atomic_write: it runs after every renewal, and its fsync would stall
    the next one on a busy disk; monotonic times mean nothing after a reboot anyway."""
    path = lease_file(state)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(".lease.json.tmp")
    tmp.write_text(json.dumps({"lease": lease, "ttl": ttl, "deadline": deadline,
                               "margin": margin}))
    os.replace(tmp, path)


@dataclass(frozen=True)
class Held:
    lease: int  # etcd's 64-bit lease ID (never through a float)
    ttl: float
    deadline: float
    margin: float


def read_lease(state: StateDir) -> Held | None:
    try:
        found = json.loads(lease_file(state).read_text())
        return Held(int(found["lease"]), float(found["ttl"]), float(found["deadline"]),
                    float(found["margin"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def kill_failover_vms(state: StateDir) -> list[str]:
    """SIGKILL the QEMU of every VM here whose spec says failover: true."""
    killed = []
    records, _ = state.records()
    for name, record in records.items():
        if not record.spec.get("failover"):
            continue
        pidfd: int | None
        if record.intent or not is_alive(record):
            found = find_qemu(state.paths(name))  # a start under way: its QEMU too
            if found is None:
                continue
            pid = found[0]
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
        else:
            pid, pidfd = record.pid, open_pidfd(record)
            if pidfd is None:
                continue
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            killed.append(f"vm '{name}' (pid {pid})")
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)
    return killed


def watchdog(state: StateDir) -> int:
    """The watchdog's loop; returns when the lease file is gone (a clean leave) or
    when the lease has surely ended and nothing is left to kill."""
    lock = state.root / "cluster" / "watchdog.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # one is running already
    say(f"watching {lease_file(state)}")
    fenced = False
    while True:
        held = read_lease(state)
        if held is None:
            say("no lease file: the member left; exiting")
            return 0
        now = time.monotonic()
        if now >= held.deadline - held.margin:
            if not fenced:
                say(f"lease {held.lease} not renewed in time: fencing")
                fenced = True
            killed = kill_failover_vms(state)
            if killed:
                say("killed " + ", ".join(killed))
            elif now > held.deadline + held.ttl:
                say("lease ended and nothing left to fence; exiting")
                return 0
        elif fenced:
            say("lease renewed: fencing ends")
            fenced = False
        time.sleep(TICK)


def say(text: str) -> None:
    now = time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now % 1 * 1000):03d}"
    with contextlib.suppress(OSError):
        print(f"{stamp} fence[{os.getpid()}]: {text}", flush=True)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m reconciler.fence STATE_DIR")
    sys.exit(watchdog(StateDir(Path(sys.argv[1]))))


if __name__ == "__main__":
    main()
