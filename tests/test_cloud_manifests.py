"""Manifests of usable machines: cloud_init, local switches, probes; secrets kept out."""

from __future__ import annotations

import json
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from test_desired import messages, tree, write

from reconciler import desired
from reconciler.desired import VM, CloudInit, host_routes

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKx3dRPXtoLOmDFRGnbn0Ha2Or6kO3kq1wzNtu9WsyZs ops@laptop"
SECRET = "hunter2-secret-token"
__all__ = ["tree"]  # the fixture, shared with test_desired


def vm_with(cloud_init: str) -> str:
    return f"name: c1\nboot: {{kernel: vmlinuz}}\ncloud_init:\n{cloud_init}"


def test_user_data_that_does_not_parse_is_an_error_at_its_own_line(tree: Path) -> None:
    path = write(tree, "vm.yaml", vm_with(
        "  user: ops\n"
        "  user_data: |\n"
        "    #cloud-config\n"
        "    runcmd:\n"
        "      - [touch, /x\n"
        "    packages: [git]\n"))
    [error] = messages(tree)
    assert error.startswith(f"{path}:9: vm 'c1': cloud_init: user_data line 4: YAML syntax "
                            "error in #cloud-config"), error


def test_user_data_that_cloud_init_would_ignore_is_an_error(tree: Path) -> None:
    path = write(tree, "vm.yaml", vm_with("  user_data: 'just some text'\n"))
    assert messages(tree) == [
        f"{path}:4: vm 'c1': cloud_init: user_data line 1: user-data must start with "
        "'#cloud-config' or '#!' (cloud-init would ignore it silently)"]


def test_a_bad_user_data_file_names_the_file_and_its_line(tree: Path) -> None:
    write(tree, "ud.yaml", "#cloud-config\nusers:\n  - name: a\n  name: b\n")
    path = write(tree, "vm.yaml", vm_with("  user_data_file: ud.yaml\n"))
    [error] = messages(tree)
    assert error.startswith(f"{path}:3: vm 'c1': cloud_init: user_data_file {tree}/ud.yaml:4:")


def test_a_missing_user_data_file_is_an_error_that_touches_nothing(tree: Path) -> None:
    path = write(tree, "vm.yaml", vm_with("  user_data_file: nowhere.yaml\n"))
    loaded = desired.load(tree)
    assert [str(e) for e in loaded.errors] == [
        f"{path}:4: vm 'c1': cloud_init.user_data_file: file not found: {tree}/nowhere.yaml"]
    assert loaded.vms == {}


def test_an_alias_bomb_in_user_data_is_refused(tree: Path) -> None:
    bomb = "".join(f"    {c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
                   for p, c in zip("abcdef", "bcdefg", strict=True))
    head = "  user_data: |\n    #cloud-config\n    a: &a [1,1,1,1,1,1,1,1,1,1]\n"
    write(tree, "vm.yaml", vm_with(head + bomb))
    [error] = messages(tree)
    assert "aliases are expanded" in error


def test_keys_must_look_like_ssh_public_keys(tree: Path) -> None:
    write(tree, "k.pub", f"# mine\n{KEY}\nnot a key\n")
    path = write(tree, "vm.yaml", vm_with(
        "  ssh_authorized_keys: ['ssh-rsa']\n  ssh_authorized_keys_file: k.pub\n"))
    assert sorted(messages(tree)) == sorted([
        f"{path}:4: vm 'c1': cloud_init.ssh_authorized_keys: entry 0 is not an SSH public "
        "key (expected 'ssh-ed25519 AAAA...' or similar)",
    ])
    write(tree, "vm.yaml", vm_with("  ssh_authorized_keys_file: k.pub\n"))
    assert messages(tree) == [
        f"{path}:3: vm 'c1': cloud_init: ssh_authorized_keys_file {tree}/k.pub: key 2 is "
        "not an SSH public key"]


