"""Switches and VM interfaces: Linux bridges and persistent tap devices, with pyroute2.

Apply stage of desired -> observed -> plan -> apply: only the loop uses this module, when
it starts a VM that has interfaces (bridge and taps first, then QEMU opens its taps with
`-netdev tap,ifname=TAP,script=no,downscript=no`) and when it removes one. A `Switch` is a
bridge; interface N of VM NAME is the tap `tap_name(NAME, N)`; its guest MAC, unless the
manifest gives one, is `mac_address(NAME, N)`.

Pure: `tap_name`, `mac_address`, `tap_host_mac`, `bridge_mac`, `check_ifname`.
Effects: `Net`, which talks netlink through one `pyroute2.IPRoute`.

pyroute2 costs ~300 ms to import, so it is imported by the first `Net` call that needs
it, never by `import reconciler.net`: commands that touch no interface do not pay.

pyroute2's synchronous `IPRoute` (0.9) drives a private asyncio loop and fails inside a
running one ("Cannot run the event loop while another loop is running"), and the apply
stage is async. So a `Net` runs pyroute2 on a worker thread of its own: its methods block
the caller for the few milliseconds a netlink request takes, and work the same from plain
code, from a coroutine or from `asyncio.to_thread`. That thread is created by the first
call and lives in the network namespace of the thread that made that call.

Errors from the kernel (pyroute2's NetlinkError, OSError from the tun ioctls) become one
`NetError` naming the interface and the errno; transient ones (EBUSY, EAGAIN, interrupted
dumps) are retried a few times first, with the reason logged at each retry. Names that
cannot be interface names are a `ValueError`, raised before anything is sent.
"""

from __future__ import annotations

import base64
import concurrent.futures
import errno
import hashlib
import logging
import os
import re
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

log = logging.getLogger("reconciler.net")

IFNAMSIZ = 16  # the kernel's buffer for an interface name, NUL included
MAX_IFNAME = IFNAMSIZ - 1

# The manifest's rule for VM names (desired.py holds the same one).
VM_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")

# tap_name() shortening: `vm<prefix>_<hash>.<index>`. '_' never occurs in a VM name, so a
# shortened tap name can never equal a full one; the hash is 5 base32 characters (25 bits).
_HASH_CHARS = 8  # 40 bits: a clash among 10,000 long names is a 1 in 20,000 chance
_SHORT_MARK = "_"

# Transient kernel errors are retried: RETRY_ATTEMPTS tries in all, waits doubling from
# RETRY_WAIT seconds (capped at RETRY_MAX_WAIT), RETRY_DEADLINE seconds at most.
RETRY_ATTEMPTS = 5
RETRY_WAIT = 0.05
RETRY_MAX_WAIT = 0.5
RETRY_DEADLINE = 3.0
_TRANSIENT = frozenset({errno.EBUSY, errno.EAGAIN, errno.EINTR})

_IFF_UP = 0x1
_IFLA_TUN_TYPE_TAP = 2

_P = ParamSpec("_P")
_T = TypeVar("_T")


class NetError(Exception):
    """A bridge or tap operation failed; the message names the interface and the cause."""

    def __init__(self, message: str, *, ifname: str, code: int | None = None) -> None:
        super().__init__(message)
        self.ifname = ifname
        self.errno = code


# --- pure -----------------------------------------------------------------

def check_ifname(name: str, what: str = "interface") -> str:
    """`name` if the kernel accepts it as an interface name, else ValueError (pure)."""
    if not name or len(name.encode()) > MAX_IFNAME:
        raise ValueError(f"{what} name {name!r} must be 1 to {MAX_IFNAME} bytes long")
    if name in (".", "..") or any(c in "/:" or c.isspace() for c in name):
        raise ValueError(f"{what} name {name!r} must not be '.' or '..' nor contain '/', ':' "
                         "or whitespace")
    return name


def _check_vm(vm: str, index: int) -> None:
    if not VM_NAME.fullmatch(vm):
        raise ValueError(f"invalid VM name {vm!r}: expected [a-z0-9][a-z0-9-]{{0,62}}")
    if index < 0:
        raise ValueError(f"vm '{vm}': interface index {index} must not be negative")


def tap_name(vm: str, index: int) -> str:
    """The tap of interface `index` of VM `vm`: `vm<name>.<index>` (pure).

    At most 15 characters (IFNAMSIZ - 1). A longer one becomes
    `vm<prefix>_<hash>.<index>`: the head of the name and 8 base32 characters of a
    SHA-256 of the whole name. The same name always gives the same
    tap; a full and a shortened name never meet ('_' is not allowed in VM names); two long
    names that share their head collide only if their hashes do (1 in 2**40).
    """
    _check_vm(vm, index)
    suffix = f".{index}"
    full = f"vm{vm}{suffix}"
    if len(full) <= MAX_IFNAME:
        return full
    room = MAX_IFNAME - len("vm") - len(_SHORT_MARK) - _HASH_CHARS - len(suffix)
    if room < 0:
        raise ValueError(f"vm '{vm}': interface index {index} is too large for a tap name")
    digest = base64.b32encode(hashlib.sha256(vm.encode()).digest()).decode().lower()
    return f"vm{vm[:room]}{_SHORT_MARK}{digest[:_HASH_CHARS]}{suffix}"


