"""Figures from stored records: files are real PNG/SVG, diverged runs are drawn, not dropped."""

import dataclasses
import json
import math
import re
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
REPLICATES = [*SWEEP, "seed=[1, 2, 3]"]
MATHTEXT_POWER = re.compile(r"\$\\mathdefault\{10\^\{-?\d+\}\}\$")


def replicate_summaries(overrides=REPLICATES):
    """Fake summaries of a sweep with seeds whose metrics differ from seed to seed."""
    cfg = load_config(None, overrides)
    summaries = []
    for run in expand_runs(cfg):
        s = fake_summary(run, str(run.index))
        rng = np.random.default_rng(1000 + run.index)
        for key in ("best_val_acc", "best_train_acc", "final_train_loss"):
            s[key] += 0.05 * rng.random()
        s["val_acc_history"] = [v + 0.03 * rng.random() for v in s["val_acc_history"]]
        summaries.append(s)
    return cfg, summaries


def by_setting(summaries, bn, key):
    """{weight scale: [values of the seeds]} for batch norm or baseline, computed here."""
    out = {}
    for s in summaries:
        if s["batchnorm"] == bn:
            out.setdefault(s["weight_scale"], []).append(s[key])
    return out


def band(ax, label):
    """Vertices (V, 2) of the shaded band drawn for the line `label` (fill_between)."""
    (poly,) = [c for c in ax.collections if c.get_label() == f"_band {label}"]
    return np.concatenate([p.vertices for p in poly.get_paths()])


def assert_band_is_mean_sd(vertices, xs, values):
    """At each x the band spans mean - SD .. mean + SD (sample SD) of `values[x]`."""
    for x in xs:
        ys = vertices[np.isclose(vertices[:, 0], x), 1]
        mean, sd = np.mean(values[x]), np.std(values[x], ddof=1)
        assert sd > 0
        np.testing.assert_allclose([ys.min(), ys.max()], [mean - sd, mean + sd], rtol=1e-9)


def legend_labels(fig):
    (legend,) = fig.legends
    return [t.get_text() for t in legend.get_texts()]


def test_sweep_plots_with_diverged_and_missing_runs(tmp_path):
    out = tmp_path / "out"
    # Run 9 = scale 1, baseline (BN first, then baseline): diverges at iteration 7, losing its
    # loss and all accuracy checks after the first; run 6 is missing (a partial result).
    cfg, written = write_fake(out, SWEEP, diverge={9: 7}, skip={6})
    paths = plots.plot_results(out, formats=("png", "svg"))
    assert [p.name for p in paths] == [
        f"{stem}.{ext}"
        for stem in ("training_curves", "weight_init_sweep")
        for ext in ("png", "svg")
    ]
    assert all(p.parent == out / "plots" for p in paths)
    assert_png_svg(paths)

    fig = plots.build_sweep_figure(written, expected_runs=10)
    loss_ax = fig.axes[2]
    # Its loss is not finite: a red x on the loss panel's top edge, labelled with infinity.
    (diverged,) = [a for a in loss_ax.get_lines() if a.get_label() == "diverged"]
    assert list(diverged.get_xdata()) == [1.0] and list(diverged.get_ydata()) == [1.0]
    assert diverged.get_color() == plots.DIVERGED_COLOR
    assert [t.get_text() for t in loss_ax.texts] == [r"$\infty$"]
    # On the accuracy panels the diverged run is marked at its (finite) best accuracy.
    for ax, key in zip(fig.axes[:2], ("best_val_acc", "best_train_acc"), strict=True):
        (marker,) = [a for a in ax.get_lines() if a.get_label().startswith("diverged")]
        assert "baseline" in marker.get_label()
        assert list(marker.get_ydata()) == [written[-1][key]]
    # The baseline loss line has a gap at the diverged scale, not a dropped point.
    (baseline,) = [a for a in loss_ax.get_lines() if a.get_label() == "baseline"]
    assert list(baseline.get_xdata()) == list(cfg.values("model.weight_scale"))
    assert np.isnan(baseline.get_ydata()[-1])
    assert any("diverged" in label for label in legend_labels(fig))
    # The missing run is said in the caption.
    assert "partial: 9 of 10 runs" in fig.get_supxlabel()


