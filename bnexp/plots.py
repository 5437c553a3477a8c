"""Figures drawn from stored records only (OUT/runs/*/summary.json); never imports the model.

`plot_results(out)` writes into OUT/plots/ (PNG at 150 dpi; SVG too when asked for):

- ``training_curves``: training loss vs iteration, train and val accuracy vs epoch, batch norm vs
  baseline. With more than three weight scales (a sweep) only three representative scales are
  drawn (the smallest, the middle one and the largest, at the first value of any other swept
  setting), since 40 overlaid curves cannot be read; the figure title says so. Losses above
  twice a uniform guess are off the axis, and the lines that go there say so in the legend.
- ``weight_init_sweep`` (when there is more than one weight scale): best val accuracy, best train
  accuracy and final training loss vs weight scale on a shared log axis. The loss panel is linear
  from 1 to 3.5, as in the CS231n notebook; blown-up losses are triangles on its top edge with
  their value written above, and diverged runs red x markers (never dropped).

With several seeds, every line is the mean over the seeds of a setting, the shaded band is ± 1
sample standard deviation over those seeds (the legend says so, with n), and the sweep figure
draws each seed as a faint dot. Replicates are grouped by `bnexp.report.group_runs`.

Figures are built on `matplotlib.figure.Figure` (the Agg canvas, no pyplot state) with a fixed
layout in inches (no constrained layout: it costs more than the drawing), so plotting works
without a display and leaks nothing between calls.
"""

from __future__ import annotations

import math
import re
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import LogFormatterSciNotation, LogLocator, MaxNLocator, NullLocator
from matplotlib.transforms import blended_transform_factory, offset_copy

from bnexp import drawing, records, report
from bnexp.errors import OutputError

CHANCE_ACC = 0.1  # 10 CIFAR-10 classes
UNIFORM_LOSS = math.log(10)  # softmax loss of a uniform guess over 10 classes
SWEEP_LOSS_RANGE = (1.0, 3.5)  # the notebook's linear y range of the final-loss panel
CURVE_LOSS_TOP = 2 * UNIFORM_LOSS  # training curves: a loss above this has blown up (clipped)
#: Colour and legend name of each normalization (batch norm and baseline as the notebook's).
KIND_STYLE = {
    "batchnorm": {"color": "C0", "label": "batch norm"},
    "none": {"color": "C1", "label": "baseline"},
    "layernorm": {"color": "C2", "label": "layer norm"},
    "noisy_batchnorm": {"color": "C3", "label": "noisy batch norm"},
}
DIVERGED_COLOR = "red"
LINESTYLES = ("-", "--", ":", "-.")
BAND_ALPHA = 0.2
DPI = 150
FORMATS = ("png", "svg")  # what plot_results can write; PNG alone by default (SVG costs as much)
_UPDATE_NAMES = {"adam": "Adam", "sgd": "SGD", "sgd_momentum": "SGD+momentum"}
# The temporary files of records.atomic_write in OUT/plots: .<stem>.<ext>.<random>.tmp
_TEMP_NAME = re.compile(r"\.[\w.-]+\.(png|svg)\.[\w-]+\.tmp")


# --- small helpers --------------------------------------------------------------------------


def _arr(values: Sequence[Any] | None) -> np.ndarray:
    """Floats with None (JSON null) as NaN; shape (n,)."""
    if values is None:
        return np.array([], dtype=float)
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _num(value: Any) -> float:
    """A summary number as float, None as NaN."""
    return np.nan if value is None else float(value)


def fmt_sci(x: float) -> str:
    """Compact number: 0.001 -> '1e-3', 0.0206 -> '0.0206', 0.5 -> '0.5', 2950 -> '3e3'."""
    if x == 0 or 1e-2 <= abs(x) < 1e3:
        return f"{x:.3g}"
    mantissa, exp = f"{x:.1e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exp)}"


def _values(summaries: Sequence[dict], key: str) -> list:
    """Distinct values of a summary field in first-seen order (lists made hashable)."""
    seen: list = []
    for s in summaries:
        v = s.get(key)
        v = tuple(v) if isinstance(v, list) else v
        if v not in seen:
            seen.append(v)
    return seen


def _joined(values: list, fmt=str) -> str:
    return "/".join(fmt(v) for v in values if v is not None)


