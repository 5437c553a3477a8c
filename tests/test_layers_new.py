"""Layer norm, dropout and noisy batch norm against independent references.

References: centred finite differences in float64 with a random upstream gradient, formulas
written out per example with Python sums, K separate calls for a stack of K networks, and the
law of large numbers for the random parts (tolerances derived in each test).
"""

import math

import numpy as np
import pytest
from gradcheck import numerical_gradient, rel_error

from bnexp import layers as L

GRAD_TOL = 1e-7


def _rng(seed=0):
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------
# layer norm
# ---------------------------------------------------------------------------------------------

NORM_SHAPES = [
    ((6, 5), (5,)),  # one network
    ((3, 4, 5), (3, 5)),  # a stack, one gamma/beta per network
    ((3, 4, 5), (5,)),  # gamma/beta shared by the stack: their gradients sum over it
    ((4, 5), (3, 5)),  # x shared by the stack: dx sums over it
]


@pytest.mark.parametrize(
    "x_shape, p_shape, eps",
    [
        *((x_shape, p_shape, 1e-5) for x_shape, p_shape in NORM_SHAPES),
        # D = 2: xhat is +-1 up to eps, so with eps << var the exact dx is O(eps / var), far
        # below what differences of an O(1) function resolve; eps ~ var keeps dx O(1).
        ((2, 3, 2), (2, 2), 1.0),
    ],
)
def test_layernorm_gradients(x_shape, p_shape, eps):
    rng = _rng(1)
    x = 2.0 * rng.standard_normal(x_shape) + 1.5
    gamma, beta = rng.standard_normal(p_shape), rng.standard_normal(p_shape)

    def ln(x, gamma, beta):
        return L.layernorm_forward(x, gamma, beta, {"eps": eps})[0]

    out, cache = L.layernorm_forward(x, gamma, beta, {"eps": eps})
    dout = rng.standard_normal(out.shape)
    dx, dgamma, dbeta = L.layernorm_backward(dout, cache)
    assert dx.shape == x.shape and dgamma.shape == gamma.shape and dbeta.shape == beta.shape
    assert rel_error(dx, numerical_gradient(lambda v: ln(v, gamma, beta), x, dout)) < GRAD_TOL
    assert rel_error(dgamma, numerical_gradient(lambda v: ln(x, v, beta), gamma, dout)) < GRAD_TOL
    assert rel_error(dbeta, numerical_gradient(lambda v: ln(x, gamma, v), beta, dout)) < GRAD_TOL


def test_layernorm_matches_per_example_formula():
    rng = _rng(2)
    x = 3.0 * rng.standard_normal((2, 4, 6)) - 1.0
    gamma, beta = rng.standard_normal((2, 6)), rng.standard_normal((2, 6))
    eps = 1e-3
    out, _ = L.layernorm_forward(x, gamma, beta, {"eps": eps})
    for k in range(2):
        for n in range(4):
            row = [float(v) for v in x[k, n]]
            mu = sum(row) / len(row)
            var = sum((v - mu) ** 2 for v in row) / len(row)  # biased: divide by D
            expected = [
                float(g) * (v - mu) / math.sqrt(var + eps) + float(b)
                for v, g, b in zip(row, gamma[k], beta[k], strict=True)
            ]
            np.testing.assert_allclose(out[k, n], expected, rtol=1e-12, atol=1e-13)


def test_layernorm_default_eps_is_1e_5():
    x = _rng(3).standard_normal((3, 4)) * 1e-3  # var ~ 1e-6: eps matters
    ones, zeros = np.ones(4), np.zeros(4)
    np.testing.assert_array_equal(
        L.layernorm_forward(x, ones, zeros, {})[0],
        L.layernorm_forward(x, ones, zeros, {"eps": 1e-5})[0],
    )
    assert not np.array_equal(
        L.layernorm_forward(x, ones, zeros, {})[0],
        L.layernorm_forward(x, ones, zeros, {"eps": 1e-4})[0],
    )


def test_layernorm_train_equals_test_and_examples_are_independent():
    rng = _rng(4)
    x = rng.standard_normal((2, 5, 4))
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    train, _ = L.layernorm_forward(x, gamma, beta, {"mode": "train"})
    test, _ = L.layernorm_forward(x, gamma, beta, {"mode": "test"})
    np.testing.assert_array_equal(train, test)
    # No batch statistics: one example alone gives its row of the batch result.
    single, _ = L.layernorm_forward(x[:, 2:3], gamma, beta, {"mode": "test"})
    np.testing.assert_array_equal(single, train[:, 2:3])


