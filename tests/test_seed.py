"""cloud-init seeds: what the guest's cloud-init receives, as an ISO it can read."""

from __future__ import annotations

import email
import io
import shutil
import stat
import subprocess
from pathlib import Path

import pycdlib
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler import seed
from reconciler.seed import HostKey

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKx3dRPXtoLOmDFRGnbn0Ha2Or6kO3kq1wzNtu9WsyZs me@x"
HOST = HostKey("-----BEGIN OPENSSH PRIVATE KEY-----\nxyz\n-----END OPENSSH PRIVATE KEY-----\n",
               "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHost host")


def render(**changes: object) -> dict[str, bytes]:
    args: dict[str, object] = {
        "hostname": "c1", "user": "ops", "ssh_authorized_keys": [KEY], "user_data": None,
        "network_config": None, "meta_data": {}, "macs": ["52:54:00:00:00:01"],
        "host_key": HOST}
    args.update(changes)
    return seed.render(**args)  # type: ignore[arg-type]


def cloud_config(files: dict[str, bytes]) -> dict[str, object]:
    text = files["user-data"].decode()
    assert text.startswith("#cloud-config\n")
    return yaml.safe_load(text)  # type: ignore[no-any-return]


def test_declared_user_gets_the_keys_and_sudo_beside_the_default_user() -> None:
    config = cloud_config(render())
    assert config["users"] == ["default", {
        "name": "ops", "sudo": "ALL=(ALL) NOPASSWD:ALL", "shell": "/bin/bash",
        "lock_passwd": True, "ssh_authorized_keys": [KEY]}]
    assert config["hostname"] == "c1"
    assert config["ssh_keys"] == {"ed25519_private": HOST.private,
                                  "ed25519_public": HOST.public}


def test_declared_keys_are_merged_into_users_own_user_data_not_dropped() -> None:
    own = "#cloud-config\nusers: [{name: ops, groups: [adm]}]\nruncmd: [[touch, /x]]\n"
    config = cloud_config(render(user_data=own))
    assert config["runcmd"] == [["touch", "/x"]]
    assert config["users"] == [{"name": "ops", "groups": ["adm"], "ssh_authorized_keys": [KEY],
                                "sudo": "ALL=(ALL) NOPASSWD:ALL"}]
    without_user = cloud_config(render(user=None, user_data="#cloud-config\n"
                                       "ssh_authorized_keys: [other]\nhostname: mine\n"))
    assert without_user["ssh_authorized_keys"] == ["other", KEY]
    assert without_user["hostname"] == "mine"  # theirs wins over the default


def test_a_script_goes_beside_the_keys_in_a_multipart() -> None:
    files = render(user_data="#!/bin/sh\necho hello\n")
    message = email.message_from_bytes(files["user-data"])
    parts = {p.get_content_type(): p.get_payload(decode=True) for p in message.walk()
             if not p.is_multipart()}
    assert parts["text/x-shellscript"] == b"#!/bin/sh\necho hello\n"
    assert b"ops" in parts["text/cloud-config"]
    assert files == render(user_data="#!/bin/sh\necho hello\n")  # deterministic


def test_user_data_cloud_init_cannot_load_is_a_seed_error_not_a_crash() -> None:
    # The manifest's core-schema YAML reads 2001-02-30 as a string; cloud-init's 1.1
    # loader reads a date, and there is no such day.
    with pytest.raises(seed.SeedError, match=r"YAML 1\.1"):
        render(user_data="#cloud-config\nwhen: 2001-02-30\n")
    assert "hostname" not in cloud_config(render(user_data="#cloud-config\nfqdn: a.b.c\n"))


def test_network_config_matches_each_interface_by_mac_with_dhcp() -> None:
    config = yaml.safe_load(render(macs=["52:54:00:00:00:01", "52:54:00:00:00:02"])
                            ["network-config"])
    assert config == {"version": 1, "config": [
        {"type": "physical", "name": "eth0", "mac_address": "52:54:00:00:00:01",
         "subnets": [{"type": "dhcp"}]},
        {"type": "physical", "name": "eth1", "mac_address": "52:54:00:00:00:02",
         "subnets": [{"type": "dhcp"}]}]}
    assert "network-config" not in render(macs=[])
    assert render(network_config="version: 2\n")["network-config"] == b"version: 2\n"


def test_instance_id_follows_the_content_and_only_the_content() -> None:
    def iid(files: dict[str, bytes]) -> str:
        return str(yaml.safe_load(files["meta-data"])["instance-id"])

    first = iid(render(user_data="#cloud-config\nruncmd: [a]\n"))
    assert first == iid(render(user_data="#cloud-config\nruncmd: [a]\n"))
    assert first != iid(render(user_data="#cloud-config\nruncmd: [b]\n"))
    assert first != iid(render(user_data="#cloud-config\nruncmd: [a]\n", meta_data={"x": 1}))
    meta = yaml.safe_load(render(meta_data={"zone": "a"})["meta-data"])
    assert meta["local-hostname"] == "c1" and meta["zone"] == "a"


def test_the_iso_is_a_cidata_volume_with_the_files_under_their_names() -> None:
    files = render()
    image = seed.iso_image(files)
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(image))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        for name, data in files.items():
            for key in ("rr_path", "joliet_path"):
                out = io.BytesIO()
                iso.get_file_from_iso_fp(out, **{key: f"/{name}"})
                assert out.getvalue() == data
    finally:
        iso.close()


@pytest.mark.skipif(shutil.which("blkid") is None, reason="blkid missing")
def test_blkid_sees_the_label_cloud_init_looks_for(tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    seed.write_seed(path, render())
    found = subprocess.run(["blkid", "-o", "export", str(path)], capture_output=True,
                           text=True).stdout
    assert "LABEL=cidata" in found and "TYPE=iso9660" in found


def test_write_seed_is_private_and_skips_an_unchanged_seed(tmp_path: Path) -> None:
    path = tmp_path / "seed.iso"
    assert seed.write_seed(path, render()) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.stat().st_mtime_ns
    assert seed.write_seed(path, render()) is False and path.stat().st_mtime_ns == before
    assert seed.write_seed(path, render(hostname="c2")) is True
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_the_host_key_is_made_once_and_kept(tmp_path: Path) -> None:
    key = seed.ensure_host_key(tmp_path, comment="c1")
    assert key.public.startswith("ssh-ed25519 ") and "PRIVATE KEY" in key.private
    assert stat.S_IMODE((tmp_path / "ssh_host_ed25519_key").stat().st_mode) == 0o600
    assert seed.ensure_host_key(tmp_path, comment="other") == key
    line = seed.known_hosts_line(["10.0.0.5"], key.public)
    assert line == f"10.0.0.5 {' '.join(key.public.split()[:2])}\n"


@settings(max_examples=50, deadline=None)
@given(hostname=st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True),
       comment=st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF,
                                     exclude_categories=("Cs",)), max_size=40),
       runcmd=st.lists(st.text(max_size=20), max_size=3))
def test_any_declared_values_render_user_data_that_parses_back(
    hostname: str, comment: str, runcmd: list[str],
) -> None:
    key = f"{KEY.rsplit(' ', 1)[0]} {comment}"
    own = "#cloud-config\n" + yaml.safe_dump({"runcmd": runcmd})
    config = cloud_config(render(hostname=hostname, ssh_authorized_keys=[key], user_data=own))
    assert config["hostname"] == hostname and config["runcmd"] == runcmd
    assert config["users"][1]["ssh_authorized_keys"] == [key.strip()] or \
        config["users"][1]["ssh_authorized_keys"] == [key]  # type: ignore[index]
