"""The training loop: CS231n Solver semantics for a group of K networks advanced in lockstep.

A *group* is K networks of one architecture (same `NetSpec`, so the same normalization) that differ
in weight scale, learning rate, dropout keep probability, noise strength and random plan. They are
trained as one stack: every parameter has a leading axis K, and one Python-level step per minibatch
advances all K. A single network is K = 1; there is no other code path. Each network's numbers are
the same as if it were trained alone (up to the last bits of BLAS summation order; the tests check
1e-10 in float64 and identical accuracies).

Semantics (the reference is CS231n's ``Solver`` with ``FullyConnectedNet``, 2017+ notebook):

- ``num_iterations = epochs * max(num_train // batch_size, 1)``; iteration t trains on the plan's
  minibatch ``batch_indices[t]``, applies one update (Adam by default) and records the minibatch
  loss. With dropout (some keep probability below 1) or noisy batch norm, the step's masks and
  noise are drawn first, each network from its own plan streams (`bnexp.plan.step_generators`);
  without them a step draws nothing.
- At every epoch end the learning rate is multiplied by ``lr_decay``.
- Accuracy checks after the first iteration ("epoch 0"), at every epoch end and after the last
  iteration: accuracy on the whole training subset and on the whole validation set, predictions
  without dropout and with batch norm in the evaluation mode ``bn_eval`` (below).
- The best-validation snapshot is replaced only when a check's val accuracy is *strictly* greater
  than the best so far (which starts at 0.0, as the reference). ``final_train_loss`` is the mean of
  the last ``loss_window`` minibatch losses.
- After training, the test accuracy of the best-val snapshot. Difference from the reference: the
  snapshot keeps the batch-norm statistics used at that check together with the parameters (the
  reference copies only ``model.params``, so its restored model pairs the best weights with the
  *last* running averages).

Batch-norm evaluation (``bn_eval``):

- ``running`` (default, the reference): test mode with the exponential running averages updated
  during training (momentum ``bn_momentum``).
- ``population``: the paper's Algorithm 2. Before each check, one pass over the training subset in
  consecutive minibatches of ``batch_size`` (``num_train // batch_size`` full batches) with the
  current parameters, in training-mode forward (batch statistics, running averages untouched);
  ``E[x]`` is the mean of the batch means, ``Var[x] = m/(m-1)`` times the mean of the batch
  variances (`bnexp.layers.batchnorm_population_stats`).
- ``batch``: each evaluated set (training subset, validation, test) is normalised with its own
  statistics, computed on the whole set at once.

Train once, evaluate every mode (``bn_eval_all``): after the last iteration the *final*
parameters of every network (the same for every mode, chosen by no mode's validation accuracy)
are scored on the validation and test sets with each of `EVERY_MODE`: the three above and
``minibatch``, batch statistics of consecutive minibatches of ``batch_size`` examples of the
evaluated set (the last one may be smaller), so a prediction depends on the examples it is
batched with, as the paper warns. The results are `RunResult.every_mode`
(``val_acc_running``, ..., ``test_acc_minibatch``); the checks, the snapshot and ``test_acc``
follow ``bn_eval`` as before. Nets without batch statistics score the same in every mode.

Divergence: a network whose minibatch loss is not finite at iteration t is marked diverged at t. Its
update of that iteration is skipped and it is frozen from then on (learning rate 0; its working copy
of the parameters, optimiser moments and running statistics is reset to finite values so no inf/NaN
enters the arithmetic shared with its neighbours). Its later losses and accuracies are recorded as
NaN; its best-val snapshot (from before the divergence) still gives a test accuracy. The reference
would keep stepping on NaN parameters instead.

Precision: parameters are initialised as ``weight_scale * normals`` in float64 rounded to
``init_dtype``, then everything (parameters, activations, optimiser state, data) is
``compute_dtype``. ``init_dtype=float32, compute_dtype=float64`` is what the reference computes
(float32 parameters, float64 data: NumPy upcasts and Adam returns float64 parameters).

Speed: when all K networks share their minibatch indices (the default numpy plans with one seed),
the first layer runs as one wide matrix product ``X (N, 3072) @ W1 (3072, K*H)`` and so does its
weight gradient ``X.T @ dA1``; the accuracy checks score all K networks with one wide product per
chunk of examples. Otherwise each network's minibatch is gathered and the first layer is a batched
product. The first-layer update runs in row blocks sized for the CPU cache, in place with reused
scratch buffers; all other parameters live in one (K, P) array updated by a single call. All of
this is element-wise, so the numbers do not change.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bnexp import fused, layers, model, optim, probes
from bnexp.checkpoint import Checkpoint, CheckpointError
from bnexp.model import NetSpec
from bnexp.plan import RunPlan, iterations_per_epoch, step_generators
from bnexp.probes import ProbeSettings

BN_EVAL_MODES = ("running", "population", "batch")
#: The modes `bn_eval_all` evaluates: `BN_EVAL_MODES` and batch statistics per minibatch.
EVERY_MODE = (*BN_EVAL_MODES, "minibatch")

#: Examples scored per matrix product in accuracy checks (rows are independent in test mode, so
#: the chunk size changes speed and memory only; the reference uses 100).
CHECK_CHUNK = 1000

#: Target bytes of one block of the first-layer update, so the update rule's temporaries stay in
#: cache. Measured on the default sweep (one core, float32, 20 nets): 64 KiB 7.3 s, 256 KiB 6.4 s,
#: 1 MiB 6.0 s, unblocked 6.9 s per group.
UPDATE_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class SolverSettings:
    """Solver hyper-parameters shared by every network of a group.

    Attributes
    ----------
    epochs, batch_size : int
        ``num_iterations = epochs * max(num_train // batch_size, 1)``.
    update_rule : {'sgd', 'sgd_momentum', 'adam'}
    learning_rate : float
        Used for members whose own learning rate is None.
    lr_decay : float
        Multiplies the learning rate at every epoch end.
    bn_eval : {'running', 'population', 'batch'}
        Batch-norm statistics used for accuracy checks (see the module docstring).
    bn_momentum, bn_eps : float
        Running-average momentum (weights the old value) and the eps inside the square root.
    reg : float
        L2 strength, ``0.5 * reg * sum(W**2)`` over weights only.
    dtype : str
        Model dtype; the default for `init_dtype` and `compute_dtype`.
    init_dtype, compute_dtype : str or None
        Rounding of the initial weights and dtype of all arithmetic; None means `dtype`.
    loss_window : int
        ``final_train_loss`` averages the last this-many minibatch losses (100, the notebook).
    bn_eval_all : bool
        Also score the final parameters with every mode of `EVERY_MODE` (module docstring).

    Built from a run's config by `bnexp.sweep.solver_settings` (the config holds the defaults and
    validates the values).
    """

    epochs: int
    batch_size: int
    update_rule: str
    learning_rate: float
    lr_decay: float
    bn_eval: str
    bn_momentum: float
    bn_eps: float
    reg: float
    dtype: str
    loss_window: int
    init_dtype: str | None = None
    compute_dtype: str | None = None
    bn_eval_all: bool = False

    @property
    def init_np_dtype(self) -> np.dtype:
        """Resolved dtype the initial weights are rounded to."""
        return np.dtype(self.init_dtype or self.dtype)

    @property
    def compute_np_dtype(self) -> np.dtype:
        """Resolved dtype of parameters, activations and optimiser state."""
        return np.dtype(self.compute_dtype or self.dtype)

    def num_iterations(self, num_train: int) -> int:
        """Total solver iterations for a training subset of `num_train` examples."""
        return self.epochs * iterations_per_epoch(num_train, self.batch_size)


@dataclass(frozen=True)
class Member:
    """One network of a group: its weight scale, learning rate (None: the settings') and plan,
    the probability of keeping a unit in dropout (1: no dropout) and the strength of noisy batch
    norm's noise (used only when the group's normalization is noisy_batchnorm)."""

    weight_scale: float
    learning_rate: float | None
    plan: RunPlan
    dropout_keep: float = 1.0
    bn_noise: float = model.NOISY_BN_STRENGTH


@dataclass
class RunResult:
    """Outcome of one network's training.

    Attributes
    ----------
    train_acc_history, val_acc_history : list of float
        One value per check (NaN after divergence); checks at `check_iterations`.
    test_acc : float or None
        Test accuracy of the best-val snapshot (None without a test split).
    loss_history : np.ndarray
        (num_iterations,) float64 minibatch losses (NaN from the divergence iteration on).
    best_train_acc : float
        Highest finite train accuracy over the checks (NaN if none).
    best_val_acc : float
        The Solver's best_val_acc: highest val accuracy, starting from 0.0.
    final_train_loss : float
        Mean of the last `loss_window` minibatch losses.
    diverged : bool
    diverged_iteration : int or None
        Iteration whose minibatch loss was first not finite.
    seconds : float
        The group's wall time divided by K (the network's share of lockstep training).
    check_iterations : list of int
        0-based iterations after which the checks ran.
    best_check : int or None
        Index into the histories of the snapshot used for `test_acc` (None: never beat 0.0, the
        initial parameters were used).
    probe_layers, probe_landscape : list of dict
        With probes on: the network's `bnexp.probes` records, each with its ``iteration``;
        one per (iteration, layer) (`layer_stats`, merged with `ics`), and one per iteration
        (`landscape`). Empty with probes off.
    every_mode : dict
        With ``bn_eval_all``: ``{split}_acc_{mode}`` for split val and test (test None without a
        test split) and each mode of `EVERY_MODE`, from the final parameters (NaN after a
        divergence). Empty otherwise.
    """

    train_acc_history: list[float]
    val_acc_history: list[float]
    test_acc: float | None
    loss_history: np.ndarray
    best_train_acc: float
    best_val_acc: float
    final_train_loss: float
    diverged: bool
    diverged_iteration: int | None
    seconds: float
    check_iterations: list[int] = field(default_factory=list)
    best_check: int | None = None
    probe_layers: list[dict] = field(default_factory=list)
    probe_landscape: list[dict] = field(default_factory=list)
    every_mode: dict = field(default_factory=dict)


def check_schedule(num_iterations: int, per_epoch: int) -> list[int]:
    """Iterations after which the Solver checks accuracy: the first, every epoch end, the last."""
    return [
        t
        for t in range(num_iterations)
        if t == 0 or t == num_iterations - 1 or (t + 1) % per_epoch == 0
    ]


def _validate(spec: NetSpec, members: list[Member], data, settings: SolverSettings) -> None:
    """Raise ValueError for inputs that do not fit together, before any work is done.

    The settings' values themselves are validated by `bnexp.config` (asserted here).
    """
    assert members, "train_group: no members"
    assert settings.update_rule in optim.UPDATE_RULES, settings.update_rule
    assert settings.bn_eval in BN_EVAL_MODES, settings.bn_eval
    assert settings.init_np_dtype in (np.float32, np.float64), settings.init_dtype
    assert settings.compute_np_dtype in (np.float32, np.float64), settings.compute_dtype
    for split in ("train", "val", "test"):
        X, y = getattr(data, f"X_{split}"), getattr(data, f"y_{split}")
        if X is None and split == "test":
            continue
        if X.ndim != 2 or X.shape[1] != spec.input_dim or y.shape != (X.shape[0],):
            raise ValueError(
                f"train_group: X_{split} {X.shape} / y_{split} {y.shape} do not match "
                f"(N, {spec.input_dim}) / (N,)"
            )
    expected = (settings.num_iterations(data.X_train.shape[0]), settings.batch_size)
    for k, member in enumerate(members):
        if member.plan.batch_indices.shape != expected:
            raise ValueError(
                f"train_group: member {k} plan has batch_indices "
                f"{member.plan.batch_indices.shape}, the settings need {expected}"
            )
    population = settings.bn_eval == "population" and spec.batchnorm
    assert not population or min(settings.batch_size, data.X_train.shape[0]) >= 2


class _Updater:
    """The update rule applied in place to one (stacked) parameter, in blocks along axis 0.

    Blocks keep the rule's element-wise temporaries cache-sized; they do not change the numbers.
    With the compiled Adam (`bnexp.fused`) the parameter is one block.
    The temporaries live in scratch buffers reused at every step. `lr_axis0` says whether axis 0
    is the network axis (lr sliced per block) or not (wide W1: the rate varies along the columns
    and is the same for every block).
    """

    def __init__(self, rule: str, shape, itemsize, lr_axis0: bool, single: bool):
        self.rule = optim.UPDATE_RULES[rule]
        self.state_arrays = optim.STATE_ARRAYS[rule]
        row_bytes = max(int(np.prod(shape[1:], dtype=np.int64)) * itemsize, 1)
        # The compiled Adam is one pass with no temporaries: blocks would only add calls.
        single = single or (rule == "adam" and fused.enabled())
        rows = shape[0] if single else max(1, UPDATE_BLOCK_BYTES // row_bytes)
        self.blocks = [slice(i, min(i + rows, shape[0])) for i in range(0, shape[0], rows)]
        self.whole = len(self.blocks) == 1
        self.lr_axis0 = lr_axis0
        self.states: list[dict] = [{} for _ in self.blocks]  # the rule's defaults (CS231n's)
        self.scratch: dict = {}  # block shape -> the rule's two temporaries

    def set_learning_rate(self, lr: np.ndarray) -> None:
        """lr: per-network rates, (K,) for stacked params or (1, K*H) for the wide W1."""
        for blk, state in zip(self.blocks, self.states, strict=True):
            rate = lr[blk] if self.lr_axis0 else lr
            # One rate for the whole block (e.g. every network alive with the same rate): a
            # Python float rounds to the same value in the compute dtype as the array would, and
            # a scalar multiply is about half the cost of a broadcast one on the wide W1.
            first = rate.flat[0]
            state["learning_rate"] = float(first) if (rate == first).all() else rate

    def step(self, w: np.ndarray, dw: np.ndarray) -> None:
        """Update w in place (block by block when blocked)."""
        for blk, state in zip(self.blocks, self.states, strict=True):
            wb, gb = (w, dw) if self.whole else (w[blk], dw[blk])
            scratch = self.scratch.get(wb.shape)
            if scratch is None:
                scratch = self.scratch[wb.shape] = (np.empty_like(wb), np.empty_like(wb))
            self.rule(wb, gb, state, inplace=True, scratch=scratch)

    def reset_network(self, k: int, width: int | None) -> None:
        """Zero network k's moments (rows k, or columns k*width:(k+1)*width of the wide W1)."""
        for blk, state in zip(self.blocks, self.states, strict=True):
            for key in self.state_arrays:
                moment = state.get(key)
                if moment is None:
                    continue
                if width is None:
                    if blk.start <= k < blk.stop:
                        moment[k - blk.start] = 0
                else:
                    moment[:, k * width : (k + 1) * width] = 0


