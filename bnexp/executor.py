"""How lockstep groups are executed: in this process, or in worker processes that each train
whole groups with one BLAS thread. One interface: hand over the jobs, get each job's results back
as it finishes. Records, resume and interruption never depend on which executor ran a group.

Workers are plain processes, each with its own pipe to the parent (jobs out; progress, results
and errors back), rather than a ProcessPoolExecutor, because the parent must be able to:

- stop them at once on Ctrl-C or SIGTERM (a pool waits for a running 20-network group);
- see a worker that died (its pipe reads end-of-file) instead of waiting forever;
- read their progress while they train, so the bar moves with --jobs 2.

A worker never outlives its parent: it asks Linux for SIGKILL when the parent dies
(PR_SET_PDEATHSIG), and a watcher thread checks os.getppid() where that is unavailable.

The data is held once. Workers are forked after the parent has loaded it, so they read the
parent's pages of the features (copy-on-write pages that nobody writes: `bnexp.data` makes the
features read-only, and a float32 experiment loads them as float32, so training casts nothing).
The 49,000-image split is 0.6 GB however many workers read it, and there is no file or shared
memory segment that a killed parent could leave behind. Where fork is unavailable each worker
gets a pickled copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from threadpoolctl import threadpool_limits

from bnexp.errors import BnexpError

#: Seconds between two progress messages of a worker (the bar needs no more; fewer is cheaper).
PROGRESS_PERIOD = 0.2
#: Seconds between two checks of a worker that its parent is still alive (fallback to prctl).
PARENT_CHECK_PERIOD = 0.5
#: Seconds a finished worker gets to exit on its own before it is terminated.
EXIT_GRACE = 5.0

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


# --- the worker side --------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker end when its parent does, however the parent ends (even SIGKILL)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_PERIOD)
        os._exit(1)

    threading.Thread(target=watch, name="bnexp-parent-watch", daemon=True).start()


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM until the block ends, then act on them as usual (the Python
    handlers run in the main thread whichever thread the kernel picks, so they are swapped,
    not masked). In another thread signals are not ours to handle: nothing is held.

    For steps that must not be unwound halfway, and around forks: a signal arriving during
    os.fork() would run the handler inside the after-fork callbacks (logging's lock release),
    where its exception is printed as "ignored" and the signal is lost. A child forked inside
    the block starts with the holding handlers and sets its own."""
    held: list[int] = []
    kinds = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {kind: signal.signal(kind, lambda n, _: held.append(n)) for kind in kinds}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for kind, handler in previous.items():
            signal.signal(kind, handler if handler is not None else signal.SIG_DFL)
        for kind in held[:1]:
            signal.raise_signal(kind)


def block_stop_signals():
    """Block SIGINT and SIGTERM in this thread around a fork; returns the mask to restore in
    the parent. The child starts with them blocked, so that one arriving before its own handlers
    are set waits for them (the parent's handler would unwind the parent's code in the child);
    it calls `unblock_stop_signals`. The mask is per thread: use it with `signals_held`.
    """
    if hasattr(signal, "pthread_sigmask"):
        return signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    return None


def restore_signals(previous) -> None:
    """Undo `block_stop_signals` (a pending signal is handled right after)."""
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def unblock_stop_signals() -> None:
    """In a forked child, once its own handlers are set: let SIGINT and SIGTERM in."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def _init_worker(parent_pid: int) -> None:
    """Worker set-up: die with the parent, leave Ctrl-C and SIGTERM to it, one BLAS thread."""
    _die_with_parent(parent_pid)
    # Ctrl-C reaches the whole foreground process group: the parent handles it and stops the
    # workers, which would otherwise each print a traceback. The CLI's SIGTERM handler is
    # inherited under fork; a worker must simply die on SIGTERM, which is how it is stopped.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # One BLAS thread: N workers use N cores, and OpenBLAS float32 GEMM gives other bits with
    # more threads.
    threadpool_limits(limits=1, user_api="blas")


class _Reporter:
    """on_progress of a job in a worker: sends (progress, key, iterations) at most every
    PROGRESS_PERIOD seconds. It only reads the count, so results never depend on it."""

    def __init__(self, conn: Connection, key: int):
        self.conn, self.key, self.last = conn, key, 0.0

    def __call__(self, iterations: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_PERIOD:
            self.last = now
            self.conn.send(("progress", self.key, iterations))


def _worker_main(conn: Connection, data, parent_pid: int) -> None:
    """A worker's loop: receive (key, job), run it, send (done, key, results) or (error, ...);
    None or a closed pipe ends it."""
    _init_worker(parent_pid)
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        key, job = message
        try:
            results = job.run(data, _Reporter(conn, key))
        except Exception as exc:
            conn.send(("error", key, _picklable(exc)))
        else:
            conn.send(("done", key, results))


def _picklable(exc: Exception) -> Exception:
    """exc itself if it survives pickling (the parent re-raises it), else a RuntimeError."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


