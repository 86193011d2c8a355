"""Least privilege (issue 10): image roots (`--allow-dir`: a path outside them, symlinks
resolved, is a manifest error before anything is touched; without any root each run
says so), vCPU pinning (`cpus:`, applied live), QEMU without root or capabilities
(privsep), and owners who see their own VMs and nobody else's."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, Run, pid_of, vm_manifest
from test_desired import tree, write

from reconciler import desired

__all__ = ["tree"]  # the fixture, shared with test_desired
Reconcile = Callable[..., Run]


def test_allow_dir_refuses_paths_outside_its_roots_even_through_a_symlink(
    tree: Path, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (outside / "vmlinuz").write_bytes(b"k")
    (outside / "seed.yaml").write_text("#cloud-config\n{}\n")
    (tree / "images").mkdir()
    (tree / "images" / "link").symlink_to(outside / "vmlinuz")
    path = write(tree, "vm.yaml", f"name: a\nboot: {{kernel: {outside}/vmlinuz}}\n"
                 "---\nname: b\nboot: {kernel: images/link}\n"
                 f"---\nname: c\nboot: {{kernel: vmlinuz}}\ncdrom: /etc/shadow\n"
                 f"---\nname: d\nboot: {{kernel: vmlinuz}}\n"
                 f"cloud_init: {{user_data_file: {outside}/seed.yaml}}\n")
    loaded = desired.load(tree, allow_dirs=[tree])
    found = [str(e) for e in loaded.errors]
    root = os.path.realpath(tree)
    assert found == [
        f"{path}:2: vm 'a': boot.kernel: {outside}/vmlinuz is outside the allowed dirs "
        f"(--allow-dir {root})",
        f"{path}:5: vm 'b': boot.kernel: {tree}/images/link (a symlink to {outside}/vmlinuz) "
        f"is outside the allowed dirs (--allow-dir {root})",
        f"{path}:9: vm 'c': cdrom: /etc/shadow is outside the allowed dirs "
        f"(--allow-dir {root})",
        f"{path}:13: vm 'd': cloud_init.user_data_file: {outside}/seed.yaml is outside the "
        f"allowed dirs (--allow-dir {root})",
    ], found
    assert loaded.vms == {}  # the file is broken: nothing in it is started or pruned
    ok = desired.load(tree, allow_dirs=[tree, outside, Path("/etc")])
    assert ok.errors == [] and sorted(ok.vms) == ["a", "b", "c", "d"]



@pytest.mark.qemu
def test_a_vm_outside_the_roots_is_refused_and_no_vm_is_touched(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile,
) -> None:
    manifests = tmp_path / "vms"
    manifests.mkdir()
    (manifests / "a.yaml").write_text(vm_manifest("a", guest))
    first = reconcile("--once", "--allow-dir", REPO / "guest", manifests, check=0)
    assert "no --allow-dir" not in first.err
    pid = pid_of(state_dir, "a")
    (tmp_path / "x.iso").write_bytes(b"\0" * 2048)
    path = manifests / "a.yaml"
    path.write_text(vm_manifest("a", guest) + f"cdrom: {tmp_path / 'x.iso'}\n")
    refused = reconcile("--once", "--allow-dir", REPO / "guest", manifests, check=1)
    assert f"{path}:7: vm 'a': cdrom: {tmp_path / 'x.iso'} is outside the allowed dirs" \
        in refused.err, refused
    assert pid_of(state_dir, "a") == pid and os.path.exists(f"/proc/{pid}")
    unrestricted = reconcile("--once", manifests, check=0)
    assert "WARNING reconciler: no --allow-dir given" in unrestricted.err
    assert pid_of(state_dir, "a") != pid  # the cdrom is hardware: a restart


def test_an_owner_must_exist_and_must_not_be_root(tree: Path) -> None:
    path = write(tree, "vm.yaml", "name: a\nboot: {kernel: vmlinuz}\nowner: nosuchuser9\n"
                 "---\nname: b\nboot: {kernel: vmlinuz}\nowner: root\n"
                 "---\nname: c\nboot: {kernel: vmlinuz}\nowner: 'nobody:nosuchgroup9'\n"
                 "---\nname: d\nboot: {kernel: vmlinuz}\nowner: 'x;rm -rf /'\n"
                 "---\nname: e\nboot: {kernel: vmlinuz}\nowner: 'nobody:nogroup'\n")
    found = [str(e) for e in desired.load(tree).errors]
    assert found[:3] == [
        f"{path}:3: vm 'a': owner: user 'nosuchuser9' does not exist on this host",
        f"{path}:7: vm 'b': owner: QEMU never runs as root: name an unprivileged user",
        f"{path}:11: vm 'c': owner: group 'nosuchgroup9' does not exist on this host",
    ], found
    assert found[3].startswith(f"{path}:15: vm 'd': owner: ") and len(found) == 4, found
    # A VM's owner is hardware (its QEMU's uid); a VM without one hashes as before owners.
    plain = desired.VM.model_validate({"name": "e", "boot": {"kernel": str(tree / "vmlinuz")}})
    assert "owner" not in plain.hardware()


def cpus_allowed(pid: int) -> dict[int, str]:
    """Cpus_allowed_list of each thread of pid."""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                found[int(task.name)] = line.split()[1]
    return found


@pytest.mark.qemu
def test_vcpu_threads_are_pinned_and_follow_a_change_without_a_restart(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile,
) -> None:
    last = (os.cpu_count() or 1) - 1
    manifests = tmp_path / "vms"
    manifests.mkdir()
    (manifests / "a.yaml").write_text(vm_manifest("a", guest, vcpus="2", cpus=f"'{last}'"))
    run = reconcile("--once", manifests, check=0)
    assert f"2 vCPU thread(s) pinned to CPUs {last}" in run.out, run
    pid = pid_of(state_dir, "a")
    pinned = [t for t, cpus in cpus_allowed(pid).items() if cpus == str(last)]
    assert len(pinned) == 2  # the vCPU threads only; QEMU's others keep every CPU
    (manifests / "a.yaml").write_text(vm_manifest("a", guest, vcpus="2", cpus="'0'"))
    again = reconcile("--once", manifests, check=0)
    assert "ok" in again.out and pid_of(state_dir, "a") == pid
    assert sorted(cpus_allowed(pid)[t] for t in pinned) == ["0", "0"]
    (manifests / "a.yaml").write_text(vm_manifest("a", guest, vcpus="2", cpus="'0-99'"))
    assert "cpus: host CPU" in reconcile("--once", manifests, check=1).out


# --- QEMU without root (privsep) and owners ------------------------------------

def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


@pytest.fixture
def users() -> Iterator[Callable[[str], pwd.struct_passwd]]:
    """Make host users for a test (no home, no shell); removed at teardown."""
    made: list[str] = []

    def make(stem: str) -> pwd.struct_passwd:
        name = f"rt{stem}{uuid.uuid4().hex[:6]}"
        subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell",
                        "/usr/sbin/nologin", name], check=True)
        made.append(name)
        return pwd.getpwnam(name)

    yield make
    for name in made:
        subprocess.run(["userdel", "--force", name], check=False)


def as_user(user: pwd.struct_passwd, fn: Callable[[], int], tmp_path: Path
            ) -> tuple[int, str, str]:
    """fn() in a child process that is `user` (uid, gid, own groups only, no capability):
    its exit code, stdout and stderr. The kernel checks its every access as it would
    for that user's own shell."""
    with open(tmp_path / f"{user.pw_name}.out", "w+b") as out, \
            open(tmp_path / f"{user.pw_name}.err", "w+b") as err:
        stdin_r, stdin_w = os.pipe()
        os.write(stdin_w, b"~.")  # a console session detaches at once
        os.close(stdin_w)
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 99
            try:
                os.setgroups(os.getgrouplist(user.pw_name, user.pw_gid))
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)
                os.dup2(stdin_r, 0)
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                # print() goes to these files, not to pytest's capture
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                sys.stdin = open(0, closefd=False)  # noqa: SIM115
                code = fn()
            except BaseException as e:  # reported to the parent
                os.write(2, f"{type(e).__name__}: {e}\n".encode())
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(stdin_r)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode()


