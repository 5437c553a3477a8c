"""Scaling of a sweep on a Dask cluster: the default 40-net initialization sweep on the whole
49,000-image training split (data.num_train=49000) for one epoch (train.epochs=1: 980 Adam steps
of batch 50, accuracy checks on all 49,000 training and 1,000 validation images after the first
step and at the end), on a LocalCluster of 1 and then 2 single-threaded worker processes.

Rows of the table:

- in process, 1 thread: `bnexp.executor.execute(..., n_jobs=1)`, the reference (skip with
  --no-serial); the Dask rows are checked bit for bit against it.
- dask, N workers: `bnexp.cluster.run_on_dask` on a LocalCluster started before the clock (its
  start-up is the "start s" column). The wall time covers scattering the data, training the two
  lockstep groups (20 batch-norm nets, 20 baselines) and gathering their results.

Below the table: the scheduler's overhead per task (median round trip of a trivial task, submitted
one at a time), the bytes a task and its result carry (pickled), the data scattered from the
client, and the bytes the workers copied from each other (Dask's own transfer log). There are
only two groups, so two workers are the most this sweep can use.

Usage: ``python benchmarks/cluster_scaling.py [--data-dir DIR] [--workers 1,2] [--no-serial]
[--num-train N]`` (N: fewer training images for a quick try; the default is the 49,000).
Real CIFAR-10 is read when ``--data-dir`` or BNEXP_DATA_DIR is set; otherwise synthetic Gaussian
data of the same shapes is used (noted in the output).
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import time

import numpy as np

from bnexp import cluster, executor, sweep
from bnexp.config import expand_runs, load_config
from bnexp.data import Splits


def load_data(cfg, data_dir: str | None) -> tuple[Splits, str]:
    """The sweep's real splits when a data dir is known, else synthetic data of the same shapes."""
    data_dir = data_dir or os.environ.get("BNEXP_DATA_DIR")
    if data_dir:
        data, _ = sweep.load_train_data(cfg, data_dir, log=print)
        return data, "CIFAR-10"
    rng = np.random.default_rng(0)

    def split(n):
        return rng.normal(0.0, 60.0, (n, 3072)), rng.integers(0, 10, n)

    (xt, yt), (xv, yv), (xs, ys) = split(cfg.data.num_train), split(1000), split(1000)
    empty = {"mean_image": np.zeros(3072), "source": {}}
    return Splits(xt, yt, xv, yv, xs, ys, **empty), "synthetic (no data dir)"


def make_jobs(cfg) -> list:
    """The lockstep groups of the sweep, built as bnexp.sweep.run_experiment builds them."""
    runs = expand_runs(cfg)
    return sweep._group_jobs(runs, range(len(runs)))


def identical(got: dict, want: dict) -> bool:
    """Every result field equal bit for bit (NaN equal to NaN), wall time aside."""
    try:
        for key, results in want.items():
            for a, b in zip(got[key], results, strict=True):
                for field, value in vars(b).items():
                    if field != "seconds":
                        np.testing.assert_array_equal(vars(a)[field], value, err_msg=field)
    except AssertionError:
        return False
    return True


def round_trip_ms(client, repeats: int = 30) -> float:
    """Median milliseconds to submit a trivial task and get its result back, one at a time."""
    times = []
    for n in range(repeats):
        start = time.perf_counter()
        client.submit(abs, -n, pure=False).result()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def scatter_once(client, data) -> tuple[float, int]:
    """Seconds to scatter `data` as run_on_dask does, and how many workers then hold a copy."""
    start = time.perf_counter()
    shared = client.scatter(data, broadcast=True, hash=False)
    seconds = time.perf_counter() - start
    holders = len(client.who_has([shared])[shared.key])
    client.cancel([shared])
    return seconds, holders


def group_seconds(results: dict) -> float:
    """Training time of the slowest group, as measured inside its task (per-net share x nets)."""
    return max(sum(r.seconds for r in group) for group in results.values())


