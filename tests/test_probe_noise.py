"""Noisy batch norm is probed with its noise: the minibatch probes (ICS, landscape) equal the
model's own training-step arithmetic with the same draws, the draws come from the probes' own
stream, and training is the same bit for bit with probes on or off."""

import numpy as np
import pytest
from fakecifar import learnable_splits
from small import solver_settings

from bnexp import model, probes
from bnexp.model import NetSpec, StepDraws
from bnexp.plan import numpy_plan, step_generators
from bnexp.probes import ProbeSettings
from bnexp.train import Member, train_group

EPS = 1e-5
K = 3


def _setup(seed=0, N=12, D=7, hidden=(6, 5, 4), C=4):
    """A random stack of K noisy-BN nets with non-trivial gamma and beta, a batch and labels."""
    rng = np.random.default_rng(seed)
    spec = NetSpec(D, hidden, C, normalization="noisy_batchnorm")
    normals = [rng.standard_normal((K, *s)) for s in model.weight_shapes(spec)]
    params = model.init_params(spec, normals, np.linspace(0.4, 1.2, K), np.float64)
    for key in params:
        if not key.startswith("W"):
            params[key] = params[key] + 0.3 * rng.standard_normal(params[key].shape)
    return spec, params, rng.standard_normal((N, D)), rng.integers(0, C, N)


def _draws(spec, seed0=10):
    """Two independent noise draws (strength 1) from the probes' streams of K seeds."""
    rngs = [probes.probe_generator(seed0 + k) for k in range(K)]
    strength = np.ones(K)
    return (
        probes.probe_noise(spec, rngs, strength, np.float64),
        probes.probe_noise(spec, rngs, strength, np.float64),
    )


def _model_grads(spec, params, X, y, noise):
    """The training step's arithmetic (`model.loss_and_grads` with the step's draws)."""
    bn = model.init_bn_params(spec, (K,), np.float64)
    return model.loss_and_grads(
        spec, params, X, y, bn, draws=None if noise is None else StepDraws(noise=noise)
    )


def _layer_of(key: str) -> int:
    return int(key.lstrip("Wbgamet"))


def _update(spec, params, X, y, size):
    _, grads = _model_grads(spec, params, X, y, None)
    return {key: v - size * np.sign(grads[key]) for key, v in params.items()}


def test_ics_with_noise_equals_the_model_with_the_moved_layers_and_their_next_draw():
    spec, params, X, y = _setup()
    noise, after = _draws(spec)
    new = _update(spec, params, X, y, 0.05)
    records = probes.ics(spec, params, new, X, y, EPS, noise, after)
    _, grads = _model_grads(spec, params, X, y, noise)
    for i in range(1, spec.num_layers + 1):
        # Layers before i moved: their new parameters and their next draw; layers i.. unchanged.
        mixed = {key: (new if _layer_of(key) < i else params)[key] for key in params}
        mixed_noise = [after[j] if j + 1 < i else noise[j] for j in range(len(noise))]
        _, grads_mixed = _model_grads(spec, mixed, X, y, mixed_noise)
        for k in range(K):
            g, g2 = grads[f"W{i}"][k].ravel(), grads_mixed[f"W{i}"][k].ravel()
            r = records[k * spec.num_layers + i - 1]
            assert r["ics_l2"] == pytest.approx(np.linalg.norm(g - g2), rel=1e-9, abs=1e-14)
            cos = g @ g2 / (np.linalg.norm(g) * np.linalg.norm(g2))
            assert r["ics_cos"] == pytest.approx(cos, rel=1e-9)


def test_the_noise_makes_the_covariate_shift_of_noisy_batch_norm_larger():
    # A small update: without noise ICS comes from the moved parameters only; the step-to-step
    # change of the noise adds a shift of its own (Santurkar et al.'s noisy BN, large ICS).
    spec, params, X, y = _setup(seed=3)
    noise, after = _draws(spec)
    new = _update(spec, params, X, y, 1e-4)
    plain = probes.ics(spec, params, new, X, y, EPS)
    noisy = probes.ics(spec, params, new, X, y, EPS, noise, after)
    deep = [(a, b) for a, b in zip(plain, noisy, strict=True) if a["layer"] > 1]
    assert all(b["ics_l2"] > 3 * a["ics_l2"] for a, b in deep)
    assert all(b["ics_cos"] < a["ics_cos"] for a, b in deep)
    # The same draw before and after: only the parameters moved, as without noise (not equal:
    # the noise rescales the gradients).
    same = probes.ics(spec, params, new, X, y, EPS, noise)
    assert all(s["ics_l2"] < b["ics_l2"] for s, (_, b) in zip(same[1:], deep, strict=False))


