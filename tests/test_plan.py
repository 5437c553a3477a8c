"""Random plans: paired numpy streams and the literal CS231n notebook replay."""

import numpy as np
import pytest

from bnexp import plan
from bnexp.model import NetSpec, weight_shapes

BN = NetSpec(12, (5, 4), 3, batchnorm=True)
BASE = NetSpec(12, (5, 4), 3, batchnorm=False)


def test_numpy_plan_is_a_function_of_seed_and_shapes_only():
    a = plan.numpy_plan(7, BN, 30, 8, 40)
    b = plan.numpy_plan(7, BASE, 30, 8, 40)  # the paired baseline
    c = plan.numpy_plan(8, BN, 30, 8, 40)
    for za, zb, zc, shape in zip(a.normals, b.normals, c.normals, weight_shapes(BN), strict=True):
        assert za.shape == shape and za.dtype == np.float64
        np.testing.assert_array_equal(za, zb)
        assert not np.array_equal(za, zc)
    np.testing.assert_array_equal(a.batch_indices, b.batch_indices)
    assert a.batch_indices.shape == (30, 8) and a.batch_indices.dtype == np.int64
    assert a.batch_indices.min() >= 0 and a.batch_indices.max() < 40
    # Independent streams: the minibatches do not depend on how many normals were drawn.
    wider = plan.numpy_plan(7, NetSpec(12, (9, 9, 9), 3, True), 30, 8, 40)
    np.testing.assert_array_equal(wider.batch_indices, a.batch_indices)
    # Reference: the weights stream is child 0 of SeedSequence(seed).
    child = np.random.SeedSequence(7).spawn(2)[0]
    np.testing.assert_array_equal(
        a.normals[0], np.random.default_rng(child).standard_normal((12, 5))
    )


def test_shuffle_visits_every_example_once_per_epoch():
    p = plan.numpy_plan(3, BN, 10, 4, 10, sampling="shuffle")  # 2 iterations per epoch
    per_epoch = p.batch_indices.reshape(5, 8)
    for epoch in per_epoch:
        assert len(set(epoch.tolist())) == 8  # no repeats within an epoch (2 examples left out)
    assert not np.array_equal(per_epoch[0], per_epoch[1])


def test_plan_asserts_what_the_config_guarantees():
    # The config refuses these with one line (tests/test_config.py); here they are invariants.
    with pytest.raises(AssertionError, match="sampling"):
        plan.numpy_plan(0, BN, 3, 4, 10, sampling="bootstrap")
    with pytest.raises(AssertionError):
        plan.numpy_plan(0, BN, 3, 20, 10, sampling="shuffle")
    with pytest.raises(AssertionError):
        plan.numpy_plan(0, BN, 3, 0, 10)


def test_cs231n_plans_replay_the_notebook_draw_order():
    small = NetSpec(6, (4, 3), 2, batchnorm=True)
    groups = [
        [(small, 5, 3, 20), (NetSpec(6, (4, 3), 2, batchnorm=False), 5, 3, 20)],
        [(small, 4, 2, 20), (small, 4, 2, 20)],
    ]
    plans = plan.cs231n_plans(231, groups)

    # The notebook, literally: build both models of a group, then train one Solver after the other.
    np.random.seed(231)  # noqa: NPY002
    for group, group_plans in zip(groups, plans, strict=True):
        weights = [
            [np.random.randn(*shape) for shape in weight_shapes(spec)]  # noqa: NPY002
            for spec, *_ in group
        ]
        for (_, iters, batch, num_train), w, p in zip(group, weights, group_plans, strict=True):
            batches = [np.random.choice(num_train, batch) for _ in range(iters)]  # noqa: NPY002
            for expected, got in zip(w, p.normals, strict=True):
                np.testing.assert_array_equal(got, expected)
            np.testing.assert_array_equal(p.batch_indices, np.array(batches))