# --- the parent side --------------------------------------------------------------------------


@dataclass
class _Worker:
    """A worker process, the parent's end of its pipe, and the key of the job it runs."""

    process: multiprocessing.process.BaseProcess
    conn: Connection
    key: int | None = None


def _start_worker(context, data) -> _Worker:
    """Start one worker; under fork it inherits `data` without pickling it. Call it with the
    stop signals held (`signals_held`)."""
    parent_end, child_end = context.Pipe()
    process = context.Process(
        target=_worker_main, args=(child_end, data, os.getpid()), name="bnexp-worker", daemon=True
    )
    process.start()
    # The parent's copy of the child's end must go, or a dead worker's pipe never reads EOF.
    child_end.close()
    return _Worker(process, parent_end)


def _receive(worker: _Worker, jobs: Sequence) -> tuple:
    """The next message of a worker; a worker that died is one BnexpError line."""
    try:
        return worker.conn.recv()
    except (EOFError, OSError):
        worker.process.join(timeout=1.0)
        code = worker.process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit {code}"
        runs = len(jobs[worker.key].run_indices) if worker.key is not None else 0
        raise BnexpError(
            f"a worker process died ({how}) while training a group of {runs} runs; finished "
            "runs are kept; if memory ran out use fewer --jobs, then run the command again"
        ) from None


def _stop_workers(workers: Sequence[_Worker], at_once: bool) -> None:
    """End every worker: idle ones are asked to exit, busy ones (at_once) are terminated."""
    for worker in workers:
        if at_once and worker.process.is_alive():
            worker.process.terminate()  # SIGTERM; the worker's handler is the default: it dies
        else:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
    deadline = time.monotonic() + (1.0 if at_once else EXIT_GRACE)
    for worker in workers:
        worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()


