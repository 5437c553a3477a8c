"""Cost of one probe step (`bnexp.probes`) for one lockstep group of the default sweep.

The group: 20 networks (weight scales logspace(-4, 0)), hidden [50]*7, float32, one BLAS thread,
as a worker of ``--jobs N`` trains it. A probe step is `layer_stats` on the 200-image probe batch
plus `ics` and `landscape` (default step sizes) on a 50-image minibatch. For scale, the table also
times the group's forward and backward pass on one minibatch (``model.loss_and_grads``, wide first
layer, as the training loop runs it), the bulk of a training step.

Usage: ``python benchmarks/probe_cost.py [--data-dir DIR] [--repeats 7]``. Real CIFAR-10 is read
when ``--data-dir`` or BNEXP_DATA_DIR is set, otherwise synthetic data of the same shapes. Each
figure is the median of the repeats, in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits

from bnexp import model, probes
from bnexp.model import NetSpec

HIDDEN = (50,) * 7
SCALES = np.logspace(-4, 0, 20)
PROBE_SIZE, BATCH, LR, EPS = 200, 50, 1e-3, 1e-5


def load_images(data_dir: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """The first 1,000 training images (N, 3072) float64 and labels, real when a folder is set."""
    data_dir = data_dir or os.environ.get("BNEXP_DATA_DIR")
    if data_dir:
        from bnexp import data as bdata

        s = bdata.load_splits(bdata.resolve_data_dir(data_dir))
        return s.X_train[:1000], s.y_train[:1000], "CIFAR-10"
    rng = np.random.default_rng(0)
    return rng.normal(0.0, 60.0, (1000, 3072)), rng.integers(0, 10, 1000), "synthetic"


def median_ms(fn, repeats: int) -> float:
    """Median wall time of fn() in milliseconds (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def group_state(batchnorm: bool, X: np.ndarray, y: np.ndarray):
    """spec, params and the params after one plain gradient step (stacked, float32)."""
    spec = NetSpec(3072, HIDDEN, 10, batchnorm)
    rng = np.random.default_rng(0)
    normals = [rng.standard_normal(s) for s in model.weight_shapes(spec)]
    normals = [np.broadcast_to(z, (len(SCALES), *z.shape)) for z in normals]
    params = model.init_params(spec, normals, SCALES, np.float32)
    bn = model.init_bn_params(spec, (len(SCALES),), np.float32)
    _, grads = model.loss_and_grads(spec, params, X, y, bn)
    new = {key: value - np.float32(LR) * np.sign(grads[key]) for key, value in params.items()}
    return spec, params, new


def time_group(batchnorm: bool, batches, repeats: int) -> dict:
    """Median ms of each probe and of one forward+backward pass for one group."""
    (X_probe, y_probe), (X, y) = batches
    lr = np.full(len(SCALES), LR)
    spec, params, new = group_state(batchnorm, X, y)
    wide = dict(params, W1=model.to_wide(params["W1"]))
    bn = model.init_bn_params(spec, (len(SCALES),), np.float32)
    cost = {
        "layer_stats": lambda: probes.layer_stats(
            spec, params, X_probe, y_probe, EPS, prev_params=new
        ),
        "ics": lambda: probes.ics(spec, params, new, X, y, EPS),
        "landscape": lambda: probes.landscape(spec, params, X, y, EPS, lr),
        "step": lambda: model.loss_and_grads(spec, wide, X, y, bn, wide=True),
    }
    return {name: median_ms(fn, repeats) for name, fn in cost.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    X_all, y_all, source = load_images(args.data_dir)
    # The probe batch and a disjoint minibatch, in the compute dtype as the training loop has them.
    probe = X_all[:PROBE_SIZE].astype(np.float32), y_all[:PROBE_SIZE]
    minibatch = (
        X_all[PROBE_SIZE : PROBE_SIZE + BATCH].astype(np.float32),
        y_all[PROBE_SIZE : PROBE_SIZE + BATCH],
    )
    print(f"one probe step in ms, 20 networks, hidden [50]*7, float32, 1 BLAS thread, {source}")
    print(
        f"{'group':10} {'layer_stats':>11} {'ics':>7} {'landscape':>9} {'total':>7} {'fwd+bwd':>7}"
    )
    with threadpool_limits(limits=1, user_api="blas"):
        for batchnorm in (True, False):
            ms = time_group(batchnorm, (probe, minibatch), args.repeats)
            total = ms["layer_stats"] + ms["ics"] + ms["landscape"]
            name = "batchnorm" if batchnorm else "baseline"
            print(
                f"{name:10} {ms['layer_stats']:11.1f} {ms['ics']:7.1f} {ms['landscape']:9.1f} "
                f"{total:7.1f} {ms['step']:7.1f}"
            )


if __name__ == "__main__":
    main()