def test_landscape_with_noise_moves_the_parameters_under_the_same_draw():
    spec, params, X, y = _setup(seed=5)
    noise, _ = _draws(spec)
    lr = np.array([1e-3, 5e-3, 2e-2])
    factors = (0.0, 1.0, 30.0)
    records = probes.landscape(spec, params, X, y, EPS, lr, factors, noise=noise)
    loss, grads = _model_grads(spec, params, X, y, noise)
    plain_loss, _ = _model_grads(spec, params, X, y, None)
    for k, r in enumerate(records):
        assert r["loss"] == pytest.approx(loss[k], rel=1e-12)
        assert abs(r["loss"] - plain_loss[k]) > 1e-6  # the noise is applied
        norm = np.sqrt(sum(np.sum(g[k] ** 2) for g in grads.values()))
        assert r["grad_norm"] == pytest.approx(norm, rel=1e-10)
        for j, factor in enumerate(factors):
            moved = {key: v - factor * lr[k] * grads[key] for key, v in params.items()}
            loss_m, _ = _model_grads(spec, moved, X, y, noise)
            assert r["losses"][j] == pytest.approx(loss_m[k], rel=1e-10)


def test_probe_noise_is_the_training_distribution_from_its_own_stream():
    spec = NetSpec(7, (6, 5), 4, normalization="noisy_batchnorm")
    a = probes.probe_noise(spec, [probes.probe_generator(1)], np.array([0.5]), np.float32)
    b = probes.probe_noise(spec, [probes.probe_generator(1)], np.array([0.5]), np.float32)
    assert [s.shape for s, _ in a] == [(1, 6), (1, 5)] and a[0][0].dtype == np.float32
    assert all(
        np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True)
    )
    # The same draw as a training step's noise stream would give from the same generator state.
    ref = model.draw_step(spec, 1, np.float32, None, [0.5], [(None, probes.probe_generator(1))])
    assert all(np.array_equal(x[0], r[0]) for x, r in zip(a, ref.noise, strict=True))
    # Not training's stream: child (2, 1) of the same seed draws other numbers.
    train = np.random.default_rng(np.random.SeedSequence(1, spawn_key=(2, 1)))
    assert not np.array_equal(a[0][0], 1 + 0.5 * train.random((1, 11))[:, :6])
    assert probes.probe_noise(NetSpec(7, (6,), 4, True), [], np.ones(1), np.float64) is None


# --- in the training loop ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    return learnable_splits()


def _solver(**kw):
    return solver_settings(**{"lr_decay": 1.0, "dtype": "float64", **kw})


def _members(spec, data, solver, seeds):
    iters = solver.num_iterations(data.X_train.shape[0])
    return [
        Member(5e-2, 1e-3, numpy_plan(s, spec, iters, solver.batch_size, 100), bn_noise=0.7)
        for s in seeds
    ]


@pytest.mark.parametrize("seeds", [(4, 4), (4, 5)], ids=["wide", "stacked"])
def test_noisy_training_is_the_same_with_probes_on_or_off(data, seeds):
    spec = NetSpec(3072, (16, 16), 10, normalization="noisy_batchnorm")
    solver = _solver()
    members = _members(spec, data, solver, seeds)
    plain = train_group(spec, members, data, solver)
    probed = train_group(
        spec, members, data, solver, probe_settings=ProbeSettings(2, 30, True, True)
    )
    for a, b in zip(plain, probed, strict=True):
        assert a.loss_history.tobytes() == b.loss_history.tobytes()
        assert a.val_acc_history == b.val_acc_history and a.test_acc == b.test_acc
        assert any(r.get("ics_l2") for r in b.probe_layers)


def test_the_loop_probes_with_two_draws_per_step_from_the_probe_stream(data):
    # SGD in float64: the parameters after update 0 are computed here directly, and the noise of
    # the probe at iteration 0 is the first two draws of each network's probe stream.
    spec = NetSpec(3072, (16, 16), 10, normalization="noisy_batchnorm")
    solver = _solver(update_rule="sgd")
    members = _members(spec, data, solver, (4, 4))
    results = train_group(
        spec, members, data, solver, probe_settings=ProbeSettings(1, 30, True, True)
    )
    normals = [np.stack([m.plan.normals[i] for m in members]) for i in range(spec.num_layers)]
    w0 = model.init_params(spec, normals, np.array([5e-2, 5e-2]), np.float64)
    rows = members[0].plan.batch_indices[0]
    xb, yb = data.X_train[rows], data.y_train[rows]
    streams = [step_generators(m.plan) for m in members]
    train_noise = model.draw_step(spec, 20, np.float64, None, [0.7] * 2, streams)
    bn = model.init_bn_params(spec, (2,), np.float64)
    _, grads = model.loss_and_grads(spec, w0, xb, yb, bn, draws=train_noise)
    w1 = {k: v - 1e-3 * grads[k] for k, v in w0.items()}
    rngs = [probes.probe_generator(4), probes.probe_generator(4)]
    noise = probes.probe_noise(spec, rngs, np.full(2, 0.7), np.float64)
    after = probes.probe_noise(spec, rngs, np.full(2, 0.7), np.float64)
    want_ics = probes.ics(spec, w0, w1, xb, yb, EPS, noise, after)
    want_land = probes.landscape(spec, w0, xb, yb, EPS, np.full(2, 1e-3), noise=noise)
    for net, result in enumerate(results):
        at = {(r["iteration"], r["layer"]): r for r in result.probe_layers}
        for want in want_ics:
            if want["net"] == net:
                got = at[(0, want["layer"])]
                assert got["ics_l2"] == pytest.approx(want["ics_l2"], rel=1e-7, abs=1e-12)
        got = result.probe_landscape[0]
        assert got["losses"] == pytest.approx(want_land[net]["losses"], rel=1e-9)
