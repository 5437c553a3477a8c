"""train.bn_eval_all: the same trained networks scored with every kind of batch-norm statistics,
checked against independent paths (the accuracy checks of runs trained with train.bn_eval=M, and
whole-set batch statistics of each minibatch as its own validation set)."""

import csv
import dataclasses

import numpy as np
import pytest
from fakecifar import learnable_splits
from small import solver_settings

from bnexp import eval_plots, plots, records, report, sweep
from bnexp.config import load_config
from bnexp.errors import ConfigError
from bnexp.model import NetSpec
from bnexp.plan import numpy_plan
from bnexp.train import BN_EVAL_MODES, EVERY_MODE, Member, SolverSettings, train_group


@pytest.fixture(scope="module")
def data():
    return learnable_splits(n_train=100, n_val=50, n_test=40)


def _settings(**kw) -> SolverSettings:
    return solver_settings(**{"learning_rate": 3e-3, "lr_decay": 1.0, **kw})


def _members(spec, solver, seeds, scales=(2e-2, 5e-2, 1e-1)):
    iters = solver.num_iterations(100)
    return [
        Member(scale, None, numpy_plan(seed, spec, iters, solver.batch_size, 100))
        for seed, scale in zip(seeds, scales, strict=True)
    ]


def _with_test_as_val(data):
    """The same splits with the validation set as the test set too."""
    return dataclasses.replace(data, X_test=data.X_val, y_test=data.y_val)


@pytest.mark.parametrize("seeds", [(1, 1, 1), (1, 2, 3)], ids=["wide", "stacked"])
def test_each_mode_equals_the_last_check_of_a_run_trained_with_that_mode(data, seeds):
    # bn_eval only changes the checks, never the updates, and the last check is after the last
    # update: a run trained with bn_eval=M checks the final parameters with mode M.
    spec = NetSpec(3072, (16, 16), 10, True)
    both = _with_test_as_val(data)
    every = train_group(spec, _members(spec, _settings(), seeds), both, _settings(bn_eval_all=True))
    for mode in BN_EVAL_MODES:
        solver = _settings(bn_eval=mode)
        alone = train_group(spec, _members(spec, solver, seeds), both, solver)
        for a, b in zip(every, alone, strict=True):
            assert a.every_mode[f"val_acc_{mode}"] == b.val_acc_history[-1]
            assert a.every_mode[f"test_acc_{mode}"] == b.val_acc_history[-1]
            assert a.loss_history.tobytes() == b.loss_history.tobytes()
    plain = train_group(spec, _members(spec, _settings(), seeds), both, _settings())
    for a, b in zip(every, plain, strict=True):  # the key changes nothing else
        assert (a.val_acc_history, a.test_acc, a.best_check) == (
            b.val_acc_history,
            b.test_acc,
            b.best_check,
        )
        assert b.every_mode == {}
        assert list(a.every_mode) == [f"{s}_acc_{m}" for s in ("val", "test") for m in EVERY_MODE]


@pytest.mark.parametrize("n_val", [60, 50], ids=["whole-chunks", "a-smaller-last-chunk"])
def test_minibatch_mode_is_batch_mode_on_each_chunk_as_its_own_set(n_val):
    # Training never reads the validation set, so a run whose validation set is one chunk has
    # the same final parameters; its whole-set batch mode is that chunk's minibatch statistics.
    full = learnable_splits(n_train=100, n_val=n_val, n_test=40, seed=3)
    spec = NetSpec(3072, (16, 16), 10, True)
    solver = _settings(bn_eval_all=True)
    got = train_group(spec, _members(spec, solver, (1, 2, 3)), full, solver)
    correct = np.zeros(3)
    for start in range(0, n_val, solver.batch_size):
        rows = slice(start, start + solver.batch_size)
        chunk = dataclasses.replace(full, X_val=full.X_val[rows], y_val=full.y_val[rows])
        part = train_group(spec, _members(spec, solver, (1, 2, 3)), chunk, solver)
        correct += [r.every_mode["val_acc_batch"] * len(chunk.y_val) for r in part]
    for k, result in enumerate(got):
        assert result.every_mode["val_acc_minibatch"] == pytest.approx(correct[k] / n_val)
    # The modes do differ on these nets (else the test above could not tell them apart).
    assert any(r.every_mode["val_acc_minibatch"] != r.every_mode["val_acc_batch"] for r in got)