def caption(summaries: Sequence[dict], expected_runs: int | None = None) -> str:
    """One line on the data and the nets, e.g. 'CIFAR-10, 1,000 training images, ...'."""
    parts = ["CIFAR-10"]
    for key, what in (("num_train", "training images"), ("num_val", "validation images")):
        vals = [v for v in _values(summaries, key) if v is not None]
        if vals:
            parts.append(f"{_joined(vals, lambda v: f'{int(v):,}')} {what}")
    hidden = [h for h in _values(summaries, "hidden_dims") if h]
    if hidden:
        texts = []
        for h in hidden:
            texts.append(f"[{h[0]}]x{len(h)}" if len(set(h)) == 1 else str(list(h)))
        parts.append("hidden " + "/".join(texts))
    rules = _values(summaries, "update_rule")
    lrs = _values(summaries, "learning_rate")
    if rules != [None] or lrs != [None]:
        rule = _joined(rules, lambda r: _UPDATE_NAMES.get(r, str(r)))
        parts.append(f"{rule} lr {_joined(lrs, fmt_sci)}".strip())
    epochs = _values(summaries, "epochs")
    if epochs != [None]:
        parts.append(f"{_joined(epochs)} epochs")
    batch = _values(summaries, "batch_size")
    if batch != [None]:
        parts.append(f"batch {_joined(batch)}")
    seeds = _values(summaries, "seed")
    if seeds != [None]:
        rng = _joined(_values(summaries, "rng"))
        parts.append(f"seed {_joined(seeds)}" + (f" ({rng} rng)" if rng else ""))
    n = len(summaries)
    if expected_runs is not None and n < expected_runs:
        parts.append(f"partial: {n} of {expected_runs} runs")
    diverged = sum(bool(s.get("diverged")) for s in summaries)
    if diverged:
        parts.append(f"{diverged} diverged")
    return ", ".join(parts)


def _mathtext_log_ticks(axis) -> None:
    """Log tick labels in one style, mathtext powers of ten (10^-4 ... 10^0); no minor labels."""
    axis.set_major_formatter(LogFormatterSciNotation())
    axis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=True))


def _stack(histories: Sequence[Sequence[Any] | None]) -> np.ndarray:
    """Histories of several seeds as one array (seeds, T), NaN-padded to the longest."""
    arrays = [_arr(h) for h in histories]
    out = np.full((len(arrays), max((a.size for a in arrays), default=0)), np.nan)
    for i, a in enumerate(arrays):
        out[i, : a.size] = a
    return out