def test_layernorm_backward_leaves_dout_alone():
    rng = _rng(5)
    x = rng.standard_normal((2, 3, 4))
    out, cache = L.layernorm_forward(x, np.ones(4), np.zeros(4), {})
    dout = rng.standard_normal(out.shape)
    before = dout.copy()
    L.layernorm_backward(dout, cache)
    np.testing.assert_array_equal(dout, before)


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, p",
    [((6, 5), 0.6), ((3, 4, 5), np.array([0.2, 0.5, 1.0])), ((3, 4, 5), 1.0)],
)
def test_dropout_gradient_with_a_fixed_mask(shape, p):
    rng = _rng(6)
    x = rng.standard_normal(shape)
    p_full = np.broadcast_to(np.asarray(p, dtype=float)[..., None, None], shape)
    mask = rng.random(shape) < p_full
    param = {"mode": "train", "p": p, "mask": mask}
    out, cache = L.dropout_forward(x, param)
    np.testing.assert_allclose(out, np.where(mask, x / p_full, 0.0), rtol=1e-15)
    dout = rng.standard_normal(shape)
    num = numerical_gradient(lambda v: L.dropout_forward(v, param)[0], x, dout)
    assert rel_error(L.dropout_backward(dout, cache), num) < GRAD_TOL


def test_dropout_p_one_is_the_identity_without_a_seed():
    rng = _rng(7)
    for dtype in (np.float64, np.float32):
        x = (rng.standard_normal((2, 5, 4)) * 1e3).astype(dtype)
        x[0, 0, :3] = [np.nan, -0.0, np.inf]
        out, cache = L.dropout_forward(x, {"mode": "train", "p": 1.0})
        assert out.dtype == dtype
        np.testing.assert_array_equal(out, x)
        assert np.signbit(out[0, 0, 1])  # bit-exact, even the sign of zero
        dout = rng.standard_normal(x.shape).astype(dtype)
        np.testing.assert_array_equal(L.dropout_backward(dout, cache), dout)


def test_dropout_test_mode_is_the_identity():
    x = _rng(8).standard_normal((4, 3))
    out, cache = L.dropout_forward(x, {"mode": "test", "p": 0.3})
    assert out is x  # documented: no copy
    dout = np.arange(12.0).reshape(4, 3)
    np.testing.assert_array_equal(L.dropout_backward(dout, cache), dout)


def test_dropout_is_unbiased_and_keeps_a_fraction_p():
    # T independent draws of the same (N, D) input, as a stack of T "networks" with one seed.
    T, N, D, p = 20_000, 4, 5, 0.3
    rng = _rng(9)
    x = rng.uniform(0.5, 2.0, (N, D)) * rng.choice([-1, 1], (N, D))
    stack = np.broadcast_to(x, (T, N, D)).copy()
    out, cache = L.dropout_forward(stack, {"mode": "train", "p": p, "seed": 123})
    # Each out = x * B / p with B ~ Bernoulli(p): mean x, standard deviation of the mean over T
    # |x| sqrt((1 - p) / (p T)) = 0.011 |x|. 5 of those bound all 20 entries except with
    # probability ~1e-5 (the seed is fixed, so the test is deterministic anyway); a dropout
    # without the 1/p scaling would be off by (1 - p) |x| = 0.7 |x|.
    sigma = np.abs(x) * math.sqrt((1 - p) / (p * T))
    assert np.all(np.abs(out.mean(axis=0) - x) < 5 * sigma)
    # The kept fraction is Binomial(T N D, p) / (T N D): standard deviation 0.0007.
    kept = np.mean(cache["multiplier"] != 0)
    assert abs(kept - p) < 5 * math.sqrt(p * (1 - p) / (T * N * D))


def test_dropout_per_network_keep_probabilities():
    T, N, D = 400, 10, 10
    p = np.array([0.1, 0.5, 0.9, 1.0])
    x = np.ones((4, T * N, D))
    out, _ = L.dropout_forward(x, {"mode": "train", "p": p, "seed": 5})
    n = T * N * D
    for k in range(4):
        kept = out[k] != 0
        # Binomial standard deviation, 5 of them; p = 1 keeps every unit exactly.
        assert abs(kept.mean() - p[k]) <= 5 * math.sqrt(p[k] * (1 - p[k]) / n)
        np.testing.assert_array_equal(out[k][kept], 1 / p[k])


