"""Figures drawn from stored records only (OUT/runs/*/summary.json); never imports the model.

`plot_results(out)` writes, into OUT/plots/ as PNG (150 dpi) and SVG:

- ``training_curves``: training loss vs iteration, train and val accuracy vs epoch, batch norm vs
  baseline. With more than three weight scales (a sweep) only three representative scales are
  drawn (the smallest, the middle one and the largest, first seed and learning rate), since 40
  overlaid curves cannot be read; the figure title says so.
- ``weight_init_sweep`` (when there is more than one weight scale): best val accuracy, best train
  accuracy and final training loss vs weight scale on a shared log axis. Diverged runs are red x
  markers (at the point when it is finite, else at the panel's edge), never dropped.

Figures are built on `matplotlib.figure.Figure` (the Agg canvas, no pyplot state), so plotting
works without a display and leaks nothing between calls.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from matplotlib.transforms import blended_transform_factory

from bnexp import records
from bnexp.errors import BnexpError, OutputError

CHANCE_ACC = 0.1  # 10 CIFAR-10 classes
UNIFORM_LOSS = math.log(10)  # softmax loss of a uniform guess over 10 classes
BN_STYLE = {
    True: {"color": "C0", "label": "batch norm"},
    False: {"color": "C1", "label": "baseline"},
}
DIVERGED_COLOR = "red"
SCALE_LINESTYLES = ("-", "--", ":")
_UPDATE_NAMES = {"adam": "Adam", "sgd": "SGD", "sgd_momentum": "SGD+momentum"}


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
    """Compact number: 0.001 -> '1e-3', 0.0206 -> '2.1e-2', 0.5 -> '0.5'."""
    if x == 0 or 1e-2 <= abs(x) < 1e4:
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


def _plain_log_labels(ax) -> None:
    """Log-y tick labels as plain numbers (0.5, 2, 10); minor ones only when few decades."""
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))

    def minor(y, _):
        low, high = ax.get_ylim()  # read at draw time, when the limits are final
        return f"{y:g}" if low > 0 and high / low < 20 else ""

    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _group_label(bn: bool, lr: Any, several_lrs: bool) -> str:
    label = BN_STYLE[bool(bn)]["label"]
    return f"{label}, lr {fmt_sci(lr)}" if several_lrs and lr is not None else label


# --- training curves ------------------------------------------------------------------------


def select_curve_runs(summaries: Sequence[dict], max_scales: int = 3) -> list[dict]:
    """The runs drawn in the training-curves figure.

    All runs when there are at most `max_scales` weight scales; otherwise the first seed and
    learning rate at the smallest, middle and largest scale (BN and baseline each).
    """
    scales = sorted(s for s in _values(summaries, "weight_scale") if s is not None)
    if len(scales) <= max_scales:
        return list(summaries)
    picked = {scales[0], scales[len(scales) // 2], scales[-1]}
    seed = summaries[0].get("seed")
    lr = summaries[0].get("learning_rate")
    return [
        s
        for s in summaries
        if s.get("weight_scale") in picked
        and s.get("seed") == seed
        and s.get("learning_rate") == lr
    ]


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over `window` points, NaN where any value in the window is NaN."""
    if window <= 1 or y.size < window:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    out = np.full_like(y, np.nan)
    out[window - 1 :] = (c[window:] - c[:-window]) / window
    return out