def test_a_net_without_batch_statistics_scores_the_same_in_every_mode(data):
    spec = NetSpec(3072, (16, 16), 10, normalization="layernorm")
    solver = _settings(bn_eval_all=True)
    for result in train_group(spec, _members(spec, solver, (1, 2, 3)), data, solver):
        for split in ("val", "test"):
            values = {result.every_mode[f"{split}_acc_{m}"] for m in EVERY_MODE}
            assert len(values) == 1
        assert result.every_mode["val_acc_running"] == result.val_acc_history[-1]


def test_a_diverged_net_is_nan_in_every_mode(data):
    spec = NetSpec(3072, (16, 16), 10, True)
    solver = _settings(bn_eval_all=True)
    members = _members(spec, solver, (1, 1, 1))
    members[2] = dataclasses.replace(members[2], learning_rate=1e30)
    results = train_group(spec, members, data, solver)
    assert results[2].diverged and all(np.isnan(v) for v in results[2].every_mode.values())
    assert all(np.isfinite(v) for v in results[0].every_mode.values())


# --- config, records, table, figure ----------------------------------------------------------

SMALL = [
    "model.hidden_dims=[16, 16]",
    "train.epochs=2",
    "train.batch_size=10",
    "data.num_train=100",
    "seed=[1, 2]",
    "model.batchnorm=[true, false]",
]


def _run(tmp_path, data, *extra):
    cfg = load_config(None, [*SMALL, *extra], command="train")
    return sweep.run_experiment(
        cfg, tmp_path / "out", data=data, log=lambda m: None, progress=False, plot=False
    )


def test_records_results_csv_table_and_figure_carry_every_mode(tmp_path, data):
    result = _run(tmp_path, data, "train.bn_eval_all=true")
    modes = list(records.EVERY_MODE_FIELDS)
    for s in result.summaries:
        assert list(s) == [*records.SUMMARY_FIELDS, *modes]
        assert records.summary_problem(s) is None
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-len(modes) :] == modes
    by_id = {s["run_id"]: s for s in result.summaries}
    for row in rows:
        for key in modes:
            assert float(row[key]) == by_id[row["run_id"]][key]
    table = report.summary_table(result.summaries)
    assert "bn_eval_all" in table and "val minibatch" in table
    bn = [s for s in result.summaries if s["batchnorm"]]
    mean = np.mean([s["test_acc_population"] for s in bn])
    sd = np.std([s["test_acc_population"] for s in bn], ddof=1)
    bn_row = next(line for line in table.splitlines() if "  BN  " in line)
    assert f"{mean:.3f}±{sd:.3f}" in bn_row
    paths = plots.plot_results(tmp_path / "out")
    assert tmp_path / "out" / "plots" / "bn_eval_modes.png" in paths


def test_the_figure_draws_the_mean_over_seeds_of_each_mode(tmp_path, data):
    result = _run(tmp_path, data, "train.bn_eval_all=true")
    fig = eval_plots.bn_eval_figure(result.summaries)
    val_axis = fig.axes[0]
    lines = [c for c in val_axis.containers]  # one errorbar per setting, in group order
    groups = report.group_runs(report.with_axes(result.summaries))
    assert len(lines) == len(groups) == 2
    for container, group in zip(lines, groups, strict=True):
        ys = np.asarray(container.lines[0].get_ydata(), dtype=float)
        want = [np.mean([s[f"val_acc_{m}"] for s in group]) for m in EVERY_MODE]
        np.testing.assert_allclose(ys, want)


def test_off_by_default_nothing_changes_in_the_records(tmp_path, data):
    result = _run(tmp_path, data)
    for s in result.summaries:
        assert list(s) == list(records.SUMMARY_FIELDS)
    assert "bn_eval_all" not in report.summary_table(result.summaries)
    assert not eval_plots.has_every_mode(result.summaries)
    text = (tmp_path / "out" / "results.csv").read_text().splitlines()[0]
    assert text.split(",") == list(records.RESULTS_COLUMNS)
    # A key new at its default stays out of the run ids; on, the runs get ids of their own.
    on = load_config(None, [*SMALL, "train.bn_eval_all=true"], command="train")
    assert "bn_eval_all" not in (tmp_path / "out" / "config.yaml").read_text()
    ids = {s["run_id"] for s in result.summaries}
    from bnexp.config import expand_runs, run_ids

    assert ids.isdisjoint(run_ids(on, expand_runs(on)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.bn_eval_all=3"], "train.bn_eval_all"),
        (["train.bn_eval_all=[true, false]"], "train.bn_eval_all"),
        (["train.bn_eval_all=true", "train.batch_size=1"], "train.bn_eval_all=false"),
    ],
)
def test_bad_settings_are_one_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*SMALL, *overrides], command="train")
