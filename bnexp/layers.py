"""Forward/backward pairs for the fully connected net.

Affine, ReLU, batch norm (staged and closed-form backward, population statistics), noisy batch
norm, layer norm, inverted dropout, softmax loss and the L2 penalty.

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

from bnexp import fused

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


def _check_norm_inputs(name: str, x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> None:
    """Shapes of a normalization layer: x (..., N, D), gamma and beta (..., D)."""
    _require_ndim(name, "x", x, 2, "(..., N, D)")
    _require_ndim(name, "gamma", gamma, 1, "(..., D)")
    _require_ndim(name, "beta", beta, 1, "(..., D)")
    D = x.shape[-1]
    if gamma.shape[-1] != D or beta.shape[-1] != D:
        raise ValueError(
            f"{name}: feature axis mismatch: x (..., N, D) {x.shape}, gamma {gamma.shape}, "
            f"beta {beta.shape}"
        )
    _leading(name, ("x", x, 2), ("gamma", gamma, 1), ("beta", beta, 1))


def _running_stats(name: str, bn_param: dict, x: np.ndarray):
    """bn_param's running mean and variance, (..., D) like x's networks; zeros when missing."""
    stat_shape = (*x.shape[:-2], x.shape[-1])
    stats = []
    for label in ("running_mean", "running_var"):
        r = bn_param.get(label)
        if r is None:
            r = np.zeros(stat_shape, dtype=x.dtype)
        if r.shape != stat_shape:  # one statistic per network and feature, no broadcasting
            raise ValueError(f"{name}: {label} has shape {r.shape}, x has shape {x.shape}")
        stats.append(r)
    return stats


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

    Where the compiled kernels are loaded (`bnexp.fused`) they compute it, with the same bits.

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
    out, cache, _ = _batchnorm(x, gamma, beta, bn_param, relu=False, inplace=False)
    return out, cache


def batchnorm_relu_forward(x, gamma, beta, bn_param: dict, inplace: bool = False):
    """:func:`batchnorm_forward` then :func:`relu_forward`, the same bits, fused into compiled
    passes when the kernels are loaded (`bnexp.fused`).

    Parameters
    ----------
    x, gamma, beta, bn_param : as for :func:`batchnorm_forward`.
    inplace : as for :func:`relu_forward`: the ReLU overwrites the batch-norm output.

    Returns
    -------
    h : (..., N, D) the ReLU's output.
    bn_cache : as from :func:`batchnorm_forward`.
    relu_cache : as from :func:`relu_forward`, the batch-norm output (h itself when `inplace`).
    """
    out, cache, h = _batchnorm(x, gamma, beta, bn_param, relu=True, inplace=inplace)
    return h, cache, out


def _batchnorm(x, gamma, beta, bn_param: dict, *, relu: bool, inplace: bool):
    """The work of :func:`batchnorm_forward` -> (out, cache, h), h = max(out, 0) when `relu`
    (out itself, overwritten, when `inplace`), else None; compiled where `bnexp.fused` can."""
    name = "batchnorm_forward"
    mode = bn_param.get("mode")
    if mode not in BN_MODES:
        raise ValueError(f"{name}: unknown mode {mode!r}; expected one of {', '.join(BN_MODES)}")
    _check_norm_inputs(name, x, gamma, beta)
    N = x.shape[-2]
    eps = float(bn_param.get("eps", 1e-5))
    momentum = float(bn_param.get("momentum", 0.9))
    running_mean, running_var = _running_stats(name, bn_param, x)

    if mode == "test":
        stats = running_mean, running_var
        compiled = fused.batchnorm_inference(
            x, gamma, beta, *stats, eps, relu=relu, inplace=inplace
        )
        if compiled:
            out, h = compiled
            return out, None, (h if relu else None)
        return _relu_after(_batchnorm_inference(x, gamma, beta, *stats, eps), None, relu, inplace)

    if N < 2:
        raise ValueError(
            f"{name}: mode {mode!r} needs N >= 2 examples per batch to estimate a variance, "
            f"got x of shape {x.shape}"
        )
    compiled = fused.batchnorm_batch(x, gamma, beta, eps, relu=relu, inplace=inplace)
    if compiled:
        out, h, stats = compiled
    else:
        stats = _batch_stats(x, eps)
        out = gamma[..., None, :] * stats["xhat"]
        out += beta[..., None, :]

    if mode == "train":
        mean, var = stats["mean"][..., 0, :], stats["var"][..., 0, :]
        bn_param["running_mean"] = momentum * running_mean + (1 - momentum) * mean
        bn_param["running_var"] = momentum * running_var + (1 - momentum) * var
    cache = {
        **stats,
        "eps": eps,
        "gamma": gamma,
        "beta_shape": beta.shape,
        "out_shape": out.shape,
    }
    if compiled:
        return out, cache, (h if relu else None)
    return _relu_after(out, cache, relu, inplace)


def _batch_stats(x: np.ndarray, eps: float) -> dict:
    """The staged forward's intermediates, every one the staged backward needs (nothing is
    recomputed): xmu, xhat like x (..., N, D); mean, var, std, inv_std (..., 1, D)."""
    mean = x.mean(axis=-2, keepdims=True)
    xmu = x - mean
    var = (xmu * xmu).mean(axis=-2, keepdims=True)  # biased: divide by N
    std = np.sqrt(var + eps)
    inv_std = 1 / std
    xhat = xmu * inv_std
    return {"xhat": xhat, "xmu": xmu, "mean": mean, "var": var, "std": std, "inv_std": inv_std}


def _relu_after(out: np.ndarray, cache, relu: bool, inplace: bool):
    """(out, cache, h) of `_batchnorm` on the NumPy path: the ReLU as its own pass."""
    return out, cache, (relu_forward(out, inplace=inplace)[0] if relu else None)


def _batchnorm_inference(x, gamma, beta, running_mean, running_var, eps: float) -> np.ndarray:
    """Test mode: a fixed affine map per feature from the running (or population) statistics."""
    # Same operations as (x - mean) / sqrt(var + eps) * gamma + beta, in place on one array.
    out = x - running_mean[..., None, :]
    out /= np.sqrt(running_var[..., None, :] + eps)
    out *= gamma[..., None, :]
    out += beta[..., None, :]
    return out


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
    compiled = fused.batchnorm_backward(dout, None, xhat, inv_std, gamma, cache["beta_shape"])
    if compiled:
        return compiled
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


def relu_batchnorm_backward(dout: np.ndarray, relu_cache, bn_cache):
    """Backward of :func:`batchnorm_relu_forward`: :func:`relu_backward` then
    :func:`batchnorm_backward_alt`, the same bits, in compiled passes when the kernels are loaded
    (`bnexp.fused`; the ReLU's gradient is then never stored).

    Parameters
    ----------
    dout : (..., N, D) upstream gradient of the ReLU's output.
    relu_cache, bn_cache : from :func:`batchnorm_relu_forward` in 'train' or 'batch' mode.

    Returns
    -------
    dx : (..., N, D); dgamma, dbeta : shaped like gamma and beta.
    """
    _bn_check("batchnorm_backward_alt", dout, bn_cache)
    xhat, inv_std, gamma = bn_cache["xhat"], bn_cache["inv_std"], bn_cache["gamma"]
    beta_shape = bn_cache["beta_shape"]
    compiled = fused.batchnorm_backward(dout, relu_cache, xhat, inv_std, gamma, beta_shape)
    return compiled or batchnorm_backward_alt(relu_backward(dout, relu_cache), bn_cache)


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
# noisy batch normalization
# ---------------------------------------------------------------------------------------------

NOISY_BN_STRENGTH = 1.0  # the recommended default of `sample_bn_noise`'s strength


def sample_bn_noise(
    rng: np.random.Generator, shape: tuple[int, ...], strength: float, dtype=np.float64
):
    """Draw one step's noise for :func:`noisy_batchnorm_forward`.

    Per unit (and per network), independently at every step::

        scale ~ Uniform(1, 1 + strength)        shift ~ Uniform(-strength, strength)

    so after the noise a unit's mean over the batch is ``scale * beta + shift`` (non-zero in
    general, even where beta = 0) and its standard deviation ``scale * |gamma|`` (above |gamma|),
    and both change from step to step: the per-unit, per-step random mean and non-unit variance
    of Santurkar et al. (2018), §2.1, here drawn from uniform distributions with one strength
    parameter. ``strength = 0`` gives scale 1 and shift 0, i.e. plain batch norm. The
    recommended default is ``NOISY_BN_STRENGTH`` = 1: at each step a unit's mean moves by up to
    one standard deviation of the normalised activation and its spread grows by a factor of up
    to 2.

    Parameters
    ----------
    rng : the generator of the run's plan (the only source of randomness).
    shape : (..., D), one value per network and unit.
    strength : >= 0.
    dtype : of the returned arrays (the layer's dtype, so float32 stays float32).

    Returns
    -------
    scale, shift : arrays of `shape`; scale is drawn first, then shift.
    """
    if not strength >= 0:  # also rejects NaN
        raise ValueError(f"sample_bn_noise: strength must be >= 0, got {strength}")
    s = float(strength)
    scale = 1.0 + s * rng.random(shape)
    shift = s * (2.0 * rng.random(shape) - 1.0)
    return scale.astype(dtype, copy=False), shift.astype(dtype, copy=False)


def noisy_batchnorm_forward(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, bn_param: dict, noise
):
    """Batch norm followed by a random per-unit scale and shift (Santurkar et al. 2018, §2.1).

    ``out = scale * batchnorm(x) + shift``: the noise moves and rescales every unit's output
    distribution at every step, so a network trained with it sees a changing input distribution
    (large "internal covariate shift") while keeping batch norm's normalisation. The noise is
    drawn by the caller, one draw per step, with :func:`sample_bn_noise` (its docstring gives the
    distribution and the strength parameter); the same draw applies to every example of the batch.

    Parameters
    ----------
    x : (..., N, D) inputs.
    gamma, beta : (..., D) scale and shift of the batch norm.
    bn_param : as for :func:`batchnorm_forward`; running statistics are those of batch norm (of
        x, before the noise), updated in 'train' mode.
    noise : (scale, shift), each (..., D), or None for no noise. Their leading axes must
        broadcast to those of the output; they are cast to the output's dtype. Not applied in
        'test' mode: the noise is a training-time perturbation, like dropout.

    Returns
    -------
    out : (..., N, D).
    cache : for :func:`noisy_batchnorm_backward`: the batch-norm cache (with its batch ``mean``
        and ``var``) plus the noise scale; None in 'test' mode.
    """
    out, cache = batchnorm_forward(x, gamma, beta, bn_param)
    if cache is None or noise is None:
        return out, (None if cache is None else {**cache, "noise_scale": None})
    scale, shift = _check_noise("noisy_batchnorm_forward", noise, out)
    out *= scale[..., None, :]  # out is a fresh array of the full (..., N, D) shape
    out += shift[..., None, :]
    return out, {**cache, "noise_scale": scale}


def _check_noise(name: str, noise, out: np.ndarray):
    """Validate (scale, shift) against the batch-norm output; return them in out's dtype."""
    try:
        scale, shift = (np.asarray(a) for a in noise)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: noise must be a pair (scale, shift) or None") from None
    D = out.shape[-1]
    for label, a in (("scale", scale), ("shift", shift)):
        if a.ndim < 1 or a.shape[-1] != D:
            raise ValueError(f"{name}: noise {label} must be (..., {D}), got shape {a.shape}")
        lead = _leading(name, ("out", out, 2), (label, a, 1))
        if lead != out.shape[:-2]:  # noise may not add networks the output does not have
            raise ValueError(
                f"{name}: noise {label} of shape {a.shape} adds leading axes to the output "
                f"{out.shape}"
            )
    return scale.astype(out.dtype, copy=False), shift.astype(out.dtype, copy=False)


def noisy_batchnorm_backward(dout: np.ndarray, cache):
    """Backward of :func:`noisy_batchnorm_forward`, the noise held constant.

    Parameters
    ----------
    dout : (..., N, D) upstream gradient.
    cache : from :func:`noisy_batchnorm_forward` in 'train' or 'batch' mode.

    Returns
    -------
    dx : (..., N, D); dgamma, dbeta : shaped like gamma and beta.
    """
    if cache is None:
        raise ValueError(
            "noisy_batchnorm_backward: no cache; the backward pass exists for 'train'/'batch' modes"
        )
    scale = cache["noise_scale"]
    # out = scale * bn + shift: the shift has no effect on gradients, the scale multiplies them.
    d_bn = dout if scale is None else dout * scale[..., None, :]
    return batchnorm_backward_alt(d_bn, cache)


# ---------------------------------------------------------------------------------------------
# layer normalization
# ---------------------------------------------------------------------------------------------


def layernorm_forward(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, ln_param: dict):
    """Layer normalization (Ba, Kiros & Hinton 2016): each example over its features.

    ``xhat = (x - mean) / sqrt(var + eps)`` with the mean and the biased variance taken over the
    feature axis -1 of each example, then ``out = gamma * xhat + beta``. No batch statistics, so
    no running averages: training and test behave the same, and any ``mode`` in ln_param is
    ignored (it is accepted so one param dict can serve every normalization).

    Parameters
    ----------
    x : (..., N, D) inputs, D >= 2.
    gamma, beta : (..., D) scale and shift (per feature, as in CS231n).
    ln_param : dict with ``eps`` (default 1e-5, inside the square root).

    Returns
    -------
    out : (..., N, D).
    cache : for :func:`layernorm_backward`.
    """
    name = "layernorm_forward"
    _check_norm_inputs(name, x, gamma, beta)
    if x.shape[-1] < 2:
        raise ValueError(
            f"{name}: needs D >= 2 features per example to estimate a variance, "
            f"got x of shape {x.shape}"
        )
    eps = float(ln_param.get("eps", 1e-5))
    mean = x.mean(axis=-1, keepdims=True)  # (..., N, 1)
    xmu = x - mean
    var = (xmu * xmu).mean(axis=-1, keepdims=True)  # biased: divide by D
    inv_std = 1 / np.sqrt(var + eps)
    xhat = xmu * inv_std
    out = gamma[..., None, :] * xhat
    out += beta[..., None, :]
    cache = {
        "xhat": xhat,
        "inv_std": inv_std,
        "gamma": gamma,
        "beta_shape": beta.shape,
        "out_shape": out.shape,
    }
    return out, cache


def layernorm_backward(dout: np.ndarray, cache):
    """Backward of :func:`layernorm_forward`, closed form.

    With ``g = dout * gamma`` and means over the feature axis of each example:
    ``dx = (g - mean(g) - xhat * mean(g * xhat)) / sqrt(var + eps)`` (batch norm's closed form
    with the roles of the two axes swapped).

    Parameters
    ----------
    dout : (..., N, D) upstream gradient.
    cache : from :func:`layernorm_forward`.

    Returns
    -------
    dx : like x; dgamma, dbeta : like gamma and beta (summed over N and broadcast axes).
    """
    if dout.shape != cache["out_shape"]:
        raise ValueError(
            f"layernorm_backward: dout has shape {dout.shape}, forward output had "
            f"{cache['out_shape']}"
        )
    xhat, inv_std, gamma = cache["xhat"], cache["inv_std"], cache["gamma"]
    dbeta = dout.sum(axis=-2)
    dgamma = (dout * xhat).sum(axis=-2)
    g = dout * gamma[..., None, :]
    dx = inv_std * (
        g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True)
    )
    return (
        _sum_to_shape(dx, xhat.shape),
        _sum_to_shape(dgamma, gamma.shape),
        _sum_to_shape(dbeta, cache["beta_shape"]),
    )


