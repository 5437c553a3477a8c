"""Per-run random plans: every random number a run consumes, drawn before training starts.

A run needs two kinds of random numbers: the standard normals behind its initial weights and the
minibatch indices of every iteration. Drawing them up front, into a `RunPlan`, makes training a pure
function of (config, plan): a network trained alone or in lockstep with 39 others consumes exactly
the same numbers, whatever the order or process the runs execute in.

Two ways to make plans:

- `numpy_plan` (the default, ``rng: numpy``): independent streams derived from the run's seed with
  `numpy.random.SeedSequence` (child 0 for the weights, child 1 for the minibatches, and child 2
  for the per-step draws of the random layers, see `step_generators`). The streams
  depend only on the seed and the layer shapes, so runs with the same seed and the same layer widths
  get the same standard normals and the same minibatches: a batch-norm net and its baseline, and the
  nets of a weight-scale sweep, differ only in the factor under study (a paired design). Use
  different seeds to get independent replicates.
- `cs231n_plans` (``rng: cs231n``): one legacy `numpy.random.RandomState(seed)` for a whole
  experiment, consumed in the order the CS231n BatchNormalization notebook consumes the global
  generator after ``np.random.seed(seed)``, so the notebook's published numbers can be replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from bnexp.model import NetSpec

#: Minibatch sampling modes: ``replacement`` draws `choice(num_train, batch_size)` independently
#: every iteration (CS231n's Solver); ``shuffle`` walks a fresh permutation of the training set per
#: epoch in consecutive slices (each image once per epoch, the usual deep-learning loader).
SAMPLING_MODES = ("replacement", "shuffle")

#: Where a run's random numbers come from: ``numpy`` (`numpy_plan`, per-run SeedSequence streams)
#: or ``cs231n`` (`cs231n_plans`, the notebook's legacy global generator replayed).
RNG_MODES = ("numpy", "cs231n")


@dataclass(frozen=True)
class RunPlan:
    """The random numbers of one run.

    Attributes
    ----------
    normals : list of np.ndarray
        One float64 standard-normal array per affine layer, shape (din, dout), in layer order; the
        initial weights are ``weight_scale * normals[l]`` (see `bnexp.model.init_params`).
    batch_indices : np.ndarray
        int64, shape (num_iterations, batch_size): the training-set rows of each iteration's
        minibatch.
    seed : int or None
        The seed of the per-step streams (`step_generators`); None for a plan without them
        (the cs231n replay, whose reference has no dropout and no noise).
    """

    normals: list[np.ndarray]
    batch_indices: np.ndarray
    seed: int | None = None


def step_generators(plan: RunPlan) -> tuple[np.random.Generator, np.random.Generator]:
    """Fresh (dropout, noise) generators of a run: children (2, 0) and (2, 1) of its seed.

    Dropout masks and batch-norm noise are drawn step by step while training (drawing them all
    up front would hold num_iterations * batch_size * sum(H) numbers per run), each network from
    its own two streams, so its draws do not depend on the other networks of its group, on
    ``--jobs`` or on whether the other random layer is present. Each call starts the streams
    anew, so training a run twice draws the same numbers.
    """
    if plan.seed is None:
        raise ValueError("step_generators: this plan has no per-step streams (rng=cs231n)")
    return tuple(
        np.random.default_rng(np.random.SeedSequence(plan.seed, spawn_key=(2, i))) for i in range(2)
    )


def iterations_per_epoch(num_train: int, batch_size: int) -> int:
    """Solver iterations per epoch: ``max(num_train // batch_size, 1)`` as CS231n's Solver."""
    return max(num_train // batch_size, 1)


def _check_sizes(num_iterations: int, batch_size: int, num_train: int) -> None:
    """Sizes every plan needs (`bnexp.config` guarantees them for an experiment's runs)."""
    assert num_train >= 1 and batch_size >= 1 and num_iterations >= 0, (
        num_train,
        batch_size,
        num_iterations,
    )


def numpy_plan(
    seed: int,
    spec: NetSpec,
    num_iterations: int,
    batch_size: int,
    num_train: int,
    sampling: str = "replacement",
) -> RunPlan:
    """Draw a run's plan from streams derived from `seed` alone (paired across runs of one seed).

    Parameters
    ----------
    seed : int
        The run's seed; ``SeedSequence(seed)`` child 0 feeds the weights, child 1 the minibatches,
        so the two streams are independent of each other and of the order runs are created in.
    spec : NetSpec
        Architecture; only the layer shapes (`bnexp.model.weight_shapes`) matter, so a batch-norm
        net and its baseline with the same widths get identical normals.
    num_iterations, batch_size, num_train : int
        Solver sizes; the indices are rows of the training subset, in ``[0, num_train)``.
    sampling : {'replacement', 'shuffle'}
        See `SAMPLING_MODES`. 'shuffle' needs ``batch_size <= num_train``.

    Returns
    -------
    RunPlan
        normals (din, dout) float64 per layer; batch_indices (num_iterations, batch_size) int64.
    """
    from bnexp.model import weight_shapes

    _check_sizes(num_iterations, batch_size, num_train)
    weights_seq, batches_seq = np.random.SeedSequence(seed).spawn(2)
    weights_rng = np.random.default_rng(weights_seq)
    normals = [weights_rng.standard_normal(shape) for shape in weight_shapes(spec)]

    batches_rng = np.random.default_rng(batches_seq)
    if sampling == "replacement":
        indices = batches_rng.integers(0, num_train, size=(num_iterations, batch_size))
    elif sampling == "shuffle":
        assert batch_size <= num_train, (batch_size, num_train)  # a config cross-check
        per_epoch = iterations_per_epoch(num_train, batch_size)
        num_epochs = -(-num_iterations // per_epoch)  # ceil: a partial last epoch still needs one
        slices = []
        for _ in range(num_epochs):
            perm = batches_rng.permutation(num_train)
            slices.extend(perm[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch))
        indices = np.array(slices[:num_iterations]).reshape(num_iterations, batch_size)
    else:
        raise AssertionError(f"sampling {sampling!r} is not one of {SAMPLING_MODES}")
    return RunPlan(normals=normals, batch_indices=indices.astype(np.int64), seed=seed)


def cs231n_plans(
    seed: int, groups: list[list[tuple[NetSpec, int, int, int]]]
) -> list[list[RunPlan]]:
    """Replay the CS231n notebook's use of ``np.random.seed(seed)`` for a whole experiment.

    The notebook creates its models in groups (for each weight scale: the batch-norm net, then the
    baseline net) and then trains each model of the group in turn. Every `FullyConnectedNet` draws
    ``np.random.randn(din, dout)`` per layer in layer order when it is built, and every Solver
    iteration draws ``np.random.choice(num_train, batch_size)``; accuracy checks draw nothing
    because the checked training subset is never larger than ``num_train_samples`` (1,000). So, with
    one generator for the experiment, for each group in order: the weights of every run of the group
    (in order), then the minibatch indices of every run of the group (in order, all iterations).

    Parameters
    ----------
    seed : int
        The notebook's ``np.random.seed`` argument (231 in the assignment).
    groups : list of list of (spec, num_iterations, batch_size, num_train)
        The runs, grouped as the notebook creates them, e.g. ``[[bn_run, baseline_run]]`` for the
        deep-network cell, or one such pair per weight scale for the initialisation sweep.

    Returns
    -------
    list of list of RunPlan
        Same nesting as `groups`; normals (din, dout) float64, batch_indices
        (num_iterations, batch_size) int64.
    """
    from bnexp.model import weight_shapes

    # The one sanctioned legacy generator: it reproduces np.random.seed/randn/choice exactly.
    state = np.random.RandomState(seed)
    plans: list[list[RunPlan]] = []
    for group in groups:
        normals = [[state.randn(*shape) for shape in weight_shapes(run[0])] for run in group]
        group_plans = []
        for run, run_normals in zip(group, normals, strict=True):
            _, num_iterations, batch_size, num_train = run
            _check_sizes(num_iterations, batch_size, num_train)
            rows = [state.choice(num_train, batch_size) for _ in range(num_iterations)]
            indices = np.array(rows, dtype=np.int64).reshape(num_iterations, batch_size)
            group_plans.append(RunPlan(normals=run_normals, batch_indices=indices))
        plans.append(group_plans)
    return plans
