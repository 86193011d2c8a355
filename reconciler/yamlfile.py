"""Manifests' YAML: parsing it, bounded.

Part of the first stage of desired -> observed -> plan -> apply, below the models
(finding and reading the files is `reconciler.listing`'s): `compose_documents()`,
`check_document()` and `construct()` turn a file's bytes into plain values (dicts,
lists, scalars) that `reconciler.desired` validates. What cannot be parsed becomes a
`ManifestError` at its line, never a traceback.

Manifests are untrusted input and the work on them is bounded: YAML is parsed by
libyaml with the YAML 1.2 core schema (an unquoted MAC or `yes` stays a string), and
a document's node graph is measured (depth, size with aliases expanded, cycles)
before any Python object is built from it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import yaml

from reconciler.listing import shown

MAX_DEPTH = 64  # nesting of a document, aliases expanded
MAX_NODES = 100_000  # nodes of a document, aliases expanded; and of a file, as composed


# --- YAML: the 1.2 core schema on libyaml, bounded ----------------------------------
#
# libyaml parses and composes (in C; it refuses nesting over 1000 levels); Python
# resolves each plain scalar's tag with the YAML 1.2 core schema, where only
# true/false are booleans and only decimal, 0o and 0x are integers (YAML 1.1 read
# `52:54:00:12:34:56` as a base-60 integer and `no` as false). A composed document is
# then measured without recursion before anything is built from it.

_YAML_TAG = "tag:yaml.org,2002:"
NULL_TAG, BOOL_TAG, INT_TAG, FLOAT_TAG, STR_TAG, SEQ_TAG, MAP_TAG, MERGE_TAG = (
    _YAML_TAG + name for name in ("null", "bool", "int", "float", "str", "seq", "map", "merge"))
_SCALAR_TAGS = frozenset((NULL_TAG, BOOL_TAG, INT_TAG, FLOAT_TAG, STR_TAG, MERGE_TAG))
_NULLS = frozenset(("", "~", "null", "Null", "NULL"))
_BOOLS = {"true": True, "True": True, "TRUE": True, "false": False, "False": False,
          "FALSE": False}
_INT_RE = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_FLOAT_RE = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(inf|Inf|INF)|\.nan|\.NaN|\.NAN")
_NUMBER_START = frozenset("-+.0123456789")
_MAX_INT = 1 << 63
_BAD_CHARS = re.compile(r"[\x00\ud800-\udfff]")


def _plain_tag(value: str) -> str:
    """The core schema's tag for a plain (unquoted, untagged) scalar."""
    if value in _NULLS:
        return NULL_TAG
    if value in _BOOLS:
        return BOOL_TAG
    if value == "<<":
        return MERGE_TAG
    if value[0] in _NUMBER_START:
        if _INT_RE.fullmatch(value):
            return INT_TAG
        if _FLOAT_RE.fullmatch(value):
            return FLOAT_TAG
    return STR_TAG


class TooManyNodes(yaml.YAMLError):
    """More than MAX_NODES nodes composed from one file (aliases not expanded)."""


class _CoreResolver(yaml.resolver.BaseResolver):
    """Tags each node by the core schema; called once per node composed (not per alias),
    it also stops a file that composes more than MAX_NODES nodes, while composing."""

    budget = MAX_NODES

    def resolve(self, kind: type[yaml.Node], value: Any, implicit: Any) -> str:
        self.budget -= 1
        if self.budget < 0:
            raise TooManyNodes(f"over {MAX_NODES} values in this file; split it into smaller "
                               "files")
        if kind is yaml.ScalarNode:
            return _plain_tag(value) if implicit[0] else STR_TAG
        return SEQ_TAG if kind is yaml.SequenceNode else MAP_TAG


try:
    from yaml._yaml import CParser as _Parser
except ImportError:  # pragma: no cover - a PyYAML built without libyaml: slower, same rules
    class _Parser(yaml.reader.Reader, yaml.scanner.Scanner,  # type: ignore[no-redef]
                  yaml.parser.Parser, yaml.composer.Composer):
        def __init__(self, stream: bytes) -> None:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            yaml.composer.Composer.__init__(self)


