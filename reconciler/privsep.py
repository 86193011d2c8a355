"""Privilege separation (vmd's privsep): QEMU runs without root, on descriptors we open.

Who a VM's QEMU runs as is its `Identity`: the VM's `owner` (vm.conf's), else the system
user `reconciler-qemu` (setup.sh makes it). The child drops to it before exec (setuid
from root clears every capability); the seccomp sandbox stays on top.

What QEMU may not open itself, the reconciler opens and hands over (`Handoff`): disk,
cdrom, seed and backing images as `-add-fd` fd sets (`/dev/fdset/N`), the console log the
same way, the QMP, console and agent sockets as listening sockets (`fd=N`), taps as
`/dev/net/tun` descriptors attached to the VM's tap (`fd=N`), the kernel and initrd by
`/proc/self/fd/N` (QEMU takes them by name only): a kernel QEMU's user may read anyway
as a descriptor of the file itself (no copy: the name reopens that file alone, with
QEMU's permissions), any other as a memfd copy (a kernel's is emptied once QEMU has
read it; the initrd's stays: QEMU maps it). QEMU so needs no path of the host at
all (no pidfile either: a clean exit is traced to its log), and may traverse none of
the state dir.

The VM's directory is root's. A VM with an `owner` gives it the owner's group (0750):
that group may read the record and the console log (0640) and connect to the sockets
(0660), which is what `status` and `console` need; other users cannot enter it. Without
an owner it stays root's alone (0700): the VMs that share the `reconciler-qemu` user
cannot reach each other's consoles or QMP sockets by name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.observed import VMPaths, opt

QEMU_USER = "reconciler-qemu"
KVM_GROUP = "kvm"

_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


class PrivsepError(Exception):
    """A VM's QEMU cannot be given its identity or its files; the message says why."""


