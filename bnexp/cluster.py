"""Run lockstep groups on a Dask cluster: one Dask task per group, each group's results streamed
back as it finishes. The same contract as `bnexp.executor.execute`, so records, resume and
interruption do not depend on where a group ran.

Scheduler
---------
``scheduler`` is the address of a running Dask scheduler (``tcp://host:8786``: started by hand
with ``dask scheduler`` and ``dask worker``, or by dask-jobqueue or dask-kubernetes), or
``local:N``: a LocalCluster of N single-threaded worker processes on this machine, started for
the call and closed at its end (a quick try). The scheduler and every worker need the same bnexp
and NumPy installed (the scheduler unpickles each task too); they need no CIFAR-10 copy.

Data: scattered once
--------------------
The training data (`bnexp.data.Splits`, float64) are scattered at the start with
``Client.scatter(broadcast=True)``: the client sends them once to the scheduler, which places
them on one worker and has the others copy them from it. Every task then refers to that one copy,
so a task carries only its job (the group's random plan: a few MB). A worker that joins later gets
the copy from a peer before its first group. Cost: the data's bytes once per worker, plus once
through the scheduler (1.2 GB for the 49,000-image split); scattering rather than loading from a
shared data dir means workers need no file system in common with the client. Dask's active
memory manager may drop extra copies when few groups are left to run; a worker then fetches the
copy from a peer again, and if the last copy dies with its worker the data are scattered again.

Placement: every worker gets groups
-----------------------------------
Dask runs a task where its inputs already are, so it would put every group on the workers that
hold the data, and the memory manager's ReduceReplicas policy (on by default, every 2 s) drops
the copies no task waits for yet: one that runs between the scatter and the groups' arrival
leaves the data on one worker, all groups go there, and only work stealing, a heuristic that may
not act, moves any to the others. So each group carries a loose placement hint (``workers=[one
address]``, ``allow_other_workers=True``): the largest groups first, each to the worker with the
least hinted work per thread among those the scheduler knows at submission (``local:N`` waits
for its N workers), so with at least as many groups as workers every worker starts one, and a
worker without the data fetches it from a peer. The hint is no constraint: work stealing still
balances, and a group whose worker died or left runs on any other. A group submitted again is
hinted among the workers known then; a worker that joins later gets groups only by stealing.

Identical numbers
-----------------
Every task sets one BLAS thread (threadpoolctl) before it trains, as ``--jobs`` does: OpenBLAS's
multi-threaded float32 GEMM sums in another order. The limit is set and never restored, because a
worker with several threads runs several groups at once and one task restoring the old limit
would hand the others a multi-threaded BLAS mid-run. A group is one task and is never split, so
the results equal ``--jobs 1`` when the workers run the same NumPy and BLAS build on the same kind
of CPU as each other (OpenBLAS picks its kernels by CPU); each group's record names the worker's
BLAS so a mixed cluster shows.

Failures
--------
- A worker that dies mid-task (killed, out of memory): the scheduler reruns the group on another
  worker (Dask's ``distributed.scheduler.allowed-failures``, 3 by default) and the results are
  the same. A group that has killed more workers than that ends the call with ClusterError. A
  result that dies with its worker after the task finished, before the client fetched it, can
  come back cancelled instead, and so do the remaining groups when the last copy of the data dies:
  the data are scattered again if needed and the group is submitted again (up to `RESUBMITS`
  times).
- A scheduler that cannot be reached or goes away: ClusterError with one line; every group
  yielded before it is final.
- KeyboardInterrupt, an error, or the caller closing the generator: the remaining tasks are
  cancelled, the client is closed, and so is a LocalCluster this call started. A group already
  running on a worker cannot be interrupted: it runs to its end there and its result is dropped.
  Close the generator (``contextlib.closing``) so this happens at once, not when it is collected.
- A scheduler or worker that cannot unpickle a task (bnexp missing there): ClusterError.
- An exception raised by training itself (a bug, MemoryError) is re-raised as it is.

Scaling
-------
One task per lockstep group, and only the architecture, batch norm and solver settings split
groups (seeds, scales and learning rates train together in one stack): the default sweep is two
tasks, so at most two workers are busy however large the cluster, and a replicate study over
seeds is still two (larger) tasks. Each worker holds the data (float64) plus a float32 copy while
it trains, about 2 GB for the 49,000-image split: give workers 3 GB or more.

On a Slurm cluster, for example, dask-jobqueue starts the scheduler in the Python process that
creates ``SLURMCluster(cores=1, processes=1, memory="4GB")`` and submits workers with
``cluster.scale(jobs=2)``; pass ``cluster.scheduler_address`` as the scheduler while that
process runs. By hand: ``dask scheduler`` on one node, ``dask worker tcp://NODE:8786
--nthreads 1`` on the others.

Speed
-----
A Dask nanny starts its worker with MALLOC_TRIM_THRESHOLD_ set, which makes glibc map and unmap
every large temporary array afresh; each task sets glibc's usual thresholds back
(`_undo_malloc_trim`), or a group would train about 1.5-2x slower on a worker than in process.

The progress bar advances by a whole group as each one finishes (a task reports nothing midway).

Which worker ran a group
------------------------
`run_on_dask` yields a `GroupOutcome` per group: its run indices, its results and ``worker``, a
JSON-ready dict (``address``, ``name``, ``host``, ``blas``) for the manifest. `execute_on_dask`
yields only ``(run_indices, results)``, exactly as `bnexp.executor.execute`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass

from threadpoolctl import threadpool_info, threadpool_limits

from bnexp.errors import ClusterError, ConfigError

#: Seconds to wait for the scheduler to answer when connecting.
CONNECT_SECONDS = 30
#: Seconds to wait for the first worker (a batch queue may take a while to start one).
WORKER_WAIT_SECONDS = 300
#: Times a group is submitted again when a live scheduler drops it. Dask reruns the group of a
#: dead worker itself, but a result that dies with its worker between finishing and reaching the
#: client comes back "cancelled" ("already forgotten"), and so does every remaining group when
#: the last copy of the scattered data dies ("lost dependencies").
RESUBMITS = 3
#: Seconds to wait for the client and a local cluster to shut down.
CLOSE_SECONDS = 10
INSTALL_HINT = "pip install -e '.[dask]'"
#: glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@dataclass(frozen=True)
class GroupOutcome:
    """One finished group: `results` in `run_indices` order, and the worker that trained it."""

    run_indices: tuple[int, ...]
    results: list
    worker: dict


# --- what runs on a worker ------------------------------------------------------------------


def _blas_summary() -> str:
    """The BLAS this process uses, e.g. 'openblas 0.3.31 Haswell, 1 thread'."""
    libs = [lib for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return "; ".join(
        f"{lib.get('internal_api')} {lib.get('version')} {lib.get('architecture', '')}".rstrip()
        + f", {lib.get('num_threads')} thread"
        for lib in libs
    )


def _undo_malloc_trim() -> None:
    """Let glibc reuse freed heap for large arrays again in a worker started by a Dask nanny.

    The nanny sets MALLOC_TRIM_THRESHOLD_=65536, which also freezes glibc's mmap threshold at
    128 kB: every temporary array of a training step is then mapped and unmapped afresh, and a
    group trains about 1.5-2x slower. These are the values glibc's own adaptive thresholds reach
    (32 MB, and twice that for trimming). No-op elsewhere (not glibc, or no nanny setting).
    """
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
    libc.mallopt(_M_TRIM_THRESHOLD, 64 * 2**20)


def _train_on_worker(job, data) -> tuple[list, dict]:
    """Dask task: train one group with one BLAS thread; return its results and who ran it."""
    from distributed import get_worker

    # Set, never restored: see "Identical numbers" in the module docstring.
    threadpool_limits(limits=1, user_api="blas")
    _undo_malloc_trim()
    results = job.run(data)
    worker = get_worker()
    identity = {
        "address": worker.address,
        "name": str(worker.name),
        "host": socket.gethostname(),
        "blas": _blas_summary(),
    }
    return results, identity


# --- connecting -----------------------------------------------------------------------------


def _import_distributed():
    """The `distributed` package, or ClusterError saying how to install it."""
    try:
        import distributed
    except ImportError:
        raise ClusterError(
            f"--scheduler needs Dask, which is not installed: run {INSTALL_HINT}"
        ) from None
    return distributed


def local_workers(scheduler: str) -> int | None:
    """N of a ``local:N`` scheduler, None for an address; ConfigError for a bad ``local:``."""
    if scheduler != "local" and not scheduler.startswith("local:"):
        return None  # an address, localhost:8786 included
    count = scheduler.partition(":")[2]
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(
            f"--scheduler {scheduler!r}: use local:N with N >= 1 worker processes, "
            "or a scheduler address such as tcp://host:8786"
        )
    return int(count)


def _connect(distributed, scheduler: str):
    """(client, local cluster or None) for `scheduler`; ClusterError when it cannot be reached."""
    n_local = local_workers(scheduler)
    if n_local is not None:
        # silence_logs: workers cancelled by Ctrl-C would print warnings over the one-line report.
        cluster = distributed.LocalCluster(
            n_workers=n_local,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        try:
            return distributed.Client(cluster), cluster
        except BaseException:
            cluster.close(timeout=CLOSE_SECONDS)
            raise
    if not scheduler or any(c.isspace() for c in scheduler):
        raise ConfigError(f"--scheduler {scheduler!r}: give an address such as tcp://host:8786")
    try:
        client = distributed.Client(scheduler, timeout=CONNECT_SECONDS)
    except ValueError as exc:  # unknown scheme, missing port
        raise ConfigError(f"--scheduler {scheduler!r}: {exc}") from None
    except (OSError, TimeoutError) as exc:
        raise ClusterError(
            f"cannot reach the Dask scheduler at {scheduler} within {CONNECT_SECONDS} s "
            f"({type(exc).__name__}); start it (dask scheduler) or fix --scheduler"
        ) from None
    return client, None


def _wait_and_scatter(client, scheduler: str, data, workers: int = 1):
    """Wait for `workers` workers, then put `data` on every worker once; the future of that
    copy."""
    try:
        client.wait_for_workers(workers, timeout=WORKER_WAIT_SECONDS)
        # hash=False: tokenizing 1.2 GB of images would only cost time; one scatter per call.
        return client.scatter(data, broadcast=True, hash=False)
    except TimeoutError:  # before OSError: TimeoutError is one
        raise ClusterError(
            f"no Dask worker joined the scheduler at {scheduler} within "
            f"{WORKER_WAIT_SECONDS} s; start one with: dask worker {scheduler} --nthreads 1"
        ) from None
    except (OSError, CancelledError):
        raise ClusterError(
            f"lost the Dask scheduler at {scheduler} while sending it the data; "
            "check that it is running and has workers, then run the same command again"
        ) from None


@contextlib.contextmanager
def _dask_logs_at(level: int):
    """Raise Dask's loggers to `level` meanwhile: the caller reports failures in one line."""
    names = ["distributed"] + [
        name
        for name, logger in logging.root.manager.loggerDict.items()
        if name.startswith("distributed.") and isinstance(logger, logging.Logger)
    ]
    saved = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, old in saved.items():
            logging.getLogger(name).setLevel(old)


