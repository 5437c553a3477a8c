"""Config loading: strict validation with file+key errors, grids, overrides, expansion, run ids."""

import dataclasses
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


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file_is_an_error(tmp_path, text):
    assert "config file is empty" in error_of(write(tmp_path, text))


def test_defaults_are_the_reference_sweep():
    cfg = C.load_config(None)
    assert cfg == C.builtin_config("sweep-init")
    assert cfg.model.hidden_dims == (50,) * 7
    assert cfg.values("model.weight_scale") == tuple(np.logspace(-4, 0, 20))
    assert cfg.values("model.batchnorm") == (True, False)
    assert cfg.values("train.learning_rate") == (1e-3,) and cfg.train.learning_rate == 1e-3
    assert cfg.values("seed") == (231,)
    assert [key for key, _ in cfg.axes] == ["model.weight_scale", "model.batchnorm"]
    assert len(C.expand_runs(cfg)) == 40


def test_grids(tmp_path):
    cfg = C.load_config(
        write(
            tmp_path,
            "model: {weight_scale: {logspace: [-3, 1, 7]}, batchnorm: false}\n"
            "train: {learning_rate: {linspace: [1e-4, 1e-3, 4]}}\nseed: [3, 1]\n",
        )
    )
    assert cfg.values("model.weight_scale") == tuple(np.logspace(-3, 1, 7))
    assert all(type(v) is float for v in cfg.values("model.weight_scale"))
    assert cfg.values("train.learning_rate") == tuple(np.linspace(1e-4, 1e-3, 4))
    assert cfg.values("model.batchnorm") == (False,) and cfg.model.batchnorm is False
    assert cfg.values("seed") == (3, 1)


def test_int_accepted_for_float_and_yaml12_exponents(tmp_path):
    cfg = C.load_config(write(tmp_path, "model: {weight_scale: 1, reg: 1e-4}\n"))
    assert cfg.model.weight_scale == 1.0 and type(cfg.model.weight_scale) is float
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
    assert cfg.seed == 7
    assert cfg.values("model.weight_scale") == (1e-3, 1e-2)
    assert cfg.rng == "cs231n"
    assert cfg.data.num_train == 500 and cfg.data.num_training == 49_000
    cfg = C.load_config(None, ["model.weight_scale={logspace: [-4,0,5]}"])
    assert cfg.values("model.weight_scale") == tuple(np.logspace(-4, 0, 5))


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
        "train: {learning_rate: [1e-3, 1e-2]}\nseed: [5, 6]\nname: same\n",
        "a.yaml",
    )
    # Same config, keys in another order: same expansion.
    b = write(
        tmp_path,
        "seed: [5, 6]\ntrain: {learning_rate: [1e-3, 1e-2]}\nname: same\n"
        "model: {weight_scale: [0.1, 0.01], batchnorm: [true, false]}\n",
        "b.yaml",
    )
    runs = C.expand_runs(C.load_config(a))
    assert runs == C.expand_runs(C.load_config(b))
    expected = list(itertools.product([5, 6], [1e-3, 1e-2], [0.1, 0.01], [True, False]))
    got = [
        (r.seed, r.cfg.train.learning_rate, r.cfg.model.weight_scale, r.cfg.model.batchnorm)
        for r in runs
    ]
    assert got == expected
    assert [r.index for r in runs] == list(range(16))
    assert runs[0].cfg.model.hidden_dims == (50,) * 7 and runs[0].cfg.train.epochs == 10
    assert all(r.cfg.axes == () and r.cfg.seed == r.seed for r in runs)


def test_run_config_dict_is_plain():
    run = C.expand_runs(C.load_config(None))[3]
    d = C.run_config_dict(run)
    assert d["model"]["weight_scale"] == run.cfg.model.weight_scale
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
        assert cfg.name == name and cfg.rng == "numpy" and cfg.values("seed") == (231,)
    train = C.load_default_config("train", ["train.epochs=2"])
    assert train.model.hidden_dims == (100,) * 5 and train.values("model.weight_scale") == (2e-2,)
    assert train.train.epochs == 2
    with pytest.raises(ValueError, match="no default config"):
        C.default_config_path("plot")


def test_cs231n_reproduction_config():
    cfg = C.load_config(REPO_CONFIGS / "cs231n_reproduction.yaml")
    train = C.builtin_config("train")
    assert cfg.rng == "cs231n" and cfg.seed == 231 and cfg.model.dtype == "float32"
    assert (cfg.data, cfg.model, cfg.train, cfg.axes) == (
        train.data,
        train.model,
        train.train,
        train.axes,
    )


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


