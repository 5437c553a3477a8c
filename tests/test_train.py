"""The lockstep engine against one-network-at-a-time training, divergence, checks, BN evaluation."""

import dataclasses

import numpy as np
import pytest

from bnexp import model, plan, train
from bnexp.config import load_config
from bnexp.data import Splits
from bnexp.model import NetSpec
from bnexp.sweep import solver_settings

D, C, NUM_TRAIN, BATCH = 40, 4, 120, 12  # 10 iterations per epoch
SCALES = [1e-2, 5e-2, 0.1, 0.3, 1.0]
LRS = [1e-3, 3e-3, 5e-4, 1e-2, 2e-3]


@pytest.fixture(scope="module")
def data():
    """Learnable synthetic data: labels from a random linear teacher, so accuracies move."""
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((D, C))
    X = rng.standard_normal((NUM_TRAIN + 200, D))
    y = (X @ teacher + 0.5 * rng.standard_normal((len(X), C))).argmax(axis=1)
    return splits(X[:120], y[:120], X[120:220], y[120:220], X[220:], y[220:])


def splits(*arrays):
    """X_train, y_train, X_val, y_val, X_test, y_test as the engine's data object."""
    return Splits(*arrays, mean_image=np.zeros(D), source={})


def _settings(**kw):
    """The default experiment's solver settings in float64, 3 epochs of batch BATCH, then kw."""
    cfg = load_config(None, ["model.dtype=float64", "train.epochs=3", f"train.batch_size={BATCH}"])
    return dataclasses.replace(solver_settings(cfg), **kw)


def _members(spec, settings, shared, scales=SCALES, lrs=LRS):
    iters = settings.num_iterations(NUM_TRAIN)
    plans = [
        plan.numpy_plan(0 if shared else 10 + k, spec, iters, BATCH, NUM_TRAIN)
        for k in range(len(scales))
    ]
    return [train.Member(s, lr, p) for s, lr, p in zip(scales, lrs, plans, strict=True)]


def _same_run(a, b, exact=False):
    if exact:
        np.testing.assert_array_equal(a.loss_history, b.loss_history)
    else:
        np.testing.assert_allclose(a.loss_history, b.loss_history, rtol=1e-10, atol=0)
    assert a.train_acc_history == b.train_acc_history
    assert a.val_acc_history == b.val_acc_history
    assert a.test_acc == b.test_acc and a.best_check == b.best_check


@pytest.mark.parametrize("batchnorm", [True, False])
@pytest.mark.parametrize("shared", [True, False], ids=["wide", "batched"])
def test_lockstep_matches_one_at_a_time(data, batchnorm, shared):
    spec = NetSpec(D, (16, 12, 10), C, batchnorm)
    settings = _settings(lr_decay=0.9, reg=1e-3)
    members = _members(spec, settings, shared)
    together = train.train_group(spec, members, data, settings)
    for member, result in zip(members, together, strict=True):
        (alone,) = train.train_group(spec, [member], data, settings)
        _same_run(result, alone)
        assert not result.diverged
    # The accuracies move (otherwise "identical histories" would be a weak statement).
    assert len({acc for r in together for acc in r.val_acc_history}) > 5


@pytest.mark.parametrize("batchnorm", [True, False])
def test_diverging_network_is_contained(data, batchnorm):
    spec = NetSpec(D, (16, 12, 10), C, batchnorm)
    settings = _settings()
    members = _members(spec, settings, shared=True)
    blowing_up = train.Member(1.0, 1e250, members[2].plan)  # absurd learning rate
    with_bad = train.train_group(spec, [*members[:2], blowing_up, *members[3:]], data, settings)
    with_good = train.train_group(spec, members, data, settings)

    bad = with_bad[2]
    assert bad.diverged and bad.diverged_iteration is not None
    t = bad.diverged_iteration
    assert np.isfinite(bad.loss_history[:t]).all() and np.isnan(bad.loss_history[t:]).all()
    later = [i for i, c in enumerate(bad.check_iterations) if c >= t]
    assert later and all(np.isnan(bad.val_acc_history[i]) for i in later)
    assert bad.test_acc is not None  # from the snapshot before the divergence (or the init)
    for k in (0, 1, 3, 4):
        # Same group shapes, so the arithmetic is the same: bit for bit, nothing leaked.
        _same_run(with_bad[k], with_good[k], exact=True)
        assert not with_bad[k].diverged
        (alone,) = train.train_group(spec, [members[k]], data, settings)
        _same_run(with_bad[k], alone)


def test_check_schedule_and_best_val_snapshot(data):
    spec = NetSpec(D, (16, 12), C, batchnorm=True)
    settings = _settings(epochs=4)
    # Test split = validation split: the best-val snapshot (params + the BN statistics of that
    # check) must score on "test" exactly what it scored at its check.
    same = splits(data.X_train, data.y_train, data.X_val, data.y_val, data.X_val, data.y_val)
    results = train.train_group(spec, _members(spec, settings, shared=True), same, settings)
    for r in results:
        assert r.check_iterations == [0, 9, 19, 29, 39]  # epochs + 1 checks
        assert len(r.train_acc_history) == len(r.val_acc_history) == 5
        assert r.loss_history.shape == (40,)
        best = max(r.val_acc_history)
        assert r.best_val_acc == best
        assert r.best_check == r.val_acc_history.index(best)  # strict >: the first of any ties
        assert r.test_acc == r.val_acc_history[r.best_check]
        assert r.best_train_acc == max(r.train_acc_history)
        assert r.final_train_loss == pytest.approx(np.mean(r.loss_history[-100:]))
    assert train.check_schedule(5, 1) == [0, 1, 2, 3, 4]  # one iteration per epoch: no extra