def _shut_down(client, cluster, pending) -> None:
    """Cancel what has not finished, close the client and a cluster this call started."""
    # A client whose scheduler is gone logs its reconnect attempt being cancelled: noise.
    with _dask_logs_at(logging.CRITICAL + 1):
        with contextlib.suppress(Exception):
            if pending and client.status == "running":
                client.cancel(list(pending))
        with contextlib.suppress(Exception):
            client.close(timeout=CLOSE_SECONDS)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=CLOSE_SECONDS)


# --- results --------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _cannot_unpickle(exc: BaseException) -> bool:
    """Whether a task failed because the scheduler or a worker could not unpickle it (bnexp
    missing there, or another version): Dask reports that as ImportError or as a RuntimeError
    about deserialization."""
    return isinstance(exc, ImportError) or "deserializ" in str(exc)


def _known_workers(client) -> dict[str, int]:
    """Address -> threads of every worker the scheduler knows now; empty if it cannot say."""
    with contextlib.suppress(OSError, TimeoutError):  # a lost scheduler is reported later
        return dict(client.nthreads())
    return {}


def _least_loaded(workers: dict[str, int], load: dict[str, float]) -> str | None:
    """The worker of `workers` (address -> threads) with the least `load` per thread (the first
    address on a tie); None when there is none."""
    if not workers:
        return None
    return min(sorted(workers), key=lambda address: load.get(address, 0) / workers[address])


