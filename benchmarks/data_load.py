"""Cold vs warm load of the default cs231n splits: seconds and peak RSS, as a table.

Cold = no prepared cache: every batch file is read, validated and hashed (sha256) and the mean
image is computed. Warm = the prepared cache from the cold load is used. Each measurement runs in
a fresh process so that its peak RSS is its own; the operating system's file cache is not dropped,
so "cold" here is the work bnexp does, not the disk. The last row is the part of a warm load that
checks the cache against the batch files (stat and a sampled sha256 of each), timed in this
process.

    python benchmarks/data_load.py --data-dir DIR      (or set BNEXP_DATA_DIR)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import tempfile
import time
import warnings


def _measure(data_dir: str, cache_dir: str, use_cache: bool, queue) -> None:
    """Child process: one load_splits call; report (seconds, peak RSS MiB, baseline RSS MiB)."""
    from bnexp.data import load_splits

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        start = time.perf_counter()
        load_splits(data_dir, cache_dir=cache_dir, use_cache=use_cache)
        seconds = time.perf_counter() - start
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, base))


def run(data_dir: str, cache_dir: str, use_cache: bool) -> tuple[float, float, float]:
    """Run one measurement in a fresh spawned process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(data_dir, cache_dir, use_cache, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="default: $BNEXP_DATA_DIR")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    from bnexp.data import resolve_data_dir

    data_dir = str(resolve_data_dir(args.data_dir))
    rows = {"cold (no cache)": [], "warm (cache hit)": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            rows["cold (no cache)"].append(run(data_dir, cache, True))  # builds the cache
            rows["warm (cache hit)"].append(run(data_dir, cache, True))
    print(f"data: {data_dir}   default splits (1000/1000/1000 of 49000)   median of {args.repeats}")
    print(f"{'load':<18} {'seconds':>8} {'peak RSS MiB':>13} {'RSS after imports':>18}")
    for name, results in rows.items():
        sec, rss, base = (statistics.median(col) for col in zip(*results, strict=True))
        print(f"{name:<18} {sec:>8.3f} {rss:>13.0f} {base:>18.0f}")
    print(f"{'cache check':<18} {time_cache_check(data_dir, args.repeats):>8.3f}")
    return 0


def time_cache_check(data_dir: str, repeats: int) -> float:
    """Median seconds of the per-file checks a warm load makes before trusting the cache."""
    from pathlib import Path

    from bnexp import data

    layout, folder = data.find_layout(Path(data_dir))
    files = data._batch_paths(layout, folder)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for path in files:
            data._file_check(path)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    sys.exit(main())