def _context():
    """fork where available: workers start in milliseconds and share the data unpickled."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else None)


def _run_in_workers(jobs: Sequence, data, n_jobs: int, progress: _Progress):
    """Run the jobs in min(n_jobs, len(jobs)) workers; yield (run_indices, results) as each
    finishes. On any exception, or when the consumer stops early, the workers are killed."""
    todo = deque(range(len(jobs)))
    workers: list[_Worker] = []
    finished = False
    try:
        context = _context()
        # The workers start with the parent's objects (its modules above all) out of the
        # collector's reach: a collection in a worker would otherwise write to each one's header
        # and so copy every page it shares with the parent.
        # The parent takes its own back once the workers are forked.
        gc.freeze()
        # Held until every worker is in `workers`: a signal then stops them all below.
        try:
            with signals_held():
                for _ in range(min(n_jobs, len(jobs))):
                    workers.append(_start_worker(context, data))
        finally:
            gc.unfreeze()
        for worker in workers:
            _give_job(worker, jobs, todo)
        while busy := [w for w in workers if w.key is not None]:
            for conn in wait([w.conn for w in busy]):
                worker = next(w for w in busy if w.conn is conn)
                kind, key, payload = _receive(worker, jobs)
                if kind == "progress":
                    progress.advance(key, payload)
                    continue
                if kind == "error":
                    raise payload
                worker.key = None
                progress.finish(key)
                # The next group starts before the parent writes this one's records.
                _give_job(worker, jobs, todo)
                yield jobs[key].run_indices, payload
        finished = True
    finally:
        _stop_workers(workers, at_once=not finished)


def _give_job(worker: _Worker, jobs: Sequence, todo: deque) -> None:
    """Send the next job to an idle worker, if one is left."""
    if todo:
        worker.key = todo.popleft()
        worker.conn.send((worker.key, jobs[worker.key]))


def _run_here(jobs: Sequence, data, progress: _Progress):
    """Run the jobs one after another in this process, with one BLAS thread."""
    # One BLAS thread here too: OpenBLAS's multi-threaded sgemm splits the sums differently,
    # so 2 threads would give other float32 bits than a worker's 1.
    with threadpool_limits(limits=1, user_api="blas"):
        for key, job in enumerate(jobs):
            results = job.run(data, lambda iterations, key=key: progress.advance(key, iterations))
            progress.finish(key)
            yield job.run_indices, results


class _Progress:
    """The bar on stderr: network-iterations done (with rate and ETA) and runs finished; drawn
    only when stderr is a terminal (tqdm disable=None)."""

    def __init__(self, jobs: Sequence, enabled: bool):
        from tqdm import tqdm

        self.jobs = jobs
        self.done = [0] * len(jobs)  # iterations reported per job
        self.runs_done = 0
        self.runs_total = sum(len(job.run_indices) for job in jobs)
        self.bar = tqdm(
            total=sum(job.work for job in jobs),
            unit="net-it",
            desc="training",
            disable=None if enabled else True,
            file=sys.stderr,
            smoothing=0.1,
        )
        self.bar.set_postfix_str(self._runs(), refresh=False)

    def _runs(self) -> str:
        return f"runs {self.runs_done}/{self.runs_total}"

    def advance(self, key: int, iterations: int) -> None:
        """Job `key` has done `iterations` solver iterations (of each of its networks)."""
        job = self.jobs[key]
        step = max(0, iterations - self.done[key])
        self.done[key] += step
        self.bar.update(step * (job.work // max(job.iterations, 1)))

    def finish(self, key: int) -> None:
        """Job `key` has finished: count the rest of its iterations and its runs."""
        self.advance(key, self.jobs[key].iterations)
        self.runs_done += len(self.jobs[key].run_indices)
        self.bar.set_postfix_str(self._runs())

    def close(self) -> None:
        self.bar.close()


def execute(
    jobs: Sequence,
    data,
    n_jobs: int,
    progress: bool,
    *,
    scheduler: str | None = None,
    workers: list | None = None,
) -> Iterator[tuple[tuple, list]]:
    """Run every job; yield (job.run_indices, results) for each as it finishes.

    With `scheduler` (a Dask scheduler address or ``local:N``) the jobs run as Dask tasks
    instead (`bnexp.cluster`), and `n_jobs` is not used; `workers`, when given, collects
    ``{"run_indices": [...], "worker": {...}}`` for each finished job.

    A job is picklable and has `run_indices`, `work` (progress units: network-iterations),
    `iterations` (solver iterations) and `run(data, on_progress) -> results`, where
    on_progress(iterations done) is called as it trains. `data` is handed to each worker once,
    at start-up. With n_jobs > 1 the jobs run in worker processes; when the caller stops early
    (Ctrl-C, SIGTERM, an error) the workers are killed at once, and they die with this process.
    """
    if scheduler is not None:
        yield from _run_on_dask(jobs, data, scheduler, progress, workers)
        return
    bar = _Progress(jobs, progress)
    try:
        if n_jobs <= 1 or len(jobs) <= 1:
            yield from _run_here(jobs, data, bar)
        else:
            yield from _run_in_workers(jobs, data, n_jobs, bar)
    finally:
        bar.close()


def _run_on_dask(jobs, data, scheduler: str, progress: bool, workers: list | None):
    """The jobs as Dask tasks (see `bnexp.cluster`), noting which worker ran each."""
    import contextlib

    from bnexp.cluster import run_on_dask

    with contextlib.closing(run_on_dask(jobs, data, scheduler, progress)) as outcomes:
        for outcome in outcomes:
            if workers is not None:
                workers.append({"run_indices": list(outcome.run_indices), "worker": outcome.worker})
            yield outcome.run_indices, outcome.results
