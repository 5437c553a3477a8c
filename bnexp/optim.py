"""First-order update rules with the CS231n interface: ``rule(w, dw, state) -> (w, state)``.

``w`` may be a stack of parameters of K independent networks, e.g. (K, D, M) or (K, M); the
learning rate is a Python float or an array over the leading (network) axes, so each network of a
stack can have its own. Array learning rates are aligned with w's *leading* axes: shape (K,),
(K, 1) or (K, 1, 1) all mean "one rate per network" for both (K, D, M) weights and (K, M) biases.

``state`` holds the hyper-parameters and moments. Missing keys get the CS231n defaults. The input
dict is not modified: a new dict is returned, and moments are new arrays, never updated in place.

``inplace=True`` is the training loop's fast path: w and the moments are overwritten, the
element-wise temporaries go to ``scratch`` (two arrays of w's shape and dtype, reused across
steps, or None to allocate them), and the given state dict is updated and returned. It evaluates
the same operations in the same order, so it gives the same bits as the default path; it only
saves the allocations and copies (the update rule runs on every parameter at every step).

Dtypes: the arithmetic runs in the common dtype of w and dw (float64 is never narrowed to float32),
and the new w is cast back to w's dtype. With float32 w and dw everything stays float32 exactly as
in the reference: hyper-parameters are kept as Python floats (NumPy 2 does not let those upcast)
and an array learning rate is cast to the compute dtype, so a stack with per-network rates gives
bit-identical results to separate calls with Python-float rates.
"""

from __future__ import annotations

import numpy as np

from bnexp import fused


def _prepare(name: str, w: np.ndarray, dw: np.ndarray, state: dict | None, defaults: dict):
    """Check shapes, fill defaults; return (state copy, compute dtype, dw in it, learning rate)."""
    if w.shape != dw.shape:
        raise ValueError(f"{name}: w has shape {w.shape} but dw has shape {dw.shape}")
    state = dict(state) if state else {}
    for key, value in defaults.items():
        state.setdefault(key, value)
    dtype = np.result_type(w.dtype, dw.dtype)
    # Cast dw up front: float32 dw with float64 w would otherwise be scaled in float32 first.
    dw = dw.astype(dtype, copy=False)
    return state, dtype, dw, _learning_rate(name, state["learning_rate"], w, dtype)


def _prepare_inplace(name, w, dw, state, defaults, scratch, moments):
    """In-place variant of `_prepare`: state updated as is, moments and scratch of w's shape."""
    if w.shape != dw.shape:
        raise ValueError(f"{name}: w has shape {w.shape} but dw has shape {dw.shape}")
    if dw.dtype != w.dtype:
        # Same numbers as the default path: dw cast up (float64 w) or the compute done in
        # float64 and w rounded (float32 w) are not in-place operations; keep one rule.
        raise ValueError(f"{name}: inplace needs dw of w's dtype {w.dtype}, got {dw.dtype}")
    for key, value in defaults.items():
        state.setdefault(key, value)
    for key in moments:
        if state.get(key) is None:
            state[key] = np.zeros(w.shape, dtype=w.dtype)
        elif state[key].shape != w.shape:
            raise ValueError(f"{name}: {key} has shape {state[key].shape}, w has shape {w.shape}")
    if scratch is None:
        scratch = (np.empty_like(w), np.empty_like(w))
    elif any(a.shape != w.shape or a.dtype != w.dtype for a in scratch):
        raise ValueError(f"{name}: scratch arrays must have w's shape {w.shape} and dtype")
    return scratch, _learning_rate(name, state["learning_rate"], w, w.dtype)


def _learning_rate(name: str, lr, w: np.ndarray, dtype):
    """A Python float as is; an array aligned with w's leading axes, in the compute dtype."""
    if np.ndim(lr) == 0:
        return float(lr)
    lr = np.asarray(lr)
    # Drop trailing unit axes, then pad to w's rank, so (K,), (K, 1) and (K, 1, 1) all broadcast
    # over the leading axes of both (K, D, M) and (K, M).
    shape = lr.shape
    while shape and shape[-1] == 1:
        shape = shape[:-1]
    lead = w.shape[: len(shape)]
    if len(shape) > w.ndim or any(n not in (1, k) for n, k in zip(shape, lead, strict=True)):
        raise ValueError(
            f"{name}: learning_rate of shape {lr.shape} does not broadcast over the leading axes "
            f"of w {w.shape}"
        )
    return lr.reshape(shape + (1,) * (w.ndim - len(shape))).astype(dtype, copy=False)


def sgd(w: np.ndarray, dw: np.ndarray, state: dict | None = None, *, inplace=False, scratch=None):
    """Vanilla stochastic gradient descent ``w - learning_rate * dw``.

    Parameters
    ----------
    w, dw : (..., *shape) parameters and their gradient.
    state : ``learning_rate`` (default 1e-2).
    inplace, scratch : see the module docstring.

    Returns
    -------
    w : new array like w (same dtype), or w itself when `inplace`; state : new dict (or `state`).
    """
    defaults = {"learning_rate": 1e-2}
    if inplace:
        (step, _), lr = _prepare_inplace("sgd", w, dw, state, defaults, scratch, ())
        np.multiply(lr, dw, out=step)
        w -= step
        return w, state
    state, _, dw, lr = _prepare("sgd", w, dw, state, defaults)
    return (w - lr * dw).astype(w.dtype, copy=False), state


