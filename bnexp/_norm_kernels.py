"""The compiled batch-norm (+ ReLU) kernels behind `bnexp.fused` (importing this module imports
numba).

Each kernel evaluates the NumPy formulas of `bnexp.layers` element by element, in their order and
dtype, so its results are the same bits (IEEE arithmetic: no fastmath, hence no reassociation and
no fused multiply-add). Arrays are the (B, N, D) view of (..., N, D) with B = prod(...), and the
per-feature arrays are (B, D), all C-contiguous and of one dtype; the scalars are of that dtype.

Sums over the batch axis add the rows in order into an accumulator that starts at +0, as NumPy's
``sum(axis=-2)`` does on a C-contiguous array with D >= 2 (`bnexp.fused` hands over no other
layout; the tests check the claim), and a mean is that sum divided by N.

One module-level function per kernel, so that numba's on-disk cache finds each one again in the
next process; the ReLU is an argument, not another function, since every cached function costs
load time at start-up. The ReLU is np.maximum(o, 0): NaN stays NaN, and -0.0 gives +0.0.

`relu` selects what the forward kernels write: NO_RELU the batch-norm output into out; RELU_APART
that into out and max(out, 0) into h; RELU_IN_PLACE max(out, 0) only, into out (h unused). The
last is a mode of its own rather than h being out: two stores to one address would keep the
compiler from vectorizing the loop.

Scalars come in as arguments of the arrays' dtype (eps, 1, N): a Python number or an array size
in the arithmetic would turn a float32 expression into a float64 one and change its rounding.
"""

import numba
import numpy as np

NO_RELU, RELU_APART, RELU_IN_PLACE = 0, 1, 2


@numba.njit(inline="always")
def _store(out, h, k, i, j, o, relu, zero):  # pragma: no cover - compiled
    """Write a forward kernel's batch-norm output o at [k, i, j] as `relu` says (see above).
    Inlined into each kernel by numba, so the loops still vectorize."""
    if relu == RELU_IN_PLACE:
        out[k, i, j] = zero if o <= zero else o
    else:
        out[k, i, j] = o
        if relu == RELU_APART:
            h[k, i, j] = zero if o <= zero else o


@numba.njit(cache=True, error_model="numpy", nogil=True)
def batchnorm_inference(x, rm, rv, g, b, eps, out, h, relu):  # pragma: no cover - compiled
    """Test mode, `layers._batchnorm_inference`: out = (x - rm) / sqrt(rv + eps) * g + b.

    x, out, h : (B, N, D); rm, rv, g, b : (B, D); eps : scalar of x's dtype; relu : see above.
    """
    zero = eps - eps  # +0 in x's dtype
    scale = np.empty(x.shape[2], x.dtype)
    for k in range(x.shape[0]):
        for j in range(x.shape[2]):
            scale[j] = np.sqrt(rv[k, j] + eps)
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                o = (x[k, i, j] - rm[k, j]) / scale[j] * g[k, j] + b[k, j]
                _store(out, h, k, i, j, o, relu, zero)


@numba.njit(cache=True, error_model="numpy", nogil=True)
def batchnorm_batch(
    x, g, b, eps, one, n, xmu, xhat, out, h, relu, mean, var, std, inv_std
):  # pragma: no cover - compiled
    """Train/batch mode, the staged forward of `layers.batchnorm_forward` (batch statistics).

    x, xmu, xhat, out, h : (B, N, D); g, b : (B, D); eps, one, n (= N) : scalars of x's dtype.
    mean, var, std, inv_std : (B, D) outputs, the cache's (..., 1, D) entries; relu : see above.
    """
    zero = one - one
    for k in range(x.shape[0]):
        mean[k] = zero
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                mean[k, j] += x[k, i, j]
        for j in range(x.shape[2]):
            mean[k, j] = mean[k, j] / n
        var[k] = zero
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                d = x[k, i, j] - mean[k, j]
                xmu[k, i, j] = d
                var[k, j] += d * d
        for j in range(x.shape[2]):
            var[k, j] = var[k, j] / n
            std[k, j] = np.sqrt(var[k, j] + eps)
            inv_std[k, j] = one / std[k, j]
        for i in range(x.shape[1]):
            for j in range(x.shape[2]):
                xh = xmu[k, i, j] * inv_std[k, j]
                xhat[k, i, j] = xh
                o = g[k, j] * xh + b[k, j]
                _store(out, h, k, i, j, o, relu, zero)


@numba.njit(cache=True, error_model="numpy", nogil=True)
def batchnorm_backward(
    dout, a, xhat, inv_std, g, one, n, relu, dx, dgamma, dbeta
):  # pragma: no cover - compiled
    """`layers.batchnorm_backward_alt`, after `layers.relu_backward` when `relu`.

    dout, a, xhat, dx : (B, N, D), a the ReLU's input (unused without `relu`);
    inv_std, g : (B, D); one, n (= N) : scalars of dout's dtype; dgamma, dbeta : (B, D) outputs.
    The ReLU's gradient dout * (a > 0) is formed on the fly, never stored.
    """
    zero = one - one
    for k in range(dout.shape[0]):
        dbeta[k] = zero
        dgamma[k] = zero
        for i in range(dout.shape[1]):
            for j in range(dout.shape[2]):
                d = dout[k, i, j] * (one if a[k, i, j] > zero else zero) if relu else dout[k, i, j]
                dbeta[k, j] += d
                dgamma[k, j] += d * xhat[k, i, j]
        for i in range(dout.shape[1]):
            for j in range(dout.shape[2]):
                d = dout[k, i, j] * (one if a[k, i, j] > zero else zero) if relu else dout[k, i, j]
                scale = g[k, j] * inv_std[k, j]
                dx[k, i, j] = scale * (d - dbeta[k, j] / n - xhat[k, i, j] * (dgamma[k, j] / n))