def _placement(works: Sequence[float], workers: dict[str, int]) -> list[str | None]:
    """The worker each group should start on: largest `works` first, each to the worker with the
    least work per thread so far (longest processing time first), so that every worker gets a
    group when there are enough. None for every group when no worker is known."""
    load: dict[str, float] = {}
    hints: list[str | None] = [None] * len(works)
    for n in sorted(range(len(works)), key=lambda n: -works[n]):  # stable: ties in order
        hints[n] = _least_loaded(workers, load)
        if hints[n] is not None:
            load[hints[n]] = load.get(hints[n], 0) + works[n]
    return hints


def _submit(client, job, shared, key: str, worker: str | None):
    """The future of one group's task, trained on the scattered data `shared`, hinted to start
    on `worker` (see "Placement" in the module docstring; None: anywhere)."""
    hint = {"workers": [worker], "allow_other_workers": True} if worker else {}
    # Larger groups first: the last group to start decides the wall time.
    return client.submit(_train_on_worker, job, shared, key=key, priority=job.work, **hint)


def _outcome(distributed, future, job, client, scheduler: str, attempt: int):
    """The finished task's GroupOutcome; None when a live scheduler dropped the task and it may
    be submitted again (attempt < RESUBMITS); ClusterError when the cluster lost or gave up on
    it."""
    runs = f"runs {job.run_indices[0]}-{job.run_indices[-1]}"
    try:
        results, worker = future.result()
    except CancelledError as exc:
        if client.status == "running" and attempt < RESUBMITS:
            return None
        if client.status == "running":
            why = getattr(exc, "reason", None) or "no reason given"
            raise ClusterError(
                f"the Dask scheduler at {scheduler} cancelled the group of {runs} ({why}); "
                "finished groups are kept, run the same command to train the rest"
            ) from None
        raise ClusterError(
            f"lost the Dask scheduler at {scheduler}; finished groups are kept, "
            "run the same command again (with a running scheduler) to train the rest"
        ) from None
    except (ImportError, RuntimeError) as exc:
        if not _cannot_unpickle(exc):
            raise
        raise ClusterError(
            f"the Dask scheduler or a worker cannot load the group of {runs} "
            f"({_first_line(exc)}); install the same bnexp and NumPy on the scheduler and "
            "every worker"
        ) from None
    except distributed.KilledWorker:
        raise ClusterError(
            f"the group of {runs} killed every Dask worker it ran on (out of memory?); "
            "give the workers more memory, or split the sweep"
        ) from None
    return GroupOutcome(tuple(job.run_indices), results, worker)


