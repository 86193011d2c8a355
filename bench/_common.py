"""Helpers shared by the benchmark scripts in bench/ (stdlib only).

Not a benchmark itself: the scripts next to it import it (they put bench/ on
sys.path by being run as scripts from it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = REPO / "guest" / "out"
KERNEL = GUEST_DIR / "vmlinuz"
INITRD = GUEST_DIR / "initrd.img"

# Printed by the test guest's /init on ttyS0 once user space is reached.
MARKER = re.compile(rb"reconciler-guest: up uptime=([0-9]+(?:\.[0-9]+)?)\r?\n")

# How often log files are polled. It bounds the resolution of every
# "time to marker" figure: a marker is seen up to one interval (plus the cost
# of one read) after QEMU wrote it.
POLL_INTERVAL = 0.002


class BenchError(Exception):
    """Something went wrong that makes the figures meaningless: exit 1."""


def reconcile_cmd() -> list[str]:
    """The `reconcile` console script next to this interpreter, else main() via -c.

    Next to sys.executable (not via PATH) so that a pyenv shim or another
    install on PATH is not what gets measured; works in a .venv too.
    """
    script = Path(sys.executable).parent / "reconcile"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from reconciler.cli import main; main()"]


def stage_guest(root: Path, source: Path = GUEST_DIR) -> Path:
    """Copy the test guest into root/guest/out; returns that dir.

    A private copy: a concurrent `guest/build.sh --force` (or a clean checkout)
    cannot pull the kernel from under a running benchmark.
    """
    files = [source / KERNEL.name, source / INITRD.name]
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise BenchError(
            f"test guest not built ({', '.join(map(str, missing))} missing); run guest/build.sh")
    out = root / "guest" / "out"
    out.mkdir(parents=True)
    for path in files:
        shutil.copyfile(path, out / path.name)
    return out


def vm_manifest(name: str, guest: Path, *, memory: str, stop_timeout: str = "5s") -> str:
    """A one-VM manifest on the test guest in dir `guest`, with absolute paths."""
    return (
        f"name: {name}\n"
        f"memory: {memory}\n"
        "vcpus: 1\n"
        f"stop_timeout: {stop_timeout}\n"
        "boot:\n"
        f"  kernel: {guest / KERNEL.name}\n"
        f"  initrd: {guest / INITRD.name}\n"
        "  cmdline: console=ttyS0 quiet\n"
    )


class LogWatcher:
    """Incrementally reads a (possibly not yet existing) log file, looking for MARKER."""

    def __init__(self, path: Path, *, offset: int = 0) -> None:
        self.path = path
        self.offset = offset  # where to start reading: a record's serial_offset (this boot)
        self._file: BinaryIO | None = None
        self.data = b""

    def poll(self) -> re.Match[bytes] | None:
        if self._file is None:
            try:
                self._file = open(self.path, "rb")  # noqa: SIM115 (closed in close())
            except FileNotFoundError:
                return None
            self._file.seek(self.offset)
        chunk = self._file.read()
        if chunk:
            self.data += chunk
            return MARKER.search(self.data)
        return None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def wait_for_marker(
    watcher: LogWatcher, t0: float, *, timeout: float,
    check: Callable[[], None] | None = None, check_every: float = 0.05,
) -> tuple[float, float]:
    """Poll until the marker shows up: (seconds since t0, guest uptime in seconds).

    `check` is called every `check_every` seconds and raises BenchError when
    the thing being waited for can no longer produce the marker.
    """
    next_check = t0 + check_every
    while True:
        match = watcher.poll()
        now = time.perf_counter()
        if match:
            return now - t0, float(match[1])
        if now - t0 > timeout:
            tail = watcher.data.decode(errors="replace").strip().splitlines()[-5:]
            raise BenchError(f"no marker in {watcher.path} after {timeout:.0f}s"
                             + (":\n  " + "\n  ".join(tail) if tail else " (log empty)"))
        if check is not None and now >= next_check:
            check()
            next_check = now + check_every
        time.sleep(POLL_INTERVAL)


def exit_on_signals() -> None:
    """SIGTERM/SIGHUP (and SIGINT, even if inherited as ignored) unwind through
    `finally`, so the VMs a script started are cleaned up."""
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def read_record(path: Path) -> dict[str, Any] | None:
    """A VM's record.json as a dict; None while it does not exist (yet).

    The reconciler writes records atomically (temp file + rename), so a read
    never sees half a file.
    """
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None


def file_tail(path: Path, lines: int = 8) -> str:
    """The last lines of a log file, indented for an error message ('' if none)."""
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return "\n  ".join(text.splitlines()[-lines:])


# --- processes ------------------------------------------------------------

def proc_alive(pid: int) -> bool:
    """True for a live, non-zombie process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return text[text.rindex(")") + 2:].split()[0] not in ("Z", "X")


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def kill_qemu(pid: int, must_contain: str, *, timeout: float = 10.0) -> bool:
    """SIGKILL pid if it is a QEMU whose command line mentions must_contain.

    must_contain (a path inside one of our temp dirs) guards against a reused
    pid: only our own VMs are ever signalled. Waits until the process is gone
    (or a zombie: it is not our child, its new parent reaps it). True if killed.
    """
    return bool(kill_qemus([pid], must_contain, timeout=timeout))