class _Composer(_Parser, _CoreResolver):
    def __init__(self, stream: bytes) -> None:
        _Parser.__init__(self, stream)
        _CoreResolver.__init__(self)


def compose_documents(data: bytes) -> Iterator[yaml.Node]:
    """The node graph of each document in turn (libyaml, core schema): one document's
    nodes are freed before the next is composed. YAMLError on bad syntax, TooManyNodes
    past MAX_NODES nodes in the file."""
    composer = _Composer(data)
    try:
        while composer.check_node():
            node = composer.get_node()
            if node is not None:
                yield node
    finally:
        composer.dispose()


class NodeError(Exception):
    """A node that cannot become a value; carries its line."""

    def __init__(self, node: yaml.Node, message: str) -> None:
        super().__init__(message)
        self.line = node.start_mark.line + 1
        self.message = message


def check_document(root: yaml.Node) -> list[NodeError]:
    """What is wrong with a composed document, before anything is built from it.

    Refuses what would cost unbounded work (nesting over MAX_DEPTH, over MAX_NODES
    nodes once aliases are expanded, an alias inside itself) and what cannot be a
    manifest's value (tags outside the core schema, keys that are not strings,
    duplicate keys, `<<` of a non-mapping, NUL or lone surrogates). Iterative, and
    each collection is visited once: an alias bomb is measured without being expanded.
    """
    if isinstance(root, yaml.ScalarNode):
        return _scalar_problems(root)
    problems: list[NodeError] = []
    size: dict[int, int] = {}  # id(collection) -> nodes once expanded (capped)
    depth: dict[int, int] = {}  # id(collection) -> nesting depth once expanded
    on_path: set[int] = set()  # the collections whose subtree is being walked
    stack: list[tuple[yaml.Node, list[yaml.Node] | None]] = [(root, None)]
    while stack:
        node, kids = stack.pop()
        key = id(node)
        if kids is not None:  # all its children are measured: measure it
            on_path.discard(key)
            total, deepest = 1, 0  # a scalar is 1 node, and no nesting
            for kid in kids:
                if isinstance(kid, yaml.ScalarNode):
                    total += 1
                else:
                    total, deepest = total + size[id(kid)], max(deepest, depth[id(kid)])
            size[key], depth[key] = min(total, MAX_NODES + 1), deepest + 1
            if depth[key] > MAX_DEPTH:
                return [NodeError(node, f"nested over {MAX_DEPTH} levels deep (aliases "
                                         "expanded); a manifest needs a handful")]
            if total > MAX_NODES:
                return [NodeError(node, f"over {MAX_NODES} values once aliases are "
                                         "expanded; a manifest needs a few dozen")]
            continue
        if key in size:
            continue
        if key in on_path:
            return [NodeError(node, "recursive alias: this node contains itself")]
        if len(on_path) >= MAX_DEPTH:
            return [NodeError(node, f"nested over {MAX_DEPTH} levels deep; a manifest "
                                     "needs a handful")]
        if isinstance(node, yaml.MappingNode):
            kids = [part for pair in node.value for part in pair]
            problems += _mapping_problems(node)
        else:
            kids = list(node.value)
            if node.tag != SEQ_TAG:
                problems.append(NodeError(node, _unsupported_tag(node.tag)))
        on_path.add(key)
        stack.append((node, kids))
        for kid in kids:
            if isinstance(kid, yaml.ScalarNode):
                if kid.tag != STR_TAG or _BAD_CHARS.search(kid.value):
                    problems += _scalar_problems(kid)
            elif id(kid) not in size:
                stack.append((kid, None))
    return problems


def _scalar_problems(node: yaml.ScalarNode) -> list[NodeError]:
    if node.tag not in _SCALAR_TAGS:
        return [NodeError(node, _unsupported_tag(node.tag))]
    bad = _BAD_CHARS.search(node.value)
    if bad is None:
        return []
    what = "a NUL character" if bad[0] == "\0" else \
        f"a lone surrogate \\u{ord(bad[0]):04x} (not valid Unicode)"
    return [NodeError(node, f"{shown(node.value)} contains {what}")]


