"""Summaries of finished runs: replicate groups, mean ± SD over seeds, and the one-screen table
printed after `bnexp train` / `bnexp sweep-init`.

A *setting* is everything that defines a run except its seed: the summary fields that are not
results. Runs that share a setting are replicates; with several seeds the table and the figures
show their mean ± the sample standard deviation (ddof = 1) and n. Summaries may carry more keys
than today's (every config key can become a sweep axis): an unknown key is part of the setting
unless its name marks it as a result (see `is_setting`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bnexp.records import EVERY_MODE_FIELDS

# Fields of summary.json that are outcomes or bookkeeping, never part of a run's setting.
RESULT_FIELDS = frozenset(
    {
        *EVERY_MODE_FIELDS,
        "run_id",
        "index",
        "seed",
        "iterations_per_epoch",  # follows from num_train and batch_size
        "train_acc_history",
        "val_acc_history",
        "check_iterations",
        "test_acc",
        "loss_history",
        "best_train_acc",
        "best_val_acc",
        "final_train_loss",
        "diverged",
        "diverged_iteration",
        "status",
        "seconds",
    }
)
# Name endings that mark a result in keys this module does not know yet (e.g. group_seconds).
RESULT_SUFFIXES = ("_acc", "_loss", "_history", "_iteration", "_iterations", "seconds", "_id")
# Short column and label names of the usual sweep axes; other keys are shown by their name.
SHORT_NAMES = {"weight_scale": "scale", "learning_rate": "lr"}
#: The normalization a batch-norm flag means, and the kinds in column order with short names.
KINDS = {True: "batchnorm", False: "none"}
KIND_COLUMNS = {"batchnorm": "BN", "none": "base", "layernorm": "LN", "noisy_batchnorm": "noisyBN"}


def is_setting(key: str) -> bool:
    """True when a summary field defines the run (a config value) rather than reports on it.

    ``axes`` is not one: `with_axes` spreads it into fields of their own first.
    """
    return key not in RESULT_FIELDS and key != "axes" and not key.endswith(RESULT_SUFFIXES)


def with_axes(summaries: Sequence[dict]) -> list[dict]:
    """The summaries with every swept key of their ``axes`` as a field of its own, named by its
    dotted key (``model.dropout_keep``), unless summary.json has a field for it already under its
    last name (``batch_size``, ``weight_scale``, ``seed``, ...). Summaries without ``axes`` are
    returned as they are. Every summary gets ``normalization``: the swept kind, else batchnorm
    or none from the flag."""
    out = []
    for s in summaries:
        axes = s.get("axes") if isinstance(s.get("axes"), dict) else {}
        kind = axes.get("model.normalization") or KINDS[bool(s.get("batchnorm"))]
        s = {**s, "normalization": kind}
        out.append({**s, **{k: v for k, v in axes.items() if k.rsplit(".", 1)[-1] not in s}})
    return out


def hashable(value: Any) -> Any:
    """A summary value usable as a dict key: lists become tuples, dicts sorted item tuples."""
    if isinstance(value, list | tuple):
        return tuple(hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, hashable(v)) for k, v in value.items()))
    return value


def setting_of(summary: dict, without: Sequence[str] = ()) -> tuple:
    """The run's setting as sorted (key, value) pairs, leaving out the keys in `without`."""
    return tuple(
        sorted((k, hashable(v)) for k, v in summary.items() if is_setting(k) and k not in without)
    )


def varying_keys(summaries: Sequence[dict]) -> list[str]:
    """Setting keys whose value differs between runs, in first-seen key order."""
    seen: dict[str, set] = {}
    for s in summaries:
        for key, value in s.items():
            if is_setting(key):
                seen.setdefault(key, set()).add(hashable(value))
    # A key missing from some summaries (an older record) varies too: it reads as None there.
    return [k for k, vals in seen.items() if len(vals) > 1 or any(k not in s for s in summaries)]


