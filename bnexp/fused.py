"""The Adam update fused into one compiled pass, when numba is installed (the ``fast`` extra).

NumPy runs the update as 14 whole-array operations, each one pass over memory; on the wide
first-layer weights that is about 11 ms a step where one fused pass takes about 4 ms
(`benchmarks/update_kernels.py`). The kernel evaluates the CS231n formulas in the same order and in
the same dtype as `bnexp.optim.adam` (IEEE arithmetic: no fastmath, so no reassociation and no
fused multiply-add), so its results are the same bits; the tests compare the two paths.

``error_model="numpy"`` lets the loop be vectorized (numba's default Python error model checks
every division for zero, which keeps it scalar); it changes nothing in the results, which follow
IEEE division as NumPy's do.

Without numba, or with ``BNEXP_FUSED=0`` in the environment, `adam` returns False and the caller
runs the NumPy formulas. The kernels are compiled on first use and cached next to this module
(numba's own cache: about a second per dtype once, a fraction of that to load afterwards);
`warm_up` does that before worker processes are forked, so they inherit the compiled code.
"""

from __future__ import annotations

import os
from functools import cache

import numpy as np

#: Environment variable that turns the compiled kernel off (``0``): the NumPy formulas run instead.
ENV_FUSED = "BNEXP_FUSED"

#: Adam element-steps (parameters x iterations, summed over runs) below which an experiment does
#: not load the kernel: loading numba costs about 1.1 s of start-up and the kernel saves about
#: 2.6 ns per element-step (12.2 against 4.2 ms a step on 3.07 M weights,
#: `benchmarks/update_kernels.py`), so it pays from about 4e8. The default sweep has 1.3e9.
MIN_ELEMENT_STEPS = 4e8

_wanted = True  # see `want`


def want(flag: bool) -> None:
    """Use the kernel in this process (and the workers it forks) or not: `bnexp.sweep` decides
    per experiment from its size (`MIN_ELEMENT_STEPS`)."""
    global _wanted
    _wanted = bool(flag)


def enabled() -> bool:
    """True when the fused kernel is used: wanted, not turned off, and numba importable."""
    return _wanted and os.environ.get(ENV_FUSED, "1") != "0" and _kernel() is not None


@cache
def _kernel():
    """`bnexp._adam_kernels.adam`, or None without numba."""
    try:
        from bnexp import _adam_kernels
    except ImportError:
        return None
    return _adam_kernels.adam


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
    _kernel()(*views, rate, kind == "rows", *c, dtype.type(eps))
    return True


def warm_up(dtypes=("float32",)) -> None:
    """Compile (or load from numba's cache) the kernels for `dtypes` now, in this process, so that
    forked workers inherit them instead of each compiling its own; nothing without numba."""
    if not enabled():
        return
    for name in dtypes:
        dtype = np.dtype(name)
        for lr in (1e-3, np.full((1, 2), 1e-3)):  # a per-row and a per-column rate
            w, dw, m, v = (np.ones((2, 2), dtype=dtype) for _ in range(4))
            adam(w, dw, m, v, lr, 0.9, 0.999, 1e-8, 1)
