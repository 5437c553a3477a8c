"""Small settings shared by tests that train tiny networks on generated data."""

from __future__ import annotations

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