def test_dropout_seed_reproducible_and_masks_may_be_0_1():
    x = _rng(10).standard_normal((6, 8))
    a, _ = L.dropout_forward(x, {"mode": "train", "p": 0.5, "seed": 1})
    b, _ = L.dropout_forward(x, {"mode": "train", "p": 0.5, "seed": 1})
    c, _ = L.dropout_forward(x, {"mode": "train", "p": 0.5, "seed": 2})
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    mask = a != 0
    from_bool, _ = L.dropout_forward(x, {"mode": "train", "p": 0.5, "mask": mask})
    from_int, _ = L.dropout_forward(x, {"mode": "train", "p": 0.5, "mask": mask.astype(int)})
    np.testing.assert_array_equal(from_bool, a)
    np.testing.assert_array_equal(from_int, a)


# ---------------------------------------------------------------------------------------------
# noisy batch norm
# ---------------------------------------------------------------------------------------------


def _noise(rng, shape):
    """A fixed draw of strength 1, shaped (..., D)."""
    return L.sample_bn_noise(rng, shape, 1.0)


@pytest.mark.parametrize("mode", ["train", "batch"])
@pytest.mark.parametrize("x_shape, p_shape", NORM_SHAPES[:3])
def test_noisy_batchnorm_gradients_for_a_fixed_draw(mode, x_shape, p_shape):
    rng = _rng(11)
    x = 2.0 * rng.standard_normal(x_shape) + 1.5
    gamma, beta = rng.standard_normal(p_shape), rng.standard_normal(p_shape)
    noise = _noise(rng, (*x_shape[:-2], x_shape[-1]))

    def nbn(x, gamma, beta):
        return L.noisy_batchnorm_forward(x, gamma, beta, {"mode": mode}, noise)[0]

    out, cache = L.noisy_batchnorm_forward(x, gamma, beta, {"mode": mode}, noise)
    dout = rng.standard_normal(out.shape)
    dx, dgamma, dbeta = L.noisy_batchnorm_backward(dout, cache)
    assert dgamma.shape == gamma.shape and dbeta.shape == beta.shape
    assert rel_error(dx, numerical_gradient(lambda v: nbn(v, gamma, beta), x, dout)) < GRAD_TOL
    assert rel_error(dgamma, numerical_gradient(lambda v: nbn(x, v, beta), gamma, dout)) < GRAD_TOL
    assert rel_error(dbeta, numerical_gradient(lambda v: nbn(x, gamma, v), beta, dout)) < GRAD_TOL


def test_noisy_batchnorm_forward_and_running_stats():
    rng = _rng(12)
    x = 3.0 * rng.standard_normal((2, 8, 3)) + 2.0
    gamma, beta = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    scale, shift = _noise(rng, (2, 3))
    noisy_param, plain_param = {"mode": "train"}, {"mode": "train"}
    out, cache = L.noisy_batchnorm_forward(x, gamma, beta, noisy_param, (scale, shift))
    # Independent: the normalisation written out with NumPy's var (biased), then the noise.
    xhat = (x - x.mean(axis=1, keepdims=True)) / np.sqrt(x.var(axis=1, keepdims=True) + 1e-5)
    expected = scale[:, None] * (gamma[:, None] * xhat + beta[:, None]) + shift[:, None]
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    # The noise changes the output distribution: per unit, batch mean and std follow the draw.
    np.testing.assert_allclose(out.mean(axis=1), scale * beta + shift, atol=1e-12)
    np.testing.assert_allclose(out.std(axis=1), scale * np.abs(gamma), rtol=1e-5)
    # Running statistics are batch norm's, of x before the noise; the cache has the batch stats.
    L.batchnorm_forward(x, gamma, beta, plain_param)
    for key in ("running_mean", "running_var"):
        np.testing.assert_array_equal(noisy_param[key], plain_param[key])
    np.testing.assert_allclose(cache["mean"][:, 0], x.mean(axis=1), rtol=1e-13)
    np.testing.assert_allclose(cache["var"][:, 0], x.var(axis=1), rtol=1e-13)


