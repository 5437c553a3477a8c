"""Probes: every number against an independent reference (finite differences, model.loss_and_grads
on hand-built parameters, model.forward's caches), read-only inputs, lockstep = one at a time."""

import copy
import json
import re

import numpy as np
import pytest
from gradcheck import numerical_gradient

from bnexp import model, probes
from bnexp.model import NetSpec

EPS = 1e-5


def _setup(batchnorm, K=3, N=8, D=7, hidden=(6, 5, 4), C=4, seed=0, dtype=np.float64):
    """Random stack of K nets with distinct scales, non-trivial b/gamma/beta, data and labels."""
    rng = np.random.default_rng(seed)
    spec = NetSpec(D, hidden, C, batchnorm)
    normals = [rng.standard_normal((K, *s)) for s in model.weight_shapes(spec)]
    params = model.init_params(spec, normals, np.linspace(0.4, 1.2, K), np.float64)
    for key in params:
        if not key.startswith("W"):
            params[key] = params[key] + 0.3 * rng.standard_normal(params[key].shape)
    params = {key: value.astype(dtype) for key, value in params.items()}
    X = rng.standard_normal((N, D))
    y = rng.integers(0, C, N)
    return spec, params, X, y


def _model_loss_and_grads(spec, params, X, y):
    """The training code path: (K,) losses and the gradients of every parameter."""
    k = params["W1"].shape[0]
    return model.loss_and_grads(spec, params, X, y, model.init_bn_params(spec, (k,), np.float64))


def _layer_of(key: str) -> int:
    return int(re.sub(r"^\D+", "", key))


def _full_norm(grads: dict, k: int) -> float:
    return float(np.sqrt(sum(np.sum(g[k] ** 2) for g in grads.values())))


# --- layer_stats --------------------------------------------------------------------------------


@pytest.mark.parametrize("batchnorm", [False, True])
def test_grad_w_norm_matches_finite_differences(batchnorm):
    spec, params, X, y = _setup(batchnorm, seed=4)
    records = probes.layer_stats(spec, params, X, y, EPS)
    assert [(r["net"], r["layer"]) for r in records] == [
        (k, layer) for k in range(3) for layer in (1, 2, 3)
    ]

    def total_loss(_):  # the networks are independent, so d(sum)/dW_l[k] = d loss_k / dW_l[k]
        scores, _ = model.forward(spec, params, X, [{} for _ in spec.hidden_dims], "batch")
        return model.layers.softmax_loss(scores, y)[0].sum()

    for layer in (1, 2, 3):
        num = numerical_gradient(total_loss, params[f"W{layer}"], np.ones(()))
        for r in records:
            if r["layer"] == layer:
                expected = np.linalg.norm(num[r["net"]])
                assert r["grad_w_norm"] == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_activation_statistics_match_the_model_forward_caches(batchnorm):
    spec, params, X, y = _setup(batchnorm, N=20, hidden=(30, 30, 30), seed=1)
    params["b2"] = params["b2"] - 3.0  # push some units of layer 2 to be dead on the batch
    if batchnorm:
        params["beta2"] = params["beta2"] - 3.0
    records = probes.layer_stats(spec, params, X, y, EPS)
    bn = model.init_bn_params(spec, (3,), np.float64)
    _, caches = model.forward(spec, params, X, bn, "batch")
    for r in records:
        z = caches[r["layer"] - 1][2][r["net"]]  # the ReLU's input, (N, H)
        q15, q50, q85 = np.percentile(z, [15, 50, 85])
        assert (r["act_p15"], r["act_p50"], r["act_p85"]) == pytest.approx((q15, q50, q85))
        assert r["act_mean"] == pytest.approx(z.mean()) and r["act_std"] == pytest.approx(z.std())
        dead = sum(bool(np.all(np.maximum(z[:, j], 0) == 0)) for j in range(z.shape[1]))
        assert r["dead_frac"] == dead / z.shape[1]
    assert any(r["dead_frac"] > 0 for r in records if r["layer"] == 2)


