"""The new layers wired into the engine: normalization by name, dropout and noisy batch norm from
the run's plan, their config keys, grouping, and lockstep = one run at a time."""

from __future__ import annotations

import numpy as np
import pytest
from fakecifar import learnable_splits
from gradcheck import numerical_gradient

from bnexp import model, plan, sweep, train
from bnexp.config import config_to_yaml, expand_runs, load_config, run_ids
from bnexp.errors import ConfigError
from bnexp.model import NetSpec

# --- the net: gradients with fixed draws ----------------------------------------------------


def _stack(normalization, K=2, N=6, D=7, hidden=(6, 5), C=4, seed=0):
    """Random float64 stack of K nets with non-trivial biases/gamma/beta, data and labels."""
    rng = np.random.default_rng(seed)
    spec = NetSpec(D, hidden, C, normalization=normalization)
    normals = [rng.standard_normal((K, *s)) for s in model.weight_shapes(spec)]
    params = model.init_params(spec, normals, np.array([0.5, 1.5])[:K], np.float64)
    for key in params:
        if not key.startswith("W"):
            params[key] = params[key] + 0.3 * rng.standard_normal(params[key].shape)
    return spec, params, rng.standard_normal((N, D)), rng.integers(0, C, N)


def _draws(spec, keep, strength, N=6, seed=5):
    gens = [plan.step_generators(plan.RunPlan([], np.zeros((0, N)), seed + k)) for k in range(2)]
    return model.draw_step(spec, N, np.float64, keep, strength, gens)


@pytest.mark.parametrize(
    ("normalization", "keep"),
    [
        ("layernorm", None),
        ("noisy_batchnorm", None),
        ("none", [0.7, 0.5]),
        ("layernorm", [1.0, 0.6]),
    ],
)
def test_whole_net_gradients_with_fixed_draws_match_finite_differences(normalization, keep):
    """Error < 1e-7 relative to each gradient's largest entry (float64), masks and noise fixed.

    Relative to the array, not entry by entry: dropped and dead units leave entries of ~1e-9
    whose ~1e-11 rounding noise in the centred differences would dominate an entrywise ratio.
    """
    spec, params, X, y = _stack(normalization, seed=3)
    keep = None if keep is None else np.array(keep)
    draws = _draws(spec, keep, np.array([0.8, 1.2]))
    if keep is not None:  # the draws really drop units of the networks with p < 1
        assert not draws.dropout[0]["mask"][1].all() and draws.dropout[0]["mask"].any()
    bn = model.init_bn_params(spec, (2,), np.float64)
    _, caches = model.forward(spec, params, X, bn, "train", draws=draws)
    assert min(np.abs(c[2]).min() for c in caches[:-1]) > 1e-3  # away from the ReLU kink
    _, grads = model.loss_and_grads(spec, params, X, y, bn, draws=draws)
    weights = np.array([0.8, -1.3])

    def f(_):
        return model.loss_and_grads(spec, params, X, y, bn, draws=draws)[0]

    worst = 0.0
    for key, value in params.items():
        num = numerical_gradient(f, value, weights)
        lead = (slice(None),) + (None,) * (value.ndim - 1)
        if spec.batchnorm and key in ("b1", "b2"):  # batch statistics cancel the bias
            assert np.abs(num).max() < 1e-9 and np.abs(grads[key]).max() < 1e-13
            continue
        analytic = grads[key] * weights[lead]
        worst = max(worst, np.abs(num - analytic).max() / np.abs(analytic).max())
    assert worst < 1e-7, worst


def test_evaluation_has_no_dropout_and_no_noise():
    """Test mode ignores the draws' source entirely: scores equal a plain batch-norm forward."""
    spec, params, X, _ = _stack("noisy_batchnorm")
    plain = NetSpec(spec.input_dim, spec.hidden_dims, spec.num_classes, batchnorm=True)
    bn = model.init_bn_params(spec, (2,), np.float64)
    model.forward(spec, params, X, bn, "train", draws=_draws(spec, np.array([0.5, 0.5]), [1, 1]))
    noisy_scores, _ = model.forward(spec, params, X, bn, "test")
    plain_scores, _ = model.forward(plain, params, X, bn, "test")
    np.testing.assert_array_equal(noisy_scores, plain_scores)
    assert model.draw_step(plain, 6, np.float64) is None  # no per-step work without them


