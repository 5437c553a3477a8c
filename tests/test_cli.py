"""The commands as a user runs them (CliRunner), on a small generated CIFAR-10 folder."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fakecifar import make_learnable_images, write_binary

from bnexp import download, plots, records, sweep
from bnexp.cli import main
from bnexp.config import load_config
from bnexp.report import summary_table

SMALL = [
    "data.num_training=400",
    "data.num_validation=100",
    "data.num_test=50",
    "data.num_train=200",
    "model.hidden_dims=[32, 32, 32]",
    "train.epochs=3",
]


@pytest.fixture
def fake_data(tmp_path, monkeypatch):
    """A learnable generated CIFAR-10 in the binary layout; the prepared-split cache in tmp."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BNEXP_DATA_DIR", raising=False)
    x, y, xt, yt = make_learnable_images(np.random.default_rng(1), 5 * 100, 60)
    return write_binary(tmp_path / "cifar", x, y, xt, yt, n_batch=100)


def csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error_line(result, code, *words):
    """A failure is exactly one 'error: ...' line with the class's exit code, no traceback."""
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0]


def test_train_writes_records_figures_and_summary(tmp_path, fake_data):
    out = tmp_path / "out"
    result = invoke("train", "-o", out, "--data-dir", fake_data, *SMALL)
    assert result.exit_code == 0, result.output
    assert "val BN" in result.output and "2 runs trained" in result.output
    for name in ("config.yaml", "manifest.json", "results.csv", "plots/training_curves.png"):
        assert (out / name).is_file(), name
    summaries = [json.loads(p.read_text()) for p in out.glob("runs/*/summary.json")]
    assert sorted(s["batchnorm"] for s in summaries) == [False, True]
    for s in summaries:
        assert s["hidden_dims"] == [32, 32, 32] and s["num_train"] == 200
        assert len(s["val_acc_history"]) == 4 and len(s["loss_history"]) == 12
    # The generated classes are learnable: batch norm gets far above chance (0.1).
    bn = next(s for s in summaries if s["batchnorm"])
    assert bn["best_train_acc"] > 0.5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["layout"] == "binary" and manifest["status"] == "complete"


def test_rerun_resumes_and_other_config_needs_force(tmp_path, fake_data):
    out = tmp_path / "out"
    assert invoke("train", "-o", out, "--data-dir", fake_data, *SMALL).exit_code == 0
    again = invoke("train", "-o", out, "--data-dir", fake_data, *SMALL)
    assert again.exit_code == 0 and "0 runs trained, 2 already finished" in again.output
    other = invoke("train", "-o", out, "--data-dir", fake_data, *SMALL, "seed=5")
    assert_one_error_line(other, 4, "different config", "--force")
    forced = invoke("train", "-o", out, "--data-dir", fake_data, *SMALL, "seed=5", "--force")
    assert forced.exit_code == 0 and "2 runs trained" in forced.output


def test_a_finished_folder_reruns_offline_and_changes_no_file(tmp_path, fake_data):
    out = tmp_path / "out"
    assert invoke("train", "-o", out, "--data-dir", fake_data, *SMALL).exit_code == 0

    def snapshot():
        return {
            p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()
        }

    before = snapshot()
    again = invoke("train", "-o", out, "--data-dir", tmp_path / "no-cifar-here", *SMALL)
    assert again.exit_code == 0, again.output
    assert "0 runs trained, 2 already finished" in again.output
    assert "figure: " in again.output and snapshot() == before
    assert not (tmp_path / "no-cifar-here").exists()


