"""The training data is held once: float32 features are the float64 features rounded, computed
without a float64 copy, read-only; worker processes train on the parent's pages (no copy)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pytest
from fakecifar import make_images, write_binary

from bnexp import data, executor, plan, train
from bnexp.config import expand_runs, load_config
from bnexp.model import NetSpec
from bnexp.sweep import feature_dtype, solver_settings

SETTINGS = {"num_training": 150, "num_validation": 30, "num_test": 20, "num_train_subset": 60}


@pytest.mark.filterwarnings("ignore:.*test images")
@pytest.mark.parametrize("subtract_mean", [True, False])
def test_float32_features_are_the_float64_features_rounded(tmp_path, monkeypatch, subtract_mean):
    x, y, xt, yt = make_images(np.random.default_rng(3))
    root = write_binary(tmp_path / "d", x, y, xt, yt)
    monkeypatch.setattr(data, "FEATURE_BLOCK", 7)  # several blocks and a partial last one
    # The reference: one float64 array, np.mean over it, the difference rounded at the end.
    mean = x[:150].astype(np.float64).mean(axis=0)

    def reference(rows):
        f = rows.astype(np.float64)
        return (f - mean if subtract_mean else f).astype(np.float32)

    cache = tmp_path / "cache"
    for _ in ("cold", "warm"):  # built from the files, then from the prepared-split cache
        s = data.load_splits(
            root, cache_dir=cache, dtype="float32", subtract_mean=subtract_mean, **SETTINGS
        )
        for got, rows in ((s.X_train, x[:60]), (s.X_val, x[150:180]), (s.X_test, xt[:20])):
            assert got.dtype == np.float32 and not got.flags.writeable
            np.testing.assert_array_equal(got.view(np.uint32), reference(rows).view(np.uint32))
    s64 = data.load_splits(root, cache_dir=cache, subtract_mean=subtract_mean, **SETTINGS)
    assert s64.X_train.dtype == np.float64 and not s64.X_train.flags.writeable
    np.testing.assert_array_equal(s64.X_train, x[:60] - (mean if subtract_mean else 0.0))


@pytest.mark.filterwarnings("ignore:.*test images")
def test_an_unknown_feature_dtype_is_a_config_error(tmp_path):
    x, y, xt, yt = make_images(np.random.default_rng(3))
    root = write_binary(tmp_path / "d", x, y, xt, yt)
    with pytest.raises(data.ConfigError, match="float16"):
        data.load_splits(root, use_cache=False, dtype="float16", **SETTINGS)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "float32"),
        (["model.dtype=float64"], "float64"),
        (["rng=cs231n"], "float64"),  # the reference computes in float64
    ],
)
def test_features_are_loaded_in_the_dtype_the_runs_compute_in(overrides, expected):
    runs = expand_runs(load_config(None, overrides))
    assert {solver_settings(r.cfg).compute_np_dtype.name for r in runs} == {expected}
    assert feature_dtype(runs) == expected


# --- workers read the parent's copy -----------------------------------------------------------

N, D, HIDDEN = 2048, 3072, (16,)  # 25 MB of float32 features, a tiny net: a copy would show


def _smaps_fields(lines: list[str]) -> dict[str, int]:
    """{'Rss': bytes, ...} from the 'Name:  123 kB' lines of an smaps block."""
    fields = {}
    for line in lines:
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0]) * 1024
    return fields


def _private_bytes() -> int:
    """Memory only this process holds (its USS): private clean + dirty pages."""
    fields = _smaps_fields(Path("/proc/self/smaps_rollup").read_text().splitlines())
    return fields["Private_Clean"] + fields["Private_Dirty"]


def _mappings_of(address: int, nbytes: int) -> dict[str, int]:
    """The smaps fields summed over this process's mappings that overlap [address, +nbytes)
    (NumPy asks for huge pages on the aligned part of a large array, which splits its mapping)."""
    total: dict[str, int] = {}
    block, inside = [], False
    for line in [*Path("/proc/self/smaps").read_text().splitlines(), "0-0 end"]:
        span = line.split(" ", 1)[0]
        if "-" in span and ":" not in span:  # a mapping's header: start-end perms ...
            if inside:
                for name, value in _smaps_fields(block).items():
                    total[name] = total.get(name, 0) + value
            start, end = (int(v, 16) for v in span.split("-"))
            block, inside = [], start < address + nbytes and address < end
        elif inside:
            block.append(line)
    return total


@dataclasses.dataclass(frozen=True)
class LookingJob:
    """A lockstep group trained as a sweep trains it, which also reports what this process
    holds: the mapping of data.X_train and its private memory before and while training."""

    run_indices: tuple[int, ...]
    spec: NetSpec
    members: tuple[train.Member, ...]
    settings: train.SolverSettings

    @property
    def iterations(self) -> int:
        return self.members[0].plan.batch_indices.shape[0]

    @property
    def work(self) -> int:
        return len(self.members) * self.iterations

    def run(self, data, on_progress=None):
        before, peak = _private_bytes(), [0]

        def look(iterations):  # called while the group trains, its inputs alive
            peak[0] = max(peak[0], _private_bytes())

        results = train.train_group(self.spec, list(self.members), data, self.settings, look)
        address = data.X_train.__array_interface__["data"][0]
        mapping = _mappings_of(address, data.X_train.nbytes)
        seen = {"address": address, "mapping": mapping, "grown": peak[0] - before}
        return [(seen, results)]


def _job() -> LookingJob:
    spec = NetSpec(D, HIDDEN, 10, normalization="batchnorm")
    settings = solver_settings(load_config(None, ["train.epochs=1"]))
    iters = settings.num_iterations(N)
    members = tuple(
        train.Member(scale, 1e-3, plan.numpy_plan(0, spec, iters, settings.batch_size, N))
        for scale in (0.01, 0.1)
    )
    return LookingJob((0,), spec, members, settings)


def _splits(dtype: str) -> data.Splits:
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 256, size=(N + 200, D), dtype=np.uint8)
    labels = rng.integers(0, 10, size=N + 200)
    mean = rows[:N].mean(axis=0)

    def feat(r):
        return data.features(r, mean, dtype)

    return data.Splits(
        feat(rows[:N]), labels[:N], feat(rows[N : N + 100]), labels[N : N + 100],
        feat(rows[N + 100 :]), labels[N + 100 :], mean, source={},
    )  # fmt: skip


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or "fork" not in multiprocessing.get_all_start_methods(),
    reason="reads /proc/self/smaps; workers share pages under fork",
)
def test_workers_train_on_the_parents_copy_of_the_features():
    shared = _splits("float32")
    nbytes = shared.X_train.nbytes
    job = _job()
    # Two workers, as --jobs 2 runs them (each job alone in its own worker).
    jobs = [job, dataclasses.replace(job, run_indices=(1,))]
    ran = dict(executor.execute(jobs, shared, 2, False))
    (seen, results), (seen_too, _) = ran[(0,)][0], ran[(1,)][0]
    for look in (seen, seen_too):
        # The parent's pages at the parent's address, shared, not copied into the worker...
        assert look["address"] == shared.X_train.__array_interface__["data"][0]
        mapping = look["mapping"]
        assert mapping["Shared_Clean"] + mapping["Shared_Dirty"] >= 0.9 * nbytes, mapping
        # ...and training made no copy of them (a cast or a write would add nbytes).
        assert look["grown"] < 0.25 * nbytes, look["grown"]
    # The same numbers as float64 features, which the training casts in each worker (there the
    # check above fails: the cast is a private copy). Measured in workers, as above: a fresh
    # fork's private memory grows by what it writes, while a long-lived process may reuse pages
    # it freed before.
    cast = dict(executor.execute(jobs, _splits("float64"), 2, False))[(0,)][0]
    assert cast[0]["grown"] >= 0.9 * nbytes
    for a, b in zip(results, cast[1], strict=True):
        np.testing.assert_array_equal(a.loss_history, b.loss_history)
        assert a.train_acc_history == b.train_acc_history
        assert a.val_acc_history == b.val_acc_history and a.test_acc == b.test_acc