def test_netspec_names_the_normalization_once():
    assert NetSpec(3, (2,), 2, True).normalization == "batchnorm"
    assert NetSpec(3, (2,), 2, batchnorm=False) == NetSpec(3, (2,), 2, normalization="none")
    assert NetSpec(3, (2,), 2, normalization="noisy_batchnorm").batchnorm  # running statistics
    assert not NetSpec(3, (2,), 2, True, normalization="layernorm").batchnorm
    with pytest.raises(ValueError, match="unknown normalization"):
        NetSpec(3, (2,), 2, normalization="groupnorm")


# --- the plan's streams ---------------------------------------------------------------------


def test_step_streams_restart_and_are_independent_of_the_other_streams():
    p = plan.numpy_plan(7, NetSpec(12, (5,), 3), 4, 2, 10)
    (d1, n1), (d2, n2) = plan.step_generators(p), plan.step_generators(p)
    np.testing.assert_array_equal(d1.random(5), d2.random(5))
    np.testing.assert_array_equal(n1.random(5), n2.random(5))
    d3, n3 = plan.step_generators(p)
    assert not np.array_equal(d3.random(5), n3.random(5))
    # Different seeds, different masks; the cs231n replay has no streams.
    other = plan.numpy_plan(8, NetSpec(12, (5,), 3), 4, 2, 10)
    fresh = plan.step_generators(p)[0].random(5)
    assert not np.array_equal(plan.step_generators(other)[0].random(5), fresh)
    cs = plan.cs231n_plans(1, [[(NetSpec(12, (5,), 3), 4, 2, 10)]])[0][0]
    with pytest.raises(ValueError, match="no per-step streams"):
        plan.step_generators(cs)


# --- config ---------------------------------------------------------------------------------


def test_normalization_spelled_either_way_gives_the_same_runs_and_ids():
    old = load_config(None, ["model.batchnorm=[true, false]"], command="train")
    new = load_config(None, ["model.normalization=[batchnorm, none]"], command="train")
    old_runs, new_runs = expand_runs(old), expand_runs(new)
    assert run_ids(old, old_runs) == run_ids(new, new_runs)
    assert [r.cfg.model.kind for r in new_runs] == ["batchnorm", "none"]
    assert [r.cfg.model.batchnorm for r in new_runs] == [True, False]
    # The default experiment's config text is unchanged by the new keys at their defaults.
    text = config_to_yaml(old)
    assert "normalization" not in text and "dropout_keep" not in text and "bn_noise" not in text


def test_new_normalizations_and_numbers_are_axes_with_new_ids():
    cfg = load_config(
        None,
        [
            "model.normalization=[batchnorm, layernorm, noisy_batchnorm]",
            "model.dropout_keep=[1, 0.5]",
        ],
        command="train",
    )
    runs = expand_runs(cfg)
    assert len(runs) == 6 and len(set(run_ids(cfg, runs))) == 6
    assert [r.cfg.model.kind for r in runs[::2]] == ["batchnorm", "layernorm", "noisy_batchnorm"]
    assert [r.cfg.model.dropout_keep for r in runs[:2]] == [1.0, 0.5]
    assert runs[4].cfg.model.bn_noise == model.NOISY_BN_STRENGTH
    # The saved config names the normalization axis and leaves the superseded key out.
    text = config_to_yaml(cfg)
    assert "normalization: [batchnorm, layernorm, noisy_batchnorm]" in text
    assert "batchnorm: [" not in text


def test_saved_config_with_a_normalization_axis_loads_back(tmp_path):
    cfg = load_config(None, ["model.normalization=[none, layernorm]", "model.bn_noise=0.5"])
    path = tmp_path / "saved.yaml"
    path.write_text(config_to_yaml(cfg))
    again = load_config(path)
    assert again == cfg
    assert run_ids(again, expand_runs(again)) == run_ids(cfg, expand_runs(cfg))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.normalization=groupnorm"], "model.normalization: expected one of none, batchnorm"),
        (["model.dropout_keep=0"], r"model.dropout_keep: expected a number in \(0, 1\], got 0"),
        (["model.dropout_keep=1.5"], r"model.dropout_keep: expected a number in \(0, 1\]"),
        (["model.dropout_keep=[0.5, 0]"], r"model.dropout_keep\[1\]: expected a number in"),
        (["model.bn_noise=-1"], "model.bn_noise: expected a number >= 0"),
        (
            ["model.batchnorm=false", "model.normalization=layernorm"],
            "model.normalization: replaces model.batchnorm, which override 'model.batchnorm=",
        ),
        (["rng=cs231n", "model.dropout_keep=0.5"], "model.dropout_keep: rng=cs231n replays"),
        (["rng=cs231n", "model.normalization=layernorm"], "model.normalization: rng=cs231n"),
    ],
)
def test_bad_values_are_one_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides, command="train")
    assert "\n" not in str(info.value)


