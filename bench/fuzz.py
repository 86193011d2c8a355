#!/usr/bin/env python3
"""Manifest fuzzing: generated and mutated manifests through `validate` and `--once --check`.

Each case is a manifest (or a path that is not one: a FIFO, a dangling symlink, ...)
run through `reconcile validate FILE` and `reconcile --once --check --state-dir TMP
FILE`, each in a child forked from this process, which has imported the package
already: `reconciler.cli.main(argv)` runs in the child, its output goes to files,
and wait4() gives the child's peak RSS. A child is killed after --timeout seconds.

Cases (seeded): valid manifests of real fields; the same with one mistake (an
invalid value, an unknown or duplicate key, ...), which must be refused; random
values of random types with tags, anchors and aliases; a valid manifest mutated
(bytes flipped, YAML syntax inserted, lines repeated, truncated); and in every run
the named hostile cases (alias bomb, 1 MiB + 1 byte, deep nesting, huge integers,
a FIFO, ...).

A failure: an exception escaping `reconciler.cli.main` (anything but SystemExit),
"Traceback" on stderr, an exit code other than 0, 1 or 2, validate and check
disagreeing on whether the manifest is valid, a case made invalid that exits 0
(or one made valid that does not), or a child killed or timed out. Each failure is
saved in a directory (`--replay DIR` runs it again). Goals: at most 100 MB peak RSS
and 2 s per run.

Usage: python bench/fuzz.py [--cases N] [--seed S] [--jobs J] [--replay DIR]
Exit status: 0 when no case failed (goals met or not), 1 on failures or errors.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import os
import random
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import run_main, table

GOAL_RSS_KIB = 100 * 1024
GOAL_SECONDS = 2.0
MIB = 1 << 20
# Files every case dir holds, so that relative paths in the manifests resolve.
SUPPORT = {"vmlinuz": b"kernel", "initrd.img": b"initrd", "image.iso": b"iso",
           "base.raw": b"\0" * 512}
ESCAPED, RETURNED = 100, 101  # child exit codes of ours: an exception, main() returned

Special = tuple[str, ...]  # ("fifo",), ("dir",), ("symlink", target)


@dataclass
class Case:
    label: str
    files: dict[str, bytes | Special]  # relative path -> content; "@STATE@" is the state dir
    target: str = "vms.yaml"  # what the commands are given, relative to the case dir
    expect: bool | None = None  # made valid (True), made invalid (False), or unknown


# --- generating cases -----------------------------------------------------------------

# field -> (valid values, invalid values), as they are written in flow style
FIELDS: dict[str, tuple[list[str], list[str]]] = {
    "kind": (["VM"], ["Router", "vm", "[VM]"]),
    "state": (["running", "stopped", "paused", "saved"], ["runing", "on", "1"]),
    "restart": (["always", "on-failure", "never"], ["sometimes", "true"]),
    "on_change": (["restart", "defer"], ["later", "~x"]),
    "memory": (["128M", "1G", "2048", "1048576K", "512MiB", "'256M'"],
               ["8M", "lots", "1.5G", ".nan", "1e999", "-5M", "true", "!!int abc", "1" * 400]),
    "vcpus": (["1", "2", "255", "0x10"], ["0", "256", "two", "1.5", "!!bool maybe"]),
    "accel": (["auto", "kvm", "tcg"], ["hvf", "null"]),
    "boot": (["{kernel: vmlinuz}", "{kernel: ./vmlinuz, initrd: initrd.img, cmdline: quiet}",
              "{kernel: vmlinuz, cmdline: 'console=ttyS0 quiet'}"],
             ["{}", "{kernel: missing}", "{device: floppy}", "{kernel: vmlinuz, device: disk}",
              "{kernel: /proc/self/environ}", '{kernel: "vm\\0linuz"}', "{kernel: !!binary eA==}",
              "{kernel: vmlinuz, kernel: vmlinuz}"]),
    "disks": (["[]", "[{path: disk.qcow2, size: 1G}]",
               "[{path: base.raw, format: raw, readonly: true}]",
               "[{path: o.qcow2, base: base.raw, base_format: raw}]"],
              ["[{path: nope.qcow2}]", "[{path: @STATE@/x.qcow2, size: 1G}]",
               "[{path: d.qcow2, size: 0}]", "[{path: x.raw, format: raw, base: base.raw}]",
               "[{path: /dev/shm/x.qcow2, size: 1G}]", "[{path: " + "a" * 5000 + ", size: 1G}]"]),
    "cdrom": (["image.iso"], ["missing.iso", "/dev/null", "@STATE@"]),
    "interfaces": (["[]", "[{switch: lan}]", "[{switch: lan, mac: 52:54:00:12:34:56}]",
                    "[{switch: lan, mac: '52:54:00:AB:cd:01'}]"],
                   ["[{switch: wan}]", "[{switch: lan, mac: 01:00:5e:00:00:01}]",
                    "[{switch: lan, mac: 52:54}]", "[{switch: lan}]" * 2]),
    "stop_timeout": (["30s", "500ms", "2m", "0", "10", "1.5"],
                     ["-1", "2h", "1e999", ".nan", "soon", "1" + "0" * 400]),
    "ready": (["{serial: 'login:'}", "{serial: up, timeout: 60s}"],
              ["{serial: '('}", "{serial: 'a{99999999999}'}", "{timeout: 5s}",
               "{serial: '" + "(" * 600 + ")" * 600 + "'}"]),
    "labels": (["{}", "{team: web}", "{a: yes, b: 'no', c: 52:54:00:12:34:56}",
                "{a: &v x, b: *v}", "{<<: {a: b}, c: d}"],
               ["{a: 1}", "{a: [x]}", "[a]", "{a: x, a: y}", "{1: x}", "!!set {a}",
                "&r {a: *r}"]),
}
SWITCH = "kind: Switch\nname: lan\n"
RANDOM_SCALARS = ["~", "null", "true", "no", "yes", "on", "0", "012", "0x1F", "0o17", "1e999",
                  ".nan", "-.inf", "1_000", "52:54:00:12:34:56", "256M", "2G", "30s", "''", '""',
                  '"\\0"', '"\\x01"', '"\\ud800"', "!!int abc", "!!bool maybe", "!!float x",
                  "!!str 1", "!!binary aGk=", "!!timestamp x", "!!null", "!!set {a}", "!foo bar",
                  "*undefined", "-", "?", "<<", "=", "'it''s'", "\"\\N\"", "é", "\t"]
SYNTAX = [*":-[]{},&*!|>'\"#%@`?\t\n ", "<<: ", "---\n", "...\n", "\\", "\\0", "!!int ", "*a",
          "&a ", "? ", "- ", "\n  ", "\n- "]


def valid_vm(rng: random.Random, name: str) -> list[str]:
    lines = [f"name: {name}", f"boot: {rng.choice(FIELDS['boot'][0])}"]
    for key in rng.sample(sorted(FIELDS), rng.randrange(len(FIELDS))):
        if key not in ("boot", "kind"):
            lines.append(f"{key}: {rng.choice(FIELDS[key][0])}")
    rng.shuffle(lines)
    return lines


def valid_text(rng: random.Random) -> str:
    docs = ["\n".join(valid_vm(rng, f"web-{i}")) + "\n" for i in range(rng.randrange(1, 4))]
    docs.append(SWITCH)
    rng.shuffle(docs)
    text = "---\n".join(docs)
    if rng.random() < 0.2:
        text = "# generated\n" + text + rng.choice(["---\n", "...\n", "# end\n"])
    return text


def invalid_text(rng: random.Random) -> str:
    lines = valid_vm(rng, "web-1")
    how = rng.randrange(4)
    if how == 0:  # one invalid value
        key = rng.choice(sorted(FIELDS))
        lines = [line for line in lines if not line.startswith(f"{key}:")]
        lines.append(f"{key}: {rng.choice(FIELDS[key][1])}")
    elif how == 1:  # an unknown key
        lines.append(rng.choice(["memroy: 256M", "bogus: 1", "kernel: vmlinuz", "Name: x"]))
    elif how == 2:  # a duplicate key
        lines.append(rng.choice(lines))
    else:  # not a mapping, or no name
        lines = rng.choice([["- a", "- b"], ["just text"], ["boot: {kernel: vmlinuz}"]])
    return "\n".join(lines) + "\n---\n" + SWITCH


def random_value(rng: random.Random, depth: int = 0) -> str:
    """A flow-style value of a random type, with tags, anchors and aliases."""
    if depth > 2 or rng.random() < 0.5:
        pick = rng.random()
        if pick < 0.5:
            return rng.choice(RANDOM_SCALARS)
        if pick < 0.7:
            return str(rng.randint(-(2**70), 2**70))
        if pick < 0.8:
            return repr(rng.uniform(-1e300, 1e300))
        return rng.choice(FIELDS[rng.choice(sorted(FIELDS))][rng.randrange(2)])
    items = [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if rng.random() < 0.5:
        body = "[" + ", ".join(items) + "]"
    else:
        keys = rng.choices([*FIELDS, "path", "size", "kernel", "x", "<<", "1", "~"], k=len(items))
        body = "{" + ", ".join(f"{k}: {v}" for k, v in zip(keys, items, strict=True)) + "}"
    return rng.choice(["", "", "&a ", "&b ", "!!map ", "!!seq ", "!x ", "*a, "]) + body


def random_text(rng: random.Random) -> str:
    lines = [f"{rng.choice(sorted(FIELDS))}: {random_value(rng)}" for _ in range(rng.randrange(8))]
    if rng.random() < 0.7:
        lines[:0] = ["name: web-1", "boot: {kernel: vmlinuz}"]
    rng.shuffle(lines)
    return "\n".join(lines) + "\n"


def mutate(rng: random.Random, data: bytes) -> tuple[bytes, bool]:
    """1-4 mutations of data; True when the last one surely makes it invalid."""
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        how = rng.randrange(8)
        at = rng.randrange(len(buf) + 1)
        if how == 0 and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif how == 1:
            buf[at:at] = rng.choice(SYNTAX).encode()
        elif how == 2:
            del buf[at:at + rng.randrange(1, 20)]
        elif how == 3:
            del buf[at:]
        elif how in (4, 5):
            lines = bytes(buf).split(b"\n")
            i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
            if how == 4:
                lines.insert(j, lines[i])
            else:
                lines[i], lines[j] = lines[j], lines[i]
            buf = bytearray(b"\n".join(lines))
        elif how == 6:
            buf[at:at] = rng.choice(RANDOM_SCALARS).encode("utf-8", "surrogatepass")
        else:  # an unknown key at the end: nothing left open before it can swallow it
            return bytes(buf) + b"\nnot_a_field: 1\n", True
    return bytes(buf), False


def generated(rng: random.Random, index: int) -> Case:
    pick = rng.random()
    if pick < 0.15:
        return Case(f"{index:05d}-valid", {"vms.yaml": valid_text(rng).encode()}, expect=True)
    if pick < 0.3:
        return Case(f"{index:05d}-invalid", {"vms.yaml": invalid_text(rng).encode()},
                    expect=False)
    if pick < 0.5:
        text = random_text(rng).encode("utf-8", "surrogatepass")
        return Case(f"{index:05d}-random", {"vms.yaml": text})
    data, invalid = mutate(rng, valid_text(rng).encode())
    return Case(f"{index:05d}-mutated", {"vms.yaml": data}, expect=False if invalid else None)


VM = "name: a\nboot: {kernel: vmlinuz}\n"
BOMB = "a: &a [x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 7)}]\n" for i in range(11))


def many_docs(bad: str = "") -> bytes:
    """Tiny VM documents, as many as fit in 1 MiB."""
    docs: list[str] = []
    size = i = 0
    while True:
        doc = f"name: v{i}\nboot: {{kernel: vmlinuz}}\n{bad}---\n"
        if size + len(doc) > MIB:
            return "".join(docs).encode()
        docs.append(doc)
        size, i = size + len(doc), i + 1


def hostile() -> Iterator[Case]:
    """The named cases, in every run (made one at a time: some are 1 MiB)."""
    texts: dict[str, tuple[Callable[[], bytes | str], bool | None]] = {
        "alias-bomb": (lambda: BOMB, False),
        "1MiB-plus-1-byte": (lambda: VM + "#" * (MIB - len(VM)) + "\n", False),
        "1MiB-exactly": (lambda: VM + "#" * (MIB - len(VM) - 1) + "\n", True),
        "1MiB-of-vm-documents": (lambda: many_docs(), False),
        "1000-vm-documents": (lambda: many_docs()[:many_docs().index(b"name: v1000\n")], True),
        "1MiB-of-bad-documents": (lambda: many_docs("x: 1\n"), False),
        "1MiB-of-unknown-keys": (lambda: VM + "".join(f"k{i}: 1\n" for i in range(80_000)), False),
        "1MiB-string": (lambda: VM + "labels: {a: " + "x" * (MIB - 100) + "}\n", True),
        "100k-values": (lambda: VM + "labels: [" + "1," * 100_001 + "]\n", False),
        "flow-nesting-5000": (lambda: VM + "labels: " + "[" * 5000 + "]" * 5000 + "\n", False),
        "flow-nesting-500": (lambda: VM + "labels: " + "[" * 500 + "]" * 500 + "\n", False),
        "block-nesting-300": (lambda: VM + "labels:\n  " + "- " * 300 + "x\n", False),
        "indent-nesting-900": (lambda: VM + "labels:\n" + "".join(
            " " * i + f"k{i}:\n" for i in range(1, 900)), False),
        "int-5000-digits": (lambda: VM + "vcpus: 1" + "0" * 5000 + "\n", False),
        "hex-int-5000-digits": (lambda: VM + "vcpus: 0x" + "f" * 5000 + "\n", False),
        "stop-timeout-huge": (lambda: VM + "stop_timeout: 1" + "0" * 400 + "\n", False),
        "stop-timeout-1e999": (lambda: VM + "stop_timeout: 1e999\n", False),
        "memory-nan": (lambda: VM + "memory: .nan\n", False),
        "bool-maybe": (lambda: VM + "labels: {a: !!bool maybe}\n", False),
        "int-abc": (lambda: VM + "vcpus: !!int abc\n", False),
        "float-x": (lambda: VM + "stop_timeout: !!float x\n", False),
        "timestamp-x": (lambda: VM + "labels: {a: !!timestamp x}\n", False),
        "binary": (lambda: VM + "labels: {a: !!binary aGk=}\n", False),
        "set": (lambda: VM + "labels: !!set {a, b}\n", False),
        "lone-surrogate": (lambda: VM + 'labels: {a: "\\ud800"}\n', False),
        "nul-in-path": (lambda: 'name: a\nboot: {kernel: "vm\\0linuz"}\n', False),
        "path-5000-chars": (lambda: "name: a\nboot: {kernel: " + "a" * 5000 + "}\n", False),
        "unhashable-key": (lambda: VM + "? [a, b]\n: 1\n", False),
        "merge-of-scalar": (lambda: VM + "<<: 5\n", False),
        "recursive-alias": (lambda: VM + "labels: &a [*a]\n", False),
        "duplicate-key": (lambda: "name: a\nmemory: 1G\nboot: {kernel: vmlinuz}\nmemory: 2G\n",
                          False),
        "trailing-document-marker": (lambda: VM + "---\n", True),
        "readme-mac-unquoted": (lambda: VM + "interfaces: [{switch: lan, mac: 52:54:00:12:34:56}]\n"
                                "---\n" + SWITCH, True),
        "regex-overflow": (lambda: VM + "ready: {serial: 'a{99999999999}'}\n", False),
        "disk-in-state-dir": (lambda: VM + "disks: [{path: @STATE@/vms/x/disk.qcow2, size: 1G}]\n",
                              False),
        "kernel-in-proc": (lambda: "name: a\nboot: {kernel: /proc/self/environ}\n", False),
        "bad-utf8": (lambda: VM.encode() + b"labels: {a: \xff}\n", False),
        "utf16-bom": (lambda: (VM + "labels: {a: \u00e9}\n").encode("utf-16"), True),
    }
    for label, (make, expect) in texts.items():
        text = make()
        yield Case(f"hostile-{label}", {"vms.yaml": text if isinstance(text, bytes) else
                                        text.encode()}, expect=expect)
    ok = b"name: a\nboot: {kernel: ../vmlinuz}\n"  # in d/
    for case in [
        Case("fifo", {"vms.yaml": ("fifo",)}, expect=False),
        Case("dangling-symlink", {"vms.yaml": ("symlink", "gone.yaml")}, expect=False),
        Case("symlink-loop", {"vms.yaml": ("symlink", "vms.yaml")}, expect=False),
        Case("dir-with-a-fifo", {"d/ok.yaml": ok, "d/b.yaml": ("fifo",)}, "d", expect=False),
        Case("dir-with-a-yaml-dir", {"d/ok.yaml": ok, "d/b.yaml/x": b""}, "d", expect=False),
        Case("dir-with-a-dangling-link", {"d/ok.yaml": ok, "d/b.yml": ("symlink", "nope")}, "d",
             expect=False),
        Case("dir-with-a-dir-symlink-loop", {"d/ok.yaml": ok, "d/sub": ("symlink", ".")}, "d",
             expect=True),
    ]:
        case.label = f"hostile-{case.label}"
        yield case


def materialize(case: Case, root: Path, state: Path) -> None:
    """Write the case's files (and SUPPORT) under root."""
    for name, content in {**SUPPORT, **case.files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content.replace(b"@STATE@", str(state).encode()))
        elif content[0] == "fifo":
            os.mkfifo(path)
        elif content[0] == "symlink":
            path.symlink_to(content[1])
    state.mkdir(parents=True, exist_ok=True)


