"""The fault suite: a small real sweep (`python -m bnexp sweep-init` on a generated CIFAR-10)
interrupted by SIGINT, SIGTERM or SIGKILL at random moments, with --jobs 1 and 2, then resumed.

After every signal: the exit code of its kind, no process of the command left, every JSON file
valid. After the resume: results.csv identical to an uninterrupted run (timing column aside),
no temporary, lock or checkpoint file left, the manifest complete and its earlier invocations
never 'running'. Groups are checkpointed at every epoch end, so the resumes start from them.
The moments are drawn from a seeded generator, printed in every failure message.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fakecifar import make_learnable_images, write_binary

from bnexp import records

ROOT = Path(records.__file__).resolve().parents[1]
SWEEP = [
    "data.num_training=400",
    "data.num_validation=100",
    "data.num_test=50",
    "data.num_train=200",
    "model.hidden_dims=[32, 32, 32]",
    "model.weight_scale={logspace: [-3, 0, 3]}",
    "seed=[1, 2]",
    "train.epochs=12",
]
RUNS = 12  # 3 weight scales x 2 seeds x (batch norm, baseline)
# Ctrl-C in a terminal reaches the whole process group; timeout, Slurm and `kill` signal the pid.
TO_GROUP = {signal.SIGINT: True, signal.SIGTERM: False, signal.SIGKILL: False}
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment of the subprocesses: this checkout's package, a private split cache."""
    root = tmp_path_factory.mktemp("faults")
    x, y, xt, yt = make_learnable_images(np.random.default_rng(3), 5 * 100, 60)
    data = write_binary(root / "cifar", x, y, xt, yt, n_batch=100)
    variables = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(root / "cache")}
    variables.pop("BNEXP_DATA_DIR", None)
    # A checkpoint at every epoch end, so signals also land while one is written or read and
    # the resumes start from them.
    variables["BNEXP_CHECKPOINT_SECONDS"] = "0"
    return {"env": variables, "data": data}