def group_runs(summaries: Sequence[dict], without: Sequence[str] = ("seed",)) -> list[list[dict]]:
    """Runs grouped by `setting_of(run, without)`, groups and runs in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for s in summaries:
        groups.setdefault(setting_of(s, without), []).append(s)
    return list(groups.values())


@dataclass(frozen=True)
class Stat:
    """Mean and sample SD (ddof = 1) of a metric's finite values over n_runs replicates.

    n is the number of finite values (a diverged run has none); sd is NaN when n < 2.
    """

    mean: float
    sd: float
    n: int
    n_runs: int
    n_diverged: int


def stat(runs: Sequence[dict], key: str) -> Stat:
    """The Stat of summary field `key` over `runs` (None, NaN and inf are not finite)."""
    values = [float(s[key]) for s in runs if s.get(key) is not None]
    values = [v for v in values if math.isfinite(v)]
    n = len(values)
    mean = sum(values) / n if n else math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    diverged = sum(bool(s.get("diverged")) for s in runs)
    return Stat(mean, sd, n, len(runs), diverged)


def fmt_value(value: Any) -> str:
    """A setting value for a table cell or a label: 0.001 -> '0.001', [50, 50] -> '[50]x2'."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list | tuple) and value and len(set(value)) == 1:
        return f"[{value[0]}]x{len(value)}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


# --- the table ------------------------------------------------------------------------------

METRIC_COLUMNS = (  # (summary field, column stem, format of one value)
    ("best_val_acc", "val", ".3f"),
    ("best_train_acc", "train", ".3f"),
    ("final_train_loss", "loss", ".4g"),
    ("test_acc", "test", ".3f"),
)


def _fmt(value, spec: str) -> str:
    """A number formatted with `spec`, '-' when missing (null: diverged or not evaluated)."""
    return "-" if value is None else format(value, spec)


def _run_cell(summary: dict | None, key: str, spec: str) -> str:
    """One run's value; the loss marked '(div)' when the run diverged."""
    if summary is None:
        return ""
    mark = " (div)" if key == "final_train_loss" and summary.get("diverged") else ""
    return _fmt(summary.get(key), spec) + mark


def _compact(value: float, spec: str) -> str:
    """`value` formatted with `spec`, exponents short: 2.304e+04 -> 2.304e4, 1e-05 -> 1e-5."""
    return re.sub(
        r"e([+-])0*(\d)", lambda m: f"e{'-' if m[1] == '-' else ''}{m[2]}", f"{value:{spec}}"
    )


def _stat_cell(runs: list[dict], key: str, spec: str) -> str:
    """'mean±sd' over the replicates (finite values only), '(k div)' when k of them diverged.

    The SD of an accuracy has the mean's 3 decimals; that of a loss 2 significant digits.
    """
    if not runs:
        return ""
    st = stat(runs, key)
    if st.n == 0:
        text = "-"
    elif st.n == 1:
        text = _compact(st.mean, spec)
    else:
        text = f"{_compact(st.mean, spec)}±{_compact(st.sd, '.2g' if spec == '.4g' else spec)}"
    if key == "final_train_loss" and st.n_diverged:
        text += f" ({st.n_diverged} div)"
    return text


def _row_keys(summaries: Sequence[dict]) -> list[str]:
    """The setting keys that label a row: weight_scale first, then the other varying ones."""
    fixed = ("batchnorm", "normalization", "weight_scale")
    return ["weight_scale", *[k for k in varying_keys(summaries) if k not in fixed]]


def _kinds(summaries: Sequence[dict]) -> list[str]:
    """The normalizations side by side in the table: BN and baseline for the notebook's
    experiments (even when one is missing), else every kind present, in KIND_COLUMNS order."""
    present = {s["normalization"] for s in summaries}
    if present <= {"batchnorm", "none"}:
        return ["batchnorm", "none"]
    return [k for k in KIND_COLUMNS if k in present]


def _n_text(sides: list[list[dict]]) -> str:
    """Replicates in a row: '3', or '3/2' (per side, BN/baseline) when a partial result differs."""
    counts = [len(runs) for runs in sides if runs]
    if len(set(counts)) > 1:
        return "/".join(str(len(runs)) for runs in sides)
    return str(counts[0] if counts else 0)


def summary_table(summaries: Sequence[dict]) -> str:
    """The `summary_rows` as aligned text columns under a dashed rule (what `bnexp show` prints),
    then the `every_mode_table` when the runs were evaluated with every kind of statistics."""
    table = _align(summary_rows(summaries))
    modes = every_mode_table(summaries)
    return table if modes is None else f"{table}\n\n{modes}"


