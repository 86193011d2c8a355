"""The `reconcile` command: parses arguments, calls the loop, prints and exits.

Top of the one-way flow cli -> loop -> (desired, observed, plan, kvm). A user
mistake ends in a one-line message and a non-zero exit, never a traceback.

Exit codes: 0 converged, 1 something failed (or the manifests have errors),
2 changes pending (`--check`), 64 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from reconciler.statepath import StateDirError, cache_dir, default_state_dir, state_root

if TYPE_CHECKING:
    from reconciler.loop import Report
    from reconciler.observed import StateDir
    from reconciler.validator import Validator

EX_USAGE = 64
PYDANTIC_PLUGIN_LOADER = "pydantic.plugin._loader"  # see _no_pydantic_plugins
SUBCOMMANDS = ("status", "list", "validate", "schema", "down", "console", "ssh", "import",
               "push", "drain")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse's own exit code 2 would read as "changes pending".
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (got {value})")
    return value


def _address(text: str) -> str:
    _, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected HOST:PORT with a port 1-65535 (got {text!r})")
    return text


def _byte_size(text: str) -> int:
    """`1M`, `512K`, `2G` or a number of bytes (binary units)."""
    units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    number, unit = text.strip(), ""
    if number and number[-1].lower() in "kmg":
        number, unit = number[:-1], number[-1].lower()
    if not number.isdigit() or int(number) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 1M or 512K (got {text!r})")
    return int(number) * units[unit]


def _common(parser: argparse.ArgumentParser) -> None:
    """The global options: accepted before or after any subcommand."""
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where VM records live (env RECONCILER_STATE_DIR; "
                             f"default {default_state_dir()})")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    parser.add_argument("--debug", action="store_true",
                        help="log everything, with a traceback for unexpected errors")
    parser.add_argument("--allow-dir", type=Path, action="append", default=None,
                        metavar="DIR", help="only disks and images under DIR (repeatable; "
                                            "symlinks resolved); default: any path")
    parser.add_argument("--max-manifest-size", type=_byte_size, default=None,
                        metavar="SIZE", help="refuse manifest files bigger than this "
                                             "(default 1M)")


def _urls(text: str) -> list[str]:
    urls = [u.strip() for u in text.split(",") if u.strip()]
    if not urls:
        raise argparse.ArgumentTypeError("expected URL[,URL...] (e.g. http://10.0.0.1:2379)")
    return urls


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (got {text!r})")
    return key, value


def _cluster(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--etcd", type=_urls, default=None, metavar="URL[,URL...]",
                        help="the cluster's etcd (its client URLs)")
    parser.add_argument("--prefix", default="/reconciler",
                        help="the cluster's keys in etcd (default /reconciler)")


def _globals_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reconcile", add_help=False, allow_abbrev=False)
    _common(parser)
    return parser


def _main_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="reconcile",
        description="Converge the QEMU VMs running on this host with YAML manifests.",
        epilog="other commands: reconcile {status,list,validate,schema,down,console,ssh,"
               "import} --help",
    )
    parser.add_argument("path", nargs="?", help="a manifest file or directory (none with "
                                                "--etcd: the cluster's are in etcd)")
    parser.add_argument("--once", action="store_true",
                        help="reconcile once and exit (default: keep converging as a daemon)")
    parser.add_argument("--check", action="store_true",
                        help="plan only, change nothing (implies --once); "
                             "exit 2 when changes are pending")
    parser.add_argument("--wait", action="store_true",
                        help="with --once: wait until the VMs it started are ready")
    parser.add_argument("--resync", type=_seconds, default=30.0, metavar="SECONDS",
                        help="daemon: converge at least this often (default 30)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--diff", action="store_true",
                        help="with --once or --check: a unified diff of each changed VM's "
                             "spec (as recorded -> as declared; units shown, secrets masked)")
    parser.add_argument("--metrics", metavar="HOST:PORT", type=_address,
                        help="daemon: serve Prometheus metrics there")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="daemon: log lines as text or JSON objects (for log shippers)")
    parser.add_argument("--on-exit", choices=("keep", "stop", "save"), default=None,
                        help="daemon, on SIGTERM/SIGINT: keep the VMs running (default), "
                             "stop them (vmm_shutdown), or save them all at once to be "
                             "restored by the next start (libvirt-guests' suspend)")
    parser.add_argument("--stop-vms-on-exit", action="store_true",
                        help="the same as --on-exit stop (kept for existing units)")
    parser.add_argument("--parallel", type=_positive_int, default=None, metavar="N",
                        help="start at most N VMs at a time (default: the directory's "
                             "kind: Settings, else 4)")
    parser.add_argument("--stagger", type=_seconds, default=None, metavar="SECONDS",
                        help="launch QEMUs at least this far apart (default: the "
                             "directory's kind: Settings, else 0)")
    _cluster(parser)
    parser.add_argument("--host", metavar="NAME", help="with --etcd: this member's name")
    parser.add_argument("--label", type=_label, action="append", default=[],
                        metavar="KEY=VALUE", help="with --etcd: a label of this host "
                                                  "(placement.labels; repeatable)")
    parser.add_argument("--lease-ttl", type=_positive_int, default=10, metavar="SECONDS",
                        help="with --etcd: this host's lease (default 10)")
    parser.add_argument("--reserve", type=_byte_size, default=0, metavar="SIZE",
                        help="with --etcd: memory kept for the host itself, not offered")
    parser.add_argument("--fence-grace", type=_seconds, default=5.0, metavar="SECONDS",
                        help="with --etcd: after a host's lease ends, wait this long "
                             "before its failover VMs start elsewhere (default 5)")
    parser.add_argument("--vcpus", type=_positive_int, default=None, metavar="N",
                        help="with --etcd: vCPUs this host offers (default: its CPUs)")
    parser.add_argument("--shared-dir", type=Path, default=None, metavar="DIR",
                        help="with --etcd: storage every host reaches at the same path; a "
                             "VM that cannot move live moves through a saved state there")
    parser.add_argument("--address", default=None, metavar="ADDR",
                        help="with --etcd: this host's address for migrations")
    _common(parser)
    return parser


def _sub_parser(command: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=f"reconcile {command}")
    _common(parser)
    if command == "validate":
        parser.description = "Check manifests; report every error at once."
        parser.add_argument("path", type=Path)
    elif command == "status":
        parser.description = "One row per VM, like vmctl status."
        parser.add_argument("--json", action="store_true")
        _cluster(parser)
    elif command == "drain":
        parser.description = ("Move every VM off HOST (live migration where it can, else "
                              "stop and start elsewhere); it gets no new VMs until --undo.")
        parser.add_argument("host")
        _cluster(parser)
        parser.add_argument("--undo", action="store_true",
                            help="HOST takes VMs again (those moved stay where they are)")
        parser.add_argument("--wait", type=_seconds, default=None, metavar="SECONDS",
                            help="wait up to this long until no VM is left on HOST")
    elif command == "push":
        parser.description = ("Validate DIR as --once does and, only if every manifest is "
                              "valid, write its VMs to the cluster in one transaction.")
        parser.add_argument("path", type=Path)
        _cluster(parser)
        parser.add_argument("--check", action="store_true",
                            help="print what would change, write nothing (exit 2 if "
                                 "anything would)")
        parser.add_argument("--shared-dir", type=Path, action="append", default=[],
                            metavar="DIR", help="storage every host reaches: failover "
                                                "VMs' disks must be there (repeatable)")
    elif command == "list":
        parser.description = ("Every VM on this host: QEMU processes (ours and others') "
                              "and KVM VMs of any hypervisor (debugfs).")
        parser.add_argument("--json", action="store_true")
    elif command == "import":
        parser.description = ("Convert vmd's vm.conf into manifests: printed, or written "
                              "into DIR (-o) and validated there. What has no equivalent "
                              "is reported.")
        parser.add_argument("file", type=Path)
        parser.add_argument("-o", "--output", type=Path, metavar="DIR",
                            help="write one manifest per VM (and switches.yaml, "
                                 "settings.yaml) into DIR; existing files are never "
                                 "overwritten")
    elif command == "down":
        parser.description = "Terminate every managed VM gracefully."
    elif command == "console":
        parser.description = "Attach to a VM's serial console (detach with ~.)."
        parser.add_argument("name")
    elif command == "ssh":
        parser.description = ("ssh to a VM's address as its cloud_init user, its host key "
                              "pinned; anything after -- is the remote command.")
        parser.usage = "reconcile ssh [-l USER] [-i KEY] NAME [-- COMMAND...]"
        parser.add_argument("name")
        parser.add_argument("-l", "--login", metavar="USER",
                            help="log in as USER (default: cloud_init.user)")
        parser.add_argument("-i", "--identity", metavar="KEY", help="ssh's -i")
    elif command == "schema":
        parser.description = "Print the JSON Schema of a VM manifest (for editors)."
    return parser


# The exit code of an error that is a bug of ours, not a user's mistake (sysexits).
EX_SOFTWARE = 70


def main(argv: Sequence[str] | None = None) -> None:
    args_list = list(sys.argv[1:] if argv is None else argv)
    os.umask(0o077)  # records, logs and sockets are the reconciler's (root's) only
    _no_pydantic_plugins()
    for stream in (sys.stdout, sys.stderr):  # a message never fails to print
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    debug = "--debug" in args_list
    # A pass that will validate: start the validator (a child) before anything else.
    validator = _validator_for(args_list)
    try:
        code = _dispatch(args_list, validator)
    except StateDirError as err:
        print(f"reconcile: {err}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:  # `reconcile status | head`: the reader has gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    except Exception as err:  # a bug of ours: one line, the traceback only on request
        if debug:
            import traceback

            traceback.print_exc()
        hint = "" if debug else " (run with --debug for the traceback)"
        print(f"reconcile: internal error: {type(err).__name__}: {err}{hint}",
              file=sys.stderr)
        code = EX_SOFTWARE
    finally:
        if validator is not None:
            validator.dismiss()  # not given a job (a usage error, an exit before it)
    sys.exit(code)


def _validator_for(argv: list[str]) -> Validator | None:
    """The validator, started at once, for a `--once` or `--check` that will validate:
    its state dir has no validated manifests at all (its first run, say). Where it has
    some, this run most likely finds its own there, and a child forked for nothing
    costs the run more (~5-10 ms) than it saves on a miss: `manifests.ahead` then
    starts one if the cache misses. A look at the words before any `--`, not a parse
    (parsing them is what the validator does not wait for): a wrong guess costs time,
    never a result."""
    words = argv[:argv.index("--")] if "--" in argv else argv
    if "--once" not in words and "--check" not in words:
        return None
    given = None
    for word, value in zip(words, [*words[1:], ""], strict=True):
        if word == "--state-dir" and value:
            given = Path(value)
        elif word.startswith("--state-dir="):
            given = Path(word.partition("=")[2])
    from reconciler import valcache, validator

    if valcache.holds_entries(cache_dir(state_root(given))):
        return None
    return validator.start()


def _no_pydantic_plugins() -> None:
    """No pydantic plugins here: looking for them reads every installed package's
    metadata when the first validator is built (~9 ms of a run that validates).

    Even told so, pydantic imports `importlib.metadata` (~11 ms: email, zipfile, csv)
    before it reads the variable, to have the function that would look. Its plugin
    loader is given as a module whose `get_plugins` finds none, which is all the real
    one does under this variable. A user who names plugins in the variable gets
    pydantic's own loader.
    """
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    if os.environ["PYDANTIC_DISABLE_PLUGINS"] in ("__all__", "1", "true"):
        import types

        loader = types.ModuleType(PYDANTIC_PLUGIN_LOADER, "No pydantic plugins (reconciler)")
        loader.get_plugins = tuple  # type: ignore[attr-defined]  # get_plugins() -> ()
        sys.modules.setdefault(PYDANTIC_PLUGIN_LOADER, loader)


def _dispatch(argv: list[str], validator: Validator | None = None) -> int:
    # Global options may come before or after the subcommand; the first word left is
    # the subcommand if it names one (a directory called `status` is `./status`).
    # After `--` nothing is ours: it is `reconcile ssh`'s remote command.
    tail: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, tail = argv[:cut], argv[cut + 1:]
    options, rest = _globals_parser().parse_known_args(argv)
    if rest and rest[0] in SUBCOMMANDS:
        command = rest[0]
        if tail and command != "ssh":
            rest = [*rest, "--", *tail]
        args = _sub_parser(command).parse_args(rest[1:])
        args.command = tail
        vars(args).update({k: v for k, v in vars(options).items() if v not in (None, False)})
        _logging(args.verbose, debug=args.debug)
        handler = {"status": _status, "list": _list, "validate": _validate,
                   "schema": _schema, "down": _down, "console": _console, "ssh": _ssh,
                   "import": _import, "push": _push, "drain": _drain}
        return handler[command](args)
    if tail:
        rest = [*rest, "--", *tail]
    parser = _main_parser()
    args = parser.parse_args(rest)
    vars(args).update({k: v for k, v in vars(options).items() if v not in (None, False)})
    if args.path in SUBCOMMANDS:  # `reconcile --once status`: say what is meant
        parser.error(f"'{args.path}' is a command, not a manifest path; "
                     f"for a directory of that name write ./{args.path}")
    if args.etcd:
        if args.path is not None:
            parser.error("with --etcd the VMs come from etcd: give no PATH "
                         "(write them there with `reconcile push DIR --etcd URL`)")
        if args.once or args.check:
            parser.error("--etcd runs as a daemon: a cluster member (no --once/--check)")
        if not args.host:
            parser.error("--etcd needs --host NAME: this member's name in the cluster")
        import re

        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", args.host):
            parser.error(f"--host {args.host!r}: letters, digits and '-' (a host name)")
    elif args.path is None:
        parser.error("the following arguments are required: path")
    else:
        args.path = Path(args.path)
    if args.once or args.check:  # a check is always a single pass
        _logging(args.verbose, debug=args.debug)
        return _once(args, validator)
    if args.wait or args.json:
        parser.error("--wait and --json go with --once")
    _logging(True, json_lines=args.log_format == "json", debug=args.debug)
    return _watch(args)


class _JSONFormatter(logging.Formatter):
    """One JSON object per log line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
                "level": record.levelname.lower(), "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line)