def start(env, out: Path, jobs: int) -> subprocess.Popen:
    """The sweep in its own session (its own process group, like a shell job)."""
    command = [sys.executable, "-m", "bnexp", "sweep-init", "-o", str(out), "--no-plot"]
    command += ["--data-dir", str(env["data"]), "--jobs", str(jobs), *SWEEP]
    return subprocess.Popen(
        command,
        env=env["env"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def running_in_group(pgid: int) -> list[int]:
    """Pids of live (not zombie) processes in process group pgid, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def left_in_group(pgid: int, seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (pids := running_in_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids


def results_without_timing(out: Path) -> list[dict]:
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    for row in rows:
        row.pop("seconds")
    return rows


def check_records_valid(out: Path) -> None:
    """Every JSON file parses as standard JSON; every metrics line too; results.csv parses."""
    if not out.exists():
        return
    for path in out.rglob("*.json"):
        json.loads(path.read_text())
    for path in out.rglob("metrics.jsonl"):
        for line in path.read_text().splitlines():
            json.loads(line)
    if (out / "results.csv").exists():
        results_without_timing(out)


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*") if p.name.endswith(".tmp")] if out.exists() else []


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """results.csv rows of an uninterrupted run, and how long the run took (seconds)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    begin = time.monotonic()
    process = start(env, out, jobs=1)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    return results_without_timing(out), time.monotonic() - begin


def lock_holder(out: Path) -> int | None:
    """The pid in OUT's lock file (a killed process's stale lock may still be there)."""
    try:
        return json.loads((out / records.LOCK_NAME).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def interrupt(env, out: Path, jobs: int, signum: int, delay: float) -> str:
    """Start the sweep, send signum `delay` seconds after it holds the OUT lock, and check the
    aftermath; returns a description of what happened."""
    manifest = out / "manifest.json"
    before = manifest.read_bytes() if manifest.exists() else None
    process = start(env, out, jobs)
    try:
        deadline = time.monotonic() + 60
        while lock_holder(out) != process.pid and process.poll() is None:
            assert time.monotonic() < deadline, "the sweep never took its lock"
            time.sleep(0.01)  # from here on the command handles signals
        time.sleep(delay)
        if process.poll() is None:
            (os.killpg if TO_GROUP[signum] else os.kill)(process.pid, signum)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    what = (
        f"{signal.Signals(signum).name} after {delay:.2f}s, jobs {jobs}: exit {process.returncode}"
    )
    finished = manifest.exists() and json.loads(manifest.read_text())["status"] == "complete"
    # A signal that arrives after the command's work is done (the interpreter is exiting) may
    # end the process its default way (-signum), or as Click's "Aborted!" (exit 1) for SIGINT.
    late = (-signum, 1) if finished else ()
    assert process.returncode in (0, EXIT_CODES[signum], *late), f"{what}\n{err}"
    assert "Traceback" not in err, f"{what}\n{err}"
    assert not left_in_group(process.pid), f"{what}: processes left behind"
    check_records_valid(out)
    if signum != signal.SIGKILL:
        assert not temporaries(out), f"{what}: {temporaries(out)}"
        assert not (out / records.LOCK_NAME).exists(), f"{what}: lock file left"
    if process.returncode == EXIT_CODES[signum] and signum != signal.SIGKILL:
        # Unless the signal came before this invocation wrote its manifest (while loading data).
        if manifest.exists() and manifest.read_bytes() != before:
            status = json.loads(manifest.read_text())["status"]
            # A signal after the last record (while the workers stop or the manifest is
            # written) leaves nothing to resume: then the experiment is complete.
            done = len(list(out.glob("runs/*/summary.json"))) == RUNS
            expected = "complete" if done else "interrupted"
            assert status == expected, f"{what}: manifest status {status}"
        assert "interrupted: finished runs are kept" in err, f"{what}\n{err}"
    return what


def resume_and_compare(env, out: Path, jobs: int, expected: list[dict], history: list[str]):
    process = start(env, out, jobs)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, f"{history}: resume failed\n{err}"
    assert results_without_timing(out) == expected, f"{history}: results differ"
    assert not temporaries(out), f"{history}: {temporaries(out)} left"
    assert not (out / records.LOCK_NAME).exists(), f"{history}: lock file left"
    assert not (out / "checkpoints").exists(), f"{history}: checkpoints left"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete", f"{history}: status {manifest['status']}"
    earlier = [p["status"] for p in manifest.get("previous", [])]  # none if all died early
    assert set(earlier) <= {"interrupted", "complete"}, f"{history}: earlier {earlier}"


# 4 chains x 3 signals = 12 interruptions, each chain resumed at the end; a chain's signals fall
# on a fresh run and then on its resumes, so kills also land in resumed invocations.
CHAINS = [
    (1, [signal.SIGINT, signal.SIGKILL, signal.SIGTERM]),
    (1, [signal.SIGKILL, signal.SIGTERM, signal.SIGINT]),
    (2, [signal.SIGTERM, signal.SIGINT, signal.SIGKILL]),
    (2, [signal.SIGKILL, signal.SIGKILL, signal.SIGTERM]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("chain", "jobs", "signals"), [(i, *c) for i, c in enumerate(CHAINS)])
def test_random_signals_then_resume_give_the_uninterrupted_results(
    env, reference, tmp_path, chain, jobs, signals
):
    expected, seconds = reference
    rng = random.Random(1000 + chain)
    out = tmp_path / "out"
    history = []
    for signum in signals:
        # Up to the length of a whole uninterrupted run: some signals land in data loading or
        # the final writes, some after a resumed invocation has already finished.
        delay = rng.uniform(0.0, 0.8 * seconds)
        history.append(interrupt(env, out, jobs, signum, delay))
    resume_and_compare(env, out, jobs, expected, history)


@pytest.mark.slow
def test_resume_after_a_partly_recorded_group_gives_the_uninterrupted_results(env, tmp_path):
    """A kill while a group's records are being written leaves some of its runs finished and
    some not; the resume must still give the uninterrupted numbers. With one seed the networks
    of a group share their minibatches, and the first layer of the group is one wide product."""
    one_seed = [arg for arg in SWEEP if not arg.startswith("seed=")]
    full, partial = tmp_path / "full", tmp_path / "partial"
    command = ["sweep-init", "--no-plot", "--data-dir", str(env["data"]), "--jobs", "1", *one_seed]
    for out in (full, partial):
        done = subprocess.run(
            [sys.executable, "-m", "bnexp", *command, "-o", str(out)],
            env=env["env"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
    batchnorm = [
        p.parent
        for p in partial.glob("runs/*/summary.json")
        if '"batchnorm": true' in p.read_text()
    ]
    assert len(batchnorm) == 3
    for folder in batchnorm[:2]:  # as if killed after the group's first record
        (folder / "summary.json").unlink()
    done = subprocess.run(
        [sys.executable, "-m", "bnexp", *command, "-o", str(partial)],
        env=env["env"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "2 runs trained" in done.stdout
    assert results_without_timing(partial) == results_without_timing(full)


def test_signals_held_during_the_closing_writes_act_after_them():
    """A Ctrl-C while the manifest is written (or while workers are forked) is acted on once it
    is written, not midway."""
    from bnexp.executor import signals_held

    done = []
    with pytest.raises(KeyboardInterrupt), signals_held():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # a handler would have run by now
        done.append("written")
    assert done == ["written"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
