"""Layers against independent references: finite differences, closed forms, separate calls."""

import numpy as np
import pytest
from gradcheck import numerical_gradient, rel_error

from bnexp import layers as L

GRAD_TOL = 1e-7


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# gradient checks: every backward against centred differences, random upstream gradient
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x_shape, w_shape, b_shape",
    [
        ((5, 4), (4, 3), (3,)),  # one network
        ((2, 5, 4), (2, 4, 3), (2, 3)),  # a stack
        ((5, 4), (3, 4, 6), (3, 6)),  # shared input (the first layer of a stack)
        ((2, 5, 4), (4, 3), (3,)),  # shared parameters: grads summed over the networks
    ],
)
def test_affine_gradients(x_shape, w_shape, b_shape):
    rng = _rng(1)
    x, w, b = (rng.standard_normal(s) for s in (x_shape, w_shape, b_shape))
    out, cache = L.affine_forward(x, w, b)
    dout = rng.standard_normal(out.shape)
    dx, dw, db = L.affine_backward(dout, cache)
    assert (
        rel_error(dx, numerical_gradient(lambda v: L.affine_forward(v, w, b)[0], x, dout))
        < GRAD_TOL
    )
    assert (
        rel_error(dw, numerical_gradient(lambda v: L.affine_forward(x, v, b)[0], w, dout))
        < GRAD_TOL
    )
    assert (
        rel_error(db, numerical_gradient(lambda v: L.affine_forward(x, w, v)[0], b, dout))
        < GRAD_TOL
    )
    assert L.affine_backward(dout, cache, need_dx=False)[0] is None


def test_affine_forward_matches_direct_product():
    rng = _rng(2)
    x, w, b = (
        rng.standard_normal((3, 5, 4)),
        rng.standard_normal((3, 4, 2)),
        rng.standard_normal((3, 2)),
    )
    out, _ = L.affine_forward(x, w, b)
    for k in range(3):
        np.testing.assert_allclose(out[k], x[k].dot(w[k]) + b[k], rtol=1e-14)


def test_relu_gradient():
    rng = _rng(3)
    x = rng.standard_normal((2, 6, 5))
    x[np.abs(x) < 1e-3] = 0.5  # keep the finite-difference step away from the kink
    out, cache = L.relu_forward(x)
    np.testing.assert_array_equal(out, np.where(x > 0, x, 0))
    dout = rng.standard_normal(x.shape)
    num = numerical_gradient(lambda v: L.relu_forward(v)[0], x, dout)
    assert rel_error(L.relu_backward(dout, cache), num) < GRAD_TOL


def test_relu_gradient_at_zero_is_zero():
    # At the kink the subgradient 0 is used (CS231n's dout * (x > 0)), so a dead unit stays dead.
    x = np.array([[-1.0, 0.0, 2.0]])
    _, cache = L.relu_forward(x)
    np.testing.assert_array_equal(L.relu_backward(np.array([[5.0, 5.0, 5.0]]), cache), [[0, 0, 5]])


def test_relu_inplace_overwrites_x_and_gives_the_same_output_and_gradient():
    rng = _rng(30)
    x = rng.standard_normal((2, 6, 5))
    x[0, 0, :2] = [0.0, np.nan]  # the kink and a diverged value behave the same way too
    dout = rng.standard_normal(x.shape)
    out, cache = L.relu_forward(x)
    work = x.copy()
    out_inplace, cache_inplace = L.relu_forward(work, inplace=True)
    assert out_inplace is work
    np.testing.assert_array_equal(out_inplace, out)
    np.testing.assert_array_equal(
        L.relu_backward(dout, cache_inplace), L.relu_backward(dout, cache)
    )


