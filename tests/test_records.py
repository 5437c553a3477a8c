"""Records: atomic standard JSON, output-folder guard, commit marker, results.csv, manifest."""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bnexp import records
from bnexp.errors import OutputError


def strict_json(text):
    """json.loads that fails on NaN/Infinity tokens (not standard JSON)."""

    def reject(token):
        raise AssertionError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=reject)


def summary(index, **kw):
    base = {
        "index": index,
        "batchnorm": index % 2 == 0,
        "weight_scale": 10.0 ** -(index + 1) / 3,
        "learning_rate": 1e-3,
        "seed": 231,
        "best_train_acc": 0.5,
        "best_val_acc": 0.25,
        "final_train_loss": 1.2345678901234567,
        "diverged": False,
        "status": "ok",
        "seconds": 2.5,
        "test_acc": None,
        "loss_history": [2.3, 2.2],
    }
    return {**base, **kw}


def test_atomic_json_is_standard_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.json"
    obj = {
        "nan": float("nan"),
        "inf": [1.0, float("inf"), -np.inf],
        "np": np.float32(0.5),
        "arr": np.array([1, 2]),
        "b": np.bool_(True),
        "t": (1, 2),
    }
    records.atomic_write_json(path, obj)
    data = strict_json(path.read_text())
    assert data == {"nan": None, "inf": [1.0, None, None], "np": 0.5, "arr": [1, 2], "b": True,
                    "t": [1, 2]}  # fmt: skip
    records.atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert os.listdir(tmp_path) == ["a.json"]


def test_atomic_write_into_missing_folder_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="cannot write"):
        records.atomic_write_text(tmp_path / "missing" / "x.txt", "x")
    assert os.listdir(tmp_path) == []