def sgd_momentum(
    w: np.ndarray, dw: np.ndarray, state: dict | None = None, *, inplace=False, scratch=None
):
    """SGD with momentum: ``v = momentum * v - learning_rate * dw; w = w + v``.

    Parameters
    ----------
    w, dw : (..., *shape) parameters and their gradient.
    state : ``learning_rate`` (1e-2), ``momentum`` (0.9), ``velocity`` (zeros like w).
    inplace, scratch : see the module docstring.

    Returns
    -------
    w : new array like w (same dtype), or w itself when `inplace`; state : new dict with the new
        velocity (or `state`, its velocity updated in place).
    """
    name = "sgd_momentum"
    defaults = {"learning_rate": 1e-2, "momentum": 0.9}
    if inplace:
        (step, _), lr = _prepare_inplace(name, w, dw, state, defaults, scratch, ("velocity",))
        velocity = state["velocity"]
        velocity *= float(state["momentum"])
        np.multiply(lr, dw, out=step)
        velocity -= step
        w += velocity
        return w, state
    state, dtype, dw, lr = _prepare(name, w, dw, state, defaults)
    velocity = state.get("velocity")
    if velocity is None:
        velocity = np.zeros(w.shape, dtype=dtype)
    elif velocity.shape != w.shape:
        raise ValueError(f"{name}: velocity has shape {velocity.shape}, w has shape {w.shape}")
    velocity = float(state["momentum"]) * velocity - lr * dw
    state["velocity"] = velocity
    return (w + velocity).astype(w.dtype, copy=False), state


def adam(w: np.ndarray, dw: np.ndarray, state: dict | None = None, *, inplace=False, scratch=None):
    """Adam (Kingma & Ba 2015) with bias correction; t is incremented before use.

    ``m = b1*m + (1-b1)*dw; mt = m/(1-b1**t); v = b2*v + (1-b2)*dw**2; vt = v/(1-b2**t);
    w = w - learning_rate * mt / (sqrt(vt) + epsilon)``, in this order (the CS231n formulas).

    Parameters
    ----------
    w, dw : (..., *shape) parameters and their gradient.
    state : ``learning_rate`` (1e-3), ``beta1`` (0.9), ``beta2`` (0.999), ``epsilon`` (1e-8),
        ``m`` and ``v`` (zeros like w), ``t`` (0).
    inplace, scratch : see the module docstring.

    Returns
    -------
    w : new array like w (same dtype), or w itself when `inplace`; state : new dict with the new
        moments and t (or `state`, its moments updated in place).
    """
    name = "adam"
    defaults = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8, "t": 0}
    if inplace:
        return _adam_inplace(w, dw, state, defaults, scratch)
    state, dtype, dw, lr = _prepare(name, w, dw, state, defaults)
    beta1, beta2, eps = float(state["beta1"]), float(state["beta2"]), float(state["epsilon"])
    m, v = state.get("m"), state.get("v")
    m = np.zeros(w.shape, dtype=dtype) if m is None else m
    v = np.zeros(w.shape, dtype=dtype) if v is None else v
    if m.shape != w.shape or v.shape != w.shape:
        raise ValueError(f"{name}: m {m.shape} and v {v.shape} must have w's shape {w.shape}")
    t = int(state["t"]) + 1
    # The reference formulas, evaluated in the same order (so the same bits) but in place on
    # fresh arrays: this runs on every parameter of every network at every step.
    m = beta1 * m
    m += (1 - beta1) * dw
    v = beta2 * v
    v += (1 - beta2) * (dw * dw)
    step = m / (1 - beta1**t)  # mt
    step *= lr
    denom = v / (1 - beta2**t)  # vt
    np.sqrt(denom, out=denom)
    denom += eps
    step /= denom
    new_w = w - step
    state.update(m=m, v=v, t=t)
    return new_w.astype(w.dtype, copy=False), state


def _adam_inplace(w, dw, state, defaults, scratch):
    """`adam` with inplace=True: the default path's operations, in its order, into buffers."""
    (a, b), lr = _prepare_inplace("adam", w, dw, state, defaults, scratch, ("m", "v"))
    beta1, beta2, eps = float(state["beta1"]), float(state["beta2"]), float(state["epsilon"])
    m, v = state["m"], state["v"]
    t = int(state["t"]) + 1
    state["t"] = t
    if fused.adam(w, dw, m, v, lr, beta1, beta2, eps, t):  # the same bits, in one pass
        return w, state
    m *= beta1
    np.multiply(1 - beta1, dw, out=a)
    m += a
    v *= beta2
    np.multiply(dw, dw, out=a)
    a *= 1 - beta2
    v += a
    np.divide(m, 1 - beta1**t, out=a)  # mt
    a *= lr
    np.divide(v, 1 - beta2**t, out=b)  # vt
    np.sqrt(b, out=b)
    b += eps
    a /= b
    w -= a
    return w, state


UPDATE_RULES = {"sgd": sgd, "sgd_momentum": sgd_momentum, "adam": adam}

#: The arrays each rule keeps in its state, of the parameter's shape (zeroed to reset a network).
STATE_ARRAYS = {"sgd": (), "sgd_momentum": ("velocity",), "adam": ("m", "v")}
