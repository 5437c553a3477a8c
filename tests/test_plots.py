"""Figures from stored records: files are real PNG/SVG, diverged runs are drawn, not dropped."""

import dataclasses
import json
import math
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import numpy as np
import pytest

from bnexp import plots, records
from bnexp.config import config_to_yaml, expand_runs, load_config, run_config_dict, run_id
from bnexp.errors import OutputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_summary(run, rid, *, diverge_at=None):
    """A summary shaped like the sweep's, with plausible curves; diverge_at cuts it with nulls."""
    c = run.cfg  # one flat namespace of the run's settings
    flat = {**dataclasses.asdict(c.model), **dataclasses.asdict(c.train)}
    run = SimpleNamespace(index=run.index, seed=run.seed, rng=c.rng, data=c.data, **flat)
    rng = np.random.default_rng(run.index)
    ipe = run.data.num_train // run.batch_size
    n_iter = run.epochs * ipe
    good = 1.0 if run.batchnorm else max(0.0, 1 - abs(math.log10(run.weight_scale) + 1.5) / 2)
    loss = 2.3 - good * 1.5 * (1 - np.exp(-np.arange(n_iter) / 40)) + 0.1 * rng.random(n_iter)
    loss = [float(v) for v in loss]
    train = [0.1 + good * 0.6 * (1 - math.exp(-e / 3)) for e in range(run.epochs + 1)]
    val = [0.1 + good * 0.2 * (1 - math.exp(-e / 3)) for e in range(run.epochs + 1)]
    checks = [1] + [ipe * e for e in range(1, run.epochs + 1)]
    diverged = diverge_at is not None
    if diverged:
        loss = loss[:diverge_at] + [None] * (n_iter - diverge_at)
        evaluated = sum(c < diverge_at for c in checks)
        train = train[:evaluated] + [None] * (len(train) - evaluated)
        val = val[:evaluated] + [None] * (len(val) - evaluated)
    tail = loss[-run.loss_window :]
    final = None if None in tail else sum(tail) / len(tail)
    return {
        "run_id": rid,
        "index": run.index,
        "batchnorm": run.batchnorm,
        "weight_scale": run.weight_scale,
        "learning_rate": run.learning_rate,
        "seed": run.seed,
        "rng": run.rng,
        "hidden_dims": list(run.hidden_dims),
        "dtype": run.dtype,
        "num_train": run.data.num_train,
        "num_val": run.data.num_validation,
        "num_test": run.data.num_test,
        "epochs": run.epochs,
        "batch_size": run.batch_size,
        "iterations_per_epoch": ipe,
        "update_rule": run.update_rule,
        "train_acc_history": train,
        "val_acc_history": val,
        "check_iterations": checks,
        "test_acc": None,
        "loss_history": loss,
        "best_train_acc": max(v for v in train if v is not None),
        "best_val_acc": max(v for v in val if v is not None),
        "final_train_loss": final,
        "diverged": diverged,
        "diverged_iteration": diverge_at,
        "status": "diverged" if diverged else "ok",
        "seconds": 1.5,
    }


def write_fake(out, overrides, *, diverge=(), skip=()):
    """Write OUT/config.yaml and fake finished runs; `diverge` maps run index -> iteration."""
    cfg = load_config(None, overrides)
    records.prepare_output_dir(out, config_to_yaml(cfg), force=False)
    written = []
    for run in expand_runs(cfg):
        if run.index in skip:
            continue
        rid = run_id(run, cfg)
        summary = fake_summary(run, rid, diverge_at=dict(diverge).get(run.index))
        records.write_run(out, rid, run_config_dict(run), summary, [])
        written.append(summary)
    return cfg, written


def assert_png_svg(paths):
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000, path
        if path.suffix == ".png":
            assert data.startswith(PNG_MAGIC), path
        else:
            assert ET.fromstring(data).tag.endswith("svg"), path


SWEEP = ["train.epochs=3", "model.weight_scale={logspace: [-4, 0, 5]}"]


def test_sweep_plots_with_diverged_and_missing_runs(tmp_path):
    out = tmp_path / "out"
    # Run 9 = scale 1, baseline (BN first, then baseline): diverges at iteration 7, losing its
    # loss and all accuracy checks after the first; run 6 is missing (a partial result).
    cfg, written = write_fake(out, SWEEP, diverge={9: 7}, skip={6})
    paths = plots.plot_results(out)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        f"{stem}.{ext}"
        for stem in ("training_curves", "weight_init_sweep")
        for ext in ("png", "svg")
    )
    assert all(p.parent == out / "plots" for p in paths)
    assert_png_svg(paths)

    fig = plots.build_sweep_figure(written, expected_runs=10)
    loss_ax = fig.axes[2]
    diverged = [a for a in loss_ax.get_lines() if a.get_label().startswith("diverged")]
    assert len(diverged) == 1
    assert list(diverged[0].get_xdata()) == [1.0]
    assert "baseline" in diverged[0].get_label()
    # On the accuracy panels the diverged run is marked at its (finite) best accuracy.
    for ax, key in zip(fig.axes[:2], ("best_val_acc", "best_train_acc"), strict=True):
        (marker,) = [a for a in ax.get_lines() if a.get_label().startswith("diverged")]
        assert list(marker.get_ydata()) == [written[-1][key]]
    # The baseline loss line has a gap at the diverged scale, not a dropped point.
    (baseline,) = [a for a in loss_ax.get_lines() if a.get_label() == "baseline"]
    assert list(baseline.get_xdata()) == list(cfg.values("model.weight_scale"))
    assert np.isnan(baseline.get_ydata()[-1])
    # The missing run is said in the caption.
    assert "partial: 9 of 10 runs" in fig.get_supxlabel()