# --- running a case in forked children --------------------------------------------------

@dataclass
class RunResult:
    command: str  # "validate" or "check"
    code: int | None  # None: killed
    seconds: float
    rss_kib: int
    out: str
    err: str
    timed_out: bool = False


def child(argv: list[str], out: Path, err: Path, state: Path) -> NoReturn:
    """In the forked child: run main(argv) with its output in files; never returns."""
    code = ESCAPED
    try:
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        os.environ["RECONCILER_STATE_DIR"] = str(state)  # validate sees the same state dir
        from reconciler import cli

        try:
            cli.main(argv)
            code = RETURNED
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else ESCAPED
        except BaseException:
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):  # the child must reach _exit
                stream.flush()
        os._exit(code)


@dataclass
class Running:
    slot: int
    case: Case
    command: str
    pid: int
    pidfd: int
    started: float
    killed: bool = False


@dataclass
class Runner:
    """Runs cases, `len(slots)` at a time; a case's files are in SLOT/case, its state
    dir is SLOT/state, the children's output goes to SLOT/{validate,check}.{out,err}.
    Results are handed to `done` as they come, and not kept: the children are forks
    of this process, whose memory is part of their RSS."""

    slots: list[Path]
    timeout: float
    done: Callable[[Case, list[RunResult]], None]

    def slot_dirs(self, slot: int) -> tuple[Path, Path, Path]:
        base = self.slots[slot]
        return base / "case", base / "state", base

    def prepare(self, slot: int, case: Case) -> None:
        case_dir, state, _ = self.slot_dirs(slot)
        shutil.rmtree(case_dir.parent, ignore_errors=True)
        case_dir.mkdir(parents=True)
        materialize(case, case_dir, state)

    def start(self, slot: int, case: Case, command: str) -> Running:
        case_dir, state, base = self.slot_dirs(slot)
        target = str(case_dir / case.target)
        argv = ["validate", target] if command == "validate" else [
            "--once", "--check", "--state-dir", str(state), target]
        sys.stdout.flush()
        sys.stderr.flush()
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # pragma: no cover
            child(argv, base / f"{command}.out", base / f"{command}.err", state)
        return Running(slot, case, command, pid, os.pidfd_open(pid), started)

    def reap(self, run: Running) -> RunResult:
        _, status, usage = os.wait4(run.pid, 0)
        seconds = time.monotonic() - run.started
        os.close(run.pidfd)
        _, _, base = self.slot_dirs(run.slot)
        out = (base / f"{run.command}.out").read_text(errors="replace")
        err = (base / f"{run.command}.err").read_text(errors="replace")
        code = os.waitstatus_to_exitcode(status)
        return RunResult(run.command, code if code >= 0 else None, seconds, usage.ru_maxrss,
                         out, err, timed_out=run.killed)

    def run_all(self, cases: Iterator[Case], *, in_place: bool = False) -> None:
        """Each case through validate, then check; in_place: its files are there already."""
        free = list(range(len(self.slots)))
        pending: dict[int, list[RunResult]] = {}  # slot -> results of its case so far
        selector = selectors.DefaultSelector()
        try:
            while True:
                while free and (case := next(cases, None)) is not None:
                    slot = free.pop()
                    if not in_place:
                        self.prepare(slot, case)
                    pending[slot] = []
                    run = self.start(slot, case, "validate")
                    selector.register(run.pidfd, selectors.EVENT_READ, run)
                running = [key.data for key in selector.get_map().values()]
                if not running:
                    return
                wait = min(r.started + self.timeout for r in running) - time.monotonic()
                for key, _ in selector.select(max(wait, 0.0)):
                    run = key.data
                    selector.unregister(run.pidfd)
                    pending[run.slot].append(self.reap(run))
                    if run.command == "validate":
                        nxt = self.start(run.slot, run.case, "check")
                        selector.register(nxt.pidfd, selectors.EVENT_READ, nxt)
                    else:
                        self.done(run.case, pending.pop(run.slot))
                        free.append(run.slot)
                for run in running:
                    if not run.killed and time.monotonic() - run.started > self.timeout:
                        signal.pidfd_send_signal(run.pidfd, signal.SIGKILL)
                        run.killed = True
        finally:
            for key in list(selector.get_map().values()):
                signal.pidfd_send_signal(key.data.pidfd, signal.SIGKILL)
                os.waitpid(key.data.pid, 0)


