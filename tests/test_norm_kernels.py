"""The compiled batch-norm (+ ReLU) kernels (`bnexp.fused`) give the NumPy formulas' bits, or
step aside.

The reference is `bnexp.layers` itself with the kernels turned off (BNEXP_FUSED=0); every
comparison is of the bytes (`_same_bits`), so a different NaN, or -0.0 for +0.0, fails too.
"""

from __future__ import annotations

import numpy as np
import pytest
from small import count_kernel_calls

from bnexp import fused
from bnexp import layers as L

DTYPES = [np.float32, np.float64]
# (..., N, D): the model's layouts, the sweep's training and check shapes (K = 20 networks,
# batch 50 or a 1000-image check chunk, 50 units), a single network, one network in a stack,
# two stack axes, and D = 2, the narrowest the kernels take.
SHAPES = [(20, 50, 50), (20, 1000, 50), (50, 50), (1000, 50), (1, 30, 7), (2, 3, 9, 4), (5, 2)]


@pytest.fixture(autouse=True)
def loaded(monkeypatch):
    """The kernels on (the extension is built wherever a compiler is: tests/test_build.py)."""
    if not fused.available():
        pytest.skip("bnexp._kernels was not built (no C compiler at install time)")
    monkeypatch.delenv(fused.ENV_FUSED, raising=False)


