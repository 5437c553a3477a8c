"""The probes wired into training: when they run, what they record, that they change nothing.

Generated data in memory; no CIFAR-10 needed. The probe functions themselves are tested against
finite differences and two-pass references in test_probes.py; here the reference for the wiring is
a second code path (the parameters rebuilt from the plan and one SGD step taken by hand).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fakecifar import learnable_splits
from small import solver_settings

from bnexp import model, plots, probes, records, sweep
from bnexp.cli import main
from bnexp.config import config_to_yaml, expand_runs, load_config, run_ids
from bnexp.errors import ConfigError, OutputError
from bnexp.plan import numpy_plan
from bnexp.probes import ProbeSettings, probe_iterations
from bnexp.train import Member, SolverSettings, train_group

SMALL = [
    "model.hidden_dims=[16, 16]",
    "model.weight_scale=[1.0e-3, 5.0e-2, 1.0]",
    "train.epochs=2",
    "train.batch_size=20",
    "data.num_train=100",
]
PROBES_ON = ["probes.every=3", "probes.batch_size=40", "probes.ics=true", "probes.landscape=true"]


@pytest.fixture(scope="module")
def data():
    return learnable_splits()


def run(cfg, out, data, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("plot", False)
    return sweep.run_experiment(cfg, out, data=data, log=lambda m: None, **kw)


def settings(**kw) -> SolverSettings:
    return solver_settings(**kw)


def group(spec, data, seeds, scales, lrs, solver):
    """Members with one plan per seed (equal seeds: shared minibatches, the wide first layer)."""
    iters = solver.num_iterations(data.X_train.shape[0])
    plans = {s: numpy_plan(s, spec, iters, solver.batch_size, data.X_train.shape[0]) for s in seeds}
    return [Member(sc, lr, plans[s]) for s, sc, lr in zip(seeds, scales, lrs, strict=True)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- when ------------------------------------------------------------------------------------


def test_probe_iterations_are_the_start_every_nth_and_the_last():
    assert probe_iterations(200, 20) == [0, 20, 40, 60, 80, 100, 120, 140, 160, 180, 199]
    assert probe_iterations(10, 3) == [0, 3, 6, 9]
    assert probe_iterations(10, 50) == [0, 9]
    assert probe_iterations(4, 1) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="every"):
        probe_iterations(10, 0)


# --- never change the trajectory -------------------------------------------------------------


@pytest.mark.parametrize("batchnorm", [True, False])
@pytest.mark.parametrize("seeds", [(0, 0, 0), (0, 1, 2)], ids=["wide", "stacked"])
def test_probes_do_not_change_the_training_trajectory(data, batchnorm, seeds):
    # The third network diverges (learning rate 1e30): probing a frozen network changes nothing.
    spec = model.NetSpec(3072, (16, 16), 10, batchnorm)
    solver = settings()
    members = group(spec, data, seeds, (1e-3, 5e-2, 1.0), (1e-3, 2e-3, 1e30), solver)
    plain = train_group(spec, members, data, solver)
    probed = train_group(
        spec, members, data, solver, probe_settings=ProbeSettings(2, 30, True, True)
    )
    assert plain[2].diverged
    for a, b in zip(plain, probed, strict=True):
        assert a.loss_history.tobytes() == b.loss_history.tobytes()
        assert np.array_equal(a.train_acc_history, b.train_acc_history, equal_nan=True)
        assert np.array_equal(a.val_acc_history, b.val_acc_history, equal_nan=True)
        assert (a.test_acc, a.best_val_acc, a.best_check) == (
            b.test_acc,
            b.best_val_acc,
            b.best_check,
        )
        assert a.probe_layers == [] and a.probe_landscape == []
        assert b.probe_layers and b.probe_landscape


# --- what: against parameters rebuilt by hand ------------------------------------------------


@pytest.mark.parametrize("batchnorm", [True, False])
def test_records_are_the_probes_of_the_parameters_before_and_after_the_step(data, batchnorm):
    # Float64 SGD: the parameters after update 0 are W0 - lr * grad, computed here directly.
    spec = model.NetSpec(3072, (16, 16), 10, batchnorm)
    solver = settings(update_rule="sgd", dtype="float64", lr_decay=1.0)
    lrs = np.array([1e-2, 5e-2])
    members = group(spec, data, (0, 0), (5e-2, 1e-1), lrs, solver)
    results = train_group(
        spec, members, data, solver, probe_settings=ProbeSettings(1, 30, True, True)
    )

    normals = [np.stack([m.plan.normals[i] for m in members]) for i in range(spec.num_layers)]
    w0 = model.init_params(spec, normals, np.array([5e-2, 1e-1]), np.float64)
    rows = members[0].plan.batch_indices[0]
    xb, yb = data.X_train[rows], data.y_train[rows]
    bn = model.init_bn_params(spec, (2,), np.float64)
    _, grads = model.loss_and_grads(spec, w0, xb, yb, bn)
    w1 = {k: v - lrs.reshape(-1, *[1] * (v.ndim - 1)) * grads[k] for k, v in w0.items()}

    X, y = data.X_train[:30], data.y_train[:30]
    expect_layers = probes.layer_stats(spec, w0, X, y, 1e-5)
    expect_ics = probes.ics(spec, w0, w1, xb, yb, 1e-5)
    expect_land = probes.landscape(spec, w0, xb, yb, 1e-5, lrs)
    expect_next = probes.layer_stats(spec, w1, X, y, 1e-5, prev_params=w0)
    for net, result in enumerate(results):
        at = {(r["iteration"], r["layer"]): r for r in result.probe_layers}
        for want in (*expect_layers, *expect_ics):
            if want["net"] == net:
                got = at[(0, want["layer"])]
                assert_close({k: got[k] for k in want if k != "net"}, want, net)
        for want in expect_next:
            if want["net"] == net:
                got = at[(1, want["layer"])]
                assert got["update_ratio"] > 0
                assert_close({k: got[k] for k in want if k != "net"}, want, net)
        assert_close(result.probe_landscape[0], {"iteration": 0, **expect_land[net]}, net)


def assert_close(got: dict, want: dict, net: int):
    """Records equal up to float64 rounding (the loop's and the reference's summation orders)."""
    for key, value in want.items():
        if key == "net":
            continue
        a, b = np.asarray(got[key], dtype=float), np.asarray(value, dtype=float)
        assert np.allclose(a, b, rtol=1e-7, atol=1e-12, equal_nan=True), (net, key, a, b)


# --- records on disk -------------------------------------------------------------------------


def test_probe_records_are_written_before_the_summary(tmp_path, data, monkeypatch):
    written = []
    real = records.atomic_write_text
    monkeypatch.setattr(
        records, "atomic_write_text", lambda p, t: (written.append(Path(p)), real(p, t))
    )
    cfg = load_config(None, [*SMALL, *PROBES_ON])
    result = run(cfg, tmp_path / "out", data)
    first_run = [p.name for p in written if p.parent.parent.name == "runs"][:5]
    expected = ["config.yaml", "metrics.jsonl", "layers.jsonl", "landscape.jsonl", "summary.json"]
    assert first_run == expected
    steps = probe_iterations(10, 3)  # 2 epochs of 100 // 20
    for s in result.summaries:
        folder = tmp_path / "out" / "runs" / s["run_id"]
        layers = read_jsonl(folder / "layers.jsonl")
        # Hidden layers 1-2 with statistics and ICS, the output layer 3 with ICS only.
        assert [(r["iteration"], r["layer"]) for r in layers] == [
            (t, layer) for t in steps for layer in (1, 2, 3)
        ]
        assert all("act_p50" in r for r in layers if r["layer"] < 3)
        assert all(
            set(r) == {"iteration", "layer", "ics_l2", "ics_cos"} for r in layers if r["layer"] == 3
        )
        landscape = read_jsonl(folder / "landscape.jsonl")
        assert [r["iteration"] for r in landscape] == steps
        etas = np.array(landscape[0]["etas"]) / s["learning_rate"]
        assert np.allclose(etas, probes.DEFAULT_FACTORS)


def test_records_travel_back_from_worker_processes(tmp_path, data):
    cfg = load_config(None, [*SMALL, *PROBES_ON])
    run(cfg, tmp_path / "one", data, jobs=1)
    run(cfg, tmp_path / "two", data, jobs=2)
    for folder in (tmp_path / "one" / "runs").iterdir():
        for name in ("layers.jsonl", "landscape.jsonl"):
            other = tmp_path / "two" / "runs" / folder.name / name
            assert (folder / name).read_text() == other.read_text()


def test_only_the_enabled_probes_are_recorded(tmp_path, data):
    cfg = load_config(None, [*SMALL, "probes.every=4", "probes.batch_size=40"])
    result = run(cfg, tmp_path / "out", data)
    folder = tmp_path / "out" / "runs" / result.summaries[0]["run_id"]
    layers = read_jsonl(folder / "layers.jsonl")
    assert {r["iteration"] for r in layers} == {0, 4, 8, 9}
    assert not any("ics_l2" in r for r in layers)
    assert not (folder / "landscape.jsonl").exists()


# --- config ----------------------------------------------------------------------------------


def test_probes_off_change_no_run_id_and_no_saved_config():
    default = load_config(None)
    off = load_config(None, ["probes.batch_size=100", "probes.ics=true"])
    on = load_config(None, ["probes.every=20"])
    assert run_ids(off, expand_runs(off)) == run_ids(default, expand_runs(default))
    assert set(run_ids(on, expand_runs(on))).isdisjoint(run_ids(default, expand_runs(default)))
    assert "probes" not in config_to_yaml(default)
    assert "probes:" in config_to_yaml(on)
    assert load_config(None, ["probes.every=20"]).probes == on.probes


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("probes.every=[10, 20]", "probes.every: expected a single value"),
        ("probes.every=-1", "probes.every: expected an integer >= 0"),
        ("probes.ics=yes please", "probes.ics: expected true or false"),
        ("probes.batch_size=5000", "probes.batch_size: 5000 probe images is more than"),
    ],
)
def test_bad_probe_settings_are_one_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["probes.every=5", override])


def test_a_bad_probe_setting_on_the_command_line_exits_2_with_one_line(tmp_path):
    result = CliRunner().invoke(main, ["train", "-o", str(tmp_path / "out"), "probes.every=-1"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: override 'probes.every=-1': probes.every: expected an integer >= 0, got -1"
    ]
    assert not (tmp_path / "out").exists()


def test_shipped_probes_config_is_small_and_probes_everything():
    path = Path(__file__).resolve().parent.parent / "configs" / "probes.yaml"
    cfg = load_config(path, command="train")
    assert cfg.probes.every == 20 and cfg.probes.ics and cfg.probes.landscape
    runs = expand_runs(cfg)
    assert {r.cfg.model.batchnorm for r in runs} == {True, False}
    assert len(runs) <= 8 and len(cfg.model.hidden_dims) == 7


# --- figures ---------------------------------------------------------------------------------


def test_plot_draws_the_probe_figures_from_the_records_only(tmp_path, data):
    out = tmp_path / "out"
    run(load_config(None, [*SMALL, *PROBES_ON]), out, data)
    names = {p.name for p in plots.plot_results(out)}
    assert {"probe_gradient_flow.png", "probe_activations.png", "probe_ics_smoothness.png"} <= names
    plain = tmp_path / "plain"
    run(load_config(None, SMALL), plain, data)
    assert not any(p.name.startswith("probe_") for p in plots.plot_results(plain))


def test_a_corrupt_probe_record_is_one_output_error(tmp_path, data):
    out = tmp_path / "out"
    result = run(load_config(None, [*SMALL, *PROBES_ON]), out, data)
    bad = out / "runs" / result.summaries[0]["run_id"] / "layers.jsonl"
    bad.write_text(bad.read_text()[:-20] + "\n")
    with pytest.raises(OutputError, match=r"layers\.jsonl:\d+: not a JSON object"):
        plots.plot_results(out)


def test_read_probe_records_joins_the_run_fields(tmp_path, data):
    out = tmp_path / "out"
    result = run(load_config(None, [*SMALL, *PROBES_ON]), out, data)
    layer_records, landscape_records = records.read_probe_records(out, result.summaries)
    assert len(layer_records) == len(result.summaries) * 4 * 3
    assert len(landscape_records) == len(result.summaries) * 4
    by_id = {s["run_id"]: s for s in result.summaries}
    for r in (*layer_records, *landscape_records):
        s = by_id[r["run_id"]]
        assert (r["batchnorm"], r["weight_scale"]) == (s["batchnorm"], s["weight_scale"])
        assert r["diverged"] is False and math.isfinite(r["iteration"])