def _direct_scores(params, X_train, X_eval, unbiased):
    """Scores of one BN network evaluated by hand: Algorithm 2 statistics from consecutive
    training minibatches of BATCH (unbiased or, for the control, biased variance), test mode."""
    stats, h_train = [], X_train
    for layer in (1, 2):
        a = h_train @ params[f"W{layer}"] + params[f"b{layer}"]
        batches = a[: (len(a) // BATCH) * BATCH].reshape(-1, BATCH, a.shape[1])
        mu_b, var_b = batches.mean(axis=1), batches.var(axis=1)
        factor = BATCH / (BATCH - 1) if unbiased else 1.0
        stats.append((mu_b.mean(axis=0), factor * var_b.mean(axis=0)))
        # The next layer's batch statistics see this layer normalised with each batch's own.
        norm = (batches - mu_b[:, None]) / np.sqrt(var_b[:, None] + 1e-5)
        h_train = np.maximum(norm * params[f"gamma{layer}"] + params[f"beta{layer}"], 0)
        h_train = h_train.reshape(-1, a.shape[1])
    h = X_eval
    for layer, (mu, var) in zip((1, 2), stats, strict=True):
        a = h @ params[f"W{layer}"] + params[f"b{layer}"]
        a = (a - mu) / np.sqrt(var + 1e-5) * params[f"gamma{layer}"] + params[f"beta{layer}"]
        h = np.maximum(a, 0)
    return h @ params["W3"] + params["b3"]


def test_population_statistics_through_the_training_path(data):
    # Learning rate 0: the parameters stay at their initial values (Adam's step is exactly 0), so
    # every check's population statistics can be computed by hand from the plan's normals.
    spec = NetSpec(D, (16, 12), C, batchnorm=True)
    settings = _settings(bn_eval="population", epochs=1)
    members = [
        train.Member(m.weight_scale, 0.0, m.plan) for m in _members(spec, settings, shared=True)
    ]
    results = train.train_group(spec, members, data, settings)
    differs = False
    for member, result in zip(members, results, strict=True):
        params = model.init_params(spec, member.plan.normals, member.weight_scale, np.float64)
        for X, y, history in (
            (data.X_train, data.y_train, result.train_acc_history),
            (data.X_val, data.y_val, result.val_acc_history),
        ):
            scores = _direct_scores(params, data.X_train, X, unbiased=True)
            expected = float(np.mean(scores.argmax(axis=1) == y))
            assert history == [expected] * len(history)
            biased = _direct_scores(params, data.X_train, X, unbiased=False)
            differs |= float(np.mean(biased.argmax(axis=1) == y)) != expected
    assert differs  # the check can tell the m/(m-1) factor (a mutation of it fails this test)


@pytest.mark.parametrize("bn_eval", ["population", "batch"])
def test_other_bn_eval_modes_train_and_differ_from_running(data, bn_eval):
    spec = NetSpec(D, (16, 12), C, batchnorm=True)
    members = _members(spec, _settings(), shared=True)[:2]
    running = train.train_group(spec, members, data, _settings())
    other = train.train_group(spec, members, data, _settings(bn_eval=bn_eval))
    for a, b in zip(running, other, strict=True):
        np.testing.assert_array_equal(a.loss_history, b.loss_history)  # training is unchanged
        assert all(0 <= v <= 1 for v in b.val_acc_history)
    assert any(a.val_acc_history != b.val_acc_history for a, b in zip(running, other, strict=True))


def test_reference_precision_mode_rounds_init_to_float32(data):
    spec = NetSpec(D, (16,), C, batchnorm=False)
    settings = _settings(init_dtype="float32", compute_dtype="float64", epochs=1)
    member = _members(spec, settings, shared=True)[0]
    group = train._Group(spec, [member], settings, wide=True)
    assert group.params["W1"].dtype == np.float64
    expected = (SCALES[0] * member.plan.normals[0]).astype(np.float32).astype(np.float64)
    np.testing.assert_array_equal(group.params["W1"], expected)
    (result,) = train.train_group(spec, [member], data, settings)
    assert np.isfinite(result.loss_history).all()


def test_learning_rate_decays_after_the_last_step_of_each_epoch(data):
    # Independent reference: the same run without decay. Steps 0 .. per_epoch - 1 use the initial
    # rate, so the losses up to iteration per_epoch (params after those steps) are identical;
    # the first step of epoch 2 uses the decayed rate, so the loss after it differs.
    spec = NetSpec(D, (16, 12), C, batchnorm=True)
    per_epoch = NUM_TRAIN // BATCH
    members = _members(spec, _settings(epochs=2), shared=True)[:2]
    plain = train.train_group(spec, members, data, _settings(epochs=2))
    decayed = train.train_group(spec, members, data, _settings(epochs=2, lr_decay=0.1))
    for a, b in zip(plain, decayed, strict=True):
        np.testing.assert_array_equal(
            a.loss_history[: per_epoch + 1], b.loss_history[: per_epoch + 1]
        )
        assert a.loss_history[per_epoch + 1] != b.loss_history[per_epoch + 1]
