"""Speed of the default initialisation sweep: lockstep vs one-network-at-a-time, float32 and
float64.

The sweep: 20 weight scales (logspace(-4, 0)) x {batch norm, baseline} = 40 networks, hidden [50]*7,
1,000 training images, 1,000 validation images, 10 epochs of 20 iterations (batch 50), Adam, 11
accuracy checks, plus the test accuracy of each best-val snapshot. All runs use seed 0, so they
share their minibatches and each group trains with the wide first-layer product.

Rows of the table:

- lockstep, 1 proc x 2 threads: the two groups (20 BN nets, 20 baseline nets) one after the other in
  this process, BLAS with 2 threads.
- lockstep, 2 procs x 1 thread: the two groups at the same time in two forked worker processes, each
  limited to one BLAS thread (threadpoolctl); the pool is started before the clock.
- one-at-a-time: the 40 networks one after another (K = 1 each), 2 BLAS threads, in this process.

``--kernels-ab ROUNDS`` also times the batch-norm group alone on one BLAS thread, with the compiled
kernels (`bnexp.fused`) and without them (``BNEXP_FUSED=0``), interleaved, and prints the medians.

GFLOP/s counts the matrix-product FLOPs actually performed (forward and backward of every affine
layer except the never-computed input gradient, the accuracy checks and the test evaluation) divided
by the wall time. The GEMM peak is a 2048 x 2048 matrix product on 2 threads. Peak RSS is the
high-water mark of this process and, for the worker rows, of the largest worker.

Usage: ``python benchmarks/sweep_speed.py [--data-dir DIR] [--dtypes float32,float64]
[--no-serial] [--profile] [--kernels-ab ROUNDS]``. Real CIFAR-10 is read when ``--data-dir`` or
BNEXP_DATA_DIR is set; otherwise synthetic Gaussian data of the same shapes is used (noted in the
table). Data loading is not timed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time

import numpy as np
from threadpoolctl import threadpool_limits

from bnexp import fused, plan, train
from bnexp.config import load_config
from bnexp.data import Splits
from bnexp.model import NetSpec, weight_shapes
from bnexp.sweep import solver_settings

HIDDEN = (50,) * 7
SCALES = np.logspace(-4, 0, 20)
_WORK: dict = {}  # what the forked workers inherit: data, settings, groups


def load_data(data_dir: str | None) -> tuple[Splits, str]:
    """Real splits via bnexp.data when a directory is given, else synthetic data, same shapes."""
    data_dir = data_dir or os.environ.get("BNEXP_DATA_DIR")
    if data_dir:
        from bnexp import data as bdata

        return bdata.load_splits(bdata.resolve_data_dir(data_dir)), "CIFAR-10"
    rng = np.random.default_rng(0)

    def split(n):
        return rng.normal(0.0, 60.0, (n, 3072)), rng.integers(0, 10, n)

    (xt, yt), (xv, yv), (xs, ys) = split(1000), split(1000), split(1000)
    synthetic = Splits(xt, yt, xv, yv, xs, ys, mean_image=np.zeros(3072), source={})
    return synthetic, "synthetic (no data dir)"


def sweep_settings(dtype: str) -> train.SolverSettings:
    """The solver settings of the default sweep (bnexp sweep-init) in the given dtype."""
    return solver_settings(load_config(None, [f"model.dtype={dtype}"]))


def make_groups(settings: train.SolverSettings, num_train: int):
    """[(spec, members)] for the BN group and the baseline group; one shared plan per layout."""
    groups = []
    for batchnorm in (True, False):
        spec = NetSpec(3072, HIDDEN, 10, batchnorm)
        iters = settings.num_iterations(num_train)
        p = plan.numpy_plan(0, spec, iters, settings.batch_size, num_train)
        groups.append((spec, [train.Member(float(s), None, p) for s in SCALES]))
    return groups


def flop_count(settings: train.SolverSettings, data: Splits, networks: int) -> float:
    """Matrix-product FLOPs of the whole sweep (2 per multiply-add)."""
    shapes = weight_shapes(NetSpec(3072, HIDDEN, 10, True))
    macs = sum(din * dout for din, dout in shapes)
    first = shapes[0][0] * shapes[0][1]
    n_train = data.X_train.shape[0]
    iters = settings.num_iterations(n_train)
    checks = len(
        train.check_schedule(iters, plan.iterations_per_epoch(n_train, settings.batch_size))
    )
    per_step = 2 * settings.batch_size * (3 * macs - first)  # fwd, dW, dX (no dX for layer 1)
    per_check = 2 * (n_train + data.X_val.shape[0]) * macs
    test = 2 * data.X_test.shape[0] * macs
    return networks * (iters * per_step + checks * per_check + test)


def gemm_peak(dtype: str, threads: int) -> float:
    """GFLOP/s of a 2048^3 matrix product (best of 5)."""
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(dtype)
    with threadpool_limits(threads):
        a @ a
        best = min(_timed(lambda: a @ a) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _train_one_group(index: int) -> float:
    """Worker body: train group `index` with one BLAS thread; returns its peak RSS in MB."""
    with threadpool_limits(1):
        spec, members = _WORK["groups"][index]
        train.train_group(spec, members, _WORK["data"], _WORK["settings"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(dtypes, data, serial: bool):
    rows = []
    for dtype in dtypes:
        settings = sweep_settings(dtype)
        groups = make_groups(settings, data.X_train.shape[0])
        flops = flop_count(settings, data, 40)
        peak = gemm_peak(dtype, 2)
        _WORK.update(groups=groups, data=data, settings=settings)

        with threadpool_limits(2):
            wall = _timed(lambda: [train.train_group(s, m, data, settings) for s, m in groups])  # noqa: B023
        rows.append(("lockstep, 1 proc x 2 threads", dtype, wall, flops, peak, _rss_mb()))

        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(2) as pool:
            pool.map(abs, [0, 1])  # workers up before the clock starts
            start = time.perf_counter()
            rss = pool.map(_train_one_group, [0, 1])
            wall = time.perf_counter() - start
        rows.append(("lockstep, 2 procs x 1 thread", dtype, wall, flops, peak, max(rss)))

        if serial:
            with threadpool_limits(2):
                wall = _timed(
                    lambda: [
                        train.train_group(spec, [member], data, settings)  # noqa: B023
                        for spec, members in groups  # noqa: B023
                        for member in members
                    ]
                )
            rows.append(("one-at-a-time (K=1)", dtype, wall, flops, peak, _rss_mb()))
    return rows


def profile_group(data, dtype: str) -> None:
    """cProfile one group (20 BN nets) on one BLAS thread; print where the time goes."""
    import cProfile
    import pstats

    settings = sweep_settings(dtype)
    spec, members = make_groups(settings, data.X_train.shape[0])[0]
    profiler = cProfile.Profile()
    with threadpool_limits(1):
        profiler.runcall(train.train_group, spec, members, data, settings)
    stats = pstats.Stats(profiler)
    buckets = {
        "affine (matrix products)": ("affine_forward", "affine_backward"),
        "update rule (element-wise)": (
            "adam",
            "_adam_inplace",
            "sgd",
            "sgd_momentum",
            "_prepare",
            "_prepare_inplace",
            "_learning_rate",
            "step",
            "_rates",  # bnexp.fused
            "<built-in method bnexp._kernels.adam>",  # the compiled kernel itself
        ),
        "BN + ReLU (element-wise)": (
            "batchnorm_forward",
            "batchnorm_backward_alt",
            "_mean",
            "_batchnorm_inference",
            "relu_forward",
            "relu_backward",
            # With the compiled kernels (bnexp.fused): the layers' entry points, the wrappers
            # and the kernels (each counted once: tottime excludes what a function calls).
            "batchnorm_relu_forward",
            "relu_batchnorm_backward",
            "_batchnorm",
            "_batch_stats",
            "_relu_after",
            "batchnorm_inference",
            "batchnorm_batch",
            "batchnorm_backward",
            "_norm_views",
            "_outputs",
            "_relu_mode",
            "_double",
            "<built-in method bnexp._kernels.bn_inference>",
            "<built-in method bnexp._kernels.bn_batch>",
            "<built-in method bnexp._kernels.bn_backward>",
        ),
    }
    totals = dict.fromkeys(buckets, 0.0)
    total = 0.0
    for (_, _, func), (_, _, tottime, _, _) in stats.stats.items():
        total += tottime
        for name, funcs in buckets.items():
            if func in funcs:
                totals[name] += tottime
    print(f"profile of one group (20 BN nets, {dtype}, 1 thread): {total:.2f} s")
    for name, seconds in totals.items():
        print(f"  {name:28} {seconds:6.2f} s")
    print(f"  {'everything else':28} {total - sum(totals.values()):6.2f} s")


def kernels_ab(data, dtype: str, rounds: int) -> None:
    """Time the batch-norm group alone (one BLAS thread) with the compiled kernels and without,
    interleaved over `rounds`; print the medians. Needs the extension (`fused.available`)."""
    import statistics

    settings = sweep_settings(dtype)
    spec, members = make_groups(settings, data.X_train.shape[0])[0]
    times: dict[str, list[float]] = {"compiled kernels": [], "NumPy (BNEXP_FUSED=0)": []}
    saved = os.environ.get(fused.ENV_FUSED)
    try:
        for _ in range(rounds):
            for name, flag in zip(times, ("1", "0"), strict=True):
                os.environ[fused.ENV_FUSED] = flag  # read at every call, so it switches here
                with threadpool_limits(1):
                    times[name].append(
                        _timed(lambda: train.train_group(spec, members, data, settings))
                    )
    finally:
        os.environ.pop(fused.ENV_FUSED, None)
        if saved is not None:
            os.environ[fused.ENV_FUSED] = saved
    print(f"one batch-norm group alone ({dtype}, 1 thread), medians of {rounds} interleaved rounds")
    for name, values in times.items():
        rounds_text = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {name:24} {statistics.median(values):6.2f} s   ({rounds_text})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--no-serial", action="store_true", help="skip one-at-a-time training")
    parser.add_argument("--profile", action="store_true", help="also profile one group")
    parser.add_argument(
        "--kernels-ab",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="also time one group with and without the compiled kernels, interleaved",
    )
    args = parser.parse_args()
    data, source = load_data(args.data_dir)
    # As `bnexp sweep-init` runs: the compiled kernels when the extension is built;
    # BNEXP_FUSED=0 for NumPy.
    kernel = fused.enabled()
    print(f"Adam update and batch norm: {'compiled kernels' if kernel else 'NumPy'}")
    if args.kernels_ab and kernel:
        kernels_ab(data, args.dtypes.split(",")[0], args.kernels_ab)
    if args.profile:
        profile_group(data, args.dtypes.split(",")[0])
    rows = run(args.dtypes.split(","), data, serial=not args.no_serial)
    print(f"default sweep, 40 networks, data: {source}, cores: {os.cpu_count()}")
    header = (
        f"{'mode':30} {'dtype':8} {'wall s':>7} {'GFLOP/s':>8} {'GEMM peak':>9} {'peak RSS MB':>11}"
    )
    print(header)
    print("-" * len(header))
    for mode, dtype, wall, flops, peak, rss in rows:
        print(f"{mode:30} {dtype:8} {wall:7.2f} {flops / wall / 1e9:8.1f} {peak:9.1f} {rss:11.0f}")
    by = {(m, d): w for m, d, w, *_ in rows}
    for dtype in args.dtypes.split(","):
        serial = by.get(("one-at-a-time (K=1)", dtype))
        best = min(
            by[("lockstep, 1 proc x 2 threads", dtype)], by[("lockstep, 2 procs x 1 thread", dtype)]
        )
        if serial:
            print(f"{dtype}: best lockstep is {serial / best:.1f}x faster than one-at-a-time")
    print(f"sweep FLOPs: {flop_count(sweep_settings('float32'), data, 40) / 1e9:.0f} GFLOP")


if __name__ == "__main__":
    main()
