"""Cost of one probe step (`bnexp.probes`) for one lockstep group of the default sweep.

The group: 20 networks (weight scales logspace(-4, 0)), hidden [50]*7, float32, one BLAS thread,
as a worker of ``--jobs N`` trains it. A probe step is `layer_stats` on the 200-image probe batch
plus `ics` and `landscape` (default step sizes) on a 50-image minibatch, the latter two timed
apart and together (`minibatch_probes`, which shares their gradient pass; the probe total uses
it). For scale, the table also
times the group's forward and backward pass on one minibatch (``model.loss_and_grads``, wide first
layer, as the training loop runs it) and the group's whole training (``train.train_group``, the
default settings: 200 iterations and 11 accuracy checks), and gives the overhead of probing at
``probes.every: 20`` (11 probe steps: iteration 0, every 20th, the last) relative to it.

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

from bnexp import model, plan, probes, train
from bnexp.config import load_config
from bnexp.data import Splits
from bnexp.model import NetSpec
from bnexp.sweep import solver_settings

HIDDEN = (50,) * 7
SCALES = np.logspace(-4, 0, 20)
PROBE_SIZE, BATCH, LR, EPS = 200, 50, 1e-3, 1e-5


PROBE_STEPS = 11  # probes.every: 20 over 200 iterations: 0, 20, ..., 180 and 199


def load_data(data_dir: str | None) -> tuple[Splits, str]:
    """The experiment's splits (1,000 training images), real when a folder is set."""
    data_dir = data_dir or os.environ.get("BNEXP_DATA_DIR")
    if data_dir:
        from bnexp import data as bdata

        s = bdata.load_splits(bdata.resolve_data_dir(data_dir))
        n = 1000
        splits = (s.X_train[:n], s.y_train[:n], s.X_val, s.y_val, s.X_test, s.y_test)
        return Splits(*splits, mean_image=s.mean_image, source=s.source), "CIFAR-10"
    rng = np.random.default_rng(0)
    parts = [(rng.normal(0.0, 60.0, (1000, 3072)), rng.integers(0, 10, 1000)) for _ in range(3)]
    arrays = (a for part in parts for a in part)
    return Splits(*arrays, mean_image=np.zeros(3072), source={}), "synthetic"


def train_seconds(batchnorm: bool, data: Splits) -> float:
    """Wall time of training the group with the default solver settings."""
    settings = solver_settings(load_config(None))
    spec = NetSpec(3072, HIDDEN, 10, batchnorm)
    iters = settings.num_iterations(data.X_train.shape[0])
    p = plan.numpy_plan(0, spec, iters, settings.batch_size, data.X_train.shape[0])
    members = [train.Member(float(s), None, p) for s in SCALES]
    start = time.perf_counter()
    train.train_group(spec, members, data, settings)
    return time.perf_counter() - start


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
        "both": lambda: probes.minibatch_probes(spec, params, new, X, y, EPS, lr),
        "step": lambda: model.loss_and_grads(spec, wide, X, y, bn),
    }
    return {name: median_ms(fn, repeats) for name, fn in cost.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    data, source = load_data(args.data_dir)
    X_all, y_all = data.X_train, data.y_train
    # The probe batch and a disjoint minibatch, in the compute dtype as the training loop has them.
    probe = X_all[:PROBE_SIZE].astype(np.float32), y_all[:PROBE_SIZE]
    minibatch = (
        X_all[PROBE_SIZE : PROBE_SIZE + BATCH].astype(np.float32),
        y_all[PROBE_SIZE : PROBE_SIZE + BATCH],
    )
    print(f"one probe step in ms, 20 networks, hidden [50]*7, float32, 1 BLAS thread, {source}")
    print(
        f"{'group':10} {'layer_stats':>11} {'ics':>6} {'landscape':>9} {'both':>6} {'probe':>6} "
        f"{'fwd+bwd':>7} {'train s':>7} {'every 20':>8}"
    )
    with threadpool_limits(limits=1, user_api="blas"):
        for batchnorm in (True, False):
            ms = time_group(batchnorm, (probe, minibatch), args.repeats)
            total = ms["layer_stats"] + ms["both"]
            seconds = train_seconds(batchnorm, data)
            overhead = PROBE_STEPS * total / 1e3 / seconds
            name = "batchnorm" if batchnorm else "baseline"
            print(
                f"{name:10} {ms['layer_stats']:11.1f} {ms['ics']:6.1f} {ms['landscape']:9.1f} "
                f"{ms['both']:6.1f} {total:6.1f} {ms['step']:7.1f} {seconds:7.2f} {overhead:8.1%}"
            )


if __name__ == "__main__":
    main()