def test_resume_on_other_data_is_refused_and_force_starts_over(tmp_path, fake_data):
    out = tmp_path / "out"
    assert invoke("train", "-o", out, "--data-dir", fake_data, *SMALL).exit_code == 0
    first = {p.parent.name: p.read_text() for p in out.glob("runs/*/summary.json")}
    next(iter(out.glob("runs/*/summary.json"))).unlink()  # one run left to train
    # Other images in the same files: same names and sizes, other contents.
    x, y, xt, yt = make_learnable_images(np.random.default_rng(2), 5 * 100, 60)
    write_binary(fake_data.parent, x, y, xt, yt, n_batch=100)
    old = json.loads((out / "manifest.json").read_text())["data"]["fingerprint"]
    refused = invoke("train", "-o", out, "--data-dir", fake_data.parent, *SMALL)
    assert refused.exit_code == 3 and "Traceback" not in refused.output
    errors = [line for line in refused.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "other data" in errors[0] and old in errors[0]
    assert len(list(out.glob("runs/*/summary.json"))) == 1  # nothing trained or removed
    forced = invoke("train", "-o", out, "--data-dir", fake_data.parent, *SMALL, "--force")
    assert forced.exit_code == 0 and "2 runs trained" in forced.output
    now = {p.parent.name: p.read_text() for p in out.glob("runs/*/summary.json")}
    assert now.keys() == first.keys() and all(now[k] != first[k] for k in now)


def test_any_swept_number_gets_its_sweep_figure_and_replicates_are_summarised(tmp_path, fake_data):
    out = tmp_path / "grid"
    axes = [
        "seed=[1, 2]",
        "train.learning_rate={logspace: [-4, -2, 3]}",
        "model.weight_scale=0.02",
        "train.batch_size=[20, 40]",
        "train.epochs=1",
    ]
    result = invoke("sweep-init", "-o", out, "--data-dir", fake_data, *SMALL[:-1], *axes)
    assert result.exit_code == 0, result.output
    rows = csv_rows(out / "results.csv")
    assert len(rows) == 24 and {r["train.batch_size"] for r in rows} == {"20", "40"}
    # The learning rate varies most (3 values): it is the x axis; the seeds are summarised.
    assert (out / "plots" / "sweep_learning_rate.png").is_file()
    assert not (out / "plots" / "weight_init_sweep.png").exists()
    table = summary_table(records.read_summaries(out))
    assert table in result.output
    head, *_, last = table.splitlines()
    assert "n" in head.split() and len(table.splitlines()) == 2 + 3 * 2  # lr x batch size
    assert "batch_size" in head.split() and "train.batch_size" not in head.split()
    assert last.split()[3] == "2"  # n: two seeds behind each cell
    fig = plots.build_sweep_figure(records.read_summaries(out), x_key="learning_rate")
    labels = {
        ln.get_label() for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")
    }
    assert {"batch norm, batch_size 20", "baseline, batch_size 40"} <= labels
    redraw = invoke("plot", out, "--x", "train.batch_size")
    assert redraw.exit_code == 0 and (out / "plots" / "sweep_batch_size.png").is_file()
    bad = invoke("plot", out, "--x", "model.reg")
    assert_one_error_line(bad, 4, "--x model.reg", "learning_rate")
    # --hue: lines coloured by the batch size, one colour per value, BN and baseline by style.
    fig = plots.build_sweep_figure(records.read_summaries(out), None, "learning_rate", "batch_size")
    lines = [ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]
    colours = {ln.get_label(): ln.get_color() for ln in lines if "batch_size" in ln.get_label()}
    assert colours["batch_size 20, batch norm"] == colours["batch_size 20, baseline"]
    assert colours["batch_size 20, batch norm"] != colours["batch_size 40, batch norm"]
    assert invoke("plot", out, "--hue", "train.batch_size").exit_code == 0
    assert_one_error_line(invoke("plot", out, "--hue", "model.reg"), 4, "--hue model.reg")


def test_overrides_and_partial_files_get_their_own_folder(tmp_path, fake_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = invoke("train", "--data-dir", fake_data, *SMALL[:-1], "train.epochs=2")
    assert plain.exit_code == 0, plain.output
    (folder,) = (tmp_path / "results").iterdir()
    assert (
        folder.name.startswith("bn_vs_baseline-")
        and f"output: {Path('results') / folder.name}" in plain.output
    )
    # Other overrides: another folder, never a refusal of the first one's results.
    other = invoke("train", "--data-dir", fake_data, *SMALL[:-1], "train.epochs=1")
    assert other.exit_code == 0, other.output
    assert len(list((tmp_path / "results").iterdir())) == 2
    # The same overrides again: the same folder, found finished.
    again = invoke("train", "--data-dir", fake_data, *SMALL[:-1], "train.epochs=2")
    assert again.exit_code == 0 and "0 runs trained, 2 already finished" in again.output
    # A file that names no experiment is named after itself.
    (tmp_path / "partial.yaml").write_text("train: {epochs: 1}\n")
    assert load_config(tmp_path / "partial.yaml", command="train").name == "partial"
    assert load_config(None, command="train").name == "bn_vs_baseline"


def test_sweep_init_draws_the_sweep_figure_and_plot_redraws_without_training(
    tmp_path, fake_data, monkeypatch
):
    out = tmp_path / "sweep"
    grid = "model.weight_scale={logspace: [-3, 0, 3]}"
    result = invoke("sweep-init", "-o", out, "--data-dir", fake_data, *SMALL, grid, "--jobs", 2)
    assert result.exit_code == 0, result.output
    assert len(result.output.strip().splitlines()) >= 5  # header, rule, 3 scales, ...
    png = out / "plots" / "weight_init_sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("bnexp plot must not train")

    monkeypatch.setattr(sweep, "train_group", no_training)
    redraw = invoke("plot", out, "--svg")
    assert redraw.exit_code == 0, redraw.output
    assert png.is_file() and "weight_init_sweep.png" in redraw.output
    assert "weight_init_sweep.svg" in redraw.output and png.with_suffix(".svg").is_file()

    # `show` prints the run's own table offline: no data folder, no training.
    monkeypatch.setenv("BNEXP_DATA_DIR", str(tmp_path / "no-such-data"))
    shown = invoke("show", out)
    assert shown.exit_code == 0, shown.output
    table = summary_table(records.read_summaries(out))
    assert shown.output.startswith(table + "\n") and "6 of 6 runs finished" in shown.output


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("train: [unclosed\n", ["bad.yaml", "line"]),
        ("train:\n  epochz: 3\n", ["bad.yaml", "train.epochz"]),
        ("train:\n  epochs: ten\n", ["bad.yaml", "train.epochs"]),
        ("model:\n  weight_scale: -1\n", ["bad.yaml", "model.weight_scale"]),
        ("model:\n  weight_scale: []\n", ["bad.yaml", "model.weight_scale"]),
    ],
)
def test_bad_config_is_one_line_exit_2_and_writes_nothing(tmp_path, fake_data, text, words):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out = tmp_path / "out"
    result = invoke("sweep-init", "-c", path, "-o", out, "--data-dir", fake_data)
    assert_one_error_line(result, 2, *words)
    assert not out.exists()