def mean_sd(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample SD (ddof = 1) over axis 0 of finite values; values: (seeds, T) -> (T,).

    NaN where no value is finite (mean) or fewer than two are (SD).
    """
    finite = np.isfinite(values)
    n = finite.sum(axis=0)
    x = np.where(finite, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = x.sum(axis=0) / n
        dev = np.where(finite, values - mean, 0.0)
        sd = np.sqrt((dev**2).sum(axis=0) / (n - 1))
    return np.where(n > 0, mean, np.nan), np.where(n > 1, sd, np.nan)


# --- lines: replicates of one setting -------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """One drawn line: the replicates (seeds) of one setting at each x.

    xs: (P,) x positions (weight scales); runs[p]: the summaries of the seeds at xs[p].
    """

    label: str
    color: str
    linestyle: str
    xs: tuple[float, ...]
    runs: tuple[tuple[dict, ...], ...]

    @property
    def seeds(self) -> int:
        """Most replicates at any x (1 without replicates)."""
        return max((len(r) for r in self.runs), default=0)


def _label(summary: dict, keys: Sequence[str], hue: str | None = None) -> str:
    """'batch norm' or 'baseline' (after '<hue> <value>' when colouring by a setting), then
    'scale 1e-4, lr 1e-3, ...' for the given setting keys."""
    kind = KIND_STYLE[summary["normalization"]]["label"]
    parts = [_setting_text(summary, hue), kind] if hue and hue != "normalization" else [kind]
    parts += [_setting_text(summary, key) for key in keys if key != hue]
    return ", ".join(parts)


def _setting_text(summary: dict, key: str) -> str:
    """'lr 1e-3', 'batch_size 5': a setting's short name and value."""
    value = summary.get(key)
    text = fmt_sci(value) if isinstance(value, float) else report.fmt_value(value)
    return f"{report.SHORT_NAMES.get(key, key)} {text}"


def _make_lines(
    summaries: Sequence[dict], x_key: str | None, label_keys: list[str], hue: str | None = None
) -> list[Line]:
    """Lines of replicate groups: one per setting (without seed and x_key), BN lines first.

    Colour = the normalization (batch norm, baseline, ...), or the value of setting `hue` when
    given; line style = the other settings (scale, lr, ...).
    """
    without = ("seed", x_key) if x_key else ("seed",)
    colour_keys = (hue,) if hue else ("batchnorm", "normalization")
    kind_keys = (*without, *colour_keys)
    styles = report.group_runs(summaries, kind_keys)
    style_of = {report.setting_of(g[0], kind_keys): i for i, g in enumerate(styles)}
    hues = sorted({report.hashable(s.get(hue)) for s in summaries}, key=str) if hue else []
    lines = []
    for group in report.group_runs(summaries, without):
        points = report.group_runs(group, ("seed",))
        if x_key:
            points = [p for p in points if p[0].get(x_key) is not None]
            points.sort(key=lambda p: float(p[0][x_key]))
        first = group[0]
        if hue:
            color = f"C{hues.index(report.hashable(first.get(hue))) % 10}"
        else:
            color = KIND_STYLE[first["normalization"]]["color"]
        index = style_of[report.setting_of(first, kind_keys)]
        lines.append(
            Line(
                label=_label(first, label_keys, hue),
                color=color,
                linestyle=LINESTYLES[index % len(LINESTYLES)],
                xs=tuple(float(p[0][x_key]) if x_key else 0.0 for p in points),
                runs=tuple(tuple(p) for p in points),
            )
        )
    order = [f"C{i}" for i in range(10)]
    lines.sort(key=lambda line: order.index(line.color))  # stable: BN first, then baseline, ...
    return lines


def _point_stats(line: Line, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample SD over seeds of summary field `key` at each x; (P,) each."""
    stats = [report.stat(runs, key) for runs in line.runs]
    return np.array([s.mean for s in stats]), np.array([s.sd for s in stats])


def _band_text(lines: Sequence[Line]) -> str | None:
    """The legend text of the shaded band, None when no line has replicates."""
    counts = sorted({len(r) for line in lines for r in line.runs if len(r) > 1})
    if not counts:
        return None
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"shaded: mean ± 1 SD over n = {n} seeds"


# --- layout ---------------------------------------------------------------------------------


def _legend_below(fig: Figure, handles: list, ncol: int, y_in: float) -> None:
    """One figure legend below the axes (it hides no data), entries unique by label."""
    unique: dict[str, Any] = {}
    for handle in handles:
        unique.setdefault(handle.get_label(), handle)
    fig.legend(
        list(unique.values()),
        list(unique),
        loc="lower center",
        bbox_to_anchor=(0.5, y_in / fig.get_figheight()),
        ncol=min(ncol, len(unique)),
        fontsize=8,
        frameon=False,
    )


def _legend_rows(n_entries: int, ncol: int) -> int:
    return math.ceil(n_entries / ncol)


def _caption(fig: Figure, text: str, chars: int) -> None:
    """The caption under everything, wrapped at `chars` characters."""
    wrapped = textwrap.fill(text, chars)
    fig.supxlabel(wrapped, fontsize=9, color="0.3", y=0.08 / fig.get_figheight(), va="bottom")


def _caption_height(text: str, chars: int) -> float:
    """Inches the caption of `_caption` takes (9 pt lines)."""
    return 0.12 + 0.17 * (textwrap.fill(text, chars).count("\n") + 1)


def _edge_mark(ax, x: float, y_axes: float, slot: float, **marker) -> Any:
    """A marker at data x and axes-fraction y, `slot` x 7 points sideways; returns its transform."""
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    trans = offset_copy(trans, fig=ax.figure, x=7 * slot, y=0, units="points")
    ax.plot([x], [y_axes], transform=trans, clip_on=False, linestyle="none", **marker)
    return trans


# --- training curves ------------------------------------------------------------------------


def select_curve_runs(summaries: Sequence[dict], max_scales: int = 3) -> list[dict]:
    """The runs drawn in the training-curves figure.

    All runs when there are at most `max_scales` weight scales; otherwise every seed of the
    smallest, middle and largest scale (BN and baseline each), at the first run's value of every
    other setting (learning rate, ...).
    """
    scales = sorted(s for s in _values(summaries, "weight_scale") if s is not None)
    if len(scales) <= max_scales:
        return list(summaries)
    picked = {scales[0], scales[len(scales) // 2], scales[-1]}
    fixed = ("seed", "weight_scale", "batchnorm", "normalization")
    first = report.setting_of(summaries[0], fixed)
    return [
        s
        for s in summaries
        if s.get("weight_scale") in picked and report.setting_of(s, fixed) == first
    ]


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over `window` points, NaN where any value in the window is NaN."""
    if window <= 1 or y.size < window:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    out = np.full_like(y, np.nan)
    out[window - 1 :] = (c[window:] - c[:-window]) / window
    return out


@dataclass(frozen=True)
class Curves:
    """What the curves figure draws of one line (its seeds): means and SDs over the seeds.

    raw: (T,) per-minibatch loss; smooth, smooth_sd: (T,) epoch moving average; train, val and
    their _sd: (E + 1,) accuracies; diverged: iterations where a seed diverged.
    """

    raw: np.ndarray
    smooth: np.ndarray
    smooth_sd: np.ndarray
    train: np.ndarray
    train_sd: np.ndarray
    val: np.ndarray
    val_sd: np.ndarray
    diverged: tuple[int, ...]


def curves_of(runs: Sequence[dict]) -> Curves:
    """Mean and SD over the seeds of one setting (finite values only); see `Curves`."""
    loss = _stack([s.get("loss_history") for s in runs])
    window = int(runs[0].get("iterations_per_epoch") or 20)
    smooth = np.array([_smooth(row, window) for row in loss]).reshape(loss.shape)
    train = _stack([s.get("train_acc_history") for s in runs])
    val = _stack([s.get("val_acc_history") for s in runs])
    diverged = tuple(
        int(s["diverged_iteration"])
        for s in runs
        if s.get("diverged") and s.get("diverged_iteration") is not None
    )
    return Curves(mean_sd(loss)[0], *mean_sd(smooth), *mean_sd(train), *mean_sd(val), diverged)


def _curve_top(curves: Sequence[Curves]) -> float | None:
    """The loss axis' top when a blown-up run would flatten the others (CURVE_LOSS_TOP), else
    None (automatic)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN curves
        highest = max((np.nanmax(c.raw) for c in curves if np.isfinite(c.raw).any()), default=0)
    return CURVE_LOSS_TOP if highest > CURVE_LOSS_TOP else None


def _clip_note(c: Curves, top: float | None) -> str:
    """' (loss off the axis, up to 2.6e8)' for a line the loss axis clips, else ''."""
    if top is None or not (np.isfinite(c.raw).any() and np.nanmax(c.raw) > top):
        return ""
    return f" (loss off the axis, up to {fmt_sci(float(np.nanmax(c.raw)))})"


def _curve_handles(lines, curves, top) -> list:
    """Legend entries of the curves figure, one per line then what the marks mean."""
    handles: list = [
        Line2D([], [], color=ln.color, ls=ln.linestyle, label=ln.label + _clip_note(c, top))
        for ln, c in zip(lines, curves, strict=True)
    ]
    band = _band_text(lines)
    if band:
        handles.append(Patch(facecolor="0.5", alpha=BAND_ALPHA, label=band))
    if any(c.diverged for c in curves):
        handles.append(_diverged_proxy("diverged (iteration where the loss stopped being finite)"))
    if top is not None:
        text = f"loss above {top:.2f} (2 x uniform guess): at its peak on the top edge"
        handles.append(Line2D([], [], color="0.4", marker="^", ls="none", label=text))
    handles.append(_reference_proxy("chance (10%)"))
    handles.append(_reference_proxy("uniform guess (ln 10)"))
    return handles


def _draw_curve_loss(ax, line: Line, c: Curves, top: float | None, slot: float) -> None:
    """Faint per-minibatch mean loss, bold epoch average and band, clipping and divergence marks."""
    it = np.arange(1, c.raw.size + 1)
    ax.plot(it, c.raw, alpha=0.25, linewidth=0.6, color=line.color)
    label = line.label + _clip_note(c, top)
    ax.plot(it, c.smooth, color=line.color, ls=line.linestyle, linewidth=1.6, label=label)
    if line.seeds > 1:
        ax.fill_between(
            it, c.smooth - c.smooth_sd, c.smooth + c.smooth_sd, color=line.color,
            alpha=BAND_ALPHA, lw=0, label=f"_band {line.label}",
        )  # fmt: skip
    if _clip_note(c, top):
        peak = int(np.nanargmax(c.raw)) + 1
        _edge_mark(ax, peak, 1.0, slot, marker="^", color=line.color, ms=7, label="_clipped")
    for iteration in c.diverged:
        marker = {"marker": "x", "color": DIVERGED_COLOR, "ms": 9, "mew": 2}
        _edge_mark(ax, iteration, 0.97, 0, label="diverged", **marker)


def _draw_curve_accuracy(ax, line: Line, mean: np.ndarray, sd: np.ndarray) -> None:
    """Accuracy at each check (epoch 0 = after the first iteration), mean over seeds and band."""
    epochs = np.arange(mean.size)
    style = {"color": line.color, "ls": line.linestyle}
    ax.plot(epochs, mean, marker="o", markersize=3.5, label=line.label, **style)
    if line.seeds > 1:
        ax.fill_between(
            epochs, mean - sd, mean + sd, color=line.color, alpha=BAND_ALPHA, lw=0,
            label=f"_band {line.label}",
        )  # fmt: skip


def _curves_canvas(n_handles: int, caption_text: str) -> tuple[Figure, Any, float]:
    """The figure and its three axes side by side; returns the caption's height (inches)."""
    width, axes_h, left, right, gap, top = 15.0, 3.6, 0.75, 0.2, 0.8, 0.75
    caption_h = _caption_height(caption_text, 170)
    bottom = 0.6 + 0.2 * _legend_rows(n_handles, 3) + 0.1 + caption_h
    height = top + axes_h + bottom
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(1, 3)
    axes_w = (width - left - right - 2 * gap) / 3
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, bottom=bottom / height,
        top=1 - top / height, wspace=gap / axes_w,
    )  # fmt: skip
    return fig, axes, caption_h


def _finish_curve_axes(ax_loss, ax_train, ax_val, top: float | None) -> None:
    """Reference lines, limits, titles and integer epoch ticks."""
    ax_loss.axhline(UNIFORM_LOSS, color="0.5", linestyle="--", linewidth=1, label="uniform guess")
    if top is None:  # headroom above the highest loss and the uniform-guess line
        top = 1.05 * max(ax_loss.get_ylim()[1], UNIFORM_LOSS)
    ax_loss.set_ylim(0, top)
    ax_loss.set(
        title="Training loss (faint: per minibatch; solid: epoch average)",
        xlabel="iteration (minibatch update)",
        ylabel="softmax cross-entropy loss (nats)",
    )
    for ax, what in ((ax_train, "Train"), (ax_val, "Validation")):
        ax.axhline(CHANCE_ACC, color="0.5", linestyle="--", linewidth=1, label="chance")
        ax.set(
            title=f"{what} accuracy",
            xlabel="epoch (0 = after the first iteration)",
            ylabel="accuracy (fraction correct)",
        )
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_loss, ax_train, ax_val):
        ax.grid(True, alpha=0.3)


