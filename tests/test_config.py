"""Config loading: strict validation with file+key errors, grids, overrides, expansion, run ids."""

import itertools
from pathlib import Path

import numpy as np
import pytest

from bnexp import config as C
from bnexp.errors import ConfigError

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=()):
    with pytest.raises(ConfigError) as info:
        C.load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("train: {epochs: ten}", "train.epochs", "expected a positive integer, got 'ten'"),
        ("train: {epochs: true}", "train.epochs", "got true"),  # bool is not an int
        ("train: {epochs: 0}", "train.epochs", "positive integer"),
        ("train: {epochs: 2.0}", "train.epochs", "positive integer"),
        ("train: {batch_size: 2000}", "train.batch_size", "larger than the 1000"),
        ("train: {update_rule: rmsprop}", "train.update_rule", "sgd, sgd_momentum, adam"),
        ("train: {bn_momentum: 1.0}", "train.bn_momentum", "[0, 1)"),
        ("train: {bn_eval: test}", "train.bn_eval", "running, population, batch"),
        ("train: {learning_rate: -1e-3}", "train.learning_rate", "> 0"),
        ("model: {weight_scale: 0}", "model.weight_scale", "> 0"),
        ("model: {weight_scale: [1e-3, -1]}", "model.weight_scale[1]", "> 0"),
        ("model: {weight_scale: []}", "model.weight_scale", "empty grid"),
        ("model: {weight_scale: {logspace: [-4, 0, 0]}}", "model.weight_scale", "empty grid"),
        ("model: {weight_scale: {logspace: [-4, 0]}}", "model.weight_scale", "[start, stop, num]"),
        ("model: {weight_scale: {geomspace: [1, 2, 3]}}", "model.weight_scale", "logspace"),
        ("model: {weight_scale: [.1, .1]}", "model.weight_scale", "duplicate"),
        ("model: {batchnorm: [yes_please]}", "model.batchnorm", "true or false"),
        ("model: {batchnorm: {linspace: [0, 1, 2]}}", "model.batchnorm", "a list"),
        ("model: {hidden_dims: []}", "model.hidden_dims", "non-empty list"),
        ("model: {hidden_dims: [50, -1]}", "model.hidden_dims[1]", "positive integer"),
        ("model: {dtype: float16}", "model.dtype", "float32, float64"),
        ("model: {reg: -0.1}", "model.reg", ">= 0"),
        ("model: {hiden_dims: [50]}", "model.hiden_dims", "unknown key"),
        ("train: {epochs: 3, extra: {a: 1}}", "train.extra", "unknown key"),
        ("epochs: 3", "epochs", "unknown key"),
        ("train: 3", "train", "expected a mapping"),
        ("seed: -1", "seed", "integer >= 0"),
        ("seed: 1.5", "seed", "integer >= 0"),
        ("seed: 4294967296", "seed", "seed <="),
        ("rng: torch", "rng", "numpy, cs231n"),
        ("name: ../evil", "name", "folder-safe"),
        ("data: {num_train: 50000}", "data.num_train", "num_training"),
        ("data: {num_training: 49500}", "data.num_validation", "exceeds"),
        ("data: {num_test: 10001}", "data.num_test", "at most 10,000"),
        ("data: {subtract_mean: 1}", "data.subtract_mean", "true or false"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, text, key, fragment):
    path = write(tmp_path, text)
    message = error_of(path)
    assert message.startswith(f"{path}: {key}: "), message
    assert fragment in message


def test_malformed_yaml_names_line_and_column(tmp_path):
    path = write(tmp_path, "name: x\ntrain:\n  epochs: [1, 2\n  batch_size: 3\n")
    message = error_of(path)
    assert message.startswith(f"{path}: line 4, column ")
    assert "malformed YAML" in message


def test_duplicate_key_is_an_error(tmp_path):
    message = error_of(write(tmp_path, "seed: 1\nseed: 2\n"))
    assert "line 2" in message and "duplicate key 'seed'" in message


def test_missing_file(tmp_path):
    assert "config file not found" in error_of(tmp_path / "nope.yaml")


def test_top_level_must_be_a_mapping(tmp_path):
    assert "expected a mapping" in error_of(write(tmp_path, "- 1\n- 2\n"))


def test_empty_file_is_the_defaults(tmp_path):
    assert C.load_config(write(tmp_path, "")) == C.ExperimentConfig()