def build_curves_figure(summaries: Sequence[dict], expected_runs: int | None = None) -> Figure:
    """Loss vs iteration, train and val accuracy vs epoch for the runs of `select_curve_runs`.

    Colour = batch norm or baseline; line style = weight scale (when several).
    """
    runs = select_curve_runs(summaries)
    scales = sorted(s for s in _values(runs, "weight_scale") if s is not None)
    several_scales = len(scales) > 1
    all_scales = [s for s in _values(summaries, "weight_scale") if s is not None]
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    ax_loss, ax_train, ax_val = fig.subplots(1, 3)

    finite_losses = []
    for s in runs:
        bn = bool(s.get("batchnorm"))
        style = dict(BN_STYLE[bn])
        label = style.pop("label")
        scale = s.get("weight_scale")
        if several_scales and scale is not None:
            style["linestyle"] = SCALE_LINESTYLES[scales.index(scale) % len(SCALE_LINESTYLES)]
        if scale is not None and (several_scales or len(all_scales) > 1 or len(runs) > 2):
            label = f"{label}, scale {fmt_sci(scale)}"
        if len(_values(runs, "seed")) > 1:
            label += f", seed {s.get('seed')}"

        loss = _arr(s.get("loss_history"))
        it = np.arange(1, loss.size + 1)
        finite_losses.append(loss[np.isfinite(loss)])
        ax_loss.plot(it, loss, alpha=0.25, linewidth=0.6, color=style["color"])
        window = int(s.get("iterations_per_epoch") or 20)
        ax_loss.plot(it, _smooth(loss, window), linewidth=1.6, label=label, **style)
        if s.get("diverged") and s.get("diverged_iteration") is not None:
            ax_loss.plot(
                [s["diverged_iteration"]],
                [0.97],
                transform=blended_transform_factory(ax_loss.transData, ax_loss.transAxes),
                marker="x",
                color=DIVERGED_COLOR,
                markersize=9,
                markeredgewidth=2,
                linestyle="none",
                clip_on=False,
                label="diverged",
            )

        for ax, key in ((ax_train, "train_acc_history"), (ax_val, "val_acc_history")):
            acc = _arr(s.get(key))
            ax.plot(np.arange(acc.size), acc, marker="o", markersize=3.5, label=label, **style)

    losses = np.concatenate(finite_losses) if finite_losses else np.array([])
    losses = losses[losses > 0]
    if losses.size and losses.max() / losses.min() > 50:
        ax_loss.set_yscale("log")
        _plain_log_labels(ax_loss)
    ax_loss.axhline(UNIFORM_LOSS, color="0.5", linestyle="--", linewidth=1, label="uniform guess")
    ax_loss.set(
        title="Training loss (faint: per minibatch; solid: epoch average)",
        xlabel="iteration (minibatch update)",
        ylabel="softmax cross-entropy loss (nats)",
    )
    for ax, what in ((ax_train, "Train"), (ax_val, "Validation")):
        ax.axhline(CHANCE_ACC, color="0.5", linestyle="--", linewidth=1, label="chance (10%)")
        ax.set(
            title=f"{what} accuracy",
            xlabel="epoch (0 = after the first iteration)",
            ylabel="accuracy (fraction correct)",
        )
        ax.set_ylim(bottom=0)
    for ax in (ax_loss, ax_train, ax_val):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    title = "Batch norm vs baseline: training curves"
    if len(runs) < len(summaries):
        title += f" ({len(scales)} of {len(all_scales)} weight scales shown)"
    fig.suptitle(title, fontsize=13)
    fig.supxlabel(caption(summaries, expected_runs), fontsize=9, color="0.3")
    return fig


# --- sweep ----------------------------------------------------------------------------------


