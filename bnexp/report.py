"""The one-screen summary table printed after `bnexp train` / `bnexp sweep-init`."""

from __future__ import annotations

from collections.abc import Sequence


def _fmt(value, spec: str) -> str:
    """A number formatted with `spec`, '-' when missing (null: diverged or not evaluated)."""
    return "-" if value is None else format(value, spec)


def _cell(summary: dict | None) -> tuple[str, str, str]:
    """(best val acc, best train acc, final loss) of one run, marked when it diverged."""
    if summary is None:
        return "", "", ""
    mark = " (div)" if summary.get("diverged") else ""
    return (
        _fmt(summary.get("best_val_acc"), ".3f"),
        _fmt(summary.get("best_train_acc"), ".3f"),
        _fmt(summary.get("final_train_loss"), ".4g") + mark,
    )


def summary_table(summaries: Sequence[dict]) -> str:
    """Rows of weight scale (and learning rate, seed when they vary) with BN and baseline side by
    side: best val accuracy, best train accuracy, final training loss (mean of the last minibatch
    losses), and test accuracy of the best-val parameters."""
    keys = []
    pairs: dict[tuple, dict[bool, dict]] = {}
    for s in summaries:
        key = (s.get("seed"), s.get("learning_rate"), s.get("weight_scale"))
        if key not in pairs:
            keys.append(key)
            pairs[key] = {}
        pairs[key][bool(s.get("batchnorm"))] = s
    several_seeds = len({k[0] for k in keys}) > 1
    several_lrs = len({k[1] for k in keys}) > 1
    head = ["scale"] + (["lr"] if several_lrs else []) + (["seed"] if several_seeds else [])
    head += ["val BN", "val base", "train BN", "train base", "loss BN", "loss base"]
    head += ["test BN", "test base"]
    rows = [head]
    for key in keys:
        bn, base = pairs[key].get(True), pairs[key].get(False)
        (v1, t1, l1), (v0, t0, l0) = _cell(bn), _cell(base)
        row = [f"{key[2]:.3g}"]
        row += [f"{key[1]:.3g}"] if several_lrs else []
        row += [str(key[0])] if several_seeds else []
        row += [v1, v0, t1, t0, l1, l0]
        row += [_fmt((bn or {}).get("test_acc"), ".3f") if bn else ""]
        row += [_fmt((base or {}).get("test_acc"), ".3f") if base else ""]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