def test_bad_override_and_missing_config(tmp_path, fake_data):
    assert_one_error_line(invoke("train", "-o", tmp_path / "o", "train.epochs"), 2, "train.epochs")
    assert_one_error_line(invoke("train", "-c", tmp_path / "nope.yaml"), 2, "nope.yaml")


def test_missing_and_corrupt_data_are_one_line_exit_3(tmp_path, fake_data, monkeypatch):
    # A folder the user named is never filled on its own: missing data there is an error.
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke("train", "-o", tmp_path / "o1", "--data-dir", empty, *SMALL)
    assert_one_error_line(result, 3, "no CIFAR-10 in", "bnexp data download --data-dir")
    assert list(empty.iterdir()) == []
    # The default cache is filled on first use; here the "official" server refuses the connection.
    _, md5, folder = download.ARCHIVES["binary"]
    monkeypatch.setitem(download.ARCHIVES, "binary", ("http://127.0.0.1:9/c.tar.gz", md5, folder))
    result = invoke("train", "-o", tmp_path / "o1", *SMALL)
    assert_one_error_line(result, 3, "could not reach", "--data-dir")
    assert list((tmp_path / "cache" / "bnexp").iterdir()) == []
    batch = fake_data / "cifar-10-batches-bin" / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-5])
    result = invoke("train", "-o", tmp_path / "o2", "--data-dir", fake_data, *SMALL)
    assert_one_error_line(result, 3, "data_batch_3.bin")


