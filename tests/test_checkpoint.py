"""Checkpoints: a group stopped after an epoch's checkpoint and resumed from it gives the same bits
as the group trained without a stop; checkpoints of another config, data or a damaged file are
not used; the sweep resumes from them and removes them; a killed `bnexp train` resumes from its
checkpoint to the numbers of an uninterrupted run."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fakecifar import learnable_splits, make_learnable_images, write_binary

from bnexp import checkpoint as ckpt
from bnexp import plan, records, sweep, train
from bnexp.config import load_config
from bnexp.data import Splits
from bnexp.errors import ConfigError, OutputError
from bnexp.model import NetSpec
from bnexp.probes import ProbeSettings
from bnexp.sweep import solver_settings

D, C, NUM_TRAIN, BATCH = 40, 4, 60, 12  # 5 iterations per epoch
SCALES = [1e-2, 5e-2, 0.1, 0.3]
LRS = [1e-3, 3e-3, 5e-4, 1e-2]
ROOT = Path(records.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data():
    """Learnable synthetic data (a random linear teacher), so accuracies and snapshots move."""
    rng = np.random.default_rng(0)
    teacher = rng.standard_normal((D, C))
    X = rng.standard_normal((NUM_TRAIN + 100, D))
    y = (X @ teacher + 0.5 * rng.standard_normal((len(X), C))).argmax(axis=1)
    parts = X[:60], y[:60], X[60:110], y[60:110], X[110:], y[110:]
    return Splits(*parts, mean_image=np.zeros(D), source={})


def _settings(dtype="float32", **kw):
    cfg = load_config(None, [f"model.dtype={dtype}", "train.epochs=4", f"train.batch_size={BATCH}"])
    return dataclasses.replace(solver_settings(cfg), **kw)


def _members(spec, settings, shared=True, lrs=LRS, **kw):
    iters = settings.num_iterations(NUM_TRAIN)
    plans = [
        plan.numpy_plan(0 if shared else 10 + k, spec, iters, BATCH, NUM_TRAIN)
        for k in range(len(SCALES))
    ]
    return [train.Member(s, lr, p, **kw) for s, lr, p in zip(SCALES, lrs, plans, strict=True)]


class _Stop(Exception):
    """Raised by on_progress: the group is 'killed' right after an iteration."""


def _stop_after(iterations: int):
    def on_progress(done: int) -> None:
        if done == iterations:
            raise _Stop

    return on_progress


def _fingerprint(result: train.RunResult) -> str:
    """Every field of a RunResult but `seconds`, bit-exact (floats as their hex or repr)."""
    fields = dataclasses.asdict(result)
    fields.pop("seconds")
    fields["loss_history"] = np.asarray(result.loss_history).tobytes().hex()
    for key in ("train_acc_history", "val_acc_history"):
        fields[key] = np.asarray(fields[key], dtype=np.float64).tobytes().hex()
    return json.dumps(fields, default=repr)


def _interrupted_then_resumed(tmp_path, spec, members, data, settings, stop, probes=None):
    """Train with a checkpoint at every epoch end, stop after `stop` iterations, resume.
    Returns (results, first iteration count reported by the resumed run)."""
    point = ckpt.Checkpoint(tmp_path / "checkpoints" / "g.npz", key="k", seconds=0.0)
    with pytest.raises(_Stop):
        train.train_group(spec, members, data, settings, _stop_after(stop), probes, point)
    assert point.path.exists()
    reported: list[int] = []
    results = train.train_group(spec, members, data, settings, reported.append, probes, point)
    return results, reported[0]


CASES = {
    "plain": (NetSpec(D, (16, 12), C), {}, {"lr_decay": 0.9}, None),
    "batchnorm-shuffled": (NetSpec(D, (16, 12), C, True), {"shared": False}, {}, None),
    "noisy-bn-dropout": (
        NetSpec(D, (16, 12), C, normalization="noisy_batchnorm"),
        {"dropout_keep": 0.8, "bn_noise": 0.3},
        {},
        None,
    ),
    "dropout-float64-momentum": (
        NetSpec(D, (16, 12), C, True),
        {"dropout_keep": 0.7},
        {"dtype": "float64", "update_rule": "sgd_momentum", "lr_decay": 0.8},
        None,
    ),
    "population": (NetSpec(D, (16, 12), C, True), {}, {"bn_eval": "population"}, None),
    "probes": (
        NetSpec(D, (16, 12), C, True),
        {},
        {},
        ProbeSettings(every=5, batch_size=20, ics=True, landscape=True),
    ),
    # The probes of noisy batch norm draw from streams of their own: resumed where they were.
    "probes-noisy-bn": (
        NetSpec(D, (16, 12), C, normalization="noisy_batchnorm"),
        {"bn_noise": 0.5},
        {},
        ProbeSettings(every=3, batch_size=20, ics=True, landscape=True),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("stop", [5, 10])
def test_resumed_group_gives_the_uninterrupted_bits(tmp_path, data, case, stop):
    spec, member_kw, settings_kw, probes = CASES[case]
    settings = _settings(**settings_kw)
    members = _members(spec, settings, **member_kw)
    whole = train.train_group(spec, members, data, settings, None, probes)
    resumed, first = _interrupted_then_resumed(
        tmp_path, spec, members, data, settings, stop, probes
    )
    assert first == stop + 1, "the resumed run did not start from its checkpoint"
    assert [_fingerprint(r) for r in resumed] == [_fingerprint(r) for r in whole]
    # The histories move (so identical histories say something).
    assert len({a for r in whole for a in r.val_acc_history}) > 3
    if probes is not None:
        assert whole[0].probe_layers and whole[0].probe_landscape


def test_resumed_group_with_a_diverged_network_gives_the_uninterrupted_bits(tmp_path, data):
    """One network diverges before the checkpoint (its frozen state is restored), two after."""
    spec = NetSpec(D, (16, 12), C)
    settings = _settings(update_rule="sgd")
    shared = _members(spec, settings)[0].plan
    members = [train.Member(1.0, lr, shared) for lr in (1e-2, 1e30, 30.0, 50.0)]
    whole = train.train_group(spec, members, data, settings)
    at = [r.diverged_iteration for r in whole]
    assert at[0] is None and at[1] < 5 and at[2] >= 5 and at[3] >= 5, at
    resumed, _ = _interrupted_then_resumed(tmp_path, spec, members, data, settings, 5)
    assert [_fingerprint(r) for r in resumed] == [_fingerprint(r) for r in whole]


def test_no_checkpoint_written_before_its_period(tmp_path, data):
    spec = NetSpec(D, (16,), C)
    settings = _settings()
    point = ckpt.Checkpoint(tmp_path / "g.npz", key="k", seconds=3600.0)
    with pytest.raises(_Stop):
        train.train_group(
            spec, _members(spec, settings), data, settings, _stop_after(15), None, point
        )
    assert not point.path.exists()


def _saved(tmp_path, data, key="k"):
    """A group, its settings, and a checkpoint of it after its first epoch."""
    spec = NetSpec(D, (16, 12), C, True)
    settings = _settings()
    members = _members(spec, settings)
    point = ckpt.Checkpoint(tmp_path / "g.npz", key=key, seconds=0.0)
    with pytest.raises(_Stop):
        train.train_group(spec, members, data, settings, _stop_after(5), None, point)
    return spec, members, settings, point


def _fresh_run(spec, members, data, settings, point):
    reported: list[int] = []
    results = train.train_group(spec, members, data, settings, reported.append, None, point)
    return results, reported[0]


def test_checkpoint_of_another_key_is_removed_unused(tmp_path, data, capsys):
    spec, members, settings, point = _saved(tmp_path, data, key="other config")
    mine = dataclasses.replace(point, key="this config")
    results, first = _fresh_run(spec, members, data, settings, mine)
    assert first == 1, "a checkpoint of another config was used"
    whole = train.train_group(spec, members, data, settings)
    assert [_fingerprint(r) for r in results] == [_fingerprint(r) for r in whole]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another config or data" in err


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "wrong-shape"])
def test_damaged_checkpoint_gives_one_note_and_training_from_zero(tmp_path, data, capsys, damage):
    spec, members, settings, point = _saved(tmp_path, data)
    raw = point.path.read_bytes()
    if damage == "truncated":
        point.path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        point.path.write_bytes(raw[:100] + bytes(200) + raw[300:])
    elif damage == "empty":
        point.path.write_bytes(b"")
    else:  # a well-formed file whose arrays do not fit the group (here: one network fewer)
        with np.load(point.path) as npz:
            arrays = {name: npz[name] for name in npz.files if name != "meta"}
            meta = json.loads(npz["meta"].tobytes())
        arrays["group.lr"] = arrays["group.lr"][:-1]
        point.save(arrays, meta)
    results, first = _fresh_run(spec, members, data, settings, point)
    assert first == 1
    whole = train.train_group(spec, members, data, settings)
    assert [_fingerprint(r) for r in results] == [_fingerprint(r) for r in whole]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not used" in err and "Traceback" not in err, err
    # Replaced by the retraining's own checkpoints, the last one at the last epoch end but one.
    assert point.load()[1]["iteration"] == 15


def test_checkpoint_file_is_safe_npz_and_json(tmp_path, data):
    """Readable without pickle; the generator states are JSON; no temporary is left."""
    *_, point = _saved(tmp_path, data)
    with np.load(point.path, allow_pickle=False) as npz:
        assert all(npz[name].dtype != object for name in npz.files)
        meta = json.loads(npz["meta"].tobytes())
    assert meta["iteration"] == 5 and meta["check"] == 2 and meta["key"] == "k"
    assert [p.name for p in tmp_path.iterdir()] == ["g.npz"]


def test_period_from_environment(monkeypatch):
    monkeypatch.delenv(ckpt.SECONDS_VARIABLE, raising=False)
    assert ckpt.period_from_environment() == ckpt.DEFAULT_SECONDS
    monkeypatch.setenv(ckpt.SECONDS_VARIABLE, "0")
    assert ckpt.period_from_environment() == 0.0
    monkeypatch.setenv(ckpt.SECONDS_VARIABLE, "off")
    assert ckpt.period_from_environment() is None
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv(ckpt.SECONDS_VARIABLE, bad)
        with pytest.raises(ValueError, match=ckpt.SECONDS_VARIABLE):
            ckpt.period_from_environment()


# --- the sweep: checkpoints in OUT/checkpoints, resumed, removed ---------------------------------

SMALL = [
    "model.hidden_dims=[16, 16]",
    "model.weight_scale=[1.0e-3, 5.0e-2, 1.0]",
    "train.epochs=4",
    "train.batch_size=20",
    "data.num_train=100",
]  # two groups (batch norm, baseline) of 3 networks, 5 iterations per epoch


@pytest.fixture(scope="module")
def splits():
    return learnable_splits()


@pytest.fixture
def every_epoch(monkeypatch):
    monkeypatch.setenv(ckpt.SECONDS_VARIABLE, "0")


def _run(out, data, *extra, **kw):
    cfg = load_config(None, [*SMALL, *extra])
    kw = {"progress": False, "plot": False, "log": lambda m: None, **kw}
    return sweep.run_experiment(cfg, out, data=data, **kw)


def _records(out: Path) -> dict:
    """Every run's summary (but `seconds`) and metrics lines, and results.csv without seconds."""
    found = {}
    for path in sorted(out.glob("runs/*/summary.json")):
        summary = json.loads(path.read_text())
        summary.pop("seconds")
        found[path.parent.name] = (summary, (path.parent / "metrics.jsonl").read_text())
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    for row in rows:
        row.pop("seconds")
    return {"runs": found, "results": rows}


