"""cloud-init NoCloud seeds, and the guests' SSH host keys.

Apply stage of desired -> observed -> plan -> apply: before a VM with `cloud_init:`
starts, the loop renders its seed (`render`: the files `user-data`, `meta-data`,
`network-config`), writes it as an ISO 9660 image with volume id `cidata`
(`write_seed`, with pycdlib: no external tool) into the VM's state dir, and QEMU
attaches it read-only. Pure: `render`, `content_hash`, `iso_image`. Effects:
`write_seed`, `ensure_host_key` (ssh-keygen).

What the guest's cloud-init receives:
- meta-data: `instance-id` (a hash of everything else in the seed: a change to the
  content re-runs cloud-init's per-instance modules, the same content never does)
  and `local-hostname`, with the manifest's extra keys;
- user-data: the manifest's keys merged into the user's own `#cloud-config` (a user
  with passwordless sudo, or the keys for the image's default user; the hostname; the
  pinned host key), or a MIME multipart of that and the user's `#!` script;
- network-config: the user's, or v1 `physical` entries matched by MAC with DHCP
  (Debian 12's ifupdown renderer fails on v2 `match: name:`).

Exceptions: SeedError (ssh-keygen failed; user-data that merges badly).
"""

from __future__ import annotations

import email.mime.multipart
import email.mime.text
import email.policy
import hashlib
import io
import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from reconciler.observed import atomic_write

VOLUME = "cidata"
SUDO = "ALL=(ALL) NOPASSWD:ALL"
# ISO 9660 level-1 names for the files; their real names come from Rock Ridge/Joliet.
_ISO_NAMES = {"user-data": "/USERDATA.;1", "meta-data": "/METADATA.;1",
              "network-config": "/NETWORKC.;1", "vendor-data": "/VENDORDA.;1"}


class SeedError(Exception):
    """A seed could not be made; the message names the fault."""


@dataclass(frozen=True)
class HostKey:
    private: str  # OpenSSH private key
    public: str  # 'ssh-ed25519 AAAA... comment'


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=1 << 16)


def _cloud_config(*, hostname: str, user: str | None, keys: Sequence[str],
                  own: Mapping[str, Any], host_key: HostKey | None) -> dict[str, Any]:
    """The user's cloud-config with the manifest's keys merged in (theirs win on ties)."""
    config = dict(own)
    if "fqdn" not in config:  # cloud-init takes the hostname from fqdn when given
        config.setdefault("hostname", hostname)
    config.setdefault("preserve_hostname", False)
    config.setdefault("manage_etc_hosts", True)  # else sudo cannot resolve the hostname
    if user is not None:
        entry = {"name": user, "sudo": SUDO, "shell": "/bin/bash", "lock_passwd": True,
                 "ssh_authorized_keys": list(keys)}
        users = config.get("users")
        if not isinstance(users, list):
            users = ["default"] if users is None else [users]
        users = list(users)
        for index, existing in enumerate(users):
            if isinstance(existing, dict) and existing.get("name") == user:
                merged = dict(existing)
                have = list(merged.get("ssh_authorized_keys") or [])
                merged["ssh_authorized_keys"] = have + [k for k in keys if k not in have]
                merged.setdefault("sudo", SUDO)
                users[index] = merged
                break
        else:
            users.append(entry)
        config["users"] = users
    elif keys:
        have = list(config.get("ssh_authorized_keys") or [])
        config["ssh_authorized_keys"] = have + [k for k in keys if k not in have]
    if host_key is not None and "ssh_keys" not in config:
        config["ssh_keys"] = {"ed25519_private": host_key.private,
                              "ed25519_public": host_key.public.strip()}
        config.setdefault("ssh_deletekeys", True)
    return config


def _user_data(config: dict[str, Any], script: str | None) -> bytes:
    text = "#cloud-config\n" + _dump(config)
    if script is None:
        return text.encode()
    # A script cannot take the keys: both go in a multipart, deterministic (no dates,
    # a boundary from the content).
    boundary = "==reconciler-" + hashlib.sha256((text + script).encode()).hexdigest()[:24]
    message = email.mime.multipart.MIMEMultipart("mixed", boundary=boundary)
    for body, subtype, name in ((text, "cloud-config", "reconciler.cfg"),
                                (script, "x-shellscript", "user-script")):
        part = email.mime.text.MIMEText(body, subtype, "utf-8")
        part.add_header("Content-Disposition", "attachment", filename=name)
        message.attach(part)
    return message.as_bytes(policy=email.policy.SMTP.clone(linesep="\n"))


