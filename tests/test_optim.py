"""Update rules against hand-unrolled formulas and closed forms; stacks against separate calls."""

import numpy as np
import pytest

from bnexp.optim import UPDATE_RULES, adam, sgd, sgd_momentum


def _rng(seed=0):
    return np.random.default_rng(seed)


def test_sgd_step():
    rng = _rng(1)
    w, dw = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    new_w, state = sgd(w, dw, {"learning_rate": 0.25})
    np.testing.assert_array_equal(new_w, w - 0.25 * dw)
    assert state == {"learning_rate": 0.25}


def test_sgd_momentum_matches_closed_form_for_constant_gradient():
    # With a constant gradient g: v_n = -lr g (1 - mu^n) / (1 - mu),
    # w_n = w_0 - lr g / (1 - mu) * sum_{k=1..n} (1 - mu^k).
    rng = _rng(2)
    w0, g = rng.standard_normal((2, 5)), rng.standard_normal((2, 5))
    lr, mu, n = 0.05, 0.8, 7
    w, state = w0, {"learning_rate": lr, "momentum": mu}
    for _ in range(n):
        w, state = sgd_momentum(w, g, state)
    v_expected = -lr * g * (1 - mu**n) / (1 - mu)
    w_expected = w0 - lr * g / (1 - mu) * sum(1 - mu**k for k in range(1, n + 1))
    np.testing.assert_allclose(state["velocity"], v_expected, rtol=1e-13)
    np.testing.assert_allclose(w, w_expected, rtol=1e-13)


def test_adam_two_steps_hand_unrolled():
    rng = _rng(3)
    w0 = rng.standard_normal((3, 2))
    g1, g2 = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    w1, state = adam(w0, g1, {"learning_rate": lr})
    w2, state = adam(w1, g2, state)
    # Step 1: m = (1-b1) g1, v = (1-b2) g1^2, so mt = g1 and vt = g1^2.
    w1_ref = w0 - lr * g1 / (np.abs(g1) + eps)
    m2 = b1 * (1 - b1) * g1 + (1 - b1) * g2
    v2 = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
    w2_ref = w1_ref - lr * (m2 / (1 - b1**2)) / (np.sqrt(v2 / (1 - b2**2)) + eps)
    np.testing.assert_allclose(w1, w1_ref, rtol=1e-14)
    np.testing.assert_allclose(w2, w2_ref, rtol=1e-13)
    np.testing.assert_allclose(state["m"], m2, rtol=1e-14)
    np.testing.assert_allclose(state["v"], v2, rtol=1e-14)
    assert state["t"] == 2


def test_defaults_are_filled_in():
    rng = _rng(4)
    w, dw = rng.standard_normal(4), rng.standard_normal(4)
    explicit = {
        "sgd": {"learning_rate": 1e-2},
        "sgd_momentum": {"learning_rate": 1e-2, "momentum": 0.9},
        "adam": {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, "t": 0},
    }
    for name, rule in UPDATE_RULES.items():
        w_default, state = rule(w, dw, None)
        w_explicit, _ = rule(w, dw, explicit[name])
        np.testing.assert_array_equal(w_default, w_explicit)
        assert {k: v for k, v in explicit[name].items() if k != "t"}.items() <= state.items()
        w_partial, _ = rule(w, dw, {"learning_rate": explicit[name]["learning_rate"]})
        np.testing.assert_array_equal(w_partial, w_explicit)


def test_state_passed_in_is_not_modified():
    rng = _rng(5)
    w, dw = rng.standard_normal(3), rng.standard_normal(3)
    for rule in UPDATE_RULES.values():
        state = {"learning_rate": 0.1}
        w_new, new_state = rule(w, dw, state)
        assert state == {"learning_rate": 0.1}
        assert new_state is not state
        assert not np.shares_memory(w_new, w)


@pytest.mark.parametrize("rule", list(UPDATE_RULES.values()))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("lr_shape", [(4,), (4, 1), (4, 1, 1)])
def test_per_network_learning_rate_equals_separate_calls(rule, dtype, lr_shape):
    rng = _rng(6)
    rates = [1e-3, 3e-2, 0.5, 2e-4]
    lr = np.array(rates).reshape(lr_shape)  # float64 array even for float32 parameters
    for shape in [(4, 5, 3), (4, 3)]:  # stacked weights and stacked biases
        w = rng.standard_normal(shape).astype(dtype)
        grads = [rng.standard_normal(shape).astype(dtype) for _ in range(3)]
        stacked, state = w, {"learning_rate": lr}
        for g in grads:
            stacked, state = rule(stacked, g, state)
        assert stacked.dtype == dtype
        for k, rate in enumerate(rates):
            single, s_state = w[k], {"learning_rate": rate}  # a Python float, as the reference
            for g in grads:
                single, s_state = rule(single, g[k], s_state)
            np.testing.assert_array_equal(stacked[k], single)