@pytest.mark.parametrize("backward", [L.batchnorm_backward, L.batchnorm_backward_alt])
@pytest.mark.parametrize("mode", ["train", "batch"])
@pytest.mark.parametrize(
    "x_shape, p_shape, eps",
    [
        ((6, 4), (4,), 1e-5),
        ((2, 5, 3), (2, 3), 1e-5),
        ((2, 4, 3), (3,), 1e-5),  # gamma/beta shared by a stack
        # N = 2: with eps << var the exact dx is O(eps / var), far below what differences of a
        # O(1) function can resolve, so eps is made comparable to var to keep dx O(1).
        ((2, 2, 1), (2, 1), 1.0),
    ],
)
def test_batchnorm_gradients(backward, mode, x_shape, p_shape, eps):
    rng = _rng(4)
    x = 2.0 * rng.standard_normal(x_shape) + 1.5
    gamma, beta = rng.standard_normal(p_shape), rng.standard_normal(p_shape)

    def bn(x, gamma, beta):
        return L.batchnorm_forward(x, gamma, beta, {"mode": mode, "eps": eps})[0]

    out, cache = L.batchnorm_forward(x, gamma, beta, {"mode": mode, "eps": eps})
    dout = rng.standard_normal(out.shape)
    dx, dgamma, dbeta = backward(dout, cache)
    assert dgamma.shape == gamma.shape and dbeta.shape == beta.shape
    assert rel_error(dx, numerical_gradient(lambda v: bn(v, gamma, beta), x, dout)) < GRAD_TOL
    assert rel_error(dgamma, numerical_gradient(lambda v: bn(x, v, beta), gamma, dout)) < GRAD_TOL
    assert rel_error(dbeta, numerical_gradient(lambda v: bn(x, gamma, v), beta, dout)) < GRAD_TOL


def test_softmax_loss_gradient():
    rng = _rng(5)
    # Moderate scores: a class probability of 1e-5 would give a gradient entry that differences
    # of an O(1) loss cannot resolve to 1e-7 relative error.
    scores = rng.standard_normal((3, 7, 5))
    y = rng.integers(0, 5, size=7)
    loss, dscores = L.softmax_loss(scores, y)
    assert loss.shape == (3,)
    dloss = rng.standard_normal(loss.shape)  # random weights per network, not ones
    num = numerical_gradient(lambda v: L.softmax_loss(v, y)[0], scores, dloss)
    assert rel_error(dscores * dloss[:, None, None], num) < GRAD_TOL


def test_l2_penalty_gradient_and_value():
    rng = _rng(6)
    w = rng.standard_normal((3, 4, 5))
    loss, dw = L.l2_penalty(w, 0.37)
    for k in range(3):
        assert loss[k] == pytest.approx(0.5 * 0.37 * sum(v * v for v in w[k].ravel()), rel=1e-13)
    dloss = rng.standard_normal(3)
    num = numerical_gradient(lambda v: L.l2_penalty(v, 0.37)[0], w, dloss)
    assert rel_error(dw * dloss[:, None, None], num) < GRAD_TOL


# ---------------------------------------------------------------------------------------------
# batch norm semantics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(2, 1), (2, 7), (9, 1), (16, 10), (3, 2, 1), (4, 2, 5), (2, 3, 8, 6)]
)
def test_staged_and_closed_form_backward_agree(shape):
    rng = _rng(7)
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0) + rng.uniform(-2, 2)
    gamma = rng.standard_normal(shape[:-2] + shape[-1:])
    beta = rng.standard_normal(gamma.shape)
    out, cache = L.batchnorm_forward(x, gamma, beta, {"mode": "train"})
    dout = rng.standard_normal(out.shape)
    for staged, closed in zip(
        L.batchnorm_backward(dout, cache), L.batchnorm_backward_alt(dout, cache), strict=True
    ):
        assert staged.shape == closed.shape
        # Relative to the size of the terms that are summed: for N = 2 the exact dx is tiny
        # (of order eps / var) and elementwise relative error would only measure cancellation.
        scale = np.max(np.abs(dout)) * max(1.0, np.max(np.abs(gamma * cache["inv_std"][..., 0, :])))
        assert np.max(np.abs(staged - closed)) <= 1e-12 * scale


