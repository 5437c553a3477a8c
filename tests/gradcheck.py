"""Centred finite differences in float64, the independent reference for every backward pass."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numerical_gradient(
    f: Callable[[np.ndarray], np.ndarray], x: np.ndarray, dout: np.ndarray, h: float = 1e-5
) -> np.ndarray:
    """Gradient of ``sum(f(x) * dout)`` with respect to x by centred differences.

    Parameters
    ----------
    f : function of x returning an array (or scalar) shaped like dout; it must read x afresh on
        every call, since x is perturbed in place (and restored before returning).
    x : float64 array of any shape.
    dout : upstream gradient shaped like f(x); use a random one, never all ones, or errors that
        cancel in the sum (like a missing mean term in batch norm) go unnoticed.
    h : step; the error is O(h**2) truncation plus O(machine eps / h) rounding.

    Returns
    -------
    grad : like x.
    """
    if x.dtype != np.float64:
        raise ValueError(f"numerical_gradient: x must be float64, got {x.dtype}")
    grad = np.zeros_like(x)
    flat_x = x.reshape(-1)  # a view: perturbing it perturbs x
    flat_g = grad.reshape(-1)
    for i in range(flat_x.size):
        old = flat_x[i]
        flat_x[i] = old + h
        plus = np.array(f(x), dtype=np.float64, copy=True)
        flat_x[i] = old - h
        minus = np.array(f(x), dtype=np.float64, copy=True)
        flat_x[i] = old
        flat_g[i] = np.sum((plus - minus) * dout) / (2 * h)
    return grad


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest elementwise relative error ``|a - b| / max(1e-8, |a| + |b|)`` (CS231n's measure)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(1e-8, np.abs(a) + np.abs(b))))