# --- run ids of the shipped configs -----------------------------------------------------------

#: sha256 of the comma-joined run ids of each shipped config, computed by the code before the
#: config rewrite (one field per key, any key a sweep axis); the committed results keep resuming.
SHIPPED_IDS = {
    "bn_vs_baseline": (2, "da8871eac690768f", "301f9260eab5"),
    "cs231n_reproduction": (2, "69c556e918a26db7", "8434a4d5e185"),
    "cs231n_sweep_reproduction": (40, "f7c286cecb5180b0", "23c9cc6a1191"),
    "weight_init_sweep": (40, "4eddbceff1a9d45d", "8eec5e56d558"),
}


@pytest.mark.parametrize("name", sorted(SHIPPED_IDS))
def test_shipped_configs_keep_their_run_ids(name):
    import hashlib

    cfg = C.load_config(REPO_CONFIGS / f"{name}.yaml")
    runs = C.expand_runs(cfg)
    ids = [C.run_id(r, cfg) for r in runs]
    assert C.run_ids(cfg, runs) == ids
    count, digest, first = SHIPPED_IDS[name]
    assert (len(ids), hashlib.sha256(",".join(ids).encode()).hexdigest()[:16], ids[0]) == (
        count,
        digest,
        first,
    )


# --- layered files ----------------------------------------------------------------------------


def test_partial_file_layers_over_the_commands_default(tmp_path):
    partial = write(tmp_path, "train: {epochs: 1}\n")
    cfg = C.load_config(partial, command="train")
    assert cfg.train.epochs == 1 and cfg.name == "x"  # a file without a name is named after itself
    default = C.load_default_config("train", ["train.epochs=1"])
    # Two networks, not 40; the default's claim is about the default experiment, not this one.
    assert cfg.claim == ""
    assert dataclasses.replace(cfg, name=default.name, claim=default.claim) == default
    assert len(C.expand_runs(cfg)) == 2
    sweep = C.load_config(partial, command="sweep-init")
    assert len(C.expand_runs(sweep)) == 40 and sweep.train.epochs == 1


def test_files_compose_in_order_then_overrides(tmp_path):
    a = write(tmp_path, "train: {epochs: 2, batch_size: 10}\nseed: 5\n", "a.yaml")
    b = write(tmp_path, "train: {epochs: 3}\n", "b.yaml")
    cfg = C.load_config([a, b], ["seed=9"], command="train")
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.seed) == (3, 10, 9)
    assert C.load_config([b, a], command="train").train.epochs == 2
    # An error names the file that set the key, not the first or the default one.
    bad = write(tmp_path, "model: {reg: -1}\n", "bad.yaml")
    message = error_of([a, bad, b])
    assert message.startswith(f"{bad}: model.reg: "), message


# --- any key is an axis -----------------------------------------------------------------------


def test_any_model_or_train_key_is_an_axis_after_the_notebook_axes(tmp_path):
    cfg = C.load_config(
        None,
        [
            "train.batch_size=[5, 10, 50]",
            "model.hidden_dims=[[100, 100], [50, 50, 50]]",
            "model.weight_scale=[0.1, 0.01]",
            "model.batchnorm=[true, false]",
        ],
    )
    assert [key for key, _ in cfg.axes] == [
        "model.weight_scale",
        "model.batchnorm",
        "model.hidden_dims",
        "train.batch_size",
    ]
    runs = C.expand_runs(cfg)
    expected = list(
        itertools.product([0.1, 0.01], [True, False], [(100, 100), (50, 50, 50)], [5, 10, 50])
    )
    got = [
        (c.model.weight_scale, c.model.batchnorm, c.model.hidden_dims, c.train.batch_size)
        for c in (r.cfg for r in runs)
    ]
    assert got == expected
    assert dict(runs[5].point) == {
        "model.weight_scale": 0.1,
        "model.batchnorm": True,
        "model.hidden_dims": (50, 50, 50),
        "train.batch_size": 50,
    }
    ids = C.run_ids(cfg, runs)
    assert len(set(ids)) == len(runs) == 24
    # Round trip: the saved config holds the axes as lists and reloads to the same experiment.
    text = C.config_to_yaml(cfg)
    assert "batch_size: [5, 10, 50]" in text
    assert C.load_config(write(tmp_path, text)) == cfg


