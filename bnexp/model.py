"""The fully connected net ``{affine - [norm] - relu - [dropout]} x L - affine - softmax``, for
stacks of nets.

``norm`` is one of `NORMALIZATIONS`, picked by name with the ReLU after it in `_normalize_relu` /
`_relu_normalize_backward` (the only place that knows the layers; plain batch norm is called
together with its ReLU so that the compiled kernels can fuse the two); dropout is inverted dropout
after each ReLU, in training steps only.

Parameters live in a dict with keys ``W1, b1, gamma1, beta1, ..., W{L+1}, b{L+1}`` (gamma/beta only
with a normalization). A *stack* of K networks of one architecture has a leading axis K on every
array: ``W{l}`` (K, din, dout), ``b{l}``, ``gamma{l}``, ``beta{l}`` (K, dout); a single network may
omit it. The layers (`bnexp.layers`) reduce over the batch axis only, so the K networks never mix.

The first layer has a second, *wide* layout for lockstep training on a shared minibatch: ``W1`` as
(input_dim, K * H1), the K weight matrices side by side (`to_wide`), so the whole stack's first
layer is one large matrix product ``X (N, input_dim) @ W1 (input_dim, K * H1)``, and its weight
gradient another one, ``X.T @ dA1``. The functions below recognise it from the shapes (`is_wide`:
a 2-D ``W1`` with a stacked (K, H1) ``b1``); every other array keeps the stacked layout. The
gradient with respect to the input images is never computed.

Batch-norm state (running mean/variance, momentum, eps) is a list of `bn_param` dicts, one per
hidden layer, as in CS231n; its conventions are documented in `bnexp.layers.batchnorm_forward`.
Layer norm has no state (train and test behave the same). Noisy batch norm is batch norm plus a
per-unit, per-step random scale and shift in training steps (`bnexp.layers.sample_bn_noise`).

The random numbers of a training step (dropout masks, batch-norm noise) come in as a `StepDraws`
made by `draw_step` from each network's own generators, so a network's draws do not depend on the
other networks of its stack.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnexp import layers

#: Parameter dtypes a net can be stored and trained in.
DTYPES = ("float32", "float64")

#: Normalizations between a hidden affine layer and its ReLU.
NORMALIZATIONS = ("none", "batchnorm", "layernorm", "noisy_batchnorm")
#: The ones that normalize with batch statistics (they keep running statistics).
BATCH_STAT_NORMALIZATIONS = ("batchnorm", "noisy_batchnorm")
#: Default strength of noisy batch norm's noise (see `bnexp.layers.sample_bn_noise`).
NOISY_BN_STRENGTH = layers.NOISY_BN_STRENGTH


@dataclass(frozen=True)
class NetSpec:
    """Architecture of a fully connected net.

    Attributes
    ----------
    input_dim : int
        Features per example (3,072 for flattened CIFAR-10).
    hidden_dims : tuple of int
        Widths of the L hidden layers, e.g. ``(50,) * 7``.
    num_classes : int
        Output classes (10).
    batchnorm : bool
        Whether the net normalizes with batch statistics (has running statistics). Given alone,
        True means ``normalization='batchnorm'`` and False ``'none'`` (the original spelling);
        with `normalization` given it is derived from it.
    normalization : str
        One of `NORMALIZATIONS`, between every hidden affine layer and its ReLU; '' (default)
        means from `batchnorm`.
    """

    input_dim: int
    hidden_dims: tuple[int, ...]
    num_classes: int
    batchnorm: bool = False
    normalization: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_dims", tuple(int(h) for h in self.hidden_dims))
        norm = self.normalization or ("batchnorm" if self.batchnorm else "none")
        if norm not in NORMALIZATIONS:
            raise ValueError(
                f"NetSpec: unknown normalization {norm!r}; use one of {NORMALIZATIONS}"
            )
        object.__setattr__(self, "normalization", norm)
        object.__setattr__(self, "batchnorm", norm in BATCH_STAT_NORMALIZATIONS)
        dims = (self.input_dim, *self.hidden_dims, self.num_classes)
        if any(int(d) < 1 for d in dims):
            raise ValueError(f"NetSpec: every layer width must be >= 1, got {dims}")

    @property
    def num_layers(self) -> int:
        """Affine layers, L + 1."""
        return len(self.hidden_dims) + 1


def weight_shapes(spec: NetSpec) -> list[tuple[int, int]]:
    """(din, dout) of every affine layer's weight matrix, in layer order."""
    dims = (spec.input_dim, *spec.hidden_dims, spec.num_classes)
    return [(dims[i], dims[i + 1]) for i in range(len(dims) - 1)]


