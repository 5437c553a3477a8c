"""Figures of the probes inside the networks (`bnexp.probes`), drawn from their records only.

The records are the dicts of ``runs/<run_id>/layers.jsonl`` (one per run, iteration and hidden
layer; may also carry ``ics_l2``/``ics_cos``) and ``runs/<run_id>/landscape.jsonl`` (one per run
and iteration), each with the probe's fields, its ``iteration`` and the run's summary fields
(``batchnorm`` or ``normalization``, ``weight_scale``, optionally ``run_id``, ``diverged``). A null
(None) value is a number that was not finite; it is left out of the lines, never drawn as zero.

- `gradient_flow_figure`: ``grad_w_norm`` per layer (log axis) at the first and the last probed
  iteration, one line per normalisation kind, one panel per weight scale (by default the
  smallest, the one closest to the CS231n reference 2e-2 and the largest). An exactly zero norm
  (every unit of a layer dead, or float32 underflow) is a triangle at the bottom edge.
- `activation_figure`: the 15/50/85 percentile band of a deep layer's pre-activation against
  iteration, one panel per normalisation kind (Ioffe and Szegedy 2015, Figure 1; Santurkar et
  al. 2018, Figure 2; here for ReLU nets).
- `ics_smoothness_figure`: ``ics_l2``, ``ics_cos`` of a layer, the loss range along the gradient
  and the effective beta-smoothness against iteration, one line per normalisation kind.
- `save_probe_figures`: the three figures into a folder, as PNG (and SVG on request).

Each figure draws the replicates of a normalisation kind at a weight scale: the runs of that
kind, scale and the learning rate of its first run (seeds). `gradient_flow_figure` draws every
replicate's lines; the other two draw them as faint lines and their mean over the runs at each
iteration as the bold line or band (with one run, that run).

Built on `matplotlib.figure.Figure` (Agg canvas, no pyplot), like `bnexp.plots`.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from bnexp.errors import OutputError
from bnexp.plots import KIND_STYLE, fmt_sci, save_figure

#: The weight scale of the CS231n deep-network experiment; the middle panel of a sweep.
REFERENCE_SCALE = 2e-2
#: Colours per normalisation kind (batch norm and baseline as in `bnexp.plots`).
KIND_COLORS = {kind: style["color"] for kind, style in KIND_STYLE.items()}
KIND_LABELS = {kind: style["label"] for kind, style in KIND_STYLE.items()}


# --- selecting records ------------------------------------------------------------------------


def norm_kind(record: dict) -> str:
    """Normalisation kind of a record's run: its ``normalization``, else from ``batchnorm``."""
    name = record.get("normalization")
    if name is not None:
        return str(name)
    return "batchnorm" if record.get("batchnorm") else "none"


def _kind_style(kind: str) -> dict:
    """Colour and legend label of a normalisation kind."""
    return {"color": KIND_COLORS.get(kind, "C3"), "label": KIND_LABELS.get(kind, kind)}


def _run_key(record: dict):
    """Identifies a run among records of several runs."""
    if record.get("run_id") is not None:
        return record["run_id"]
    return (norm_kind(record), record.get("weight_scale"), record.get("learning_rate"))


def _num(value) -> float:
    """A record number as float, None as NaN."""
    return np.nan if value is None else float(value)


def pick_scales(scales: Sequence[float], reference: float = REFERENCE_SCALE) -> list[float]:
    """The smallest, the one closest to `reference` (on a log axis) and the largest scale."""
    values = sorted({float(s) for s in scales if s is not None and s > 0})
    if len(values) <= 3:
        return values
    middle = min(values, key=lambda s: abs(math.log(s / reference)))
    return sorted({values[0], middle, values[-1]})


def _closest_scale(records: Sequence[dict], scale: float | None) -> float | None:
    """The records' weight scale closest to `scale` (default the reference) on a log axis."""
    values = {float(r["weight_scale"]) for r in records if r.get("weight_scale")}
    if not values:
        return None
    target = REFERENCE_SCALE if scale is None else scale
    return min(values, key=lambda s: abs(math.log(s / target)))


