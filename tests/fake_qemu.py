"""A fake `qemu-system-x86_64` for the failure tests, and the helpers that install it.

Run as a script (through the wrapper `install()` writes), it takes the command line
`kvm.qemu_argv` builds, writes the pidfile, serves QMP on the `-chardev ...,id=qmp`
socket well enough for `qemu.qmp`, makes the serial socket and appends the guest's
"up" marker to the serial log. It ends the way QEMU does: a clean exit removes the
pidfile and traces `qemu_system_shutdown_request reason=N` to stderr (qemu.log).

Its misbehaviour is chosen with FAKE_QEMU, comma-separated words:

    exit-at-once        print "boom" and exit 1 before making any socket
    no-qmp              never make the QMP socket; live until killed
    deaf-qmp            accept QMP connections, never send the greeting
    ignore-powerdown    system_powerdown is acknowledged, nothing happens
    ignore-quit         quit is acknowledged, nothing happens
    ignore-sigterm      SIGTERM/SIGINT ignored: only SIGKILL ends it
    slow-incoming=S     with -incoming: `inmigrate` for S seconds, then `paused`
    fail-incoming       with -incoming: exit 1 after 0.5 s, "load of migration failed"

FAKE_QEMU_LOG=path: one JSON line per start ({"event": "start", "pid", "argv",
"fake"}) and per QMP command ({"event": "qmp", "pid", "execute", "arguments"}).

Only the standard library is imported (the script starts with `python -S`); the
helpers at the bottom are for the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

MARKER_LINE = "reconciler-guest: up uptime=0.1\n"
SAVED_MAGIC = b"FAKE-QEMU-SAVED-STATE v1\n"
SAVED_SIZE = 8192
INCOMING_DELAY = 0.2  # a restore's load takes this long unless slow-incoming says
BOOT_DELAY = 0.1  # from start to the "up" marker on the console
POWEROFF_DELAY = 0.1  # from the power button to the exit
MAX_LIFE = 900.0  # a fake that every test forgot still ends (seconds, FAKE_QEMU_MAX_LIFE)
GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": []}}

# ShutdownCause numbers, as QEMU traces them.
CAUSE_HOST_ERROR, CAUSE_QUIT, CAUSE_SIGNAL, CAUSE_POWEROFF = 1, 2, 4, 6


def split_option(value: str) -> list[str]:
    """`a=b,c=d,,e` -> ["a=b", "c=d,e"]: QEMU's option syntax, where `,,` is a comma."""
    parts, current, i = [], [], 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(value[i])
        i += 1
    parts.append("".join(current))
    return parts


def parse_argv(argv: list[str]) -> dict[str, Any]:
    """What the fake needs from QEMU's command line; everything else is ignored."""
    found: dict[str, Any] = {"chardevs": {}, "pidfile": None, "name": None,
                             "incoming": None, "paused": False, "fdsets": {}}
    flags_with_value = {"-chardev", "-pidfile", "-name", "-incoming", "-add-fd"}
    i = 0
    while i < len(argv):
        flag = argv[i]
        value = argv[i + 1] if i + 1 < len(argv) else ""
        if flag == "-S":
            found["paused"] = True
        elif flag == "-chardev":
            kind, *options = split_option(value)
            opts = dict(o.partition("=")[::2] for o in options)
            opts["backend"] = kind
            found["chardevs"][opts.get("id", "")] = opts
        elif flag == "-add-fd":
            opts = dict(o.partition("=")[::2] for o in split_option(value))
            found["fdsets"].setdefault(f"/dev/fdset/{opts['set']}", int(opts["fd"]))
        elif flag == "-pidfile":
            found["pidfile"] = value
        elif flag == "-name":
            found["name"] = split_option(value)[0].removeprefix("guest=")
        elif flag == "-incoming":
            found["incoming"] = value
        if flag in flags_with_value:
            i += 2
        elif flag == "-S":
            i += 1
        elif flag.startswith("-") and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            i += 2  # an option we ignore, with its value
        else:
            i += 1
    return found


def parse_behaviour(text: str) -> dict[str, str]:
    words: dict[str, str] = {}
    for word in filter(None, (w.strip() for w in text.split(","))):
        key, _, value = word.partition("=")
        words[key] = value
    return words