def build_curves_figure(summaries: Sequence[dict], expected_runs: int | None = None) -> Figure:
    """Loss vs iteration, train and val accuracy vs epoch for the runs of `select_curve_runs`.

    One line per setting (colour = batch norm or baseline; line style = weight scale, learning
    rate, ...), the mean over its seeds with a ± 1 SD band when there are several. The legend
    sits below the axes, one entry per line.
    """
    summaries = report.with_axes(summaries)
    runs = select_curve_runs(summaries)
    varying = report.varying_keys(summaries)
    fixed = ("batchnorm", "normalization", "seed")
    lines = _make_lines(runs, None, [k for k in varying if k not in fixed])
    curves = [curves_of(line.runs[0]) for line in lines]
    top = _curve_top(curves)
    handles = _curve_handles(lines, curves, top)
    text = caption(summaries, expected_runs)
    fig, (ax_loss, ax_train, ax_val), caption_h = _curves_canvas(len(handles), text)
    for slot, (line, c) in enumerate(zip(lines, curves, strict=True)):
        _draw_curve_loss(ax_loss, line, c, top, slot - (len(lines) - 1) / 2)
        _draw_curve_accuracy(ax_train, line, c.train, c.train_sd)
        _draw_curve_accuracy(ax_val, line, c.val, c.val_sd)
    _finish_curve_axes(ax_loss, ax_train, ax_val, top)
    title = "Batch norm vs baseline: training curves"
    shown = len(_values(runs, "weight_scale"))
    total = len([s for s in _values(summaries, "weight_scale") if s is not None])
    if len(runs) < len(summaries):
        title += f" ({shown} of {total} weight scales shown)"
    fig.suptitle(title, fontsize=13, y=0.995)
    _caption(fig, text, 170)
    _legend_below(fig, handles, 3, caption_h + 0.05)
    return fig