def on_dask(jobs, data, workers: int) -> dict:
    """Run the sweep on a fresh LocalCluster of `workers`; its timings, results and transfers."""
    from distributed import Client, LocalCluster

    start = time.perf_counter()
    local = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
    )
    started = time.perf_counter() - start
    with Client(local) as client:
        scatter_seconds, holders = scatter_once(client, data)
        start = time.perf_counter()
        outcomes = list(cluster.run_on_dask(jobs, data, local.scheduler_address, False))
        wall = time.perf_counter() - start
        row = {
            "start": started,
            "wall": wall,
            "results": {o.run_indices: o.results for o in outcomes},
            "workers_used": len({o.worker["address"] for o in outcomes}),
            "scatter": scatter_seconds,
            "holders": holders,
            "round_trip_ms": round_trip_ms(client),
        }
    local.close()
    return row


def print_table(rows: list) -> None:
    """The timing table: rows of (mode, start s, scatter s, wall s, slowest group s, identical);
    start, scatter and identical are None where they do not apply."""
    base = next((row[3] for row in rows if row[0].startswith("dask")), None)
    print(
        f"\n{'mode':<22}{'start s':>8}{'scatter s':>10}{'wall s':>8}{'group s':>8}"
        f"{'speed-up':>9}  identical to --jobs 1"
    )
    print("-" * 88)
    for name, start, scatter, wall, group, same in rows:
        speedup = f"{base / wall:.2f}x" if base and name.startswith("dask") else "-"
        shown = "-" if same is None else ("yes" if same else "NO")
        start_s = "-" if start is None else f"{start:.1f}"
        scatter_s = "-" if scatter is None else f"{scatter:.1f}"
        print(
            f"{name:<22}{start_s:>8}{scatter_s:>10}{wall:>8.1f}{group:>8.1f}{speedup:>9}  {shown}"
        )


def print_traffic(dask_rows: list, jobs: list, data: Splits) -> None:
    """Scheduler overhead per task and the bytes moved."""
    trips = ", ".join(f"{w} worker(s) {r['round_trip_ms']:.1f} ms" for w, r in dask_rows)
    print(f"\nscheduler round trip of a trivial task (median of 30): {trips}")
    job_mb = max(len(pickle.dumps(job, protocol=5)) for job in jobs) / 1e6
    results = dask_rows[-1][1]["results"].values()
    result_kb = max(len(pickle.dumps(r, protocol=5)) for r in results) / 1e3
    print(f"per task: job {job_mb:.1f} MB in, results {result_kb:.0f} kB out (pickled)")
    data_gb = sum(a.nbytes for a in vars(data).values() if a is not None) / 1e9
    print(f"data scattered once per call: {data_gb:.2f} GB (client -> scheduler -> a worker)")
    for workers, row in dask_rows:
        print(
            f"  {workers} worker(s): a copy on {row['holders']} worker(s), "
            f"{data_gb * row['holders']:.2f} GB received by workers; "
            f"{row['workers_used']} worker(s) trained groups"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--no-serial", action="store_true", help="skip the in-process row")
    parser.add_argument("--num-train", type=int, default=49000, help="training images (quick try)")
    args = parser.parse_args()

    cfg = load_config(None, [f"data.num_train={args.num_train}", "train.epochs=1"])
    data, source = load_data(cfg, args.data_dir)
    jobs = make_jobs(cfg)
    nets = sum(len(job.members) for job in jobs)
    print(
        f"data: {source}, {data.X_train.shape[0]} training images, {len(jobs)} groups, {nets} nets"
    )
    print(f"load average before: {os.getloadavg()[0]:.1f} (2 cores)")

    rows, want = [], None
    if not args.no_serial:
        start = time.perf_counter()
        want = dict(executor.execute(jobs, data, 1, False))
        wall = time.perf_counter() - start
        rows.append(("in process, 1 thread", None, None, wall, group_seconds(want), None))
    dask_rows = []
    for workers in (int(w) for w in args.workers.split(",")):
        row = on_dask(jobs, data, workers)
        same = None if want is None else identical(row["results"], want)
        dask_rows.append((workers, row))
        name = f"dask, {workers} worker(s)"
        group = group_seconds(row["results"])
        rows.append((name, row["start"], row["scatter"], row["wall"], group, same))
    print_table(rows)
    print_traffic(dask_rows, jobs, data)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