def _same_bits(got, want) -> None:
    """Equal dtypes, shapes and bytes (NaN payloads and the sign of zero included)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes(), np.flatnonzero(got.ravel() != want.ravel())[:10]


def _same_cache(got: dict | None, want: dict | None) -> None:
    """Two batch-norm caches hold the same entries, array entries of the same bits."""
    assert (got is None) == (want is None)
    if got is None:
        return
    assert list(got) == list(want)
    for key, value in want.items():
        if isinstance(value, np.ndarray):
            _same_bits(got[key], value)
        else:
            assert got[key] == value


def _inputs(shape, dtype, seed=0):
    """x (..., N, D) over many magnitudes and offsets; gamma, beta, running stats (..., D)."""
    rng = np.random.default_rng(seed)
    feature = (*shape[:-2], shape[-1])
    x = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3, feature)[..., None, :]
    x += rng.normal(0, 5, feature)[..., None, :]
    gamma, beta = rng.normal(1, 0.5, feature), rng.normal(0, 0.5, feature)
    stats = {"running_mean": rng.normal(0, 1, feature), "running_var": rng.uniform(0, 3, feature)}
    return (
        x.astype(dtype),
        gamma.astype(dtype),
        beta.astype(dtype),
        {k: v.astype(dtype) for k, v in stats.items()},
    )


def _both(monkeypatch, fn):
    """fn() with the kernels on, then off: (compiled result, NumPy result)."""
    monkeypatch.setenv(fused.ENV_FUSED, "1")
    compiled = fn()
    monkeypatch.setenv(fused.ENV_FUSED, "0")
    return compiled, fn()


@pytest.fixture
def calls(monkeypatch):
    """{kernel name: calls} of the compiled kernels in this test (see `count_kernel_calls`)."""
    return count_kernel_calls(monkeypatch)


# ---------------------------------------------------------------------------------------------
# the claims the kernels rest on
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_numpy_sums_the_batch_axis_row_by_row_from_plus_zero(dtype, shape):
    """`np.sum` / `np.mean` over axis -2 of a C-contiguous array with D >= 2 add the rows in order
    into +0, then divide by N: the order the kernels use."""
    x = _inputs(shape, dtype)[0] * dtype(1e3)
    x[..., 0] = -0.0  # a column of -0.0 sums to +0.0: the accumulator starts at +0
    acc = np.zeros((*shape[:-2], shape[-1]), dtype)
    for i in range(shape[-2]):
        acc = acc + x[..., i, :]
    _same_bits(x.sum(axis=-2), acc)
    _same_bits(x.mean(axis=-2), acc / dtype(shape[-2]))


def test_numpy_sums_a_single_column_otherwise():
    """With D = 1 NumPy's reduction runs along the batch axis (pairwise summation), a different
    rounding: why `fused` leaves D = 1 to NumPy."""
    x = _inputs((20, 1000, 1), np.float32)[0]
    acc = np.zeros((20, 1), np.float32)
    for i in range(1000):
        acc = acc + x[:, i, :]
    assert x.sum(axis=-2).tobytes() != acc.tobytes()


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["train", "batch", "test"])
def test_forward_gives_the_numpy_bits(monkeypatch, calls, dtype, shape, mode):
    x, gamma, beta, stats = _inputs(shape, dtype)

    def run():
        bn_param = {"mode": mode, "momentum": 0.8, "eps": 1e-3, **stats}
        out, cache = L.batchnorm_forward(x, gamma, beta, bn_param)
        return out, cache, bn_param

    (out, cache, param), (out_np, cache_np, param_np) = _both(monkeypatch, run)
    _same_bits(out, out_np)
    _same_cache(cache, cache_np)
    for key in ("running_mean", "running_var"):
        _same_bits(param[key], param_np[key])
    assert calls["bn_inference" if mode == "test" else "bn_batch"] == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("inplace", [False, True])
def test_forward_with_relu_gives_the_numpy_bits(monkeypatch, calls, dtype, shape, mode, inplace):
    x, gamma, beta, stats = _inputs(shape, dtype, seed=1)

    def run():
        return L.batchnorm_relu_forward(x, gamma, beta, {"mode": mode, **stats}, inplace=inplace)

    (h, cache, relu_cache), (h_np, cache_np, relu_cache_np) = _both(monkeypatch, run)
    _same_bits(h, h_np)
    _same_bits(relu_cache, relu_cache_np)
    _same_cache(cache, cache_np)
    assert (relu_cache is h) == inplace  # as relu_forward's cache: its (overwritten) input
    assert (h == 0).any() and (h > 0).any()
    assert calls["bn_inference" if mode == "test" else "bn_batch"] == 1


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------


def _forward_and_dout(shape, dtype, seed=2):
    """A train-mode forward with ReLU, and an upstream gradient (..., N, D) over magnitudes."""
    x, gamma, beta, _ = _inputs(shape, dtype, seed)
    _, bn_cache, relu_cache = L.batchnorm_relu_forward(x, gamma, beta, {"mode": "train"})
    rng = np.random.default_rng(seed)
    dout = (rng.standard_normal(shape) * 10.0 ** rng.integers(-4, 2, shape)).astype(dtype)
    return dout, bn_cache, relu_cache


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_relu", [True, False])
def test_backward_gives_the_numpy_bits(monkeypatch, calls, dtype, shape, with_relu):
    dout, bn_cache, relu_cache = _forward_and_dout(shape, dtype)

    def run():
        if with_relu:
            return L.relu_batchnorm_backward(dout, relu_cache, bn_cache)
        return L.batchnorm_backward_alt(dout, bn_cache)

    compiled, reference = _both(monkeypatch, run)
    for got, want in zip(compiled, reference, strict=True):
        _same_bits(got, want)
    assert calls["bn_backward"] == 1


# ---------------------------------------------------------------------------------------------
# NaN, inf, zeros
# ---------------------------------------------------------------------------------------------


def _poisoned(shape, dtype):
    """x with a NaN, a +inf, a -inf in separate columns of network 0, a column of -0.0 and a
    constant column (variance 0: eps alone divides) in the last network."""
    x, gamma, beta, stats = _inputs(shape, dtype, seed=3)
    x[..., 0, 1, 0] = np.nan
    x[..., 0, 2, 1] = np.inf
    x[..., 0, 3, 2] = -np.inf
    x[..., -1, :, 0] = -0.0
    x[..., -1, :, 1] = 7.0
    stats["running_var"][..., 0, 3] = np.inf
    stats["running_mean"][..., 0, 4] = np.nan
    return x, gamma, beta, stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["train", "test"])
def test_nan_and_inf_give_the_numpy_bits(monkeypatch, calls, dtype, mode):
    x, gamma, beta, stats = _poisoned((4, 6, 5), dtype)
    rng = np.random.default_rng(4)
    dout = rng.standard_normal(x.shape).astype(dtype)
    dout[1, 2, 3], dout[2, 0, 4], dout[3, 5, 2] = np.nan, np.inf, -np.inf

    def run():
        param = {"mode": mode, **stats}
        h, cache, relu_cache = L.batchnorm_relu_forward(x, gamma, beta, param)
        grads = () if cache is None else L.relu_batchnorm_backward(dout, relu_cache, cache)
        return h, relu_cache, *grads, *(param[k] for k in ("running_mean", "running_var"))

    with np.errstate(invalid="ignore"):  # NumPy warns of inf - inf; the kernels do not
        compiled, reference = _both(monkeypatch, run)
    for got, want in zip(compiled, reference, strict=True):
        _same_bits(got, want)
    h = compiled[0]
    assert np.isnan(h[0]).any() and np.isfinite(h[1:-1]).all()  # the NaN stays in network 0
    assert calls["bn_inference" if mode == "test" else "bn_backward"] == 1


# ---------------------------------------------------------------------------------------------
# where the kernels step aside
# ---------------------------------------------------------------------------------------------


def _fallbacks():
    """(label, x, gamma, beta) for layouts the kernels leave to NumPy."""
    x, gamma, beta, _ = _inputs((3, 8, 4), np.float32)
    return [
        ("shared gamma (D,) for a stack", x, gamma[0], beta[0]),
        ("one feature (D = 1)", x[..., :1].copy(), gamma[:, :1].copy(), beta[:, :1].copy()),
        ("mixed dtypes", x, gamma.astype(np.float64), beta),
        ("float16", x.astype(np.float16), gamma.astype(np.float16), beta.astype(np.float16)),
    ]


@pytest.mark.parametrize(("label", "x", "gamma", "beta"), _fallbacks())
@pytest.mark.parametrize("mode", ["train", "test"])
def test_other_layouts_run_numpy(monkeypatch, calls, label, x, gamma, beta, mode):
    def run():
        param = {"mode": mode}
        h, cache, relu_cache = L.batchnorm_relu_forward(x, gamma, beta, param)
        grads = () if cache is None else L.relu_batchnorm_backward(h, relu_cache, cache)
        return h, *grads

    compiled, reference = _both(monkeypatch, run)
    for got, want in zip(compiled, reference, strict=True):
        _same_bits(got, want)
    assert sum(calls.values()) == 0, label


@pytest.mark.parametrize("mode", ["train", "test"])
def test_strided_inputs(monkeypatch, calls, mode):
    """A strided x runs NumPy's forward; strided gamma and beta (views of the training loop's
    flat parameters) are copied for the kernels. The backward kernel runs either way: the arrays
    it reads (the cache's, the upstream gradient) are contiguous."""
    x, gamma, beta, _ = _inputs((3, 8, 4), np.float32)
    wide = np.repeat(x, 2, axis=-1)
    flat = np.concatenate([gamma, beta, gamma], axis=-1)  # (K, 3 D), as train's flat params
    strided_gamma, strided_beta = flat[:, :4], flat[:, 4:8]

    def run(x, gamma, beta):
        h, cache, relu_cache = L.batchnorm_relu_forward(x, gamma, beta, {"mode": mode})
        dout = h * np.float32(0.5)
        grads = () if cache is None else L.relu_batchnorm_backward(dout, relu_cache, cache)
        return h, *grads

    for args, forward_compiled in [
        ((wide[..., ::2], gamma, beta), False),
        ((x, strided_gamma, strided_beta), True),
    ]:
        calls.update(dict.fromkeys(calls, 0))
        compiled, reference = _both(monkeypatch, lambda a=args: run(*a))
        for got, want in zip(compiled, reference, strict=True):
            _same_bits(got, want)
        forward = calls["bn_inference" if mode == "test" else "bn_batch"]
        assert forward == forward_compiled
        assert calls["bn_backward"] == (mode == "train")


def test_a_process_that_did_not_load_them_runs_numpy(monkeypatch, calls):
    monkeypatch.setattr(fused, "_compiled", None)
    x, gamma, beta, stats = _inputs((3, 8, 4), np.float32)
    assert fused.batchnorm_batch(x, gamma, beta, 1e-5, relu=True, inplace=False) is None
    param = {"mode": "test", **stats}
    L.batchnorm_relu_forward(x, gamma, beta, param)
    assert sum(calls.values()) == 0