def test_train_output_has_zero_mean_unit_variance():
    rng = _rng(8)
    x = 4.0 * rng.standard_normal((3, 50, 6)) - 7.0
    D = x.shape[-1]
    out, _ = L.batchnorm_forward(x, np.ones(D), np.zeros(D), {"mode": "train", "eps": 1e-5})
    np.testing.assert_allclose(out.mean(axis=-2), 0.0, atol=1e-13)
    var = x.var(axis=-2)
    # Exactly var / (var + eps), i.e. 1 up to the eps inside the square root.
    np.testing.assert_allclose(out.var(axis=-2), var / (var + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(out.var(axis=-2), 1.0, atol=1e-5)


def test_running_update_follows_documented_formula():
    rng = _rng(9)
    K, D = 2, 4
    r_mean, r_var = rng.standard_normal((K, D)), rng.uniform(0.5, 2, (K, D))
    r_mean_before, r_var_before = r_mean.copy(), r_var.copy()
    bn_param = {"mode": "train", "momentum": 0.8, "running_mean": r_mean, "running_var": r_var}
    expected_mean, expected_var = r_mean.copy(), r_var.copy()
    for _ in range(3):
        x = rng.standard_normal((K, 10, D)) * 2 + 1
        L.batchnorm_forward(x, np.ones(D), np.zeros(D), bn_param)
        # Written out per network and feature with Python sums, not with the layer's reductions.
        for k in range(K):
            for d in range(D):
                col = [float(v) for v in x[k, :, d]]
                mu = sum(col) / len(col)
                var = sum((v - mu) ** 2 for v in col) / len(col)  # biased (divide by N)
                expected_mean[k, d] = 0.8 * expected_mean[k, d] + 0.2 * mu
                expected_var[k, d] = 0.8 * expected_var[k, d] + 0.2 * var
    np.testing.assert_allclose(bn_param["running_mean"], expected_mean, rtol=1e-13)
    np.testing.assert_allclose(bn_param["running_var"], expected_var, rtol=1e-13)
    # New arrays are stored back; the caller's originals keep their values (copies taken above).
    assert bn_param["running_mean"] is not r_mean and bn_param["running_var"] is not r_var
    np.testing.assert_array_equal(r_mean, r_mean_before)
    np.testing.assert_array_equal(r_var, r_var_before)


@pytest.mark.parametrize("mode", ["train", "batch", "test"])
@pytest.mark.parametrize("backward", [L.batchnorm_backward, L.batchnorm_backward_alt])
def test_batchnorm_leaves_the_callers_arrays_alone(mode, backward):
    """The contract of the docstring: inputs are read only; 'train' stores *new* running arrays.

    Every array handed in (x, gamma, beta, the running statistics, dout) keeps its values, the
    output shares no memory with an input, and only 'train' replaces the two running entries of
    bn_param (with fresh arrays); no other key of bn_param changes.
    """
    rng = _rng(17)
    x = rng.standard_normal((2, 6, 4)) * 3 + 1
    gamma, beta = rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    r_mean, r_var = rng.standard_normal((2, 4)), rng.uniform(0.5, 2, (2, 4))
    bn_param = {"mode": mode, "momentum": 0.7, "eps": 1e-4}
    bn_param.update(running_mean=r_mean, running_var=r_var)
    inputs = {"x": x, "gamma": gamma, "beta": beta, "running_mean": r_mean, "running_var": r_var}
    before = {name: a.copy() for name, a in inputs.items()}
    param_before = dict(bn_param)

    out, cache = L.batchnorm_forward(x, gamma, beta, bn_param)
    if cache is not None:
        dout = rng.standard_normal(out.shape)
        dout_before = dout.copy()
        backward(dout, cache)
        np.testing.assert_array_equal(dout, dout_before)
    for name, a in inputs.items():
        np.testing.assert_array_equal(a, before[name], err_msg=name)
        assert not np.shares_memory(out, a), name
    assert bn_param.keys() == param_before.keys()
    for key, value in param_before.items():
        if mode == "train" and key in ("running_mean", "running_var"):
            assert bn_param[key] is not value and not np.shares_memory(bn_param[key], value)
        else:
            assert bn_param[key] is value, key


def test_running_stats_start_at_zero_with_default_momentum():
    x = _rng(10).standard_normal((8, 3))
    bn_param = {"mode": "train"}
    L.batchnorm_forward(x, np.ones(3), np.zeros(3), bn_param)
    np.testing.assert_allclose(bn_param["running_mean"], 0.1 * x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(bn_param["running_var"], 0.1 * x.var(axis=0), rtol=1e-13)


def test_default_eps_is_1e_5_inside_the_square_root():
    # var ~ 1e-6, so eps matters: the output is xmu / sqrt(var + 1e-5), written out here.
    x = _rng(18).standard_normal((6, 3)) * 1e-3
    out, _ = L.batchnorm_forward(x, np.ones(3), np.zeros(3), {"mode": "batch"})
    xmu = x - x.mean(axis=0)
    np.testing.assert_allclose(out, xmu / np.sqrt((xmu**2).mean(axis=0) + 1e-5), rtol=1e-12)


def test_batch_mode_and_test_mode_leave_running_stats_alone():
    rng = _rng(11)
    r_mean, r_var = rng.standard_normal(3), rng.uniform(1, 2, 3)
    for mode in ("batch", "test"):
        bn_param = {"mode": mode, "running_mean": r_mean, "running_var": r_var}
        L.batchnorm_forward(rng.standard_normal((5, 3)), np.ones(3), np.zeros(3), bn_param)
        assert bn_param["running_mean"] is r_mean and bn_param["running_var"] is r_var


def test_gamma_sqrt_var_beta_mean_recovers_identity():
    rng = _rng(12)
    x = 3.0 * rng.standard_normal((2, 20, 5)) + 2.0
    eps = 1e-5
    gamma, beta = np.sqrt(x.var(axis=-2) + eps), x.mean(axis=-2)
    out, _ = L.batchnorm_forward(x, gamma, beta, {"mode": "train", "eps": eps})
    np.testing.assert_allclose(out, x, rtol=1e-12, atol=1e-12)


def test_test_mode_uses_running_stats():
    rng = _rng(13)
    x = rng.standard_normal((2, 6, 4))
    r_mean, r_var = rng.standard_normal((2, 4)), rng.uniform(0.5, 3, (2, 4))
    gamma, beta = rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    bn_param = {"mode": "test", "eps": 1e-3, "running_mean": r_mean, "running_var": r_var}
    out, _ = L.batchnorm_forward(x, gamma, beta, bn_param)
    for k in range(2):
        for n in range(6):
            expected = gamma[k] * (x[k, n] - r_mean[k]) / np.sqrt(r_var[k] + 1e-3) + beta[k]
            np.testing.assert_allclose(out[k, n], expected, rtol=1e-13)
    # One example at a time (N = 1 is fine at test time) gives the same rows.
    single, _ = L.batchnorm_forward(x[:, :1], gamma, beta, bn_param)
    np.testing.assert_array_equal(single, out[:, :1])


def test_population_stats_match_algorithm_2():
    rng = _rng(14)
    B, K, m, D = 6, 2, 8, 3
    batches = rng.standard_normal((B, K, m, D)) * 2 + 0.5
    means, vars_ = [], []
    for batch in batches:
        _, cache = L.batchnorm_forward(batch, np.ones(D), np.zeros(D), {"mode": "batch"})
        means.append(cache["mean"][..., 0, :])
        vars_.append(cache["var"][..., 0, :])
    mean, var = L.batchnorm_population_stats(np.stack(means), np.stack(vars_), m)
    # Independent: Algorithm 2 written out with unbiased per-batch variances (ddof=1).
    for k in range(K):
        exp_mean = sum(batches[i, k].mean(axis=0) for i in range(B)) / B
        exp_var = sum(np.var(batches[i, k], axis=0, ddof=1) for i in range(B)) / B
        np.testing.assert_allclose(mean[k], exp_mean, rtol=1e-13)
        np.testing.assert_allclose(var[k], exp_var, rtol=1e-13)


# ---------------------------------------------------------------------------------------------
# stacks: K networks at once == K separate calls; a NaN stays in its own network
# ---------------------------------------------------------------------------------------------


def _all_layers(x, w, b, gamma, beta, scores, y):
    """Forward and backward of every layer as a flat list of arrays (one network or a stack)."""
    rng = np.random.default_rng(99)
    results = []
    a, c_aff = L.affine_forward(x, w, b)
    # The same upstream gradient for every network, in the layers' dtype.
    da = np.broadcast_to(rng.standard_normal(a.shape[-2:]), a.shape).astype(a.dtype)
    results += [a, *L.affine_backward(da, c_aff)]
    bn_param = {"mode": "train"}
    h, c_bn = L.batchnorm_forward(a, gamma, beta, bn_param)
    results += [h, bn_param["running_mean"], bn_param["running_var"]]
    results += [*L.batchnorm_backward(da, c_bn), *L.batchnorm_backward_alt(da, c_bn)]
    test_out, _ = L.batchnorm_forward(a, gamma, beta, {**bn_param, "mode": "test"})
    r, c_relu = L.relu_forward(h)
    results += [test_out, r, L.relu_backward(da, c_relu)]
    loss, dscores = L.softmax_loss(scores, y)
    results += [loss, dscores, *L.l2_penalty(w, 0.1)]
    return results


def _stack_inputs(K=4, N=6, D=5, M=3, C=4, dtype=np.float64):
    rng = _rng(15)
    arrays = dict(
        x=rng.standard_normal((K, N, D)),
        w=rng.standard_normal((K, D, M)),
        b=rng.standard_normal((K, M)),
        gamma=rng.standard_normal((K, M)),
        beta=rng.standard_normal((K, M)),
        scores=rng.standard_normal((K, N, C)) * 5,
    )
    arrays = {k: v.astype(dtype) for k, v in arrays.items()}
    arrays["y"] = rng.integers(0, C, size=(K, N))
    return arrays


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_stack_equals_separate_calls_exactly(dtype):
    inputs = _stack_inputs(dtype=dtype)
    stacked = _all_layers(**inputs)
    for k in range(4):
        single = _all_layers(**{name: v[k] for name, v in inputs.items()})
        for s, one in zip(stacked, single, strict=True):
            np.testing.assert_array_equal(s[k], one)


def test_nan_in_one_network_leaves_the_others_bit_identical():
    clean_inputs = _stack_inputs()
    clean = _all_layers(**clean_inputs)
    poisoned_inputs = {k: v.copy() for k, v in clean_inputs.items()}
    for name in ("x", "w", "gamma", "scores"):
        poisoned_inputs[name][2].flat[0] = np.nan
    poisoned = _all_layers(**poisoned_inputs)
    assert all(np.isnan(p[2]).any() for p in poisoned[:2])  # the poison did get in
    for c, p in zip(clean, poisoned, strict=True):
        np.testing.assert_array_equal(np.delete(c, 2, axis=0), np.delete(p, 2, axis=0))


# ---------------------------------------------------------------------------------------------
# dtypes and numerical range
# ---------------------------------------------------------------------------------------------


def test_float32_in_float32_out():
    inputs = _stack_inputs(dtype=np.float32)
    for result in _all_layers(**inputs):
        assert result.dtype == np.float32
    loss, _ = L.softmax_loss(inputs["scores"][0], inputs["y"][0])
    assert loss.dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_loss_finite_for_huge_logits(dtype):
    scores = np.array([[1e30, -1e30, 0.0], [-1e30, 1e30, 1e30], [5.0, 1e30, -1e30]], dtype=dtype)
    y = np.array([0, 0, 2])
    loss, dscores = L.softmax_loss(scores, y)
    assert np.isfinite(loss) and np.all(np.isfinite(dscores))
    # Row 0 is right with certainty (loss 0); rows 1 and 2 are 2e30 too low.
    assert loss == pytest.approx((0 + 2e30 + 2e30) / 3, rel=1e-6)
    np.testing.assert_allclose(dscores, np.array([[0, 0, 0], [-1, 0.5, 0.5], [0, 1, -1]]) / 3)


def test_softmax_loss_matches_direct_computation():
    rng = _rng(16)
    scores = rng.uniform(-10, 10, (2, 8, 6))
    y = rng.integers(0, 6, (2, 8))
    loss, dscores = L.softmax_loss(scores, y)
    probs = np.exp(scores) / np.exp(scores).sum(axis=-1, keepdims=True)  # no shift needed here
    for k in range(2):
        expected = -np.mean([np.log(probs[k, n, y[k, n]]) for n in range(8)])
        assert loss[k] == pytest.approx(expected, rel=1e-13)
        onehot = np.eye(6)[y[k]]
        np.testing.assert_allclose(dscores[k], (probs[k] - onehot) / 8, rtol=1e-12, atol=1e-16)


# ---------------------------------------------------------------------------------------------
# bad input: ValueError naming the problem and the shapes
# ---------------------------------------------------------------------------------------------


def _z(*shape):
    return np.zeros(shape)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: L.affine_forward(_z(5, 4), _z(3, 2), _z(2)), r"mismatch.*\(5, 4\).*\(3, 2\)"),
        (lambda: L.affine_forward(_z(5, 4), _z(4, 2), _z(3)), r"mismatch.*b .*\(3,\)"),
        (lambda: L.affine_forward(_z(2, 5, 4), _z(3, 4, 2), _z(3, 2)), r"leading.*\(2, 5, 4\)"),
        (lambda: L.affine_forward(_z(4), _z(4, 2), _z(2)), r"x must be.*\(4,\)"),
        (
            lambda: L.affine_backward(_z(5, 3), L.affine_forward(_z(5, 4), _z(4, 2), _z(2))[1]),
            r"dout has shape \(5, 3\), expected \(5, 2\)",
        ),
        (lambda: L.relu_backward(_z(2, 3), _z(3, 2)), r"\(2, 3\).*\(3, 2\)"),
        (
            lambda: L.batchnorm_forward(_z(1, 3), _z(3), _z(3), {"mode": "train"}),
            r"N >= 2.*\(1, 3\)",
        ),
        (
            lambda: L.batchnorm_forward(_z(4, 1, 3), _z(4, 3), _z(4, 3), {"mode": "batch"}),
            r"N >= 2.*\(4, 1, 3\)",
        ),
        (
            lambda: L.batchnorm_forward(_z(4, 3), _z(3), _z(3), {"mode": "eval"}),
            r"unknown mode 'eval'",
        ),
        (lambda: L.batchnorm_forward(_z(4, 3), _z(3), _z(3), {}), r"unknown mode None"),
        (
            lambda: L.batchnorm_forward(_z(4, 3), _z(2), _z(3), {"mode": "train"}),
            r"feature axis mismatch.*\(4, 3\).*\(2,\)",
        ),
        (
            lambda: L.batchnorm_forward(
                _z(2, 4, 3), _z(2, 3), _z(2, 3), {"mode": "test", "running_mean": _z(3)}
            ),
            r"running_mean has shape \(3,\), x has shape \(2, 4, 3\)",
        ),
        (
            lambda: L.batchnorm_backward(
                _z(4, 2), L.batchnorm_forward(_z(4, 3), _z(3), _z(3), {"mode": "train"})[1]
            ),
            r"dout has shape \(4, 2\).*\(4, 3\)",
        ),
        (
            lambda: L.batchnorm_backward_alt(_z(4, 3), None),
            r"no cache",
        ),
        (lambda: L.batchnorm_population_stats(_z(3, 2), _z(3, 4), 5), r"\(3, 2\).*\(3, 4\)"),
        (lambda: L.batchnorm_population_stats(_z(3, 2), _z(3, 2), 1), r"batch_size"),
        (lambda: L.softmax_loss(_z(5, 3), np.zeros(4, dtype=int)), r"y of shape \(4,\).*\(5, 3\)"),
        (lambda: L.softmax_loss(_z(2, 3), np.array([0, 3])), r"labels must be in \[0, 3\)"),
        (lambda: L.softmax_loss(_z(2, 3), np.array([0.0, 1.0])), r"integer labels"),
        (lambda: L.l2_penalty(_z(3), 0.1), r"w must be.*\(3,\)"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
