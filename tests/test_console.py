"""The serial console client: escape handling, relaying, terminal modes, and a real VM."""

from __future__ import annotations

import os
import select
import socket
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Run, vm_manifest, wait_for, wait_for_serial
from hypothesis import given
from hypothesis import strategies as st

from reconciler import console
from reconciler.console import EscapeFilter, attach

Reconcile = Callable[..., Run]
TIMEOUT = 10.0


# --- the escape state machine ----------------------------------------------

@pytest.mark.parametrize(("typed", "sent", "detach"), [
    pytest.param(b"~.", b"", True, id="at-the-very-start"),
    pytest.param(b"ls\n~.", b"ls\n", True, id="after-newline"),
    pytest.param(b"ls\r~.", b"ls\r", True, id="after-carriage-return"),
    pytest.param(b"ls\n~.rest", b"ls\n", True, id="what-follows-is-dropped"),
    pytest.param(b"a~.b", b"a~.b", False, id="mid-line-verbatim"),
    pytest.param(b"~~", b"~", False, id="double-sends-one"),
    pytest.param(b"~~.", b"~.", False, id="double-then-dot-is-text"),
    pytest.param(b"~x", b"~x", False, id="other-byte-sends-both"),
    pytest.param(b"~\n~.", b"~\n", True, id="escape-newline-then-detach"),
    pytest.param(b"x\n~~\n~.", b"x\n~\n", True, id="literal-then-detach"),
    pytest.param(b"\n\r\n~.", b"\n\r\n", True, id="blank-lines"),
])
def test_escape_filter(typed: bytes, sent: bytes, detach: bool) -> None:
    assert EscapeFilter().feed(typed) == (sent, detach)


def test_escape_filter_across_feeds() -> None:
    keys = EscapeFilter()
    assert keys.feed(b"echo hi\n~") == (b"echo hi\n", False)  # the ~ waits for its meaning
    assert keys.feed(b".") == (b"", True)

    keys = EscapeFilter()
    assert keys.feed(b"~") == (b"", False)
    assert keys.feed(b"~") == (b"~", False)
    assert keys.feed(b"~.") == (b"~.", False)  # mid-line after the literal ~
    assert keys.feed(b"\r") == (b"\r", False)
    assert keys.feed(b"~") == (b"", False)
    assert keys.flush() == b"~"
    assert keys.flush() == b""


def test_escape_filter_other_escape_byte() -> None:
    assert EscapeFilter(b"%").feed(b"~.\n%%%.") == (b"~.\n%%.", False)
    assert EscapeFilter(b"%").feed(b"x\r%.") == (b"x\r", True)
    with pytest.raises(ValueError, match="single byte"):
        EscapeFilter(b"~~")


@given(st.lists(st.binary(max_size=8).map(lambda b: b.replace(b"z", b"~").replace(b"y", b".")),
                max_size=8))
def test_escape_filter_does_not_depend_on_how_input_is_split(chunks: list[bytes]) -> None:
    whole = EscapeFilter().feed(b"".join(chunks))
    keys, sent = EscapeFilter(), b""
    for chunk in chunks:
        part, detach = keys.feed(chunk)
        sent += part
        if detach:
            break
    else:
        assert whole == (sent, False)
        return
    assert whole == (sent, True)


@given(st.binary().filter(lambda b: b"~" not in b))
def test_input_without_the_escape_byte_passes_verbatim(data: bytes) -> None:
    assert EscapeFilter().feed(data) == (data, False)


# --- relaying against a fake console server ---------------------------------

class Session:
    """attach() in a thread, stdin and stdout pipes held by the test."""

    def __init__(self, sock: Path, *, stdin_fd: int | None = None) -> None:
        self.in_r, self.in_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        self.output = b""
        self.outcome: list[str | BaseException] = []
        stdin = self.in_r if stdin_fd is None else stdin_fd
        self.thread = threading.Thread(target=self._run, args=(sock, stdin), daemon=True)
        self.thread.start()

    def _run(self, sock: Path, stdin_fd: int) -> None:
        try:
            self.outcome.append(attach(sock, stdin_fd=stdin_fd, stdout_fd=self.out_w))
        except BaseException as err:
            self.outcome.append(err)

    def type(self, data: bytes) -> None:
        os.write(self.in_w, data)

    def close_stdin(self) -> None:
        self._close("in_w")

    def _close(self, which: str) -> None:
        """Close a pipe end once: a second close could hit a reused descriptor."""
        fd = getattr(self, which)
        if fd >= 0:
            setattr(self, which, -1)
            os.close(fd)

    def read_until(self, needle: bytes, *, timeout: float = TIMEOUT) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.out_r], [], [], left)[0]:
                raise AssertionError(f"{needle!r} never came; got {self.output!r}")
            chunk = os.read(self.out_r, 65536)
            if not chunk:
                raise AssertionError(f"stdout closed before {needle!r}; got {self.output!r}")
            self.output += chunk
        return self.output

    def result(self, *, timeout: float = TIMEOUT) -> str:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.close_stdin()  # ends a hung session: it reads eof and stops
            raise AssertionError(f"attach() still running after {timeout}s")
        (outcome,) = self.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def close(self) -> None:
        self.close_stdin()
        self.thread.join(TIMEOUT)
        for which in ("in_r", "out_r", "out_w"):
            self._close(which)


