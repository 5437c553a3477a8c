"""The fully connected net: whole-net gradients vs finite differences, layouts, init, predict."""

import numpy as np
import pytest
from gradcheck import numerical_gradient, rel_error

from bnexp import model
from bnexp.model import NetSpec


def _setup(batchnorm, K=2, N=6, D=7, hidden=(6, 5), C=4, seed=0):
    """Random float64 stack of K nets, data and labels."""
    rng = np.random.default_rng(seed)
    spec = NetSpec(D, hidden, C, batchnorm)
    normals = [rng.standard_normal((K, *s)) for s in model.weight_shapes(spec)]
    params = model.init_params(spec, normals, np.array([0.5, 1.5])[:K], np.float64)
    # Non-trivial biases / gamma / beta so every gradient is exercised away from its init value.
    for key in params:
        if not key.startswith("W"):
            params[key] = params[key] + 0.3 * rng.standard_normal(params[key].shape)
    X = rng.standard_normal((N, D))
    y = rng.integers(0, C, N)
    return spec, params, X, y


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("reg", [0.0, 0.7])
def test_whole_net_gradients_match_finite_differences(batchnorm, reg):
    """Relative error < 1e-7 on every parameter of a 2-network stack (float64).

    Centred differences carry ~1e-11 absolute rounding noise, so a relative bound this tight needs
    every pre-activation away from the ReLU kink (asserted) and no gradient that is exactly zero
    (the biases in front of batch norm are, and are checked against zero instead).
    """
    spec, params, X, y = _setup(batchnorm, seed=19)
    bn = model.init_bn_params(spec, (2,), np.float64)
    _, caches = model.forward(spec, params, X, bn, "train")
    assert min(np.abs(relu_in).min() for _, _, relu_in, _ in caches[:-1]) > 1e-3
    _, grads = model.loss_and_grads(spec, params, X, y, bn, reg=reg)
    weights = np.array([0.8, -1.3])  # combine the two networks' losses with distinct weights

    def f(_):
        return model.loss_and_grads(spec, params, X, y, bn, reg=reg)[0]

    worst = 0.0
    for key, value in params.items():
        num = numerical_gradient(f, value, weights)
        lead = (slice(None),) + (None,) * (value.ndim - 1)
        if batchnorm and key in ("b1", "b2"):  # batch norm subtracts the bias right away
            assert np.abs(num).max() < 1e-9 and np.abs(grads[key]).max() < 1e-14
            continue
        worst = max(worst, rel_error(num, grads[key] * weights[lead]))
    assert worst < 1e-7, worst


@pytest.mark.parametrize("batchnorm", [False, True])
def test_wide_layout_gives_the_same_loss_and_gradients(batchnorm):
    spec, params, X, y = _setup(batchnorm, K=2)
    wide = dict(params, W1=model.to_wide(params["W1"]))
    loss_s, grads_s = model.loss_and_grads(
        spec, params, X, y, model.init_bn_params(spec, (2,), np.float64), reg=0.3
    )
    loss_w, grads_w = model.loss_and_grads(
        spec, wide, X, y, model.init_bn_params(spec, (2,), np.float64), reg=0.3
    )
    np.testing.assert_allclose(loss_w, loss_s, rtol=1e-13)
    np.testing.assert_allclose(model.from_wide(grads_w["W1"], 2), grads_s["W1"], rtol=1e-12)
    for key in grads_s:
        if key != "W1":
            np.testing.assert_allclose(grads_w[key], grads_s[key], rtol=1e-12, atol=1e-15)


def test_stack_equals_separate_networks():
    spec, params, X, y = _setup(True, K=2)
    loss, grads = model.loss_and_grads(spec, params, X, y, model.init_bn_params(spec, (2,), float))
    for k in range(2):
        single = {key: value[k] for key, value in params.items()}
        loss_k, grads_k = model.loss_and_grads(
            spec, single, X, y, model.init_bn_params(spec, (), float)
        )
        np.testing.assert_allclose(loss[k], loss_k, rtol=1e-14)
        for key in grads_k:
            np.testing.assert_allclose(grads[key][k], grads_k[key], rtol=1e-12, atol=1e-15)


def test_wide_round_trip_and_column_layout():
    w = np.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    wide = model.to_wide(w)
    assert wide.shape == (3, 8)
    np.testing.assert_array_equal(wide[:, 4:8], w[1])
    np.testing.assert_array_equal(model.from_wide(wide, 2), w)


def test_init_params_rounds_scaled_float64_draws_and_sets_constants():
    spec = NetSpec(5, (4, 3), 2, batchnorm=True)
    rng = np.random.default_rng(1)
    normals = [rng.standard_normal((2, *s)) for s in model.weight_shapes(spec)]
    scales = np.array([1e-2, 3.0])
    params = model.init_params(spec, normals, scales, np.float32)
    assert model.param_names(spec) == list(params)
    assert set(params) == {"W1", "b1", "gamma1", "beta1", "W2", "b2", "gamma2", "beta2", "W3", "b3"}
    for layer, z in enumerate(normals, start=1):
        w = params[f"W{layer}"]
        assert w.dtype == np.float32
        # What the reference does: weight_scale * randn in float64, then .astype(float32).
        np.testing.assert_array_equal(w[1], (3.0 * z[1]).astype(np.float32))
        np.testing.assert_array_equal(params[f"b{layer}"], 0)
    np.testing.assert_array_equal(params["gamma2"], 1)
    np.testing.assert_array_equal(params["beta1"], 0)
    assert model.weight_shapes(spec) == [(5, 4), (4, 3), (3, 2)]


def test_predict_uses_running_statistics():
    spec, params, X, _ = _setup(True, K=2)
    rng = np.random.default_rng(3)
    bn = model.init_bn_params(spec, (2,), np.float64)
    for p in bn:
        p["running_mean"] = rng.standard_normal(p["running_mean"].shape)
        p["running_var"] = rng.uniform(0.5, 2.0, p["running_var"].shape)

    # Independent reference: the test-mode forward written out for network k.
    def reference(k):
        h = X
        for layer in (1, 2):
            a = h @ params[f"W{layer}"][k] + params[f"b{layer}"][k]
            mean, var = bn[layer - 1]["running_mean"][k], bn[layer - 1]["running_var"][k]
            a = (a - mean) / np.sqrt(var + 1e-5) * params[f"gamma{layer}"][k]
            h = np.maximum(a + params[f"beta{layer}"][k], 0)
        return (h @ params["W3"][k] + params["b3"][k]).argmax(axis=1)

    pred = model.predict(spec, params, X, bn)
    for k in range(2):
        np.testing.assert_array_equal(pred[k], reference(k))
    # Batch statistics would give other scores, so the check above can tell the modes apart.
    scores_batch, _ = model.forward(spec, params, X, bn, "batch", keep_caches=False)
    scores_test, _ = model.forward(spec, params, X, bn, "test", keep_caches=False)
    assert not np.allclose(scores_batch, scores_test)


def test_wide_layer_rejects_per_network_inputs():
    spec, params, X, _ = _setup(False, K=2)
    wide = dict(params, W1=model.to_wide(params["W1"]))
    with pytest.raises(ValueError, match="shared X"):
        model.forward(spec, wide, np.stack([X, X]), [], "train")