def test_the_reconciler_owns_instance_id_and_digest(tree: Path) -> None:
    path = write(tree, "vm.yaml", vm_with("  meta_data: {instance-id: x}\n  digest: abc\n"))
    found = messages(tree)
    assert any(f"{path}:4: vm 'c1': cloud_init.meta_data: instance-id is set by the "
               "reconciler" in m for m in found), found
    write(tree, "vm.yaml", vm_with("  digest: abc\n"))
    assert messages(tree) == [
        f"{path}:3: vm 'c1': cloud_init: digest is set by the reconciler; remove it"]


def test_secrets_never_reach_the_dump_but_change_the_spec_hash(tree: Path) -> None:
    write(tree, "ud.yaml", f"#cloud-config\nwrite_files: [{{path: /x, content: {SECRET}}}]\n")
    write(tree, "vm.yaml", vm_with(f"  user: ops\n  ssh_authorized_keys: ['{KEY}']\n"
                                   "  user_data_file: ud.yaml\n"))
    vm = desired.load(tree).vms["c1"].vm
    dumped = json.dumps(vm.model_dump(mode="json"))
    assert SECRET not in dumped and SECRET not in repr(vm) and SECRET not in str(vm)
    assert SECRET in vm.cloud_init.texts()["user_data"]  # type: ignore[union-attr]
    before = vm.spec_hash()
    write(tree, "ud.yaml", "#cloud-config\nwrite_files: [{path: /x, content: other}]\n")
    assert desired.load(tree).vms["c1"].vm.spec_hash() != before


def test_inline_user_data_is_not_dumped_either(tree: Path) -> None:
    write(tree, "vm.yaml", vm_with(f"  user_data: \"#cloud-config\\nbootcmd: [echo {SECRET}]\"\n"))
    vm = desired.load(tree).vms["c1"].vm
    assert SECRET not in json.dumps(vm.model_dump(mode="json"))
    assert SECRET not in str(vm.model_json_schema())


def test_a_record_spec_validates_again_without_its_secrets(tree: Path) -> None:
    write(tree, "ud.yaml", "#cloud-config\n{}\n")
    write(tree, "vm.yaml", vm_with("  user_data_file: ud.yaml\n"))
    vm = desired.load(tree).vms["c1"].vm
    spec = vm.model_dump(mode="json")
    (tree / "ud.yaml").unlink()  # gone since: a restore still knows its hardware
    again = VM.model_validate(spec, context={"from_record": True})
    assert again.spec_hash() == vm.spec_hash()


def test_cloud_init_hostname_defaults_to_the_vm_name(tree: Path) -> None:
    write(tree, "vm.yaml", vm_with("  user: ops\n"))
    assert desired.load(tree).vms["c1"].vm.hostname == "c1"
    ci = CloudInit.model_validate({"hostname": "web"})
    assert ci.hostname == "web"


SWITCHES = """\
kind: Switch
name: a
mode: local
subnet: 100.64.7.0/24
---
kind: Switch
name: b
mode: local
subnet: 100.64.7.128/25
"""


def test_overlapping_local_subnets_are_errors_at_both_and_their_vms_wait(tree: Path) -> None:
    path = write(tree, "net.yaml", SWITCHES)
    write(tree, "vm.yaml", "name: v\nboot: {kernel: vmlinuz}\ninterfaces: [{switch: a}]\n")
    loaded = desired.load(tree)
    found = [str(e) for e in loaded.errors]
    assert f"{path}:4: switch 'a': subnet 100.64.7.0/24 overlaps switch 'b' (100.64.7.128/25, " \
           f"{path}:9); give each local switch a subnet of its own" in found, found
    assert any(m.startswith(f"{path}:9: switch 'b': subnet 100.64.7.128/25 overlaps")
               for m in found)
    assert loaded.vms == {}  # its switch is broken: the VM is not started nor changed