def test_noisy_batchnorm_without_noise_or_at_test_time_is_batchnorm():
    rng = _rng(13)
    x = rng.standard_normal((2, 6, 4))
    gamma, beta = rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    dout = rng.standard_normal(x.shape)
    plain, plain_cache = L.batchnorm_forward(x, gamma, beta, {"mode": "batch"})
    for noise in (None, L.sample_bn_noise(rng, (2, 4), 0.0)):  # strength 0: scale 1, shift 0
        out, cache = L.noisy_batchnorm_forward(x, gamma, beta, {"mode": "batch"}, noise)
        np.testing.assert_array_equal(out, plain)
        for got, want in zip(
            L.noisy_batchnorm_backward(dout, cache),
            L.batchnorm_backward_alt(dout, plain_cache),
            strict=True,
        ):
            np.testing.assert_array_equal(got, want)
    r = {"running_mean": rng.standard_normal((2, 4)), "running_var": rng.uniform(1, 2, (2, 4))}
    test_out, test_cache = L.noisy_batchnorm_forward(
        x, gamma, beta, {"mode": "test", **r}, _noise(rng, (2, 4))
    )
    assert test_cache is None
    np.testing.assert_array_equal(
        test_out, L.batchnorm_forward(x, gamma, beta, {"mode": "test", **r})[0]
    )


def test_sample_bn_noise_distribution():
    n, s = 200_000, 0.8
    scale, shift = L.sample_bn_noise(_rng(14), (n,), s)
    assert scale.min() >= 1 and scale.max() <= 1 + s and np.abs(shift).max() <= s
    # Uniform on an interval of width w has standard deviation w / sqrt(12); the mean of n draws
    # is within 5 standard errors of the centre (deterministic here: the seed is fixed).
    assert abs(scale.mean() - (1 + s / 2)) < 5 * s / math.sqrt(12 * n)
    assert abs(shift.mean()) < 5 * 2 * s / math.sqrt(12 * n)
    assert abs(scale.std() - s / math.sqrt(12)) < 0.01 * s
    again = L.sample_bn_noise(_rng(14), (n,), s)
    np.testing.assert_array_equal(again[0], scale)
    np.testing.assert_array_equal(again[1], shift)
    s32 = L.sample_bn_noise(_rng(14), (3, 4), s, dtype=np.float32)
    assert all(a.dtype == np.float32 and a.shape == (3, 4) for a in s32)


# ---------------------------------------------------------------------------------------------
# stacks: K networks at once == K separate calls; a NaN stays in its own network
# ---------------------------------------------------------------------------------------------


def _new_layers(x, gamma, beta, dout, mask, p, scale, shift):
    """Forward and backward of the three new layers as a flat list (one network or a stack)."""
    results = []
    ln, c_ln = L.layernorm_forward(x, gamma, beta, {})
    results += [ln, *L.layernorm_backward(dout, c_ln)]
    drop, c_drop = L.dropout_forward(x, {"mode": "train", "p": p, "mask": mask})
    results += [drop, L.dropout_backward(dout, c_drop)]
    bn_param = {"mode": "train"}
    nbn, c_nbn = L.noisy_batchnorm_forward(x, gamma, beta, bn_param, (scale, shift))
    results += [nbn, bn_param["running_mean"], bn_param["running_var"]]
    results += list(L.noisy_batchnorm_backward(dout, c_nbn))
    return results


def _stack_inputs(K=4, N=6, D=5, dtype=np.float64):
    rng = _rng(15)
    arrays = dict(
        x=rng.standard_normal((K, N, D)) * 2 + 1,
        gamma=rng.standard_normal((K, D)),
        beta=rng.standard_normal((K, D)),
        dout=rng.standard_normal((K, N, D)),
    )
    arrays["scale"], arrays["shift"] = L.sample_bn_noise(rng, (K, D), 1.0)
    arrays = {k: v.astype(dtype) for k, v in arrays.items()}
    arrays["p"] = np.array([0.3, 0.5, 1.0, 0.8])
    arrays["mask"] = rng.random((K, N, D)) < arrays["p"][:, None, None]
    return arrays


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_stack_equals_separate_calls_exactly(dtype):
    inputs = _stack_inputs(dtype=dtype)
    stacked = _new_layers(**inputs)
    assert all(r.dtype == dtype for r in stacked)
    for k in range(4):
        single = _new_layers(**{name: v[k] for name, v in inputs.items()})
        assert all(r.dtype == dtype for r in single)
        for s, one in zip(stacked, single, strict=True):
            np.testing.assert_array_equal(s[k], one)


