"""The executor: same results in process and in workers, progress that moves while workers
train, errors passed on, and workers that stop at once on interrupt and never outlive the parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import tqdm

from bnexp import executor
from bnexp.errors import BnexpError


@dataclass(frozen=True)
class FakeJob:
    """A job of `size` runs that takes `iterations` steps of `delay` seconds and returns a value
    computed from the data, plus the pid that ran it; writes its pid to `pidfile` at start, and
    raises at the end when `fail`."""

    run_indices: tuple[int, ...]
    iterations: int = 5
    delay: float = 0.0
    pidfile: str | None = None
    fail: bool = False

    @property
    def work(self) -> int:
        return len(self.run_indices) * self.iterations

    def run(self, data, on_progress=None):
        if self.pidfile:
            Path(self.pidfile).write_text(str(os.getpid()))
        for t in range(self.iterations):
            time.sleep(self.delay)
            if on_progress is not None:
                on_progress(t + 1)
        if self.fail:
            raise ValueError(f"job {self.run_indices} failed")
        return [(float(np.sum(data * i)), os.getpid()) for i in self.run_indices]


def alive(pid: int) -> bool:
    """True while pid is a process that is not a zombie (an unreaped dead child)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pids, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def read_pid(path: Path, seconds: float = 10.0) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return int(path.read_text())
        time.sleep(0.02)
    raise AssertionError(f"{path} never written")


DATA = np.arange(12.0).reshape(3, 4)


@pytest.mark.parametrize("n_jobs", [1, 2, 3])
def test_every_job_once_with_the_same_results_as_in_process(n_jobs):
    jobs = [FakeJob((0, 1)), FakeJob((2,)), FakeJob((3, 4, 5)), FakeJob((6,))]
    got = dict(executor.execute(jobs, DATA, n_jobs, progress=False))
    assert sorted(got) == [job.run_indices for job in jobs]
    for indices, results in got.items():
        assert [value for value, _ in results] == [66.0 * i for i in indices]  # sum(0..11) = 66
    pids = {pid for results in got.values() for _, pid in results}
    if n_jobs == 1:
        assert pids == {os.getpid()}
    else:
        assert os.getpid() not in pids and 1 <= len(pids) <= n_jobs


class RecordingBar:
    """Stands in for tqdm.tqdm: records every update with its time."""

    instances: ClassVar[list[RecordingBar]] = []

    def __init__(self, total, **kwargs):
        self.total, self.n, self.updates, self.postfix = total, 0, [], ""
        self.disable = kwargs.get("disable")
        RecordingBar.instances.append(self)

    def update(self, n):
        self.n += n
        self.updates.append((time.monotonic(), self.n))

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text

    def close(self):
        pass


def test_progress_moves_while_workers_train(monkeypatch):
    monkeypatch.setattr(tqdm, "tqdm", RecordingBar)
    RecordingBar.instances.clear()
    jobs = [
        FakeJob((0, 1), iterations=20, delay=0.05),
        FakeJob((2, 3, 4), iterations=20, delay=0.05),
    ]
    first_result = None
    for _ in executor.execute(jobs, DATA, 2, progress=True):
        first_result = first_result or time.monotonic()
    (bar,) = RecordingBar.instances
    assert bar.total == 2 * 20 + 3 * 20 and bar.n == bar.total
    assert bar.disable is None  # tqdm decides: drawn only on a terminal
    before = [n for t, n in bar.updates if t < first_result]
    assert len(before) >= 3 and 0 < before[-1] < bar.total  # moved before any group finished
    assert [n for _, n in bar.updates] == sorted(n for _, n in bar.updates)
    assert bar.postfix == "runs 5/5"


def test_an_error_in_a_worker_is_raised_in_the_parent_and_workers_stop(tmp_path):
    pidfile = tmp_path / "slow.pid"
    jobs = [
        FakeJob((0,), iterations=10, delay=0.05, fail=True),
        FakeJob((1,), iterations=600, delay=0.05, pidfile=str(pidfile)),
    ]
    with pytest.raises(ValueError, match=r"job \(0,\) failed"):
        list(executor.execute(jobs, DATA, 2, progress=False))
    assert wait_gone([read_pid(pidfile)], 3.0)


def test_stopping_early_kills_busy_workers_at_once(tmp_path):
    pidfile = tmp_path / "slow.pid"
    jobs = [FakeJob((0,)), FakeJob((1,), iterations=600, delay=0.05, pidfile=str(pidfile))]
    results = executor.execute(jobs, DATA, 2, progress=False)
    assert next(results)[0] == (0,)
    slow = read_pid(pidfile)
    assert alive(slow)
    start = time.monotonic()
    results.close()  # what Ctrl-C in the consumer's loop does to the generator
    assert time.monotonic() - start < 3.0  # not the 30 s the running group would take
    assert wait_gone([slow], 1.0)


def test_a_worker_that_dies_is_one_error_line_not_a_hang(tmp_path):
    pidfile = tmp_path / "slow.pid"
    jobs = [FakeJob((0, 1), iterations=600, delay=0.05, pidfile=str(pidfile)), FakeJob((2,))]
    results = executor.execute(jobs, DATA, 2, progress=False)
    with pytest.raises(BnexpError, match=r"worker process died \(killed by signal 9\)") as info:
        for _ in results:
            os.kill(read_pid(pidfile), signal.SIGKILL)
    assert "group of 2 runs" in str(info.value) and "\n" not in str(info.value)


PARENT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from bnexp import executor

    class Job:
        run_indices, iterations, work = (0,), 1, 1
        def __init__(self, name):
            self.name = name
        def run(self, data, on_progress):
            Path(self.name).write_text(str(os.getpid()))
            time.sleep(120)

    folder = Path(sys.argv[1])
    jobs = [Job(str(folder / "a.pid")), Job(str(folder / "b.pid"))]
    list(executor.execute(jobs, None, 2, progress=False))
    """
)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_workers_do_not_outlive_a_killed_parent(tmp_path, signum):
    env = {**os.environ, "PYTHONPATH": str(Path(executor.__file__).parents[1])}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], env=env)
    try:
        workers = [read_pid(tmp_path / "a.pid"), read_pid(tmp_path / "b.pid")]
        assert all(alive(p) for p in workers)
        parent.send_signal(signum)
        parent.wait(timeout=10)
        assert wait_gone(workers, 3.0), "workers outlived their parent"
    finally:
        parent.kill()
        parent.wait()


def _blocked_signals(pid: int) -> int:
    """The blocked-signal mask of pid (SigBlk in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigBlk line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_start_with_stop_signals_unblocked(tmp_path):
    """Workers run with SIGINT and SIGTERM unblocked (the parent holds signals across the forks
    by swapping handlers, not by a mask the workers would inherit): a worker that kept SIGTERM
    blocked could not be terminated."""
    pidfile = tmp_path / "pid"
    jobs = [FakeJob((0,), iterations=40, delay=0.05, pidfile=str(pidfile)), FakeJob((1,))]
    ran = executor.execute(jobs, DATA, 2, progress=False)
    try:
        next(ran)
        mask = _blocked_signals(read_pid(pidfile))
    finally:
        ran.close()
    assert not mask & ((1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1)))