def test_grad_act_norm_is_the_bias_gradient_for_a_single_example():
    """Without normalisation and with N = 1, dL/dz_l = dL/db_l (the bias adds to z directly)."""
    spec, params, X, y = _setup(False, N=1, seed=2)
    _, grads = _model_loss_and_grads(spec, params, X, y)
    records = probes.layer_stats(spec, params, X, y, EPS)
    for r in records:
        expected = np.linalg.norm(grads[f"b{r['layer']}"][r["net"]])
        assert r["grad_act_norm"] == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert sum(r["grad_act_norm"] > 0 for r in records) >= len(records) // 2


def test_update_ratio_is_the_relative_change_of_the_weights():
    spec, params, X, y = _setup(True)
    rng = np.random.default_rng(5)
    prev = {key: value + 0.01 * rng.standard_normal(value.shape) for key, value in params.items()}
    records = probes.layer_stats(spec, params, X, y, EPS, prev_params=prev)
    for r in records:
        w, w0 = params[f"W{r['layer']}"][r["net"]], prev[f"W{r['layer']}"][r["net"]]
        assert r["update_ratio"] == pytest.approx(np.linalg.norm(w - w0) / np.linalg.norm(w0))
    assert all(r["update_ratio"] is None for r in probes.layer_stats(spec, params, X, y, EPS))


# --- ics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batchnorm", [False, True])
def test_ics_matches_a_direct_two_pass_computation(batchnorm):
    spec, params, X, y = _setup(batchnorm, seed=6)
    _, grads = _model_loss_and_grads(spec, params, X, y)
    rng = np.random.default_rng(7)
    new = {
        key: v - 0.05 * np.sign(grads[key]) * rng.uniform(0.5, 1.5, v.shape)
        for key, v in params.items()
    }
    records = probes.ics(spec, params, new, X, y, EPS)
    assert [(r["net"], r["layer"]) for r in records] == [
        (k, layer) for k in range(3) for layer in range(1, 5)
    ]
    for i in range(1, spec.num_layers + 1):
        # Layers 1..i-1 (all their parameters) updated, layers i.. at their step-t values.
        mixed = {key: (new if _layer_of(key) < i else params)[key] for key in params}
        _, grads_mixed = _model_loss_and_grads(spec, mixed, X, y)
        for k in range(3):
            g, g2 = grads[f"W{i}"][k].ravel(), grads_mixed[f"W{i}"][k].ravel()
            r = records[k * spec.num_layers + i - 1]
            assert r["ics_l2"] == pytest.approx(np.linalg.norm(g - g2), rel=1e-9, abs=1e-14)
            cos = g @ g2 / (np.linalg.norm(g) * np.linalg.norm(g2))
            assert r["ics_cos"] == pytest.approx(cos, rel=1e-9)
    deep = [r for r in records if r["layer"] > 1]
    assert all(r["ics_l2"] > 0 for r in deep) and all(r["ics_cos"] < 1 for r in deep)


# --- landscape ----------------------------------------------------------------------------------


@pytest.mark.parametrize("batchnorm", [False, True])
def test_landscape_matches_moved_parameters_through_the_model(batchnorm):
    spec, params, X, y = _setup(batchnorm, seed=8)
    lr = np.array([1e-3, 5e-3, 2e-2])
    factors = (0.0, 1.0, 10.0, 50.0)
    records = probes.landscape(spec, params, X, y, EPS, lr, factors)
    loss, grads = _model_loss_and_grads(spec, params, X, y)
    for k, r in enumerate(records):
        assert r["net"] == k
        assert r["loss"] == pytest.approx(loss[k], rel=1e-12)
        assert r["losses"][0] == pytest.approx(loss[k], rel=1e-12)  # eta = 0: the plain loss
        assert r["grad_diffs"][0] == pytest.approx(0.0, abs=1e-12)
        assert r["grad_norm"] == pytest.approx(_full_norm(grads, k), rel=1e-10)
        ratios = []
        for j, factor in enumerate(factors):
            eta = factor * lr[k]
            assert r["etas"][j] == pytest.approx(eta)
            moved = {key: v - eta * grads[key] for key, v in params.items()}
            loss_m, grads_m = _model_loss_and_grads(spec, moved, X, y)
            assert r["losses"][j] == pytest.approx(loss_m[k], rel=1e-10)
            diff = {key: grads[key] - grads_m[key] for key in grads}
            assert r["grad_diffs"][j] == pytest.approx(_full_norm(diff, k), rel=1e-7, abs=1e-12)
            if eta > 0:
                ratios.append(_full_norm(diff, k) / (eta * _full_norm(grads, k)))
        assert r["beta_smoothness"] == pytest.approx(max(ratios), rel=1e-7)
        assert r["loss_min"] == min(r["losses"]) and r["loss_max"] == max(r["losses"])
        assert r["loss_min"] < r["loss_max"]