def test_curves_figure_of_two_runs(tmp_path):
    out = tmp_path / "out"
    _, written = write_fake(out, ["train.epochs=2", "model.weight_scale=0.02"])
    paths = plots.plot_results(out)
    assert sorted(p.name for p in paths) == ["training_curves.png", "training_curves.svg"]
    assert_png_svg(paths)
    fig = plots.build_curves_figure(written)
    loss_ax, train_ax, _ = fig.axes
    labels = [a.get_label() for a in train_ax.get_lines()]
    assert "batch norm" in labels and "baseline" in labels
    (bn,) = [a for a in train_ax.get_lines() if a.get_label() == "batch norm"]
    assert list(bn.get_xdata()) == [0, 1, 2]
    assert list(bn.get_ydata()) == written[0]["train_acc_history"]
    # Loss panel: the raw per-minibatch losses of the BN run, then their epoch moving average.
    raw, smooth = loss_ax.get_lines()[:2]
    assert list(raw.get_ydata()) == written[0]["loss_history"]
    ipe = written[0]["iterations_per_epoch"]
    np.testing.assert_allclose(smooth.get_ydata()[ipe - 1], np.mean(raw.get_ydata()[:ipe]))
    cap = fig.get_supxlabel()
    assert cap.startswith("CIFAR-10, 1,000 training images, 1,000 validation images, hidden [50]x7")
    assert "Adam lr 1e-3" in cap and "2 epochs" in cap


def test_curves_of_a_sweep_show_three_scales():
    cfg = load_config(None, SWEEP)
    runs = expand_runs(cfg)
    summaries = [fake_summary(r, str(r.index)) for r in runs]
    picked = plots.select_curve_runs(summaries)
    scales = cfg.values("model.weight_scale")
    assert [(s["weight_scale"], s["batchnorm"]) for s in picked] == [
        (scales[0], True), (scales[0], False), (scales[2], True), (scales[2], False),
        (scales[4], True), (scales[4], False),
    ]  # fmt: skip


def test_nothing_to_plot(tmp_path):
    records.prepare_output_dir(tmp_path, "name: x\n", force=False)
    with pytest.raises(OutputError, match="nothing to plot"):
        plots.plot_results(tmp_path)


def test_fmt_sci():
    assert plots.fmt_sci(1e-3) == "1e-3"
    assert plots.fmt_sci(0.02) == "0.02"
    assert plots.fmt_sci(2.5e-4) == "2.5e-4"
    assert plots.fmt_sci(1.0) == "1"


def test_corrupt_summary_is_an_error_naming_the_file(tmp_path):
    out = tmp_path / "out"
    _, written = write_fake(out, ["train.epochs=2", "model.weight_scale=0.02"])
    path = out / "runs" / written[1]["run_id"] / "summary.json"
    path.write_text('{"batchnorm": tru')
    with pytest.raises(OutputError, match=r"summary\.json") as info:
        plots.plot_results(out)
    assert written[1]["run_id"] in str(info.value)
    path.write_text(json.dumps({**written[1], "weight_scale": "big"}))
    with pytest.raises(OutputError, match="weight_scale"):
        plots.plot_results(out)
    assert not (out / "plots").exists()


@pytest.mark.parametrize("damage", ["missing", "malformed", "invalid"])
def test_missing_or_corrupt_config_is_an_error_when_there_are_runs(tmp_path, damage):
    out = tmp_path / "out"
    write_fake(out, ["train.epochs=2", "model.weight_scale=0.02"])
    config = out / "config.yaml"
    if damage == "missing":
        config.unlink()
    else:
        config.write_text("model: [\n" if damage == "malformed" else "train: {epochs: ten}\n")
    with pytest.raises(OutputError, match=r"config\.yaml") as info:
        plots.plot_results(out)
    assert "\n" not in str(info.value) and "-o" in str(info.value)
    assert not (out / "plots").exists()


def test_an_interrupted_save_leaves_no_half_written_figure(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_fake(out, ["train.epochs=2", "model.weight_scale=0.02"])
    old = plots.plot_results(out)
    before = {p.name: p.read_bytes() for p in old}

    def interrupted_savefig(self, fname, *args, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(plots.Figure, "savefig", interrupted_savefig)
    with pytest.raises(KeyboardInterrupt):
        plots.plot_results(out)
    assert {p.name: p.read_bytes() for p in (out / "plots").iterdir()} == before