# --- judging and reporting ----------------------------------------------------------

def problems(case: Case, runs: list[RunResult]) -> list[str]:
    found = []
    for run in runs:
        if run.timed_out:
            found.append(f"{run.command}: killed after the timeout")
        elif run.code is None:
            found.append(f"{run.command}: killed by a signal")
        elif run.code in (ESCAPED, RETURNED):
            found.append(f"{run.command}: an exception escaped reconciler.cli.main")
        elif run.code not in (0, 1, 2):
            found.append(f"{run.command}: exit {run.code}")
        if "Traceback" in run.err:
            found.append(f"{run.command}: Traceback on stderr")
    if found:
        return found
    validate, check = runs
    valid = validate.code == 0
    # check: 2 = changes pending; 1 with nothing on stderr = a planned action failed
    # (two VMs on one disk), which is not about the manifest being valid.
    check_valid = check.code in (0, 2) or (check.code == 1 and not check.err.strip())
    if valid != check_valid:
        found.append(f"validate says {'valid' if valid else 'invalid'}, check says "
                     f"{'valid' if check_valid else 'invalid'}")
    if case.expect is False and (valid or check_valid):
        found.append("made invalid, but accepted")
    if case.expect is True and not valid:
        found.append("made valid, but refused")
    return found


def save(case: Case, runs: list[RunResult], reasons: list[str], into: Path) -> Path:
    where = into / case.label
    materialize(case, where / "case", where / "state")
    (where / "case.json").write_text(json.dumps({
        "label": case.label, "target": case.target, "expect": case.expect,
        "reasons": reasons,
        "runs": [{"command": r.command, "code": r.code, "seconds": r.seconds,
                  "rss_kib": r.rss_kib, "stdout": r.out[-4000:], "stderr": r.err[-4000:]}
                 for r in runs]}, indent=2))
    return where