@dataclass(frozen=True)
class Identity:
    """The user a QEMU runs as; `shares`: the VM's owner, whose group may see the VM."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    shares: bool = False


def identity(owner: str | None) -> Identity | None:
    """Who a VM's QEMU runs as; None when the reconciler is not root (QEMU runs as us).

    `owner`: `USER[:GROUP]` (the group defaults to the user's own). The `kvm` group is
    added, so /dev/kvm opens where the host gives it to that group.
    """
    if os.geteuid() != 0:
        return None
    user, _, group = (owner or QEMU_USER).partition(":")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        if owner is None:
            raise PrivsepError(
                f"user {QEMU_USER} does not exist, and QEMU never runs as root: run "
                f"./setup.sh, or `useradd --system --user-group --no-create-home "
                f"--shell /usr/sbin/nologin {QEMU_USER}`") from None
        raise PrivsepError(f"owner: user '{user}' does not exist on this host") from None
    gid = entry.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivsepError(f"owner: group '{group}' does not exist on this host") from None
    if entry.pw_uid == 0 or gid == 0:
        raise PrivsepError(f"owner: '{owner or QEMU_USER}' is root; QEMU never runs as root")
    groups = set(os.getgrouplist(user, gid))
    with contextlib.suppress(KeyError):
        groups.add(grp.getgrnam(KVM_GROUP).gr_gid)
    groups.discard(0)
    return Identity(user=user, uid=entry.pw_uid, gid=gid, groups=tuple(sorted(groups)),
                    shares=owner is not None)


def owns(path: Path, who: Identity | None, *, mode: int, fd: int | None = None) -> None:
    """path (or the open fd) is root's: with the owner's group and `mode` when who is a
    VM's owner, else private (mode's owner bits only). As it is without who."""
    if who is None:
        return
    gid, mode = (who.gid, mode) if who.shares else (0, mode & 0o700)
    if fd is not None:
        os.fchown(fd, 0, gid)
        os.fchmod(fd, mode)
    else:
        os.chown(path, 0, gid, follow_symlinks=False)
        os.chmod(path, mode)


def prepare_dir(paths: VMPaths, who: Identity | None) -> None:
    """The VM's directory for who: root's, open to its owner's group (0750), else to
    nobody (QEMU needs no path: `Handoff`)."""
    paths.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    owns(paths.dir, who, mode=0o750)
    for readable in (paths.record, paths.host_key_public):
        with contextlib.suppress(FileNotFoundError):
            owns(readable, who, mode=0o640)


@dataclass
class Handoff:
    """The descriptors one QEMU launch gets (`pass_fds`) and the options naming them."""

    who: Identity | None
    fds: list[int] = field(default_factory=list)
    options: list[str] = field(default_factory=list)  # the -add-fd options
    _memfds: list[int] = field(default_factory=list)
    _sets: int = 0

    def _keep(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def fdset(self, path: Path, *, writable: bool) -> str:
        """path opened for QEMU as an fd set: what `filename` names it by.

        A writable image gets a read-write and a read-only descriptor (QEMU picks the one
        whose mode it asks for); the opaque tag is the path, for `ps` and `query-fdsets`.
        """
        modes = (os.O_RDWR, os.O_RDONLY) if writable else (os.O_RDONLY,)
        fds = []
        for mode in modes:
            try:
                fds.append(self._keep(os.open(path, mode | os.O_CLOEXEC)))
            except OSError as err:
                raise PrivsepError(f"cannot open {path}: {err.strerror}") from err
        return self._set(fds, path)

    def _set(self, fds: list[int], path: Path) -> str:
        """A new fd set of fds (-add-fd, tagged with path): the name QEMU opens it by."""
        self._sets += 1
        for fd in fds:
            self.options += ["-add-fd", f"fd={fd},set={self._sets},opaque={opt(path)}"]
        return f"/dev/fdset/{self._sets}"

    def log(self, path: Path) -> str:
        """A log QEMU appends to, as the fd set naming it.

        Root's, readable by an owner's group (0640); opened without following a symlink."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise PrivsepError(f"cannot open {path}: {err.strerror}") from err
        self._keep(fd)
        owns(path, self.who, mode=0o640, fd=fd)
        return self._set([fd], path)

    def listen(self, path: Path) -> int:
        """A listening unix socket at path for QEMU to serve: an owner's group may connect."""
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            owns(path, self.who, mode=0o660)
            sock.listen(16)
        except OSError as err:
            sock.close()
            raise PrivsepError(f"cannot listen on {path}: {err.strerror}") from err
        return self._keep(sock.detach())

    def copy(self, path: Path, *, mapped: bool) -> str:
        """A file QEMU opens by name (kernel, initrd): the name to give it, /proc/self/fd/N.

        A kernel QEMU's user may read anyway (`may_read`) is handed over as itself: the
        name reopens that one file, with QEMU's own permissions, and names no path of
        the host. Anything else is a memfd copy. `mapped`: QEMU maps it for the guest's
        life (the initrd: copied, so what the guest maps never changes under it); else
        it reads it at start (the kernel), and `loaded` empties the copy."""
        try:
            src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise PrivsepError(f"cannot read {path}: {err.strerror}") from err
        if not mapped and may_read(src, self.who):
            return f"/proc/self/fd/{self._keep(src)}"
        try:  # the copy, of the very file just looked at
            fd = self._keep(os.memfd_create(path.name, os.MFD_CLOEXEC))
            if not mapped:
                self._memfds.append(fd)
            size = os.fstat(src).st_size
            done = 0
            while done < size:
                sent = os.sendfile(fd, src, done, size - done)
                if sent == 0:
                    break
                done += sent
        except OSError as err:
            raise PrivsepError(f"cannot read {path}: {err.strerror}") from err
        finally:
            os.close(src)
        return f"/proc/self/fd/{fd}"

    def tap(self, name: str) -> int:
        """A descriptor of tap `name` (TUNSETIFF on /dev/net/tun, with vnet headers)."""
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise PrivsepError(f"cannot open /dev/net/tun for tap {name}: "
                               f"{err.strerror}") from err
        self._keep(fd)
        request = struct.pack("16sH22x", name.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR)
        try:
            fcntl.ioctl(fd, _TUNSETIFF, request)
        except OSError as err:
            raise PrivsepError(f"cannot attach to tap {name}: {err.strerror}") from err
        return fd

    def loaded(self) -> None:
        """QEMU has read the kernel (QMP answers only after): free its copy."""
        for fd in self._memfds:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        self.close()

    def close(self, *, keep_copies: bool = False) -> None:
        """Our copies of the descriptors (QEMU keeps its own); of the memfd copies too
        unless `keep_copies` (`loaded` empties them)."""
        for fd in self.fds:
            if not (keep_copies and fd in self._memfds):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fds = [fd for fd in self._memfds if keep_copies]
        if not keep_copies:
            self._memfds.clear()


def may_read(fd: int, who: Identity | None) -> bool:
    """Whether who (None: this process's user) may read the regular file open as fd,
    as the kernel decides it from its mode bits; False when an ACL could decide
    otherwise (it is not ours to interpret)."""
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode):
        return False
    try:
        os.getxattr(fd, "system.posix_acl_access")
        return False
    except OSError as err:
        if err.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
    if who is None:
        uid, groups = os.geteuid(), {os.getegid(), *os.getgroups()}
    else:
        uid, groups = who.uid, {who.gid, *who.groups}
    if found.st_uid == uid:
        return bool(found.st_mode & stat.S_IRUSR)
    if found.st_gid in groups:
        return bool(found.st_mode & stat.S_IRGRP)
    return bool(found.st_mode & stat.S_IROTH)


def can_open_kvm(who: Identity | None, device: Path = Path("/dev/kvm")) -> bool:
    """Whether who may open /dev/kvm read-write (by its mode, owner and group)."""
    if who is None:
        return os.access(device, os.R_OK | os.W_OK)
    try:
        found = device.stat()
    except OSError:
        return False
    mode = found.st_mode
    if found.st_uid == who.uid:
        return bool(mode & stat.S_IRUSR and mode & stat.S_IWUSR)
    if found.st_gid == who.gid or found.st_gid in who.groups:
        return bool(mode & stat.S_IRGRP and mode & stat.S_IWGRP)
    return bool(mode & stat.S_IROTH and mode & stat.S_IWOTH)