# --- sweep ----------------------------------------------------------------------------------

SWEEP_PANELS = (  # (summary field, title, y label)
    ("best_val_acc", "Best validation accuracy", "accuracy (fraction correct)"),
    ("best_train_acc", "Best training accuracy", "accuracy (fraction correct)"),
    ("final_train_loss", "Final training loss (mean of the last minibatches)", "loss (nats)"),
)


@dataclass(frozen=True)
class EdgeMark:
    """A final loss drawn on the loss panel's top edge: blown up (above the range) or diverged."""

    slot: int  # the line's index, to set BN and baseline marks a little apart
    x: float
    text: str  # the value, e.g. '2.4e5', or '∞' for a diverged run (its loss is not finite)
    diverged: bool
    color: str


def _loss_marks(lines: Sequence[Line], top: float = SWEEP_LOSS_RANGE[1]) -> list[EdgeMark]:
    """The top-edge marks of the loss panel: a mean above `top`, or seeds whose loss is not
    finite (diverged); one mark per line and weight scale."""
    marks = []
    for slot, line in enumerate(lines):
        mean, _ = _point_stats(line, "final_train_loss")
        for x, m, runs in zip(line.xs, mean, line.runs, strict=True):
            lost = sum(not np.isfinite(_num(s.get("final_train_loss"))) for s in runs)
            texts = [fmt_sci(float(m))] if np.isfinite(m) and m > top else []
            if lost:
                texts.append(r"$\infty$" if lost == len(runs) == 1 else rf"{lost}$\times\infty$")
            if texts:
                color = DIVERGED_COLOR if lost else line.color
                marks.append(EdgeMark(slot, x, " ".join(texts), bool(lost), color))
    return marks


def _sweep_handles(lines: Sequence[Line], marks: Sequence[EdgeMark]) -> list:
    """Legend entries of the sweep figure (proxies, so the layout can be set before drawing)."""
    handles: list = [
        Line2D([], [], color=ln.color, linestyle=ln.linestyle, marker="o", ms=4, label=ln.label)
        for ln in lines
    ]
    band = _band_text(lines)
    if band:
        handles.append(Patch(facecolor="0.5", alpha=BAND_ALPHA, label=band))
        handles.append(Line2D([], [], color="0.4", marker=".", ls="none", label="dots: one seed"))
    diverged = any(s.get("diverged") for ln in lines for runs in ln.runs for s in runs)
    if diverged or any(m.diverged for m in marks):
        handles.append(_diverged_proxy("diverged (loss not finite, ∞)"))
    if any(not m.diverged for m in marks):
        text = f"final loss above {SWEEP_LOSS_RANGE[1]:g}: on the top edge, value above it"
        handles.append(Line2D([], [], color="0.4", marker="^", ls="none", label=text))
    handles.append(_reference_proxy("chance (10%)"))
    handles.append(_reference_proxy("uniform guess (ln 10)"))
    return handles


def _diverged_proxy(label: str) -> Line2D:
    return Line2D([], [], color=DIVERGED_COLOR, marker="x", mew=2, ls="none", label=label)


def _reference_proxy(label: str) -> Line2D:
    return Line2D([], [], color="0.5", linestyle="--", linewidth=1, label=label)


