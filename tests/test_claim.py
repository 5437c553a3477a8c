"""The `claim` key: what an experiment sets out to show. It is saved with the config, but it
describes the results without changing them: not part of a run's id, and a folder whose config
differs only in its claim is the same experiment (nothing retrained, nothing refused)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fakecifar import make_learnable_images, write_binary
from small import TINY_OVERRIDES

from bnexp import config as C
from bnexp.cli import main
from bnexp.errors import ConfigError
from bnexp.yamlfile import parse_yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = TINY_OVERRIDES


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def fake_data(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BNEXP_DATA_DIR", raising=False)
    x, y, xt, yt = make_learnable_images(np.random.default_rng(1), 5 * 100, 60)
    return write_binary(tmp_path / "cifar", x, y, xt, yt, n_batch=100)


def saved(out: Path) -> dict:
    return parse_yaml((out / "config.yaml").read_text(encoding="utf-8"), "config.yaml")


def test_every_shipped_config_states_its_claim_and_saves_it():
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = C.load_config(path)
        assert cfg.claim.strip() and len(cfg.claim) < 120, path.name
        assert parse_yaml(C.config_to_yaml(cfg), path.name)["claim"] == cfg.claim


def test_the_claim_is_not_part_of_any_run_id():
    cfg = C.load_config(CONFIGS / "learning_rate.yaml")
    other = dataclasses.replace(cfg, claim="something else entirely")
    runs = C.expand_runs(cfg)
    assert C.run_ids(cfg, runs) == C.run_ids(other, C.expand_runs(other))
    # cs231n replay ids hash the whole run list: the claim stays out of that too.
    rep = C.load_config(CONFIGS / "cs231n_reproduction.yaml")
    assert C.run_ids(rep, C.expand_runs(rep)) == C.run_ids(
        dataclasses.replace(rep, claim=""), C.expand_runs(rep)
    )


def test_no_claim_is_not_saved_so_old_configs_stay_as_they_were():
    cfg = C.load_config(None, ["claim="], command="train")
    assert cfg.claim == "" and "claim" not in parse_yaml(C.config_to_yaml(cfg), "saved")
    assert C.load_config(None, ["claim=null"], command="train").claim == ""


def test_a_file_states_its_own_claim_and_an_override_wins(tmp_path):
    assert C.load_config(None, command="train").claim.startswith("Batch norm speeds up")
    plain = tmp_path / "mine.yaml"
    plain.write_text("train: {epochs: 1}\n")
    # Not the default experiment's claim: that one is about another experiment.
    assert C.load_config(plain, command="train").claim == ""
    stated = tmp_path / "stated.yaml"
    stated.write_text("claim: 'Dropout <helps> & \"more\"'\n")
    assert C.load_config(stated, command="train").claim == 'Dropout <helps> & "more"'
    assert C.load_config(stated, ["claim=Other"], command="train").claim == "Other"


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("claim=3", ["claim", "expected text"]),
        ("claim=true", ["claim", "expected text"]),
        ("claim=[a, b]", ["claim", "cannot be swept"]),
        ("claim=" + "x" * 1001, ["claim", "1,001 characters"]),
    ],
)
def test_a_claim_that_is_not_text_is_one_config_error(override, words):
    with pytest.raises(ConfigError) as err:
        C.load_config(None, [override], command="train")
    assert all(w in str(err.value) for w in words), str(err.value)


def test_same_experiment_ignores_only_the_claim():
    cfg = C.load_config(CONFIGS / "batch_size.yaml")
    text = C.config_to_yaml(cfg)
    new_claim = C.config_to_yaml(dataclasses.replace(cfg, claim="another sentence"))
    no_claim = C.config_to_yaml(dataclasses.replace(cfg, claim=""))
    other_seed = C.config_to_yaml(dataclasses.replace(cfg, claim="x", seed=5, axes=()))
    assert new_claim != text and C.same_experiment(text, new_claim)
    assert C.same_experiment(no_claim, text) and C.same_experiment(text, no_claim)
    assert not C.same_experiment(text, other_seed)
    assert not C.same_experiment("name: [unclosed\n", text)


def test_changing_only_the_claim_retrains_nothing_and_updates_the_folder(tmp_path, fake_data):
    out = tmp_path / "out"
    first = invoke("train", "-o", out, "--data-dir", fake_data, *SMALL)
    assert first.exit_code == 0, first.output
    assert saved(out)["claim"].startswith("Batch norm speeds up")
    runs = {p: p.read_bytes() for p in sorted(out.glob("runs/*/*"))}
    again = invoke("train", "-o", out, "--data-dir", tmp_path / "no-data", *SMALL, "claim=New")
    assert again.exit_code == 0, again.output
    assert "0 runs trained, 2 already finished" in again.output
    assert "updated the claim" in again.output
    assert saved(out)["claim"] == "New"
    assert {p: p.read_bytes() for p in sorted(out.glob("runs/*/*"))} == runs
    # An old folder saved without any claim is the same experiment too.
    text = (out / "config.yaml").read_text(encoding="utf-8")
    (out / "config.yaml").write_text(text.replace("claim: New\n", ""), encoding="utf-8")
    assert "claim" not in saved(out)
    old = invoke("train", "-o", out, "--data-dir", tmp_path / "no-data", *SMALL)
    assert old.exit_code == 0 and "0 runs trained" in old.output, old.output
    # A claim with another setting is another experiment: refused as before.
    other = invoke("train", "-o", out, "--data-dir", fake_data, *SMALL, "claim=X", "seed=9")
    assert other.exit_code == 4 and "different config" in other.output
