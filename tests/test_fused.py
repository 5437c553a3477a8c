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

pytest.importorskip("numba", reason="the fused kernel needs numba (the 'fast' extra)")


@pytest.fixture(autouse=True)
def loaded(monkeypatch):
    """The kernel loaded in this process (as the sweep loads it for a large experiment)."""
    monkeypatch.delenv(fused.ENV_FUSED, raising=False)
    assert fused.warm_up(["float32", "float64"])


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
    bn_kernels = [n for name, n in calls.items() if name.startswith("batchnorm")]
    assert all(bn_kernels) == batchnorm, calls
    assert len(with_kernel[0].every_mode) > 0 or not batchnorm


def test_warm_up_compiles_before_use(monkeypatch):
    monkeypatch.setenv(fused.ENV_FUSED, "1")
    fused.warm_up(["float32", "float64"])
    for kernel in fused._loaded:
        dtypes = {sig[0].dtype.name for sig in kernel.signatures}
        assert {"float32", "float64"} <= dtypes, kernel


def test_the_sweep_loads_the_kernel_only_where_it_pays(monkeypatch):
    """The default sweep (1.4e9 Adam element-steps) loads it; a tiny experiment does not, since
    numba's start-up would cost more than the kernel saves (`fused.MIN_ELEMENT_STEPS`)."""
    from bnexp.config import expand_runs
    from bnexp.sweep import warm_up_kernels

    def loads(overrides):
        return warm_up_kernels(expand_runs(load_config(None, overrides)))

    assert loads([])
    assert not loads(["train.epochs=1", "data.num_train=100"])
    assert not loads(["train.update_rule=sgd"])
    monkeypatch.setenv(fused.ENV_FUSED, "0")
    assert not loads([])


def test_the_sweep_compiles_for_every_run_s_dtype(monkeypatch):
    """Batch norm's kernels serve runs of every update rule, so a float64 SGD run beside the
    float32 Adam runs that pay for the load gets them compiled before the fork too (a worker
    would otherwise compile on its own, for seconds)."""
    from bnexp.config import expand_runs
    from bnexp.sweep import warm_up_kernels

    asked = []
    monkeypatch.setattr(fused, "warm_up", lambda dtypes: asked.append(list(dtypes)) or True)
    sgd64 = ["train.update_rule=sgd", "model.dtype=float64"]
    runs = expand_runs(load_config(None, [])) + expand_runs(load_config(None, sgd64))
    assert warm_up_kernels(runs)
    assert asked == [["float32", "float64"]]


def test_a_process_that_did_not_load_it_runs_numpy(monkeypatch):
    monkeypatch.setattr(fused, "_loaded", None)
    a = np.ones((4, 6), np.float32)
    assert not fused.enabled()
    assert not fused.adam(a, a.copy(), a.copy(), a.copy(), 1e-3, 0.9, 0.999, 1e-8, 1)


def test_warm_up_keeps_scipy_out_and_importable(tmp_path):
    """numba's first compilation imports SciPy (0.3 s of start-up) unless `warm_up` hides it; a
    stand-in `scipy` package records whether it was imported, whether or not SciPy is installed."""
    import subprocess
    import sys

    (tmp_path / "scipy").mkdir()
    marker = tmp_path / "imported"
    (tmp_path / "scipy" / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write('x')\n")
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from bnexp import fused\n"
        "assert fused.warm_up(['float32'])\n"
        f"assert not __import__('os').path.exists({str(marker)!r}), 'scipy imported'\n"
        "import scipy\n"  # importable again afterwards
        f"assert __import__('os').path.exists({str(marker)!r})\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != fused.ENV_FUSED}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