@pytest.mark.qemu
def test_qemu_runs_without_root_and_an_owner_sees_only_their_own_vm(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile,
    users: Callable[[str], pwd.struct_passwd],
) -> None:
    from reconciler import cli, console, privsep

    alice, bob = users("alice"), users("bob")
    manifests = tmp_path / "vms"
    manifests.mkdir()
    (manifests / "vms.yaml").write_text(
        vm_manifest("mine", guest, owner=alice.pw_name, ready="{serial: 'up uptime'}")
        + "---\n" + vm_manifest("other", guest, ready="{serial: 'up uptime'}"))
    reconcile("--once", "--wait", manifests, check=0)
    qemu_user = pwd.getpwnam(privsep.QEMU_USER)
    for name, user in (("mine", alice), ("other", qemu_user)):
        found = proc_status(pid_of(state_dir, name))
        assert found["Uid"].split() == [str(user.pw_uid)] * 4, (name, found["Uid"])
        assert found["Gid"].split() == [str(user.pw_gid)] * 4, (name, found["Gid"])
        assert "0" not in found["Groups"].split()
        assert int(found["CapEff"], 16) == 0 and int(found["CapPrm"], 16) == 0
    # The users reach the state dir as they would (search only on the test's own dirs).
    for up in (tmp_path, *tmp_path.parents[:2]):
        up.chmod(up.stat().st_mode | 0o011)
    mine = state_dir / "vms" / "mine"

    def status() -> int:
        try:
            cli.main(["--state-dir", str(state_dir), "status", "--json"])
        except SystemExit as done:
            return int(done.code or 0)
        return 0

    status()  # as root first: every module it needs is imported before the fork
    code, out, err = as_user(alice, status, tmp_path)
    assert code == 0, (out, err)
    rows = json.loads(out)
    assert [(r["name"], r["state"]) for r in rows if r["managed"]] == [("mine", "ready")], rows
    # "other" is neither shown nor called unmanaged (QEMUs of other state dirs may be)
    assert "other" not in [r["name"] for r in rows], rows

    code, out, err = as_user(alice, lambda: console.main(state_dir, "mine"), tmp_path)
    assert code == 0 and "detached from vm 'mine'" in err, (code, out, err)
    code, out, err = as_user(
        alice, lambda: int("up uptime" not in (mine / "serial.log").read_text()), tmp_path)
    assert code == 0, err
    code, out, err = as_user(alice, lambda: console.main(state_dir, "other"), tmp_path)
    assert code == 1 and "vm 'other' is not yours" in err, (code, out, err)

    def trespass() -> int:
        """bob tries alice's VM every way he could: each must be refused."""
        refused = 0
        for attempt in (lambda: (mine / "serial.log").read_bytes(),
                        lambda: console.connect(mine / "serial.sock"),
                        lambda: console.connect(mine / "qmp.sock"),
                        lambda: (mine / "record.json").read_bytes()):
            try:
                attempt()
            except PermissionError:
                refused += 1
        return 10 + refused

    code, out, err = as_user(bob, trespass, tmp_path)
    assert code == 14, (code, err)
    code, out, err = as_user(bob, status, tmp_path)
    assert code == 0, (out, err)
    assert not {"mine", "other"} & {r["name"] for r in json.loads(out)}, out
    reconcile("down", check=0)