@pytest.fixture
def fake_vm(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    """A listening console socket laid out like a VM's in a state dir."""
    sock = tmp_path / "vms" / "fake" / "serial.sock"
    sock.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(sock))
        server.listen(1)
        server.settimeout(TIMEOUT)
        yield sock, server


@pytest.fixture
def session() -> Iterator[Callable[..., Session]]:
    opened: list[Session] = []

    def open_session(sock: Path, **kwargs: int) -> Session:
        opened.append(Session(sock, **kwargs))
        return opened[-1]

    yield open_session
    for s in opened:
        s.close()


def recv_until(peer: socket.socket, needle: bytes) -> bytes:
    got = b""
    peer.settimeout(TIMEOUT)
    while needle not in got:
        chunk = peer.recv(4096)
        assert chunk, f"client closed before {needle!r}; got {got!r}"
        got += chunk
    return got


def test_relays_both_ways_and_detaches(
    fake_vm: tuple[Path, socket.socket], session: Callable[..., Session],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sock, server = fake_vm
    s = session(sock)
    peer, _ = server.accept()
    with peer:
        peer.sendall(b"login: ")
        s.read_until(b"login: ")
        s.type(b"root\r")
        assert recv_until(peer, b"\r") == b"root\r"
        s.type(b"a~.b~~\n~~x\n")
        assert recv_until(peer, b"x\n") == b"a~.b~~\n~x\n"
        s.type(b"~.")
        assert s.result() == "detached"
        peer.settimeout(TIMEOUT)
        assert peer.recv(4096) == b""  # the connection is closed on the way out
    assert capsys.readouterr().err == "reconcile: connected to vm 'fake' (detach with ~.)\n"


def test_ends_when_the_vm_closes_the_console(
    fake_vm: tuple[Path, socket.socket], session: Callable[..., Session]
) -> None:
    sock, server = fake_vm
    s = session(sock)
    peer, _ = server.accept()
    peer.sendall(b"reboot: Power down\r\n")
    peer.close()
    assert s.result() == "vm closed the console"
    assert s.read_until(b"\n") == b"reboot: Power down\r\n"


def test_eof_on_stdin_ends_after_sending_what_was_typed(
    fake_vm: tuple[Path, socket.socket], session: Callable[..., Session]
) -> None:
    sock, server = fake_vm
    s = session(sock)
    peer, _ = server.accept()
    with peer:
        s.type(b"uptime\n~")  # the held ~ goes too: nothing can complete the escape
        s.close_stdin()
        assert s.result() == "eof on stdin"
        assert recv_until(peer, b"~") == b"uptime\n~"


@pytest.mark.parametrize("kind", ["dev-null", "regular-file"])
def test_stdin_may_be_dev_null_or_a_file(
    fake_vm: tuple[Path, socket.socket], session: Callable[..., Session], tmp_path: Path,
    kind: str,
) -> None:
    sock, server = fake_vm
    path = Path(os.devnull)
    if kind == "regular-file":
        path = tmp_path / "typed"
        path.write_bytes(b"echo from a file\n")
    fd = os.open(path, os.O_RDONLY)
    try:
        s = session(sock, stdin_fd=fd)
        peer, _ = server.accept()
        with peer:
            assert s.result() == "eof on stdin"
            peer.settimeout(TIMEOUT)
            got = b""
            while chunk := peer.recv(4096):
                got += chunk
            assert got == path.read_bytes()
    finally:
        os.close(fd)


def test_a_vm_that_reads_nothing_does_not_stop_its_output(
    fake_vm: tuple[Path, socket.socket], session: Callable[..., Session]
) -> None:
    sock, server = fake_vm
    s = session(sock)
    peer, _ = server.accept()
    with peer:
        sent = threading.Thread(target=lambda: s.type(b"x" * 2_000_000), daemon=True)
        sent.start()  # more than the socket buffers hold; the peer does not read yet
        peer.sendall(b"still talking\r\n")
        s.read_until(b"still talking")
        got = 0
        peer.settimeout(TIMEOUT)
        while got < 2_000_000:
            got += len(peer.recv(1 << 16))
        sent.join(TIMEOUT)
        s.type(b"\n~.")
        assert s.result() == "detached"


def test_a_terminal_is_raw_while_attached_and_restored_after(
    fake_vm: tuple[Path, socket.socket], session: Callable[..., Session]
) -> None:
    sock, server = fake_vm
    master, slave = os.openpty()
    try:
        before = termios.tcgetattr(slave)
        assert before[3] & termios.ICANON
        s = session(sock, stdin_fd=slave)
        peer, _ = server.accept()
        with peer:
            peer.sendall(b"# ")
            s.read_until(b"# ")
            during = termios.tcgetattr(slave)
            assert not during[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
            os.write(master, b"\x03\x04ls\r")  # ^C, ^D: bytes for the guest, no signal, no eof
            assert recv_until(peer, b"\r") == b"\x03\x04ls\r"
            os.write(master, b"~.")
            assert s.result() == "detached"
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


# --- main(): the command's errors and its ending line ------------------------

def test_main_on_a_vm_that_does_not_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("nope", "..", ""):
        assert console.main(tmp_path / "state", name) == 1
        assert capsys.readouterr().err == (
            f"reconcile: no vm '{name}' in {tmp_path / 'state'}\n")


def test_main_on_a_vm_without_its_console_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "vms" / "gone").mkdir(parents=True)
    assert console.main(tmp_path, "gone") == 1
    assert capsys.readouterr().err == (
        "reconcile: vm 'gone' is not running (its console socket is gone)\n")


def test_main_on_a_stale_socket_that_nobody_serves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "vms" / "dead" / "serial.sock"
    sock.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left_behind:
        left_behind.bind(str(sock))  # QEMU was killed: the file stays, nobody listens
    assert console.main(tmp_path, "dead") == 1
    assert capsys.readouterr().err == (
        "reconcile: vm 'dead' is not running (nothing listens on its console socket)\n")


def test_main_on_a_socket_it_may_not_open(
    tmp_path: Path, fake_vm: tuple[Path, socket.socket], capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() == 0:
        pytest.skip("root connects regardless of permissions")
    fake_vm[0].chmod(0)
    assert console.main(tmp_path, "fake") == 1
    assert "Permission denied" in capsys.readouterr().err


class Fd:
    """Stands in for sys.stdin/sys.stdout: main() only asks for the descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def test_main_detaches_and_says_so(
    tmp_path: Path, fake_vm: tuple[Path, socket.socket], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = fake_vm[1]
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        monkeypatch.setattr(sys, "stdin", Fd(in_r))
        monkeypatch.setattr(sys, "stdout", Fd(out_w))
        os.write(in_w, b"date\n~.")
        code: list[int] = []
        thread = threading.Thread(target=lambda: code.append(console.main(tmp_path, "fake")),
                                  daemon=True)
        thread.start()
        peer, _ = server.accept()
        with peer:
            assert recv_until(peer, b"date\n") == b"date\n"
            thread.join(TIMEOUT)
        monkeypatch.undo()
        assert code == [0]
    finally:
        os.close(in_w)  # ends main() if it hangs
        for fd in (in_r, out_r, out_w):
            os.close(fd)
    assert capsys.readouterr().err.splitlines() == [
        "reconcile: connected to vm 'fake' (detach with ~.)",
        "reconcile: detached from vm 'fake'",
    ]


# --- a real VM --------------------------------------------------------------

@pytest.mark.qemu
def test_a_real_vm_console_runs_a_command_and_detaches(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile,
    session: Callable[..., Session],
) -> None:
    (tmp_path / "vm.yaml").write_text(vm_manifest("tty", guest))
    reconcile("--once", tmp_path / "vm.yaml", check=0)
    wait_for_serial(state_dir, "tty")
    wait_for_serial(state_dir, "tty", "/ # ")  # the shell's first prompt: it reads now
    s = session(state_dir / "vms" / "tty" / "serial.sock")
    s.type(b"echo hello-$((6*7))\n")
    shown = s.read_until(b"hello-42\r\n", timeout=30)
    s.type(b"~.")
    assert s.result() == "detached"
    # The shell echoes the line as typed (its own line editing), then prints the result.
    assert b"echo hello-$((6*7))\r\nhello-42\r\n" in shown
    # QEMU logs each chunk just after sending it to the client: the log may lag a little.
    log = state_dir / "vms" / "tty" / "serial.log"  # as bytes: serial() drops the \r
    wait_for(lambda: b"echo hello-$((6*7))\r\nhello-42\r\n" in log.read_bytes(),
             timeout=TIMEOUT, what="the session in serial.log")


@pytest.mark.qemu
def test_a_real_vm_powering_off_closes_the_console(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile,
    session: Callable[..., Session],
) -> None:
    (tmp_path / "vm.yaml").write_text(vm_manifest("bye", guest))
    reconcile("--once", tmp_path / "vm.yaml", check=0)
    wait_for_serial(state_dir, "bye", "/ # ")
    s = session(state_dir / "vms" / "bye" / "serial.sock")
    s.type(b"poweroff -f\n")  # QEMU runs with -no-reboot: it exits, closing the socket
    assert s.result(timeout=30) == "vm closed the console"
    assert b"reboot: Power down" in s.read_until(b"Power down")