def _interrupt_at_save(monkeypatch, n: int) -> None:
    """Ctrl-C right after the n-th checkpoint of this process is written."""
    real, saved = ckpt.Checkpoint.save, []

    def save(self, arrays, meta):
        real(self, arrays, meta)
        saved.append(self.path)
        if len(saved) == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.Checkpoint, "save", save)


@pytest.mark.parametrize(
    ("n", "extra"),
    [(2, []), (5, []), (5, ["rng=cs231n"])],
    ids=["in-group-1", "in-group-2", "cs231n-replay"],
)
def test_sweep_resumes_from_its_checkpoint(
    tmp_path, splits, monkeypatch, capfd, every_epoch, n, extra
):
    _run(tmp_path / "whole", splits, *extra)
    with monkeypatch.context() as patch:
        _interrupt_at_save(patch, n)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path / "out", splits, *extra)
    left = list((tmp_path / "out" / "checkpoints").iterdir())
    assert len(left) == 1 and left[0].suffix == ".npz"  # the first group's went with its records
    capfd.readouterr()
    result = _run(tmp_path / "out", splits, *extra)
    assert "resuming a group of 3 runs from its checkpoint at iteration 10 of 20" in (
        capfd.readouterr().err
    )
    assert result.trained == (6 if n == 2 else 3)
    assert _records(tmp_path / "out") == _records(tmp_path / "whole")
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_sweep_ignores_a_checkpoint_of_other_data(tmp_path, monkeypatch, capfd, every_epoch):
    """Nothing finished yet, so other data is allowed; its group's checkpoint is not."""
    one_group = "model.batchnorm=true"
    first, second = learnable_splits(seed=1), learnable_splits(seed=2)
    with monkeypatch.context() as patch:
        _interrupt_at_save(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path / "out", first, one_group)
    assert len(list((tmp_path / "out" / "checkpoints").iterdir())) == 1
    capfd.readouterr()
    _run(tmp_path / "out", second, one_group)
    err = capfd.readouterr().err
    assert "written for another config or data" in err and "resuming" not in err
    _run(tmp_path / "whole", second, one_group)
    assert _records(tmp_path / "out") == _records(tmp_path / "whole")