# ---------------------------------------------------------------------------------------------
# dropout
# ---------------------------------------------------------------------------------------------

DROPOUT_MODES = ("train", "test")


def dropout_forward(x: np.ndarray, dropout_param: dict):
    """Inverted dropout: keep each unit with probability p and scale the kept ones by 1/p.

    Scaling at training time keeps E[out] = x, so the test-time pass is the identity.

    Parameters
    ----------
    x : (..., N, D) activations.
    dropout_param : dict with keys
        ``p`` (required): probability of KEEPING a unit, in (0, 1]; a float, or an array of shape
        (...,) with one value per network of the stack (broadcast over N and D). p = 1 is off:
        the mask is all ones and the output equals x exactly.
        ``mode`` (required): 'train' or 'test' (test: out is x itself, no copy).
        ``mask`` (optional): bool or 0/1 array of x's shape, the units kept; it makes a step
        reproducible independently of how networks are stacked. It must keep every unit of a
        network whose p is 1.
        ``seed`` (optional): used when no mask is given, as ``np.random.default_rng(seed)``.
        In 'train' mode with some p < 1, a mask or a seed is required (no global randomness).

    Returns
    -------
    out : like x, in x's dtype.
    cache : for :func:`dropout_backward`.
    """
    name = "dropout_forward"
    mode = dropout_param.get("mode")
    if mode not in DROPOUT_MODES:
        raise ValueError(f"{name}: unknown mode {mode!r}; expected one of train, test")
    _require_ndim(name, "x", x, 2, "(..., N, D)")
    p = _keep_probabilities(name, dropout_param.get("p"), x)
    if mode == "test":
        return x, {"mode": mode, "multiplier": None, "shape": x.shape}
    mask = _dropout_mask(name, dropout_param, p, x)
    # One multiplier per unit, in x's dtype; 1/p is exactly 1 where p = 1, so out == x there.
    multiplier = mask * (1.0 / p).astype(x.dtype)[..., None, None]
    return x * multiplier, {"mode": mode, "multiplier": multiplier, "shape": x.shape}