def _resubmit_hint(client, jobs: Sequence, pending: dict) -> str | None:
    """The worker for a group submitted again: the one known now with the least work per
    thread among the unfinished groups hinted to it (`pending`: future -> (job number,
    attempt, hint))."""
    load: dict[str, float] = {}
    for n, _, hint in pending.values():
        if hint is not None:
            load[hint] = load.get(hint, 0) + jobs[n].work
    return _least_loaded(_known_workers(client), load)


def _progress_bar(total: int, progress: bool):
    """A tqdm bar on stderr in network-iterations (drawn only on a terminal), as --jobs shows."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="net-it",
        desc="training",
        disable=None if progress else True,
        file=sys.stderr,
        smoothing=0.1,
    )


def run_on_dask(jobs: Sequence, data, scheduler: str, progress: bool) -> Iterator[GroupOutcome]:
    """Train every job as one Dask task; yield a `GroupOutcome` for each as it finishes.

    Parameters
    ----------
    jobs : picklable groups with `run_indices`, `work` (network-iterations) and
        `run(data) -> results`; see `bnexp.executor.execute`.
    data : the `bnexp.data.Splits` every job trains on, scattered to each worker once.
    scheduler : ``tcp://host:port`` of a running scheduler, or ``local:N``.
    progress : show a progress bar on stderr, advanced as groups finish.

    Raises
    ------
    ClusterError : Dask missing, scheduler unreachable or lost, a group killed its workers.
    ConfigError : a malformed ``local:N``.
    """
    distributed = _import_distributed()
    local_workers(scheduler)  # a malformed local:N fails before anything starts
    if not jobs:
        return
    client = cluster = None
    pending: dict = {}
    bar = _progress_bar(sum(job.work for job in jobs), progress)
    try:
        with _dask_logs_at(logging.ERROR):
            client, cluster = _connect(distributed, scheduler)
            # local:N: the groups are placed among the workers known now, so wait for all N.
            shared = _wait_and_scatter(client, scheduler, data, local_workers(scheduler) or 1)
            token = uuid.uuid4().hex[:8]
            finished = distributed.as_completed()
            hints = _placement([job.work for job in jobs], _known_workers(client))
            for n, (job, hint) in enumerate(zip(jobs, hints, strict=True)):
                future = _submit(client, job, shared, f"bnexp-group-{n}-{token}-0", hint)
                pending[future] = (n, 0, hint)
                finished.add(future)
            for future in finished:
                n, attempt, _ = pending.pop(future)
                job = jobs[n]
                outcome = _outcome(distributed, future, job, client, scheduler, attempt)
                if outcome is None:  # dropped by a live scheduler: train the group again
                    if shared.status != "finished":  # the data died with their last holder
                        shared = _wait_and_scatter(client, scheduler, data)
                    hint = _resubmit_hint(client, jobs, pending)
                    key = f"bnexp-group-{n}-{token}-{attempt + 1}"
                    again = _submit(client, job, shared, key, hint)
                    pending[again] = (n, attempt + 1, hint)
                    finished.add(again)
                    continue
                bar.update(job.work)
                yield outcome
    finally:
        bar.close()
        if client is not None:
            _shut_down(client, cluster, pending)


def execute_on_dask(jobs: Sequence, data, scheduler: str, progress: bool) -> Iterator[tuple]:
    """`bnexp.executor.execute` on a Dask cluster: yield (job.run_indices, results) per group.

    The worker of each group is dropped here; use `run_on_dask` to record it.
    """
    with contextlib.closing(run_on_dask(jobs, data, scheduler, progress)) as outcomes:
        for outcome in outcomes:
            yield outcome.run_indices, outcome.results