def _draw_sweep_line(ax, line: Line, key: str) -> None:
    """The mean over seeds vs weight scale; with replicates the ± 1 SD band and a dot per seed."""
    mean, sd = _point_stats(line, key)
    style = {"color": line.color, "linestyle": line.linestyle}
    ax.plot(line.xs, mean, marker="o", markersize=4, label=line.label, **style)
    if line.seeds < 2:
        return
    # Labels starting with '_' stay out of legends; tests find the band and dots by them.
    ax.fill_between(
        line.xs, mean - sd, mean + sd, color=line.color, alpha=BAND_ALPHA, lw=0,
        label=f"_band {line.label}",
    )  # fmt: skip
    xs = [x for x, runs in zip(line.xs, line.runs, strict=True) for _ in runs]
    ys = [_num(s.get(key)) for runs in line.runs for s in runs]
    ax.plot(xs, ys, ".", color=line.color, alpha=0.35, label=f"_seeds {line.label}")


def _mark_diverged_accuracy(ax, line: Line, key: str, slot: int) -> None:
    """Diverged runs on an accuracy panel: at their best accuracy, else on the bottom edge."""
    for x, runs in zip(line.xs, line.runs, strict=True):
        for s in runs:
            if not s.get("diverged"):
                continue
            value = _num(s.get(key))
            marker = {"marker": "x", "color": DIVERGED_COLOR, "markersize": 9, "mew": 2}
            if np.isfinite(value):
                ax.plot([x], [value], ls="none", label=f"diverged ({line.label})", **marker)
            else:  # never evaluated: bottom edge, BN and baseline a little apart
                _edge_mark(ax, x, 0.04 + 0.06 * slot, 0, label=f"diverged ({line.label})", **marker)


def _finish_loss_panel(ax, lines: Sequence[Line], marks: Sequence[EdgeMark]) -> None:
    """Linear y over the notebook's range; blown-up and diverged runs on the top edge."""
    means = np.concatenate([_point_stats(ln, "final_train_loss")[0] for ln in lines])
    means = means[np.isfinite(means)]
    bottom = SWEEP_LOSS_RANGE[0]
    if means.size and means.min() < bottom:  # a loss under 1 lowers the range by half steps
        bottom = max(0.0, math.floor(2 * means.min()) / 2)
    ax.set_ylim(bottom, SWEEP_LOSS_RANGE[1])
    ax.axhline(UNIFORM_LOSS, color="0.5", linestyle="--", linewidth=1, label="uniform guess")
    for m in marks:
        offset = m.slot - (len(lines) - 1) / 2
        marker = {"marker": "x", "mew": 2} if m.diverged else {"marker": "^"}
        label = "diverged" if m.diverged else "above the axis"
        trans = _edge_mark(ax, m.x, 1.0, offset, color=m.color, ms=7, label=label, **marker)
        ax.annotate(
            m.text, xy=(m.x, 1.0), xycoords=trans, xytext=(0, 6), textcoords="offset points",
            rotation=90, ha="center", va="bottom", fontsize=7, color=m.color, annotation_clip=False,
        )  # fmt: skip


def _sweep_canvas(n_handles: int, caption_text: str, marks: bool) -> tuple[Figure, Any, float]:
    """The figure and its three stacked axes in a fixed layout; returns the caption height (in)."""
    width, axes_h, left, right = 8.0, 2.7, 0.8, 0.2
    gap = 0.75 if marks else 0.45  # room for the values written above the loss panel's top edge
    caption_h = _caption_height(caption_text, 100)
    legend_h = 0.2 * _legend_rows(n_handles, 2) + 0.1
    bottom = 0.55 + legend_h + caption_h
    top = 0.75
    height = top + 3 * axes_h + 2 * gap + bottom
    fig = Figure(figsize=(width, height))
    axes = fig.subplots(3, 1)
    fig.subplots_adjust(
        left=left / width, right=1 - right / width, bottom=bottom / height,
        top=1 - top / height, hspace=gap / axes_h,
    )  # fmt: skip
    return fig, axes, caption_h


def _is_log_axis(lines: Sequence[Line]) -> bool:
    """A log x axis when every x is positive and they span a decade or more (a logspace grid)."""
    xs = [x for line in lines for x in line.xs]
    return bool(xs) and min(xs) > 0 and max(xs) >= 10 * min(xs)


def _share_x(axes, lines: Sequence[Line], log: bool) -> None:
    """One x axis for the stacked panels, labelled on the bottom one only.

    Not sharex: shared axes share their tickers, and the minor ticks the upper panels would
    then draw (unlabelled) are a third of the drawing time; on a log axis the bottom panel's
    minor ticks are at 2 and 5 x 10^k only, for the same reason.
    """
    for ax in axes:
        ax.set_xscale("log" if log else "linear")
    low = min(ax.get_xlim()[0] for ax in axes)
    high = max(ax.get_xlim()[1] for ax in axes)
    for ax in axes:
        ax.set_xlim(low, high)
        if log:
            _mathtext_log_ticks(ax.xaxis)
    if log:
        axes[-1].xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    xs = sorted({x for line in lines for x in line.xs})
    if not log or xs[-1] < 100 * xs[0]:  # few decades: label the swept values themselves
        for ax in axes:
            ax.set_xticks(xs, [fmt_sci(x) for x in xs])
            ax.xaxis.set_minor_locator(NullLocator())
    for ax in axes[:-1]:
        ax.xaxis.set_minor_locator(NullLocator())
        ax.tick_params(labelbottom=False)


