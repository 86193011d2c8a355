"""`reconcile console NAME`: the user's terminal on a running VM's serial console, like cu.

A CLI helper beside the loop, not a stage of desired -> observed -> plan -> apply:
it reads no manifest, takes no state-dir lock and changes no VM. It only connects to
the VM's serial socket (`<state dir>/vms/<name>/serial.sock`, a QEMU chardev server
that takes one client at a time and logs to serial.log whether or not anyone is
attached) and relays bytes both ways until the user types `~.` at the start of a
line, stdin ends, or the VM closes the console (QEMU exited).

Escapes, as in cu and ssh, only right after a newline or carriage return (or at the
very start): `~.` detaches, `~~` sends one `~`, `~` then any other byte sends both.

Standard library only (no asyncio, no QMP): it is cheap to start.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path

from reconciler.observed import StateDir, StateDirError

DETACHED = "detached"
STDIN_EOF = "eof on stdin"
VM_CLOSED = "vm closed the console"
STDOUT_CLOSED = "stdout closed"

_CHUNK = 4096
_FLUSH_TIMEOUT = 1.0
_LINE_ENDS = frozenset(b"\r\n")


class EscapeFilter:
    """The cu-style escape state machine on the bytes typed by the user (pure).

    `feed()` returns the bytes to send to the VM and whether `~.` asked to detach;
    what follows a `~.` in the same chunk is dropped. An escape byte at the end of a
    chunk is held until the next byte shows what it means.
    """

    def __init__(self, escape: bytes = b"~") -> None:
        if len(escape) != 1:
            raise ValueError(f"the escape must be a single byte, not {escape!r}")
        self.escape = escape[0]
        self.at_line_start = True
        self.pending = False  # an escape byte seen at the start of a line

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        out = bytearray()
        for byte in data:
            if self.pending:
                self.pending = False
                if byte == ord("."):
                    return bytes(out), True
                out.append(self.escape)
                if byte == self.escape:  # `~~`: one literal `~`, mid-line now
                    self.at_line_start = False
                    continue
            elif self.at_line_start and byte == self.escape:
                self.pending = True
                continue
            out.append(byte)
            self.at_line_start = byte in _LINE_ENDS
        return bytes(out), False

    def flush(self) -> bytes:
        """A held escape byte, to send when no more input will come."""
        held, self.pending = self.pending, False
        return bytes([self.escape]) if held else b""


def connect(sock: Path) -> socket.socket:
    """A connection to a console socket; OSError (e.g. ConnectionRefusedError) if none."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(sock))
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """Raw mode on fd while inside, if it is a terminal; restored even on errors."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def relay(conn: socket.socket, *, stdin_fd: int = 0, stdout_fd: int = 1,
          escape: bytes = b"~") -> str:
    """Copy stdin -> conn (through the escape filter) and conn -> stdout until one ends.

    The socket is non-blocking with a send buffer: a VM that stops reading its
    console never stops its output from being shown. stdin/stdout keep their modes
    (O_NONBLOCK on a shared terminal would leak to the shell). PollSelector, not
    epoll, so stdin may be a regular file or /dev/null. EINTR is retried by Python
    itself (PEP 475).
    """
    keys = EscapeFilter(escape)
    conn.setblocking(False)
    to_vm = b""
    reason = ""
    with selectors.PollSelector() as sel:
        sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
        sel.register(conn, selectors.EVENT_READ, "vm")
        reading_stdin = True
        while not reason:
            for key, events in sel.select():
                if key.data == "vm" and events & selectors.EVENT_READ:
                    try:
                        data = conn.recv(_CHUNK)
                    except BlockingIOError:
                        continue
                    except OSError:  # ECONNRESET and the like: the VM side is gone
                        data = b""
                    if not data:
                        return VM_CLOSED
                    try:
                        _write_all(stdout_fd, data)
                    except OSError:  # EPIPE, or EIO from a terminal that hung up
                        return STDOUT_CLOSED
                elif key.data == "vm" and events & selectors.EVENT_WRITE and to_vm:
                    try:
                        to_vm = to_vm[conn.send(to_vm):]
                    except BlockingIOError:
                        pass
                    except OSError:
                        return VM_CLOSED
                elif key.data == "stdin" and not reason:
                    try:
                        data = os.read(stdin_fd, _CHUNK)
                    except OSError:  # EIO from a terminal that hung up: as good as eof
                        data = b""
                    if data:
                        send, detach = keys.feed(data)
                        reason = DETACHED if detach else ""
                    else:
                        send, reason = keys.flush(), STDIN_EOF
                    to_vm += send
            # Back-pressure: read stdin only while nothing waits to go to the VM.
            if reading_stdin != (not to_vm and not reason):
                reading_stdin = not reading_stdin
                if reading_stdin:
                    sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
                else:
                    sel.unregister(stdin_fd)
            write = selectors.EVENT_WRITE if to_vm else 0
            sel.modify(conn, selectors.EVENT_READ | write, "vm")
    if to_vm:  # what was typed before the end still goes, unless the VM will not take it
        conn.settimeout(_FLUSH_TIMEOUT)
        with contextlib.suppress(OSError):
            conn.sendall(to_vm)
    return reason


def attach(sock: Path, *, stdin_fd: int = 0, stdout_fd: int = 1, escape: bytes = b"~") -> str:
    """Attach this terminal to the console at sock; say why it ended.

    Returns "detached" (`~.`), "eof on stdin", "vm closed the console" (QEMU exited)
    or "stdout closed". Raises OSError if the socket cannot be connected.
    """
    with connect(sock) as conn:
        return _session(conn, sock.parent.name, stdin_fd=stdin_fd, stdout_fd=stdout_fd,
                        escape=escape)


def _session(conn: socket.socket, name: str, *, stdin_fd: int, stdout_fd: int,
             escape: bytes) -> str:
    EscapeFilter(escape)  # a bad escape fails before the terminal is touched
    shown = escape.decode(errors="replace")
    print(f"reconcile: connected to vm '{name}' (detach with {shown}.)",
          file=sys.stderr, flush=True)
    with _raw(stdin_fd):
        return relay(conn, stdin_fd=stdin_fd, stdout_fd=stdout_fd, escape=escape)


def _error(message: str) -> int:
    print(f"reconcile: {message}", file=sys.stderr)
    return 1


def main(state_dir: Path, name: str) -> int:
    """`reconcile console NAME`: 0 when the session ended, 1 (and one line) if there is none."""
    try:
        state = StateDir(state_dir)
    except StateDirError as err:
        return _error(str(err))
    paths = state.paths(name)
    if not name or "/" in name or name in (".", "..") or not paths.dir.is_dir():
        return _error(f"no vm '{name}' in {state.root}")
    if not os.access(paths.dir, os.X_OK):
        return _error(f"vm '{name}' is not yours: only root and its owner's group may "
                      "attach to its console")
    gone = f"vm '{name}' is not running"
    if not paths.serial.exists():
        return _error(f"{gone} (its console socket is gone)")
    try:
        conn = connect(paths.serial)
    except (ConnectionRefusedError, FileNotFoundError):
        return _error(f"{gone} (nothing listens on its console socket)")
    except OSError as err:
        return _error(f"cannot connect to the console of vm '{name}' at {paths.serial}: "
                      f"{err.strerror or err}")
    with conn:
        reason = _session(conn, name, stdin_fd=sys.stdin.fileno(),
                          stdout_fd=sys.stdout.fileno(), escape=b"~")
    lead = "\n" if sys.stderr.isatty() else ""  # off the guest's prompt line
    if reason == DETACHED:
        print(f"{lead}reconcile: detached from vm '{name}'", file=sys.stderr)
    else:
        print(f"{lead}reconcile: disconnected from vm '{name}': {reason}", file=sys.stderr)
    return 0