def _at_scale(record: dict, scale: float | None) -> bool:
    """Whether a record belongs to weight scale `scale` (every record when None or unrecorded)."""
    recorded = record.get("weight_scale")
    return scale is None or not recorded or math.isclose(float(recorded), scale)


def _replicates(records: Sequence[dict], scale: float | None) -> dict[str, list[list[dict]]]:
    """Per normalisation kind, the records of each replicate run: the runs at that scale with the
    learning rate of the kind's first run (seeds), in first-seen order."""
    out: dict[str, dict[object, list[dict]]] = defaultdict(dict)
    rate: dict[str, object] = {}
    for r in records:
        if not _at_scale(r, scale):
            continue
        kind = norm_kind(r)
        if rate.setdefault(kind, r.get("learning_rate")) != r.get("learning_rate"):
            continue
        out[kind].setdefault(_run_key(r), []).append(r)
    return {kind: list(runs.values()) for kind, runs in out.items()}


def _mean_series(runs: Sequence[Sequence[dict]], field: str, layer: int | None = None):
    """(iterations, mean over the runs of a field) at every iteration any run recorded; a run
    missing an iteration or with a null there is left out of that iteration's mean."""
    series = [dict(zip(*_series(recs, field, layer), strict=True)) for recs in runs]
    iterations = np.array(sorted({i for s in series for i in s}), dtype=float)
    values = np.array([[s.get(i, np.nan) for i in iterations] for s in series]).reshape(
        len(series), -1
    )
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an iteration with no finite value
        return iterations, np.nanmean(values, axis=0)


def _mean_label(label: str, runs: Sequence) -> str:
    """A legend label, with the number of runs averaged when there are several."""
    return label if len(runs) == 1 else f"{label} (mean of {len(runs)} runs)"


def _series(records: Sequence[dict], field: str, layer: int | None = None):
    """(iterations, values) of a field over iterations, sorted; NaN where the value is null."""
    rows = sorted(
        (r["iteration"], _num(r.get(field)))
        for r in records
        if field in r and (layer is None or r.get("layer") == layer)
    )
    return np.array([i for i, _ in rows], dtype=float), np.array([v for _, v in rows])


def _title_suffix(records: Sequence[dict]) -> str:
    return " (diverged)" if any(r.get("diverged") for r in records) else ""


# --- figures ----------------------------------------------------------------------------------