def test_force_removes_checkpoints(tmp_path, splits, monkeypatch, capfd, every_epoch):
    with monkeypatch.context() as patch:
        _interrupt_at_save(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path / "out", splits)
    capfd.readouterr()
    _run(tmp_path / "out", splits, force=True)
    assert "resuming" not in capfd.readouterr().err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_left_over_checkpoints_and_temporaries_are_removed(tmp_path, splits):
    """A checkpoint of a group whose records were written just before a kill, and a killed
    writer's temporary: the next invocation removes both, even with nothing to train."""
    _run(tmp_path / "out", splits)
    folder = tmp_path / "out" / "checkpoints"
    folder.mkdir()
    (folder / "0123456789abcdef.npz").write_bytes(b"old")
    (folder / ".0123456789abcdef.npz.x1y2.tmp").write_bytes(b"half")
    assert _run(tmp_path / "out", splits).trained == 0
    assert not folder.exists()
    folder.mkdir()
    (folder / ".0123456789abcdef.npz.x1y2.tmp").write_bytes(b"half")
    _run(tmp_path / "out", splits, force=True)  # trains: the temporary goes with the lock held
    assert not folder.exists()


def test_bad_checkpoint_period_is_one_config_error(tmp_path, splits, monkeypatch):
    monkeypatch.setenv(ckpt.SECONDS_VARIABLE, "-5")
    with pytest.raises(ConfigError, match=ckpt.SECONDS_VARIABLE):
        _run(tmp_path / "out", splits)
    assert not (tmp_path / "out").exists()


