"""`reconcile import vm.conf`: vmd's configuration as manifests. Errors are FILE:LINE like
vmd's parser and write nothing; what has no equivalent is reported."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import Run, alive, pid_of, record

from reconciler.vmconf import ImportError_, convert

Reconcile = Callable[..., Run]


def converted(text: str) -> tuple[dict[str, list[dict[str, object]]], list[str]]:
    found = convert(text, Path("vm.conf"))
    return found.files, found.notes


def test_macros_switches_vms_instances_and_staggered_start() -> None:
    files, notes = converted('''
        ram = "512M"
        staggered start parallel 2 delay 30
        switch "uplink" { interface bridge0 }
        vm "base" {
            disable
            memory $ram
            boot "/bsd"
            disk "/vm/base.raw" format raw
            allow instance { memory, disk }
        }
        vm "web.example" instance "base" {
            memory 1G
            interface { switch "uplink"; lladdr 52:54:00:00:00:10 }
            interface tap3 { rdomain 2 }
        }
    ''')
    assert files["settings.yaml"] == [{"kind": "Settings", "parallel": 2, "stagger": "30s"}]
    assert files["switches.yaml"] == [{"kind": "Switch", "name": "uplink",
                                       "bridge": "bridge0"}]
    assert files["base.template.yaml"] == [{
        "kind": "Template", "name": "base", "memory": "512M", "boot": {"kernel": "/bsd"},
        "disks": [{"path": "/vm/base.raw", "format": "raw"}], "allow": ["memory", "disks"]}]
    assert files["base.yaml"] == [{"name": "base", "template": "base", "state": "stopped"}]
    assert files["web-example.yaml"] == [{
        "name": "web-example", "template": "base", "memory": "1024M",
        "interfaces": [{"switch": "uplink", "mac": "52:54:00:00:00:10"}]}]
    assert notes == [
        "vm.conf:12: vm \"web.example\" is named 'web-example' here ([a-z0-9-] only)",
        "vm.conf:15: vm 'web-example': this interface option has no equivalent; dropped",
        "vm.conf:15: vm 'web-example': an interface without a switch has no equivalent "
        "(attach it to a switch); dropped",
    ]


@pytest.mark.parametrize(("text", "message"), [
    ('vm "a" {\n  memory 512M\n  frobnicate\n}\n', "vm.conf:3: unknown keyword 'frobnicate'"),
    (f'vm "{"a" * 64}" {{\n boot "/bsd"\n}}\n',
     "vm.conf:1: vm name too long: 'aaaaaaaaaaaaaaaaaaaa...' (64 characters, at most 63)"),
    ('vm "a" {\n boot "/bsd"\n memory 8M\n}\n',
     "vm.conf:3: vm 'a': memory too small: 8M (at least 16M)"),
    ('switch "s" {\n group x\n}\n',
     'vm.conf:1: switch "s" has no interface (a bridge: interface bridgeN)'),
    ('vm "a" {\n boot $kernel\n}\n', "vm.conf:2: macro 'kernel' is not defined"),
    ('vm "a" {\n boot "/bsd"\n', "vm.conf:2: syntax error: unexpected end of file"),
    ('vm "a" {\n boot "/bsd"\n interface { switch "nope" }\n}\n',
     "vm.conf:3: vm 'a': switch \"nope\" is not declared above"),
    ('vm "b" instance "a" {\n memory 1G\n}\n',
     "vm.conf:1: vm 'b': instance of \"a\", which is not declared above with allow instance"),
])
def test_mistakes_are_file_line_errors_like_vmds(text: str, message: str) -> None:
    with pytest.raises(ImportError_) as caught:
        convert(text, Path("vm.conf"))
    assert str(caught.value).splitlines()[0].startswith(message), str(caught.value)


@pytest.mark.qemu
def test_an_imported_vm_conf_converges(
    tmp_path: Path, guest: Path, state_dir: Path, reconcile: Reconcile,
) -> None:
    conf = tmp_path / "vm.conf"
    conf.write_text(f'''# written for this test
kernel = "{guest / 'vmlinuz'}"
staggered start parallel 1 delay 1
vm "small" {{
    disable
    memory 96M
    boot $kernel
    allow instance {{ memory, owner }}
}}
vm "one" instance "small" {{ memory 112M }}
vm "two" instance "small" {{
    sev
}}
''')
    out = tmp_path / "vms"
    run = reconcile("import", conf, "-o", out, check=0)
    assert "wrote 5 file(s)" in run.out and "3 VMs, 0 switches" in run.out, run
    assert f"{conf}:12: vm 'two': AMD SEV has no equivalent; dropped" in run.err
    again = reconcile("import", conf, "-o", out, check=1)  # never overwrites
    assert "exists; nothing written" in again.err
    # vmd boots an OpenBSD kernel alone; this Linux guest also needs its initrd:
    template = out / "small.template.yaml"
    data = yaml.safe_load(template.read_text())
    data["boot"].update(initrd=str(guest / "initrd.img"), cmdline="console=ttyS0 quiet")
    template.write_text(yaml.safe_dump(data))
    first = reconcile("--once", out, check=0)
    assert "one" in first.out and "two" in first.out
    for name, memory in (("one", 112), ("two", 96)):
        assert alive(pid_of(state_dir, name))
        assert record(state_dir, name)["spec"]["memory"] == memory  # type: ignore[index]
    assert "small  ok       stopped as desired" in reconcile("--once", out, check=0).out
