"""GitOps watch mode with real QEMU: the daemon converges on manifest changes by itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    DEAF_PROMPT,
    Daemon,
    alive,
    deaf_manifest,
    pid_of,
    record,
    serial,
    status_rows,
    vm_manifest,
    wait_for,
    wait_for_serial,
)
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.qemu

StartDaemon = Callable[..., Daemon]
# A long resync: anything faster than it comes from watching the manifests.
WATCH_ONLY = ("--resync", "600")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def metrics(port: int) -> dict[str, float]:
    """The daemon's samples by `name{labels}`; none while it is not serving yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read()
    except OSError:
        return {}
    samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    path = tmp_path / "vms"
    path.mkdir()
    (path / ".git").mkdir()
    return path


def test_add_edit_and_delete_a_manifest_with_no_command(
    manifests: Path, guest: Path, state_dir: Path, daemon: StartDaemon
) -> None:
    d = daemon(manifests, *WATCH_ONLY)
    wait_for(lambda: "watching" in d.text(), timeout=30, what="the daemon")
    path = manifests / "web.yaml"
    path.write_text(vm_manifest("web", guest))
    wait_for_serial(state_dir, "web")
    first = pid_of(state_dir, "web")

    # Saved the way editors do: a temp file renamed over the manifest.
    temp = manifests / ".web.yaml.swp"
    temp.write_text(vm_manifest("web", guest).replace("memory: 96M", "memory: 112M"))
    temp.rename(path)
    wait_for(lambda: pid_of(state_dir, "web") != first, timeout=30, what="a restart")
    assert "112M" in record(state_dir, "web")["argv"]  # type: ignore[operator]
    assert not alive(first)
    second = pid_of(state_dir, "web")

    path.unlink()
    (manifests / "keep.yaml").write_text(vm_manifest("keep", guest, state="stopped"))
    wait_for(lambda: not alive(second), timeout=30, what="the VM to be terminated")
    wait_for(lambda: "web" not in status_rows(state_dir), timeout=10, what="its record gone")
    assert "power button pressed, shutting down" not in serial(state_dir, "web")
    log = d.text()
    assert "vm 'web': start (not running): started" in log
    assert "vm 'web': restart (spec changed: memory: 96M -> 112M)" in log
    assert "vm 'web': terminate (no longer declared): terminated: guest powered off" in log


def test_a_broken_manifest_keeps_its_vms_until_it_parses_again(
    manifests: Path, guest: Path, state_dir: Path, daemon: StartDaemon
) -> None:
    path = manifests / "web.yaml"
    good = vm_manifest("web", guest)
    path.write_text(good)
    d = daemon(manifests, *WATCH_ONLY)
    wait_for_serial(state_dir, "web")
    pid = pid_of(state_dir, "web")

    path.write_text(good + "  broken: [\n")
    wait_for(lambda: "YAML syntax error" in d.text(), timeout=20, what="the error logged")
    path.write_text(good.replace("memory: 96M", "memory: 80M") + "  broken: [\n")  # still bad
    time.sleep(1.5)
    assert alive(pid) and pid_of(state_dir, "web") == pid
    assert d.text().count("YAML syntax error") == 1  # once per change of errors, no repeats

    path.write_text(good.replace("memory: 96M", "memory: 112M"))  # fixed, and changed
    wait_for(lambda: pid_of(state_dir, "web") != pid, timeout=30, what="the change applied")
    wait_for(lambda: "manifests are valid again" in d.text(), timeout=30, what="the all-clear")


def test_stop_vms_on_exit_terminates_them(
    manifests: Path, guest: Path, state_dir: Path, daemon: StartDaemon
) -> None:
    (manifests / "web.yaml").write_text(vm_manifest("web", guest))
    d = daemon(manifests, *WATCH_ONLY, "--stop-vms-on-exit")
    wait_for_serial(state_dir, "web")
    pid = pid_of(state_dir, "web")
    assert d.stop(signal.SIGTERM) == 0
    assert not alive(pid)
    assert "power button pressed, shutting down" in serial(state_dir, "web")
    assert status_rows(state_dir)["web"]["state"] == "stopped"


def test_on_exit_save_saves_every_vm_and_the_next_daemon_restores_them(
    manifests: Path, guest: Path, state_dir: Path, daemon: StartDaemon
) -> None:
    for name in ("web", "db"):
        (manifests / f"{name}.yaml").write_text(vm_manifest(name, guest))
    first = daemon(manifests, *WATCH_ONLY, "--on-exit", "save")
    for name in ("web", "db"):
        wait_for_serial(state_dir, name)
    pids = {name: pid_of(state_dir, name) for name in ("web", "db")}
    assert first.stop(signal.SIGTERM) == 0
    assert "VMs saved" in first.text(), first.text()
    rows = status_rows(state_dir)
    for name, pid in pids.items():
        assert not alive(pid) and rows[name]["state"] == "saved", rows
    boots = {name: serial(state_dir, name).count("reconciler-guest: up") for name in pids}
    second = daemon(manifests, *WATCH_ONLY)
    for name, pid in pids.items():
        wait_for(lambda n=name, p=pid: pid_of(state_dir, n) != p  # type: ignore[misc]
                 and status_rows(state_dir)[n]["state"] in ("running", "ready"),
                 timeout=60, what=f"{name} restored")
    assert second.text().count("restored from") == 2, second.text()
    # The same guests carry on: no second boot on either console.
    assert {name: serial(state_dir, name).count("reconciler-guest: up")
            for name in pids} == boots