class _Group:
    """Mutable training state of a lockstep group (parameters, BN state, optimiser, bookkeeping).

    Every parameter but W1 is a view into one (K, P) array `flat` (network k's P numbers in row
    k), so the update rule runs once per step on all of them instead of once per array.
    """

    def __init__(self, spec, members, settings, wide):
        self.spec, self.settings, self.wide = spec, settings, wide
        self.K = len(members)
        self.dtype = settings.compute_np_dtype
        normals = [np.stack([m.plan.normals[i] for m in members]) for i in range(spec.num_layers)]
        scales = np.array([m.weight_scale for m in members], dtype=np.float64)
        params = model.init_params(spec, normals, scales, settings.init_np_dtype)
        params = {key: value.astype(self.dtype) for key, value in params.items()}
        if wide:
            params["W1"] = model.to_wide(params["W1"])
        self.small = [key for key in params if key != "W1"]
        sizes = [params[key][0].size for key in self.small]
        self.flat = np.empty((self.K, sum(sizes)), dtype=self.dtype)
        self.flat_grad = np.empty_like(self.flat)
        self.grad_views = {}
        offset = 0
        for key, size in zip(self.small, sizes, strict=True):
            shape = params[key].shape
            view = self.flat[:, offset : offset + size].reshape(shape)
            view[...] = params[key]
            params[key] = view
            self.grad_views[key] = self.flat_grad[:, offset : offset + size].reshape(shape)
            offset += size
        self.params = params
        self.bn_params = model.init_bn_params(
            spec, (self.K,), self.dtype, settings.bn_eps, settings.bn_momentum
        )
        self.lr = np.array(
            [
                settings.learning_rate if m.learning_rate is None else m.learning_rate
                for m in members
            ],
            dtype=np.float64,
        )
        rule, w1 = settings.update_rule, params["W1"]
        self.updaters = {
            "W1": _Updater(rule, w1.shape, w1.itemsize, lr_axis0=not wide, single=False),
            "flat": _Updater(rule, self.flat.shape, self.flat.itemsize, lr_axis0=True, single=True),
        }
        self.alive = np.ones(self.K, dtype=bool)
        self._push_learning_rates()
        self._init_draws(members)

    def _init_draws(self, members) -> None:
        """Per-network dropout keep probabilities, noise strengths and their generators."""
        keep = np.array([m.dropout_keep for m in members], dtype=np.float64)
        self.keep = keep if (keep < 1).any() else None  # None: no dropout, no per-step work
        self.strength = np.array([m.bn_noise for m in members], dtype=np.float64)
        needs = model.needs_draws(self.spec, self.keep)
        self.rngs = [step_generators(m.plan) for m in members] if needs else []

    def draw(self, batch_size: int) -> model.StepDraws | None:
        """This step's dropout masks and noise for every network (None when there are none)."""
        if not self.rngs:
            return None
        return model.draw_step(
            self.spec, batch_size, self.dtype, self.keep, self.strength, self.rngs
        )

    def _push_learning_rates(self) -> None:
        lr = np.where(self.alive, self.lr, 0.0)
        h1 = self.spec.hidden_dims[0] if self.spec.hidden_dims else self.spec.num_classes
        for key, updater in self.updaters.items():
            if key == "W1" and self.wide:
                updater.set_learning_rate(np.repeat(lr, h1)[None, :])
            else:
                updater.set_learning_rate(lr)

    def decay_learning_rates(self, factor: float) -> None:
        """lr *= factor per network (repeated multiplication, as the reference's config update)."""
        self.lr = self.lr * factor
        self._push_learning_rates()

    def network_slices(self, key: str, k: int):
        """Index of network k inside params[key] (columns of the wide W1, else row k)."""
        if key == "W1" and self.wide:
            h1 = self.params["b1"].shape[1]
            return (slice(None), slice(k * h1, (k + 1) * h1))
        return (k,)

    def freeze(self, ks) -> None:
        """Mark networks ks diverged: lr 0, parameters/moments/running stats reset to finite."""
        self.alive[ks] = False
        self._push_learning_rates()
        h1 = self.params["b1"].shape[1]
        for k in ks:
            for key, value in self.params.items():
                value[self.network_slices(key, k)] = 0
            self.updaters["W1"].reset_network(k, h1 if self.wide else None)
            self.updaters["flat"].reset_network(k, None)
            for bn_param in self.bn_params:
                bn_param["running_mean"][k] = 0
                bn_param["running_var"][k] = 1

    def zero_dead_grads(self, grads: dict) -> None:
        """Zero the gradients of diverged networks so their (zero-rate) updates stay exactly 0."""
        for k in np.flatnonzero(~self.alive):
            for key, g in grads.items():
                g[self.network_slices(key, k)] = 0

    def step(self, grads: dict) -> None:
        """One in-place update of every parameter."""
        for key in self.small:
            self.grad_views[key][...] = grads[key]
        self.updaters["W1"].step(self.params["W1"], grads["W1"])
        self.updaters["flat"].step(self.flat, self.flat_grad)

    def snapshot(self, ks, store: dict, stats: list[tuple[np.ndarray, np.ndarray]] | None) -> None:
        """Copy networks ks' parameters (and the BN stats used at this check) into store."""
        for k in ks:
            for key, value in self.params.items():
                idx = self.network_slices(key, k)
                store["params"][key][idx] = value[idx]
            if stats is not None:
                for (mean, var), (s_mean, s_var) in zip(stats, store["stats"], strict=True):
                    s_mean[k] = mean[k]
                    s_var[k] = var[k]