def test_a_subnet_over_a_host_route_is_an_error(tree: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    table = tree / "route"
    table.write_text("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
                     "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
                     "eth0\t00004064\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
                     "br-a\t00074064\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
    assert host_routes(table) == [(IPv4Network("100.64.0.0/16"), "eth0"),
                                  (IPv4Network("100.64.7.0/24"), "br-a")]  # no default
    monkeypatch.setattr(desired, "host_routes", lambda: [(IPv4Network("100.64.0.0/16"), "eth0"),
                                                         (IPv4Network("100.64.7.0/24"), "br-a")])
    path = write(tree, "net.yaml", "kind: Switch\nname: a\nmode: local\nsubnet: 100.64.7.0/24\n")
    assert messages(tree) == [
        f"{path}:4: switch 'a': subnet 100.64.7.0/24 overlaps the host's route to "
        "100.64.0.0/16 via eth0; choose another subnet"]  # its own bridge's route is fine


def test_local_switch_fields_go_with_mode_local(tree: Path) -> None:
    path = write(tree, "net.yaml", "kind: Switch\nname: a\nnat: true\n")
    assert messages(tree) == [f"{path}:1: switch 'a': nat go with mode: local (a plain bridge "
                              "has no addresses of its own)"]
    write(tree, "net.yaml", "kind: Switch\nname: a\nmode: local\nsubnet: 100.64.7.1/24\n")
    [error] = messages(tree)
    assert "subnet" in error and "host bits set" in error
    write(tree, "net.yaml", "kind: Switch\nname: a\nmode: local\nsubnet: 100.64.7.0/30\n")
    [error] = messages(tree)
    assert "too small" in error
    write(tree, "net.yaml", "kind: Switch\nname: a\nmode: local\n")
    switch = desired.load(tree).switches["a"].switch
    assert (switch.subnet, switch.nat, switch.dns) == (None, True, False)


def test_ready_needs_a_probe_and_what_each_probe_needs(tree: Path) -> None:
    path = write(tree, "vm.yaml", "name: v\nboot: {kernel: vmlinuz}\nready: {timeout: 5s}\n")
    assert messages(tree) == [f"{path}:3: vm 'v': ready: give at least one probe: serial: "
                              "REGEX, tcp: PORT or agent: true"]
    write(tree, "vm.yaml", "name: v\nboot: {kernel: vmlinuz}\nready: {agent: true, tcp: 22}\n")
    found = messages(tree)
    assert found == [f"{path}:1: vm 'v': ready: {{agent: true}} needs agent: true on the VM "
                     "(the guest agent's channel)"], found
    write(tree, "vm.yaml", "name: v\nagent: true\nboot: {kernel: vmlinuz}\n"
                           "ready: {agent: true, tcp: 22}\n")
    assert messages(tree) == [f"{path}:1: vm 'v': ready: {{tcp: 22}} needs an interface to "
                              "connect to (interfaces:)"]


def test_a_user_data_file_beside_the_manifests_is_data_not_a_manifest(tree: Path) -> None:
    write(tree, "web.cloud-config.yaml", "#cloud-config\nruncmd: [[touch, /x]]\n")
    write(tree, "net/ops.yaml", "version: 1\nconfig: []\n")
    write(tree, "vm.yaml", vm_with("  user_data_file: web.cloud-config.yaml\n"
                                   "  network_config_file: net/ops.yaml\n"))
    loaded = desired.load(tree)
    assert loaded.errors == [] and list(loaded.vms) == ["c1"]
    assert [f.name for f in loaded.files] == ["vm.yaml"]



def test_user_data_cloud_init_would_fail_to_load_is_a_manifest_error(tree: Path) -> None:
    path = write(tree, "vm.yaml", vm_with("  user_data: |\n    #cloud-config\n"
                                          "    when: 2001-02-30\n"))
    [error] = messages(tree)
    assert error.startswith(f"{path}:5: vm 'c1': cloud_init: user_data line 1: #cloud-config "
                            "does not load as cloud-init reads it: day is out of range"), error