def gradient_flow_figure(layer_records: Sequence[dict], scales=None) -> Figure:
    """grad_w_norm per hidden layer at the first and last probed iteration, per weight scale.

    layer_records: layer records of one or more runs. scales: the panels' weight scales
    (default `pick_scales` of the records'); runs are matched to a panel by exact scale. Every
    replicate (seed) of a normalisation kind is drawn, so the spread over seeds shows; the
    legend names each kind and iteration once, with the number of runs.
    """
    if scales is None:
        scales = pick_scales([r.get("weight_scale") for r in layer_records])
    fig = Figure(figsize=(4.2 * max(len(scales), 1), 4.2), layout="constrained")
    axes = fig.subplots(1, max(len(scales), 1), sharey=True, squeeze=False)[0]
    for ax, scale in zip(axes, scales, strict=False):
        for kind, runs in sorted(_replicates(layer_records, scale).items()):
            _gradient_flow_lines(ax, kind, runs)
        ax.set_yscale("log")
        ax.set(title=f"weight scale {fmt_sci(scale)}", xlabel="hidden layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("gradient norm ||dL/dW|| (probe batch)")
    # One panel is too narrow for the title on one line (it was cut at both sides).
    sep = "\n" if len(axes) == 1 else " "
    fig.suptitle(f"Gradient flow: weight-gradient norm per layer,{sep}start and end of training")
    return fig


def _gradient_flow_lines(ax, kind: str, runs: Sequence[Sequence[dict]]) -> None:
    """One kind's lines in a panel: per replicate run, the norm per layer at the first probed
    iteration (dashed) and the last (solid); a zero norm is a triangle at the bottom edge."""
    style = _kind_style(kind)
    recs = [r for run in runs for r in run]
    iterations = sorted({r["iteration"] for r in recs if "grad_w_norm" in r})
    ends = [(iterations[0], "--", "o")] if iterations else []
    if len(iterations) > 1:
        ends.append((iterations[-1], "-", "s"))
    count = f", {len(runs)} runs" if len(runs) > 1 else ""
    for iteration, linestyle, marker in ends:
        label = f"{style['label']}{_title_suffix(recs)}, iteration {iteration}{count}"
        for k, run in enumerate(runs):
            rows = sorted(
                (r["layer"], _num(r["grad_w_norm"]))
                for r in run
                if r["iteration"] == iteration and "grad_w_norm" in r
            )
            zeros = [layer for layer, value in rows if value == 0]
            _zero_marks(ax, zeros, marker, style)
            if zeros and " (▼: zero)" not in label:
                label += " (▼: zero)"
            ax.plot(
                [layer for layer, _ in rows],
                [value for _, value in rows],
                linestyle=linestyle,
                marker=marker,
                color=style["color"],
                alpha=1.0 if len(runs) == 1 else 0.6,
                label=label if k == len(runs) - 1 else None,
            )


def activation_figure(layer_records: Sequence[dict], layer=None, scale=None) -> Figure:
    """15/50/85 percentile band of one hidden layer's pre-activation against iteration.

    layer: hidden layer to show (default the deepest in the records). scale: weight scale (default
    the records' scale closest to the reference 2e-2). One panel per normalisation kind, since the
    ranges differ by orders of magnitude without normalisation.
    """
    recs_with = [r for r in layer_records if "act_p50" in r]
    if layer is None:
        layer = max((r["layer"] for r in recs_with), default=1)
    scale = _closest_scale(recs_with, scale)
    kinds = sorted(_replicates(recs_with, scale).items())
    fig = Figure(figsize=(4.6 * max(len(kinds), 1), 4.0), layout="constrained")
    axes = fig.subplots(1, max(len(kinds), 1), squeeze=False)[0]
    for ax, (kind, runs) in zip(axes, kinds, strict=False):
        color = _kind_style(kind)["color"]
        if len(runs) > 1:  # each replicate faint, its band's edges and its median
            for recs in runs:
                for field, width in (("act_p15", 0.6), ("act_p50", 0.9), ("act_p85", 0.6)):
                    ax.plot(*_series(recs, field, layer), color=color, alpha=0.3, lw=width)
        iterations, p15 = _mean_series(runs, "act_p15", layer)
        _, p50 = _mean_series(runs, "act_p50", layer)
        _, p85 = _mean_series(runs, "act_p85", layer)
        ax.fill_between(iterations, p15, p85, color=color, alpha=0.3, label="15-85%")
        ax.plot(iterations, p50, color=color, label=_mean_label("median", runs))
        recs = [r for run in runs for r in run]
        title = _kind_style(kind)["label"] + _title_suffix(recs)
        ax.set(title=title if len(runs) == 1 else f"{title}, {len(runs)} runs", xlabel="iteration")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"pre-activation of hidden layer {layer}")
    scale_text = "" if scale is None else f", weight scale {fmt_sci(scale)}"
    fig.suptitle(f"Activation distribution over training (layer {layer}{scale_text})")
    return fig


