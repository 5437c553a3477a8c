"""The experiment runner: lockstep groups, process independence, resume, interruption,
divergence as a recorded result. Generated data passed in memory; no CIFAR-10 needed."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from fakecifar import learnable_splits

from bnexp import sweep
from bnexp.config import expand_runs, load_config
from bnexp.plan import cs231n_plans

SMALL = [
    "model.hidden_dims=[16, 16]",
    "model.weight_scale=[1.0e-3, 5.0e-2, 1.0]",
    "train.epochs=2",
    "train.batch_size=20",
    "data.num_train=100",
]


def small_config(*extra):
    return load_config(None, [*SMALL, *extra])


@pytest.fixture(scope="module")
def data():
    return learnable_splits()


def run(cfg, out, data, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("plot", False)
    kw.setdefault("log", lambda m: None)
    return sweep.run_experiment(cfg, out, data=data, **kw)


def csv_rows(path, drop=("seconds",)):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def test_default_sweep_forms_two_lockstep_groups_of_twenty():
    runs = expand_runs(load_config(None))
    groups = sweep.lockstep_groups(runs)
    assert [len(g) for g in groups] == [20, 20]
    assert {runs[i].cfg.model.batchnorm for i in groups[0]} == {True}
    assert {runs[i].cfg.model.batchnorm for i in groups[1]} == {False}
    # Members keep run order, so the per-scale pairing stays readable in the records.
    assert groups[0] == list(range(0, 40, 2))


def test_numpy_plans_are_paired_between_bn_and_baseline():
    runs = expand_runs(small_config())
    plans = sweep.make_plans(runs)
    for a, b in zip(runs[::2], runs[1::2], strict=True):
        assert a.cfg.model.batchnorm and not b.cfg.model.batchnorm
        assert a.cfg.model.weight_scale == b.cfg.model.weight_scale
    # The same seed and widths: identical normals and minibatches for every run.
    for plan in plans[1:]:
        np.testing.assert_array_equal(plan.batch_indices, plans[0].batch_indices)
        for n0, n1 in zip(plans[0].normals, plan.normals, strict=True):
            np.testing.assert_array_equal(n0, n1)


def test_cs231n_plans_replay_the_notebook_cells_in_order():
    runs = expand_runs(small_config("rng=cs231n"))
    plans = sweep.make_plans(runs)
    cells = [
        [(sweep.net_spec(r.cfg), 10, 20, 100) for r in runs[i : i + 2]]
        for i in range(0, len(runs), 2)
    ]
    expected = [p for cell in cs231n_plans(231, cells) for p in cell]
    for got, want in zip(plans, expected, strict=True):
        np.testing.assert_array_equal(got.batch_indices, want.batch_indices)
        np.testing.assert_array_equal(got.normals[0], want.normals[0])
    # Unlike numpy mode, every run has its own draws.
    assert not np.array_equal(plans[0].batch_indices, plans[1].batch_indices)


def test_jobs_do_not_change_results(tmp_path, data):
    cfg = small_config()
    run(cfg, tmp_path / "one", data, jobs=1)
    run(cfg, tmp_path / "two", data, jobs=2)
    one = csv_rows(tmp_path / "one" / "results.csv")
    two = csv_rows(tmp_path / "two" / "results.csv")
    assert len(one) == 6 and one == two
    for row in one:
        s1 = json.loads((tmp_path / "one" / "runs" / row["run_id"] / "summary.json").read_text())
        s2 = json.loads((tmp_path / "two" / "runs" / row["run_id"] / "summary.json").read_text())
        assert s1["loss_history"] == s2["loss_history"]
        assert s1["val_acc_history"] == s2["val_acc_history"]


def test_same_seed_same_numbers_and_seed_matters(tmp_path, data):
    a = run(small_config(), tmp_path / "a", data).summaries
    b = run(small_config(), tmp_path / "b", data).summaries
    c = run(small_config("seed=7"), tmp_path / "c", data).summaries
    assert [s["loss_history"] for s in a] == [s["loss_history"] for s in b]
    assert [s["loss_history"] for s in a] != [s["loss_history"] for s in c]


def test_records_follow_the_documented_format(tmp_path, data):
    result = run(small_config(), tmp_path / "out", data)
    out = result.out
    assert (out / "config.yaml").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["seed"] == 231 and manifest["end_time"]
    rows = csv_rows(out / "results.csv", drop=())
    assert list(rows[0])[:9] == [
        "run_id", "batchnorm", "weight_scale", "best_train_acc", "best_val_acc",
        "final_train_loss", "diverged", "status", "seconds",
    ]  # fmt: skip
    for s in result.summaries:
        folder = out / "runs" / s["run_id"]
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert len(s["train_acc_history"]) == len(s["val_acc_history"]) == 3  # epochs + 1
        assert [m["epoch"] for m in metrics] == [0, 1, 2]
        assert [m["iteration"] for m in metrics] == s["check_iterations"] == [1, 5, 10]
        assert len(s["loss_history"]) == 10
        assert s["best_val_acc"] == max(s["val_acc_history"])
        assert s["final_train_loss"] == pytest.approx(np.mean(s["loss_history"][-100:]))
        assert (folder / "config.yaml").is_file()
    # Learnable data: batch norm at a moderate scale gets well above chance.
    bn = next(s for s in result.summaries if s["batchnorm"] and s["weight_scale"] == 5e-2)
    assert bn["best_train_acc"] > 0.3  # chance is 0.1; 10 iterations of batch 20


def test_rerun_skips_finished_runs_and_grid_growth_trains_only_new_ones(tmp_path, data):
    out = tmp_path / "out"
    first = run(small_config(), out, data)
    assert (first.trained, first.skipped) == (6, 0)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = run(small_config(), out, data=None, data_dir=out / "no-data-here")
    assert (again.trained, again.skipped) == (0, 6)
    assert again.summaries == first.summaries
    # Nothing to train: no data was needed and no file changed (the manifest is not rewritten).
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert not (out / "no-data-here").exists()
    grown = small_config("model.weight_scale=[1.0e-3, 5.0e-2, 1.0, 3.0]")
    more = run(grown, out, data, force=True)
    assert (more.trained, more.skipped) == (2, 6)
    assert len(csv_rows(out / "results.csv")) == 8
    # The manifest of the invocation that trained the first runs is kept, not overwritten.
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs_trained"] == 2
    assert [m["runs_trained"] for m in manifest["previous"]] == [6]


def test_a_manifest_left_running_after_the_last_record_is_settled_by_a_rerun(tmp_path, data):
    """A process killed after recording its last run, before its closing write, leaves the
    manifest 'running'; the next invocation finds every run recorded and says 'complete'."""
    out = tmp_path / "out"
    run(small_config(), out, data)
    path = out / "manifest.json"
    killed = {**json.loads(path.read_text()), "status": "running"}
    path.write_text(json.dumps(killed))
    notes = []
    again = run(small_config(), out, data=None, data_dir=out / "no-data-here", log=notes.append)
    assert (again.trained, again.skipped) == (0, 6)
    settled = json.loads(path.read_text())
    assert settled["status"] == "complete" and "killed" in settled["status_note"]
    assert any("status set to complete" in n for n in notes)
    # A complete manifest is left alone (the rerun above changes no other file).
    before = path.read_bytes()
    run(small_config(), out, data=None, data_dir=out / "no-data-here")
    assert path.read_bytes() == before


def test_ctrl_c_keeps_finished_groups_and_rerun_completes(tmp_path, data, monkeypatch):
    cfg = small_config()
    clean = run(cfg, tmp_path / "clean", data).summaries

    real_train_group = sweep.train_group
    calls = []

    def interrupted_second_group(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train_group(*args, **kwargs)

    monkeypatch.setattr(sweep, "train_group", interrupted_second_group)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(cfg, out, data)
    kept = csv_rows(out / "results.csv")
    assert len(kept) == 3 and {r["batchnorm"] for r in kept} == {"true"}
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    assert not list((out / "runs").glob("*/*.tmp*"))

    monkeypatch.setattr(sweep, "train_group", real_train_group)
    resumed = run(cfg, out, data)
    assert (resumed.trained, resumed.skipped) == (3, 3)
    strip = [{k: v for k, v in s.items() if k != "seconds"} for s in clean]
    assert [{k: v for k, v in s.items() if k != "seconds"} for s in resumed.summaries] == strip


def test_diverging_network_is_recorded_and_plotted_and_contained(tmp_path, data):
    # A learning rate of 1e30 overflows float32 within a step: that run diverges.
    cfg = small_config("train.learning_rate=[1.0e-3, 1.0e30]", "model.batchnorm=[false]")
    result = run(cfg, tmp_path / "out", data, plot=True)
    by_lr = {}
    for s in result.summaries:
        by_lr.setdefault(s["learning_rate"], []).append(s)
    assert all(s["diverged"] and s["status"] == "diverged" for s in by_lr[1e30])
    assert all(s["diverged_iteration"] is not None for s in by_lr[1e30])
    assert not any(s["diverged"] for s in by_lr[1e-3])
    rows = csv_rows(tmp_path / "out" / "results.csv")
    assert sum(r["diverged"] == "true" for r in rows) == 3
    assert any(p.name == "weight_init_sweep.png" for p in result.plots)
    # The healthy networks trained beside the diverged ones equal the same lockstep group with
    # healthy neighbours, bit for bit: nothing of a diverged network leaks into the stack. (A
    # group of another size is not compared bit for bit: OpenBLAS's float32 GEMM may sum in
    # another order when the wide first layer has another number of columns.)
    healthy = small_config("train.learning_rate=[1.0e-3, 2.0e-3]", "model.batchnorm=[false]")
    beside = run(healthy, tmp_path / "healthy", data).summaries
    beside = [s for s in beside if s["learning_rate"] == 1e-3]
    assert [s["loss_history"] for s in beside] == [s["loss_history"] for s in by_lr[1e-3]]


def test_an_error_in_training_is_recorded_as_failed_not_interrupted(tmp_path, data, monkeypatch):
    def broken(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(sweep, "train_group", broken)
    with pytest.raises(MemoryError):
        run(small_config(), tmp_path / "out", data)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["end_time"]


def test_summaries_follow_the_one_schema_and_results_csv_has_a_column_per_axis(tmp_path, data):
    from bnexp import records

    cfg = small_config("train.batch_size=[10, 20]", "model.batchnorm=[false]")
    result = run(cfg, tmp_path / "out", data)
    for s in result.summaries:
        assert list(s) == list(records.SUMMARY_FIELDS)
        assert records.summary_problem(s) is None
    rows = csv_rows(tmp_path / "out" / "results.csv", drop=())
    assert list(rows[0]) == [*records.RESULTS_COLUMNS, "train.batch_size"]
    assert [r["train.batch_size"] for r in rows] == ["10", "20"] * 3
    # Runs that differ in batch size train in separate lockstep groups.
    runs = expand_runs(cfg)
    groups = sweep.lockstep_groups(runs)
    assert [[runs[i].cfg.train.batch_size for i in g] for g in groups] == [[10] * 3, [20] * 3]
    by_size = {r["run_id"]: r for r in rows}
    assert len(by_size) == 6


def test_results_do_not_depend_on_which_runs_share_an_experiment(tmp_path, data):
    # A batch-size axis splits the experiment into lockstep groups; each run's numbers equal
    # those of the same run in an experiment of its own (and its id is the same).
    both = run(small_config("train.batch_size=[10, 20]"), tmp_path / "both", data).summaries
    alone = []
    for size in (10, 20):
        alone += run(
            small_config(f"train.batch_size={size}"), tmp_path / f"b{size}", data
        ).summaries
    keep = ("run_id", "loss_history", "val_acc_history", "train_acc_history", "test_acc")
    by_id = {s["run_id"]: {k: s[k] for k in keep} for s in alone}
    assert len(both) == len(by_id) == 12
    assert all({k: s[k] for k in keep} == by_id[s["run_id"]] for s in both)
