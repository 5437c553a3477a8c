"""Probes inside a stack of networks: per-layer statistics, internal covariate shift, smoothness.

The training loop calls these functions at its probe steps with the group's state and stores the
plain records they return (one dict per network and layer, or per network). They read the
parameters and never write them, and batch normalisation runs in ``mode="batch"`` (the batch's own
statistics, running averages untouched), so probing cannot change the training trajectory.

Layout: the *stacked* one of `bnexp.model` with a leading network axis K on every array:
``W{l}`` (K, din, dout), ``b{l}`` (K, dout), ``gamma{l}``/``beta{l}`` (K, dout) with batch norm.
Inputs ``X`` are (N, D) shared by the K networks or (K, N, D) one batch per network; labels
``y`` (N,) or (K, N). Every computation runs once for the whole stack.

Losses and gradients are those of the mean softmax loss of the batch without the L2 penalty (its
gradient ``reg * W`` is known in closed form and says nothing about the network's inside).

The first layer is handled through the Gram matrix ``X X^T`` (N, N) of the batch, so that nothing
but the one forward product ``X @ W1`` ever touches the 3,072 input features:

- ``||dL/dW1||^2 = ||X^T dA1||^2 = sum(dA1 * (X X^T dA1))``, with dA1 (K, N, H1) the gradient of
  the first affine output;
- moving W1 along its gradient moves the first affine output linearly:
  ``X (W1 - eta X^T dA1) + (b1 - eta db1) = A1 - eta (X X^T dA1 + db1)``.

The Gram matrix and these quadratic forms are formed in float64, so they are at least as accurate
as the float32 products they replace.

The records (definitions after Santurkar, Tsipras, Ilyas and Madry, 2018, "How Does Batch
Normalization Help Optimization?"):

- `layer_stats`: per network and hidden layer, the distribution of the pre-activation (the ReLU's
  input, after normalisation when there is one; the paper's Figure 1 shows its 15/50/85
  percentiles), the dead-unit fraction, the gradient norms and the relative size of the last
  update.
- `ics`: internal covariate shift, the paper's Definition 2.1.
- `landscape`: the loss and the gradient along the gradient direction (the paper's Section 3.1,
  Figure 4: loss landscape, gradient predictiveness, effective beta-smoothness).
- `minibatch_probes`: `ics` and `landscape` of the same step with their common gradient pass done
  once (what a training loop with both probes on should call).

Noisy batch norm is probed with its noise in `ics` and `landscape` (they measure a training step)
and without it in `layer_stats` (a fixed probe batch, like evaluation). The probes' noise comes
from a stream of their own (`probe_generator`), never from training's, so training draws the same
numbers with probes on or off.

`ProbeSettings` and `probe_iterations` say which probes a training loop runs and when
(`bnexp.train` calls them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bnexp import layers, model
from bnexp.model import NetSpec

#: Percentiles of the pre-activation recorded by `layer_stats` (act_p15, act_p50, act_p85).
PERCENTILES = (15, 50, 85)

#: Step sizes of `landscape`, as multiples of each network's learning rate: one per decade from
#: the learning rate itself to 1000 times it. Santurkar et al. move along the gradient over a range
#: of step sizes and report the spread of the loss and the largest change of the gradient. The
#: steps here are plain gradient steps ``eta * g``, while Adam (the default rule) moves every
#: weight by about the learning rate whatever its gradient: for the default nets (about 170,000
#: parameters each) a training step has length about ``400 * learning_rate``, which ``eta * ||g||``
#: reaches within this range for gradient norms of 0.4 and more. Measured on CIFAR-10 at
#: initialisation, the loss of the default nets moves visibly only from about 10 times the rate.
DEFAULT_FACTORS = (1.0, 10.0, 100.0, 1000.0)


# --- normalisation: the one place that knows which layer follows each hidden affine layer -----


def norm_kind(spec: NetSpec) -> str:
    """Normalisation of the hidden layers: ``spec.normalization`` if the spec names one, else
    'batchnorm' or 'none' from ``spec.batchnorm``."""
    name = getattr(spec, "normalization", None)
    if name is not None:
        return str(name)
    return "batchnorm" if spec.batchnorm else "none"


def _norm_forward(kind: str, a: np.ndarray, params: dict, layer: int, eps: float, noise=None):
    """Normalise the affine output a (K, N, H) of hidden `layer` -> (z like a, cache).

    Batch norm (plain or noisy) uses the batch's statistics and updates no running statistics.
    noise: noisy batch norm's (scale, shift) of this layer, each (K, H), as a training step
    applies them (`bnexp.model.draw_step`), or None: the network without its noise. Dropout is
    never applied: the probes measure the network the masks perturb (as evaluation does).
    """
    if kind == "none":
        return a, None
    if kind not in ("batchnorm", "noisy_batchnorm", "layernorm"):
        raise ValueError(f"probes: unknown normalization {kind!r}")
    gamma, beta = params[f"gamma{layer}"], params[f"beta{layer}"]
    if kind == "layernorm":
        return layers.layernorm_forward(a, gamma, beta, {})  # its eps, as bnexp.model
    bn_param = {"mode": "batch", "eps": eps}
    if kind == "noisy_batchnorm":
        return layers.noisy_batchnorm_forward(a, gamma, beta, bn_param, noise)
    return layers.batchnorm_forward(a, gamma, beta, bn_param)


def _norm_backward(kind: str, dz: np.ndarray, cache, layer: int):
    """Backward of `_norm_forward` -> (da like dz, dict of the layer's normalisation grads)."""
    if kind == "none":
        return dz, {}
    if kind == "layernorm":
        da, dgamma, dbeta = layers.layernorm_backward(dz, cache)
    elif kind == "noisy_batchnorm":  # the noise scale multiplies the gradient (held constant)
        da, dgamma, dbeta = layers.noisy_batchnorm_backward(dz, cache)
    else:
        da, dgamma, dbeta = layers.batchnorm_backward_alt(dz, cache)
    return da, {f"gamma{layer}": dgamma, f"beta{layer}": dbeta}


# --- the network, layer by layer --------------------------------------------------------------


class _Batch:
    """A batch X (N, D) or (K, N, D) in the parameters' dtype, with its float64 Gram X X^T."""

    def __init__(self, X: np.ndarray, dtype: np.dtype):
        self.X = np.asarray(X).astype(dtype, copy=False)
        x64 = np.asarray(X, dtype=np.float64)
        self.gram = x64 @ np.swapaxes(x64, -1, -2)  # (..., N, N)

    def first(self, params: dict) -> np.ndarray:
        """First affine output X @ W1 + b1 -> (K, N, H1)."""
        return layers.affine_forward(self.X, params["W1"], params["b1"])[0]

    def gram_times(self, d: np.ndarray) -> np.ndarray:
        """X X^T d, i.e. X @ (X^T d) for d (K, N, H1) -> (K, N, H1) float64."""
        return self.gram @ d.astype(np.float64)

    def w1_sq_norm(self, d: np.ndarray) -> np.ndarray:
        """||X^T d||^2 per network (K,) float64: the squared norm of the W1 gradient for dA1 = d."""
        d64 = d.astype(np.float64)
        return np.maximum((d64 * (self.gram @ d64)).sum(axis=(-2, -1)), 0.0)


def _forward(
    spec: NetSpec, params: dict, inp: np.ndarray, y, eps: float, start: int = 1, noise=None
):
    """Layers start..L+1 of the stack in training arithmetic (batch statistics).

    inp: the first affine output A1 (K, N, H1) when start == 1, else the hidden output
    h_{start-1} (K, N, H) that feeds affine layer `start`. noise: noisy batch norm's
    (scale, shift) per hidden layer (`bnexp.model.StepDraws.noise`), or None for none.

    Returns loss (K,), dscores (K, N, C) and the tape: per layer from `start`, a tuple
    (affine cache or None for the precomputed A1, normalisation cache, pre-activation z or None).
    """
    kind = norm_kind(spec)
    tape = []
    h = inp
    for layer in range(start, spec.num_layers + 1):
        if layer == 1:
            a, affine_cache = inp, None
        else:
            a, affine_cache = layers.affine_forward(h, params[f"W{layer}"], params[f"b{layer}"])
        if layer == spec.num_layers:
            tape.append((affine_cache, None, None))
            loss, dscores = layers.softmax_loss(a, y)
            return loss, dscores, tape
        layer_noise = None if noise is None else noise[layer - 1]
        z, norm_cache = _norm_forward(kind, a, params, layer, eps, layer_noise)
        h = np.maximum(z, 0)
        tape.append((affine_cache, norm_cache, z))
    raise AssertionError("unreachable")  # pragma: no cover


def _backward(spec: NetSpec, dscores: np.ndarray, tape: list, start: int = 1):
    """Backward of `_forward` down to layer `start`.

    Returns grads (every parameter of layers start..L+1 except W1, whose gradient is X^T dA1),
    dz {layer: dL/dz (K, N, H)} per hidden layer, and dA1 (K, N, H1) when start == 1 (else None).
    """
    kind = norm_kind(spec)
    grads, dz, da1 = {}, {}, None
    dout = dscores
    for layer in range(spec.num_layers, start - 1, -1):
        affine_cache, norm_cache, z = tape[layer - start]
        if layer < spec.num_layers:
            dout = layers.relu_backward(dout, z)
            dz[layer] = dout
            dout, norm_grads = _norm_backward(kind, dout, norm_cache, layer)
            grads.update(norm_grads)
        if affine_cache is None:
            da1 = dout
            grads["b1"] = dout.sum(axis=-2)
        else:
            dout, grads[f"W{layer}"], grads[f"b{layer}"] = layers.affine_backward(
                dout, affine_cache, need_dx=layer > start
            )
    return grads, dz, da1


def _gradients(
    spec: NetSpec, params: dict, batch: _Batch, a1: np.ndarray, y, eps: float, noise=None
):
    """Loss (K,), grads (all but W1), dz per hidden layer, dA1 and the tape at a1 = batch A1."""
    loss, dscores, tape = _forward(spec, params, a1, y, eps, noise=noise)
    grads, dz, da1 = _backward(spec, dscores, tape)
    return loss, grads, dz, da1, tape


@dataclass(frozen=True)
class _Point:
    """A stack evaluated on a batch: its parameters, A1 (K, N, H1), losses (K,), gradients, and
    the noise of noisy batch norm it was evaluated with (None: none)."""

    params: dict
    batch: _Batch
    a1: np.ndarray
    loss: np.ndarray
    grads: dict
    da1: np.ndarray
    noise: list | None = None


def _evaluate(spec: NetSpec, params: dict, X, y, eps: float, name: str, noise=None) -> _Point:
    """Check the layout, then the loss and gradients of every network on (X, y)."""
    _check(spec, params, name)
    batch = _Batch(X, params["W1"].dtype)
    a1 = batch.first(params)
    loss, grads, _, da1, _ = _gradients(spec, params, batch, a1, y, eps, noise)
    return _Point(params, batch, a1, loss, grads, da1, noise)


# --- small helpers ----------------------------------------------------------------------------


def _num(x) -> float | None:
    """A JSON-friendly number: Python float, None when not finite."""
    x = float(x)
    return x if math.isfinite(x) else None


def _norm(a: np.ndarray) -> np.ndarray:
    """Frobenius norm per network of a (K, ...) array -> (K,) float64 (float64 accumulation)."""
    flat = a.reshape(a.shape[0], -1)
    return np.sqrt(np.square(flat).sum(axis=-1, dtype=np.float64))


def _sq_dist(grads: dict, other: dict, keys) -> np.ndarray:
    """Sum over keys of squared distances per network (K,) float64."""
    return sum(_norm(grads[key].astype(np.float64) - other[key]) ** 2 for key in keys)


def _check(spec: NetSpec, params: dict, name: str) -> int:
    """Networks K of a stacked params dict; ValueError for the wide or an unstacked layout."""
    w1 = params.get("W1")
    if w1 is None or w1.ndim != 3 or w1.shape[1:] != (spec.input_dim, _width(spec, 1)):
        shape = None if w1 is None else w1.shape
        raise ValueError(
            f"{name}: needs the stacked layout W1 (K, {spec.input_dim}, {_width(spec, 1)}), got "
            f"{shape}; convert a wide W1 with model.from_wide"
        )
    return w1.shape[0]


def _width(spec: NetSpec, layer: int) -> int:
    """Output width of affine `layer` (1-based)."""
    return (*spec.hidden_dims, spec.num_classes)[layer - 1]


def _quiet(fn):
    """Run a probe with NumPy's overflow/invalid warnings off: a diverging network's inf and NaN
    are expected there and end up as None in its records."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)

    return wrapper


# --- the probes -------------------------------------------------------------------------------


@_quiet
def layer_stats(
    spec: NetSpec,
    params: dict,
    X_probe: np.ndarray,
    y_probe: np.ndarray,
    bn_eps: float,
    prev_params: dict | None = None,
) -> list[dict]:
    """Activation and gradient statistics of every hidden layer of every network on a probe batch.

    Parameters
    ----------
    spec : NetSpec
    params : stacked parameters, ``W{l}`` (K, din, dout); read only.
    X_probe : (N, D) or (K, N, D) probe examples; y_probe : (N,) or (K, N) labels.
    bn_eps : eps of the normalisation (inside the square root).
    prev_params : the parameters before the last update (same layout), or None.

    Returns
    -------
    One dict per (network, hidden layer), network-major, with ``net`` (0-based), ``layer``
    (1-based) and, over the N probe examples and H units of the layer's pre-activation z (the ReLU
    input, after normalisation when there is one): ``act_p15``/``act_p50``/``act_p85``
    (percentiles of its N*H values), ``act_mean``, ``act_std``; ``dead_frac`` (fraction of units
    with z <= 0, so ReLU output 0, for every example); ``grad_w_norm`` (Frobenius norm of dL/dW_l
    of the mean probe-batch loss), ``grad_act_norm`` (Frobenius norm of dL/dz over (N, H), which
    scales as 1/sqrt(N) with the batch size), ``update_ratio`` (||W_l - prev W_l|| / ||prev W_l||,
    None without prev_params). Non-finite values are None.
    """
    k = _check(spec, params, "layer_stats")
    batch = _Batch(X_probe, params["W1"].dtype)
    _, grads, dz, da1, tape = _gradients(spec, params, batch, batch.first(params), y_probe, bn_eps)
    records = []
    for layer in range(1, spec.num_layers):
        z = tape[layer - 1][2]  # (K, N, H)
        stats = _activation_stats(z)
        grad_w = np.sqrt(batch.w1_sq_norm(da1)) if layer == 1 else _norm(grads[f"W{layer}"])
        stats["grad_w_norm"] = grad_w
        stats["grad_act_norm"] = _norm(dz[layer])
        if prev_params is not None:
            old = prev_params[f"W{layer}"]
            stats["update_ratio"] = _norm(params[f"W{layer}"] - old) / _norm(old)
        for net in range(k):
            record = {"net": net, "layer": layer}
            record.update({name: _num(v[net]) for name, v in stats.items()})
            record.setdefault("update_ratio", None)
            records.append(record)
    records.sort(key=lambda r: (r["net"], r["layer"]))
    return records


def _percentiles(flat: np.ndarray) -> list[np.ndarray]:
    """`PERCENTILES` of each row of flat (K, M) -> list of (K,) float64, NaN for a row with NaN.

    Same values as ``np.percentile`` (linear interpolation between order statistics); a full sort
    (SIMD in NumPy 2) is several times faster than percentile's partition on these sizes.
    """
    ordered = np.sort(flat, axis=-1)
    has_nan = np.isnan(ordered[:, -1])  # the sort puts NaN last
    out = []
    for p in PERCENTILES:
        pos = p / 100 * (flat.shape[-1] - 1)
        lo, frac = int(pos), pos - int(pos)
        hi = min(lo + 1, flat.shape[-1] - 1)
        low = ordered[:, lo].astype(np.float64)
        value = low + frac * (ordered[:, hi] - low)
        out.append(np.where(has_nan, np.nan, value))
    return out


def _activation_stats(z: np.ndarray) -> dict:
    """Per network (K,) statistics of a pre-activation z (K, N, H) over its N*H values."""
    flat = z.reshape(z.shape[0], -1)
    stats = {f"act_p{p}": v for p, v in zip(PERCENTILES, _percentiles(flat), strict=True)}
    stats["act_mean"] = flat.mean(axis=-1, dtype=np.float64)
    stats["act_std"] = flat.std(axis=-1, dtype=np.float64)
    # A unit is dead on the batch when its ReLU outputs 0 (z <= 0) for every example; NaN is not.
    stats["dead_frac"] = (z <= 0).all(axis=-2).mean(axis=-1)
    return stats


@_quiet
def ics(
    spec: NetSpec,
    params: dict,
    new_params: dict,
    X: np.ndarray,
    y: np.ndarray,
    bn_eps: float,
    noise=None,
    noise_after=None,
) -> list[dict]:
    """Internal covariate shift of every layer, Santurkar et al. (2018), Definition 2.1.

    For layer i and the step-t minibatch (X, y): G = dL/dW_i with every layer at its step-t value
    (`params`), G' = dL/dW_i after layers 1..i-1, and only those, took their step-t update (from
    `new_params`). A layer's parameters are its affine W and b and its normalisation's gamma and
    beta. For layer 1 nothing before it moves, so G' = G (ics_l2 0, ics_cos 1).

    Noisy batch norm: a layer's noise belongs to it like its parameters. G is taken with `noise`
    on every layer; for G' layers 1..i-1 carry `noise_after` (the draw of the step after, since
    the noise changes at every step as the parameters do) and layers i.. keep `noise`. Both None:
    the network without its noise; `noise_after` None: the same draw for both.

    Parameters
    ----------
    spec : NetSpec
    params, new_params : stacked parameters before and after the step-t update; read only.
    X : (N, D) or (K, N, D) the step-t minibatch; y : (N,) or (K, N) its labels.
    bn_eps : eps of the normalisation.
    noise, noise_after : noisy batch norm's (scale, shift) per hidden layer, each (K, H_l)
        (`bnexp.model.StepDraws.noise`), or None.

    Returns
    -------
    One dict per (network, affine layer 1..L+1), network-major: ``net``, ``layer``, ``ics_l2`` =
    ||G - G'|| (Frobenius), ``ics_cos`` = <G, G'> / (||G|| ||G'||); None when not finite.
    """
    _check(spec, new_params, "ics")
    point = _evaluate(spec, params, X, y, bn_eps, "ics", noise)
    return _ics(spec, point, new_params, y, bn_eps, noise_after)


def _ics(
    spec: NetSpec, point: _Point, new_params: dict, y, bn_eps: float, noise_after=None
) -> list[dict]:
    """`ics` from the evaluation at the step-t parameters (and noise)."""
    params, batch, grads, da1 = point.params, point.batch, point.grads, point.da1
    noise = point.noise
    after = noise if noise_after is None else noise_after
    k = params["W1"].shape[0]
    # One pass with every layer updated gives each layer's input with the layers before it updated.
    _, _, new_tape = _forward(spec, new_params, batch.first(new_params), y, bn_eps, noise=after)
    g1 = np.sqrt(batch.w1_sq_norm(da1))
    l2 = [np.where(np.isfinite(g1), 0.0, np.nan)]
    cos = [np.where(np.isfinite(g1) & (g1 > 0), 1.0, np.nan)]
    for layer in range(2, spec.num_layers + 1):
        h = np.maximum(new_tape[layer - 2][2], 0)  # output of layer - 1 after layers 1..layer-1
        _, dscores, tape = _forward(spec, params, h, y, bn_eps, start=layer, noise=noise)
        g = grads[f"W{layer}"].astype(np.float64).reshape(k, -1)
        g_new = _backward(spec, dscores, tape, start=layer)[0][f"W{layer}"]
        g_new = g_new.astype(np.float64).reshape(k, -1)
        l2.append(np.sqrt(((g - g_new) ** 2).sum(axis=-1)))
        cos.append((g * g_new).sum(axis=-1) / (_norm(g) * _norm(g_new)))
    return [
        {"net": net, "layer": i + 1, "ics_l2": _num(l2[i][net]), "ics_cos": _num(cos[i][net])}
        for net in range(k)
        for i in range(spec.num_layers)
    ]


@_quiet
def landscape(
    spec: NetSpec,
    params: dict,
    X: np.ndarray,
    y: np.ndarray,
    bn_eps: float,
    learning_rate,
    factors: Sequence[float] = DEFAULT_FACTORS,
    noise=None,
) -> list[dict]:
    """Loss and gradient along the gradient direction, Santurkar et al. (2018), Section 3.1.

    With g the gradient of the minibatch loss L at the step-t parameters W (every parameter: W, b,
    gamma, beta of every layer), for each step size eta = factor * learning_rate (per network):
    the loss L(W - eta g) (loss landscape), the gradient predictiveness ||grad L(W) - grad L(W -
    eta g)||, and the effective beta-smoothness max over eta > 0 of that difference / ||eta g||.
    See `DEFAULT_FACTORS` for the choice of step sizes.

    Parameters
    ----------
    spec : NetSpec
    params : stacked parameters at step t; read only.
    X : (N, D) or (K, N, D) the step-t minibatch; y : (N,) or (K, N) its labels.
    bn_eps : eps of the normalisation.
    learning_rate : (K,) or scalar, each network's learning rate at step t.
    factors : step sizes as multiples of the learning rate (>= 0).
    noise : noisy batch norm's (scale, shift) per hidden layer, the same at every step size (the
        loss the step's noise defines), or None.

    Returns
    -------
    One dict per network: ``net``, ``loss`` (L(W)), ``grad_norm`` (||g||), ``etas``, ``losses``
    and ``grad_diffs`` (one per factor), ``loss_min``/``loss_max`` over the etas,
    ``beta_smoothness``. Non-finite numbers are None (also in the lists).
    """
    point = _evaluate(spec, params, X, y, bn_eps, "landscape", noise)
    return _landscape(spec, point, y, bn_eps, learning_rate, factors)


def _landscape(spec: NetSpec, point: _Point, y, bn_eps: float, learning_rate, factors):
    """`landscape` from the evaluation at the step-t parameters."""
    params, batch, grads, da1 = point.params, point.batch, point.grads, point.da1
    k, dtype = params["W1"].shape[0], params["W1"].dtype
    lr = np.broadcast_to(np.asarray(learning_rate, dtype=np.float64), (k,))
    keys = list(grads)  # every parameter but W1 (that one goes through dA1)
    grad_norm = np.sqrt(sum(_norm(g) ** 2 for g in grads.values()) + batch.w1_sq_norm(da1))
    a1_dir = batch.gram_times(da1) + grads["b1"][..., None, :]  # how A1 moves per unit of eta
    etas, losses, diffs = [], [], []
    for factor in factors:
        eta = factor * lr  # (K,)
        moved = {
            key: params[key] - eta.astype(dtype).reshape(-1, *[1] * (g.ndim - 1)) * g
            for key, g in grads.items()
        }
        moved_a1 = (point.a1 - eta[:, None, None] * a1_dir).astype(dtype)
        loss_e, grads_e, _, da1_e, _ = _gradients(
            spec, moved, batch, moved_a1, y, bn_eps, point.noise
        )
        diff_sq = _sq_dist(grads, grads_e, keys) + batch.w1_sq_norm(da1.astype(np.float64) - da1_e)
        etas.append(eta)
        losses.append(loss_e.astype(np.float64))
        diffs.append(np.sqrt(diff_sq))
    return [_landscape_record(net, point.loss, grad_norm, etas, losses, diffs) for net in range(k)]


@_quiet
def minibatch_probes(
    spec: NetSpec,
    params: dict,
    new_params: dict,
    X: np.ndarray,
    y: np.ndarray,
    bn_eps: float,
    learning_rate,
    factors: Sequence[float] = DEFAULT_FACTORS,
    noise=None,
    noise_after=None,
) -> tuple[list[dict], list[dict]]:
    """`ics` and `landscape` of one step together: (ics records, landscape records).

    The same records as the two calls, with the loss and gradients at the step-t parameters
    computed once for both (the arguments are those of `ics` and `landscape`).
    """
    _check(spec, new_params, "minibatch_probes")
    point = _evaluate(spec, params, X, y, bn_eps, "minibatch_probes", noise)
    ics_records = _ics(spec, point, new_params, y, bn_eps, noise_after)
    return ics_records, _landscape(spec, point, y, bn_eps, learning_rate, factors)


def _landscape_record(net, loss, grad_norm, etas, losses, diffs) -> dict:
    """One network's landscape record from per-factor lists of (K,) arrays."""
    e = np.array([eta[net] for eta in etas])
    ls = np.array([v[net] for v in losses])
    d = np.array([v[net] for v in diffs])
    finite = ls[np.isfinite(ls)]
    steps = e * grad_norm[net]
    ratios = d[steps > 0] / steps[steps > 0]
    # Beta is None as soon as one ratio is not finite: a max over the finite ones would hide the
    # step that blew up.
    beta = ratios.max() if ratios.size and np.isfinite(ratios).all() else np.nan
    return {
        "net": net,
        "loss": _num(loss[net]),
        "grad_norm": _num(grad_norm[net]),
        "etas": [_num(v) for v in e],
        "losses": [_num(v) for v in ls],
        "grad_diffs": [_num(v) for v in d],
        "loss_min": _num(finite.min()) if finite.size else None,
        "loss_max": _num(finite.max()) if finite.size else None,
        "beta_smoothness": _num(beta),
    }


# --- the probes' own random numbers ------------------------------------------------------------

#: Spawn key of the probes' stream under a run's seed: ``SeedSequence(seed, spawn_key=(3,))``.
#: Training uses children 0 (weights), 1 (minibatches) and (2, 0), (2, 1) (dropout, noise; see
#: `bnexp.plan`), so the probes' draws are independent of training's and take none of its numbers.
PROBE_SPAWN_KEY = (3,)


def probe_generator(seed: int) -> np.random.Generator:
    """A fresh generator of a run's probe stream (the same numbers for the same seed)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=PROBE_SPAWN_KEY))


def probe_noise(spec: NetSpec, rngs: Sequence, strength, dtype) -> list | None:
    """One draw of noisy batch norm's noise for K networks, as a training step draws it.

    rngs: per network its `probe_generator`; strength: (K,) noise strengths. Returns the
    (scale, shift) pair per hidden layer, each (K, H_l) (`bnexp.model.StepDraws.noise`), or None
    when the net has no noisy batch norm (then nothing is drawn).
    """
    if spec.normalization != "noisy_batchnorm":
        return None
    draws = model.draw_step(spec, 1, dtype, None, strength, [(None, r) for r in rngs])
    return draws.noise


# --- when a training loop probes --------------------------------------------------------------


@dataclass(frozen=True)
class ProbeSettings:
    """Which probes a training loop runs, and when (the config's ``probes`` section).

    every : probe after 0 updates, every `every` updates and at the last iteration (> 0).
    batch_size : the probe batch of `layer_stats` is the first this-many training images.
    ics, landscape : also run `ics` / `landscape` on the minibatch of each probed iteration.
    """

    every: int
    batch_size: int = 200
    ics: bool = False
    landscape: bool = False


def probe_iterations(num_iterations: int, every: int) -> list[int]:
    """Probed iterations of a run of `num_iterations` updates: 0, every, 2*every, ... and the last.

    Iteration p is probed with the parameters after p updates, before update p (0-based), so the
    last one, ``num_iterations - 1``, is the last iteration that has a minibatch and an update.
    """
    if every < 1:
        raise ValueError(f"probe_iterations: every must be >= 1, got {every}")
    return sorted({*range(0, num_iterations, every), max(num_iterations - 1, 0)})