class FakeQemu:
    def __init__(self, argv: list[str], behaviour: dict[str, str]) -> None:
        self.argv, self.behaviour = argv, behaviour
        self.opts = parse_argv(argv)
        self.log_path = os.environ.get("FAKE_QEMU_LOG")
        self.lock = threading.RLock()
        self.client: socket.socket | None = None
        self.sockets: list[str] = []
        self.fds: list[int] = []  # received over SCM_RIGHTS, not yet named by getfd
        self.named_fds: dict[str, int] = {}
        self.migration: dict[str, Any] = {}
        self.powerdown_pending = False
        self._after: Any = None  # run once the current command's reply is sent
        self.autostart = not self.opts["paused"]
        if self.opts["incoming"]:
            self.status = "inmigrate"
        else:
            self.status = "prelaunch" if self.opts["paused"] else "running"

    # --- effects ------------------------------------------------------------

    def note(self, **entry: Any) -> None:
        if not self.log_path:
            return
        line = json.dumps({"pid": os.getpid(), "time": time.time(), **entry}) + "\n"
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def say(self, text: str) -> None:
        os.write(2, (text + "\n").encode())

    def finish(self, code: int, cause: int | None, *, clean: bool = True) -> None:
        """End the process as QEMU does: trace the cause, drop pidfile and sockets."""
        with self.lock:
            if cause is not None:
                self.say(f"qemu_system_shutdown_request reason={cause}")
            if clean and self.opts["pidfile"]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.opts["pidfile"])
            for path in self.sockets:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            os._exit(code)

    def send(self, message: dict[str, Any], client: socket.socket | None = None) -> None:
        with self.lock:
            target = client or self.client
            if target is None:
                return
            with contextlib.suppress(OSError):
                target.sendall(json.dumps(message).encode() + b"\r\n")

    def event(self, name: str, data: dict[str, Any] | None = None) -> None:
        now = time.time()
        message: dict[str, Any] = {"event": name, "timestamp": {
            "seconds": int(now), "microseconds": int(now % 1 * 1e6)}}
        if data is not None:
            message["data"] = data
        self.send(message)

    def later(self, seconds: float, action: Any) -> None:
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        timer.start()

    def boot(self) -> None:
        """The guest reaches user space: its marker on the console."""
        log = self.opts["chardevs"].get("serial0", {}).get("logfile")
        if log in self.opts["fdsets"]:  # handed over by the reconciler (privsep)
            os.write(self.opts["fdsets"][log], MARKER_LINE.encode())
        elif log:
            with open(log, "a") as f:
                f.write(MARKER_LINE)

    # --- start --------------------------------------------------------------

    def run(self) -> None:
        self.note(event="start", argv=self.argv, fake=self.behaviour)
        if "exit-at-once" in self.behaviour:
            self.say("fake-qemu: boom: cannot open /dev/fake: No such file or directory")
            os._exit(1)
        self.signals()
        max_life = float(os.environ.get("FAKE_QEMU_MAX_LIFE", MAX_LIFE))
        self.later(max_life, lambda: self.finish(3, None, clean=False))
        if self.opts["pidfile"]:
            Path(self.opts["pidfile"]).write_text(f"{os.getpid()}\n")
        serial = self.opts["chardevs"].get("serial0")
        if serial is not None:
            if serial.get("logfile") and serial["logfile"] not in self.opts["fdsets"]:
                open(serial["logfile"], "a").close()
            self.listen(serial, self.drain)
        if self.opts["incoming"]:
            self.incoming()
        elif self.status == "running":
            self.later(BOOT_DELAY, self.boot)
        qmp = self.opts["chardevs"].get("qmp")
        if "no-qmp" in self.behaviour or qmp is None:
            while True:
                time.sleep(3600)
        server = self.listen(qmp, None)
        while True:
            client, _ = server.accept()
            self.serve(client)

    def signals(self) -> None:
        if "ignore-sigterm" in self.behaviour:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)
            return

        def terminated(signum: int, frame: Any) -> None:
            self.say(f"qemu-system-x86_64: terminating on signal {signum} from pid 1 (fake)")
            self.finish(0, CAUSE_SIGNAL)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, terminated)

    def listen(self, chardev: dict[str, str], serve: Any) -> socket.socket:
        """The chardev's socket: handed over listening (fd=N), or made at path=."""
        if "fd" in chardev:
            server = socket.socket(fileno=int(chardev["fd"]))
        else:
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(chardev["path"])
            server.listen(8)
            self.sockets.append(chardev["path"])
        if serve is not None:
            threading.Thread(target=self.accepting, args=(server, serve), daemon=True).start()
        return server

    def accepting(self, server: socket.socket, serve: Any) -> None:
        while True:
            client, _ = server.accept()
            threading.Thread(target=serve, args=(client,), daemon=True).start()

    def drain(self, client: socket.socket) -> None:
        """A serial console client: what it types is swallowed."""
        with client:
            while client.recv(4096):
                pass

    def incoming(self) -> None:
        """-incoming fd:N: load the saved state (a thread), then pause or fail."""
        uri = self.opts["incoming"]
        if not uri.startswith("fd:"):
            self.say(f"fake-qemu: unsupported -incoming {uri}")
            os._exit(1)
        fd = int(uri[3:])
        data = b""
        try:
            while chunk := os.read(fd, 65536):
                data += chunk
        except OSError as err:
            self.say(f"fake-qemu: cannot read the incoming fd: {err}")
        if "fail-incoming" in self.behaviour or not data.startswith(SAVED_MAGIC):
            def fail() -> None:
                self.say("fake-qemu: load of migration failed: Invalid argument")
                self.finish(1, CAUSE_HOST_ERROR)

            self.later(0.5, fail)
            return
        delay = INCOMING_DELAY
        if "slow-incoming" in self.behaviour:
            delay = float(self.behaviour["slow-incoming"] or 30)

        def loaded() -> None:
            with self.lock:
                # A saved (stopped) guest comes back paused, unless a cont came meanwhile.
                self.status = "running" if self.autostart else "paused"
                self.event("RESUME" if self.status == "running" else "STOP")

        self.autostart = False
        self.later(delay, loaded)

    # --- QMP ----------------------------------------------------------------

    def serve(self, client: socket.socket) -> None:
        """One QMP client at a time, as QEMU serves its monitor."""
        with client:
            if "deaf-qmp" in self.behaviour:
                while client.recv(4096):
                    pass
                return
            with self.lock:
                self.client = client
            self.send(GREETING, client)
            buffer = ""
            decoder = json.JSONDecoder()
            while True:
                try:
                    data, ancillary, _, _ = client.recvmsg(
                        65536, socket.CMSG_SPACE(16 * struct.calcsize("i")))
                except OSError:
                    break
                for level, kind, payload in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        count = len(payload) // struct.calcsize("i")
                        self.fds += struct.unpack(f"{count}i", payload[:count * 4])
                if not data:
                    break
                buffer += data.decode(errors="replace")
                while buffer := buffer.lstrip():
                    try:
                        message, end = decoder.raw_decode(buffer)
                    except json.JSONDecodeError:
                        break
                    buffer = buffer[end:]
                    self.command(message, client)
            with self.lock:
                if self.client is client:
                    self.client = None

    def command(self, message: dict[str, Any], client: socket.socket) -> None:
        name = message.get("execute") or message.get("exec-oob")
        arguments = message.get("arguments") or {}
        self.note(event="qmp", execute=name, arguments=arguments)
        reply: dict[str, Any]
        try:
            handler = getattr(self, "qmp_" + str(name).replace("-", "_"), None)
            if handler is None:
                reply = {"error": {"class": "CommandNotFound",
                                   "desc": f"The command {name} has not been found"}}
            else:
                reply = {"return": handler(arguments)}
        except QMPFailure as err:
            reply = {"error": {"class": "GenericError", "desc": str(err)}}
        if "id" in message:
            reply["id"] = message["id"]
        self.send(reply, client)
        after = self._after
        if after is not None:
            self._after = None
            after()

    def qmp_qmp_capabilities(self, args: dict[str, Any]) -> Any:
        return {}

    def qmp_query_status(self, args: dict[str, Any]) -> Any:
        return {"status": self.status, "running": self.status == "running",
                "singlestep": False}

    def qmp_stop(self, args: dict[str, Any]) -> Any:
        with self.lock:
            if self.status == "running":
                self.status = "paused"
                self._after = lambda: self.event("STOP")
        return {}

    def qmp_cont(self, args: dict[str, Any]) -> Any:
        with self.lock:
            if self.status == "inmigrate":
                self.autostart = True
                return {}
            if self.status == "postmigrate":
                raise QMPFailure("Migration is not finalized yet")
            first = self.status == "prelaunch"
            self.status = "running"
            self._after = lambda: self.event("RESUME")
            if first:
                self.later(BOOT_DELAY, self.boot)
            if self.powerdown_pending:
                self.powerdown_pending = False
                self.later(POWEROFF_DELAY, self.poweroff)
        return {}

    def qmp_system_powerdown(self, args: dict[str, Any]) -> Any:
        if "ignore-powerdown" in self.behaviour:
            return {}
        self._after = lambda: self.event("POWERDOWN")
        if self.status == "running":
            self.later(POWEROFF_DELAY, self.poweroff)
        else:  # a paused guest sees its power button once it runs
            self.powerdown_pending = True
        return {}

    def poweroff(self) -> None:
        self.event("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
        self.finish(0, CAUSE_POWEROFF)

    def qmp_quit(self, args: dict[str, Any]) -> Any:
        if "ignore-quit" not in self.behaviour:
            def leave() -> None:
                self.event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
                self.finish(0, CAUSE_QUIT)

            self._after = leave
        return {}

    def qmp_getfd(self, args: dict[str, Any]) -> Any:
        if not self.fds:
            raise QMPFailure("No file descriptor supplied via SCM_RIGHTS")
        old = self.named_fds.pop(args["fdname"], None)
        if old is not None:
            os.close(old)
        self.named_fds[args["fdname"]] = self.fds.pop()
        return {}

    def qmp_migrate_set_parameters(self, args: dict[str, Any]) -> Any:
        return {}

    def qmp_migrate(self, args: dict[str, Any]) -> Any:
        uri = str(args.get("uri", ""))
        if not uri.startswith("fd:") or uri[3:] not in self.named_fds:
            raise QMPFailure(f"File descriptor named '{uri[3:]}' has not been found")
        fd = self.named_fds.pop(uri[3:])
        name = (self.opts["name"] or "").encode()
        body = SAVED_MAGIC + b"guest=" + name + b"\n"
        try:
            os.write(fd, body + b"\0" * (SAVED_SIZE - len(body)))
        finally:
            os.close(fd)
        self.migration = {"status": "completed", "total-time": 5, "downtime": 5,
                          "setup-time": 0, "ram": {"transferred": SAVED_SIZE,
                                                   "total": SAVED_SIZE, "remaining": 0}}
        self.status = "postmigrate"
        return {}

    def qmp_query_migrate(self, args: dict[str, Any]) -> Any:
        return self.migration

    def qmp_migrate_cancel(self, args: dict[str, Any]) -> Any:
        return {}


class QMPFailure(Exception):
    pass


def main() -> None:
    FakeQemu(sys.argv[1:], parse_behaviour(os.environ.get("FAKE_QEMU", ""))).run()


# --- for the tests ----------------------------------------------------------

def install(bin_dir: Path) -> Path:
    """Write `qemu-system-x86_64` into bin_dir: it execs this script (same pid)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    wrapper = bin_dir / "qemu-system-x86_64"
    # It runs as the unprivileged QEMU user: Debian's python3 and a copy of this script
    # beside the wrapper, not a path under /root it could not reach.
    script = bin_dir / "fake_qemu.py"
    shutil.copyfile(__file__, script)
    script.chmod(0o644)
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    wrapper.write_text(f'#!/bin/sh\nexec "{python}" -S "{script}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def log_entries(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    """FAKE_QEMU_LOG's lines, those of one event kind when given."""
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in entries if event is None or e["event"] == event]


def processes_with(*needles: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains every needle."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X") and all(n in cmdline for n in needles):
            found.append(int(proc.name))
    return sorted(found)


def kill_all(pids: list[int]) -> None:
    """SIGKILL each pid (ones already gone are skipped)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


if __name__ == "__main__":
    main()
