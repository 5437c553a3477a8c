"""How close `bnexp sweep-init` trains to this machine's floor, and the whole command's time.

The floor of the default sweep's training is what the hardware needs at best for the work that
cannot be avoided, measured on this machine:

- the matrix products (`sweep_speed.flop_count`: forward, weight and input gradients, accuracy
  checks, test) at the measured single-core float32 GEMM peak (a 2048^3 product, one thread);
- the first-layer Adam update, which is memory-bound: per step and group, Adam reads w, dw, m, v
  and writes w, m, v of the (3,072, 20 x 50) weights (7 passes of 4 bytes), at the measured
  single-core stream bandwidth (a triad ``a = b + s * c`` on 64 MB arrays, one thread).

The two groups (batch norm, baseline) run on the two cores at once, so the floor is the larger
group's sum of the two terms. Training time is the manifest's ``train_seconds`` of
``bnexp sweep-init -o TMP --no-plot`` (default --jobs); the whole command is timed as a process,
with and without drawing the figures. Runs are interleaved (A B A B ...) and medians reported.

Usage: ``BNEXP_DATA_DIR=... python benchmarks/floor.py [--rounds 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sweep_speed import flop_count, load_data, sweep_settings
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]


def gemm_peak_one_core() -> float:
    """Single-thread float32 GFLOP/s of a 2048^3 product (best of 5)."""
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    with threadpool_limits(1):
        a @ a
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
    return 2 * 2048**3 / min(times) / 1e9


def stream_bandwidth_one_core() -> float:
    """Single-thread GB/s of a float32 triad a = b + s*c on 64 MB arrays (best of 5; 3 arrays
    moved: 2 read, 1 written)."""
    n = 16 * 1024 * 1024
    b = np.ones(n, np.float32)
    c = np.ones(n, np.float32)
    a = np.empty_like(b)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        np.multiply(c, np.float32(3.0), out=a)
        a += b
        times.append(time.perf_counter() - start)
    # The two ufunc passes move 2 + 3 arrays (multiply: read c, write a; add: read a, b, write a).
    return 5 * 4 * n / min(times) / 1e9


def adam_bytes_per_group(settings, num_train: int, networks: int = 20) -> float:
    """Bytes the first-layer Adam update moves over a whole run of one group (7 float32 passes)."""
    iterations = settings.num_iterations(num_train)
    weights = 3072 * 50 * networks
    return iterations * 7 * 4 * weights


def timed_command(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def one_round(data_dir: str) -> dict:
    """One sweep trained into a fresh folder (training seconds, whole process with and without
    figures)."""
    with tempfile.TemporaryDirectory() as tmp:
        base = [sys.executable, "-m", "bnexp", "sweep-init", "--data-dir", data_dir]
        no_plot = timed_command([*base, "-o", f"{tmp}/a", "--no-plot"])
        train = json.loads(Path(f"{tmp}/a/manifest.json").read_text())["train_seconds"]
        whole = timed_command([*base, "-o", f"{tmp}/b"])
        plot = timed_command([sys.executable, "-m", "bnexp", "plot", f"{tmp}/b"])
    return {"train": train, "no_plot": no_plot, "whole": whole, "plot": plot}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("BNEXP_DATA_DIR"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not args.data_dir:
        sys.exit("error: set BNEXP_DATA_DIR or --data-dir to the CIFAR-10 folder")
    data, _ = load_data(args.data_dir)
    settings = sweep_settings("float32")
    peak, bandwidth = gemm_peak_one_core(), stream_bandwidth_one_core()
    group_flop = flop_count(settings, data, 20)
    group_bytes = adam_bytes_per_group(settings, data.X_train.shape[0])
    floor = group_flop / (peak * 1e9) + group_bytes / (bandwidth * 1e9)
    rounds = [one_round(args.data_dir) for _ in range(args.rounds)]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"GEMM peak, one core, float32      {peak:8.1f} GFLOP/s")
    print(f"stream triad, one core            {bandwidth:8.1f} GB/s")
    print(f"one group: matrix products        {group_flop / 1e9:8.1f} GFLOP")
    print(f"one group: first-layer Adam       {group_bytes / 1e9:8.1f} GB")
    print(f"floor (two groups on two cores)   {floor:8.2f} s")
    print(f"training (median of {args.rounds})           {med['train']:8.2f} s  "
          f"= {med['train'] / floor:.2f}x the floor")  # fmt: skip
    print(f"sweep-init --no-plot, process     {med['no_plot']:8.2f} s")
    print(f"sweep-init with figures, process  {med['whole']:8.2f} s  "
          f"= {med['whole'] / med['train']:.2f}x training")  # fmt: skip
    print(f"bnexp plot on the folder, process {med['plot']:8.2f} s")


if __name__ == "__main__":
    main()