def test_prepare_output_dir(tmp_path):
    out = tmp_path / "a" / "out"
    assert records.prepare_output_dir(out, "name: a\n") == out
    assert (out / "runs").is_dir()
    assert (out / "config.yaml").read_text() == "name: a\n"
    records.prepare_output_dir(out, "name: a\n")  # same config: resume
    with pytest.raises(OutputError, match="different config; use a new -o folder or --force"):
        records.prepare_output_dir(out, "name: b\n")
    assert (out / "config.yaml").read_text() == "name: a\n"  # refused: nothing written
    records.prepare_output_dir(out, "name: b\n", force=True)
    assert (out / "config.yaml").read_text() == "name: b\n"


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError) as info:
        records.prepare_output_dir(blocker / "out", "name: a\n")
    assert str(blocker / "out") in str(info.value) and "-o" in str(info.value)
    with pytest.raises(OutputError, match="a file is in the way"):
        records.prepare_output_dir(blocker, "name: a\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_dir(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="-o"):
            records.prepare_output_dir(tmp_path / "out", "name: a\n")
    finally:
        tmp_path.chmod(0o700)


def test_write_run_and_read_back(tmp_path):
    records.prepare_output_dir(tmp_path, "name: a\n")
    run_config = {"seed": 1, "model": {"weight_scale": 0.1, "hidden_dims": [5, 5]}}
    metrics = [{"epoch": 0, "iteration": 1, "train_acc": 0.1, "val_acc": float("nan")}]
    folder = records.write_run(tmp_path, "abc", run_config, summary(1, final_train_loss=np.inf),
                               metrics)  # fmt: skip
    assert folder == tmp_path / "runs" / "abc"
    assert records.is_finished(tmp_path, "abc")
    assert not records.is_finished(tmp_path, "zzz")
    saved = strict_json((folder / "summary.json").read_text())
    assert saved["run_id"] == "abc" and saved["final_train_loss"] is None
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert [strict_json(line) for line in lines] == [{**metrics[0], "val_acc": None}]
    assert yaml.safe_load((folder / "config.yaml").read_text()) == run_config


def test_unfinished_runs_are_skipped_and_summaries_ordered(tmp_path):
    records.prepare_output_dir(tmp_path, "name: a\n")
    for rid, index in (("bbb", 2), ("aaa", 1), ("ccc", 0)):
        records.write_run(tmp_path, rid, {}, summary(index), [])
    # A run interrupted before its summary (the commit marker), and one with a torn summary.
    (tmp_path / "runs" / "ddd").mkdir()
    (tmp_path / "runs" / "ddd" / "config.yaml").write_text("seed: 1\n")
    (tmp_path / "runs" / "eee").mkdir()
    (tmp_path / "runs" / "eee" / "summary.json").write_text('{"index": ')
    assert not records.is_finished(tmp_path, "ddd")
    assert not records.is_finished(tmp_path, "eee")
    got = records.read_summaries(tmp_path)
    assert [s["run_id"] for s in got] == ["ccc", "aaa", "bbb"]
    assert [s["run_id"] for s in records.read_summaries(tmp_path, ["bbb", "ddd"])] == ["bbb"]
    assert records.read_summaries(tmp_path / "nowhere") == []


def test_results_csv(tmp_path):
    rows = [
        {"run_id": "r0", **summary(0)},
        {"run_id": "r1", **summary(1, diverged=True, status="diverged", final_train_loss=None,
                                     best_val_acc=float("nan"))},
    ]  # fmt: skip
    path = records.write_results_csv(tmp_path, rows)
    text = path.read_text()
    header = text.splitlines()[0].split(",")
    assert header[:9] == [
        "run_id",
        "batchnorm",
        "weight_scale",
        "best_train_acc",
        "best_val_acc",
        "final_train_loss",
        "diverged",
        "status",
        "seconds",
    ]
    assert header == list(records.RESULTS_COLUMNS)
    got = list(csv.DictReader(text.splitlines()))
    assert got[0]["batchnorm"] == "true" and got[0]["diverged"] == "false"
    assert got[1]["diverged"] == "true" and got[1]["status"] == "diverged"
    assert got[1]["final_train_loss"] == "" and got[1]["best_val_acc"] == ""
    # repr precision: the exact floats come back.
    assert float(got[0]["final_train_loss"]) == rows[0]["final_train_loss"]
    assert float(got[1]["weight_scale"]) == rows[1]["weight_scale"]
    assert got[0]["test_acc"] == ""
    assert "loss_history" not in got[0]
    # Rewriting with the same summaries gives the same bytes (stable order, no timestamps).
    assert records.results_csv_text(rows) == text


def test_manifest(tmp_path):
    manifest = records.collect_manifest(
        out=tmp_path,
        seed=[231],
        rng="numpy",
        data_source={"dir": str(tmp_path / "cifar10"), "checksums": {"data_batch_1.bin": "ab"}},
        command=["bnexp", "train", "-o", str(tmp_path / "o"), f"--data-dir={tmp_path}"],
        start_time="2024-01-01T00:00:00+00:00",
    )
    path = records.write_manifest(tmp_path, manifest)
    data = strict_json(path.read_text())
    for key in ("bnexp_version", "python_version", "numpy_version", "blas", "git_commit",
                "git_dirty", "seed", "data", "start_time", "end_time", "command"):  # fmt: skip
        assert key in data
    assert data["numpy_version"] == np.__version__
    assert data["seed"] == [231] and data["start_time"].startswith("2024")
    assert data["data"]["checksums"] == {"data_batch_1.bin": "ab"}
    # No absolute path of this machine in a manifest that may be committed.
    assert str(tmp_path) not in path.read_text()
    assert data["git_commit"] is None or len(data["git_commit"]) == 40
    assert isinstance(data["blas"], list)
    assert records.now_iso().endswith("+00:00")


def test_summary_with_wrong_types_is_not_finished_and_strict_reading_names_it(tmp_path):
    records.prepare_output_dir(tmp_path, "name: a\n")
    records.write_run(tmp_path, "aaa", {}, summary(0), [])
    records.write_run(tmp_path, "bbb", {}, summary(1, weight_scale="big"), [])
    assert records.is_finished(tmp_path, "aaa")
    assert not records.is_finished(tmp_path, "bbb")  # re-running retrains it
    assert [s["run_id"] for s in records.read_summaries(tmp_path)] == ["aaa"]
    with pytest.raises(OutputError, match=r"bbb.summary\.json: .*weight_scale: .*'big'"):
        records.read_summaries(tmp_path, strict=True)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"index": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"batchnorm": "yes"}', "batchnorm: expected true or false"),
        ('{"loss_history": "abc"}', "loss_history: expected a list of numbers"),
        ('{"loss_history": [1, "x"]}', "loss_history: expected a list of numbers"),
        ('{"weight_scale": -1}', "weight_scale: expected a number > 0"),
        ('{"seed": [1]}', "seed: expected an integer"),
        ('{"learning_rate": "x"}', "learning_rate: expected a number > 0"),
        ('{"hidden_dims": 5}', "hidden_dims: expected a list of integers"),
        ('{"best_val_acc": true}', "best_val_acc: expected a number"),
    ],
)
def test_strict_reading_rejects_a_corrupt_summary_with_one_line(tmp_path, text, fragment):
    records.prepare_output_dir(tmp_path, "name: a\n")
    records.write_run(tmp_path, "aaa", {}, summary(0), [])
    (tmp_path / "runs" / "bbb").mkdir()
    (tmp_path / "runs" / "bbb" / "summary.json").write_text(text)
    assert [s["run_id"] for s in records.read_summaries(tmp_path)] == ["aaa"]
    with pytest.raises(OutputError) as info:
        records.read_summaries(tmp_path, strict=True)
    message = str(info.value)
    assert "\n" not in message and fragment in message and "bbb" in message, message
    # A run folder without summary.json is unfinished (a partial result), not corrupt.
    (tmp_path / "runs" / "bbb" / "summary.json").unlink()
    assert len(records.read_summaries(tmp_path, strict=True)) == 1


