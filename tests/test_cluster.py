"""Sweeps on a Dask cluster (bnexp.cluster) against the in-process executor, on a real Dask
scheduler and real workers started as separate processes on 127.0.0.1: identical results, a
worker killed mid-run, a scheduler stopped mid-run, Ctrl-C. Skipped when Dask is not installed
(the 'dask' extra), except the checks that need no Dask."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fakecifar import learnable_splits

from bnexp import cluster, executor, sweep
from bnexp.config import expand_runs, load_config
from bnexp.errors import ClusterError, ConfigError

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.weight_scale=[1.0e-3, 5.0e-2, 1.0]", "train.batch_size=20", "data.num_train=100"]
#: Epochs of the test groups: about a second of training per group, long enough to kill mid-task.
EPOCHS = 40
HAS_DASK = importlib.util.find_spec("distributed") is not None
needs_dask = pytest.mark.skipif(not HAS_DASK, reason="Dask is not installed (the 'dask' extra)")


# --- jobs and data, built with bnexp.sweep's own functions ----------------------------------


@pytest.fixture(scope="module")
def data():
    return learnable_splits()


def group_jobs(epochs: int, widths=((16, 16), (24, 16))) -> list:
    """The lockstep groups of small sweeps (BN and baseline per width: two groups each), as
    run_experiment builds them; run indices are numbered on across the sweeps."""
    jobs, offset = [], 0
    for hidden in widths:
        cfg = load_config(
            None, [*SMALL, f"model.hidden_dims={list(hidden)}", f"train.epochs={epochs}"]
        )
        runs = expand_runs(cfg)
        for job in sweep._group_jobs(runs, range(len(runs))):
            indices = tuple(i + offset for i in job.run_indices)
            jobs.append(dataclasses.replace(job, run_indices=indices))
        offset += len(runs)
    return jobs


_REFERENCES: dict = {}


def reference(jobs, data, epochs: int) -> dict:
    """run_indices -> results of executor.execute(..., n_jobs=1), the in-process path (computed
    once per `epochs` for the jobs of `group_jobs(epochs)`)."""
    if epochs not in _REFERENCES:
        _REFERENCES[epochs] = dict(executor.execute(jobs, data, 1, False))
    return _REFERENCES[epochs]


def assert_same_results(got: list, want: list) -> None:
    """Every field of every RunResult equal (NaN equal to NaN), wall time aside."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        fields_a = {k: v for k, v in vars(a).items() if k != "seconds"}
        fields_b = {k: v for k, v in vars(b).items() if k != "seconds"}
        assert fields_a.keys() == fields_b.keys()
        for key, value in fields_a.items():
            np.testing.assert_array_equal(value, fields_b[key], err_msg=key)


# --- real Dask processes on 127.0.0.1 -------------------------------------------------------


class DaskProcesses:
    """A `dask scheduler` and `dask worker --nthreads 1` processes, plus an observing client."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.observer = None
        self.address = ""

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [sys.executable, "-m", "dask", *args], env=self.env, stdout=log, stderr=log, cwd=ROOT
        )
        log.close()
        self.procs[name] = proc
        return proc

    def start(self, workers: int) -> str:
        """Start the scheduler on a free port and `workers` workers; the scheduler address."""
        from distributed import Client

        info = self.folder / "scheduler.json"
        self._start(
            "scheduler",
            ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(info)],
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not info.exists() or not info.read_text().strip():
            assert time.monotonic() < deadline, (self.folder / "scheduler.log").read_text()
            time.sleep(0.1)
        self.address = json.loads(info.read_text())["address"]
        for n in range(workers):
            self.add_worker(f"w{n}")
        self.observer = Client(self.address, timeout=30)
        self.observer.wait_for_workers(workers, timeout=120)
        return self.address

    def add_worker(self, name: str) -> subprocess.Popen:
        """Start one more single-threaded worker called `name`."""
        # --no-nanny: SIGKILL then ends the worker itself, as the kernel's OOM killer would (a
        # nanny would restart it, and killing the nanny would orphan its worker).
        return self._start(
            name,
            ["worker", self.address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
             "--name", name, "--host", "127.0.0.1"],
        )  # fmt: skip

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> its process id."""
        return self.observer.run(os.getpid)

    def bnexp_tasks(self) -> list[str]:
        """Keys of bnexp group tasks the scheduler still holds."""
        return self.observer.run_on_scheduler(
            lambda dask_scheduler: [
                str(k) for k in dask_scheduler.tasks if str(k).startswith("bnexp-group")
            ]
        )

    def stop(self) -> None:
        if self.observer is not None:
            cluster._shut_down(self.observer, None, {})
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def dask_procs(tmp_path, request):
    """A factory of real Dask processes for one test; every process is killed at its end."""
    procs = DaskProcesses(tmp_path)
    request.addfinalizer(procs.stop)
    return procs


