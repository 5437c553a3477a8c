"""Probe figures from records written to and read back from tmp_path: files are real, the lines
show the recorded numbers, nulls are gaps."""

import json

import numpy as np
import pytest

from bnexp import model, probe_plots, probes
from bnexp.model import NetSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCALES = (1e-3, 2e-2, 1.0)
ITERATIONS, EVERY = 13, 4


def _train_and_probe(batchnorm: bool) -> tuple[list[dict], list[dict]]:
    """SGD on a tiny problem for 3 nets (SCALES) with probes at 0, every EVERY and the end."""
    rng = np.random.default_rng(0)
    spec = NetSpec(12, (8, 8, 8), 4, batchnorm)
    normals = [rng.standard_normal((len(SCALES), *s)) for s in model.weight_shapes(spec)]
    params = model.init_params(spec, normals, np.array(SCALES), np.float64)
    X, y = rng.standard_normal((60, 12)), rng.integers(0, 4, 60)
    lr = np.full(len(SCALES), 0.05)
    layer_recs, land_recs, prev = [], [], None
    for t in range(ITERATIONS):
        idx = rng.choice(60, 10)
        bn = model.init_bn_params(spec, (len(SCALES),), np.float64)
        _, grads = model.loss_and_grads(spec, params, X[idx], y[idx], bn)
        new = {key: v - 0.05 * grads[key] for key, v in params.items()}
        if t % EVERY == 0 or t == ITERATIONS - 1:
            stats = probes.layer_stats(spec, params, X[:20], y[:20], 1e-5, prev)
            shift = {
                (r["net"], r["layer"]): r
                for r in probes.ics(spec, params, new, *_b(X, y, idx), 1e-5)
            }
            for r in stats:  # the loop may merge ICS into the layer records of the same layer
                r.update(shift.pop((r["net"], r["layer"])))
            layer_recs += _tag([*stats, *shift.values()], t, batchnorm)
            land = probes.landscape(spec, params, *_b(X, y, idx), 1e-5, lr)
            land_recs += _tag(land, t, batchnorm)
        prev, params = params, new
    return layer_recs, land_recs


def _b(X, y, idx):
    return X[idx], y[idx]


def _tag(records, iteration, batchnorm):
    """Add what the loop adds: the iteration and the run's summary fields."""
    return [
        dict(
            r,
            iteration=iteration,
            batchnorm=batchnorm,
            weight_scale=SCALES[r["net"]],
            run_id=f"{'bn' if batchnorm else 'base'}{r['net']}",
        )
        for r in records
    ]


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """Records of 6 runs written as runs/<id>/layers.jsonl + landscape.jsonl and read back."""
    out = tmp_path_factory.mktemp("out")
    for batchnorm in (True, False):
        layer_recs, land_recs = _train_and_probe(batchnorm)
        for name, recs in (("layers", layer_recs), ("landscape", land_recs)):
            for r in recs:
                folder = out / "runs" / r["run_id"]
                folder.mkdir(parents=True, exist_ok=True)
                with open(folder / f"{name}.jsonl", "a") as f:
                    f.write(json.dumps(r, allow_nan=False) + "\n")

    def read(name):
        files = sorted((out / "runs").glob(f"*/{name}.jsonl"))
        return [json.loads(line) for p in files for line in p.read_text().splitlines()]

    return out, read("layers"), read("landscape")


def _line(ax, label):
    lines = [line for line in ax.get_lines() if line.get_label() == label]
    assert len(lines) == 1, [line.get_label() for line in ax.get_lines()]
    return lines[0]


@pytest.mark.slow
def test_figures_are_written_as_png_and_svg(stored):
    out, layer_recs, land_recs = stored
    default = probe_plots.save_probe_figures(out / "png_only", layer_recs, land_recs)
    assert sorted(p.suffix for p in default) == [".png"] * 3  # SVG only on request
    formats = ("png", "svg")
    paths = probe_plots.save_probe_figures(out / "plots", layer_recs, land_recs, formats)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        f"probe_{n}.{ext}"
        for n in ("gradient_flow", "activations", "ics_smoothness")
        for ext in ("png", "svg")
    )
    for p in paths:
        assert p.stat().st_size > 5000
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG_MAGIC