def param_names(spec: NetSpec) -> list[str]:
    """Parameter keys in layer order: W1, b1, [gamma1, beta1,] ..., W{L+1}, b{L+1}."""
    names = []
    for layer in range(1, spec.num_layers + 1):
        names += [f"W{layer}", f"b{layer}"]
        if spec.normalization != "none" and layer < spec.num_layers:
            names += [f"gamma{layer}", f"beta{layer}"]
    return names


def init_params(spec: NetSpec, normals: list[np.ndarray], weight_scales, dtype) -> dict:
    """Initial parameters of one network or a stack: W = weight_scale * normals, b = 0, gamma = 1.

    Parameters
    ----------
    spec : NetSpec
    normals : list of np.ndarray
        Per layer, float64 standard normals of shape (..., din, dout), e.g. `RunPlan.normals`, or
        the K plans' normals stacked to (K, din, dout).
    weight_scales : float or array of shape (...)
        Standard deviation of the weights, one per network of the stack.
    dtype : numpy dtype
        Storage dtype. The product is formed in float64 and then rounded, as the reference rounds
        ``weight_scale * np.random.randn(...)`` to float32.

    Returns
    -------
    dict
        ``W{l}`` (..., din, dout), ``b{l}`` (..., dout) zeros, ``gamma{l}`` (..., dout) ones and
        ``beta{l}`` (..., dout) zeros, all of `dtype`.
    """
    shapes = weight_shapes(spec)
    if len(normals) != len(shapes):
        raise ValueError(f"init_params: {len(normals)} normal arrays for {len(shapes)} layers")
    scales = np.asarray(weight_scales, dtype=np.float64)
    lead = normals[0].shape[:-2]
    if scales.shape not in ((), lead):
        raise ValueError(
            f"init_params: weight_scales of shape {scales.shape} must be scalar or {lead}"
        )
    params = {}
    for layer, (shape, z) in enumerate(zip(shapes, normals, strict=True), start=1):
        if z.shape != (*lead, *shape):
            raise ValueError(
                f"init_params: normals for W{layer} have shape {z.shape}, "
                f"expected {(*lead, *shape)}"
            )
        params[f"W{layer}"] = (scales[..., None, None] * z).astype(dtype)
        params[f"b{layer}"] = np.zeros((*lead, shape[1]), dtype=dtype)
        if spec.normalization != "none" and layer < spec.num_layers:
            params[f"gamma{layer}"] = np.ones((*lead, shape[1]), dtype=dtype)
            params[f"beta{layer}"] = np.zeros((*lead, shape[1]), dtype=dtype)
    return params


def init_bn_params(
    spec: NetSpec, lead: tuple[int, ...], dtype, eps: float = 1e-5, momentum: float = 0.9
) -> list[dict]:
    """One `bn_param` dict per hidden layer (empty list unless the normalization uses batch
    statistics); running stats zeros.

    lead: leading (network) axes, e.g. (K,); running_mean/var have shape (*lead, H_l).
    """
    if not spec.batchnorm:
        return []
    return [
        {
            "mode": "train",
            "eps": eps,
            "momentum": momentum,
            "running_mean": np.zeros((*lead, h), dtype=dtype),
            "running_var": np.zeros((*lead, h), dtype=dtype),
        }
        for h in spec.hidden_dims
    ]


def to_wide(w1: np.ndarray) -> np.ndarray:
    """Stacked first-layer weights (K, D, H) -> wide (D, K*H); network k is columns k*H:(k+1)*H."""
    k, d, h = w1.shape
    return np.ascontiguousarray(w1.transpose(1, 0, 2)).reshape(d, k * h)