#: x-axis labels, figure titles and file names of the sweep figure for the usual axes.
X_LABELS = {
    "weight_scale": "weight initialization scale (W ~ scale x N(0, 1))",
    "learning_rate": "learning rate",
    "batch_size": "batch size (examples per minibatch)",
}
SWEEP_TITLES = {
    "weight_scale": "Weight initialization sweep",
    "learning_rate": "Learning-rate sweep",
    "batch_size": "Batch-size sweep",
}
SWEEP_STEMS = {"weight_scale": "weight_init_sweep"}


def _chosen_key(requested: str, option: str, allowed: Sequence[str], what: str) -> str:
    """The setting `requested` names among `allowed` (a dotted config key is accepted for
    summary.json's field of its last name: train.batch_size is batch_size); one OutputError line
    naming `option` when it is not one of them."""
    short = requested.rsplit(".", 1)[-1]
    key = requested if requested in allowed or short not in allowed else short
    if key not in allowed:
        choices = ", ".join(allowed) or f"none: no {what} varies"
        raise OutputError(
            f"{option} {requested}: not a {what} of these runs; choose from {choices}"
        )
    return key


def sweep_hue(summaries: Sequence[dict], requested: str | None, x_key: str) -> str | None:
    """The setting that colours the sweep figure's lines: None (the normalization) unless
    `requested`, which must be a setting that varies. Raises OutputError otherwise."""
    if requested is None:
        return None
    varying = report.varying_keys(report.with_axes(summaries))
    others = [k for k in varying if k not in ("seed", x_key)]
    return _chosen_key(requested, "--hue", others, "varying setting")


def sweep_axis(summaries: Sequence[dict], requested: str | None = None) -> str | None:
    """The numeric setting the sweep figure puts on x: `requested` when given, else the weight
    scale when it varies, else the numeric setting with the most distinct values; None when no
    numeric setting takes more than one value (then only the training curves are drawn).

    Raises OutputError when `requested` is not a numeric setting of these runs.
    """
    summaries = report.with_axes(summaries)
    counts = {}
    for key in report.varying_keys(summaries):
        values = {s.get(key) for s in summaries if key in s}
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric and key != "seed":
            counts[key] = len(values)
    if requested is not None:
        return _chosen_key(requested, "--x", list(counts), "swept numeric setting")
    if "weight_scale" in counts:
        return "weight_scale"
    return max(counts, key=counts.get) if counts else None


def build_sweep_figure(
    summaries: Sequence[dict],
    expected_runs: int | None = None,
    x_key: str = "weight_scale",
    hue: str | None = None,
) -> Figure:
    """Best val accuracy, best train accuracy and final training loss vs a swept number
    (`x_key`: the weight scale by default, any numeric setting, see `sweep_axis`).

    One line per setting other than x (batch norm or baseline, learning rate, ...):
    the mean over its seeds, with a ± 1 SD band and a faint dot per seed when there are several.
    Diverged runs are red x markers: at the run's accuracy when finite, else on the bottom edge;
    on the loss panel (linear, 1 to 3.5) diverged and blown-up runs sit on the top edge with
    their value written above.
    """
    summaries = report.with_axes(summaries)
    varying = report.varying_keys(summaries)
    label_keys = [k for k in varying if k not in ("batchnorm", "normalization", "seed", x_key)]
    lines = _make_lines(summaries, x_key, label_keys, hue)
    marks = _loss_marks(lines)
    handles = _sweep_handles(lines, marks)
    text = caption(summaries, expected_runs)
    fig, axes, caption_h = _sweep_canvas(len(handles), text, bool(marks))
    for ax, (key, title, ylabel) in zip(axes, SWEEP_PANELS, strict=True):
        for slot, line in enumerate(lines):
            _draw_sweep_line(ax, line, key)
            if key != "final_train_loss":
                _mark_diverged_accuracy(ax, line, key, slot)
        if key == "final_train_loss":
            _finish_loss_panel(ax, lines, marks)
        else:
            ax.axhline(CHANCE_ACC, color="0.5", linestyle="--", linewidth=1, label="chance")
            ax.set_ylim(bottom=0)
        pad = 30 if marks and key == "final_train_loss" else 6
        ax.set_title(title, pad=pad)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    _share_x(axes, lines, _is_log_axis(lines))
    axes[-1].set_xlabel(X_LABELS.get(x_key, x_key))
    kinds = {s["normalization"] for s in summaries} - {"batchnorm", "none"}
    versus = "normalizations compared" if kinds else "batch norm vs baseline"
    fig.suptitle(f"{SWEEP_TITLES.get(x_key, x_key + ' sweep')}: {versus}",
                 fontsize=13, y=0.995)  # fmt: skip
    _caption(fig, text, 100)
    _legend_below(fig, handles, 2, caption_h + 0.05)
    return fig


# --- files ----------------------------------------------------------------------------------