def ics_smoothness_figure(
    layer_records: Sequence[dict], landscape_records: Sequence[dict], layer=None, scale=None
) -> Figure:
    """ics_l2, ics_cos (one layer), loss range along the gradient and beta-smoothness vs iteration.

    layer_records: records carrying ``ics_l2``/``ics_cos``; layer: which (default the deepest
    one recorded). scale: weight scale (default closest to the reference). One line (or band)
    per normalisation kind.
    """
    ics_recs = [r for r in layer_records if "ics_l2" in r]
    if layer is None:
        layer = max((r["layer"] for r in ics_recs), default=1)
    scale = _closest_scale([*ics_recs, *landscape_records], scale)
    fig = Figure(figsize=(10, 7.5), layout="constrained")
    (ax_l2, ax_cos), (ax_loss, ax_beta) = fig.subplots(2, 2, sharex=True)
    for kind, runs in sorted(_replicates(ics_recs, scale).items()):
        style = dict(_kind_style(kind), label=_mean_label(_kind_style(kind)["label"], runs))
        for ax, field in ((ax_l2, "ics_l2"), (ax_cos, "ics_cos")):
            _faint(ax, runs, field, layer, style["color"])
            ax.plot(*_mean_series(runs, field, layer), marker=".", **style)
    for kind, runs in sorted(_replicates(landscape_records, scale).items()):
        style = dict(_kind_style(kind), label=_mean_label(_kind_style(kind)["label"], runs))
        iterations, low = _mean_series(runs, "loss_min")
        _, high = _mean_series(runs, "loss_max")
        ax_loss.fill_between(iterations, low, high, color=style["color"], alpha=0.35, **_lab(style))
        _faint(ax_beta, runs, "beta_smoothness", None, style["color"])
        ax_beta.plot(*_mean_series(runs, "beta_smoothness"), marker=".", **style)
    ax_l2.set(title=f"ICS of layer {layer}: ||G - G'||", yscale="log")
    ax_cos.set(title=f"ICS of layer {layer}: cos(G, G')", ylim=(-1.05, 1.05))
    ax_loss.set(title="loss range along the gradient", xlabel="iteration", yscale="log")
    ax_beta.set(title="effective beta-smoothness", xlabel="iteration", yscale="log")
    for ax in (ax_l2, ax_cos, ax_loss, ax_beta):
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    scale_text = "" if scale is None else f" (weight scale {fmt_sci(scale)})"
    fig.suptitle(f"Internal covariate shift and loss smoothness over training{scale_text}")
    return fig


def _faint(ax, runs: Sequence[Sequence[dict]], field: str, layer, color) -> None:
    """Each replicate's line of a field, faint and unlabelled (nothing with a single run)."""
    if len(runs) > 1:
        for recs in runs:
            ax.plot(*_series(recs, field, layer), color=color, alpha=0.3, lw=0.8)


def _zero_marks(ax, xs: list, marker: str, style: dict) -> None:
    """Mark x positions whose value is exactly 0 (no place on a log axis) at the panel's bottom."""
    if xs:
        ax.plot(
            xs,
            [0.03] * len(xs),
            transform=blended_transform_factory(ax.transData, ax.transAxes),
            marker="v",
            markersize=7,
            linestyle="none",
            color=style["color"],
            clip_on=False,
            label="_nolegend_",
        )


def _lab(style: dict) -> dict:
    """Only the label of a style (fill_between takes its colour separately)."""
    return {"label": style["label"]}


def save_probe_figures(
    folder: str | Path,
    layer_records: Sequence[dict],
    landscape_records: Sequence[dict],
    formats: Sequence[str] = ("png",),
) -> list[Path]:
    """Draw the probe figures whose records exist into folder (each in `formats`); returns the
    paths.

    Raises OutputError when the folder cannot be created or written.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create ({exc.strerror or exc}); check OUT") from None
    paths: list[Path] = []
    if any("grad_w_norm" in r for r in layer_records):
        paths += save_figure(
            gradient_flow_figure(layer_records), folder, "probe_gradient_flow", formats
        )
    if any("act_p50" in r for r in layer_records):
        paths += save_figure(activation_figure(layer_records), folder, "probe_activations", formats)
    if any("ics_l2" in r for r in layer_records) or landscape_records:
        fig = ics_smoothness_figure(layer_records, landscape_records)
        paths += save_figure(fig, folder, "probe_ics_smoothness", formats)
    return paths