def our_qemus(must_contain: str) -> list[int]:
    """Live QEMU processes whose command line mentions must_contain (our temp root)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and proc_alive(int(entry.name)):
            cmd = proc_cmdline(int(entry.name))
            if "qemu-system" in cmd and must_contain in cmd:
                found.append(int(entry.name))
    return found


def kill_qemus(pids: Sequence[int], must_contain: str, *, timeout: float = 10.0
               ) -> list[int]:
    """kill_qemu() for many at once: all are signalled first, then waited for.

    Returns the pids that were killed (ours, and alive).
    """
    killed = []
    for pid in pids:
        if not proc_alive(pid):
            continue
        cmd = proc_cmdline(pid)
        if "qemu-system" not in cmd or must_contain not in cmd:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(pid)
    deadline = time.monotonic() + timeout
    for pid in killed:
        while proc_alive(pid):
            if time.monotonic() > deadline:
                raise BenchError(f"QEMU pid {pid} survived SIGKILL for {timeout:.0f}s")
            time.sleep(0.01)
    return killed


def recorded_pids(state: Path) -> list[int]:
    """The pid of every VM record in a state dir (`<state>/vms/*/record.json`)."""
    pids = []
    for path in sorted(state.glob("vms/*/record.json")):
        try:
            record = read_record(path)
        except (OSError, ValueError):
            continue
        if record is not None and isinstance(record.get("pid"), int):
            pids.append(record["pid"])
    return pids


class Daemon:
    """A `reconcile DIR` daemon in its own session, its output in a log file."""

    STOP_TIMEOUT = 30.0  # it finishes its pass first, and a start waits for QMP (<= 15 s)

    def __init__(self, argv: Sequence[str], log: Path) -> None:
        self.argv, self.log = list(argv), log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "wb") as out:
            # Its own session: a Ctrl-C on the terminal reaches us, and we stop it.
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check(self) -> None:
        """BenchError (with the log's tail) if the daemon has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the daemon exited {self.proc.returncode}:\n  "
                             + (file_tail(self.log) or "(no output)"))

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> list[str]:
        """SIGTERM (it leaves the VMs running), SIGKILL after STOP_TIMEOUT; notes."""
        notes: list[str] = []
        if self.proc is None:
            return notes
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                notes.append(f"daemon ignored SIGTERM for {self.STOP_TIMEOUT:.0f}s: killed")
        # -SIGTERM: stopped before it had set up its handler (still importing).
        if self.proc.returncode not in (0, -signal.SIGTERM):
            notes.append(f"daemon exited {self.proc.returncode}")
        return notes


# Daemon log lines: "2024-05-01 12:00:00,123 INFO reconciler: message" (local time).
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (\w+) ([\w.]+): (.*)$",
                      re.M)


def log_lines(text: str) -> list[tuple[float, str]]:
    """(wall-clock time, message) of each daemon log line; 1 ms resolution."""
    return [(time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000, m[5])
            for m in LOG_LINE.finditer(text)]