def mac_address(vm: str, index: int) -> str:
    """The default guest MAC of interface `index` of VM `vm`: `52:54:00:xx:xx:xx` (pure).

    Locally administered and unicast (52 = 0b01010010), QEMU's usual prefix; the last three
    bytes are a SHA-256 of (name, index), so a VM keeps its MACs across runs and hosts.
    """
    _check_vm(vm, index)
    digest = hashlib.sha256(f"{vm}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def _check_mac(mac: str) -> str:
    mac = mac.lower()
    if not _MAC.fullmatch(mac):
        raise ValueError(f"invalid MAC address {mac!r}: expected six hex bytes, xx:xx:xx:xx:xx:xx")
    if int(mac[:2], 16) & 1:
        raise ValueError(f"MAC address {mac} is a multicast address; a NIC needs a unicast one")
    return mac


def tap_host_mac(guest_mac: str) -> str:
    """The address of a tap's host side for a guest NIC with `guest_mac` (pure).

    The guest's MAC with its first byte 0xfe (libvirt's rule). Never the guest's MAC
    itself: the bridge keeps a local entry for each port's own address and would deliver
    the guest's frames to the host instead of forwarding them to the tap.
    """
    return "fe" + _check_mac(guest_mac)[2:]


def bridge_mac(bridge: str) -> str:
    """The address a bridge is created with: `02:` and 5 bytes of a SHA-256 of its name (pure).

    Set explicitly, it stays put: a bridge left to choose takes the lowest address of its
    ports and changes it as VMs come and go.
    """
    check_ifname(bridge, "bridge")
    digest = hashlib.sha256(f"bridge/{bridge}".encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest[:5])


# --- effects --------------------------------------------------------------

def _errno_of(err: BaseException) -> int | None:
    if isinstance(err, OSError):
        return err.errno
    code = getattr(err, "code", None)  # pyroute2's NetlinkError
    return code if isinstance(code, int) else None


def _reason(err: BaseException) -> str:
    code = _errno_of(err)
    if code is None or code <= 0:
        return str(err) or type(err).__name__
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"


def _transient(err: BaseException) -> bool:
    if type(err).__name__ == "NetlinkDumpInterrupted":
        return True
    return isinstance(err, OSError | _netlink_error()) and _errno_of(err) in _TRANSIENT


def _netlink_error() -> type[Exception]:
    from pyroute2.netlink.exceptions import (  # type: ignore[import-untyped]
        NetlinkError,
    )

    return NetlinkError  # type: ignore[no-any-return]


def _attr(msg: Any, *path: str) -> Any:
    """A (nested) netlink attribute of a message, None when absent."""
    for name in path:
        if msg is None:
            return None
        msg = msg.get_attr(name)
    return msg


def _kind(link: Any) -> str | None:
    kind = _attr(link, "IFLA_LINKINFO", "IFLA_INFO_KIND")
    return kind if isinstance(kind, str) else None


def _is_tap(link: Any) -> bool:
    return (_kind(link) == "tun"
            and _attr(link, "IFLA_LINKINFO", "IFLA_INFO_DATA", "IFLA_TUN_TYPE")
            == _IFLA_TUN_TYPE_TAP)


class Net:
    """Bridges and taps of the current network namespace.

    One `pyroute2.IPRoute`, opened by the first call on a worker thread of this object and
    closed by `close()` (or leaving the `with` block); a later call opens it again.
    """

    def __init__(self) -> None:
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # guards _pool
        self._ipr: Any = None  # touched on the worker thread only

    def __enter__(self) -> Net:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            pool.submit(self._close_ipr).result()
        finally:
            pool.shutdown(wait=True)

    # --- public API (each runs on the worker thread) ---

    def ensure_bridge(self, bridge: str) -> bool:
        """Create bridge `bridge` if missing and set it up; True if it was created now."""
        check_ifname(bridge, "bridge")
        return self._run(self._ensure_bridge, bridge)

    def remove_bridge(self, bridge: str) -> None:
        """Delete bridge `bridge` (its ports are released, not deleted); none is fine."""
        check_ifname(bridge, "bridge")
        self._run(self._remove, bridge, "bridge")

    def bridge_ports(self, bridge: str) -> list[str]:
        """The interfaces enslaved to bridge `bridge`, sorted; [] if there is no such bridge."""
        check_ifname(bridge, "bridge")
        return self._run(self._bridge_ports, bridge)

    def ensure_tap(self, tap: str, bridge: str, mac: str | None = None, *,
                   owner: int | None = None) -> None:
        """A persistent tap `tap` in bridge `bridge`, up. Idempotent.

        An existing tap is re-attached and brought up, never recreated (a QEMU holding it
        keeps working). `mac` is the guest's MAC on this interface: the tap's own address
        becomes `tap_host_mac(mac)` (None: the kernel's random one). `owner` (a uid) may
        open the tap without CAP_NET_ADMIN (TUNSETOWNER); None leaves the owner as it is.
        The bridge must exist (`ensure_bridge`); a non-tap interface named `tap` is an error.
        """
        check_ifname(tap, "tap")
        check_ifname(bridge, "bridge")
        host_mac = tap_host_mac(mac) if mac is not None else None
        if owner is not None and owner < 0:
            raise ValueError(f"tap {tap}: owner uid {owner} must not be negative")
        self._run(self._ensure_tap, tap, bridge, host_mac, owner)

    def remove_tap(self, tap: str) -> None:
        """Delete tap `tap`; none is fine; an interface of another kind is left, as an error."""
        check_ifname(tap, "tap")
        self._run(self._remove, tap, "tap")

    def ensure_address(self, ifname: str, address: str, prefixlen: int) -> bool:
        """IPv4 `address/prefixlen` on `ifname` (a local switch's gateway); True if added."""
        check_ifname(ifname)
        return self._run(self._address, "add", ifname, address, prefixlen)

    def remove_address(self, ifname: str, address: str, prefixlen: int) -> bool:
        """Drop `address/prefixlen` from `ifname`; True if it was there."""
        check_ifname(ifname)
        return self._run(self._address, "del", ifname, address, prefixlen)

    def exists(self, ifname: str) -> bool:
        """Whether an interface named `ifname` exists (of any kind)."""
        check_ifname(ifname)
        return self._run(self._get, ifname) is not None

    # --- the worker thread ---

    def _run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="reconciler-net")
            future = self._pool.submit(fn, *args, **kwargs)
        return future.result()

    def _open(self) -> Any:
        from pyroute2 import IPRoute  # type: ignore[import-untyped]

        return IPRoute()

    def _iproute(self) -> Any:
        if self._ipr is None:
            try:
                self._ipr = self._open()
            except OSError as err:
                raise NetError(f"cannot open a netlink socket: {_reason(err)}", ifname="",
                               code=err.errno) from err
        return self._ipr

    def _close_ipr(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            ipr.close()

    def _do(self, what: str, ifname: str, fn: Callable[[], _T]) -> _T:
        """fn(), transient errors retried, kernel errors as NetError("{what} {ifname}: ...")."""
        from tenacity import (
            RetryCallState,
            Retrying,
            retry_if_exception,
            stop_after_attempt,
            stop_after_delay,
            wait_exponential,
        )

        def before_sleep(state: RetryCallState) -> None:
            err = state.outcome.exception() if state.outcome else None
            log.warning("%s %s: %s, retrying (attempt %d of %d)", what, ifname,
                        _reason(err) if err else "failed", state.attempt_number + 1,
                        RETRY_ATTEMPTS)

        retrying = Retrying(
            stop=stop_after_attempt(RETRY_ATTEMPTS) | stop_after_delay(RETRY_DEADLINE),
            wait=wait_exponential(multiplier=RETRY_WAIT, max=RETRY_MAX_WAIT),
            retry=retry_if_exception(_transient),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            return retrying(fn)
        except (OSError, _netlink_error()) as err:
            raise NetError(f"{what} {ifname}: {_reason(err)}", ifname=ifname,
                           code=_errno_of(err)) from err

    def _get(self, ifname: str) -> Any:
        """The link message of `ifname`, None if there is no such interface."""
        ipr = self._iproute()

        def get() -> Any:
            try:
                (link,) = ipr.link("get", ifname=ifname)
            except _netlink_error() as err:
                if _errno_of(err) == errno.ENODEV:
                    return None
                raise
            return link

        return self._do("cannot look up", ifname, get)

    def _ensure_bridge(self, bridge: str) -> bool:
        ipr = self._iproute()
        link = self._get(bridge)
        created = False
        if link is None:
            def add() -> bool:
                try:
                    ipr.link("add", ifname=bridge, kind="bridge", address=bridge_mac(bridge))
                except _netlink_error() as err:
                    if _errno_of(err) == errno.EEXIST:  # made by someone else meanwhile
                        return False
                    raise
                return True

            created = self._do("cannot create bridge", bridge, add)
            link = self._get(bridge)
            if link is None:
                raise NetError(f"bridge {bridge} vanished right after being created",
                               ifname=bridge, code=errno.ENODEV)
        if _kind(link) != "bridge":
            raise NetError(f"{bridge} exists and is not a bridge "
                           f"(kind {_kind(link) or 'unknown'}); choose another bridge name",
                           ifname=bridge)
        if not link["flags"] & _IFF_UP:
            index = link["index"]
            self._do("cannot bring up bridge", bridge,
                     lambda: ipr.link("set", index=index, state="up"))
        if created:
            log.info("bridge %s created", bridge)
        return created

    def _address(self, op: str, ifname: str, address: str, prefixlen: int) -> bool:
        ipr = self._iproute()
        link = self._get(ifname)
        if link is None:
            if op == "del":
                return False
            raise NetError(f"{ifname} does not exist", ifname=ifname, code=errno.ENODEV)
        index = link["index"]
        present = self._do("cannot list the addresses of", ifname, lambda: [
            (_attr(a, "IFA_ADDRESS"), a["prefixlen"])
            for a in ipr.get_addr(index=index, family=socket.AF_INET)])
        if ((address, prefixlen) in present) == (op == "add"):
            return False
        self._do(f"cannot {op} address {address}/{prefixlen} on", ifname,
                 lambda: ipr.addr(op, index=index, address=address, prefixlen=prefixlen))
        return True

    def _bridge_ports(self, bridge: str) -> list[str]:
        ipr = self._iproute()
        link = self._get(bridge)
        if link is None:
            return []
        if _kind(link) != "bridge":
            raise NetError(f"{bridge} is not a bridge (kind {_kind(link) or 'unknown'})",
                           ifname=bridge)
        index = link["index"]
        links = self._do("cannot list the ports of bridge", bridge,
                         lambda: list(ipr.link("dump")))
        return sorted(_attr(p, "IFLA_IFNAME") for p in links
                      if _attr(p, "IFLA_MASTER") == index)

    def _ensure_tap(self, tap: str, bridge: str, host_mac: str | None,
                    owner: int | None) -> None:
        ipr = self._iproute()
        br = self._get(bridge)
        if br is None:
            raise NetError(f"cannot attach tap {tap}: bridge {bridge} does not exist",
                           ifname=bridge, code=errno.ENODEV)
        if _kind(br) != "bridge":
            raise NetError(f"cannot attach tap {tap}: {bridge} is not a bridge "
                           f"(kind {_kind(br) or 'unknown'})", ifname=bridge)
        uid = {} if owner is None else {"uid": owner}
        link = self._get(tap)
        if link is None:
            # A tuntap "add" is TUNSETIFF + TUNSETPERSIST on /dev/net/tun, done by pyroute2.
            self._do("cannot create tap", tap,
                     lambda: ipr.link("add", ifname=tap, kind="tuntap", mode="tap", **uid))
            log.info("tap %s created", tap)
            link = self._get(tap)
            if link is None:
                raise NetError(f"tap {tap} vanished right after being created", ifname=tap,
                               code=errno.ENODEV)
        elif not _is_tap(link):
            raise NetError(f"{tap} exists and is not a tap (kind {_kind(link) or 'unknown'}); "
                           "it is left alone", ifname=tap)
        elif owner is not None and _attr(link, "IFLA_LINKINFO", "IFLA_INFO_DATA",
                                         "IFLA_TUN_OWNER") != owner:
            # Re-opening a persistent tap sets its owner; EBUSY while a QEMU holds it.
            self._do("cannot set the owner of tap", tap,
                     lambda: ipr.link("add", ifname=tap, kind="tuntap", mode="tap", **uid))
        change: dict[str, Any] = {}
        if _attr(link, "IFLA_MASTER") != br["index"]:
            change["master"] = br["index"]
        if host_mac is not None and _attr(link, "IFLA_ADDRESS") != host_mac:
            change["address"] = host_mac
        if not link["flags"] & _IFF_UP:
            change["state"] = "up"
        if change:
            index = link["index"]
            self._do(f"cannot attach to bridge {bridge} and bring up tap", tap,
                     lambda: ipr.link("set", index=index, **change))

    def _remove(self, ifname: str, what: str) -> None:
        ipr = self._iproute()
        link = self._get(ifname)
        if link is None:
            return
        if (what == "tap" and not _is_tap(link)) or (what == "bridge"
                                                      and _kind(link) != "bridge"):
            raise NetError(f"{ifname} is not a {what} (kind {_kind(link) or 'unknown'}); "
                           "it is left alone", ifname=ifname)
        index = link["index"]

        def delete() -> None:
            try:
                ipr.link("del", index=index)
            except _netlink_error() as err:
                if _errno_of(err) != errno.ENODEV:  # gone meanwhile: as good
                    raise

        self._do(f"cannot delete {what}", ifname, delete)
        log.info("%s %s deleted", what, ifname)