def test_nan_gradient_in_one_network_leaves_others_untouched():
    rng = _rng(7)
    w = rng.standard_normal((3, 4, 2))
    g = rng.standard_normal((3, 4, 2))
    bad = g.copy()
    bad[1, 0, 0] = np.nan
    for rule in UPDATE_RULES.values():
        clean, _ = rule(w, g, {"learning_rate": 0.1})
        poisoned, _ = rule(w, bad, {"learning_rate": 0.1})
        assert np.isnan(poisoned[1]).any()
        np.testing.assert_array_equal(clean[[0, 2]], poisoned[[0, 2]])


@pytest.mark.parametrize("rule", list(UPDATE_RULES.values()))
def test_dtype_rules(rule):
    rng = _rng(8)
    w64, g64 = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    w32, g32 = w64.astype(np.float32), g64.astype(np.float32)
    # float32 stays float32 all the way (moments too), as in the float32 reference.
    new32, state = rule(w32, g32, {"learning_rate": 0.1})
    new32, state = rule(new32, g32, state)
    assert new32.dtype == np.float32
    assert all(v.dtype == np.float32 for v in state.values() if isinstance(v, np.ndarray))
    # float64 parameters with a float32 gradient are not narrowed: same as the upcast gradient.
    mixed, _ = rule(w64, g32, {"learning_rate": 0.1})
    upcast, _ = rule(w64, g32.astype(np.float64), {"learning_rate": 0.1})
    assert mixed.dtype == np.float64
    np.testing.assert_array_equal(mixed, upcast)


@pytest.mark.parametrize(
    "w_shape, dw_shape, state, match",
    [
        ((3, 4), (4, 3), {}, r"w has shape \(3, 4\) but dw has shape \(4, 3\)"),
        ((3, 4), (3, 4), {"learning_rate": np.ones(5)}, r"learning_rate of shape \(5,\).*\(3, 4\)"),
        ((3,), (3,), {"learning_rate": np.ones((3, 2))}, r"learning_rate of shape \(3, 2\)"),
    ],
)
def test_bad_input_raises_value_error(w_shape, dw_shape, state, match):
    for rule in UPDATE_RULES.values():
        with pytest.raises(ValueError, match=match):
            rule(np.zeros(w_shape), np.zeros(dw_shape), state)


def test_moment_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"m \(2,\).*\(3,\)"):
        adam(np.zeros(3), np.zeros(3), {"m": np.zeros(2), "v": np.zeros(2), "t": 1})
    with pytest.raises(ValueError, match=r"velocity has shape \(2,\), w has shape \(3,\)"):
        sgd_momentum(np.zeros(3), np.zeros(3), {"velocity": np.zeros(2)})


@pytest.mark.parametrize("rule", list(UPDATE_RULES.values()))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inplace_path_gives_the_same_bits_and_writes_into_w(rule, dtype):
    rng = _rng(9)
    lr = np.array([1e-3, 3e-2, 0.5]).reshape(3, 1)  # per-network rates, as the training loop
    w0 = rng.standard_normal((3, 4, 5)).astype(dtype)
    grads = [rng.standard_normal((3, 4, 5)).astype(dtype) for _ in range(4)]
    ref, ref_state = w0, {"learning_rate": lr}
    for g in grads:
        ref, ref_state = rule(ref, g, ref_state)
    w, state = w0.copy(), {"learning_rate": lr}
    scratch = (np.empty_like(w), np.empty_like(w))
    for g in grads:
        out, state_out = rule(w, g, state, inplace=True, scratch=scratch)
        assert out is w and state_out is state
    np.testing.assert_array_equal(w, ref)
    for key in ("m", "v", "velocity", "t"):
        if key in ref_state:
            np.testing.assert_array_equal(state[key], ref_state[key])
    # Without scratch buffers the temporaries are allocated; same numbers.
    w2, state2 = w0.copy(), {"learning_rate": lr}
    for g in grads:
        rule(w2, g, state2, inplace=True)
    np.testing.assert_array_equal(w2, ref)


def test_inplace_rejects_mismatched_dtype_and_scratch():
    w = np.zeros((2, 3))
    for rule in UPDATE_RULES.values():
        with pytest.raises(ValueError, match="inplace needs dw of w's dtype float64"):
            rule(w, np.zeros((2, 3), np.float32), {}, inplace=True)
        with pytest.raises(ValueError, match=r"scratch arrays must have w's shape \(2, 3\)"):
            rule(w, np.zeros((2, 3)), {}, inplace=True, scratch=(np.zeros(6), np.zeros(6)))