def test_nan_in_one_network_leaves_the_others_bit_identical():
    clean_inputs = _stack_inputs()
    clean = _new_layers(**clean_inputs)
    poisoned_inputs = {k: v.copy() for k, v in clean_inputs.items()}
    for name in ("x", "gamma", "scale", "dout"):
        poisoned_inputs[name][1].flat[0] = np.nan
    poisoned = _new_layers(**poisoned_inputs)
    assert all(np.isnan(p[1]).any() for p in poisoned)  # the poison did get in everywhere
    for c, p in zip(clean, poisoned, strict=True):
        np.testing.assert_array_equal(np.delete(c, 1, axis=0), np.delete(p, 1, axis=0))


# ---------------------------------------------------------------------------------------------
# bad input: ValueError naming the problem and the shapes
# ---------------------------------------------------------------------------------------------


def _z(*shape):
    return np.zeros(shape)


def _drop(x, **param):
    return lambda: L.dropout_forward(x, param)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: L.layernorm_forward(_z(4, 3), _z(2), _z(3), {}), r"mismatch.*\(4, 3\).*\(2,\)"),
        (lambda: L.layernorm_forward(_z(4, 1), _z(1), _z(1), {}), r"D >= 2.*\(4, 1\)"),
        (lambda: L.layernorm_forward(_z(3), _z(3), _z(3), {}), r"x must be.*\(3,\)"),
        (
            lambda: L.layernorm_forward(_z(2, 4, 3), _z(3, 3), _z(3), {}),
            r"leading.*\(2, 4, 3\)",
        ),
        (
            lambda: L.layernorm_backward(
                _z(4, 2), L.layernorm_forward(_z(4, 3), _z(3), _z(3), {})[1]
            ),
            r"dout has shape \(4, 2\).*\(4, 3\)",
        ),
        (_drop(_z(4, 3), mode="eval", p=0.5), r"unknown mode 'eval'"),
        (_drop(_z(4, 3), mode="train"), r"needs 'p'"),
        (_drop(_z(4, 3), mode="train", p=0.0), r"\(0, 1\]"),
        (_drop(_z(4, 3), mode="test", p=1.5), r"\(0, 1\]"),
        (_drop(_z(4, 3), mode="train", p=np.nan), r"\(0, 1\]"),
        (_drop(_z(2, 4, 3), mode="train", p=_z(3) + 1), r"p of shape \(3,\).*\(2,\)"),
        (_drop(_z(4, 3), mode="train", p=0.5), r"needs a 'mask' or a 'seed'"),
        (_drop(_z(4, 3), mode="train", p=0.5, mask=_z(3, 4)), r"mask has shape \(3, 4\)"),
        (_drop(_z(4, 3), mode="train", p=0.5, mask=_z(4, 3) + 0.5), r"only 0 and 1"),
        (_drop(_z(4, 3), mode="train", p=1.0, mask=_z(4, 3)), r"whose p is 1"),
        (
            lambda: L.dropout_backward(
                _z(3, 4), L.dropout_forward(_z(4, 3), {"mode": "test", "p": 1})[1]
            ),
            r"dout has shape \(3, 4\), x had \(4, 3\)",
        ),
        (
            lambda: L.noisy_batchnorm_forward(_z(4, 3), _z(3), _z(3), {"mode": "train"}, (_z(3),)),
            r"pair \(scale, shift\)",
        ),
        (
            lambda: L.noisy_batchnorm_forward(
                _z(4, 3), _z(3), _z(3), {"mode": "train"}, (_z(2), _z(3))
            ),
            r"noise scale must be \(\.\.\., 3\), got shape \(2,\)",
        ),
        (
            lambda: L.noisy_batchnorm_forward(
                _z(4, 3), _z(3), _z(3), {"mode": "train"}, (_z(3), _z(2, 3))
            ),
            r"noise shift of shape \(2, 3\) adds leading axes",
        ),
        (lambda: L.noisy_batchnorm_backward(_z(4, 3), None), r"no cache"),
        (lambda: L.sample_bn_noise(_rng(), (3,), -0.1), r"strength must be >= 0"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