def test_gradient_flow_draws_the_recorded_norms_at_start_and_end(stored):
    _, layer_recs, _ = stored
    fig = probe_plots.gradient_flow_figure(layer_recs)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [
        "weight scale 1e-3",
        "weight scale 0.02",
        "weight scale 1",
    ]
    for iteration in (0, ITERATIONS - 1):
        line = _line(axes[1], f"batch norm, iteration {iteration}")
        want = [
            r["grad_w_norm"]
            for r in sorted(layer_recs, key=lambda r: r["layer"])
            if r["run_id"] == "bn1" and r["iteration"] == iteration and "grad_w_norm" in r
        ]
        np.testing.assert_array_equal(line.get_xdata(), [1, 2, 3])
        np.testing.assert_allclose(line.get_ydata(), want)
    assert axes[0].get_yscale() == "log"


def test_gradient_flow_draws_every_seed_of_a_kind(stored):
    """Two replicates (the same run recorded under another id and seed, its norms doubled): both
    are drawn at each end of training, the legend names the kind once with the run count."""
    _, layer_recs, _ = stored
    twin = [
        dict(r, run_id=r["run_id"] + "-seed2", grad_w_norm=2 * r["grad_w_norm"])
        for r in layer_recs
        if r["run_id"] == "bn1" and "grad_w_norm" in r
    ]
    ax = probe_plots.gradient_flow_figure([*layer_recs, *twin]).axes[1]
    last = ITERATIONS - 1
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels.count(f"batch norm, iteration {last}, 2 runs") == 1
    assert f"baseline, iteration {last}" in labels  # one baseline run: no count
    solid = [
        line.get_ydata()
        for line in ax.get_lines()
        if line.get_color() == ax.get_lines()[0].get_color() and line.get_linestyle() == "-"
    ]
    assert len(solid) == 2
    np.testing.assert_allclose(solid[1], 2 * solid[0])


def test_activation_band_follows_the_recorded_percentiles(stored):
    _, layer_recs, _ = stored
    fig = probe_plots.activation_figure(layer_recs)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["batch norm", "baseline"]
    ax = fig.axes[0]
    median = _line(ax, "median")
    want = sorted(
        (r["iteration"], r["act_p50"])
        for r in layer_recs
        if r["run_id"] == "bn1" and r["layer"] == 3 and "act_p50" in r
    )
    np.testing.assert_array_equal(median.get_xdata(), [i for i, _ in want])
    np.testing.assert_allclose(median.get_ydata(), [v for _, v in want])
    assert [i for i, _ in want] == [0, 4, 8, 12]
    band = ax.collections[0].get_paths()[0].vertices  # the 15-85% polygon spans p15..p85
    p15 = [r["act_p15"] for r in layer_recs if r["run_id"] == "bn1" and r.get("layer") == 3]
    p85 = [r["act_p85"] for r in layer_recs if r["run_id"] == "bn1" and r.get("layer") == 3]
    assert band[:, 1].min() == pytest.approx(min(p15)) and band[:, 1].max() == pytest.approx(
        max(p85)
    )


def test_ics_and_smoothness_lines_per_normalisation_kind(stored):
    _, layer_recs, land_recs = stored
    fig = probe_plots.ics_smoothness_figure(layer_recs, land_recs)
    ax_l2, ax_cos, ax_loss, ax_beta = fig.axes
    assert ax_l2.get_title() == "ICS of layer 4: ||G - G'||"  # the deepest recorded layer
    line = _line(ax_cos, "baseline")
    want = sorted(
        (r["iteration"], r["ics_cos"])
        for r in layer_recs
        if r["run_id"] == "base1" and r["layer"] == 4 and "ics_cos" in r
    )
    np.testing.assert_allclose(line.get_ydata(), [v for _, v in want])
    beta = _line(ax_beta, "batch norm")
    want = sorted((r["iteration"], r["beta_smoothness"]) for r in land_recs if r["run_id"] == "bn1")
    np.testing.assert_allclose(beta.get_ydata(), [v for _, v in want])
    assert len(ax_loss.collections) == 2