def build_sweep_figure(summaries: Sequence[dict], expected_runs: int | None = None) -> Figure:
    """Best val accuracy, best train accuracy and final training loss vs weight scale.

    One line per (batch norm, learning rate) group; with several seeds the line is the mean over
    seeds and each run is a faint dot. Diverged runs are red x markers labelled 'diverged'
    (plus the group): at the run's value when finite, else at the panel's top edge (loss) or
    bottom edge (accuracy).
    """
    fig = Figure(figsize=(8, 11), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    panels = (
        ("best_val_acc", "Best validation accuracy", "accuracy (fraction correct)"),
        ("best_train_acc", "Best training accuracy", "accuracy (fraction correct)"),
        ("final_train_loss", "Final training loss (mean of the last minibatches)", "loss (nats)"),
    )
    lrs = _values(summaries, "learning_rate")
    several_lrs = len(lrs) > 1
    several_seeds = len(_values(summaries, "seed")) > 1
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        groups.setdefault((bool(s.get("batchnorm")), s.get("learning_rate")), []).append(s)
    order = sorted(groups, key=lambda g: (not g[0], lrs.index(g[1])))

    for ax, (key, title, ylabel) in zip(axes, panels, strict=True):
        is_loss = key == "final_train_loss"
        for gi, group in enumerate(order):
            runs = groups[group]
            style = {
                "color": BN_STYLE[group[0]]["color"],
                "linestyle": ("-", "--", ":", "-.")[lrs.index(group[1]) % 4],
            }
            label = _group_label(group[0], group[1], several_lrs)
            scales = sorted({float(s["weight_scale"]) for s in runs if s.get("weight_scale")})
            mean = []
            for scale in scales:
                vals = _arr([s.get(key) for s in runs if s.get("weight_scale") == scale])
                finite = vals[np.isfinite(vals)]
                mean.append(finite.mean() if finite.size else np.nan)
            ax.plot(scales, mean, marker="o", markersize=4, label=label, **style)
            if several_seeds:
                xs = [float(s["weight_scale"]) for s in runs if s.get("weight_scale")]
                ys = [_num(s.get(key)) for s in runs if s.get("weight_scale")]
                ax.plot(xs, ys, ".", color=style["color"], alpha=0.35)

            bad = [s for s in runs if s.get("diverged") and s.get("weight_scale")]
            on_value = [s for s in bad if np.isfinite(_num(s.get(key)))]
            on_edge = [s for s in bad if not np.isfinite(_num(s.get(key)))]
            marker = {
                "marker": "x",
                "color": DIVERGED_COLOR,
                "markersize": 9,
                "markeredgewidth": 2,
                "linestyle": "none",
            }
            div_label = f"diverged ({label})"
            if on_value:
                ax.plot(
                    [float(s["weight_scale"]) for s in on_value],
                    [_num(s.get(key)) for s in on_value],
                    label=div_label,
                    **marker,
                )
                div_label = "_nolegend_"
            if on_edge:
                # Top edge for the loss (it blew up), bottom for accuracy (never evaluated);
                # groups stacked a little apart so BN and baseline markers do not hide each other.
                edge = 0.96 - 0.06 * gi if is_loss else 0.04 + 0.06 * gi
                ax.plot(
                    [float(s["weight_scale"]) for s in on_edge],
                    [edge] * len(on_edge),
                    transform=blended_transform_factory(ax.transData, ax.transAxes),
                    clip_on=False,
                    label=div_label,
                    **marker,
                )
        if is_loss:
            ax.set_yscale("log")
            _plain_log_labels(ax)
            ax.axhline(
                UNIFORM_LOSS,
                color="0.5",
                linestyle="--",
                linewidth=1,
                label="uniform guess (ln 10)",
            )
        else:
            ax.axhline(CHANCE_ACC, color="0.5", linestyle="--", linewidth=1, label="chance (10%)")
            ax.set_ylim(bottom=0)
        ax.set(title=title, ylabel=ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xscale("log")
    axes[-1].set_xlabel("weight initialization scale (W ~ scale x N(0, 1))")
    fig.suptitle("Weight initialization sweep: batch norm vs baseline", fontsize=13)
    fig.supxlabel(textwrap.fill(caption(summaries, expected_runs), 100), fontsize=9, color="0.3")
    return fig


# --- files ----------------------------------------------------------------------------------


def save_figure(fig: Figure, folder: Path, stem: str) -> list[Path]:
    """Save fig as folder/stem.png (150 dpi) and .svg; the SVG carries no date, so it is stable.

    Each file is drawn into a temporary file and moved into place, so a Ctrl-C or a full disk
    never leaves a half-written figure (an older complete one stays).
    """
    paths = [folder / f"{stem}.png", folder / f"{stem}.svg"]
    with mpl.rc_context({"svg.hashsalt": "bnexp"}):
        records.atomic_write(
            paths[0], lambda tmp: fig.savefig(tmp, format="png", dpi=150), fix="check the folder"
        )
        records.atomic_write(
            paths[1],
            lambda tmp: fig.savefig(tmp, format="svg", metadata={"Date": None}),
            fix="check the folder",
        )
    return paths


def _current_runs(out: Path) -> tuple[set[str], int]:
    """Run ids and count of the runs of OUT/config.yaml.

    Raises OutputError when it is missing or not a valid experiment config: without it the
    figures could not tell the current runs from those a --force re-run left behind.
    """
    from bnexp.config import expand_runs, load_config, run_id

    path = out / "config.yaml"
    fix = (
        f"run the experiment's command again with -o {out} --force to rewrite it "
        "(finished runs are kept)"
    )
    if not path.is_file():
        raise OutputError(f"{path} is missing, so the runs of OUT are unknown; {fix}")
    try:
        cfg = load_config(path)
    except BnexpError as exc:
        raise OutputError(f"{path} is not a valid experiment config ({exc}); {fix}") from None
    runs = expand_runs(cfg)
    return {run_id(r, cfg) for r in runs}, len(runs)


def plot_results(out: str | Path) -> list[Path]:
    """Draw the figures of a finished or partial result folder into OUT/plots/.

    Only runs of OUT/config.yaml are drawn (a --force re-run may leave older runs behind); the
    caption says when some runs are still missing.

    Returns
    -------
    The written paths (PNG and SVG of each figure).

    Raises
    ------
    OutputError : OUT has no finished run, its config.yaml is missing or invalid, a summary.json
        of its runs is corrupt, or the plots folder cannot be written.
    """
    out = Path(out)
    if not any((out / "runs").glob("*/summary.json")):  # also a missing or empty folder
        raise OutputError(
            f"{out}: nothing to plot in OUT (no finished runs in {out / 'runs'}); "
            "check the folder or run bnexp train / sweep-init first"
        )
    ids, expected = _current_runs(out)
    summaries = records.read_summaries(out, ids, strict=True)
    if not summaries:
        raise OutputError(
            f"{out}: nothing to plot in OUT (its runs are of an older config, not of "
            f"{out / 'config.yaml'}); run that experiment's command with -o {out} first"
        )
    folder = out / "plots"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create ({exc.strerror or exc}); check OUT") from None
    paths = save_figure(build_curves_figure(summaries, expected), folder, "training_curves")
    if len([s for s in _values(summaries, "weight_scale") if s is not None]) > 1:
        paths += save_figure(build_sweep_figure(summaries, expected), folder, "weight_init_sweep")
    return paths
