"""The README says what the code does: its config table lists every key with its default, and its
Python example runs as written."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
from fakecifar import make_learnable_images, write_binary

import bnexp
from bnexp import config
from bnexp.yamlfile import parse_yaml

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def config_table() -> dict[str, str]:
    """key -> default cell of the README's configuration table."""
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", readme_section("Configuration"), re.M)
    return dict(rows)


def field_defaults() -> dict[str, object]:
    """Every config key and its declared default, from the dataclasses."""
    defaults = {}
    cfg = config.ExperimentConfig()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name == "axes":
            continue
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                defaults[f"{f.name}.{g.name}"] = getattr(value, g.name)
        else:
            defaults[f.name] = value
    return defaults


def test_the_config_table_lists_every_key_with_its_declared_default():
    table, fields = config_table(), field_defaults()
    assert table.keys() == fields.keys()
    for key, default in fields.items():
        written = parse_yaml(table[key], f"README {key}")
        expected = list(default) if isinstance(default, tuple) else default
        assert written == expected, f"{key}: README says {table[key]}, the field {default!r}"


def test_the_python_example_runs_as_written(tmp_path, monkeypatch):
    block = re.search(r"```python\n(.*?)```", readme_section("Python API"), re.S).group(1)
    x, y, xt, yt = make_learnable_images(np.random.default_rng(3), 5 * 100, 60)
    cifar = write_binary(tmp_path / "cifar", x, y, xt, yt, n_batch=100)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "configs").mkdir()
    # The example's config file, cut to the generated data's size.
    (tmp_path / "configs" / "bn_vs_baseline.yaml").write_text(
        "name: bn_vs_baseline\n"
        "data: {num_training: 400, num_validation: 100, num_test: 50, num_train: 200}\n"
        "model: {hidden_dims: [16, 16], batchnorm: [true, false]}\n"
    )
    code = block.replace('"path/to/cifar10"', repr(str(cifar)))
    assert code != block  # the example still names its data folder where the test expects it
    printed = []
    exec(compile(code, "README example", "exec"), {"print": printed.append})
    rows = bnexp.read_results(tmp_path / "my_results")
    assert len(rows) == 2 and {r["batchnorm"] for r in rows} == {True, False}
    assert all(r["epochs"] == 2 for r in rows)
    assert printed and "val BN" in printed[0]


def test_ci_runs_the_readmes_test_command():
    setup = readme_section("Set up and run")
    command = re.search(r"# The tests:.*\n(.+)\n", setup).group(1).strip()
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert command in [line.strip() for line in ci]
