"""The compiled Adam kernel (`bnexp.fused`) gives the NumPy formulas' bits, or steps aside.

The reference is the NumPy path of `optim.adam` itself, run with the kernel turned off
(BNEXP_FUSED=0): the kernel promises the same operations in the same order and dtype, so every
comparison here is exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from small import count_kernel_calls, teacher_splits

from bnexp import fused, optim, plan, train
from bnexp.config import load_config
from bnexp.model import NetSpec
from bnexp.sweep import solver_settings


@pytest.fixture(autouse=True)
def loaded(monkeypatch):
    """The kernels on (the extension is built wherever a compiler is: tests/test_build.py)."""
    if not fused.available():
        pytest.skip("bnexp._kernels was not built (no C compiler at install time)")
    monkeypatch.delenv(fused.ENV_FUSED, raising=False)


def _adam_steps(w0, grads, lr, *, use_kernel: bool, monkeypatch):
    """w, m, v after len(grads) in-place Adam steps from w0 (kernel on or off)."""
    monkeypatch.setenv(fused.ENV_FUSED, "1" if use_kernel else "0")
    w, state = w0.copy(), {"learning_rate": lr}
    for g in grads:
        optim.adam(w, g, state, inplace=True)
    return w, state["m"], state["v"]


# (w shape, learning-rate shape or None for a Python float): the layouts the training loop uses.
LAYOUTS = [
    ((6, 7), None),  # one rate
    ((3, 4, 5), (3,)),  # per network of a (K, D, M) stack
    ((4, 9), (4, 1)),  # per network of the flat (K, P) parameters
    ((5, 12), (1, 12)),  # per column of the wide first layer (3072, K * H)
    ((2, 3, 4, 5), (2, 3)),  # two leading network axes
    ((11,), None),  # one axis
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "lr_shape"), LAYOUTS)
def test_kernel_gives_the_numpy_bits(monkeypatch, dtype, shape, lr_shape):
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal(shape).astype(dtype)
    # Gradients over many magnitudes, with exact zeros (v stays 0 there: eps alone divides).
    grads = [
        (rng.standard_normal(shape) * 10.0 ** rng.integers(-8, 2, shape)).astype(dtype)
        for _ in range(5)
    ]
    grads[1][..., 0] = 0
    lr = 1e-3 if lr_shape is None else rng.uniform(1e-4, 1e-1, lr_shape)
    with_kernel = _adam_steps(w0, grads, lr, use_kernel=True, monkeypatch=monkeypatch)
    reference = _adam_steps(w0, grads, lr, use_kernel=False, monkeypatch=monkeypatch)
    for got, want in zip(with_kernel, reference, strict=True):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(with_kernel[0], w0)  # the step did something


def test_kernel_runs_where_it_should_and_steps_aside_elsewhere(monkeypatch):
    monkeypatch.setenv(fused.ENV_FUSED, "1")
    a = np.ones((4, 6), np.float32)

    def step(w, lr=1e-3, **arrays):
        dw, m, v = (arrays.get(k, np.ones_like(w)) for k in ("dw", "m", "v"))
        return fused.adam(w, dw, m, v, lr, 0.9, 0.999, 1e-8, 1)

    assert step(a.copy())
    assert step(a.copy(), lr=np.full((4, 1), 1e-3))
    assert step(a.copy(), lr=np.full((1, 6), 1e-3))
    # A rate that varies along both axes, a strided view, mixed dtypes, integers: NumPy's job.
    assert not step(a.copy(), lr=np.full((4, 6), 1e-3))
    assert not step(np.ones((4, 12), np.float32)[:, ::2])
    assert not step(a.copy(), dw=np.ones((4, 6)))
    assert not step(np.ones((4, 6), np.int64))
    monkeypatch.setenv(fused.ENV_FUSED, "0")
    assert not fused.enabled() and not step(a.copy())


def test_nan_in_one_network_stays_there(monkeypatch):
    monkeypatch.setenv(fused.ENV_FUSED, "1")
    w = np.ones((3, 4), np.float32)
    g = np.full((3, 4), 0.5, np.float32)
    g[1, 2] = np.nan
    optim.adam(w, g, {"learning_rate": np.full((3, 1), 1e-2)}, inplace=True)
    assert np.isnan(w[1, 2]) and np.isfinite(np.delete(w.ravel(), 6)).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batchnorm", [True, False])
def test_training_with_the_kernel_is_training_without_it(monkeypatch, dtype, batchnorm):
    """A lockstep group (wide first layer, per-network rates) trains to the same bits, and its
    checks in every bn_eval mode (running statistics, population statistics, whole-set batch
    statistics: the batch-norm kernels in test, batch and train mode) agree too."""
    data = teacher_splits()
    overrides = [f"model.dtype={dtype}", "train.epochs=3", "train.batch_size=10"]
    cfg = load_config(None, [*overrides, f"train.bn_eval_all={str(batchnorm).lower()}"])
    settings = dataclasses.replace(solver_settings(cfg), lr_decay=0.9)
    spec = NetSpec(30, (16, 12), 4, batchnorm)
    iters = settings.num_iterations(100)
    shared = plan.numpy_plan(0, spec, iters, 10, 100)
    members = [train.Member(s, lr, shared) for s, lr in [(0.05, 1e-3), (0.3, 3e-3), (1.0, 1e-2)]]
    calls = count_kernel_calls(monkeypatch)

    def run(flag):
        monkeypatch.setenv(fused.ENV_FUSED, flag)
        return train.train_group(spec, members, data, settings)

    with_kernel, without = run("1"), run("0")
    for a, b in zip(with_kernel, without, strict=True):
        assert a.loss_history.tobytes() == b.loss_history.tobytes()
        assert a.train_acc_history == b.train_acc_history
        assert a.val_acc_history == b.val_acc_history
        assert a.test_acc == b.test_acc and a.every_mode == b.every_mode
    assert len({acc for r in without for acc in r.val_acc_history}) > 3
    assert calls["adam"] > 0
    bn_kernels = [n for name, n in calls.items() if name.startswith("bn_")]
    assert all(bn_kernels) == batchnorm, calls
    assert len(with_kernel[0].every_mode) > 0 or not batchnorm


def test_without_the_extension_numpy_runs(monkeypatch):
    monkeypatch.setattr(fused, "_compiled", None)
    a = np.ones((4, 6), np.float32)
    assert not fused.enabled()
    assert not fused.adam(a, a.copy(), a.copy(), a.copy(), 1e-3, 0.9, 0.999, 1e-8, 1)