def save_figure(fig: Figure, folder: Path, stem: str, formats: Sequence[str] = ("png",)) -> list:
    """Save fig as folder/stem.<ext> for each format (PNG at 150 dpi; SVG without a date, so it
    is stable) and release it.

    Each file is drawn into a temporary file and moved into place, so a Ctrl-C or a full disk
    never leaves a half-written figure (an older complete one stays).
    """
    paths = []
    with mpl.rc_context({"svg.hashsalt": "bnexp"}):
        for ext in formats:
            path = folder / f"{stem}.{ext}"
            if ext == "png":  # zlib level 3: half the encoding time of the default 6, +15% size
                options: dict = {"dpi": DPI, "pil_kwargs": {"compress_level": 3}}
            else:
                options = {"metadata": {"Date": None}}
            records.atomic_write(
                path,
                lambda tmp, ext=ext, options=options: fig.savefig(tmp, format=ext, **options),
                fix="check the folder",
            )
            paths.append(path)
    return paths


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files a killed plot left in `folder` (only names that
    records.atomic_write gives a figure: .<stem>.<png|svg>.<random>.tmp); returns them."""
    return records.remove_temporaries(
        folder, lambda path: bool(_TEMP_NAME.fullmatch(path.name)) and path.is_file()
    )


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise OutputError(
            f"figure format {', '.join(bad) or '(none)'} is not supported; "
            f"choose from {', '.join(FORMATS)}"
        )
    return formats


def _plots_folder(out: Path) -> Path:
    """OUT/plots, created, with the temporaries of a killed earlier plot removed."""
    folder = out / "plots"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create ({exc.strerror or exc}); check OUT") from None
    try:
        remove_stale_temporaries(folder)
    except OSError as exc:
        raise OutputError(
            f"{folder}: cannot remove the temporary files of an interrupted plot "
            f"({exc.strerror or exc}); check the folder's permissions"
        ) from None
    return folder


def plot_results(
    out: str | Path,
    formats: Sequence[str] = ("png",),
    x: str | None = None,
    hue: str | None = None,
) -> list[Path]:
    """Draw the figures of a finished or partial result folder into OUT/plots/.

    Only runs of OUT/config.yaml are drawn (a --force re-run may leave older runs behind); the
    caption says when some runs are still missing. Runs trained with probes also get the probe
    figures (`bnexp.probe_plots`) from their layers.jsonl and landscape.jsonl. Temporary files
    left in OUT/plots by a plot that was killed are removed first.

    Parameters
    ----------
    formats : file types to write, from FORMATS ("png", "svg"); PNG alone by default.
    hue : the setting that colours the sweep figure's lines (default: the normalization).
    x : the swept numeric setting on the sweep figure's x axis (`sweep_axis` picks one when
        None); the figure is ``weight_init_sweep`` for the weight scale, else
        ``sweep_<key>`` (dots as underscores).

    Returns
    -------
    Every written path (each figure in each format), in the order written; this is the list
    `bnexp train`, `sweep-init` and `plot` print.

    Raises
    ------
    OutputError : OUT has no finished run, its config.yaml is missing or invalid, a summary.json
        of its runs is corrupt, a format is unknown, or the plots folder cannot be written.
    """
    out = Path(out)
    formats = _check_formats(formats)
    summaries, expected = records.read_current_summaries(out, "plot")
    folder = _plots_folder(out)
    x_key = sweep_axis(summaries, x)
    sweep = None
    if x_key is not None:
        hue_key = sweep_hue(summaries, hue, x_key)
        stem = SWEEP_STEMS.get(x_key, "sweep_" + x_key.replace(".", "_"))

        def sweep() -> list[Path]:
            fig = build_sweep_figure(summaries, expected, x_key, hue_key)
            return save_figure(fig, folder, stem, formats)

    # The sweep figure in a forked process while this one draws the curves: two cores, and
    # each figure is the same bytes whichever process draws it.
    other = drawing.Forked(sweep) if sweep is not None and drawing.can_fork() else None
    try:
        paths = save_figure(
            build_curves_figure(summaries, expected), folder, "training_curves", formats
        )
        if sweep is not None:
            paths += other.result() if other is not None else sweep()
    finally:
        if other is not None:
            other.kill()  # only if it is still running: this process stopped early
    from bnexp.probe_plots import save_probe_figures  # it imports this module's helpers

    probed = records.read_probe_records(out, report.with_axes(summaries))  # with normalization
    paths += save_probe_figures(folder, *probed, formats)
    from bnexp.eval_plots import save_bn_eval_figure  # it imports this module's helpers

    paths += save_bn_eval_figure(folder, summaries, formats)  # with train.bn_eval_all only
    return paths


def warm_up() -> None:
    """Draw a small throw-away figure with a log axis into memory: it loads the fonts and builds
    the mathtext parser (the log tick labels), a third of a second the first figure would
    otherwise pay."""
    import io

    fig = Figure(figsize=(2, 2))
    ax = fig.subplots()
    ax.plot([1e-4, 1.0], [0.1, 0.5], marker="o", label="warm-up")
    ax.set_xscale("log")
    _mathtext_log_ticks(ax.xaxis)
    ax.set_title("warm-up")
    fig.legend(fontsize=8)
    fig.savefig(io.BytesIO(), format="png", dpi=DPI, pil_kwargs={"compress_level": 3})
