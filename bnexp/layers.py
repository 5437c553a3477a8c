"""Forward/backward pairs for the fully connected net: affine, relu, batch norm, softmax loss, L2.

Every array is shaped ``(..., N, D)``: the leading axes ``...`` index independent networks trained
in lockstep, ``N`` is the minibatch and ``D`` the features. Reductions run over the batch axis -2
(or the feature/class axis -1) only, so no value ever crosses from one network to another and a
diverged network cannot poison its neighbours. A parameter without leading axes (for example
``gamma`` of shape ``(D,)``) is shared by all networks; its gradient is summed over them.

Dtypes are preserved: float32 in gives float32 out. Scalars (eps, momentum, reg) are kept as Python
floats on purpose, because NumPy 2 treats Python floats as "weak" and keeps float32 arithmetic in
float32, whereas a NumPy float64 scalar would silently upcast.

Each ``*_forward`` returns ``(out, cache)`` and the matching ``*_backward`` takes ``(dout, cache)``.
"""

from __future__ import annotations

import numpy as np

BN_MODES = ("train", "test", "batch")


def _leading(name: str, *arrays: tuple[str, np.ndarray, int]) -> tuple[int, ...]:
    """Broadcast the leading (network) axes of arrays given as (label, array, core_ndim)."""
    try:
        return np.broadcast_shapes(*(a.shape[: a.ndim - core] for _, a, core in arrays))
    except ValueError:
        shapes = ", ".join(f"{label} {a.shape}" for label, a, _ in arrays)
        raise ValueError(f"{name}: leading (network) axes do not broadcast: {shapes}") from None


def _sum_to_shape(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum a gradient over the axes that were broadcast, so it takes the parameter's shape."""
    if a.shape == shape:
        return a
    extra = a.ndim - len(shape)
    if extra:
        a = a.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    if axes:
        a = a.sum(axis=axes, keepdims=True)
    return a


def _require_ndim(name: str, label: str, a: np.ndarray, ndim: int, layout: str) -> None:
    """Raise a ValueError when an array has fewer axes than its layout needs."""
    if a.ndim < ndim:
        raise ValueError(f"{name}: {label} must be {layout}, got shape {a.shape}")


# ---------------------------------------------------------------------------------------------
# affine
# ---------------------------------------------------------------------------------------------


def affine_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray):
    """Affine layer ``out = x @ w + b``.

    Parameters
    ----------
    x : (..., N, D) inputs.
    w : (..., D, M) weights.
    b : (..., M) biases.

    Returns
    -------
    out : (..., N, M), leading axes broadcast from x, w and b.
    cache : (x, w, b) for :func:`affine_backward`.
    """
    name = "affine_forward"
    _require_ndim(name, "x", x, 2, "(..., N, D)")
    _require_ndim(name, "w", w, 2, "(..., D, M)")
    _require_ndim(name, "b", b, 1, "(..., M)")
    if x.shape[-1] != w.shape[-2] or b.shape[-1] != w.shape[-1]:
        raise ValueError(
            f"{name}: shape mismatch: x (..., N, D) {x.shape}, w (..., D, M) {w.shape}, "
            f"b (..., M) {b.shape}"
        )
    _leading(name, ("x", x, 2), ("w", w, 2), ("b", b, 1))
    out = x @ w
    out += b[..., None, :]  # in place: out is a fresh array, saves one (..., N, M) allocation
    return out, (x, w, b)


def affine_backward(dout: np.ndarray, cache, need_dx: bool = True):
    """Backward pass of :func:`affine_forward`.

    Parameters
    ----------
    dout : (..., N, M) upstream gradient.
    cache : from :func:`affine_forward`.
    need_dx : False skips dx (the first layer's input gradient is never used).

    Returns
    -------
    dx : (..., N, D) like x, or None when ``need_dx`` is False.
    dw : like w, summed over N and over any leading axes that w was broadcast along.
    db : like b, likewise.
    """
    x, w, b = cache
    lead = np.broadcast_shapes(x.shape[:-2], w.shape[:-2], b.shape[:-1])
    expected = (*lead, x.shape[-2], w.shape[-1])
    if dout.shape != expected:
        raise ValueError(
            f"affine_backward: dout has shape {dout.shape}, expected {expected} "
            f"(x {x.shape}, w {w.shape})"
        )
    dx = _sum_to_shape(dout @ np.swapaxes(w, -1, -2), x.shape) if need_dx else None
    dw = _sum_to_shape(np.swapaxes(x, -1, -2) @ dout, w.shape)
    db = _sum_to_shape(dout.sum(axis=-2), b.shape)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# relu