@dataclass
class Tally:
    """What is kept of each run: (command, case label, seconds, peak RSS KiB)."""

    runs: list[tuple[str, str, float, int]] = field(default_factory=list)
    baseline: list[tuple[str, str, float, int]] = field(default_factory=list)  # EMPTY's
    cases: int = 0
    failures: list[tuple[str, list[str], Path]] = field(default_factory=list)
    into: Path | None = None  # where failures are saved

    def add(self, case: Case, runs: list[RunResult]) -> None:
        kept = [(r.command, case.label, r.seconds, r.rss_kib) for r in runs]
        if case.label == EMPTY:
            self.baseline += kept
        else:
            self.cases += 1
            self.runs += kept
        reasons = problems(case, runs)
        if reasons:
            if self.into is None:
                self.into = Path(tempfile.mkdtemp(prefix="reconciler-fuzz-failures-"))
            self.failures.append((case.label, reasons, save(case, runs, reasons, self.into)))


def python_pass() -> float:
    """Median time of `python -c pass` (5 runs)."""
    times = []
    for _ in range(5):
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        times.append(time.monotonic() - started)
    return statistics.median(times)


def report(tally: Tally, python_pass: float, elapsed: float, args: argparse.Namespace) -> None:
    print(f"fuzz: {tally.cases} cases ({args.cases} generated with seed {args.seed} + "
          f"{tally.cases - args.cases} named hostile), {len(tally.runs)} runs, {args.jobs} "
          f"jobs, {elapsed:.0f} s")
    rows = []
    for command in ("validate", "check"):
        mine = [r for r in tally.runs if r[0] == command]
        ref = [r for r in tally.baseline if r[0] == command]
        fat, slow = max(mine, key=lambda r: r[3]), max(mine, key=lambda r: r[2])
        rows.append([command, str(fat[3]), fat[1], f"{slow[2] * 1000:.0f}", slow[1],
                     f"{statistics.median(r[2] for r in mine) * 1000:.1f}",
                     str(max(r[3] for r in ref)),
                     f"{statistics.median(r[2] for r in ref) * 1000:.1f}"])
    print(table(["command", "max RSS KiB", "its case", "slowest ms", "its case", "median ms",
                 "empty: RSS KiB", "empty: ms"], rows))
    print(f"baseline: python -c pass {python_pass * 1000:.1f} ms; 'empty' = a fork running "
          f"the command on a manifest that is only a comment ({len(tally.baseline) // 2} "
          "times, among the cases)")
    print(f"failures: {len(tally.failures)}")
    for label, reasons, where in tally.failures[:50]:
        print(f"  {label}: {'; '.join(reasons)} (saved in {where})")
    max_rss = max(r[3] for r in tally.runs)
    max_time = max(r[2] for r in tally.runs)
    print(f"max RSS {max_rss / 1024:.1f} MB (goal <= {GOAL_RSS_KIB // 1024} MB): "
          f"{'OK' if max_rss <= GOAL_RSS_KIB else 'MISSED'}")
    print(f"max time {max_time:.2f} s (goal <= {GOAL_SECONDS:.0f} s): "
          f"{'OK' if max_time <= GOAL_SECONDS else 'MISSED'}")