def test_null_values_are_gaps_not_zeros(stored):
    _, layer_recs, _ = stored
    broken = [
        dict(r, act_p50=None) if r["iteration"] == 4 and "act_p50" in r else r for r in layer_recs
    ]
    fig = probe_plots.activation_figure(broken)
    y = _line(fig.axes[0], "median").get_ydata()
    assert np.isnan(y[1]) and np.isfinite(y[[0, 2, 3]]).all()


def test_pick_scales_takes_the_ends_and_the_reference():
    scales = list(np.logspace(-4, 0, 20))
    picked = probe_plots.pick_scales(scales)
    assert picked[0] == pytest.approx(1e-4) and picked[2] == pytest.approx(1.0)
    assert picked[1] == pytest.approx(0.0207, rel=1e-2)
    assert probe_plots.pick_scales([0.1, 0.01]) == [0.01, 0.1]


def test_normalization_name_wins_over_the_batchnorm_flag():
    assert probe_plots.norm_kind({"normalization": "noisy_batchnorm", "batchnorm": True}) == (
        "noisy_batchnorm"
    )
    assert probe_plots.norm_kind({"batchnorm": False}) == "none"


def test_zero_gradient_norms_are_marked_at_the_bottom_edge(stored):
    _, layer_recs, _ = stored
    last = ITERATIONS - 1
    zeroed = [
        dict(r, grad_w_norm=0.0)
        if r["run_id"] == "base1" and r["iteration"] == last and r.get("layer") in (2, 3)
        else r
        for r in layer_recs
    ]
    ax = probe_plots.gradient_flow_figure(zeroed).axes[1]
    _line(ax, f"baseline, iteration {last} (▼: zero)")
    marks = [line for line in ax.get_lines() if line.get_marker() == "v"]
    assert len(marks) == 1
    np.testing.assert_array_equal(marks[0].get_xdata(), [2, 3])


def _with_a_replicate(records, run_id, shift):
    """The records plus a copy of run `run_id`'s as another seed, every number plus `shift`."""
    fields = ("act_p15", "act_p50", "act_p85", "ics_l2", "beta_smoothness", "loss_min", "loss_max")
    copy = [
        {**r, "run_id": run_id + "-seed2", **{k: r[k] + shift for k in fields if r.get(k)}}
        for r in records
        if r["run_id"] == run_id
    ]
    return [*records, *copy]


def test_replicates_are_faint_lines_and_their_mean(stored):
    _, layer_recs, land_recs = stored
    layer2 = _with_a_replicate(layer_recs, "bn1", 1.0)
    land2 = _with_a_replicate(land_recs, "bn1", 1.0)
    fig = probe_plots.activation_figure(layer2)
    ax = fig.axes[0]
    assert ax.get_title() == "batch norm, 2 runs"
    median = _line(ax, "median (mean of 2 runs)")
    want = sorted(
        (r["iteration"], r["act_p50"] + 0.5)
        for r in layer_recs
        if r["run_id"] == "bn1" and r["layer"] == 3 and "act_p50" in r
    )
    np.testing.assert_allclose(median.get_ydata(), [v for _, v in want])
    assert len([line for line in ax.get_lines() if line.get_alpha() == 0.3]) == 2 * 3
    assert _line(fig.axes[1], "median").get_alpha() is None  # one baseline run: as before
    fig = probe_plots.ics_smoothness_figure(layer2, land2)
    beta = _line(fig.axes[3], "batch norm (mean of 2 runs)")
    want = sorted((r["iteration"], r["beta_smoothness"]) for r in land_recs if r["run_id"] == "bn1")
    np.testing.assert_allclose(beta.get_ydata(), [v + 0.5 for _, v in want])
