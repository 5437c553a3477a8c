"""The Adam update and batch norm (with the ReLU after it) fused into compiled passes, when numba
is installed (the ``fast`` extra).

NumPy runs the update as 14 whole-array operations, each one pass over memory; on the wide
first-layer weights that is about 11 ms a step where one fused pass takes about 4 ms
(`benchmarks/update_kernels.py`). The kernel evaluates the CS231n formulas in the same order and in
the same dtype as `bnexp.optim.adam` (IEEE arithmetic: no fastmath, so no reassociation and no
fused multiply-add), so its results are the same bits; the tests compare the two paths.

``error_model="numpy"`` lets the loop be vectorized (numba's default Python error model checks
every division for zero, which keeps it scalar); it changes nothing in the results, which follow
IEEE division as NumPy's do.

Batch norm (`bnexp._norm_kernels`) follows the same rule against `bnexp.layers`: its test-mode
map, its staged train/batch forward and its closed-form backward, each optionally fused with the
ReLU that `bnexp.model` applies next, one pass per stage instead of one per NumPy operation.

Without numba, with ``BNEXP_FUSED=0`` in the environment, or in a process that did not `load`
it, `adam` returns False (the batch-norm wrappers None) and the caller runs the NumPy formulas.
`warm_up` loads the kernels and compiles them (numba caches them next to their modules: a few
seconds per dtype the first time, then about 0.45 s a process for numba's import and the cache)
before worker processes are forked, so they inherit the compiled code.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from functools import cache
from typing import NamedTuple

import numpy as np

#: Environment variable that turns the compiled kernel off (``0``): the NumPy formulas run instead.
ENV_FUSED = "BNEXP_FUSED"

#: Adam element-steps (parameters x iterations, summed over runs) below which `bnexp.sweep` does
#: not load the kernel: loading numba costs about 0.45 s of start-up and the kernel saves about
#: 2.6 ns per element-step (12.2 against 4.2 ms a step on 3.07 M weights,
#: `benchmarks/update_kernels.py`), so it pays from about 2e8. The default sweep has 1.4e9.
MIN_ELEMENT_STEPS = 2e8

_loaded = None  # the compiled kernels (`_Kernels`) once `load` found them

#: (relu, apart) -> the forward kernels' `relu` mode (`bnexp._norm_kernels`, whose values these
#: repeat: importing that module would import numba).
_RELU_MODES = {(False, False): 0, (True, True): 1, (True, False): 2}


def load() -> bool:
    """Import the kernel into this process (and so into the workers it forks afterwards) unless
    turned off; True when it is then in use. The only place numba is imported: a process that
    never calls it (a small experiment, a Dask worker, a test) runs the NumPy formulas."""
    global _loaded
    if os.environ.get(ENV_FUSED, "1") != "0" and _loaded is None:
        _loaded = _import_kernel()
    return enabled()


def enabled() -> bool:
    """True when the fused kernel is used: loaded (`load`) and not turned off."""
    return _loaded is not None and os.environ.get(ENV_FUSED, "1") != "0"


class _Kernels(NamedTuple):
    """The compiled functions, each documented in its module."""

    adam: Callable
    batchnorm_inference: Callable
    batchnorm_batch: Callable
    batchnorm_backward: Callable


@cache
def _import_kernel() -> _Kernels | None:
    """The kernels of `bnexp._adam_kernels` and `bnexp._norm_kernels`, or None without numba."""
    try:
        from bnexp import _adam_kernels, _norm_kernels
    except ImportError:
        return None
    norm = _norm_kernels
    return _Kernels(
        _adam_kernels.adam, norm.batchnorm_inference, norm.batchnorm_batch, norm.batchnorm_backward
    )


@contextlib.contextmanager
def _without_scipy():
    """Hide SciPy while numba loads, when nothing imported it yet.

    On its first compilation (or load from its cache) numba imports ``scipy.linalg``, only to
    find a BLAS for ``np.dot`` in compiled code, which the kernel does not use: about 0.25 s of
    every sweep's start-up where SciPy is installed. Marking the module missing makes that import
    fail at once; numba then records that compiled ``np.dot`` is unavailable in this process.
    SciPy is importable again afterwards.
    """
    if "scipy" in sys.modules:
        yield
        return
    sys.modules["scipy"] = None  # the import system's "not found" marker
    try:
        yield
    finally:
        sys.modules.pop("scipy", None)


def _rates(lr, w: np.ndarray) -> tuple[str, np.ndarray] | None:
    """The learning rate of the 2-D view (R, C) of w as ("rows", (R,)) or ("cols", (C,)), both
    contiguous; None when it varies along both (the NumPy formulas then run).

    lr: a Python float, or an array of w's rank that broadcasts to w (`optim._learning_rate`).
    """
    rate = np.asarray(lr, dtype=w.dtype)
    num_cols = w.shape[-1]
    if rate.ndim == 0:
        return "rows", np.full(w.size // num_cols, rate, dtype=w.dtype)
    if rate.ndim != w.ndim:
        return None
    if any(n not in (1, k) for n, k in zip(rate.shape, w.shape, strict=True)):
        return None
    if all(n == 1 for n in rate.shape[:-1]):
        return "cols", np.ascontiguousarray(np.broadcast_to(rate.reshape(-1), (num_cols,)))
    if rate.shape[-1] == 1:
        return "rows", np.broadcast_to(rate[..., 0], w.shape[:-1]).reshape(-1).copy()
    return None


def adam(w, dw, m, v, lr, beta1: float, beta2: float, eps: float, t: int) -> bool:
    """One Adam step in place on w, m and v; False (nothing done) when the kernel cannot run.

    Parameters
    ----------
    w, dw, m, v : (..., D) C-contiguous arrays of one float dtype (float32 or float64), D >= 1.
    lr : Python float, or an array of w's rank that broadcasts to w (as `optim._learning_rate`
        returns it: per network along the leading axes, or per column of the wide W1).
    beta1, beta2, eps : the rule's constants; t : the step number, already incremented.
    """
    arrays = (w, dw, m, v)
    dtype = w.dtype
    if dtype not in (np.float32, np.float64) or w.ndim == 0 or w.size == 0 or not enabled():
        return False
    if any(a.dtype != dtype or a.shape != w.shape or not a.flags.c_contiguous for a in arrays):
        return False
    rates = _rates(lr, w)
    if rates is None:
        return False
    kind, rate = rates
    # The constants exactly as NumPy applies Python floats to arrays of `dtype`: computed in
    # double precision, then rounded once to the dtype.
    c = [dtype.type(x) for x in (beta1, 1 - beta1, beta2, 1 - beta2, 1 - beta1**t, 1 - beta2**t)]
    views = (a.reshape(-1, w.shape[-1]) for a in arrays)
    _loaded.adam(*views, rate, kind == "rows", *c, dtype.type(eps))
    return True


def warm_up(dtypes=("float32",)) -> bool:
    """`load` the kernels and compile them (or load them from numba's cache) for `dtypes` now, in
    this process, so that forked workers inherit them instead of each compiling its own. Returns
    whether the kernels are in use (False without numba or with BNEXP_FUSED=0)."""
    with _without_scipy():
        if not load():
            return False
        for name in dtypes:
            dtype = np.dtype(name)
            for lr in (1e-3, np.full((1, 2), 1e-3)):  # a per-row and a per-column rate
                w, dw, m, v = (np.ones((2, 2), dtype=dtype) for _ in range(4))
                adam(w, dw, m, v, lr, 0.9, 0.999, 1e-8, 1)
            x, row = np.ones((2, 2), dtype=dtype), np.ones(2, dtype=dtype)
            batchnorm_inference(x, row, row, row, row, 1e-5, relu=True, inplace=True)
            out, _, stats = batchnorm_batch(x, row, row, 1e-5, relu=True, inplace=False)
            batchnorm_backward(x, out, stats["xhat"], stats["inv_std"], row, row.shape)
    return True


# ---------------------------------------------------------------------------------------------
# batch norm (+ ReLU): the wrappers return None where the kernels do not apply
# ---------------------------------------------------------------------------------------------


def _norm_views(x: np.ndarray, *features: np.ndarray):
    """x as (B, N, D) and each (..., D) per-feature array as (B, D), B = prod(...); None when
    the kernels do not take this layout (the caller then runs NumPy).

    They take float32 or float64 arrays of one dtype, x C-contiguous, whose per-feature arrays
    have x's leading axes exactly (a parameter shared by a stack, (D,) against (K, N, D),
    broadcasts: NumPy's job), and D >= 2: with one column NumPy sums the batch axis pairwise, not
    row by row. Per-feature arrays may be strided (the training loop's gamma and beta are views
    of its flat parameter array): they are small, so a contiguous copy costs next to nothing.
    """
    dtype = x.dtype
    if dtype not in (np.float32, np.float64) or x.ndim < 2 or x.size == 0 or not enabled():
        return None
    n, d = x.shape[-2:]
    feature_shape = (*x.shape[:-2], d)
    if d < 2 or not x.flags.c_contiguous:
        return None
    if any(a.dtype != dtype or a.shape != feature_shape for a in features):
        return None
    b = x.size // (n * d)
    return x.reshape(b, n, d), [np.ascontiguousarray(a).reshape(b, d) for a in features]


def _outputs(x: np.ndarray, relu: bool, inplace: bool):
    """Fresh arrays out and h like x for a forward kernel (h is out itself when the ReLU is in
    place or absent), then the kernel's (B, N, D) views of them and its `relu` mode."""
    out = np.empty_like(x)
    apart = relu and not inplace
    h = np.empty_like(x) if apart else out
    views = out.reshape(-1, *x.shape[-2:]), h.reshape(-1, *x.shape[-2:])
    mode = _RELU_MODES[relu, apart]
    return out, h, views, mode


def batchnorm_inference(x, gamma, beta, running_mean, running_var, eps: float, *, relu, inplace):
    """`layers._batchnorm_inference`, then max(out, 0) when `relu`, in one compiled pass.

    x : (..., N, D); gamma, beta, running_mean, running_var : (..., D), x's leading axes.
    inplace : the ReLU overwrites out (h is out), as `layers.relu_forward(..., inplace=True)`.

    Returns (out, h), both shaped like x (h is out without `relu`), or None (not handled).
    """
    views = _norm_views(x, running_mean, running_var, gamma, beta)
    if views is None:
        return None
    x3, (rm, rv, g, b) = views
    out, h, out_views, mode = _outputs(x, relu, inplace)
    _loaded.batchnorm_inference(x3, rm, rv, g, b, x.dtype.type(eps), *out_views, mode)
    return out, h


def batchnorm_batch(x, gamma, beta, eps: float, *, relu: bool, inplace: bool):
    """The staged train/batch forward of `layers.batchnorm_forward` (batch statistics), then
    max(out, 0) when `relu`, in three compiled passes over x.

    x : (..., N, D); gamma, beta : (..., D), x's leading axes; inplace : as for
    `batchnorm_inference`. The running averages are not touched (the caller updates them).

    Returns (out, h, stats) or None (not handled): out and h like x (h is out without `relu`);
    stats the cache arrays "xmu", "xhat" like x and "mean", "var", "std", "inv_std" (..., 1, D).
    """
    views = _norm_views(x, gamma, beta)
    if views is None:
        return None
    x3, (g, b) = views
    kind = x.dtype.type
    out, h, out_views, mode = _outputs(x, relu, inplace)
    xmu, xhat = np.empty_like(x3), np.empty_like(x3)
    feats = [np.empty_like(g) for _ in range(4)]  # mean, var, std, inv_std
    constants = kind(eps), kind(1), kind(x.shape[-2])
    _loaded.batchnorm_batch(x3, g, b, *constants, xmu, xhat, *out_views, mode, *feats)
    stat_shape = (*x.shape[:-2], 1, x.shape[-1])
    stats = {"xhat": xhat.reshape(x.shape), "xmu": xmu.reshape(x.shape)}
    for key, a in zip(("mean", "var", "std", "inv_std"), feats, strict=True):
        stats[key] = a.reshape(stat_shape)
    return out, h, stats


def batchnorm_backward(dout, relu_input, xhat, inv_std, gamma, beta_shape):
    """`layers.batchnorm_backward_alt`, after `layers.relu_backward` unless relu_input is None,
    in two compiled passes.

    dout, xhat : (..., N, D); relu_input : like dout, the ReLU's input (its cache), or None;
    inv_std : (..., 1, D); gamma : (..., D), dout's leading axes, and so beta_shape.

    Returns (dx like dout, dgamma like gamma, dbeta like gamma) or None (not handled).
    """
    full = [xhat] if relu_input is None else [xhat, relu_input]
    if any(a.shape != dout.shape for a in full) or tuple(beta_shape) != gamma.shape:
        return None
    if any(a.dtype != dout.dtype or not a.flags.c_contiguous for a in full):
        return None
    if inv_std.shape != (*gamma.shape[:-1], 1, gamma.shape[-1]):
        return None
    views = _norm_views(dout, gamma, inv_std.reshape(gamma.shape))
    if views is None:
        return None
    dout3, (g, inv) = views
    a3 = dout3 if relu_input is None else relu_input.reshape(dout3.shape)
    kind = dout.dtype.type
    dx, dgamma, dbeta = np.empty_like(dout3), np.empty_like(g), np.empty_like(g)
    relu = relu_input is not None
    xhat3 = xhat.reshape(dout3.shape)
    constants = kind(1), kind(dout.shape[-2])
    _loaded.batchnorm_backward(dout3, a3, xhat3, inv, g, *constants, relu, dx, dgamma, dbeta)
    return dx.reshape(dout.shape), dgamma.reshape(gamma.shape), dbeta.reshape(gamma.shape)