def replay(directory: Path, timeout: float) -> int:
    """Run a saved case again, in place (DIR/case, DIR/state)."""
    spec = json.loads((directory / "case.json").read_text())
    case = Case(spec["label"], {}, spec["target"], spec["expect"])
    results: list[list[RunResult]] = []
    Runner([directory], timeout, lambda _, runs: results.append(runs)).run_all(
        iter([case]), in_place=True)
    for run in results[0]:
        print(f"--- {run.command}: exit {run.code}, {run.seconds * 1000:.0f} ms, "
              f"{run.rss_kib} KiB\n{run.out}{run.err}")
    reasons = problems(case, results[0])
    print("problems: " + ("; ".join(reasons) if reasons else "none"))
    return 1 if reasons else 0


EMPTY = "baseline-empty"


def all_cases(args: argparse.Namespace, progress: Callable[[int], None]) -> Iterator[Case]:
    """The generated cases, the hostile ones, and the baseline case every 100 cases."""
    rng = random.Random(args.seed)
    for index in range(args.cases):
        progress(index)
        if index % 100 == 0:
            yield Case(EMPTY, {"vms.yaml": b"# nothing\n"}, expect=True)
        yield generated(rng, index)
    yield from hostile()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="generated cases (10000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="children at a time (2)")
    parser.add_argument("--timeout", type=float, default=10.0, help="kill a child after (10 s)")
    parser.add_argument("--replay", type=Path, metavar="DIR", help="run one saved case again")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args()
    for module in ("reconciler.cli", "reconciler.loop"):  # what --once imports: before forks
        importlib.import_module(module)
    gc.freeze()  # the children do not copy what the parent has already allocated
    if args.replay:
        return replay(args.replay, args.timeout)
    root = Path(tempfile.mkdtemp(prefix="reconciler-fuzz-"))
    try:
        slots = [root / f"slot-{n}" for n in range(args.jobs)]
        started = time.monotonic()

        def progress(index: int) -> None:
            if index and index % max(1, args.cases // 10) == 0:
                print(f"  {index}/{args.cases} cases, {time.monotonic() - started:.0f} s",
                      file=sys.stderr)

        tally = Tally()
        Runner(slots, args.timeout, tally.add).run_all(all_cases(args, progress))
        report(tally, python_pass(), time.monotonic() - started, args)
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 1 if tally.failures else 0


if __name__ == "__main__":
    run_main(main, "fuzz")