def test_a_guest_slow_to_power_off_does_not_delay_the_restart_of_another(
    manifests: Path, guest: Path, state_dir: Path, daemon: StartDaemon
) -> None:
    deaf = deaf_manifest("deaf", guest, stop_timeout="30s")  # ignores it for 30 s
    (manifests / "deaf.yaml").write_text(deaf)
    (manifests / "web.yaml").write_text(vm_manifest("web", guest))
    d = daemon(manifests, *WATCH_ONLY)
    wait_for_serial(state_dir, "deaf", DEAF_PROMPT)
    wait_for_serial(state_dir, "web")
    deaf_pid, web_pid = pid_of(state_dir, "deaf"), pid_of(state_dir, "web")
    (manifests / "deaf.yaml").write_text(deaf + "state: stopped\n")
    wait_for(lambda: record(state_dir, "deaf").get("stopping") is True, timeout=30,
             what="deaf's power button pressed")
    os.kill(web_pid, signal.SIGKILL)
    began = time.monotonic()
    wait_for(lambda: pid_of(state_dir, "web") != web_pid and alive(pid_of(state_dir, "web")),
             timeout=25, what="web restarted while deaf still has its grace")
    assert alive(deaf_pid), "deaf ended before web came back: nothing was shown"
    assert time.monotonic() - began < 25
    wait_for(lambda: not alive(deaf_pid), timeout=60, what="deaf quit after its grace")
    wait_for(lambda: "quit after 30s grace" in d.text(), timeout=10, what="deaf's outcome")
    assert "Traceback" not in d.text()


def test_a_second_daemon_refuses_naming_the_first(
    manifests: Path, guest: Path, state_dir: Path, daemon: StartDaemon
) -> None:
    first = daemon(manifests, *WATCH_ONLY)
    wait_for(lambda: "watching" in first.text(), timeout=30, what="the daemon")
    env = {"RECONCILER_STATE_DIR": str(state_dir), "PATH": "/usr/bin:/bin"}
    second = subprocess.run([sys.executable, "-m", "reconciler", str(manifests)],
                            capture_output=True, text=True, env=env, timeout=30)
    assert second.returncode == 1
    assert f"in use by another reconciler (pid {first.proc.pid})" in second.stderr
    assert "Traceback" not in second.stderr


def test_metrics_count_vms_actions_and_errors(
    manifests: Path, guest: Path, state_dir: Path, daemon: StartDaemon
) -> None:
    port = free_port()
    (manifests / "a.yaml").write_text(vm_manifest("a", guest))
    (manifests / "b.yaml").write_text(vm_manifest("b", guest, state="paused"))
    daemon(manifests, *WATCH_ONLY, "--metrics", f"127.0.0.1:{port}")
    wait_for(lambda: metrics(port).get("reconciler_passes_total{}", 0) >= 1, timeout=30,
             what="a pass")
    seen = metrics(port)
    assert seen["reconciler_vms{state=running}"] == 1
    assert seen["reconciler_vms{state=paused}"] == 1
    assert seen["reconciler_actions_total{kind=start,result=changed}"] == 2
    assert seen["reconciler_manifest_errors{}"] == 0
    assert seen["reconciler_pass_duration_seconds_count{}"] >= 1
    assert seen["process_open_fds{}"] > 0

    (manifests / "c.yaml").write_text("name: c\nmemroy: 1G\n")
    wait_for(lambda: metrics(port).get("reconciler_manifest_errors{}") == 2, timeout=20,
             what="the errors counted")  # unknown field + missing boot
    wait_for_serial(state_dir, "a")
    pid = pid_of(state_dir, "a")
    import os

    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: metrics(port).get("reconciler_restarts_total{reason=killed}") == 1,
             timeout=20, what="the restart counted")


def test_sd_notify_ready_and_watchdog(
    manifests: Path, guest: Path, state_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, daemon: StartDaemon
) -> None:
    address = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(address))
        sock.settimeout(30)
        monkeypatch.setenv("NOTIFY_SOCKET", str(address))
        monkeypatch.setenv("WATCHDOG_USEC", "400000")
        d = daemon(manifests, *WATCH_ONLY)
        messages = [sock.recv(4096).decode() for _ in range(4)]
        assert any(m.startswith("READY=1\nSTATUS=watching ") for m in messages), messages
        assert sum(m == "WATCHDOG=1" for m in messages) >= 2, messages
        d.stop(signal.SIGTERM)
        tail = []
        with pytest.raises(TimeoutError):
            while True:
                sock.settimeout(2)
                tail.append(sock.recv(4096).decode())
        assert "STOPPING=1" in tail


def test_sighup_runs_a_pass_and_json_logs_are_json(
    manifests: Path, guest: Path, state_dir: Path, daemon: StartDaemon
) -> None:
    d = daemon(manifests, *WATCH_ONLY, "--log-format", "json")
    wait_for(lambda: "watching" in d.text(), timeout=30, what="the daemon")
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP: reconciling now" in d.text(), timeout=10, what="SIGHUP")
    d.stop(signal.SIGTERM)
    lines = [json.loads(line) for line in d.text().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert any(line["message"].startswith("stopped after") for line in lines)