# --- file modes, lock, stale temporaries, manifest normalisation, git_dirty -------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_write_gives_the_mode_open_would(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        records.atomic_write_text(tmp_path / "new.txt", "x")
        with open(tmp_path / "by_open.txt", "w") as f:  # the reference: what open() does
            f.write("x")
    finally:
        os.umask(old)
    assert (tmp_path / "new.txt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "by_open.txt").stat().st_mode & 0o777 == mode


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    path = tmp_path / "shared.csv"
    path.write_text("old")
    path.chmod(0o640)
    records.atomic_write_text(path, "new")
    assert path.read_text() == "new" and path.stat().st_mode & 0o777 == 0o640


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    records.prepare_output_dir(tmp_path, "name: a\n")
    records.write_run(tmp_path, "aaa", {}, summary(0), [])
    (tmp_path / "plots").mkdir()
    stale = [
        tmp_path / ".results.csv.k2j3h4.tmp",
        tmp_path / "runs" / "aaa" / ".summary.json.x8y9.tmp",
        tmp_path / "plots" / ".sweep.png.abc.tmp",
    ]
    kept = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / "runs" / "aaa" / "x.tmp"]
    for path in stale + kept:
        path.write_text("half")
    before = sorted(tmp_path.rglob("*"))
    assert sorted(records.clean_stale_temporaries(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.rglob("*")) == sorted(set(before) - set(stale))
    # prepare_output_dir (the start of every invocation) cleans them too.
    stale[1].write_text("half")
    records.prepare_output_dir(tmp_path, "name: a\n")
    assert not stale[1].exists()


def test_output_lock_refuses_a_second_holder_and_is_released(tmp_path):
    out = tmp_path / "out"
    with records.output_lock(out):
        info = json.loads((out / records.LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"]
        # flock is per open file: a second acquisition fails even in this process.
        with pytest.raises(OutputError) as refused, records.output_lock(out):
            pass
        message = str(refused.value)
        assert f"pid {os.getpid()}" in message and "another -o" in message and "\n" not in message
        assert (out / records.LOCK_NAME).exists()  # the refused one did not remove the lock
        (out / "results.csv").write_text("x")
    assert not (out / records.LOCK_NAME).exists()
    assert (out / "results.csv").exists()


def test_output_lock_held_by_another_process(tmp_path):
    out = tmp_path / "out"
    script = (
        "import sys, time\nfrom bnexp import records\n"
        f"with records.output_lock({str(out)!r}):\n"
        "    print('locked', flush=True)\n    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(records.__file__).parents[1])}
    holder = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        busy = f"in use by pid {holder.pid} on host"
        with pytest.raises(OutputError, match=busy), records.output_lock(out):
            pass
        holder.kill()  # SIGKILL: its lock file stays behind, but the kernel drops its flock
        holder.wait()
        assert (out / records.LOCK_NAME).exists()
        with records.output_lock(out):
            assert json.loads((out / records.LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


def test_output_lock_takes_over_a_stale_lock_file(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    (tmp_path / records.LOCK_NAME).write_text(
        json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "x"})
    )
    with records.output_lock(tmp_path):
        assert json.loads((tmp_path / records.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_output_lock_creates_out_and_removes_it_when_left_empty(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeError), records.output_lock(out):
        assert out.is_dir()
        raise RuntimeError("data error before anything was written")
    assert not (tmp_path / "a").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="a file is in the way"), records.output_lock(blocker):
        pass


def test_read_manifest_normalises_a_killed_run_and_a_bad_previous(tmp_path):
    notes = []
    assert records.read_manifest(tmp_path, notes.append) is None and notes == []
    records.write_manifest(tmp_path, {"status": "running", "previous": [{"status": "complete"}]})
    manifest = records.read_manifest(tmp_path, notes.append)
    assert manifest["status"] == "interrupted" and "killed" in manifest["status_note"]
    assert manifest["previous"] == [{"status": "complete"}]
    assert len(notes) == 1 and notes[0].startswith("note: ") and "killed" in notes[0]
    for bad in ('{"status": "complete", "previous": 5}', '{"previous": [1]}', "[1]", "{"):
        (tmp_path / "manifest.json").write_text(bad)
        notes.clear()
        assert records.read_manifest(tmp_path, notes.append) is None
        assert len(notes) == 1 and "manifest.json" in notes[0], bad
    assert records.read_manifest(tmp_path) is None  # without a note callback


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_git_dirty_describes_the_code_not_the_results(tmp_path):
    repo = tmp_path / "repo"
    for name in ("bnexp/a.py", "configs/c.yaml", "pyproject.toml", "results/r.csv", "README.md"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    package = repo / "bnexp"
    assert records._git_info(package)["dirty"] is False
    (repo / "results/r.csv").write_text("2\n")
    (repo / "results/new.csv").write_text("2\n")
    (repo / "README.md").write_text("2\n")
    assert records._git_info(package)["dirty"] is False  # results and docs are not code
    for name in ("configs/c.yaml", "pyproject.toml", "bnexp/a.py"):
        (repo / name).write_text("2\n")
        assert records._git_info(package)["dirty"] is True, name
        _git(repo, "checkout", "--", name)
    (repo / "bnexp" / "new.py").write_text("x = 1\n")  # new code not yet committed
    assert records._git_info(package)["dirty"] is True


def test_output_lock_without_flock_uses_the_pid_in_the_file(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "no locks on this file system")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock = tmp_path / records.LOCK_NAME
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "x"}))
    with pytest.raises(OutputError, match="in use by"), records.output_lock(tmp_path):
        pass  # a live pid on this host holds it
    lock.write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "since": "x"}))
    with pytest.raises(OutputError, match="on host elsewhere"), records.output_lock(tmp_path):
        pass  # another host's pid cannot be checked: not taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    lock.write_text(
        json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "since": "x"})
    )
    with records.output_lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()