def _logging(verbose: bool, *, json_lines: bool = False, debug: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(_JSONFormatter() if json_lines else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("qemu").setLevel(logging.CRITICAL)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)


def _state(args: argparse.Namespace) -> StateDir:
    from reconciler.observed import StateDir

    return StateDir(args.state_dir or default_state_dir())


def _max_bytes(args: argparse.Namespace) -> int:
    from reconciler.listing import DEFAULT_MAX_MANIFEST_BYTES

    size: int = args.max_manifest_size or DEFAULT_MAX_MANIFEST_BYTES
    return size


def _allowed(args: argparse.Namespace, *, say: bool = True) -> list[Path]:
    """--allow-dir roots; without any, say once that manifests may name any host file
    (a warning: a line on stderr, or one of the daemon's log lines)."""
    roots: list[Path] = getattr(args, "allow_dir", None) or []
    if not roots and say:
        logging.getLogger("reconciler").warning(
            "no --allow-dir given: manifests may use any host file as a disk, kernel or "
            "image")
    return roots


def _once(args: argparse.Namespace, validator: Validator | None) -> int:
    from reconciler import manifests
    from reconciler.validator import start

    # First of all, before the state dir, asyncio and the loop are imported: on a miss,
    # the validator validates meanwhile.
    root = state_root(args.state_dir)
    with manifests.ahead(args.path, validator=validator, start=start,
                         max_bytes=_max_bytes(args), state_dir=root,
                         allow_dirs=_allowed(args, say=False), cache_dir=cache_dir(root)):
        state = _state(args)
        if args.check:
            report = _once_pass(args, state, check=True)
        else:
            with state.locked():
                report = _once_pass(args, state, check=False)
    return _once_report(args, report)


def _once_pass(args: argparse.Namespace, state: StateDir, *, check: bool) -> Report:
    import asyncio

    from reconciler.loop import reconcile_once

    # With check, the pass returns before parallel, stagger or wait are used.
    return asyncio.run(reconcile_once(args.path, state, check=check, parallel=args.parallel,
                                      stagger=args.stagger, wait=args.wait,
                                      max_bytes=_max_bytes(args), allow_dirs=_allowed(args),
                                      diff=args.diff))


def _once_report(args: argparse.Namespace, report: Report) -> int:
    from reconciler.loop import Outcome

    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return report.exit_code()
    for error in report.errors:
        print(error, file=sys.stderr)
    width = max((len(r.vm) for r in report.results), default=0)
    for r in report.results:
        text = r.reason if not r.detail else f"{r.reason}: {r.detail}"
        if r.outcome is Outcome.PENDING:
            text = f"would {r.action.value}: {r.reason}"
        lines = text.splitlines() or [""]
        print(f"{r.vm:<{width}}  {r.outcome.value:<7}  {lines[0]}")
        for more in lines[1:]:
            print(f"{'':<{width}}  {'':<7}    {more}")
    for text in report.diffs.values():
        print(text)
    counts = ", ".join(f"{report.count(o)} {o.value}" for o in Outcome)
    problems = f", {len(report.errors)} manifest/state errors" if report.errors else ""
    print(f"recap: {counts}{problems}")
    return report.exit_code()


def _validate(args: argparse.Namespace) -> int:
    from reconciler import desired

    loaded = desired.load(args.path, state_dir=_state(args).root, max_bytes=_max_bytes(args),
                          allow_dirs=_allowed(args, say=False))
    for error in loaded.errors:
        print(error, file=sys.stderr)
    if not loaded.files and not loaded.errors:
        print(f"{args.path}: no *.yaml or *.yml manifests found", file=sys.stderr)
        return 1
    if loaded.errors:
        return 1
    vms, files = len(loaded.vms), len(loaded.files)
    print(f"{vms} VM{'s' * (vms != 1)} in {files} file{'s' * (files != 1)}: ok")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from reconciler.desired import VM

    print(json.dumps(VM.model_json_schema(), indent=2))
    return 0


def _store(args: argparse.Namespace) -> Any:
    from reconciler.cluster import Store

    return Store(args.etcd, args.prefix)


def _push(args: argparse.Namespace) -> int:
    from reconciler import cluster, desired

    if not args.etcd:
        print("reconcile push: --etcd URL is required", file=sys.stderr)
        return EX_USAGE
    loaded = desired.load(args.path, state_dir=_state(args).root, max_bytes=_max_bytes(args),
                          allow_dirs=_allowed(args, say=False))
    errors = cluster.push_errors(loaded, args.shared_dir)
    if not loaded.files and not loaded.errors:
        errors.append(f"{args.path}: no *.yaml or *.yml manifests found")
    if errors:
        for error in errors:
            print(error, file=sys.stderr)
        print(f"push: nothing written ({len(errors)} error{'s' * (len(errors) != 1)})",
              file=sys.stderr)
        return 1
    try:
        store = _store(args)
        plan = cluster.plan_push(store, loaded, args.shared_dir)
        for word, names in (("add", plan.added), ("change", plan.changed),
                            ("remove", plan.removed)):
            for name in names:
                print(f"{name:<20} {word}")
        if plan.empty:
            print(f"push: no changes ({len(plan.values)} VMs in etcd already as declared)")
            return 0
        if args.check:
            print(f"push --check: {len(plan.added)} to add, {len(plan.changed)} to change, "
                  f"{len(plan.removed)} to remove; nothing written")
            return 2
        if not cluster.push(store, plan, commit=cluster.git_commit(args.path)):
            print("push: another push came first; nothing written (run it again)",
                  file=sys.stderr)
            return 1
    except cluster.ClusterError as err:
        print(f"push: {err}; nothing written", file=sys.stderr)
        return 1
    print(f"push: {len(plan.added)} added, {len(plan.changed)} changed, "
          f"{len(plan.removed)} removed")
    return 0


def _drain(args: argparse.Namespace) -> int:
    import time

    from reconciler import cluster

    if not args.etcd:
        print("reconcile drain: --etcd URL is required", file=sys.stderr)
        return EX_USAGE
    try:
        store = _store(args)
        key = store.key("drain", args.host)
        if args.undo:
            store.txn([], [cluster.delete(key)])
            print(f"drain: {args.host} takes VMs again")
            return 0
        if store.get("hosts", args.host) is None:
            print(f"drain: no live host {args.host!r} in the cluster", file=sys.stderr)
            return 1
        store.txn([], [cluster.put(key, {"at": time.time()})])
        print(f"drain: {args.host} gets no new VMs; its VMs move away")
        deadline = time.monotonic() + (args.wait or 0)
        while args.wait is not None:
            view = cluster.View.read(store)
            left = sorted(n for n in view.vms if view.host_of(n) == args.host)
            if not left:
                print(f"drain: {args.host} runs no VMs")
                return 0
            if time.monotonic() > deadline:
                print(f"drain: still on {args.host}: {', '.join(left)}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except cluster.ClusterError as err:
        print(f"drain: {err}", file=sys.stderr)
        return 1
    return 0


def _cluster_status(args: argparse.Namespace) -> int:
    from reconciler import cluster

    try:
        view = cluster.View.read(_store(args))
    except cluster.ClusterError as err:
        print(f"status: {err}", file=sys.stderr)
        return 1
    hosts, vms = cluster.cluster_rows(view)
    if args.json:
        print(json.dumps({"hosts": hosts, "vms": vms}, indent=2))
        return 0
    _print_table(["HOST", "LEASE", "MEMORY", "VCPUS", "LABELS", ""], [
        [h["host"], h["lease"] if h["lost_for"] is None else f"lost {h['lost_for']:.0f}s",
         f"{h['memory_used']}/{h['memory'] if h['memory'] is not None else '-'}M",
         f"{h['vcpus_used']}/{h['vcpus'] if h['vcpus'] is not None else '-'}",
         ",".join(f"{k}={v}" for k, v in sorted(h["labels"].items())) or "-",
         " ".join(w for w, on in (("scheduler", h["scheduler"]),
                                  ("draining", h["draining"])) if on)] for h in hosts])
    print()
    _print_table(["NAME", "HOST", "STATE", "DETAIL"], [
        [v["name"], v["host"] or "-", v["state"], v["detail"]] for v in vms])
    return 0


def _status(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from reconciler import inventory

    if args.etcd:
        return _cluster_status(args)
    from reconciler.loop import look
    from reconciler.observed import Status
    from reconciler.plan import describe

    state = _state(args)
    now = time.time()
    seen, addresses, problems = asyncio.run(look(state, now=now))
    rows: list[dict[str, Any]] = []
    for name, vm in sorted(seen.items()):
        spec, record = vm.record.spec, vm.record
        alive = vm.status in (Status.RUNNING, Status.PAUSED)
        rows.append({
            "name": name, "state": describe(vm, now=now),
            "pid": record.pid if alive else None,
            "vcpus": spec.get("vcpus"), "memory": f"{spec.get('memory')}M",
            "accel": record.accel, "restarts": record.restarts, "reboots": record.reboots,
            "managed": True, "source": record.source,
            "exit": vm.exit.reason.value if vm.exit else None,
            "addresses": [a.to_json() for a in addresses.get(name, [])],
            "detail": vm.detail or vm.ready_detail.split("\n", 1)[0],
            "resources": record.limits,
        })
        if alive and record.limits and record.limits.get("state") == "pending":
            pending = f"resources pending: {record.limits.get('reason', '')}"
            rows[-1]["detail"] = "; ".join(filter(None, (rows[-1]["detail"], pending)))
    live = {vm.record.pid for vm in seen.values() if vm.status in (Status.RUNNING, Status.PAUSED)}
    foreign = [v for v in inventory.host_vms(live, ours=state.vms_dir) if not v.managed]
    for other in foreign:
        rows.append({"name": other.name or f"pid-{other.pid}", "state": "running",
                     "pid": other.pid, "vcpus": None,
                     "memory": None, "accel": None, "restarts": None, "reboots": None,
                     "managed": False, "source": None, "exit": None, "addresses": [],
                     "detail": "", "resources": None})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        header = ("NAME", "STATE", "PID", "VCPUS", "MEMORY", "ACCEL", "ADDRESS", "RESTARTS",
                  "REBOOTS", "MANAGED", "DETAIL")
        keys = ("name", "state", "pid", "vcpus", "memory", "accel", "address", "restarts",
                "reboots", "managed", "detail")
        for row in rows:
            row["address"] = ",".join(dict.fromkeys(a["ipv4"] for a in row["addresses"])) \
                or None
        _print_table(header, [[row[k] for k in keys] for row in rows])
    for problem in problems.values():
        print(problem, file=sys.stderr)
    unresponsive = any(vm.unresponsive for vm in seen.values())
    return 1 if problems or unresponsive else 0


def _list(args: argparse.Namespace) -> int:
    """Every VM on the host: QEMU processes and KVM VMs of any hypervisor."""
    from reconciler import inventory
    from reconciler.observed import is_alive

    records, _ = _state(args).records()
    kvm = inventory.debugfs_kvm(mount=os.geteuid() == 0)
    if kvm is None:
        print("reconcile list: no debugfs (/sys/kernel/debug/kvm): KVM VMs of other "
              "hypervisors are not listed" + (" (root can mount it)" if os.geteuid() else ""),
              file=sys.stderr)
    rows = inventory.host_vms({r.pid for r in records.values() if is_alive(r)}, kvm=kvm)
    if args.json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return 0
    _print_table(("PID", "NAME", "COMMAND", "VCPUS", "MEMORY", "KVM", "MANAGED"), [
        [r.pid, r.name, r.command, r.vcpus, None if r.memory is None else f"{r.memory}M",
         r.kvm, r.managed] for r in rows])
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Aligned columns, like vmctl's: None is -, a boolean yes or no."""
    table = [list(header)] + [
        ["-" if v is None else ("yes" if v else "no") if isinstance(v, bool) else str(v)
         for v in row] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def _import(args: argparse.Namespace) -> int:
    """vm.conf -> manifests (vmd users bring their config)."""
    import yaml

    from reconciler import desired, vmconf

    try:
        text = args.file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        print(f"reconcile import: cannot read {args.file}: {err}", file=sys.stderr)
        return 1
    try:
        converted = vmconf.convert(text, args.file)
    except vmconf.ImportError_ as err:
        print(err, file=sys.stderr)
        print(f"reconcile import: {args.file} not converted; nothing written",
              file=sys.stderr)
        return 1
    for note in converted.notes:
        print(f"{note}", file=sys.stderr)
    texts = {name: yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)
             for name, docs in converted.files.items()}
    if args.output is None:
        print("---\n".join(texts.values()), end="")
        return 0
    clash = [args.output / name for name in texts if (args.output / name).exists()]
    if clash:
        print(f"reconcile import: {clash[0]} exists; nothing written (choose an empty -o "
              "DIR)", file=sys.stderr)
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    for name, body in texts.items():
        (args.output / name).write_text(f"# from {args.file} by reconcile import\n{body}")
    loaded = desired.load(args.output)
    for error in loaded.errors:
        print(error, file=sys.stderr)
    print(f"wrote {len(texts)} file(s) to {args.output}: {len(loaded.vms)} VMs, "
          f"{len(loaded.switches)} switches" + (f"; {len(loaded.errors)} problems to fix "
                                                "there" if loaded.errors else ""))
    return 1 if loaded.errors else 0


def _down(args: argparse.Namespace) -> int:
    import asyncio

    from reconciler.loop import down

    state = _state(args)
    with state.locked():
        results = asyncio.run(down(state))
    for name, outcome in results:
        print(f"{name}  {outcome}")
    return 1 if any(o.startswith("failed") for _, o in results) else 0


def _ssh(args: argparse.Namespace) -> int:
    """exec the system ssh to the VM, verifying the host key the reconciler pinned."""
    import asyncio

    from reconciler import probes, seed
    from reconciler.observed import atomic_write, is_alive

    state = _state(args)
    records, problems = state.records()
    record = records.get(args.name)
    if record is None:
        why = problems.get(args.name) or f"no VM named '{args.name}' in {state.root}"
        print(f"reconcile ssh: {why}", file=sys.stderr)
        return 1
    if not is_alive(record):
        print(f"reconcile ssh: vm '{args.name}' is not running (see reconcile status)",
              file=sys.stderr)
        return 1
    found = asyncio.run(probes.addresses(state, record))
    if not found:
        print(f"reconcile ssh: vm '{args.name}' has no known address: put it on a "
              "`mode: local` switch (a static lease) or give it `agent: true`",
              file=sys.stderr)
        return 1
    address, paths = found[0].ipv4, state.paths(args.name)
    argv = ["ssh"]
    try:
        pinned = seed.known_hosts_line([address], paths.host_key_public.read_text())
    except (OSError, ValueError):
        pinned = ""
    if pinned:  # the first connection is verified, not trusted
        known = paths.known_hosts
        try:
            atomic_write(known, pinned)
        except PermissionError:  # the VM's owner, not root: a file of their own
            import tempfile

            fd, name = tempfile.mkstemp(prefix=f"reconcile-{args.name}-",
                                        suffix=".known_hosts")
            with os.fdopen(fd, "w") as f:
                f.write(pinned)
            known = Path(name)
        argv += ["-o", f"UserKnownHostsFile={known}",
                 "-o", "StrictHostKeyChecking=yes", "-o", "CheckHostIP=no"]
    else:
        print(f"reconcile ssh: vm '{args.name}' has no pinned host key (no cloud_init:); "
              "ssh checks it as usual", file=sys.stderr)
    user = args.login or (record.spec.get("cloud_init") or {}).get("user")
    if args.identity:
        argv += ["-i", args.identity]
    argv += ["--", f"{user}@{address}" if user else address, *args.command]
    sys.stdout.flush()
    try:
        os.execvp("ssh", argv)
    except OSError as err:
        print(f"reconcile ssh: cannot run ssh: {err.strerror}", file=sys.stderr)
        return 1


def _console(args: argparse.Namespace) -> int:
    from reconciler import console

    return console.main(_state(args).root, args.name)


def _watch(args: argparse.Namespace) -> int:
    import asyncio
    import signal
    import time

    from reconciler.daemon import Watch
    from reconciler.loop import Outcome, down
    from reconciler.plan import Kind

    state = _state(args)
    log = logging.getLogger("reconciler")
    metrics = None
    if args.metrics:
        from reconciler.metrics import Metrics

        metrics = Metrics()
    errors_seen: list[str] = []

    def on_report(report: Report, seconds: float) -> None:
        if report.errors != errors_seen:  # once per change, not on every pass
            errors_seen[:] = report.errors
            for error in report.errors:
                log.error("%s", error)
            if not report.errors:
                log.info("manifests are valid again")
        for result in report.results:
            if result.outcome is Outcome.FAILED and result.action is Kind.NONE:
                log.warning("vm '%s': %s", result.vm, result.reason)
        if metrics is not None:
            metrics.observe(report, seconds)

    member = None
    if args.etcd:
        from reconciler.cluster import Member

        member = Member(_store(args), args.host, state, labels=dict(args.label),
                        ttl=args.lease_ttl, reserve=args.reserve // 2**20,
                        fence_grace=args.fence_grace, address=args.address,
                        vcpus=args.vcpus, allow_dirs=_allowed(args, say=False),
                        shared_dir=args.shared_dir)
        args.path = member.manifests

    async def run() -> None:
        if member is not None:
            member.manifests.mkdir(parents=True, exist_ok=True, mode=0o700)
        watch = Watch(args.path, state, resync=args.resync, parallel=args.parallel,
                      stagger=args.stagger,
                      on_report=on_report, max_bytes=_max_bytes(args),
                      allow_dirs=_allowed(args), empty_ok=member is not None)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, watch.stop)
        loop.add_signal_handler(signal.SIGHUP, watch.poke, "SIGHUP")
        if member is not None:
            from reconciler.memberd import run_member

            log.info("cluster member %s (etcd %s, state dir %s, pid %d)", member.host,
                     ",".join(member.store.urls), state.root, os.getpid())
            await run_member(member, watch, metrics)
        else:
            log.info("watching %s (state dir %s, pid %d)", args.path, state.root,
                     os.getpid())
            await watch.run()
        on_exit = args.on_exit or ("stop" if args.stop_vms_on_exit else "keep")
        if on_exit == "keep":
            log.info("stopped after %d passes; VMs left running", watch.passes)
        else:
            for name, outcome in await down(state, save=on_exit == "save"):
                log.info("vm '%s': %s", name, outcome)
            log.info("stopped after %d passes; VMs %s", watch.passes,
                     "saved" if on_exit == "save" else "terminated")
        if member is not None:
            await asyncio.to_thread(member.leave, vms_kept=on_exit == "keep")

    with state.locked():
        if metrics is not None:
            try:
                metrics.serve(args.metrics)
            except (OSError, ValueError) as err:
                print(f"reconcile: cannot serve metrics on {args.metrics}: {err}",
                      file=sys.stderr)
                return 1
        started = time.monotonic()
        asyncio.run(run())
        log.debug("ran for %.0fs", time.monotonic() - started)
    return 0

if __name__ == "__main__":
    main()