def test_default_factors_are_positive_and_increasing():
    f = np.array(probes.DEFAULT_FACTORS)
    assert f[0] == 1.0 and np.all(np.diff(f) > 0)


# --- contracts: read only, lockstep, divergence, layouts, JSON ----------------------------------


def _all_probes(spec, params, new, X, y, lr):
    return (
        probes.layer_stats(spec, params, X, y, EPS, prev_params=new),
        probes.ics(spec, params, new, X, y, EPS),
        probes.landscape(spec, params, X, y, EPS, lr),
    )


@pytest.mark.parametrize("batchnorm", [False, True])
def test_nothing_given_is_modified(batchnorm):
    spec, params, X, y = _setup(batchnorm, dtype=np.float32)
    new = {key: value * np.float32(0.9) for key, value in params.items()}
    given = (params, new, X, y)
    before = copy.deepcopy(given)
    _all_probes(spec, params, new, X, y, np.full(3, 1e-3))
    for a, b in zip(given, before, strict=True):
        for key in a if isinstance(a, dict) else [None]:
            x, x0 = (a[key], b[key]) if key else (a, b)
            assert x.dtype == x0.dtype
            np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("per_network_batch", [False, True])
def test_stacked_networks_equal_separate_calls(per_network_batch):
    spec, params, X, y = _setup(True, seed=9)
    rng = np.random.default_rng(10)
    new = {key: v + 0.02 * rng.standard_normal(v.shape) for key, v in params.items()}
    if per_network_batch:
        X = rng.standard_normal((3, *X.shape))
        y = rng.integers(0, spec.num_classes, (3, y.size))
    lr = np.array([1e-3, 2e-3, 3e-3])
    stacked = _all_probes(spec, params, new, X, y, lr)
    for k in range(3):
        one = {key: v[k : k + 1] for key, v in params.items()}
        one_new = {key: v[k : k + 1] for key, v in new.items()}
        Xk, yk = (X[k], y[k]) if per_network_batch else (X, y)
        single = _all_probes(spec, one, one_new, Xk, yk, lr[k : k + 1])
        for recs_all, recs_one in zip(stacked, single, strict=True):
            mine = [dict(r, net=0) for r in recs_all if r["net"] == k]
            assert len(mine) == len(recs_one)
            for a, b in zip(mine, recs_one, strict=True):
                assert a.keys() == b.keys()
                for key in a:
                    assert a[key] == pytest.approx(b[key], rel=1e-10, abs=1e-14), key


def test_a_diverged_network_gives_none_and_leaves_its_neighbours_alone():
    spec, params, X, y = _setup(False, seed=11)
    new = {key: v * 0.95 for key, v in params.items()}
    bad = {key: v.copy() for key, v in params.items()}
    bad["W2"][1] = np.inf
    lr = np.full(3, 1e-3)
    clean = _all_probes(spec, params, new, X, y, lr)
    with np.errstate(all="ignore"):
        dirty = _all_probes(spec, bad, new, X, y, lr)
    for recs_clean, recs_dirty in zip(clean, dirty, strict=True):
        json.dumps(recs_dirty, allow_nan=False)  # JSON-friendly: None, never NaN or inf
        for a, b in zip(recs_clean, recs_dirty, strict=True):
            if b["net"] == 1:
                continue
            assert a == b
    landscape_bad = dirty[2][1]
    assert landscape_bad["loss"] is None and landscape_bad["beta_smoothness"] is None