def wait_until(condition, what: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# --- without Dask, bad scheduler values -----------------------------------------------------


def test_without_dask_one_line_says_how_to_install(monkeypatch, data):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(ClusterError) as err:
        list(cluster.execute_on_dask(group_jobs(1), data, "local:1", False))
    assert "pip install -e '.[dask]'" in str(err.value) and "\n" not in str(err.value)
    assert err.value.exit_code == 5


@pytest.mark.parametrize("value", ["local:0", "local:", "local:two", "local", "local:-1"])
def test_malformed_local_scheduler_is_a_config_error(value):
    with pytest.raises(ConfigError, match="local:N"):
        cluster.local_workers(value)
    assert cluster.local_workers("local:3") == 3
    assert cluster.local_workers("tcp://127.0.0.1:8786") is None
    assert cluster.local_workers("localhost:8786") is None


@needs_dask
@pytest.mark.parametrize("value", ["nonsense://127.0.0.1:1", "tcp://", "tcp://a b:1", ""])
def test_malformed_scheduler_address_is_a_config_error(value, data):
    with pytest.raises(ConfigError, match="--scheduler") as err:
        list(cluster.execute_on_dask(group_jobs(1), data, value, False))
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


@needs_dask
@pytest.mark.slow
def test_unreachable_scheduler_is_one_cluster_error_line(monkeypatch, data, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(cluster, "CONNECT_SECONDS", 2)
    with pytest.raises(ClusterError, match=f"cannot reach the Dask scheduler at .*:{port}") as err:
        list(cluster.execute_on_dask(group_jobs(1), data, f"tcp://127.0.0.1:{port}", False))
    assert "\n" not in str(err.value)


# --- placement hints (no Dask) ----------------------------------------------------------------


def makespan(works, hints, workers) -> float:
    """The largest work per thread any worker is given."""
    load = dict.fromkeys(workers, 0.0)
    for work, hint in zip(works, hints, strict=True):
        load[hint] += work
    return max(load[w] / workers[w] for w in workers)


def test_placement_starts_a_group_on_every_worker_and_is_near_the_best_split():
    rng = np.random.default_rng(7)
    for n_groups, n_workers in [(2, 2), (4, 2), (3, 3), (5, 2), (6, 3), (7, 3), (2, 3)]:
        workers = {f"tcp://127.0.0.1:{9000 + w}": 1 for w in range(n_workers)}
        works = rng.integers(1, 50, n_groups).tolist()
        hints = cluster._placement(works, workers)
        assert set(hints) <= set(workers)
        assert len(set(hints)) == min(n_groups, n_workers)  # every worker starts a group
        # Independent reference: the best split over every assignment of groups to workers.
        best = min(
            makespan(works, [list(workers)[i] for i in split], workers)
            for split in np.ndindex(*[n_workers] * n_groups)
        )
        # Longest processing time first is within 4/3 - 1/(3m) of the best (Graham, 1969).
        assert makespan(works, hints, workers) <= (4 / 3 - 1 / (3 * n_workers)) * best + 1e-9


def test_placement_counts_threads_and_needs_a_worker():
    two_threads, one_thread = "tcp://10.0.0.1:1", "tcp://10.0.0.2:1"
    hints = cluster._placement([4, 4, 4, 4], {one_thread: 1, two_threads: 2})
    # 3 groups on two threads and 1 on one: 6 per thread at most, where 2 and 2 would be 8.
    assert sorted(hints) == sorted([two_threads] * 3 + [one_thread])
    assert cluster._placement([4, 4], {}) == [None, None]  # no worker known: Dask decides


# --- real scheduler and workers ---------------------------------------------------------------


@needs_dask
@pytest.mark.slow
def test_two_workers_give_the_results_of_jobs_1_and_stream_them(dask_procs, data):
    address = dask_procs.start(workers=2)
    jobs = group_jobs(epochs=EPOCHS)
    want = reference(jobs, data, EPOCHS)
    outcomes = []
    unfinished_at_first = None
    for outcome in cluster.run_on_dask(jobs, data, address, False):
        if not outcomes:  # streamed: the first group arrives while others still train
            unfinished_at_first = len(dask_procs.bnexp_tasks())
        outcomes.append(outcome)
    assert unfinished_at_first >= 2  # the finished group's own task is still held too
    assert sorted(o.run_indices for o in outcomes) == sorted(want)
    workers = dask_procs.worker_pids()
    for o in outcomes:
        assert_same_results(o.results, want[o.run_indices])
        assert o.worker["address"] in workers and o.worker["name"] in {"w0", "w1"}
        assert o.worker["blas"] == "" or "1 thread" in o.worker["blas"]
    assert {o.worker["address"] for o in outcomes} == set(workers)  # both did work
    # The seam's own contract: (run_indices, results) pairs, as executor.execute yields.
    pairs = dict(cluster.execute_on_dask(jobs[:2], data, address, False))
    assert set(pairs) == {jobs[0].run_indices, jobs[1].run_indices}
    for key, results in pairs.items():
        assert_same_results(results, want[key])
    wait_until(lambda: not dask_procs.bnexp_tasks(), "the tasks to be released")


@needs_dask
@pytest.mark.slow
def test_every_worker_trains_groups_when_the_data_sit_on_one(dask_procs, data, monkeypatch):
    # What could leave a worker idle, forced: Dask's memory manager drops the second copy of the
    # scattered data before the groups arrive (no task waits for it yet), Dask puts a task where
    # its data are, and work stealing is off here so it cannot move a group afterwards. The
    # placement hints alone must still start groups on both workers.
    dask_procs.env["DASK_DISTRIBUTED__SCHEDULER__WORK_STEALING"] = "False"
    address = dask_procs.start(workers=2)
    jobs = group_jobs(epochs=EPOCHS)
    want = reference(jobs, data, EPOCHS)
    scatter, holders = cluster._wait_and_scatter, []

    def scatter_then_drop_a_copy(client, scheduler, data, workers=1):
        shared = scatter(client, scheduler, data, workers)
        count = lambda dask_scheduler: len(dask_scheduler.tasks[shared.key].who_has)  # noqa: E731
        holders.append(dask_procs.observer.run_on_scheduler(count))
        dask_procs.observer.amm.run_once()  # what its 2-second cycle may do at this moment
        wait_until(lambda: dask_procs.observer.run_on_scheduler(count) == 1, "a copy dropped")
        return shared

    monkeypatch.setattr(cluster, "_wait_and_scatter", scatter_then_drop_a_copy)
    outcomes = list(cluster.run_on_dask(jobs, data, address, False))
    assert holders == [2]  # scattered to both, then one copy dropped
    assert sorted(o.run_indices for o in outcomes) == sorted(want)
    for o in outcomes:
        assert_same_results(o.results, want[o.run_indices])
    assert {o.worker["address"] for o in outcomes} == set(dask_procs.worker_pids())
    steals = dask_procs.observer.run_on_scheduler(
        lambda dask_scheduler: list(dask_scheduler.get_events("stealing"))
    )
    assert steals == []  # placed, not rescued


@needs_dask
@pytest.mark.slow
def test_a_worker_without_the_jobs_code_is_one_cluster_error_line(dask_procs, data, tmp_path):
    address = dask_procs.start(workers=1)
    # A job class only this process can import: the scheduler and worker cannot unpickle it.
    (tmp_path / "client_only_jobs.py").write_text(
        "from bnexp.sweep import _GroupJob\n\nclass ClientOnlyJob(_GroupJob):\n    pass\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        from client_only_jobs import ClientOnlyJob

        job = ClientOnlyJob(**vars(group_jobs(epochs=1)[0]))
        with pytest.raises(ClusterError, match="cannot load the group") as err:
            list(cluster.execute_on_dask([job], data, address, False))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("client_only_jobs", None)
    assert "\n" not in str(err.value)


@needs_dask
@pytest.mark.slow
def test_a_worker_killed_mid_task_costs_a_redo_not_a_difference(dask_procs, data):
    address = dask_procs.start(workers=2)
    jobs = group_jobs(epochs=EPOCHS)
    want = reference(jobs, data, EPOCHS)
    pids = dask_procs.worker_pids()
    killed = {}

    def kill_a_busy_worker():
        def busy():
            processing = dask_procs.observer.processing()
            return [w for w, keys in processing.items() if keys]

        wait_until(busy, "a worker to start a group")
        time.sleep(0.3)  # inside the group's training, not its start
        victim = busy()[0]
        killed["tasks"] = dask_procs.observer.processing()[victim]
        killed["address"] = victim
        os.kill(pids[victim], signal.SIGKILL)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    outcomes = list(cluster.run_on_dask(jobs, data, address, False))
    killer.join()
    assert killed, "no worker was killed"
    assert sorted(o.run_indices for o in outcomes) == sorted(want)
    for o in outcomes:
        assert_same_results(o.results, want[o.run_indices])
    # Every group that was on the killed worker was redone by the survivor.
    survivor = next(a for a in pids if a != killed["address"])
    by_indices = {o.run_indices: o.worker["address"] for o in outcomes}
    for key in killed["tasks"]:
        job = jobs[int(str(key).split("-")[2])]  # keys are bnexp-group-<job number>-<token>
        assert by_indices[job.run_indices] == survivor
    assert any(p.poll() == -signal.SIGKILL for p in dask_procs.procs.values())


@needs_dask
@pytest.mark.slow
def test_data_lost_with_the_only_worker_are_scattered_again(dask_procs, data):
    # One worker holds the only copy of the data; it dies mid-task, a new worker joins: the
    # groups come back cancelled ("lost dependencies") and must be trained there from a new copy.
    address = dask_procs.start(workers=1)
    jobs = group_jobs(epochs=EPOCHS)
    want = reference(jobs, data, EPOCHS)
    first = dask_procs.procs["w0"]
    events = {}

    def kill_then_replace():
        wait_until(lambda: any(dask_procs.observer.processing().values()), "a group to start")
        time.sleep(0.3)
        first.kill()
        first.wait(timeout=30)
        events["replacement"] = dask_procs.add_worker("w1")

    swapper = threading.Thread(target=kill_then_replace)
    swapper.start()
    outcomes = list(cluster.run_on_dask(jobs, data, address, False))
    swapper.join()
    assert "replacement" in events
    assert sorted(o.run_indices for o in outcomes) == sorted(want)
    for o in outcomes:
        assert_same_results(o.results, want[o.run_indices])
    assert {o.worker["name"] for o in outcomes} <= {"w0", "w1"}
    assert any(o.worker["name"] == "w1" for o in outcomes)


@needs_dask
@pytest.mark.slow
def test_a_group_the_scheduler_drops_is_submitted_again(dask_procs, data):
    # Dask reports a result lost with its worker before the client fetched it as "cancelled";
    # a forced cancel from another client takes the same path, on purpose and every time.
    from distributed import Future

    address = dask_procs.start(workers=1)
    jobs = group_jobs(epochs=EPOCHS)
    want = reference(jobs, data, EPOCHS)
    dropped = {}

    def drop_a_running_group():
        def running():
            return [k for keys in dask_procs.observer.processing().values() for k in keys]

        wait_until(running, "a group to start")
        dropped["key"] = str(running()[0])
        dask_procs.observer.cancel([Future(dropped["key"], dask_procs.observer)], force=True)
        again = dropped["key"][:-1] + "1"  # keys end in the attempt number
        wait_until(lambda: again in dask_procs.bnexp_tasks(), "the group to be submitted again")
        dropped["again"] = again

    dropper = threading.Thread(target=drop_a_running_group)
    dropper.start()
    outcomes = list(cluster.run_on_dask(jobs, data, address, False))
    dropper.join()
    assert dropped.get("again"), dropped
    assert sorted(o.run_indices for o in outcomes) == sorted(want)
    for o in outcomes:
        assert_same_results(o.results, want[o.run_indices])


@needs_dask
@pytest.mark.slow
def test_a_stopped_scheduler_raises_cluster_error_and_keeps_finished_groups(dask_procs, data):
    address = dask_procs.start(workers=1)
    jobs = group_jobs(epochs=EPOCHS)
    want = reference(jobs, data, EPOCHS)
    kept, started = [], None
    stream = cluster.run_on_dask(jobs, data, address, False)
    with pytest.raises(ClusterError) as err:
        for outcome in stream:
            kept.append(outcome)
            if len(kept) == 1:
                scheduler = dask_procs.procs["scheduler"]
                scheduler.send_signal(signal.SIGTERM)
                scheduler.wait(timeout=30)
                started = time.monotonic()
    assert time.monotonic() - started < 20
    message = str(err.value)
    assert "\n" not in message and address in message and err.value.exit_code == 5
    assert 1 <= len(kept) < len(jobs)
    for o in kept:
        assert_same_results(o.results, want[o.run_indices])


def interrupt_after(seconds: float) -> threading.Timer:
    """A real SIGINT to this process (Ctrl-C) from another thread after `seconds`."""
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    return timer


@needs_dask
@pytest.mark.slow
def test_ctrl_c_cancels_the_remaining_groups_and_closes_the_client(dask_procs, data):
    address = dask_procs.start(workers=1)
    jobs = group_jobs(epochs=EPOCHS)
    count_clients = lambda dask_scheduler: len(dask_scheduler.clients)  # noqa: E731
    clients_before = dask_procs.observer.run_on_scheduler(count_clients)
    got = []
    with pytest.raises(KeyboardInterrupt):
        for outcome in cluster.execute_on_dask(jobs, data, address, False):
            got.append(outcome)
            if len(got) == 1:  # Ctrl-C while waiting for the second group
                timer = interrupt_after(0.5)
    timer.join()
    assert 1 <= len(got) < len(jobs)
    wait_until(lambda: not dask_procs.bnexp_tasks(), "the remaining groups to be cancelled")
    assert dask_procs.observer.run_on_scheduler(count_clients) == clients_before


@needs_dask
@pytest.mark.slow
def test_local_cluster_gives_the_same_results_and_closes_when_the_caller_stops(data):
    import psutil

    jobs = group_jobs(epochs=EPOCHS)
    want = reference(jobs, data, EPOCHS)
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    during = {}  # process -> command line, read while it runs
    stream = cluster.run_on_dask(jobs, data, "local:2", False)
    with pytest.raises(KeyboardInterrupt):
        for n, outcome in enumerate(stream, start=1):
            assert_same_results(outcome.results, want[outcome.run_indices])
            for proc in me.children(recursive=True):
                if proc.pid not in before and proc not in during:
                    during[proc] = " ".join(proc.cmdline())
            if n == 2:  # Ctrl-C while the caller records the second group
                raise KeyboardInterrupt
    stream.close()  # what a caller does (contextlib.closing) to clean up at once
    # Multiprocessing's resource tracker outlives any pool by design; the workers must not.
    workers = [p for p, cmd in during.items() if "resource_tracker" not in cmd]
    assert len(workers) >= 2
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


@needs_dask
@pytest.mark.slow
def test_cli_scheduler_gives_the_results_of_jobs_1_and_names_the_workers(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from fakecifar import make_learnable_images, write_binary

    from bnexp.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    x, y, xt, yt = make_learnable_images(np.random.default_rng(1), 5 * 100, 60)
    cifar = write_binary(tmp_path / "cifar", x, y, xt, yt, n_batch=100)
    small = [
        "data.num_training=400", "data.num_validation=100", "data.num_test=50",
        "data.num_train=200", "model.hidden_dims=[16, 16]", "train.epochs=2",
        "model.weight_scale=[1.0e-2, 1.0e-1]",
    ]  # fmt: skip
    common = ["--data-dir", str(cifar), "--no-plot", *small]
    one = CliRunner().invoke(main, ["sweep-init", "-o", str(tmp_path / "one"), "-j", "1", *common])
    assert one.exit_code == 0, one.output
    out = tmp_path / "dask"
    args = ["sweep-init", "-o", str(out), "--scheduler", "local:2", *common]
    two = CliRunner().invoke(main, args)
    assert two.exit_code == 0, two.output

    def rows(folder):
        lines = (folder / "results.csv").read_text().splitlines()
        seconds = lines[0].split(",").index("seconds")
        return [[c for i, c in enumerate(line.split(",")) if i != seconds] for line in lines]

    assert rows(out) == rows(tmp_path / "one")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scheduler"] == "local:2"
    recorded = sorted(r for g in manifest["group_workers"] for r in g["runs"])
    assert recorded == sorted(p.name for p in (out / "runs").iterdir())
    assert all(g["worker"]["address"] for g in manifest["group_workers"])
    # Two groups (with and without batch norm), and local:2 waits for both of its workers.
    assert len({g["worker"]["address"] for g in manifest["group_workers"]}) == 2


def test_cli_scheduler_without_dask_is_one_line_exit_5(tmp_path, monkeypatch):
    from click.testing import CliRunner
    from fakecifar import make_learnable_images, write_binary

    from bnexp.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed fails
    x, y, xt, yt = make_learnable_images(np.random.default_rng(1), 5 * 100, 60)
    cifar = write_binary(tmp_path / "cifar", x, y, xt, yt, n_batch=100)
    args = [
        "train", "-o", str(tmp_path / "out"), "--data-dir", str(cifar), "--scheduler", "local:2",
        "data.num_training=400", "data.num_validation=100", "data.num_test=50",
        "data.num_train=200", "model.hidden_dims=[16]", "train.epochs=1",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 5, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "pip install" in errors[0] and "Traceback" not in result.output
