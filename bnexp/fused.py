"""The Adam update and batch norm (with the ReLU after it) fused into compiled passes: the C
extension `bnexp._kernels`, built with the package where a C compiler is found.

NumPy runs the update as 14 whole-array operations, each one pass over memory; on the wide
first-layer weights that is about 11 ms a step where one fused pass takes about 4 ms
(`benchmarks/update_kernels.py`). The kernels evaluate the CS231n formulas in the same order and
in the same dtype as `bnexp.optim.adam` and `bnexp.layers` (IEEE arithmetic, compiled without
fused multiply-add or reassociation), so their results are the same bits; the tests compare the
two paths. Batch norm's kernels are its test-mode map, its staged train/batch forward and its
closed-form backward, each optionally fused with the ReLU that `bnexp.model` applies next: one
pass per stage instead of one per NumPy operation.

The extension is a plain shared library: importing it costs well under a millisecond, so every
process uses it (workers, Dask workers, the smallest experiment), and there is nothing to
compile or warm up at run time. Without it (no compiler at install time), or with
``BNEXP_FUSED=0`` in the environment, `adam` returns False and the batch-norm wrappers None, and
the caller runs the NumPy formulas.
"""

from __future__ import annotations

import os

import numpy as np

try:
    from bnexp import _kernels as _compiled
except ImportError:  # built without a C compiler: NumPy runs the same formulas
    _compiled = None

#: Environment variable that turns the compiled kernels off (``0``): the NumPy formulas run instead.
ENV_FUSED = "BNEXP_FUSED"


def available() -> bool:
    """True when the compiled extension was built and imports."""
    return _compiled is not None


def enabled() -> bool:
    """True when the compiled kernels are used: available and not turned off."""
    return _compiled is not None and os.environ.get(ENV_FUSED, "1") != "0"


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
    # double precision here, then rounded once to the dtype by the extension.
    c = [beta1, 1 - beta1, beta2, 1 - beta2, 1 - beta1**t, 1 - beta2**t]
    rows, cols = w.size // w.shape[-1], w.shape[-1]
    _compiled.adam(w, dw, m, v, rate, kind == "rows", rows, cols, *c, eps, _double(w))
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


def _double(x: np.ndarray) -> bool:
    """Whether the kernels run in double (float64) rather than float (float32) for x."""
    return x.dtype == np.float64


def _relu_mode(relu: bool, apart: bool) -> int:
    """The forward kernels' `relu` argument (its constants are the extension's own)."""
    if not relu:
        return _compiled.NO_RELU
    return _compiled.RELU_APART if apart else _compiled.RELU_IN_PLACE


def _outputs(x: np.ndarray, relu: bool, inplace: bool):
    """Fresh arrays out and h like x for a forward kernel (h is out itself when the ReLU is in
    place or absent), then the kernel's (B, N, D) views of them and its `relu` mode."""
    out = np.empty_like(x)
    apart = relu and not inplace
    h = np.empty_like(x) if apart else out
    views = out.reshape(-1, *x.shape[-2:]), h.reshape(-1, *x.shape[-2:])
    mode = _relu_mode(relu, apart)
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
    _compiled.bn_inference(x3, rm, rv, g, b, eps, *out_views, mode, *x3.shape, _double(x))
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
    out, h, out_views, mode = _outputs(x, relu, inplace)
    xmu, xhat = np.empty_like(x3), np.empty_like(x3)
    feats = [np.empty_like(g) for _ in range(4)]  # mean, var, std, inv_std
    constants = eps, 1.0, float(x.shape[-2])
    sizes = *x3.shape, _double(x)
    _compiled.bn_batch(x3, g, b, *constants, xmu, xhat, *out_views, mode, *feats, *sizes)
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
    dx, dgamma, dbeta = np.empty_like(dout3), np.empty_like(g), np.empty_like(g)
    relu = relu_input is not None
    xhat3 = xhat.reshape(dout3.shape)
    constants = 1.0, float(dout.shape[-2])
    outputs = dx, dgamma, dbeta
    sizes = *dout3.shape, _double(dout)
    _compiled.bn_backward(dout3, a3, xhat3, inv, g, *constants, relu, *outputs, *sizes)
    return dx.reshape(dout.shape), dgamma.reshape(gamma.shape), dbeta.reshape(gamma.shape)
