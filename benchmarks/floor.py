"""How close `bnexp sweep-init` trains to this machine's floor, and the whole command's time.

The floor of the default sweep's training is what the hardware needs at best for the work that
cannot be avoided, measured on this machine:

- the matrix products (`sweep_speed.flop_count`: forward, weight and input gradients, accuracy
  checks, test) at the measured single-core float32 GEMM peak (a 2048^3 product, one thread);
- the first-layer Adam update, which is memory-bound: per step and group, Adam reads w, dw, m, v
  and writes w, m, v of the (3,072, 20 x 50) weights (7 passes of 4 bytes), at the measured
  single-core stream bandwidth (a triad ``a = b + s * c`` on 64 MB arrays, one thread).

The two groups (batch norm, baseline) run on the two cores at once, so the floor is the larger
group's sum of the two terms.

The whole command with figures is compared with its own training time (the manifest's), and
"figures beyond training" is what it takes beyond its training minus what the --no-plot command
takes beyond its own.

The *achievable* line replaces the GEMM peak by what one core reaches at the shapes the sweep
actually multiplies (`product_kinds`: the wide first layer (50, 3072) @ (3072, 1000) and its
weight gradient, the stacked 50 x 50 hidden products of 20 networks, the accuracy-check chunks),
each timed alone (best of several) and counted as often as one group performs it, plus the same
Adam traffic. What training takes beyond that is the element-wise work (batch norm, ReLU,
softmax, the update of the small parameters) and Python; `sweep_speed.py --profile` breaks it
down. Training time is the manifest's ``train_seconds`` of
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


def product_kinds(settings, num_train: int, num_val: int, num_test: int, networks: int = 20):
    """[(name, a shape, b shape, transpose a, transpose b, count per group)]: the matrix products
    one group of the default sweep performs (float32, batch 50, hidden [50] x 7, wide first
    layer), in the layouts the engine uses (a transposed operand is a swapped-axes view)."""
    n, d, h, k, c = settings.batch_size, 3072, 50, networks, 10
    iters = settings.num_iterations(num_train)
    per_epoch = max(num_train // n, 1)
    checks = len(range(0, iters, per_epoch)) + 1  # after iteration 1 and at every epoch end
    chunk = 1000  # train.CHECK_CHUNK
    chunks = checks * (-(-num_train // chunk) + -(-num_val // chunk)) + -(-num_test // chunk)
    hidden = 6  # hidden-to-hidden layers of [50] x 7
    return [
        ("layer 1 forward", (n, d), (d, k * h), False, False, iters),
        ("layer 1 weight gradient", (d, n), (n, k * h), True, False, iters),
        ("hidden forward", (k, n, h), (k, h, h), False, False, hidden * iters),
        ("hidden input gradient", (k, n, h), (k, h, h), False, True, hidden * iters),
        ("hidden weight gradient", (k, h, n), (k, n, h), True, False, hidden * iters),
        ("output forward", (k, n, h), (k, h, c), False, False, iters),
        ("output input gradient", (k, n, c), (k, c, h), False, True, iters),
        ("output weight gradient", (k, h, n), (k, n, c), True, False, iters),
        ("check: layer 1", (chunk, d), (d, k * h), False, False, chunks),
        ("check: hidden", (k, chunk, h), (k, h, h), False, False, hidden * chunks),
        ("check: output", (k, chunk, h), (k, h, c), False, False, chunks),
    ]


def _operand(shape, transposed: bool, rng) -> np.ndarray:
    """A float32 operand of `shape`; transposed: a swapped-axes view of the stored array."""
    if not transposed:
        return rng.standard_normal(shape).astype(np.float32)
    stored = (*shape[:-2], shape[-1], shape[-2])
    return np.swapaxes(rng.standard_normal(stored).astype(np.float32), -1, -2)


def shape_seconds(kinds) -> list[tuple[str, float, float, int]]:
    """[(name, seconds of one product, GFLOP/s, count)], one BLAS thread, best of 7 runs."""
    rng = np.random.default_rng(0)
    rows = []
    with threadpool_limits(1):
        for name, a_shape, b_shape, ta, tb, count in kinds:
            a, b = _operand(a_shape, ta, rng), _operand(b_shape, tb, rng)
            a @ b
            best = min(_seconds(lambda a=a, b=b: a @ b) for _ in range(7))
            flop = 2 * np.prod((a @ b).shape) * a.shape[-1]
            rows.append((name, best, flop / best / 1e9, count))
    return rows


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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
        whole_train = json.loads(Path(f"{tmp}/b/manifest.json").read_text())["train_seconds"]
        plot = timed_command([sys.executable, "-m", "bnexp", "plot", f"{tmp}/b"])
    return {
        "train": train,
        "no_plot": no_plot,
        "whole": whole,
        "whole_train": whole_train,
        # What the figures add beyond each command's own training (less sensitive to other
        # work on the machine than the difference of two whole commands).
        "drawing": (whole - whole_train) - (no_plot - train),
        "plot": plot,
    }


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
    n_train, n_val, n_test = (len(x) for x in (data.X_train, data.X_val, data.X_test))
    shapes = shape_seconds(product_kinds(settings, n_train, n_val, n_test))
    products = sum(seconds * count for _, seconds, _, count in shapes)
    achievable = products + group_bytes / (bandwidth * 1e9)
    rounds = [one_round(args.data_dir) for _ in range(args.rounds)]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    print(f"GEMM peak, one core, float32      {peak:8.1f} GFLOP/s")
    print(f"stream triad, one core            {bandwidth:8.1f} GB/s")
    print(f"one group: matrix products        {group_flop / 1e9:8.1f} GFLOP")
    print(f"one group: first-layer Adam       {group_bytes / 1e9:8.1f} GB")
    print(f"floor (two groups on two cores)   {floor:8.2f} s")
    print("products at their shapes, one core:  GFLOP/s   count  s/group")
    for name, seconds, gflops, count in shapes:
        print(f"  {name:26} {gflops:8.1f} {count:7d} {seconds * count:8.2f}")
    print(f"achievable (products at their shapes + Adam) {achievable:5.2f} s")
    print(f"training (median of {args.rounds})           {med['train']:8.2f} s  "
          f"= {med['train'] / floor:.2f}x the floor, "
          f"{med['train'] / achievable:.2f}x the achievable")  # fmt: skip
    print(f"sweep-init --no-plot, process     {med['no_plot']:8.2f} s")
    ratio = statistics.median(r["whole"] / r["whole_train"] for r in rounds)
    print(f"sweep-init with figures, process  {med['whole']:8.2f} s  "
          f"= {ratio:.2f}x its own training")  # fmt: skip
    print(f"figures beyond training           {med['drawing']:8.2f} s")
    print(f"bnexp plot on the folder, process {med['plot']:8.2f} s")


if __name__ == "__main__":
    main()
