"""How lockstep groups are executed: in this process, or in worker processes that each train
whole groups with one BLAS thread. One interface: hand over the jobs, get each job's results back
as it finishes. Records, resume and interruption never depend on which executor ran a group.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed

from threadpoolctl import threadpool_limits

_WORKER_DATA = None


def _init_worker(data) -> None:
    """Worker-process set-up: keep the data (inherited, not pickled, under fork) and use one BLAS
    thread, so N workers use N cores without oversubscription."""
    global _WORKER_DATA
    _WORKER_DATA = data
    threadpool_limits(limits=1, user_api="blas")


def _run_in_worker(job):
    """Worker-process entry: run one job on the data given at start-up."""
    return job.run(_WORKER_DATA)


def _run_here(jobs, data, bar):
    """Run the jobs one after another in this process, ticking the bar every iteration."""
    for job in jobs:
        done = [0]
        k = job.work // max(job.iterations, 1)

        def tick(iterations: int, done=done, k=k) -> None:
            bar.update((iterations - done[0]) * k)
            done[0] = iterations

        yield job.run_indices, job.run(data, tick)


def execute(jobs: Sequence, data, n_jobs: int, progress: bool) -> Iterator[tuple[tuple, list]]:
    """Run every job; yield (job.run_indices, results) for each as it finishes.

    A job is picklable and has `work` (progress units: network-iterations) and
    `run(data, on_progress) -> results`. `data` is handed to each worker once, at start-up.
    """
    from tqdm import tqdm

    total = sum(job.work for job in jobs)
    # disable=None: tqdm draws only when stderr is a terminal (silent in CI and pipes).
    bar = tqdm(
        total=total,
        unit="net-it",
        desc="training",
        disable=None if progress else True,
        file=sys.stderr,
        smoothing=0.1,
    )
    try:
        if n_jobs <= 1 or len(jobs) <= 1:
            # One BLAS thread here too: OpenBLAS's multi-threaded sgemm splits the sums
            # differently, so 2 threads would give other float32 bits than a worker's 1.
            with threadpool_limits(limits=1, user_api="blas"):
                yield from _run_here(jobs, data, bar)
        else:
            # fork (where available) starts workers in milliseconds and shares the data without
            # pickling it; results stream back group by group so each is recorded at once.
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            with ProcessPoolExecutor(
                max_workers=min(n_jobs, len(jobs)),
                mp_context=context,
                initializer=_init_worker,
                initargs=(data,),
            ) as pool:
                futures = {pool.submit(_run_in_worker, job): job for job in jobs}
                try:
                    for future in as_completed(futures):
                        job = futures[future]
                        bar.update(job.work)
                        yield job.run_indices, future.result()
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        bar.close()