def _keep_probabilities(name: str, p, x: np.ndarray) -> np.ndarray:
    """The keep probabilities as a float64 array of shape (...,), checked to lie in (0, 1]."""
    if p is None:
        raise ValueError(f"{name}: dropout_param needs 'p', the probability of keeping a unit")
    p = np.asarray(p, dtype=np.float64)
    lead = x.shape[:-2]
    try:
        fits = np.broadcast_shapes(p.shape, lead) == lead
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(
            f"{name}: p of shape {p.shape} must be a scalar or match the leading (network) "
            f"axes {lead} of x {x.shape}"
        )
    if not np.all((p > 0) & (p <= 1)):  # NaN fails too
        raise ValueError(f"{name}: p (keep probability) must be in (0, 1], got {p.min()}")
    return p


def _dropout_mask(name: str, dropout_param: dict, p: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The bool mask of kept units, x's shape: given, drawn from the seed, or all ones."""
    mask = dropout_param.get("mask")
    p_full = p[..., None, None]
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != x.shape:
            raise ValueError(f"{name}: mask has shape {mask.shape}, x has shape {x.shape}")
        if mask.dtype != bool:
            if not np.all((mask == 0) | (mask == 1)):
                raise ValueError(f"{name}: mask must be bool or hold only 0 and 1")
            mask = mask != 0
        if not np.all(mask | (p_full < 1)):
            raise ValueError(f"{name}: mask drops units of a network whose p is 1 (dropout off)")
        return mask
    if np.all(p == 1):
        return np.ones(x.shape, dtype=bool)
    if dropout_param.get("seed") is None:
        raise ValueError(f"{name}: 'train' mode with p < 1 needs a 'mask' or a 'seed'")
    # random() is in [0, 1), so a unit with p = 1 is always kept.
    return np.random.default_rng(dropout_param["seed"]).random(x.shape) < p_full


def dropout_backward(dout: np.ndarray, cache) -> np.ndarray:
    """Backward of :func:`dropout_forward`; dout like x -> dx like x (the mask and 1/p applied)."""
    if dout.shape != cache["shape"]:
        raise ValueError(f"dropout_backward: dout has shape {dout.shape}, x had {cache['shape']}")
    if cache["mode"] == "test":
        return dout
    return dout * cache["multiplier"]


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