# ---------------------------------------------------------------------------------------------


def relu_forward(x: np.ndarray, inplace: bool = False):
    """Rectified linear unit ``max(x, 0)``; x: (..., N, D) -> out like x, cache (no copy).

    inplace: overwrite x with the output (saves an allocation when x is a temporary); the cache
    is then the output, which is positive exactly where x was, so the backward pass is the same.
    """
    # np.maximum propagates NaN, so a diverged network stays visibly diverged.
    if inplace:
        return np.maximum(x, 0, out=x), x
    return np.maximum(x, 0), x


def relu_backward(dout: np.ndarray, cache) -> np.ndarray:
    """Backward of :func:`relu_forward`; dout like x -> dx like x (zero where x <= 0)."""
    x = cache
    if dout.shape != x.shape:
        raise ValueError(f"relu_backward: dout has shape {dout.shape}, x has shape {x.shape}")
    return dout * (x > 0)


# ---------------------------------------------------------------------------------------------
# batch normalization
# ---------------------------------------------------------------------------------------------


def batchnorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, bn_param: dict):
    """Batch normalization (Ioffe & Szegedy 2015, Algorithm 1), per feature over the batch axis.

    Conventions (they differ between references, so they are fixed here):

    - Normalisation uses the *biased* batch variance ``mean((x - mean)**2)`` (divide by N), and
      ``eps`` goes inside the square root: ``xhat = (x - mean) / sqrt(var + eps)``.
    - Running averages: ``r = momentum * r + (1 - momentum) * batch_stat`` with momentum 0.9, i.e.
      momentum weights the *old* value (CS231n, Chainer). PyTorch's ``momentum=0.1`` weights the
      new value and means the same thing.
    - ``running_var`` stores the *biased* batch variance, as CS231n does. PyTorch stores the
      unbiased one (``N / (N - 1)`` times larger) in ``running_var``; the paper's Algorithm 2
      population estimate is :func:`batchnorm_population_stats`.
    - Initialising gamma = 1 and beta = 0 is the model's job, not this function's.

    Parameters
    ----------
    x : (..., N, D) inputs.
    gamma, beta : (..., D) scale and shift.
    bn_param : dict with keys
        ``mode`` (required): 'train' (batch stats, update running stats), 'batch' (batch stats,
        running stats untouched) or 'test' (running stats);
        ``eps`` (default 1e-5), ``momentum`` (default 0.9);
        ``running_mean``, ``running_var``: (..., D); created as zeros of x's dtype when missing.
        In 'train' mode the updated running arrays are stored back as new arrays (never written
        in place, so a caller holding the old arrays keeps them).

    Returns
    -------
    out : (..., N, D).
    cache : for :func:`batchnorm_backward` / :func:`batchnorm_backward_alt` (train/batch modes;
        None in test mode). Its ``mean`` and ``var`` entries, shaped (..., 1, D), are the batch
        statistics, the inputs of :func:`batchnorm_population_stats`.

    Raises
    ------
    ValueError : unknown mode, shape mismatch, or N < 2 in train/batch mode (the batch variance
        of a single example is 0 and the normalised output carries no signal).
    """
    name = "batchnorm_forward"
    mode = bn_param.get("mode")
    if mode not in BN_MODES:
        raise ValueError(f"{name}: unknown mode {mode!r}; expected one of {', '.join(BN_MODES)}")
    _require_ndim(name, "x", x, 2, "(..., N, D)")
    _require_ndim(name, "gamma", gamma, 1, "(..., D)")
    _require_ndim(name, "beta", beta, 1, "(..., D)")
    N, D = x.shape[-2:]
    if gamma.shape[-1] != D or beta.shape[-1] != D:
        raise ValueError(
            f"{name}: feature axis mismatch: x (..., N, D) {x.shape}, gamma {gamma.shape}, "
            f"beta {beta.shape}"
        )
    _leading(name, ("x", x, 2), ("gamma", gamma, 1), ("beta", beta, 1))
    eps = float(bn_param.get("eps", 1e-5))
    momentum = float(bn_param.get("momentum", 0.9))
    stat_shape = (*x.shape[:-2], D)
    running_mean = bn_param.get("running_mean")
    running_var = bn_param.get("running_var")
    if running_mean is None:
        running_mean = np.zeros(stat_shape, dtype=x.dtype)
    if running_var is None:
        running_var = np.zeros(stat_shape, dtype=x.dtype)
    for label, r in (("running_mean", running_mean), ("running_var", running_var)):
        if r.shape != stat_shape:  # one statistic per network and feature, no broadcasting
            raise ValueError(f"{name}: {label} has shape {r.shape}, x has shape {x.shape}")

    g = gamma[..., None, :]
    if mode == "test":
        # Inference: a fixed affine map per feature, from the running (or population) stats.
        # Same operations as (x - mean) / sqrt(var + eps) * gamma + beta, in place on one array.
        out = x - running_mean[..., None, :]
        out /= np.sqrt(running_var[..., None, :] + eps)
        out *= g
        out += beta[..., None, :]
        return out, None

    if N < 2:
        raise ValueError(
            f"{name}: mode {mode!r} needs N >= 2 examples per batch to estimate a variance, "
            f"got x of shape {x.shape}"
        )
    # Staged forward; every intermediate the staged backward needs is kept, nothing recomputed.
    mean = x.mean(axis=-2, keepdims=True)  # (..., 1, D)
    xmu = x - mean
    var = (xmu * xmu).mean(axis=-2, keepdims=True)  # biased: divide by N
    std = np.sqrt(var + eps)
    inv_std = 1 / std
    xhat = xmu * inv_std
    out = g * xhat
    out += beta[..., None, :]

    if mode == "train":
        bn_param["running_mean"] = momentum * running_mean + (1 - momentum) * mean[..., 0, :]
        bn_param["running_var"] = momentum * running_var + (1 - momentum) * var[..., 0, :]
    cache = {
        "xhat": xhat,
        "xmu": xmu,
        "mean": mean,
        "var": var,
        "std": std,
        "inv_std": inv_std,
        "eps": eps,
        "gamma": gamma,
        "beta_shape": beta.shape,
        "out_shape": out.shape,
    }
    return out, cache