def test_defaults_are_the_reference_sweep():
    cfg = C.load_config(None)
    assert cfg == C.ExperimentConfig()
    assert cfg.model.hidden_dims == (50,) * 7
    assert cfg.model.weight_scale == tuple(np.logspace(-4, 0, 20))
    assert cfg.model.batchnorm == (True, False)
    assert cfg.train.learning_rate == (1e-3,)
    assert cfg.seed == (231,)
    assert len(C.expand_runs(cfg)) == 40


def test_grids(tmp_path):
    cfg = C.load_config(
        write(
            tmp_path,
            "model: {weight_scale: {logspace: [-3, 1, 7]}, batchnorm: false}\n"
            "train: {learning_rate: {linspace: [1e-4, 1e-3, 4]}}\nseed: [3, 1]\n",
        )
    )
    assert cfg.model.weight_scale == tuple(np.logspace(-3, 1, 7))
    assert all(type(v) is float for v in cfg.model.weight_scale)
    assert cfg.train.learning_rate == tuple(np.linspace(1e-4, 1e-3, 4))
    assert cfg.model.batchnorm == (False,)
    assert cfg.seed == (3, 1)


def test_int_accepted_for_float_and_yaml12_exponents(tmp_path):
    cfg = C.load_config(write(tmp_path, "model: {weight_scale: 1, reg: 1e-4}\n"))
    assert cfg.model.weight_scale == (1.0,)
    assert cfg.model.reg == 1e-4  # PyYAML alone would read `1e-4` as a string


def test_overrides():
    cfg = C.load_config(
        None,
        [
            "train.epochs=3",
            "seed=7",
            "model.weight_scale=[1e-3,1e-2]",
            "rng=cs231n",
            "data={num_train: 500}",
        ],
    )
    assert cfg.train.epochs == 3
    assert cfg.seed == (7,)
    assert cfg.model.weight_scale == (1e-3, 1e-2)
    assert cfg.rng == "cs231n"
    assert cfg.data.num_train == 500 and cfg.data.num_training == 49_000
    cfg = C.load_config(None, ["model.weight_scale={logspace: [-4,0,5]}"])
    assert cfg.model.weight_scale == tuple(np.logspace(-4, 0, 5))


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.epoch=3", "unknown key 'train.epoch'"),
        ("train.epochs", "expected KEY=VALUE"),
        ("model.weight_scale=[1e-3,", "malformed YAML"),
        ("train.epochs=ten", "train.epochs: expected a positive integer, got 'ten'"),
        ("model.batchnorm=[]", "model.batchnorm: empty grid"),
        ("data.num_train=10", "train.batch_size: 50 is larger than the 10"),  # cross-check
    ],
)
def test_bad_overrides_name_the_override(tmp_path, override, fragment):
    message = error_of(write(tmp_path, "name: x\n"), [override])
    assert message.startswith(f"override {override!r}: "), message
    assert fragment in message


def test_round_trip(tmp_path):
    for cfg in (
        C.load_config(None),
        C.load_config(
            None,
            ["seed=[1,2]", "train.learning_rate=[1e-3, 3e-3]", "model.dtype=float64", "rng=cs231n"],
        ),
    ):
        text = C.config_to_yaml(cfg)
        assert "logspace" not in text  # grids are explicit lists
        assert C.load_config(write(tmp_path, text)) == cfg


def test_expansion_order_is_fixed(tmp_path):
    a = write(
        tmp_path,
        "model: {batchnorm: [true, false], weight_scale: [0.1, 0.01]}\n"
        "train: {learning_rate: [1e-3, 1e-2]}\nseed: [5, 6]\n",
        "a.yaml",
    )
    # Same config, keys in another order: same expansion.
    b = write(
        tmp_path,
        "seed: [5, 6]\ntrain: {learning_rate: [1e-3, 1e-2]}\n"
        "model: {weight_scale: [0.1, 0.01], batchnorm: [true, false]}\n",
        "b.yaml",
    )
    runs = C.expand_runs(C.load_config(a))
    assert runs == C.expand_runs(C.load_config(b))
    expected = list(itertools.product([5, 6], [1e-3, 1e-2], [0.1, 0.01], [True, False]))
    assert [(r.seed, r.learning_rate, r.weight_scale, r.batchnorm) for r in runs] == expected
    assert [r.index for r in runs] == list(range(16))
    assert runs[0].hidden_dims == (50,) * 7 and runs[0].epochs == 10