def test_png_only_by_default_and_unknown_formats_refused(tmp_path):
    out = tmp_path / "out"
    write_fake(out, SWEEP)
    paths = plots.plot_results(out)
    assert [p.name for p in paths] == ["training_curves.png", "weight_init_sweep.png"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == [p.name for p in paths]
    with pytest.raises(OutputError, match="pdf"):
        plots.plot_results(out, formats=("pdf",))


def test_stale_plot_temporaries_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    write_fake(out, ["train.epochs=2", "model.weight_scale=0.02"])
    folder = out / "plots"
    folder.mkdir()
    stale = [folder / ".training_curves.png.k3j_x9a1.tmp", folder / ".weight_init_sweep.svg.a.tmp"]
    kept = [folder / "notes.tmp", folder / ".keep.tmp", folder / ".training_curves.png.tmp.bak"]
    for path in stale + kept:
        path.write_text("x")
    plots.plot_results(out)
    assert all(not p.exists() for p in stale)
    assert all(p.exists() for p in kept)


def test_replicates_are_a_mean_line_with_a_one_sd_band_and_dots():
    cfg, summaries = replicate_summaries()
    scales = list(cfg.values("model.weight_scale"))
    fig = plots.build_sweep_figure(summaries)
    for ax, key in zip(
        fig.axes, ("best_val_acc", "best_train_acc", "final_train_loss"), strict=True
    ):
        for bn, label in ((True, "batch norm"), (False, "baseline")):
            values = by_setting(summaries, bn, key)
            (line,) = [a for a in ax.get_lines() if a.get_label() == label]
            assert list(line.get_xdata()) == scales
            np.testing.assert_allclose(line.get_ydata(), [np.mean(values[x]) for x in scales])
            assert_band_is_mean_sd(band(ax, label), scales, values)
            (dots,) = [a for a in ax.get_lines() if a.get_label() == f"_seeds {label}"]
            assert sorted(dots.get_ydata()) == sorted(v for x in scales for v in values[x])
    labels = legend_labels(fig)
    assert "shaded: mean ± 1 SD over n = 3 seeds" in labels
    assert len(labels) == len(set(labels))


def test_loss_panel_is_linear_with_blown_up_runs_marked_at_the_top():
    _, summaries = replicate_summaries(SWEEP)
    summaries[9]["final_train_loss"] = 2.4e5  # scale 1, baseline: blown up, still finite
    fig = plots.build_sweep_figure(summaries)
    loss_ax = fig.axes[2]
    assert loss_ax.get_yscale() == "linear"
    assert loss_ax.get_ylim() == plots.SWEEP_LOSS_RANGE
    (mark,) = [a for a in loss_ax.get_lines() if a.get_label() == "above the axis"]
    assert list(mark.get_xdata()) == [1.0] and mark.get_marker() == "^"
    assert mark.get_color() == plots.KIND_STYLE["none"]["color"]
    assert [t.get_text() for t in loss_ax.texts] == ["2.4e5"]
    fig.canvas.draw()
    for ax in fig.axes:
        for tick in ax.get_yticklabels():
            assert "e+" not in tick.get_text() and "e-" not in tick.get_text()
    # The weight-scale axis: one mathtext style, 10^-4 ... 10^0, labelled on the bottom panel.
    texts = [t.get_text() for t in fig.axes[2].get_xticklabels() if t.get_text()]
    assert texts and all(MATHTEXT_POWER.fullmatch(t) for t in texts)
    assert {r"$\mathdefault{10^{-4}}$", r"$\mathdefault{10^{0}}$"} <= set(texts)
    assert all(not t.get_text() for t in fig.axes[0].get_xticklabels())
    assert all(ax.get_xlim() == fig.axes[2].get_xlim() for ax in fig.axes)


def test_curves_of_replicates_and_a_blown_up_run():
    _, summaries = replicate_summaries()
    for s in summaries:  # scale 1, baseline, every seed: the loss blows up
        if s["weight_scale"] == 1.0 and not s["batchnorm"]:
            s["loss_history"] = [v * 1e6 for v in s["loss_history"]]
    fig = plots.build_curves_figure(summaries)
    loss_ax, train_ax, val_ax = fig.axes
    # One blown-up run does not flatten the others: clipped at twice a uniform guess, said so.
    assert loss_ax.get_ylim() == (0.0, plots.CURVE_LOSS_TOP)
    labels = legend_labels(fig)
    assert len(labels) == len(set(labels))
    (clipped,) = [t for t in labels if "off the axis" in t]
    assert clipped.startswith("baseline, scale 1 (loss off the axis, up to ")
    # The validation accuracy of each drawn setting is the mean over the 3 seeds with a band.
    for s0 in [s for s in summaries if s["seed"] == 1 and s["weight_scale"] in (1e-4, 1.0)]:
        label = (
            ("batch norm" if s0["batchnorm"] else "baseline")
            + ", scale "
            + ("1e-4" if s0["weight_scale"] == 1e-4 else "1")
        )
        seeds = [
            s["val_acc_history"]
            for s in summaries
            if (s["batchnorm"], s["weight_scale"]) == (s0["batchnorm"], s0["weight_scale"])
        ]
        assert len(seeds) == 3
        (line,) = [a for a in val_ax.get_lines() if a.get_label() == label]
        np.testing.assert_allclose(line.get_ydata(), np.mean(seeds, axis=0))
        values = dict(enumerate(np.array(seeds).T))
        assert_band_is_mean_sd(band(val_ax, label), range(len(values)), values)
    # Integer epoch ticks; the legend sits below the axes, so it hides no data.
    fig.canvas.draw()
    for ax in (train_ax, val_ax):
        ticks = ax.get_xticks()
        assert np.array_equal(ticks, np.round(ticks))
        assert ax.get_legend() is None
    legend_top = fig.legends[0].get_window_extent().y1
    assert all(legend_top < ax.get_tightbbox().y0 + 1 for ax in fig.axes)


def test_curves_figure_of_two_runs(tmp_path):
    out = tmp_path / "out"
    _, written = write_fake(out, ["train.epochs=2", "model.weight_scale=0.02"])
    paths = plots.plot_results(out, formats=["svg", "png"])
    assert [p.name for p in paths] == ["training_curves.svg", "training_curves.png"]
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