def from_wide(w1: np.ndarray, k: int) -> np.ndarray:
    """Wide first-layer weights (D, K * H) -> stacked (K, D, H) (a copy)."""
    d, kh = w1.shape
    if kh % k:
        raise ValueError(f"from_wide: {kh} columns do not split into {k} networks")
    return np.ascontiguousarray(w1.reshape(d, k, kh // k).transpose(1, 0, 2))


def is_wide(params: dict) -> bool:
    """Whether params hold a stack's first layer in the wide layout: W1 (D, K*H), b1 (K, H)."""
    return params["W1"].ndim == 2 and params["b1"].ndim == 2


@dataclass(frozen=True)
class _WideCache:
    """The first layer's affine cache in the wide layout (tells `backward` to un-widen)."""

    cache: tuple


def _first_layer(params: dict, X: np.ndarray):
    """First affine layer in either layout -> (out (..., N, H1) stacked, cache)."""
    if not is_wide(params):
        return layers.affine_forward(X, params["W1"], params["b1"])
    b1 = params["b1"]
    if X.ndim != 2 or b1.ndim != 2:
        raise ValueError(
            "wide first layer needs a shared X (N, D) and b1 (K, H), "
            f"got X {X.shape}, b1 {b1.shape}"
        )
    k, h = b1.shape
    out, cache = layers.affine_forward(X, params["W1"], b1.reshape(k * h))
    # (N, K*H) -> (K, N, H): one copy of the activations so the later layers see contiguous stacks.
    return np.ascontiguousarray(out.reshape(X.shape[0], k, h).transpose(1, 0, 2)), _WideCache(cache)


@dataclass(frozen=True)
class StepDraws:
    """The random numbers of one training step of a stack of K networks (see `draw_step`).

    dropout : per hidden layer a `dropout_param` in 'train' mode (``p`` (K,) keep probabilities,
        ``mask`` (K, N, H_l) bool), or None without dropout.
    noise : per hidden layer the noisy batch norm's (scale, shift), each (K, H_l), or None.
    """

    dropout: list[dict] | None = None
    noise: list[tuple[np.ndarray, np.ndarray]] | None = None


def _split(a: np.ndarray, spec: NetSpec) -> list[np.ndarray]:
    """(..., sum(H)) -> one (..., H_l) view per hidden layer."""
    return np.split(a, np.cumsum(spec.hidden_dims)[:-1], axis=-1)


def needs_draws(spec: NetSpec, keep) -> bool:
    """Whether training steps draw random numbers: dropout (`keep` (K,) not None) or noisy batch
    norm."""
    return keep is not None or spec.normalization == "noisy_batchnorm"


def draw_step(
    spec: NetSpec, batch_size: int, dtype, keep=None, strength=None, rngs=()
) -> StepDraws | None:
    """Draw one training step's dropout masks and batch-norm noise for K networks.

    Parameters
    ----------
    spec : the stack's architecture; noise is drawn only for noisy batch norm.
    batch_size : N, examples per minibatch.
    dtype : of the noise arrays (the compute dtype).
    keep : (K,) keep probabilities, or None when dropout is off for every network.
    strength : (K,) noise strengths (used with noisy batch norm only).
    rngs : per network a (dropout, noise) pair of `numpy.random.Generator`. Network k draws only
        from its own pair, one array per step for all its layers (masks: uniforms (N, sum(H)),
        kept where below its p), so its draws do not depend on the other networks.

    Returns
    -------
    StepDraws, or None when the step needs no random numbers (no per-step work).
    """
    if not needs_draws(spec, keep):
        return None
    noisy = spec.normalization == "noisy_batchnorm"
    dropout = noise = None
    width = sum(spec.hidden_dims)
    if keep is not None:
        keep = np.asarray(keep, dtype=np.float64)
        u = np.stack([d.random((batch_size, width)) for d, _ in rngs])  # (K, N, sum(H))
        masks = _split(u < keep[:, None, None], spec)
        dropout = [{"mode": "train", "p": keep, "mask": m} for m in masks]
    if noisy:
        pairs = [
            layers.sample_bn_noise(n, (width,), s, dtype)
            for (_, n), s in zip(rngs, strength, strict=True)
        ]
        scales = _split(np.stack([sc for sc, _ in pairs]), spec)
        shifts = _split(np.stack([sh for _, sh in pairs]), spec)
        noise = list(zip(scales, shifts, strict=True))
    return StepDraws(dropout=dropout, noise=noise)


def _normalize_relu(spec, layer, a, params, bn_params, bn_mode, draws, inplace: bool):
    """The normalization of hidden layer `layer` (1-based), by name, then the ReLU (in place on
    the normalized array when `inplace`) -> (h, norm_cache, relu_cache). Plain batch norm takes
    both in one call, which the compiled kernels (`bnexp.fused`) fuse."""
    kind = spec.normalization
    out, norm_cache = a, None
    gamma, beta = params.get(f"gamma{layer}"), params.get(f"beta{layer}")
    if kind == "layernorm":
        out, norm_cache = layers.layernorm_forward(a, gamma, beta, {})
    elif kind in BATCH_STAT_NORMALIZATIONS:
        bn_param = bn_params[layer - 1]
        bn_param["mode"] = bn_mode
        if kind == "batchnorm":
            return layers.batchnorm_relu_forward(a, gamma, beta, bn_param, inplace=inplace)
        # Noise only in training steps: evaluation and the population pass see plain batch norm.
        noise = draws.noise[layer - 1] if draws is not None and bn_mode == "train" else None
        out, norm_cache = layers.noisy_batchnorm_forward(a, gamma, beta, bn_param, noise)
    h, relu_cache = layers.relu_forward(out, inplace=inplace)
    return h, norm_cache, relu_cache


#: Backward pass of each normalization but plain batch norm (whose backward comes with its
#: ReLU's, `_relu_normalize_backward`) -> (dx, dgamma, dbeta).
_NORM_BACKWARD = {
    "layernorm": layers.layernorm_backward,
    "noisy_batchnorm": layers.noisy_batchnorm_backward,
}


def _relu_normalize_backward(spec, dout, relu_cache, norm_cache):
    """Backward of `_normalize_relu` -> (dx, dgamma, dbeta); the last two None without a
    normalization."""
    if spec.normalization == "batchnorm":
        return layers.relu_batchnorm_backward(dout, relu_cache, norm_cache)
    dout = layers.relu_backward(dout, relu_cache)
    if spec.normalization == "none":
        return dout, None, None
    return _NORM_BACKWARD[spec.normalization](dout, norm_cache)


def forward(
    spec: NetSpec,
    params: dict,
    X: np.ndarray,
    bn_params: list[dict],
    bn_mode: str,
    *,
    keep_caches: bool = True,
    draws: StepDraws | None = None,
):
    """Class scores of every network of the stack.

    Parameters
    ----------
    spec, params : architecture and parameters (stacked, ``W1`` possibly wide).
    X : (N, D) shared inputs, or (K, N, D) one minibatch per network (stacked layout only).
    bn_params : list of bn_param dicts (see `init_bn_params`); their ``mode`` is set to `bn_mode`
        ('train' updates running stats, 'batch' uses the batch's own stats, 'test' the running
        ones).
    keep_caches : False drops the caches as it goes (inference).
    draws : the training step's dropout masks and noise (`draw_step`); None means no dropout and
        no noise (evaluation).

    Returns
    -------
    scores : (..., N, C)
    caches : list of per-layer caches ``(affine, norm, relu, dropout)`` for `backward` (empty
        when not `keep_caches`); each hidden layer's batch-norm cache carries the batch
        ``mean``/``var`` (..., 1, H), its relu cache is the ReLU's input.
    """
    caches = []
    h = None
    for layer in range(1, spec.num_layers + 1):
        if layer == 1:
            a, affine_cache = _first_layer(params, X)
        else:
            a, affine_cache = layers.affine_forward(h, params[f"W{layer}"], params[f"b{layer}"])
        if layer == spec.num_layers:
            caches.append((affine_cache, None, None, None))
            return a, (caches if keep_caches else [])
        # Inference: the normalized array is a fresh temporary nobody keeps, so the ReLU
        # overwrites it.
        h, norm_cache, relu_cache = _normalize_relu(
            spec, layer, a, params, bn_params, bn_mode, draws, inplace=not keep_caches
        )
        dropout_cache = None
        if draws is not None and draws.dropout is not None:
            h, dropout_cache = layers.dropout_forward(h, draws.dropout[layer - 1])
        if keep_caches:
            caches.append((affine_cache, norm_cache, relu_cache, dropout_cache))
    raise AssertionError("unreachable")  # pragma: no cover


def backward(spec: NetSpec, dscores: np.ndarray, caches: list) -> dict:
    """Gradients of every parameter from the score gradient (..., N, C); no input gradient."""
    grads = {}
    dout = dscores
    for layer in range(spec.num_layers, 0, -1):
        affine_cache, norm_cache, relu_cache, dropout_cache = caches[layer - 1]
        if layer < spec.num_layers:
            if dropout_cache is not None:
                dout = layers.dropout_backward(dout, dropout_cache)
            dout, dgamma, dbeta = _relu_normalize_backward(spec, dout, relu_cache, norm_cache)
            if spec.normalization != "none":
                grads[f"gamma{layer}"], grads[f"beta{layer}"] = dgamma, dbeta
        if layer > 1:
            dout, grads[f"W{layer}"], grads[f"b{layer}"] = layers.affine_backward(
                dout, affine_cache
            )
        elif isinstance(affine_cache, _WideCache):
            k, n, h = dout.shape
            d_wide = dout.transpose(1, 0, 2).reshape(n, k * h)
            _, grads["W1"], db = layers.affine_backward(d_wide, affine_cache.cache, need_dx=False)
            grads["b1"] = db.reshape(k, h)
        else:
            _, grads["W1"], grads["b1"] = layers.affine_backward(dout, affine_cache, need_dx=False)
    return grads


def l2_loss(spec: NetSpec, params: dict, reg: float):
    """L2 penalty ``0.5 * reg * sum(W**2)`` over weights only -> (loss (...,), grads of the W's)."""
    loss, grads = 0.0, {}
    for layer in range(1, spec.num_layers + 1):
        w = params[f"W{layer}"]
        if layer == 1 and is_wide(params):
            k = params["b1"].shape[0]
            w = w.reshape(w.shape[0], k, -1).transpose(1, 0, 2)  # per-network view (K, D, H)
            penalty, dw = layers.l2_penalty(w, reg)
            dw = to_wide(dw)
        else:
            penalty, dw = layers.l2_penalty(w, reg)
        loss = loss + penalty
        grads[f"W{layer}"] = dw
    return loss, grads


def loss_and_grads(
    spec: NetSpec,
    params: dict,
    X: np.ndarray,
    y: np.ndarray,
    bn_params: list[dict],
    *,
    reg: float = 0.0,
    draws: StepDraws | None = None,
):
    """Training-mode loss and gradients of every network (CS231n ``FullyConnectedNet.loss``).

    Parameters
    ----------
    spec, params : architecture and parameters (stacked; ``W1`` possibly wide).
    X : (N, D) shared minibatch or (K, N, D) one per network (stacked layout).
    y : (N,) or (K, N) integer labels.
    bn_params : bn_param dicts; updated in place with the new running statistics.
    reg : L2 strength on the weights (not biases, gamma, beta).
    draws : the step's dropout masks and noise (`draw_step`), or None.

    Returns
    -------
    loss : (...) per-network mean softmax loss plus the L2 penalty.
    grads : dict with params' keys and shapes.
    """
    scores, caches = forward(spec, params, X, bn_params, "train", draws=draws)
    loss, dscores = layers.softmax_loss(scores, y)
    grads = backward(spec, dscores, caches)
    if reg:
        penalty, reg_grads = l2_loss(spec, params, reg)
        loss = loss + penalty
        for key, dw in reg_grads.items():
            grads[key] = grads[key] + dw
    return loss, grads


def predict(spec: NetSpec, params: dict, X: np.ndarray, bn_params: list[dict]) -> np.ndarray:
    """Predicted classes (..., N) in test mode: batch norm uses the running statistics, no
    dropout, no noise."""
    scores, _ = forward(spec, params, X, bn_params, "test", keep_caches=False)
    return scores.argmax(axis=-1)