def test_float32_parameters_agree_with_float64():
    spec, params, X, y = _setup(True, N=30, hidden=(20, 20), seed=12)
    p32 = {key: v.astype(np.float32) for key, v in params.items()}
    new = {key: v * 0.97 for key, v in params.items()}
    new32 = {key: v.astype(np.float32) for key, v in new.items()}
    lr = np.full(3, 1e-2)
    ref = _all_probes(spec, params, new, X, y, lr)
    got = _all_probes(spec, p32, new32, X, y, lr)
    for recs_ref, recs_got in zip(ref, got, strict=True):
        for a, b in zip(recs_ref, recs_got, strict=True):
            for key in ("grad_w_norm", "grad_act_norm", "act_p50", "loss", "grad_norm", "ics_cos"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-6), key
            assert all(isinstance(v, (int, float, list, type(None))) for v in b.values())


def test_wide_first_layer_is_rejected_with_a_hint():
    spec, params, X, y = _setup(False)
    wide = dict(params, W1=model.to_wide(params["W1"]))
    with pytest.raises(ValueError, match="from_wide"):
        probes.layer_stats(spec, wide, X, y, EPS)


def test_the_normalization_is_chosen_by_name_in_one_place():
    assert probes.norm_kind(NetSpec(3, (2,), 2, True)) == "batchnorm"
    assert probes.norm_kind(NetSpec(3, (2,), 2, False)) == "none"
    assert probes.norm_kind(NetSpec(3, (2,), 2, normalization="layernorm")) == "layernorm"
    with pytest.raises(ValueError, match="unknown normalization 'groupnorm'"):
        probes._norm_forward("groupnorm", np.zeros((1, 2, 2)), {}, 1, EPS)


@pytest.mark.parametrize("kind", ["layernorm", "noisy_batchnorm"])
def test_layer_norm_and_noisy_batch_norm_are_probed_as_the_model_computes_them(kind):
    """Gradients and ICS of the probes equal the model's own (noisy batch norm without its
    noise: the model with no draws, as evaluation)."""
    spec_bn, params, X, y = _setup(True, seed=9)
    spec = NetSpec(spec_bn.input_dim, spec_bn.hidden_dims, spec_bn.num_classes, normalization=kind)
    _, grads = _model_loss_and_grads(spec, params, X, y)
    records = probes.layer_stats(spec, params, X, y, EPS)
    for r in records:
        expected = np.linalg.norm(grads[f"W{r['layer']}"][r["net"]])
        assert r["grad_w_norm"] == pytest.approx(expected, rel=1e-9)
    new = {key: v - 0.05 * np.sign(grads[key]) for key, v in params.items()}
    ics = probes.ics(spec, params, new, X, y, EPS)
    i = spec.num_layers  # the last layer: every layer before it moved
    mixed = {key: (new if _layer_of(key) < i else params)[key] for key in params}
    _, grads_mixed = _model_loss_and_grads(spec, mixed, X, y)
    for k in range(3):
        g, g2 = grads[f"W{i}"][k].ravel(), grads_mixed[f"W{i}"][k].ravel()
        r = ics[k * spec.num_layers + i - 1]
        assert r["ics_l2"] == pytest.approx(np.linalg.norm(g - g2), rel=1e-9)


def test_percentiles_equal_numpy_percentile_and_keep_nan():
    rng = np.random.default_rng(13)
    for m in (1, 2, 7, 1000):
        flat = rng.standard_normal((3, m)).astype(np.float32)
        flat[2, 0] = np.nan
        got = np.array(probes._percentiles(flat))
        want = np.percentile(flat.astype(np.float64), probes.PERCENTILES, axis=-1)
        np.testing.assert_allclose(got[:, :2], want[:, :2], rtol=1e-6)
        assert np.isnan(got[:, 2]).all()


@pytest.mark.parametrize("batchnorm", [False, True])
def test_minibatch_probes_equal_the_separate_calls(batchnorm):
    spec, params, X, y = _setup(batchnorm, seed=14, dtype=np.float32)
    new = {key: v * np.float32(0.98) for key, v in params.items()}
    lr = np.array([1e-3, 2e-3, 3e-3])
    ics_records, landscape_records = probes.minibatch_probes(spec, params, new, X, y, EPS, lr)
    assert ics_records == probes.ics(spec, params, new, X, y, EPS)
    assert landscape_records == probes.landscape(spec, params, X, y, EPS, lr)