def _bn_check(name: str, dout: np.ndarray, cache) -> None:
    """Reject a test-mode cache and a dout whose shape differs from the forward output."""
    if cache is None:
        raise ValueError(f"{name}: no cache; the backward pass exists for 'train'/'batch' modes")
    if dout.shape != cache["out_shape"]:
        raise ValueError(
            f"{name}: dout has shape {dout.shape}, forward output had {cache['out_shape']}"
        )


def batchnorm_backward(dout: np.ndarray, cache):
    """Backward of :func:`batchnorm_forward` through the staged computational graph.

    Follows the paper's derivation stage by stage (dbeta, dgamma, dxhat, dvar, dmean, dx), with the
    batch mean and variance as graph nodes; :func:`batchnorm_backward_alt` is the closed form.

    Parameters
    ----------
    dout : (..., N, D) upstream gradient.
    cache : from :func:`batchnorm_forward` in 'train' or 'batch' mode.

    Returns
    -------
    dx : (..., N, D); dgamma, dbeta : shaped like gamma and beta.
    """
    _bn_check("batchnorm_backward", dout, cache)
    xhat, xmu, var, eps, gamma = (cache[k] for k in ("xhat", "xmu", "var", "eps", "gamma"))
    N = dout.shape[-2]
    # out = gamma * xhat + beta
    dbeta = dout.sum(axis=-2)
    dgamma = (dout * xhat).sum(axis=-2)
    dxhat = dout * gamma[..., None, :]
    # xhat = (x - mean) * (var + eps)**-1/2
    dvar = (dxhat * xmu).sum(axis=-2, keepdims=True) * -0.5 * (var + eps) ** -1.5
    # mean enters xhat directly and through var = mean((x - mean)**2); the second path is
    # dvar * mean(-2 (x - mean)), zero in exact arithmetic, kept because it is in the graph.
    dmean = (dxhat * -cache["inv_std"]).sum(axis=-2, keepdims=True) + dvar * (-2 * xmu).mean(
        axis=-2, keepdims=True
    )
    # x enters xhat, var and mean.
    dx = dxhat * cache["inv_std"] + dvar * 2 * xmu / N + dmean / N
    return (
        _sum_to_shape(dx, xhat.shape),
        _sum_to_shape(dgamma, gamma.shape),
        _sum_to_shape(dbeta, cache["beta_shape"]),
    )


