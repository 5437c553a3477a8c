"""The summary table: one row per run with one seed; mean ± SD over seeds and n with replicates."""

import re
import statistics

import numpy as np
import pytest

from bnexp import report

SCALES = (1e-4, 1e-2, 1.0)


def summary(index, seed, bn, scale, rng, **extra):
    """A summary with the fields the table reads; metrics random, so every cell differs."""
    return {
        "run_id": f"r{index}",
        "index": index,
        "batchnorm": bn,
        "weight_scale": scale,
        "learning_rate": 1e-3,
        "seed": seed,
        "hidden_dims": [50] * 7,
        "best_val_acc": float(rng.uniform(0.1, 0.4)),
        "best_train_acc": float(rng.uniform(0.1, 0.9)),
        "final_train_loss": float(rng.uniform(1.0, 2.3)),
        "test_acc": float(rng.uniform(0.1, 0.4)),
        "diverged": False,
        "seconds": float(rng.uniform(0.1, 2)),
        **extra,
    }


def sweep(seeds, **extra):
    rng = np.random.default_rng(0)
    runs = []
    for seed in seeds:
        for scale in SCALES:
            for bn in (True, False):
                runs.append(summary(len(runs), seed, bn, scale, rng, **extra))
    return runs


def parse(table):
    """Header and rows (dicts by header) of the table, columns cut where the dashed rule says."""
    lines = table.splitlines()
    spans = [m.span() for m in re.finditer(r"-+", lines[1])]
    assert set(lines[1]) == {"-", " "} and all(len(line) == len(lines[1]) for line in lines)
    cells = [[line[a:b].strip() for a, b in spans] for line in lines]
    return cells[0], [dict(zip(cells[0], row, strict=True)) for row in cells[2:]]


def runs_of(summaries, scale, bn):
    return [s for s in summaries if s["weight_scale"] == scale and s["batchnorm"] == bn]


def test_one_seed_one_row_per_scale_with_each_runs_values():
    summaries = sweep([231])
    summaries[-1].update(diverged=True, final_train_loss=None)  # scale 1, baseline
    head, rows = parse(report.summary_table(summaries))
    assert head[:3] == ["scale", "val BN", "val base"] and "n" not in head
    assert [r["scale"] for r in rows] == ["0.0001", "0.01", "1"]
    for row, scale in zip(rows, SCALES, strict=True):
        (bn,), (base,) = runs_of(summaries, scale, True), runs_of(summaries, scale, False)
        assert row["val BN"] == f"{bn['best_val_acc']:.3f}"
        assert row["train base"] == f"{base['best_train_acc']:.3f}"
        assert row["loss BN"] == f"{bn['final_train_loss']:.4g}"
        assert row["test base"] == f"{base['test_acc']:.3f}"
    assert rows[-1]["loss base"] == "- (div)"


def test_replicates_one_row_per_setting_with_mean_sd_and_n():
    summaries = sweep([1, 2, 3])
    head, rows = parse(report.summary_table(summaries))
    assert head[:2] == ["scale", "n"] and "seed" not in head
    assert len(rows) == len(SCALES)
    for row, scale in zip(rows, SCALES, strict=True):
        assert row["n"] == "3"
        for bn, side in ((True, "BN"), (False, "base")):
            vals = [s["best_val_acc"] for s in runs_of(summaries, scale, bn)]
            expected = f"{statistics.mean(vals):.3f}±{statistics.stdev(vals):.3f}"
            assert row[f"val {side}"] == expected
            losses = [s["final_train_loss"] for s in runs_of(summaries, scale, bn)]
            mean, sd = statistics.mean(losses), statistics.stdev(losses)
            assert row[f"loss {side}"] == f"{mean:.4g}±{sd:.2g}"


def test_replicates_with_a_diverged_seed_and_a_missing_one():
    summaries = sweep([1, 2, 3])
    lost = next(s for s in summaries if s["weight_scale"] == 1.0 and not s["batchnorm"])
    lost.update(diverged=True, final_train_loss=None)
    missing = next(s for s in summaries if s["weight_scale"] == 1e-4 and s["batchnorm"])
    summaries.remove(missing)  # a partial result: 2 BN seeds, 3 baseline seeds
    _, rows = parse(report.summary_table(summaries))
    assert rows[0]["n"] == "2/3" and rows[-1]["n"] == "3"
    losses = [s["final_train_loss"] for s in runs_of(summaries, 1.0, False) if s is not lost]
    mean, sd = statistics.mean(losses), statistics.stdev(losses)
    assert rows[-1]["loss base"] == f"{mean:.4g}±{sd:.2g} (1 div)"
    vals = [s["best_val_acc"] for s in runs_of(summaries, 1e-4, True)]
    assert rows[0]["val BN"] == f"{statistics.mean(vals):.3f}±{statistics.stdev(vals):.3f}"


def test_extra_setting_keys_become_columns_and_extra_result_keys_do_not_split_rows():
    summaries = sweep([1, 2]) + sweep([1, 2], bn_momentum=0.99)
    for i, s in enumerate(summaries):
        s.setdefault("bn_momentum", 0.9)
        s["group_seconds"] = float(i)  # a new timing field: differs per run, not a setting
    head, rows = parse(report.summary_table(summaries))
    assert head[:3] == ["scale", "bn_momentum", "n"]
    assert [(r["scale"], r["bn_momentum"], r["n"]) for r in rows] == [
        (report.fmt_value(scale), m, "2") for m in ("0.9", "0.99") for scale in SCALES
    ]


@pytest.mark.parametrize(
    ("values", "mean", "sd", "n"),
    [([1.0, 2.0, 4.0], 7 / 3, statistics.stdev([1.0, 2.0, 4.0]), 3), ([3.0, None], 3.0, None, 1)],
)
def test_stat_counts_finite_values_only(values, mean, sd, n):
    runs = [{"x": v, "diverged": v is None} for v in values] + [{"x": float("inf")}]
    st = report.stat(runs, "x")
    assert (st.n, st.n_runs, st.n_diverged) == (n, len(runs), values.count(None))
    assert st.mean == pytest.approx(mean)
    assert st.sd == pytest.approx(sd) if sd is not None else np.isnan(st.sd)


def test_every_normalization_gets_its_columns_and_the_flag_pairs_stay_as_they_were():
    kinds = ("batchnorm", "layernorm", "noisy_batchnorm", "none")
    summaries = [
        {
            "run_id": kind, "batchnorm": kind == "batchnorm", "weight_scale": 0.02, "seed": 1,
            "axes": {"model.normalization": kind}, "best_val_acc": 0.1 * (i + 1),
            "best_train_acc": 0.5, "final_train_loss": 1.0, "test_acc": 0.2, "diverged": False,
        }
        for i, kind in enumerate(kinds)
    ]  # fmt: skip
    head, _, row = report.summary_table(summaries).splitlines()
    order = [head.index(f"val {name}") for name in ("BN", "base", "LN", "noisyBN")]
    assert order == sorted(order) and "normalization" not in head
    # val per kind in the column order BN, base, LN, noisyBN: 0.1, 0.4, 0.2, 0.3.
    assert row.split()[1:5] == ["0.100", "0.400", "0.200", "0.300"]
    # Only the batch-norm flag (the notebook's experiments): BN and baseline, as before.
    flags = [{**s, "axes": {}} for s in summaries if s["run_id"] in ("batchnorm", "none")]
    head_flags, _, row_flags = report.summary_table(flags).splitlines()
    assert "val LN" not in head_flags and head_flags.index("val BN") < head_flags.index("val base")
    assert row_flags.split()[1:3] == ["0.100", "0.400"]