def _eval_bn_params(stats, settings) -> list[dict]:
    """Fresh test-mode bn_param dicts around given (mean, var) pairs (K, H)."""
    return [
        {"mode": "test", "eps": settings.bn_eps, "running_mean": m, "running_var": v}
        for m, v in stats
    ]


def _population_stats(group: _Group, X: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Algorithm 2 statistics per BN layer from consecutive training minibatches: [(mean, var)]."""
    spec, settings = group.spec, group.settings
    m = min(settings.batch_size, X.shape[0])
    num_batches = max(X.shape[0] // m, 1)
    means = [[] for _ in spec.hidden_dims]
    variances = [[] for _ in spec.hidden_dims]
    scratch = [dict(mode="batch", eps=settings.bn_eps) for _ in spec.hidden_dims]
    for b in range(num_batches):
        xb = X[b * m : (b + 1) * m]  # shared (m, D); stacked W1 broadcasts it over the K nets
        _, caches = model.forward(spec, group.params, xb, scratch, "batch")
        for layer, (_, bn_cache, _, _) in enumerate(caches[:-1]):
            means[layer].append(bn_cache["mean"][..., 0, :])
            variances[layer].append(bn_cache["var"][..., 0, :])
    return [
        layers.batchnorm_population_stats(np.stack(mu), np.stack(var), m)
        for mu, var in zip(means, variances, strict=True)
    ]


def _accuracy(group: _Group, params: dict, X: np.ndarray, y: np.ndarray, bn_stats) -> np.ndarray:
    """Accuracy (K,) of every network on (X, y); bn_stats None means 'batch' normalisation."""
    spec = group.spec
    if spec.batchnorm and bn_stats is None:
        scratch = [dict(mode="batch", eps=group.settings.bn_eps) for _ in spec.hidden_dims]
        chunks = [slice(0, X.shape[0])]  # batch statistics need the whole set at once
    else:
        scratch = _eval_bn_params(bn_stats or [], group.settings)
        chunks = [slice(i, i + CHECK_CHUNK) for i in range(0, X.shape[0], CHECK_CHUNK)]
    mode = "batch" if bn_stats is None else "test"
    correct = np.zeros(group.K, dtype=np.int64)
    for chunk in chunks:
        scores, _ = model.forward(spec, params, X[chunk], scratch, mode, keep_caches=False)
        correct += (scores.argmax(axis=-1) == y[chunk]).sum(axis=-1)
    return correct / X.shape[0]


@dataclass
class _History:
    """What the Solver records for K networks: losses, check accuracies, divergence, best-val
    snapshot (parameters and the BN statistics of its check)."""

    losses: np.ndarray  # (K, num_iterations), NaN where not recorded
    train_acc: np.ndarray  # (K, num_checks)
    val_acc: np.ndarray  # (K, num_checks)
    diverged_at: np.ndarray  # (K,), -1 while alive
    best_val: np.ndarray  # (K,), from 0.0 as the reference
    best_check: np.ndarray  # (K,), -1: never improved (the initial parameters are kept)
    best: dict  # {"params": copies of group.params, "stats": [(mean, var)] per BN layer}

    @classmethod
    def start(cls, group: _Group, num_iterations: int, num_checks: int) -> _History:
        K = group.K
        return cls(
            losses=np.full((K, num_iterations), np.nan),
            train_acc=np.full((K, num_checks), np.nan),
            val_acc=np.full((K, num_checks), np.nan),
            diverged_at=np.full(K, -1),
            best_val=np.zeros(K),
            best_check=np.full(K, -1),
            best={
                "params": {key: value.copy() for key, value in group.params.items()},
                "stats": [
                    (p["running_mean"].copy(), p["running_var"].copy()) for p in group.bn_params
                ],
            },
        )


@dataclass(frozen=True)
class _Inputs:
    """The data cast once to the compute dtype, and the plans' minibatch indices (K, T, N)."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    indices: np.ndarray
    wide: bool  # every network shares its minibatches: the wide first-layer layout

    @classmethod
    def of(cls, data, members: list[Member], dtype) -> _Inputs:
        indices = np.stack([m.plan.batch_indices for m in members])
        return cls(
            X_train=np.ascontiguousarray(data.X_train, dtype=dtype),
            y_train=np.asarray(data.y_train),
            X_val=np.ascontiguousarray(data.X_val, dtype=dtype),
            y_val=np.asarray(data.y_val),
            indices=indices,
            wide=bool((indices == indices[:1]).all()),
        )


def _minibatch(inputs: _Inputs, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Iteration t's minibatch: X (N, D) shared or (K, N, D) per network, y (N,) or (K, N)."""
    rows = inputs.indices[0, t] if inputs.wide else inputs.indices[:, t]  # (N,) or (K, N)
    return inputs.X_train[rows], inputs.y_train[rows]


def _step(group: _Group, inputs: _Inputs, t: int, history: _History) -> None:
    """Iteration t: minibatch loss and gradients, divergence, one update of every network."""
    xb, yb = _minibatch(inputs, t)
    draws = group.draw(yb.shape[-1])
    loss, grads = model.loss_and_grads(
        group.spec, group.params, xb, yb, group.bn_params, reg=group.settings.reg, draws=draws
    )
    newly = np.flatnonzero(group.alive & ~np.isfinite(loss))
    if newly.size:
        history.diverged_at[newly] = t
        group.freeze(newly)
    history.losses[group.alive, t] = loss[group.alive]
    group.zero_dead_grads(grads)
    group.step(grads)


def _check_accuracy(group: _Group, inputs: _Inputs, check: int, history: _History) -> None:
    """Accuracy check number `check`: train and val accuracy, best-val snapshot (strict >)."""
    stats = _check_stats(group, inputs.X_train)
    train_acc = _accuracy(group, group.params, inputs.X_train, inputs.y_train, stats)
    val_acc = _accuracy(group, group.params, inputs.X_val, inputs.y_val, stats)
    dead = ~group.alive
    train_acc[dead] = np.nan
    val_acc[dead] = np.nan
    history.train_acc[:, check] = train_acc
    history.val_acc[:, check] = val_acc
    improved = np.flatnonzero(val_acc > history.best_val)  # strict, NaN never improves
    history.best_val[improved] = val_acc[improved]
    history.best_check[improved] = check
    group.snapshot(improved, history.best, stats)


def _test_accuracy(group: _Group, data, history: _History) -> list[float | None]:
    """Test accuracy of every network's best-val snapshot (None without a test split)."""
    if data.X_test is None:
        return [None] * group.K
    X_test = np.ascontiguousarray(data.X_test, dtype=group.dtype)
    stats = history.best["stats"] if group.settings.bn_eval != "batch" else None
    acc = _accuracy(group, history.best["params"], X_test, np.asarray(data.y_test), stats)
    return [float(a) for a in acc]


def _results(
    history: _History, test_acc, checks: list[int], window: int, seconds: float, every_mode=None
):
    """One RunResult per network from the group's history (and `_every_mode_accuracy`'s)."""
    results = []
    for k in range(len(test_acc)):
        train_hist, at = history.train_acc[k], int(history.diverged_at[k])
        finite_train = train_hist[np.isfinite(train_hist)]
        results.append(
            RunResult(
                train_acc_history=[float(a) for a in train_hist],
                val_acc_history=[float(a) for a in history.val_acc[k]],
                test_acc=test_acc[k],
                loss_history=history.losses[k],
                best_train_acc=float(finite_train.max()) if finite_train.size else float("nan"),
                best_val_acc=float(history.best_val[k]),
                final_train_loss=float(np.mean(history.losses[k, -window:])),
                diverged=at >= 0,
                diverged_iteration=at if at >= 0 else None,
                seconds=seconds,
                check_iterations=list(checks),
                best_check=int(history.best_check[k]) if history.best_check[k] >= 0 else None,
                every_mode=every_mode[k] if every_mode else {},
            )
        )
    return results


def train_group(
    spec: NetSpec,
    members: list[Member],
    data,
    settings: SolverSettings,
    on_progress: Callable[[int], None] | None = None,
    probe_settings: ProbeSettings | None = None,
    checkpoint: Checkpoint | None = None,
) -> list[RunResult]:
    """Train K networks of one architecture in lockstep with CS231n Solver semantics.

    Parameters
    ----------
    spec : NetSpec
        The shared architecture (its normalization by name).
    members : list of Member
        Per network: weight scale, learning rate, plan (normals per layer (din, dout) and
        batch_indices (num_iterations, batch_size)), dropout keep probability, noise strength.
    data : splits (e.g. `bnexp.data.Splits`)
        float64 features X_* (N, input_dim), int labels y_* (N,); cast once to the compute dtype.
    settings : SolverSettings
    on_progress : callable, optional
        Called with the number of iterations done after every iteration.
    probe_settings : ProbeSettings, optional
        Probes to run at the probe iterations (see `_Probes`); they read the parameters only,
        so every other number of the results is the same without them.
    checkpoint : Checkpoint, optional
        Resume from this group's checkpoint when it has one, and write one at epoch ends
        (after the epoch's check) as often as it says; the results are the same bits as
        without it (`seconds` aside, which counts the training before the resume too).

    Returns
    -------
    list of RunResult, in the order of `members`.
    """
    _validate(spec, members, data, settings)
    start = time.perf_counter()
    num_train = data.X_train.shape[0]
    per_epoch = iterations_per_epoch(num_train, settings.batch_size)
    num_iterations = settings.num_iterations(num_train)
    checks = check_schedule(num_iterations, per_epoch)
    inputs = _Inputs.of(data, members, settings.compute_np_dtype)
    group, history, probe, reached = _start(
        spec, members, settings, inputs, len(checks), probe_settings, checkpoint
    )
    saved_at = time.perf_counter()
    with np.errstate(all="ignore"):  # a diverging network overflows by design; it is contained
        check = reached.check
        for t in range(reached.iteration, num_iterations):
            if probe is not None:
                probe.before_step(group, t)
            _step(group, inputs, t, history)
            if probe is not None:
                probe.after_step(group, inputs, t)
            if (t + 1) % per_epoch == 0:
                group.decay_learning_rates(settings.lr_decay)
            if check < len(checks) and checks[check] == t:
                _check_accuracy(group, inputs, check, history)
                check += 1
            last = t + 1 == num_iterations  # the results follow at once: nothing to keep
            if checkpoint and (t + 1) % per_epoch == 0 and not last and checkpoint.due(saved_at):
                elapsed = reached.seconds + time.perf_counter() - start
                checkpoint.save(*_capture(group, history, probe, _Reached(t + 1, check, elapsed)))
                saved_at = time.perf_counter()
            if on_progress is not None:
                on_progress(t + 1)
        test_acc = _test_accuracy(group, data, history)
        every_mode = _every_mode_accuracy(group, inputs, data)
    seconds = (reached.seconds + time.perf_counter() - start) / len(members)
    results = _results(history, test_acc, checks, settings.loss_window, seconds, every_mode)
    if probe is not None:
        for result, layer_records, landscape_records in zip(
            results, probe.layers, probe.landscape, strict=True
        ):
            result.probe_layers = sorted(layer_records.values(), key=_probe_order)
            result.probe_landscape = landscape_records
    return results


def _every_mode_accuracy(group: _Group, inputs: _Inputs, data) -> list[dict] | None:
    """With ``bn_eval_all``: per network {``val_acc_<mode>``, ``test_acc_<mode>``} of the final
    parameters for every mode of `EVERY_MODE` (NaN for a diverged network); else None."""
    if not group.settings.bn_eval_all:
        return None
    sets = {"val": (inputs.X_val, inputs.y_val)}
    if data.X_test is not None:
        sets["test"] = (np.ascontiguousarray(data.X_test, dtype=group.dtype), data.y_test)
    stats = {mode: _check_stats(group, inputs.X_train, mode) for mode in BN_EVAL_MODES}
    out: list[dict] = [{} for _ in range(group.K)]
    for split, (X, y) in sets.items():
        for mode in EVERY_MODE:
            if mode == "minibatch":
                acc = _minibatch_accuracy(group, X, np.asarray(y), group.settings.batch_size)
            else:
                acc = _accuracy(group, group.params, X, np.asarray(y), stats[mode])
            acc = np.where(group.alive, acc, np.nan)
            for k in range(group.K):
                out[k][f"{split}_acc_{mode}"] = float(acc[k])
    for k in range(group.K):  # without a test split: the fields are there, null
        out[k].update({f"test_acc_{mode}": None for mode in EVERY_MODE if "test" not in sets})
    return out


def _minibatch_accuracy(group: _Group, X: np.ndarray, y: np.ndarray, m: int) -> np.ndarray:
    """Accuracy (K,) with batch norm normalising each consecutive chunk of m examples of X by the
    chunk's own statistics (the last chunk may be smaller); no running statistics touched."""
    spec = group.spec
    scratch = [dict(mode="batch", eps=group.settings.bn_eps) for _ in spec.hidden_dims]
    correct = np.zeros(group.K, dtype=np.int64)
    for i in range(0, X.shape[0], m):
        chunk = X[i : i + m]
        scores, _ = model.forward(spec, group.params, chunk, scratch, "batch", keep_caches=False)
        correct += (scores.argmax(axis=-1) == y[i : i + m]).sum(axis=-1)
    return correct / X.shape[0]


def _check_stats(group: _Group, X_train: np.ndarray, mode: str | None = None):
    """BN statistics for a check: running averages, Algorithm 2 population stats, or None
    (batch); `mode` one of `BN_EVAL_MODES`, default the settings' ``bn_eval``."""
    if not group.spec.batchnorm:
        return []
    mode = mode or group.settings.bn_eval
    if mode == "running":
        return [(p["running_mean"], p["running_var"]) for p in group.bn_params]
    if mode == "population":
        return _population_stats(group, X_train)
    return None


# --- probes at the probe iterations -----------------------------------------------------------


def _stacked_copy(group: _Group) -> dict:
    """A copy of the group's parameters in the stacked layout (`bnexp.probes` reads those)."""
    params = {key: value.copy() for key, value in group.params.items() if key != "W1"}
    w1 = group.params["W1"]
    params["W1"] = model.from_wide(w1, group.K) if group.wide else w1.copy()
    return params


def _probe_order(record: dict) -> tuple[int, int]:
    return record["iteration"], record["layer"]


class _Probes:
    """The probes of a group at its probe iterations, records kept per network.

    At probe iteration p (`bnexp.probes.probe_iterations`): `layer_stats` of the parameters
    after p updates on the probe batch (``update_ratio`` of update p-1 -> p), and with `ics` /
    `landscape` on, those of the minibatch of iteration p from the parameters before and after
    update p. Copies of the parameters are made only before the updates p-1 and p.

    Noisy batch norm: `ics` and `landscape` see the noise as a training step does, drawn from
    each network's probe stream (`bnexp.probes.probe_generator`), two draws per probed step:
    the first for the step-t gradient and the landscape, the second for the layers that moved
    in ICS's G' (the next step's noise). Training's own streams are never touched.
    """

    def __init__(self, settings: ProbeSettings, group: _Group, inputs: _Inputs, steps: set, seeds):
        self.settings, self.steps = settings, steps
        self.spec, self.eps = group.spec, group.settings.bn_eps
        minibatch = settings.ics or settings.landscape
        noisy = self.spec.normalization == "noisy_batchnorm" and minibatch
        self.noise_rngs = [probes.probe_generator(seed) for seed in seeds] if noisy else []
        self.X = inputs.X_train[: settings.batch_size]  # the fixed probe batch (n, D)
        self.y = inputs.y_train[: settings.batch_size]
        self.prev: dict | None = None  # parameters before the last update, when p is probed
        self.before: dict | None = None  # parameters before update p
        self.layers: list[dict] = [{} for _ in range(group.K)]  # (iteration, layer) -> record
        self.landscape: list[list[dict]] = [[] for _ in range(group.K)]

    @classmethod
    def of(cls, settings, group, inputs, num_iterations: int, members) -> _Probes | None:
        """The probes of a run, or None when off (then the loop does no probe work at all)."""
        if settings is None or settings.every < 1:
            return None
        steps = set(probes.probe_iterations(num_iterations, settings.every))
        return cls(settings, group, inputs, steps, [m.plan.seed for m in members])

    def _noise(self, group: _Group):
        """One draw of noisy batch norm's noise from the probe streams (None for other nets)."""
        if not self.noise_rngs:
            return None
        return probes.probe_noise(self.spec, self.noise_rngs, group.strength, group.dtype)

    def before_step(self, group: _Group, t: int) -> None:
        """Before update t: layer statistics when t is probed; copies the probes will need."""
        self.before = None
        if t in self.steps:
            self.before = _stacked_copy(group)
            stats = probes.layer_stats(self.spec, self.before, self.X, self.y, self.eps, self.prev)
            self._add_layers(t, stats)
        if t + 1 in self.steps:
            self.prev = self.before if self.before is not None else _stacked_copy(group)
        else:
            self.prev = None

    def after_step(self, group: _Group, inputs: _Inputs, t: int) -> None:
        """After update t (before a learning-rate decay): ICS and landscape of step t."""
        s = self.settings
        if t not in self.steps or not (s.ics or s.landscape):
            return
        xb, yb = _minibatch(inputs, t)
        noise, noise_after = self._noise(group), self._noise(group)  # always both: fixed order
        ics_records, landscape_records = [], []
        if s.ics and s.landscape:
            after = _stacked_copy(group)
            ics_records, landscape_records = probes.minibatch_probes(
                self.spec,
                self.before,
                after,
                xb,
                yb,
                self.eps,
                group.lr,
                noise=noise,
                noise_after=noise_after,
            )
        elif s.ics:
            after = _stacked_copy(group)
            ics_records = probes.ics(
                self.spec, self.before, after, xb, yb, self.eps, noise, noise_after
            )
        else:
            landscape_records = probes.landscape(
                self.spec, self.before, xb, yb, self.eps, group.lr, noise=noise
            )
        self._add_layers(t, ics_records)
        for record in landscape_records:
            net = record.pop("net")
            self.landscape[net].append({"iteration": t, **record})

    def _add_layers(self, t: int, records: list[dict]) -> None:
        """Merge per-(network, layer) records of iteration t into that network's records."""
        for record in records:
            net = record.pop("net")
            merged = self.layers[net].setdefault((t, record["layer"]), {"iteration": t})
            merged.update(record)


# --- checkpoints: the whole state of a group at an epoch end ------------------------------------


@dataclass(frozen=True)
class _Reached:
    """How far a group's training got: iterations done, accuracy checks done, seconds trained."""

    iteration: int = 0
    check: int = 0
    seconds: float = 0.0


def _start(spec, members, settings, inputs: _Inputs, num_checks, probe_settings, checkpoint):
    """The group's state to train from: its checkpoint's, when it has a usable one, else fresh.
    Returns (group, history, probes or None, _Reached)."""
    num_iterations = inputs.indices.shape[1]

    def fresh():
        group = _Group(spec, members, settings, inputs.wide)
        history = _History.start(group, num_iterations, num_checks)
        probe = _Probes.of(probe_settings, group, inputs, num_iterations, members)
        return group, history, probe

    state = fresh()
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is None:
        return (*state, _Reached())
    try:
        reached = _restore(*state, *saved)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        # Half restored: start again from fresh state (a checkpoint is all or nothing).
        checkpoint.discard(f"its content does not fit this group: {type(exc).__name__}: {exc}")
        return (*fresh(), _Reached())
    checkpoint.note(
        f"resuming a group of {len(members)} runs from its checkpoint at iteration "
        f"{reached.iteration} of {num_iterations}"
    )
    return (*state, reached)


def _capture(group: _Group, history: _History, probe: _Probes | None, reached: _Reached):
    """Everything the loop needs to go on from `reached` exactly as if never stopped, as
    (arrays by name, JSON-able meta). The arrays are the live ones, not copies."""
    arrays = {"group.W1": group.params["W1"], "group.flat": group.flat}
    arrays.update({"group.lr": group.lr, "group.alive": group.alive})
    for i, bn_param in enumerate(group.bn_params):
        arrays[f"bn.{i}.running_mean"] = bn_param["running_mean"]
        arrays[f"bn.{i}.running_var"] = bn_param["running_var"]
    optimizer = {}
    for name, updater in group.updaters.items():
        optimizer[name] = []
        for b, state in enumerate(updater.states):
            present = [key for key in updater.state_arrays if state.get(key) is not None]
            arrays.update({f"opt.{name}.{b}.{key}": state[key] for key in present})
            optimizer[name].append({"t": state.get("t"), "arrays": present})
    for key in ("losses", "train_acc", "val_acc", "diverged_at", "best_val", "best_check"):
        arrays[f"history.{key}"] = getattr(history, key)
    arrays.update({f"best.params.{key}": v for key, v in history.best["params"].items()})
    for i, (mean, var) in enumerate(history.best["stats"]):
        arrays[f"best.stats.{i}.mean"], arrays[f"best.stats.{i}.var"] = mean, var
    meta = {
        "iteration": reached.iteration,
        "check": reached.check,
        "seconds": reached.seconds,
        "optimizer": optimizer,
        # Generator.bit_generator.state: a dict of (big) ints, exact in JSON.
        "rngs": [[g.bit_generator.state for g in pair] for pair in group.rngs],
        "probe": None,
    }
    if probe is not None:
        prev = probe.prev or {}
        arrays.update({f"probe.prev.{key}": value for key, value in prev.items()})
        meta["probe"] = {
            "prev": probe.prev is not None,
            "layers": [list(records.values()) for records in probe.layers],
            "landscape": probe.landscape,
            "noise_rngs": [g.bit_generator.state for g in probe.noise_rngs],
        }
    return arrays, meta


def _fit(array: np.ndarray, like: np.ndarray | tuple, dtype=None) -> np.ndarray:
    """A writable C-contiguous copy of a checkpoint's array; CheckpointError unless it has the
    shape and dtype of `like` (an array, or a shape with `dtype`)."""
    shape, dtype = (like.shape, like.dtype) if isinstance(like, np.ndarray) else (like, dtype)
    if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise CheckpointError(f"an array is {array.dtype}{array.shape}, not {dtype}{shape}")
    return np.array(array, order="C", copy=True)


def _restore(group: _Group, history: _History, probe: _Probes | None, arrays: dict, meta: dict):
    """Put a checkpoint's state (`_capture`'s) into fresh group, history and probes; returns
    the _Reached it was written at. Raises CheckpointError (or KeyError, ...) when it does not
    fit; the state may then be half restored."""
    reached = _Reached(int(meta["iteration"]), int(meta["check"]), float(meta["seconds"]))
    if not (0 < reached.iteration <= history.losses.shape[1]):
        raise CheckpointError(f"iteration {reached.iteration} is out of range")
    if not (0 <= reached.check <= history.train_acc.shape[1]):
        raise CheckpointError(f"check {reached.check} is out of range")
    group.params["W1"][...] = _fit(arrays["group.W1"], group.params["W1"])
    group.flat[...] = _fit(arrays["group.flat"], group.flat)
    group.lr = _fit(arrays["group.lr"], group.lr)
    group.alive[...] = _fit(arrays["group.alive"], group.alive)
    group._push_learning_rates()
    for i, bn_param in enumerate(group.bn_params):
        for key in ("running_mean", "running_var"):
            bn_param[key] = _fit(arrays[f"bn.{i}.{key}"], bn_param[key])
    _restore_optimizer(group, arrays, meta["optimizer"])
    for pair, states in zip(group.rngs, meta["rngs"], strict=True):
        for generator, state in zip(pair, states, strict=True):
            generator.bit_generator.state = state
    for key in ("losses", "train_acc", "val_acc", "diverged_at", "best_val", "best_check"):
        getattr(history, key)[...] = _fit(arrays[f"history.{key}"], getattr(history, key))
    for key, value in history.best["params"].items():
        value[...] = _fit(arrays[f"best.params.{key}"], value)
    for i, (mean, var) in enumerate(history.best["stats"]):
        mean[...] = _fit(arrays[f"best.stats.{i}.mean"], mean)
        var[...] = _fit(arrays[f"best.stats.{i}.var"], var)
    _restore_probes(group, probe, arrays, meta["probe"])
    return reached


def _restore_optimizer(group: _Group, arrays: dict, saved: dict) -> None:
    """The update rules' moments and step counts, block by block."""
    if set(saved) != set(group.updaters):
        raise CheckpointError(f"optimizer parts {sorted(saved)} differ")
    for name, updater in group.updaters.items():
        w = group.params["W1"] if name == "W1" else group.flat
        blocks = zip(updater.blocks, updater.states, saved[name], strict=True)
        for b, (blk, state, entry) in enumerate(blocks):
            for key in entry["arrays"]:
                if key not in updater.state_arrays:
                    raise CheckpointError(f"{key!r} is no state of {group.settings.update_rule}")
                shape = w.shape if updater.whole else w[blk].shape
                state[key] = _fit(arrays[f"opt.{name}.{b}.{key}"], shape, group.dtype)
            if entry["t"] is not None:
                state["t"] = int(entry["t"])


def _restore_probes(group: _Group, probe: _Probes | None, arrays: dict, saved) -> None:
    """The probe records so far and the parameters the next probed update ratio needs."""
    if (probe is None) != (saved is None):
        raise CheckpointError("probes were on in one and off in the other")
    if probe is None:
        return
    if len(saved["layers"]) != group.K or len(saved["landscape"]) != group.K:
        raise CheckpointError("probe records of another number of networks")
    probe.layers = [{(r["iteration"], r["layer"]): r for r in net} for net in saved["layers"]]
    probe.landscape = [list(net) for net in saved["landscape"]]
    if len(saved["noise_rngs"]) != len(probe.noise_rngs):
        raise CheckpointError("probe noise streams of another number of networks")
    for generator, state in zip(probe.noise_rngs, saved["noise_rngs"], strict=True):
        generator.bit_generator.state = state
    probe.prev = None
    if saved["prev"]:
        template = _stacked_copy(group)
        probe.prev = {key: _fit(arrays[f"probe.prev.{key}"], v) for key, v in template.items()}
