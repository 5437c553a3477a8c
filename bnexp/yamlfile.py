"""YAML in and out: a strict, safe loader for configs and a dumper that writes them readably."""

from __future__ import annotations

import re
from typing import Any

import yaml

from bnexp.errors import ConfigError, excerpt

#: Limits that keep a hostile or mistyped file from taking memory or time. A config is a few
#: kilobytes, nested three levels, and has no reason to use aliases to build large structures.
MAX_TEXT_CHARS = 1_000_000
MAX_DEPTH = 32
MAX_ALIAS_VALUES = 10_000


class _LimitError(yaml.MarkedYAMLError):
    """Well-formed YAML that a config must not contain; its problem text says how to fix it."""


def _count_values(node: yaml.Node, memo: dict[int, int], open_nodes: set[int]) -> int:
    """Values node stands for once every alias is expanded (a shared node counts each time it
    is referenced). Linear in the number of distinct nodes; raises ComposerError on a cycle."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in open_nodes:
        raise _LimitError(
            None,
            None,
            "an alias refers to a value that contains it; remove the alias",
            node.start_mark,
        )
    open_nodes.add(key)
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    total = 1 + sum(_count_values(child, memo, open_nodes) for child in children)
    open_nodes.discard(key)
    memo[key] = total
    return total


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.2), rejects duplicate and non-scalar
    keys, nesting deeper than MAX_DEPTH, and aliases that expand to more than
    MAX_ALIAS_VALUES values (the "billion laughs": a few hundred bytes that expand to gigabytes).
    """

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        # Checked while composing: the composer recurses, so a 10,000-deep [[[...]]] would
        # otherwise end in a RecursionError before any check on the finished tree.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _LimitError(
                    None,
                    None,
                    f"nested more than {MAX_DEPTH} levels deep; a config needs three or four",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        memo: dict[int, int] = {}
        expanded = _count_values(node, memo, set())
        if expanded > len(memo) + MAX_ALIAS_VALUES:  # len(memo): the values actually written
            raise _LimitError(
                None,
                None,
                f"aliases (*name) expand to {expanded:,} values (limit: {MAX_ALIAS_VALUES:,} "
                "more than written); write the values out or use a grid like {logspace: [...]}",
                node.start_mark,
            )
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: SafeLoader merges it below; its keys may be overridden
            if not isinstance(key_node, yaml.ScalarNode):
                kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                raise _LimitError(
                    None,
                    None,
                    f"a key must be a name, not a {kind}; write it as a plain word",
                    key_node.start_mark,
                )
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                problem = f"duplicate key {excerpt(key)}; keep one of them"
                raise _LimitError(None, None, problem, mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# PyYAML follows YAML 1.1, where `1e-3` (no dot) is a string; accept it as a float like YAML 1.2.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text; a syntax error or an exceeded limit (size, nesting, alias expansion,
    non-scalar key) becomes a one-line ConfigError with line and column."""
    if len(text) > MAX_TEXT_CHARS:
        raise ConfigError(
            f"{where}: {len(text):,} characters, more than a config can need "
            f"({MAX_TEXT_CHARS:,}); check that this is the right file"
        )
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        if isinstance(exc, _LimitError):
            raise ConfigError(f"{where}: {pos}{exc.problem}") from None
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"{where}: {pos}malformed YAML: {problem}; fix the syntax") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: malformed YAML: {exc}; fix the syntax") from None


class _Dumper(yaml.SafeDumper):
    """Block mappings, flow (one-line) lists: a config reads like the hand-written ones."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, True)
)


def dump_yaml(obj: Any) -> str:
    """YAML text of plain data, keys in insertion order, lists on one line."""
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
