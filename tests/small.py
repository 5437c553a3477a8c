"""Small settings shared by tests that train tiny networks on generated data."""

from __future__ import annotations

import types

import numpy as np

from bnexp import fused
from bnexp.data import Splits
from bnexp.train import SolverSettings

#: KEY=VALUE overrides for a tiny experiment on the generated CIFAR-10 (a few seconds).
TINY_OVERRIDES = [
    "data.num_training=400",
    "data.num_validation=100",
    "data.num_test=50",
    "data.num_train=200",
    "model.hidden_dims=[16, 16]",
    "train.epochs=2",
]


def solver_settings(**changes) -> SolverSettings:
    """Solver settings for `train_group` tests: 2 epochs of batch 20 with Adam; `changes` win."""
    base = dict(
        epochs=2,
        batch_size=20,
        update_rule="adam",
        learning_rate=1e-3,
        lr_decay=0.9,
        bn_eval="running",
        bn_momentum=0.9,
        bn_eps=1e-5,
        reg=0.0,
        dtype="float32",
        loss_window=5,
    )
    return SolverSettings(**{**base, **changes})


def teacher_splits(dim=30, classes=4) -> Splits:
    """100/100/100 train/val/test Gaussian examples of `dim` features, labelled by a random
    linear teacher (learnable in a few epochs)."""
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((dim, classes))
    X = rng.standard_normal((300, dim))
    y = (X @ teacher).argmax(axis=1)
    return Splits(X[:100], y[:100], X[100:200], y[100:200], X[200:], y[200:],
                  mean_image=np.zeros(dim), source={})  # fmt: skip


def count_kernel_calls(monkeypatch) -> dict[str, int]:
    """Wrap each compiled kernel (`bnexp.fused`) so its calls are counted in the returned
    {kernel name: calls} (to show the kernels, not NumPy, ran)."""
    names = ("adam", "bn_inference", "bn_batch", "bn_backward")
    counts = dict.fromkeys(names, 0)

    def counting(name, kernel):
        def call(*args):
            counts[name] += 1
            return kernel(*args)

        return call

    compiled = fused._compiled
    everything = {name: getattr(compiled, name) for name in dir(compiled) if name.isupper()}
    everything.update({name: counting(name, getattr(compiled, name)) for name in names})
    monkeypatch.setattr(fused, "_compiled", types.SimpleNamespace(**everything))
    return counts
