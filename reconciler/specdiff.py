"""`--diff` (Ansible's): a unified diff of a VM's spec, as recorded versus as declared.

Pure. Specs are rendered as YAML-like lines, keys sorted (records store them so), with
their units (`memory: 1024M`, not
`1024`; `stop_timeout: 30s`), so a diff reads like the manifest that changed. Secrets
never reach a spec (`user_data` is excluded from every dump); any key that could hold
one is masked all the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

MEBIBYTES = frozenset({"memory", "memory_max", "size"})
SECONDS = frozenset({"stop_timeout", "timeout"})
SECRETS = frozenset({"user_data", "password", "passwd", "hashed_passwd"})
MASK = "********"
_QUOTE = frozenset(":#{}[],&*!|>'\"%@`\n")


def show(key: str, value: Any) -> str:
    """One value as a manifest would say it: with its unit, quoted if YAML needs it."""
    if key in SECRETS and value is not None:
        return MASK
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if key in MEBIBYTES and isinstance(value, int):
        return f"{value}M"  # MiB, as in the manifest; never rounded to G (1024M -> 1025M)
    if key in SECONDS and isinstance(value, (int, float)):
        return f"{value:g}s"
    if isinstance(value, str):
        plain = value and value.strip() == value and not any(c in value for c in _QUOTE)
        return value if plain else json.dumps(value)
    return str(value)


def render(spec: Mapping[str, Any], indent: str = "") -> list[str]:
    """spec as YAML-like lines, with units."""
    lines: list[str] = []
    for key, value in sorted(spec.items()):
        if isinstance(value, Mapping):
            if value:
                lines.append(f"{indent}{key}:")
                lines += render(value, indent + "  ")
            else:
                lines.append(f"{indent}{key}: {{}}")
        elif isinstance(value, list):
            if not value:
                lines.append(f"{indent}{key}: []")
                continue
            lines.append(f"{indent}{key}:")
            for item in value:
                if isinstance(item, Mapping) and item:
                    first, *rest = render(item, indent + "    ")
                    lines.append(f"{indent}  - {first.lstrip()}")
                    lines += rest
                else:
                    lines.append(f"{indent}  - {show(key, item)}")
        else:
            lines.append(f"{indent}{key}: {show(key, value)}")
    return lines


def spec_diff(name: str, old: Mapping[str, Any] | None, new: Mapping[str, Any] | None
              ) -> str:
    """The unified diff of VM name's spec; "" when nothing differs. None: no such side
    (a VM to create, or one to remove)."""
    import difflib  # only --diff pays for it

    before = render(old) if old is not None else []
    after = render(new) if new is not None else []
    if before == after:
        return ""
    return "\n".join(difflib.unified_diff(
        before, after, lineterm="",
        fromfile=f"{name} (recorded)" if old is not None else "/dev/null",
        tofile=f"{name} (declared)" if new is not None else "/dev/null"))
