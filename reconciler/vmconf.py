"""`reconcile import vm.conf`: vmd's configuration, as manifests.

vm.conf is parsed with a grammar (lark, LALR), never with regexes: macros (`name =
"value"`, `$name`), `switch` and `vm` blocks, `vm "web" instance "base"`, `allow
instance`, `staggered start parallel N delay S`, `local prefix`. Mistakes are
`FILE:LINE: message` like vmd's own parser (syntax errors, an unknown keyword, a name
too long, too little memory, a switch without an interface, an undefined macro) and
nothing is written. What has no equivalent here is reported, line by line, never
dropped silently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.desired import QCOW2_MAGIC

GRAMMAR = r"""
start: item*
?item: macro | switch | vm | staggered | local_prefix | include | other_global
macro: NAME "=" value
staggered: "staggered" "start" "parallel" NUMBER "delay" NUMBER
local_prefix: "local" [INET6] "prefix" value
include: "include" value
other_global: "socket" "owner" value
switch: "switch" value "{" switch_opt* "}"
switch_opt: "interface" value            -> sw_interface
          | "locked" "lladdr"            -> sw_unsupported
          | "group" value                -> sw_unsupported
          | "up"                         -> sw_unsupported
          | "down"                       -> sw_unsupported
          | "enable"                     -> sw_unsupported
          | "disable"                    -> sw_unsupported
          | "rdomain" NUMBER             -> sw_unsupported
vm: "vm" value ["instance" value] "{" vm_opt* "}"
?vm_opt: "disable"                         -> disable
       | "enable"                          -> enable
       | "memory" value                    -> memory
       | "disk" value ["format" WORD]     -> disk
       | "cdrom" value                     -> cdrom
       | "boot" "device" WORD              -> boot_device
       | "boot" value                      -> boot
       | "interface" [value] [iface_block] -> interface
       | "interfaces" NUMBER               -> interfaces
       | "local" "interface" [value] [iface_block] -> local_interface
       | "owner" value                     -> owner
       | "allow" "instance" "{" allowed ("," allowed)* ","? "}" -> allow
       | "sev"                             -> unsupported
       | "seves"                           -> unsupported
iface_block: "{" iface_opt* "}"
iface_opt: "switch" value                  -> if_switch
         | "lladdr" MAC                    -> if_lladdr
         | "locked" "lladdr" [MAC]         -> if_lladdr
         | "rdomain" NUMBER                -> if_unsupported
         | "group" value                   -> if_unsupported
         | "up"                            -> if_unsupported
         | "down"                          -> if_unsupported
!allowed: "boot" | "cdrom" | "disk" | "instance" | "interface" | "memory" | "owner"
       | "owner" "group" | "device"
value: STRING | WORD | NUMBER | MACRO_REF | MAC
INET6: "inet6"
MACRO_REF: /\$[A-Za-z_][A-Za-z0-9_]*/
MAC.3: /[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}/
NUMBER.2: /[0-9]+(?![A-Za-z0-9_.\/:+-])/
NAME.1: /[A-Za-z_][A-Za-z0-9_]*(?=\s*=)/
WORD: /[A-Za-z0-9_.\/:+-]+/
STRING: /"[^"\n]*"/
COMMENT: /#[^\n]*/
SEMICOLON: ";"
%import common.WS
%ignore WS
%ignore COMMENT
%ignore SEMICOLON
"""

NAME_MAX = 63  # vmd's VMM_MAX_NAME_LEN, less its NUL
MIN_MEMORY = 16  # MiB: ours (vmd's own minimum is lower)
_UNITS = {"": 1 / (1024 * 1024), "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


class ImportError_(Exception):
    """vm.conf cannot be converted: FILE:LINE problems, one per line."""


@dataclass
class Converted:
    """The manifests (one YAML text per file name) and what could not be carried over."""

    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


_PARSER: Any = None


def _parser() -> Any:
    global _PARSER
    if _PARSER is None:
        from lark import Lark

        _PARSER = Lark(GRAMMAR, parser="lalr", propagate_positions=True)
    return _PARSER


def parse(text: str, source: Path) -> Any:
    """vm.conf's parse tree; ImportError_ with FILE:LINE on a syntax error."""
    from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken

    try:
        return _parser().parse(text)
    except UnexpectedToken as err:
        token = err.token
        if token.type == "$END":
            raise ImportError_(f"{source}:{err.line}: syntax error: unexpected end of "
                               "file (a { without its })") from None
        what = str(token)
        kind = "unknown keyword" if re.fullmatch(r"[a-z][a-z0-9_-]*", what) else \
            "syntax error: unexpected"
        raise ImportError_(f"{source}:{token.line}: {kind} '{what}'") from None
    except UnexpectedCharacters as err:
        raise ImportError_(f"{source}:{err.line}: syntax error: unexpected "
                           f"'{err.char}'") from None
    except UnexpectedEOF:
        raise ImportError_(f"{source}: syntax error: unexpected end of file") from None