@pytest.mark.qemu
def test_a_kernel_qemu_may_not_read_is_copied_and_both_kinds_boot(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile,
) -> None:
    """The kernel is handed as itself where QEMU's user may read it (0644, as Debian
    ships them) and as a memfd copy where not (0600, root's): QEMU reads either by
    /proc/self/fd/N, and both guests boot."""
    images = tmp_path / "images"
    images.mkdir(mode=0o700)  # QEMU's user cannot even reach it by name
    private = images / "vmlinuz"
    private.write_bytes((guest / "vmlinuz").read_bytes())
    private.chmod(0o600)
    manifests = tmp_path / "vms"
    manifests.mkdir()
    (manifests / "vms.yaml").write_text(
        vm_manifest("shared", guest, ready="{serial: 'up uptime'}") + "---\n"
        + vm_manifest("private", guest, ready="{serial: 'up uptime'}").replace(
            f"kernel: {guest / 'vmlinuz'}", f"kernel: {private}"))
    reconcile("--once", "--wait", manifests, check=0)
    for name, kernel in (("shared", str(guest / "vmlinuz")), ("private", "/memfd:vmlinuz")):
        fd_dir = Path(f"/proc/{pid_of(state_dir, name)}/fd")
        links = [os.readlink(fd) for fd in fd_dir.iterdir()]
        assert any(link.startswith(kernel) for link in links), (name, links)
    reconcile("down", check=0)