def summary_rows(summaries: Sequence[dict]) -> list[list[str]]:
    """The header and the rows of the summary table, as cell strings.

    Rows of weight scale (and every other varying setting) with the normalizations side by
    side (batch norm and baseline, and layer norm or noisy batch norm when present): best val
    accuracy, best train accuracy, final training loss (mean of the last minibatch losses), and
    test accuracy of the best-val parameters.

    With one seed a row shows each run's values; with several seeds (replicates) a row is one
    setting and shows mean±SD over its seeds (sample SD, finite values only) and n.
    """
    summaries = with_axes(summaries)
    several_seeds = len({hashable(s.get("seed")) for s in summaries}) > 1
    keys, kinds = _row_keys(summaries), _kinds(summaries)
    rows: dict[tuple, dict[str, list[dict]]] = {}
    for s in summaries:
        row = tuple(hashable(s.get(k)) for k in keys)
        rows.setdefault(row, {k: [] for k in kinds})[s["normalization"]].append(s)
    head = [SHORT_NAMES.get(k, k) for k in keys] + (["n"] if several_seeds else [])
    for _, stem, _ in METRIC_COLUMNS:
        head += [f"{stem} {KIND_COLUMNS[k]}" for k in kinds]
    lines = [head]
    for row, sides in rows.items():
        cells = [fmt_value(v) for v in row]
        cells += [_n_text(list(sides.values()))] if several_seeds else []
        for key, _, spec in METRIC_COLUMNS:
            for runs in sides.values():
                if several_seeds:
                    cells.append(_stat_cell(runs, key, spec))
                else:
                    cells.append(_run_cell(runs[0] if runs else None, key, spec))
        lines.append(cells)
    return lines


#: The evaluation modes of train.bn_eval_all with their short column names, in table order.
EVERY_MODE_COLUMNS = (
    ("running", "run"),
    ("population", "pop"),
    ("batch", "batch"),
    ("minibatch", "minibatch"),
)


EVERY_MODE_TITLE = (
    "final parameters evaluated with each kind of batch-norm statistics (bn_eval_all):"
)


def every_mode_table(summaries: Sequence[dict]) -> str | None:
    """`every_mode_rows` as aligned text under its title line; None without bn_eval_all."""
    rows = every_mode_rows(summaries)
    return None if rows is None else EVERY_MODE_TITLE + "\n" + _align(rows)


def every_mode_rows(summaries: Sequence[dict]) -> list[list[str]] | None:
    """With train.bn_eval_all: the final parameters' validation and test accuracy with each kind
    of batch-norm statistics (running averages, population, whole-set batch, per-minibatch), one
    row per setting and normalization (mean±SD over seeds with several), under a title line;
    None when no summary has these fields."""
    summaries = [s for s in with_axes(summaries) if "val_acc_running" in s]
    if not summaries:
        return None
    several_seeds = len({hashable(s.get("seed")) for s in summaries}) > 1
    keys = _row_keys(summaries)
    rows: dict[tuple, list[dict]] = {}
    for s in summaries:
        row = (*(hashable(s.get(k)) for k in keys), s["normalization"])
        rows.setdefault(row, []).append(s)
    head = [SHORT_NAMES.get(k, k) for k in keys] + ["norm"] + (["n"] if several_seeds else [])
    head += [f"{split} {short}" for split in ("val", "test") for _, short in EVERY_MODE_COLUMNS]
    lines = [head]
    for row, runs in rows.items():
        cells = [fmt_value(v) for v in row[:-1]] + [KIND_COLUMNS.get(row[-1], row[-1])]
        cells += [str(len(runs))] if several_seeds else []
        for split in ("val", "test"):
            for mode, _ in EVERY_MODE_COLUMNS:
                key = f"{split}_acc_{mode}"
                cell = (
                    _stat_cell(runs, key, ".3f")
                    if several_seeds
                    else _run_cell(runs[0], key, ".3f")
                )
                cells.append(cell)
        lines.append(cells)
    return lines


def _align(rows: list[list[str]]) -> str:
    """Right-aligned columns with a dashed rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)