# --- grouping and lockstep = alone ----------------------------------------------------------

SMALL = [
    "model.hidden_dims=[16, 16]",
    "model.dtype=float64",
    "train.epochs=2",
    "train.batch_size=20",
    "data.num_train=100",
    "train.lr_decay=0.9",
]
SWEEP = [
    "model.normalization=[none, batchnorm, layernorm, noisy_batchnorm]",
    "model.dropout_keep=[1.0, 0.6]",
    "model.weight_scale=[0.05, 0.3]",
    "model.bn_noise=[1.0, 0.4]",
]


@pytest.fixture(scope="module")
def data():
    return learnable_splits(seed=1)


def test_groups_split_by_normalization_only():
    runs = expand_runs(load_config(None, [*SMALL, *SWEEP]))
    groups = sweep.lockstep_groups(runs)
    assert len(runs) == 32 and [len(g) for g in groups] == [8] * 4
    for g in groups:
        assert len({runs[i].cfg.model.kind for i in g}) == 1
        assert len({(runs[i].cfg.model.dropout_keep, runs[i].cfg.model.bn_noise) for i in g}) == 4


def _run(overrides, out, data, jobs=1):
    cfg = load_config(None, overrides)
    return sweep.run_experiment(
        cfg, out, data=data, jobs=jobs, progress=False, plot=False, log=lambda m: 0
    )


def _without_seconds(summaries):
    return [{k: v for k, v in s.items() if k != "seconds"} for s in summaries]


@pytest.mark.slow
def test_lockstep_sweep_matches_each_run_trained_alone(tmp_path, data):
    """normalization x dropout_keep x scale x noise in 4 groups of 8 = every run alone (1e-10)
    and the same with --jobs 2."""
    together = _run([*SMALL, *SWEEP], tmp_path / "all", data).summaries
    by_axes = {tuple(sorted(s["axes"].items())): s for s in together}
    assert len(by_axes) == 32
    losses = set()
    for axes, grouped in by_axes.items():
        single = [f"{k}={v}" for k, v in axes]
        (alone,) = _run([*SMALL, *single], tmp_path / "one", data).summaries
        assert alone["run_id"] == grouped["run_id"]
        np.testing.assert_allclose(alone["loss_history"], grouped["loss_history"], rtol=1e-10)
        for key in ("train_acc_history", "val_acc_history", "test_acc", "best_val_acc"):
            assert alone[key] == grouped[key], key
        losses.add(round(grouped["final_train_loss"], 8))
        (tmp_path / "one" / "config.yaml").unlink()  # next run is another config
    # Dropout, scale and (for noisy batch norm only) noise strength change the numbers:
    # 3 kinds x 2 keeps x 2 scales + 8 noisy runs (otherwise the comparison would prove little).
    assert len(losses) == 20
    # Groups spread over two worker processes: the same records, bit for bit.
    two = _run([*SMALL, *SWEEP], tmp_path / "jobs2", data, jobs=2).summaries
    assert _without_seconds(two) == _without_seconds(together)


def test_noise_of_strength_zero_is_batch_norm_and_keep_one_is_no_dropout(data):
    """Second code path: noisy batch norm at strength 0 and dropout at p = 1 change no bit."""
    spec = NetSpec(3072, (16, 12), 10, batchnorm=True)
    noisy = NetSpec(3072, (16, 12), 10, normalization="noisy_batchnorm")
    cfg = load_config(None, [*SMALL])
    settings = sweep.solver_settings(cfg)
    p = plan.numpy_plan(4, spec, settings.num_iterations(100), 20, 100)
    plain = train.train_group(spec, [train.Member(0.1, None, p)], data, settings)
    zero = train.train_group(noisy, [train.Member(0.1, None, p, 1.0, 0.0)], data, settings)
    mixed = train.train_group(
        spec, [train.Member(0.1, None, p, 1.0), train.Member(0.1, None, p, 0.5)], data, settings
    )
    for other in (zero[0], mixed[0]):
        np.testing.assert_array_equal(plain[0].loss_history, other.loss_history)
        assert plain[0].val_acc_history == other.val_acc_history
    assert not np.array_equal(mixed[1].loss_history, plain[0].loss_history)