def _mapping_problems(node: yaml.MappingNode) -> list[NodeError]:
    """What is wrong with a mapping's keys (its values are checked on their own)."""
    if node.tag != MAP_TAG:
        return [NodeError(node, _unsupported_tag(node.tag))]
    problems = []
    first: dict[str, int] = {}
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag == MERGE_TAG:
            if not _mergeable(value):
                problems.append(NodeError(key, "<< merges a mapping or a list of mappings "
                                                "(<<: *defaults), not anything else"))
        elif not isinstance(key, yaml.ScalarNode):
            kind = "list" if isinstance(key, yaml.SequenceNode) else "mapping"
            problems.append(NodeError(key, f"a key must be a string, not a {kind}"))
            continue
        elif key.tag != STR_TAG:
            problems.append(NodeError(key, f"key {shown(key.value)} must be a string, but "
                                            "YAML does not read it as one: put it in quotes"))
            continue
        if key.value in first:
            problems.append(NodeError(key, f"duplicate key {shown(key.value)} (first at "
                                            f"line {first[key.value]})"))
        else:
            first[key.value] = key.start_mark.line + 1
    return problems


def _mergeable(node: yaml.Node) -> bool:
    if isinstance(node, yaml.SequenceNode):
        return all(isinstance(item, yaml.MappingNode) for item in node.value)
    return isinstance(node, yaml.MappingNode)


def _unsupported_tag(tag: str) -> str:
    name = "!!" + tag.removeprefix(_YAML_TAG) if tag.startswith(_YAML_TAG) else tag
    return (f"unsupported tag {shown(name)}: a manifest holds strings, numbers, true/false, "
            "null, lists and mappings")


def construct(node: yaml.Node, memo: dict[int, Any] | None = None) -> Any:
    """The value of a document that passed check_document(): dicts, lists, scalars.

    A node shared through aliases becomes one shared object. Recursive, which is safe
    as check_document() bounded the depth.
    """
    memo = {} if memo is None else memo
    known = memo.get(id(node), memo)
    if known is not memo:
        return known
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = _scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = [construct(item, memo) for item in node.value]
    else:
        merged: dict[str, Any] = {}
        own: dict[str, Any] = {}
        for key, item in node.value:
            if key.tag != MERGE_TAG:
                own[key.value] = construct(item, memo)
                continue
            sources = item.value if isinstance(item, yaml.SequenceNode) else [item]
            for source in sources:  # the first one merged wins, then keys of its own
                for name, inner in construct(source, memo).items():
                    merged.setdefault(name, inner)
        value = merged | own
    memo[id(node)] = value
    return value


def _null(text: str) -> None:
    if text not in _NULLS:
        raise ValueError
    return None


def _int(text: str) -> int:
    if not _INT_RE.fullmatch(text):
        raise ValueError
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    number = int(text if base == 10 else text[2:], base) if len(text) <= 40 else _MAX_INT
    if abs(number) >= _MAX_INT:
        raise ValueError("out of range, over 64 bits")
    return number


def _float(text: str) -> float:
    if not _FLOAT_RE.fullmatch(text):
        raise ValueError
    lowered = text.lower()
    if lowered.endswith(".nan"):
        return math.nan
    if lowered.endswith(".inf"):
        return -math.inf if text[0] == "-" else math.inf
    return float(text)  # 1e999 is inf


_CONSTRUCTORS: dict[str, Callable[[str], Any]] = {
    STR_TAG: str, MERGE_TAG: str,  # `<<` as a value is just a string
    NULL_TAG: _null, BOOL_TAG: _BOOLS.__getitem__, INT_TAG: _int, FLOAT_TAG: _float,
}


def _scalar(node: yaml.ScalarNode) -> Any:
    """A scalar under the core schema; NodeError when an explicit tag does not fit."""
    try:
        return _CONSTRUCTORS[node.tag](node.value)
    except (ValueError, KeyError, OverflowError, TypeError, AttributeError) as err:
        what = node.tag.removeprefix(_YAML_TAG)
        why = f": {err}" if isinstance(err, ValueError) and str(err) else ""
        raise NodeError(node, f"{shown(node.value)} is not a valid !!{what} (YAML 1.2 core "
                               f"schema){why}") from None
