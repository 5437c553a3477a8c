"""The figure of ``train.bn_eval_all``: the same trained networks scored with each kind of
batch-norm statistics, drawn from the summaries only.

`bn_eval_figure`: two panels (validation and test accuracy of the final parameters); along x the
modes of `bnexp.report.EVERY_MODE_COLUMNS` (running averages, population statistics, the whole
set's batch statistics, each minibatch's own statistics); one series per setting (everything
but the seed: normalization, batch size, ...), each seed a faint dot and the mean ± 1 sample SD
over the seeds as a marker with an error bar, the means joined across modes. A net without
batch statistics scores the same in every mode: its series is flat, a reference.

Built on `matplotlib.figure.Figure` (Agg canvas, no pyplot), like `bnexp.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bnexp import report
from bnexp.plots import KIND_STYLE, save_figure

#: Long names of the modes on the x axis.
MODE_LABELS = {
    "running": "running\naverages",
    "population": "population\n(Algorithm 2)",
    "batch": "whole-set\nbatch stats",
    "minibatch": "per-minibatch\nbatch stats\n(training batch size)",
}
STEM = "bn_eval_modes"


def has_every_mode(summaries: Sequence[dict]) -> bool:
    """Whether any summary carries the bn_eval_all fields."""
    return any("val_acc_running" in s for s in summaries)


def _setting_text(run: dict, keys: Sequence[str]) -> str:
    """The run's other varying settings, e.g. 'batch_size 5' ('' when none varies)."""
    return ", ".join(f"{report.SHORT_NAMES.get(k, k)} {report.fmt_value(run.get(k))}" for k in keys)


def _label(run: dict, keys: Sequence[str]) -> str:
    """A series' legend label: its normalization, then its other varying settings."""
    kind = run["normalization"]
    return ", ".join(
        t for t in (KIND_STYLE.get(kind, {}).get("label", kind), _setting_text(run, keys)) if t
    )


def _values(runs: Sequence[dict], key: str) -> np.ndarray:
    """The finite values of a field over runs (float64)."""
    v = np.array([np.nan if r.get(key) is None else float(r[key]) for r in runs])
    return v[np.isfinite(v)]


def bn_eval_figure(summaries: Sequence[dict]) -> Figure:
    """Accuracy of the final parameters per batch-norm evaluation mode (see the module docstring).

    summaries: run summaries with the ``{val,test}_acc_<mode>`` fields (others are skipped).
    """
    runs = [s for s in report.with_axes(summaries) if "val_acc_running" in s]
    keys = [
        k
        for k in report.varying_keys(runs)
        if k not in ("batchnorm", "normalization", "model.normalization")
    ]
    groups = report.group_runs(runs)
    # One colour per other setting (batch size, ...): a normalization and its baseline share it.
    colors = {
        text: f"C{i % 10}"
        for i, text in enumerate(dict.fromkeys(_setting_text(g[0], keys) for g in groups))
    }
    modes = [m for m, _ in report.EVERY_MODE_COLUMNS]
    x = np.arange(len(modes), dtype=float)
    width = 0.7 / max(len(groups), 1)
    fig = Figure(figsize=(12, 5.2), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, split in zip(axes, ("val", "test"), strict=True):
        for i, group in enumerate(groups):
            offset = (i - (len(groups) - 1) / 2) * width
            color = colors[_setting_text(group[0], keys)]
            baseline = group[0]["normalization"] not in ("batchnorm", "noisy_batchnorm")
            means, sds = [], []
            for j, mode in enumerate(modes):
                vals = _values(group, f"{split}_acc_{mode}")
                ax.plot(np.full(vals.size, x[j] + offset), vals, ".", color=color, alpha=0.35)
                means.append(vals.mean() if vals.size else np.nan)
                sds.append(vals.std(ddof=1) if vals.size > 1 else 0.0)
            ax.errorbar(
                x + offset,
                means,
                yerr=sds,
                color=color,
                capsize=3,
                marker="s" if baseline else "o",
                markerfacecolor="white" if baseline else color,
                linestyle="--" if baseline else "-",
                linewidth=1,
                label=f"{_label(group[0], keys)} (n={len(group)})",
            )
        ax.set_xticks(x, [MODE_LABELS[m] for m in modes])
        ax.set_title(f"{'validation' if split == 'val' else 'test'} accuracy")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy of the final parameters")
    axes[1].legend(fontsize=8, loc="lower left")
    fig.suptitle(
        "The same trained nets evaluated with each kind of batch-norm statistics "
        "(mean ± 1 SD over seeds, dots: seeds)"
    )
    return fig


def save_bn_eval_figure(
    folder: Path, summaries: Sequence[dict], formats: Sequence[str] = ("png",)
) -> list[Path]:
    """Draw `bn_eval_figure` into folder/bn_eval_modes.<ext> when the summaries have its fields;
    returns the written paths (none otherwise)."""
    if not has_every_mode(summaries):
        return []
    return save_figure(bn_eval_figure(summaries), Path(folder), STEM, formats)