def test_axes_in_a_file_and_grid_values_are_checked_one_by_one(tmp_path):
    cfg = C.load_config(write(tmp_path, "train: {bn_momentum: {linspace: [0.5, 0.9, 3]}}\n"))
    assert cfg.values("train.bn_momentum") == (0.5, 0.7, 0.9)
    message = error_of(write(tmp_path, "train: {update_rule: [adam, rmsprop]}\n"))
    assert "train.update_rule[1]: expected one of sgd, sgd_momentum, adam" in message


@pytest.mark.parametrize(
    ("override", "key"),
    [("rng=[numpy, cs231n]", "rng"), ("data.num_train=[100, 200]", "data.num_train")],
)
def test_keys_that_cannot_be_swept_refuse_a_list(override, key):
    message = error_of(None, [override])
    assert f"{key}: expected a single value (this key cannot be swept)" in message


def test_cross_checks_hold_for_every_value_of_an_axis():
    message = error_of(None, ["train.batch_size=[50, 2000]"])
    assert "train.batch_size: 2000 is larger than the 1000" in message


# --- unknown keys, excerpts -------------------------------------------------------------------


def test_unknown_keys_suggest_the_closest_valid_one(tmp_path):
    message = error_of(write(tmp_path, "train: {epoch: 3}\n"))
    assert "unknown key in train; did you mean epochs?" in message
    assert "did you mean train.learning_rate?" in error_of(None, ["train.learning_rat=1"])


def test_error_lines_quote_a_short_excerpt_of_a_value(tmp_path):
    message = error_of(None, [f"train.epochs=[{', '.join(['x'] * 5000)}]"])
    assert len(message) < 400, message
    message = error_of(None, ["train.update_rule=" + "a" * 10_000])
    assert len(message) < 400, message


# --- limits -----------------------------------------------------------------------------------


def test_a_huge_grid_is_refused_in_milliseconds_before_it_is_built():
    import time

    start = time.perf_counter()
    message = error_of(None, ["model.weight_scale={logspace: [-4, 0, 10000000]}"])
    assert time.perf_counter() - start < 0.5
    assert "10,000,000 values exceeds the limit of 10,000 (limits.grid_values)" in message
    values = ", ".join(str(1 + i) for i in range(10_001))
    message = error_of(None, [f"model.weight_scale=[{values}]"])
    assert "a grid of 10,001 values exceeds the limit of 10,000" in message
    assert len(message) < 400


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.hidden_dims=[1000000]"], "limits.layer_width"),
        (["model.hidden_dims=[90000, 90000]"], "parameters per network, more than the limit"),
        (["train.epochs=100000000"], "solver iterations over all runs"),
        (
            ["seed={linspace: [1, 2, 3]}"],
            "seed: expected a value or a list, got {'linspace': [1, 2, 3]}",
        ),
        (
            [
                "model.weight_scale={logspace: [-4, 0, 200]}",
                "train.learning_rate={logspace: [-5, -1, 100]}",
            ],
            "the experiment needs 40,000 runs, more than the limit of 10,000",
        ),
    ],
)
def test_resource_guards_give_one_line_with_estimate_and_limit(overrides, fragment):
    message = error_of(None, overrides)
    assert fragment in message
    assert message.startswith("override "), message


def test_limits_can_be_raised_by_an_override(tmp_path):
    big = [
        "model.weight_scale={logspace: [-4, 0, 200]}",
        "train.learning_rate={logspace: [-5, -1, 100]}",
    ]
    cfg = C.load_config(
        None, [*big, "limits.runs=50000", "limits.iterations=100000000", "limits.memory_mb=1000000"]
    )
    assert C.num_runs(cfg) == 40_000
    assert "limits:" in C.config_to_yaml(cfg)  # a raised limit is saved with the config
    assert "limits" not in C.config_to_yaml(C.load_config(None))


@pytest.mark.parametrize("name", sorted(SHIPPED_IDS))
def test_shipped_configs_save_the_text_their_committed_results_hold(name):
    """Resume compares OUT/config.yaml as text but for the claim (folders saved before claims
    have none): keys added later must not change it."""
    cfg = C.load_config(REPO_CONFIGS / f"{name}.yaml")
    committed = (REPO_CONFIGS.parent / "results" / name / "config.yaml").read_text("utf-8")

    def without_claim(text):
        return "".join(line for line in text.splitlines(True) if not line.startswith("claim:"))

    assert without_claim(C.config_to_yaml(cfg)) == without_claim(committed)
    assert C.same_experiment(committed, C.config_to_yaml(cfg))