# --- a real process, killed with SIGKILL after its first checkpoint ----------------------------

TRAIN = [
    "data.num_training=400",
    "data.num_validation=100",
    "data.num_test=50",
    "data.num_train=200",
    "model.hidden_dims=[32, 32]",
    "train.epochs=60",
    "model.dropout_keep=0.9",
    "probes.every=50",
    "probes.ics=true",
    "probes.landscape=true",
]


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    x, y, xt, yt = make_learnable_images(np.random.default_rng(3), 5 * 100, 60)
    data = write_binary(root / "cifar", x, y, xt, yt, n_batch=100)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(root / "cache")}
    env[ckpt.SECONDS_VARIABLE] = "0"
    env.pop("BNEXP_DATA_DIR", None)
    return data, env


def _command(data, out, jobs):
    command = [sys.executable, "-m", "bnexp", "train", "-o", str(out), "--no-plot"]
    return [*command, "--data-dir", str(data), "--jobs", str(jobs), *TRAIN]


def _all_records(out: Path) -> dict:
    """_records plus the probe records of every run."""
    found = _records(out)
    for name in ("layers.jsonl", "landscape.jsonl"):
        found[name] = {p.parent.name: p.read_text() for p in sorted(out.glob(f"runs/*/{name}"))}
    assert found["layers.jsonl"] and found["landscape.jsonl"]
    return found


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_sigkill_after_a_checkpoint_then_rerun_gives_the_uninterrupted_records(
    tmp_path, fake_cifar, jobs
):
    data, env = fake_cifar
    whole = subprocess.run(
        _command(data, tmp_path / "whole", jobs), env=env, capture_output=True, text=True
    )
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "out"
    process = subprocess.Popen(
        _command(data, out, jobs),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("checkpoints/*.npz")):
            assert process.poll() is None, "finished before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert not _left_in_group(process.pid), "a worker outlived its killed parent"
    assert not (out / "results.csv").exists() or len(_records(out)["runs"]) < 2
    again = subprocess.run(_command(data, out, jobs), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming a group of 1 runs from its checkpoint" in again.stderr
    assert "Traceback" not in again.stderr
    assert _all_records(out) == _all_records(tmp_path / "whole")
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not (out / "checkpoints").exists() and not (out / records.LOCK_NAME).exists()


def _left_in_group(pgid: int, seconds: float = 5.0) -> list[int]:
    """Live processes of process group pgid (from /proc), after waiting up to `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # not a process, or it ended meanwhile
            if entry.name.isdigit() and int(fields[2]) == pgid and fields[0] not in "ZX":
                found.append(int(entry.name))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_every_piece_of_training_state_is_in_the_checkpoint(data):
    """A guard for later changes: state added to the group, history or probes must be added to
    `train._capture` and `train._restore` too (or listed here as derived from the members)."""
    spec = NetSpec(D, (16, 12), C, normalization="noisy_batchnorm")
    settings = _settings()
    members = _members(spec, settings, dropout_keep=0.8)
    inputs = train._Inputs.of(data, members, settings.compute_np_dtype)
    probes = ProbeSettings(every=5, batch_size=20, ics=True, landscape=True)
    group, history, probe, _ = train._start(spec, members, settings, inputs, 5, probes, None)
    arrays, meta = train._capture(group, history, probe, train._Reached(5, 2, 1.0))
    captured = {"params", "flat", "lr", "alive", "bn_params", "updaters", "rngs"}
    derived = {"spec", "settings", "wide", "K", "dtype", "small", "flat_grad", "grad_views"}
    derived |= {"keep", "strength"}  # from the members
    assert set(vars(group)) == captured | derived
    assert {f"history.{f.name}" for f in dataclasses.fields(history) if f.name != "best"} <= set(
        arrays
    )
    assert set(history.best) == {"params", "stats"}
    captured = {"prev", "layers", "landscape", "noise_rngs"}
    derived = {"settings", "steps", "spec", "eps", "X", "y", "before"}  # before: set per step
    assert set(vars(probe)) == captured | derived
    assert len(meta["probe"]["noise_rngs"]) == len(members)
    assert set(meta) >= {"iteration", "check", "seconds", "optimizer", "rngs", "probe"}


def test_a_checkpoint_that_cannot_be_written_is_one_output_error(tmp_path, data):
    spec = NetSpec(D, (16,), C)
    settings = _settings()
    (tmp_path / "checkpoints").write_text("a file in the way of the folder")
    point = ckpt.Checkpoint(tmp_path / "checkpoints" / "g.npz", key="k", seconds=0.0)
    with pytest.raises(OutputError, match=f"{ckpt.SECONDS_VARIABLE}=off"):
        train.train_group(spec, _members(spec, settings), data, settings, None, None, point)