def convert(text: str, source: Path) -> Converted:
    """vm.conf text as manifests; ImportError_ listing every FILE:LINE problem."""
    tree = parse(text, source)
    return _Converter(source).run(tree)


class _Converter:
    def __init__(self, source: Path) -> None:
        self.source = source
        self.macros: dict[str, str] = {}
        self.errors: list[str] = []
        self.out = Converted()
        self.switches: dict[str, dict[str, Any]] = {}
        self.local_subnet: str | None = None
        self.uses_local = False
        self.templates: dict[str, dict[str, Any]] = {}
        self.vms: list[dict[str, Any]] = []

    def at(self, node: Any) -> str:
        return f"{self.source}:{node.meta.line if hasattr(node, 'meta') else node.line}"

    def note(self, node: Any, message: str) -> None:
        self.out.notes.append(f"{self.at(node)}: {message}")

    def error(self, node: Any, message: str) -> None:
        self.errors.append(f"{self.at(node)}: {message}")

    def value(self, node: Any) -> str:
        token = node.children[0]
        text = str(token)
        if token.type == "STRING":
            return text[1:-1]
        if token.type == "MACRO_REF":
            name = text[1:]
            if name not in self.macros:
                self.error(node, f"macro '{name}' is not defined")
                return ""
            return self.macros[name]
        return text

    def run(self, tree: Any) -> Converted:
        for item in tree.children:
            getattr(self, f"_{item.data}")(item)
        if self.uses_local:
            local: dict[str, Any] = {"kind": "Switch", "name": "local", "mode": "local",
                                     "nat": True}
            if self.local_subnet:
                local["subnet"] = self.local_subnet
            self.switches.setdefault("local", local)
        if self.errors:
            raise ImportError_("\n".join(self.errors))
        if self.switches:
            self.out.files["switches.yaml"] = list(self.switches.values())
        for name, template in self.templates.items():
            self.out.files[f"{name}.template.yaml"] = [template]
        for vm in self.vms:
            self.out.files[f"{vm['name']}.yaml"] = [vm]
        return self.out

    # --- globals ---

    def _macro(self, node: Any) -> None:
        name, value = node.children
        self.macros[str(name)] = self.value(value)

    def _staggered(self, node: Any) -> None:
        parallel, delay = (int(str(c)) for c in node.children)
        if parallel < 1:
            self.error(node, "staggered start: parallel must be at least 1")
            return
        self.out.files["settings.yaml"] = [{"kind": "Settings", "parallel": parallel,
                                            "stagger": f"{delay}s"}]

    def _local_prefix(self, node: Any) -> None:
        if node.children[0] is not None and str(node.children[0]) == "inet6":
            self.note(node, "local inet6 prefix: no equivalent (local switches are IPv4); "
                            "dropped")
            return
        prefix = self.value(node.children[-1])
        self.local_subnet = _first_24(prefix)
        self.note(node, f"local prefix {prefix}: the local switch gets "
                        f"{self.local_subnet} (one subnet shared by the VMs, not a /31 each)")

    def _include(self, node: Any) -> None:
        self.error(node, "include: import each file on its own (reconcile import FILE)")

    def _other_global(self, node: Any) -> None:
        self.note(node, "socket owner: no equivalent (VM owners reach their own VMs); "
                        "dropped")

    # --- switches ---

    def _switch(self, node: Any) -> None:
        name = _name(self.value(node.children[0]))
        bridge = None
        for opt in node.children[1:]:
            if opt.data == "sw_interface":
                bridge = self.value(opt.children[0])
            else:
                self.note(opt, f"switch '{name}': this option has no equivalent; dropped")
        if bridge is None:
            self.error(node, f"switch \"{name}\" has no interface (a bridge: "
                             "interface bridgeN)")
            return
        self.switches[name] = {"kind": "Switch", "name": name, "bridge": bridge}

    # --- VMs ---

    def _vm(self, node: Any) -> None:
        raw = self.value(node.children[0])
        parent = self.value(node.children[1]) if node.children[1] is not None else None
        if len(raw) > NAME_MAX:
            self.error(node, f"vm name too long: '{raw[:20]}...' ({len(raw)} characters, "
                             f"at most {NAME_MAX})")
            return
        name = _name(raw)
        if name != raw:
            self.note(node, f"vm \"{raw}\" is named '{name}' here ([a-z0-9-] only)")
        vm: dict[str, Any] = {"name": name}
        allow: list[str] | None = None
        nics: list[dict[str, Any]] = []
        for opt in node.children[2:]:
            kind = opt.data
            if kind == "allow":
                allow = self._allowed(opt)
            elif kind in ("interface", "local_interface"):
                nic = self._interface(opt, name, local=kind == "local_interface")
                if nic is not None:
                    nics.append(nic)
            elif kind == "interfaces":
                count = int(str(opt.children[0]))
                self.note(opt, f"vm '{name}': interfaces {count}: interfaces without a "
                               "switch have no equivalent (attach each to a switch); dropped")
            else:
                getattr(self, f"_vm_{kind}")(opt, vm, name)
        if nics:
            vm["interfaces"] = nics
        if parent is not None:
            base = _name(parent)
            if base not in self.templates:
                self.error(node, f"vm '{name}': instance of \"{parent}\", which is not "
                                 "declared above with allow instance")
                return
            vm = {"name": name, "template": base,
                  **{k: v for k, v in vm.items() if k != "name"}}
        if allow is not None:  # a template for instances, and itself a VM
            template = {"kind": "Template", "name": name,
                        **{k: v for k, v in vm.items() if k not in ("name", "state")},
                        "allow": allow}
            self.templates[name] = template
            vm = {"name": name, "template": name,
                  **({"state": vm["state"]} if "state" in vm else {})}
        if "boot" not in vm and "template" not in vm:
            self.error(node, f"vm '{name}': no boot kernel (boot \"/path/bsd\"), cdrom "
                             "or disk to boot from")
            return
        self.vms.append(vm)

    def _allowed(self, node: Any) -> list[str]:
        fields = {"boot": "boot", "cdrom": "cdrom", "disk": "disks", "interface":
                  "interfaces", "memory": "memory", "owner": "owner", "owner group": "owner",
                  "device": "boot"}
        found: list[str] = []
        for item in node.children:
            word = " ".join(str(t) for t in item.children)
            if word in fields and fields[word] not in found:
                found.append(fields[word])
            elif word == "instance":
                self.note(item, "allow instance { instance }: instances of instances are "
                                "not supported; dropped")
        return found

    def _interface(self, node: Any, name: str, *, local: bool) -> dict[str, Any] | None:
        nic: dict[str, Any] = {}
        block = next((c for c in node.children if getattr(c, "data", None) == "iface_block"),
                     None)
        for opt in block.children if block is not None else []:
            if opt.data == "if_switch":
                nic["switch"] = _name(self.value(opt.children[0]))
            elif opt.data == "if_lladdr":
                mac = next((str(c) for c in opt.children if c is not None), None)
                if mac:
                    nic["mac"] = mac.lower()
            else:
                self.note(opt, f"vm '{name}': this interface option has no equivalent; "
                               "dropped")
        if local:
            self.uses_local = True
            nic["switch"] = "local"
        if "switch" not in nic:
            self.note(node, f"vm '{name}': an interface without a switch has no "
                            "equivalent (attach it to a switch); dropped")
            return None
        if nic["switch"] not in self.switches and nic["switch"] != "local":
            self.error(node, f"vm '{name}': switch \"{nic['switch']}\" is not declared above")
            return None
        return nic

    def _vm_disable(self, node: Any, vm: dict[str, Any], name: str) -> None:
        vm["state"] = "stopped"

    def _vm_enable(self, node: Any, vm: dict[str, Any], name: str) -> None:
        vm.pop("state", None)

    def _vm_memory(self, node: Any, vm: dict[str, Any], name: str) -> None:
        text = self.value(node.children[0])
        match = re.fullmatch(r"(\d+)([KMGT]?)B?", text, re.IGNORECASE)
        if match is None:
            self.error(node, f"vm '{name}': memory: not a size: '{text}'")
            return
        mib = int(int(match[1]) * _UNITS[match[2].upper()])
        if mib < MIN_MEMORY:
            self.error(node, f"vm '{name}': memory too small: {text} (at least "
                             f"{MIN_MEMORY}M)")
            return
        vm["memory"] = f"{mib}M"

    def _vm_disk(self, node: Any, vm: dict[str, Any], name: str) -> None:
        path = self.value(node.children[0])
        fmt = str(node.children[1]) if node.children[1] is not None else _probe(path)
        if fmt not in ("raw", "qcow2"):
            self.error(node, f"vm '{name}': disk format must be raw or qcow2 (got {fmt})")
            return
        if node.children[1] is None:
            self.note(node, f"vm '{name}': disk {path}: format {fmt} (vmd detects it; "
                            "here it is explicit)")
        vm.setdefault("disks", []).append({"path": path, "format": fmt})

    def _vm_cdrom(self, node: Any, vm: dict[str, Any], name: str) -> None:
        vm["cdrom"] = self.value(node.children[0])

    def _vm_boot(self, node: Any, vm: dict[str, Any], name: str) -> None:
        vm.setdefault("boot", {})["kernel"] = self.value(node.children[0])

    def _vm_boot_device(self, node: Any, vm: dict[str, Any], name: str) -> None:
        device = str(node.children[0])
        if device in ("disk", "cdrom"):
            vm.setdefault("boot", {})["device"] = device
        else:
            self.note(node, f"vm '{name}': boot device {device}: no equivalent; dropped")

    def _vm_owner(self, node: Any, vm: dict[str, Any], name: str) -> None:
        vm["owner"] = self.value(node.children[0])

    def _vm_unsupported(self, node: Any, vm: dict[str, Any], name: str) -> None:
        self.note(node, f"vm '{name}': AMD SEV has no equivalent; dropped")


def _name(raw: str) -> str:
    """A vmd name as ours: lower case, [a-z0-9-], at most 63 characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    return name[:NAME_MAX] or "vm"


def _first_24(prefix: str) -> str:
    """The first /24 of an IPv4 prefix (vmd's local prefix: 100.64.0.0/10)."""
    from ipaddress import IPv4Network

    try:
        network = IPv4Network(prefix, strict=False)
    except ValueError:
        return prefix
    return str(next(network.subnets(new_prefix=24)) if network.prefixlen < 24 else network)


def _probe(path: str) -> str:
    """vmd detects a disk's format; an import makes it explicit (qcow2 by its magic)."""
    try:
        with open(path, "rb") as image:
            return "qcow2" if image.read(4) == QCOW2_MAGIC else "raw"
    except OSError:
        return "raw"