def test_run_config_dict_is_plain():
    run = C.expand_runs(C.load_config(None))[3]
    d = C.run_config_dict(run)
    assert d["model"]["weight_scale"] == run.weight_scale
    assert type(d["model"]["weight_scale"]) is float
    assert d["model"]["batchnorm"] is False
    assert d["index"] == 3 and d["train"]["learning_rate"] == 1e-3


def test_run_ids_unique_and_stable_when_grid_grows():
    cfg = C.load_config(None, ["model.weight_scale=[1e-3, 1e-2]"])
    ids = [C.run_id(r, cfg) for r in C.expand_runs(cfg)]
    assert len(set(ids)) == 4
    assert all(len(i) == 12 and int(i, 16) >= 0 for i in ids)
    # Adding a scale in front renumbers the runs but keeps the ids of the finished ones.
    grown = C.load_config(None, ["model.weight_scale=[1e-4, 1e-3, 1e-2]"])
    grown_ids = [C.run_id(r, grown) for r in C.expand_runs(grown)]
    assert grown_ids[2:] == ids
    # Any setting change gives new ids.
    other = C.load_config(None, ["model.weight_scale=[1e-3, 1e-2]", "train.epochs=9"])
    assert not set(ids) & {C.run_id(r, other) for r in C.expand_runs(other)}


def test_cs231n_run_ids_depend_on_the_replay_order():
    cfg = C.load_config(None, ["rng=cs231n", "model.weight_scale=[1e-3, 1e-2]"])
    ids = [C.run_id(r, cfg) for r in C.expand_runs(cfg)]
    assert len(set(ids)) == 4
    grown = C.load_config(None, ["rng=cs231n", "model.weight_scale=[1e-3, 1e-2, 1e-1]"])
    grown_ids = [C.run_id(r, grown) for r in C.expand_runs(grown)]
    # Same first runs, but their draws now come from a different replay: different ids.
    assert not set(ids) & set(grown_ids)


def test_repo_configs_match_the_builtin_defaults():
    for command, name in (("train", "bn_vs_baseline"), ("sweep-init", "weight_init_sweep")):
        path = C.default_config_path(command)
        assert path == REPO_CONFIGS / f"{name}.yaml"
        cfg = C.load_config(path)
        assert cfg == C.builtin_config(command) == C.load_default_config(command)
        assert cfg.name == name and cfg.rng == "numpy" and cfg.seed == (231,)
    train = C.load_default_config("train", ["train.epochs=2"])
    assert train.model.hidden_dims == (100,) * 5 and train.model.weight_scale == (2e-2,)
    assert train.train.epochs == 2
    with pytest.raises(ValueError, match="no default config"):
        C.default_config_path("plot")


def test_cs231n_reproduction_config():
    cfg = C.load_config(REPO_CONFIGS / "cs231n_reproduction.yaml")
    train = C.builtin_config("train")
    assert cfg.rng == "cs231n" and cfg.seed == (231,) and cfg.model.dtype == "float32"
    assert (cfg.data, cfg.model, cfg.train) == (train.data, train.model, train.train)


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        # Both would otherwise only fail once training starts, after OUT has been written.
        ("rng: cs231n\ntrain: {sampling: shuffle}", "train.sampling", "rng=cs231n"),
        (
            "data: {num_train: 10}\ntrain: {batch_size: 1, bn_eval: population}",
            "train.bn_eval",
            "batch_size >= 2",
        ),
    ],
)
def test_settings_that_training_would_reject_fail_at_load(tmp_path, text, key, fragment):
    message = error_of(write(tmp_path, text))
    assert message.startswith(f"{tmp_path / 'x.yaml'}: {key}: "), message
    assert fragment in message


def test_population_stats_with_batch_one_are_fine_without_batchnorm(tmp_path):
    text = "data: {num_train: 10}\nmodel: {batchnorm: false}\n"
    cfg = C.load_config(write(tmp_path, text + "train: {batch_size: 1, bn_eval: population}"))
    assert cfg.train.batch_size == 1


def test_overflowing_logspace_is_one_error_and_no_warning(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        message = error_of(None, ["model.weight_scale={logspace: [-4, 400, 3]}"])
    assert "model.weight_scale[2]: expected a finite number, got inf" in message