def write_like_an_editor(path: Path, text: str) -> None:
    """Write a file as editors save it: a hidden temp file next to it, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- the daemon's process and metrics ---------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the daemon binds it next)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(address: str, *, timeout: float = 5.0) -> dict[str, float]:
    """Prometheus text from http://ADDRESS/metrics: {'name{labels}': value}."""
    import urllib.request

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as reply:
        text = reply.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (VmRSS, RssAnon, Threads, ...; values as text)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def kib(value: str) -> int:
    """'12345 kB' -> 12345."""
    return int(value.split()[0])


def fd_targets(pid: int) -> list[str]:
    """What each of the process's open fds points to (readlink of /proc/PID/fd/N)."""
    targets = []
    base = Path(f"/proc/{pid}/fd")
    for entry in os.listdir(base):
        try:
            targets.append(os.readlink(base / entry))
        except FileNotFoundError:  # closed in between
            continue
    return targets


def fd_kind(target: str) -> str:
    """A readlink target, grouped: 'socket', 'pipe', 'anon_inode:[pidfd]', a path, ..."""
    if target.startswith(("socket:", "pipe:")):
        return target.split(":")[0]
    return target


def run(cmd: Sequence[str], *, timeout: float = 120.0, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout, check=False, env=env)


# `reconcile ...` output's last line: "recap: 2 ok, 0 changed, 0 pending, 0 failed".
RECAP = re.compile(r"^recap: (\d+) ok, (\d+) changed, (\d+) pending, (\d+) failed", re.M)


def recap(out: subprocess.CompletedProcess[str]) -> tuple[int, int, int, int]:
    """(ok, changed, pending, failed) from a `reconcile --once` run's recap line."""
    match = RECAP.search(out.stdout)
    if not match:
        raise BenchError(f"no recap line in reconcile output:\n{out.stdout}{out.stderr}")
    return tuple(int(g) for g in match.groups())  # type: ignore[return-value]


# --- another revision's source tree -------------------------------------------
#
# A before/after comparison runs an older commit's `reconciler` package (a `git
# archive` of it in a temp dir) with this interpreter's dependencies, next to this
# checkout's.

def rev_before_adding(path: str) -> str:
    """The parent of the commit that added path (e.g. 'reconciler/privsep.py')."""
    added = subprocess.run(
        ["git", "-C", str(REPO), "log", "--diff-filter=A", "--format=%H", "--", path],
        capture_output=True, text=True, check=True).stdout.split()
    if not added:
        raise BenchError(f"no commit adds {path}; give --before REV")
    return f"{added[-1]}~1"


def short_rev(rev: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev],
                          capture_output=True, text=True).stdout.strip()


