"""The Adam update fused into one compiled pass, when numba is installed (the ``fast`` extra).

NumPy runs the update as 14 whole-array operations, each one pass over memory; on the wide
first-layer weights that is about 11 ms a step where one fused pass takes about 4 ms
(`benchmarks/update_kernels.py`). The kernel evaluates the CS231n formulas in the same order and in
the same dtype as `bnexp.optim.adam` (IEEE arithmetic: no fastmath, so no reassociation and no
fused multiply-add), so its results are the same bits; the tests compare the two paths.

``error_model="numpy"`` lets the loop be vectorized (numba's default Python error model checks
every division for zero, which keeps it scalar); it changes nothing in the results, which follow
IEEE division as NumPy's do.

Without numba, with ``BNEXP_FUSED=0`` in the environment, or in a process that did not `load`
it, `adam` returns False and the caller runs the NumPy formulas. `warm_up` loads the kernel and
compiles it (numba caches it next to this module: about a second per dtype the first time, then
about 0.45 s a process for numba's import and the cache) before worker processes are forked, so
they inherit the compiled code.
"""

from __future__ import annotations

import contextlib
import os
import sys
from functools import cache

import numpy as np

#: Environment variable that turns the compiled kernel off (``0``): the NumPy formulas run instead.
ENV_FUSED = "BNEXP_FUSED"

#: Adam element-steps (parameters x iterations, summed over runs) below which `bnexp.sweep` does
#: not load the kernel: loading numba costs about 0.45 s of start-up and the kernel saves about
#: 2.6 ns per element-step (12.2 against 4.2 ms a step on 3.07 M weights,
#: `benchmarks/update_kernels.py`), so it pays from about 2e8. The default sweep has 1.4e9.
MIN_ELEMENT_STEPS = 2e8

_loaded = None  # the compiled kernel once `load` found it


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


@cache
def _import_kernel():
    """`bnexp._adam_kernels.adam`, or None without numba."""
    try:
        from bnexp import _adam_kernels
    except ImportError:
        return None
    return _adam_kernels.adam


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
    _loaded(*views, rate, kind == "rows", *c, dtype.type(eps))
    return True


def warm_up(dtypes=("float32",)) -> bool:
    """`load` the kernel and compile it (or load it from numba's cache) for `dtypes` now, in this
    process, so that forked workers inherit it instead of each compiling its own. Returns whether
    the kernel is in use (False without numba or with BNEXP_FUSED=0)."""
    with _without_scipy():
        if not load():
            return False
        for name in dtypes:
            dtype = np.dtype(name)
            for lr in (1e-3, np.full((1, 2), 1e-3)):  # a per-row and a per-column rate
                w, dw, m, v = (np.ones((2, 2), dtype=dtype) for _ in range(4))
                adam(w, dw, m, v, lr, 0.9, 0.999, 1e-8, 1)
    return True