def network_v1(macs: Sequence[str]) -> dict[str, Any]:
    """One `physical` entry per MAC, with DHCP (what Debian 12's ifupdown renders)."""
    return {"version": 1, "config": [
        {"type": "physical", "name": f"eth{index}", "mac_address": mac,
         "subnets": [{"type": "dhcp"}]} for index, mac in enumerate(macs)]}


def render(*, hostname: str, user: str | None, ssh_authorized_keys: Sequence[str],
           user_data: str | None, network_config: str | None, meta_data: Mapping[str, Any],
           macs: Sequence[str], host_key: HostKey | None) -> dict[str, bytes]:
    """The seed's files, by name (pure and deterministic)."""
    own: dict[str, Any] = {}
    script = None
    if user_data is not None:
        if user_data.startswith("#!"):
            script = user_data
        else:
            try:
                loaded = yaml.load(user_data, Loader=getattr(yaml, "CSafeLoader",
                                                             yaml.SafeLoader))
            except (yaml.YAMLError, ValueError, RecursionError) as err:  # 2001-02-30
                raise SeedError(f"user-data does not load as cloud-init reads it (YAML "
                                f"1.1): {str(err)[:200]}") from None
            if loaded is not None and not isinstance(loaded, dict):
                raise SeedError("#cloud-config must be a mapping")
            own = loaded or {}
    config = _cloud_config(hostname=hostname, user=user, keys=ssh_authorized_keys, own=own,
                           host_key=host_key)
    files = {"user-data": _user_data(config, script)}
    if network_config is not None:
        files["network-config"] = network_config.encode()
    elif macs:
        files["network-config"] = _dump(network_v1(macs)).encode()
    extra = dict(meta_data)
    for reserved in ("instance-id", "local-hostname"):
        if reserved in extra:
            raise SeedError(f"meta_data: {reserved} is set by the reconciler")
    identity = content_hash({**files, "meta-data": json.dumps(
        extra, sort_keys=True, default=str).encode() + hostname.encode()})
    meta = {"instance-id": f"iid-{identity[:16]}", "local-hostname": hostname, **extra}
    files["meta-data"] = _dump(meta).encode()
    return files


def content_hash(files: Mapping[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        for part in (name.encode(), files[name]):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.hexdigest()


def iso_image(files: Mapping[str, bytes]) -> bytes:
    """ISO 9660 (with Rock Ridge and Joliet names), volume id `cidata`."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=VOLUME)
    for name in sorted(files):
        data = files[name]
        iso_name = _ISO_NAMES.get(name) or f"/{name.upper().replace('-', '')[:8]}.;1"
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name,
                   joliet_path=f"/{name}")
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def write_seed(path: Path, files: Mapping[str, bytes]) -> bool:
    """The seed at path (0600, atomic); False when it already holds exactly these files."""
    sidecar = path.with_suffix(".sha256")
    digest = content_hash(files)
    try:
        if path.is_file() and sidecar.read_text().strip() == digest:
            return False
    except OSError:
        pass
    atomic_write(path, iso_image(files))
    atomic_write(sidecar, digest + "\n")
    return True


def ensure_host_key(directory: Path, *, comment: str) -> HostKey:
    """The guest's ed25519 host key in directory: made once, the same ever after."""
    private = directory / "ssh_host_ed25519_key"
    public = private.with_suffix(".pub")
    if not (private.is_file() and public.is_file()):
        for stale in (private, public):
            stale.unlink(missing_ok=True)
        try:
            made = subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                 "-f", str(private)], capture_output=True, text=True, timeout=30,
                stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as err:
            raise SeedError(f"cannot run ssh-keygen (Debian: openssh-client): {err}") from err
        if made.returncode != 0:
            raise SeedError(f"ssh-keygen failed: {made.stderr.strip()}")
        os.chmod(private, 0o600)
    return HostKey(private.read_text(), public.read_text().strip())


def known_hosts_line(hosts: Sequence[str], public: str) -> str:
    """A known_hosts line pinning one public key ('ssh-ed25519 AAAA... comment') for hosts;
    ValueError when public is not a key."""
    parts = public.split()
    if len(parts) < 2:
        raise ValueError("not an SSH public key")
    return f"{','.join(hosts)} {parts[0]} {parts[1]}\n"