def batchnorm_backward_alt(dout: np.ndarray, cache):
    """Closed-form backward of :func:`batchnorm_forward` (same values as the staged form).

    ``dx = gamma / (N * sigma) * (N * dout - sum(dout) - xhat * sum(dout * xhat))`` with sums over
    the batch axis and ``sigma = sqrt(var + eps)``.

    Parameters
    ----------
    dout : (..., N, D) upstream gradient.
    cache : from :func:`batchnorm_forward` in 'train' or 'batch' mode.

    Returns
    -------
    dx : (..., N, D); dgamma, dbeta : shaped like gamma and beta.
    """
    _bn_check("batchnorm_backward_alt", dout, cache)
    xhat, inv_std, gamma = cache["xhat"], cache["inv_std"], cache["gamma"]
    N = dout.shape[-2]
    dbeta = dout.sum(axis=-2)
    dgamma = (dout * xhat).sum(axis=-2)
    # The two sums are dbeta and dgamma, so the closed form reuses them.
    dx = (gamma[..., None, :] * inv_std) * (
        dout - (dbeta / N)[..., None, :] - xhat * (dgamma / N)[..., None, :]
    )
    return (
        _sum_to_shape(dx, xhat.shape),
        _sum_to_shape(dgamma, gamma.shape),
        _sum_to_shape(dbeta, cache["beta_shape"]),
    )


def batchnorm_population_stats(batch_means: np.ndarray, batch_vars: np.ndarray, batch_size: int):
    """Population statistics for inference, the paper's Algorithm 2 (steps 8-10).

    ``E[x] = mean of batch means``, ``Var[x] = m / (m - 1) * mean of batch variances``, where m is
    the batch size and the batch variances are the biased ones used for normalising.

    Parameters
    ----------
    batch_means, batch_vars : (B, ..., D) per-batch statistics of B training minibatches.
    batch_size : m, the number of examples in each minibatch (m >= 2).

    Returns
    -------
    mean, var : (..., D), usable as ``running_mean`` / ``running_var`` in test mode.
    """
    name = "batchnorm_population_stats"
    if batch_means.shape != batch_vars.shape or batch_means.ndim < 2:
        raise ValueError(
            f"{name}: batch_means {batch_means.shape} and batch_vars {batch_vars.shape} must "
            "both be (B, ..., D)"
        )
    if batch_size < 2:
        raise ValueError(
            f"{name}: batch_size must be >= 2 for the unbiased factor, got {batch_size}"
        )
    m = int(batch_size)
    return batch_means.mean(axis=0), m / (m - 1) * batch_vars.mean(axis=0)


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------


def softmax_loss(scores: np.ndarray, y: np.ndarray):
    """Softmax cross-entropy, mean over the batch, computed with log-sum-exp.

    Shifting by the per-row maximum keeps every exponent <= 0 (no overflow) and the normaliser
    >= 1 (no log(0)), so the loss is finite for any finite scores whose true loss is representable.

    Parameters
    ----------
    scores : (..., N, C) class scores.
    y : (N,) or (..., N) integer labels in [0, C).

    Returns
    -------
    loss : (...) mean loss per network (a NumPy scalar without leading axes).
    dscores : (..., N, C) gradient of each network's loss.
    """
    name = "softmax_loss"
    _require_ndim(name, "scores", scores, 2, "(..., N, C)")
    y = np.asarray(y)
    N, C = scores.shape[-2:]
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}: y must hold integer labels, got dtype {y.dtype}")
    try:
        y = np.broadcast_to(y, scores.shape[:-1])
    except ValueError:
        raise ValueError(
            f"{name}: y of shape {y.shape} does not match scores (..., N, C) {scores.shape}"
        ) from None
    if y.size and (y.min() < 0 or y.max() >= C):
        raise ValueError(f"{name}: labels must be in [0, {C}), got [{y.min()}, {y.max()}]")
    shifted = scores - scores.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    idx = y[..., None]
    loss = -np.take_along_axis(log_probs, idx, axis=-1)[..., 0].mean(axis=-1)
    dscores = np.exp(log_probs)
    np.put_along_axis(dscores, idx, np.take_along_axis(dscores, idx, axis=-1) - 1, axis=-1)
    dscores /= N
    return loss, dscores


def l2_penalty(w: np.ndarray, reg: float):
    """L2 weight penalty ``0.5 * reg * sum(w**2)`` per network.

    Parameters
    ----------
    w : (..., D, M) weights.
    reg : regularisation strength (a Python float, so float32 weights stay float32).

    Returns
    -------
    loss : (...) penalty per network, summed over the last two axes.
    dw : like w, ``reg * w``.
    """
    _require_ndim("l2_penalty", "w", w, 2, "(..., D, M)")
    reg = float(reg)
    return 0.5 * reg * (w * w).sum(axis=(-2, -1)), reg * w