def export(rev: str, into: Path) -> Path:
    """The reconciler package of rev, under into/."""
    blob = subprocess.run(["git", "-C", str(REPO), "archive", rev, "reconciler"],
                          capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into


def command(tree: Path) -> list[str]:
    """`reconcile` from tree, with this interpreter's dependencies."""
    return [sys.executable, "-c",
            f"import sys; sys.path.insert(0, {str(tree)!r}); "
            "from reconciler.cli import main; main()"]


def bytecode_env() -> dict[str, str]:
    """This environment without PYTHONDONTWRITEBYTECODE (nor a PYTHONPYCACHEPREFIX):
    children load and keep .pyc files next to the sources, as an installed package
    does, instead of compiling every module they import on every start."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPYCACHEPREFIX", None)
    return env


def precompile(tree: Path) -> None:
    """`python -m compileall -q TREE/reconciler` (with bytecode_env())."""
    done = run([sys.executable, "-m", "compileall", "-q", str(tree / "reconciler")],
               env=bytecode_env())
    if done.returncode != 0:
        raise BenchError(f"compileall {tree / 'reconciler'} exited {done.returncode}:\n"
                         f"{done.stdout}{done.stderr}")


# --- network namespaces -----------------------------------------------------
#
# Anything a benchmark does with bridges and taps happens inside a network
# namespace it made itself (`ip netns add`), never on the host's interfaces;
# the namespace is deleted at the end, with whatever still runs in it.

def netns_add(prefix: str) -> str:
    """Create a network namespace named PREFIX-<8 hex>; returns its name."""
    import uuid

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    done = run(["ip", "netns", "add", name], timeout=30)
    if done.returncode != 0:
        raise BenchError(f"ip netns add {name} failed (root needed): {done.stderr.strip()}")
    return name


def netns_links(ns: str) -> dict[str, dict[str, Any]]:
    """The interfaces in namespace ns (`ip -d -j link`), by name."""
    done = run(["ip", "-n", ns, "-d", "-j", "link", "show"], timeout=30)
    if done.returncode != 0:
        raise BenchError(f"ip -n {ns} link failed: {done.stderr.strip()}")
    return {link["ifname"]: link for link in json.loads(done.stdout or "[]")}


def netns_flush_links(ns: str) -> list[str]:
    """Delete every interface in namespace ns but `lo` (ports before bridges); their names."""
    links = netns_links(ns)
    doomed = sorted((n for n in links if n != "lo"),
                    key=lambda n: links[n].get("linkinfo", {}).get("info_kind") == "bridge")
    for name in doomed:
        done = run(["ip", "-n", ns, "link", "del", name], timeout=30)
        if done.returncode != 0 and name in netns_links(ns):
            raise BenchError(f"ip -n {ns} link del {name} failed: {done.stderr.strip()}")
    return doomed


def netns_pids(ns: str) -> list[int]:
    """The processes inside namespace ns (`ip netns pids`)."""
    done = run(["ip", "netns", "pids", ns], timeout=30)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def netns_delete(ns: str, *, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process still in namespace ns (only what we started can be in a
    namespace we made), wait for them, then delete it. Returns the killed pids."""
    killed = []
    for pid in netns_pids(ns):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(pid)
    deadline = time.monotonic() + timeout
    for pid in killed:
        while proc_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
    done = run(["ip", "netns", "del", ns], timeout=30)
    if done.returncode != 0:
        raise BenchError(f"ip netns del {ns} failed: {done.stderr.strip()}")
    return killed


# --- reporting ------------------------------------------------------------

def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: int = 1) -> str:
    """A plain text table; columns from index `right` on are right-aligned."""
    cells = [list(header)] + [list(r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        parts = [c.rjust(w) if i >= right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def python_pass(env: dict[str, str] | None = None) -> float:
    """One `python -c pass` with this interpreter: the baseline of start-up figures."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True, env=env)
    return time.perf_counter() - t0


def before_after_table(labels: Sequence[tuple[str, str]],
                       got: dict[str, dict[str, list[float]]], base: float) -> str:
    """Median before and after of each (key, label), their difference, and each as a
    ratio to base (the `python -c pass` median of the same run)."""
    rows = []
    for key, label in labels:
        b, a = median(got["before"][key]), median(got["after"][key])
        rows.append([label, ms(b), ms(a), f"{(a - b) * 1000:+.1f}", f"{b / base:.1f}x",
                     f"{a / base:.1f}x"])
    rows.append(["python -c pass (baseline)", ms(base), ms(base), "", "1.0x", "1.0x"])
    return table(["figure (median)", "before ms", "after ms", "after-before",
                  "before/pass", "after/pass"], rows)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def verdict(value_ms: float, goal_ms: float) -> str:
    return "OK" if value_ms < goal_ms else "MISSED"


def finish(root: Path, *, keep: bool) -> None:
    """End of a run, error or not: kill QEMUs left under root, then keep or remove it."""
    leftovers = kill_qemus(our_qemus(str(root)), str(root))
    if leftovers:
        print(f"cleanup: killed leftover QEMU pids {leftovers}", file=sys.stderr)
    if keep:
        print(f"kept {root}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)


def run_main(main: Callable[[], int], name: str) -> None:
    """A benchmark's entry point: exit 0 measured, 1 on errors, 130/143 interrupted."""
    exit_on_signals()
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except (BenchError, OSError, ValueError, KeyError, subprocess.SubprocessError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(1)