def test_unwritable_output_is_one_line_exit_4(tmp_path, fake_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = invoke("train", "-o", blocker / "out", "--data-dir", fake_data, *SMALL)
    assert_one_error_line(result, 4, "a_file")


def test_show_of_an_empty_folder_is_one_line(tmp_path):
    assert_one_error_line(invoke("show", tmp_path), 4, "nothing to show")


def test_plot_of_an_empty_folder_is_one_line(tmp_path):
    assert_one_error_line(invoke("plot", tmp_path), 4, "nothing to plot")


def test_python_dash_m_and_version():
    done = subprocess.run(
        [sys.executable, "-m", "bnexp", "--version"], capture_output=True, text=True, check=True
    )
    assert done.stdout.startswith("bnexp, version")


def test_data_error_writes_nothing_so_another_config_is_not_refused_later(tmp_path, fake_data):
    batch = fake_data / "cifar-10-batches-bin" / "data_batch_2.bin"
    good = batch.read_bytes()
    batch.write_bytes(good[:-7])
    out = tmp_path / "out"
    assert_one_error_line(invoke("train", "-o", out, "--data-dir", fake_data, *SMALL), 3)
    assert not out.exists()
    # Data fixed, config changed: OUT holds no results, so nothing is in the way.
    batch.write_bytes(good)
    result = invoke("train", "-o", out, "--data-dir", fake_data, *SMALL, "seed=5")
    assert result.exit_code == 0, result.output


def test_different_config_is_refused_before_the_data_is_read(tmp_path, fake_data):
    out = tmp_path / "out"
    assert invoke("train", "-o", out, "--data-dir", fake_data, *SMALL).exit_code == 0
    before = (out / "manifest.json").read_bytes()
    missing = tmp_path / "no_data_here"
    other = invoke("train", "-o", out, "--data-dir", missing, *SMALL, "seed=5")
    assert_one_error_line(other, 4, "different config")
    assert (out / "manifest.json").read_bytes() == before
    assert not missing.exists()


def test_out_that_is_a_regular_file_is_one_line_exit_4(tmp_path, fake_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = invoke("train", "-o", blocker, "--data-dir", fake_data, *SMALL)
    assert_one_error_line(result, 4, "a_file", "a file is in the way")
    assert_one_error_line(invoke("plot", blocker), 4, "a_file")
    assert blocker.read_text() == "not a folder"


def test_second_process_on_one_out_stops_with_one_line_naming_the_holder(tmp_path, fake_data):
    out = tmp_path / "out"
    with records.output_lock(out):  # as another bnexp process would hold it
        result = invoke("train", "-o", out, "--data-dir", fake_data, *SMALL)
        assert_one_error_line(result, 4, "in use by", f"pid {os.getpid()}")
        assert sorted(p.name for p in out.iterdir()) == [records.LOCK_NAME]
    result = invoke("train", "-o", out, "--data-dir", fake_data, *SMALL)
    assert result.exit_code == 0, result.output
    assert not (out / records.LOCK_NAME).exists()


# Eight more levels of nine aliases each over the file's 9-item list `a`: ~430 million values.
LAUGHS = "".join(
    f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (LAUGHS, ["evil.yaml", "aliases"]),
        ("train:\n  ? [epochs]\n  : 3\n", ["evil.yaml", "a key must be a name"]),
        ("model: " + "[" * 5000 + "\n", ["evil.yaml", "nested more than"]),
    ],
)
def test_hostile_yaml_is_one_line_exit_2_and_writes_nothing(tmp_path, fake_data, text, words):
    path = tmp_path / "evil.yaml"
    path.write_text("a: &a [" + ",".join(["lol"] * 9) + "]\n" + text)
    out = tmp_path / "out"
    result = invoke("sweep-init", "-c", path, "-o", out, "--data-dir", fake_data)
    assert_one_error_line(result, 2, *words)
    assert len(result.output) < 300 and "lol" not in result.output
    assert not out.exists()
