"""The strict YAML loader: hostile or absurd files end in one ConfigError line, quickly."""

from __future__ import annotations

import time

import pytest
import yaml

from bnexp import yamlfile
from bnexp.errors import ConfigError
from bnexp.yamlfile import parse_yaml


def laughs(levels: int, width: int = 9) -> str:
    """The 'billion laughs': each level is a list of `width` aliases to the level before."""
    lines = [f"a: &a [{','.join(['lol'] * width)}]"]
    for i in range(1, levels):
        a, b = "abcdefghijklmnopqrstuvwxyz"[i - 1 : i + 1]
        lines.append(f"{b}: &{b} [{','.join([f'*{a}'] * width)}]")
    return "\n".join(lines) + "\n"


def count_values(obj) -> int:
    """Values of a loaded object counted as a reader walking it sees them (shared = repeated)."""
    if isinstance(obj, list):
        return 1 + sum(count_values(v) for v in obj)
    if isinstance(obj, dict):
        return 1 + sum(count_values(k) + count_values(v) for k, v in obj.items())
    return 1


def parse_error(text: str) -> str:
    """The one-line message of the ConfigError that parsing text must raise, within a second."""
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "exp.yaml")
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "\n" not in message and message.startswith("exp.yaml: ") and len(message) < 240
    return message


def test_billion_laughs_is_refused_in_milliseconds_without_quoting_the_expansion():
    text = laughs(9)
    assert len(text) < 400
    message = parse_error(text)
    sizes = [10]  # level 0: a list of 9 strings; level i: a list of 9 copies of level i - 1
    for _ in range(8):
        sizes.append(1 + 9 * sizes[-1])
    assert f"aliases (*name) expand to {1 + 9 + sum(sizes):,} values" in message
    assert message.count("lol") == 0


def alias_fan(aliases: int) -> str:
    """A 99-value list written once and referenced `aliases` times (100 values each)."""
    items = ", ".join(str(i) for i in range(99))
    return f"a: &x [{items}]\nb: [{', '.join(['*x'] * aliases)}]\n"


def test_alias_expansion_limit_is_exact_and_counts_like_a_reader():
    limit = yamlfile.MAX_ALIAS_VALUES
    assert limit == 10_000  # alias_fan's arithmetic below assumes it
    # Written: root, 2 keys, the list of 100, b's list = 104 values; each alias adds 100 more.
    ok = parse_yaml(alias_fan(100), "exp.yaml")
    assert ok == yaml.safe_load(alias_fan(100))
    assert count_values(ok) == 104 + 100 * 100
    message = parse_error(alias_fan(101))
    assert f"expand to {count_values(yaml.safe_load(alias_fan(101))):,} values" in message


def test_small_aliases_and_merge_keys_still_work():
    text = "base: &b {epochs: 2, batch_size: 50}\ntrain:\n  <<: *b\n  epochs: 3\nx: &s 1\ny: *s\n"
    assert parse_yaml(text, "exp.yaml") == yaml.safe_load(text)


def nested(depth: int) -> str:
    return "a: " + "[" * (depth - 1) + "1" + "]" * (depth - 1) + "\n"


def test_nesting_limit_is_exact_and_deep_files_end_quickly():
    depth = yamlfile.MAX_DEPTH  # the root mapping is level 1
    assert parse_yaml(nested(depth - 1), "exp.yaml") == yaml.safe_load(nested(depth - 1))
    assert "nested more than" in parse_error(nested(depth))
    assert "nested more than" in parse_error(nested(depth + 1))
    assert "nested more than" in parse_error("[" * 100_000)  # no RecursionError
    block = "".join("  " * i + f"k{i}:\n" for i in range(100)) + "  " * 100 + "1\n"
    assert "nested more than" in parse_error(block)


@pytest.mark.parametrize(
    ("text", "kind"),
    [("? [a, b]\n: 1\n", "list"), ("{[1, 2]: 3}\n", "list"), ("? {a: 1}\n: 2\n", "mapping")],
)
def test_non_scalar_keys_are_one_line(text, kind):
    message = parse_error(text)
    assert f"a key must be a name, not a {kind}" in message and "line 1" in message


def test_self_referencing_alias_and_huge_text_and_long_values_are_one_short_line():
    assert "refers to a value that contains it" in parse_error("&a [1, *a]\n")
    assert "characters" in parse_error("a: " + "x" * (yamlfile.MAX_TEXT_CHARS + 1))
    key = "k" * 500
    message = parse_error(f"{key}: 1\n{key}: 2\n")
    assert "duplicate key" in message and "..." in message


def test_ordinary_configs_are_unchanged():
    text = "name: t\nmodel:\n  hidden_dims: [50, 50]\n  weight_scale: 1e-3\nseed: [1, 2]\n"
    assert parse_yaml(text, "exp.yaml") == {
        "name": "t",
        "model": {"hidden_dims": [50, 50], "weight_scale": 0.001},
        "seed": [1, 2],
    }
