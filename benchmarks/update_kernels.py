"""What the first-layer Adam update costs per step, and what other kernels would save.

The update of the wide first-layer weights (3,072 x 20 x 50 float32, one group of the default
sweep) is the largest element-wise cost of training (`sweep_speed.py --profile`). This benchmark
times one Adam step on that array, in the layouts and kernels below, and checks that each gives
the same bits as bnexp's (which must keep the CS231n formulas' order of operations: the published
numbers are reproduced bit for bit):

- ``NumPy, blocks of N KiB``: `bnexp.train._Updater` with the kernel off (``BNEXP_FUSED=0``): the
  NumPy formulas run on row blocks of about N KiB per array so the temporaries stay in cache (the
  default block is ``train.UPDATE_BLOCK_BYTES``);
- ``NumPy, whole array``: the same formulas on the whole array at once (one pass per operation);
- ``numexpr (fused)``: the formulas fused into one pass per output (m, v, w), when numexpr is
  installed (not a dependency: ``pip install numexpr`` to compare);
- ``bnexp fused (C)``: `bnexp.fused`, what `_Updater` runs when the extension `bnexp._kernels`
  is built (one compiled, vectorized pass); its import time is printed beside it.

The traffic floor is the 7 array passes Adam cannot avoid (read w, dw, m, v; write w, m, v) at the
measured single-core stream bandwidth (`floor.stream_bandwidth_one_core`). Rounds are interleaved
(every kernel once per round) and medians reported. ``--procs 2`` runs the same measurement in two
processes at once, as the two groups of the default sweep train (the slower median is printed).

Usage: ``python benchmarks/update_kernels.py [--rounds 15] [--procs 1|2]``
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

import numpy as np
from floor import stream_bandwidth_one_core
from threadpoolctl import threadpool_limits

from bnexp import fused, train

SHAPE = (3072, 20 * 50)  # the wide first-layer weights of one group of the default sweep
LEARNING_RATE = 1e-3
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def _inputs(seed: int = 0):
    """w, dw, m, v after a few steps' worth of statistics (float32, SHAPE)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(SHAPE).astype(np.float32)
    dw = (rng.standard_normal(SHAPE) * 1e-2).astype(np.float32)
    m = (rng.standard_normal(SHAPE) * 1e-3).astype(np.float32)
    v = (rng.random(SHAPE) * 1e-4).astype(np.float32)
    return w, dw, m, v


def updater_kernel(block_bytes: int | None, use_kernel: bool):
    """bnexp's `_Updater` in blocks of `block_bytes` (None: the whole array at once), with the
    compiled kernel on or off (`bnexp.fused`)."""
    saved = train.UPDATE_BLOCK_BYTES
    if block_bytes is not None:
        train.UPDATE_BLOCK_BYTES = block_bytes
    try:
        updater = train._Updater("adam", SHAPE, 4, lr_axis0=False, single=block_bytes is None)
    finally:
        train.UPDATE_BLOCK_BYTES = saved
    updater.set_learning_rate(np.full((1, SHAPE[1]), LEARNING_RATE, np.float32))

    def step(w, dw, m, v, t):
        os.environ[fused.ENV_FUSED] = "1" if use_kernel else "0"
        # The moments are views of m and v (updated in place), as in training.
        for state, blk in zip(updater.states, updater.blocks, strict=True):
            state.update(m=m[blk], v=v[blk], t=t - 1)
            wb = w[blk]
            updater.rule(wb, dw[blk], state, inplace=True, scratch=_scratch(updater, wb))

    return step


def _scratch(updater, wb):
    scratch = updater.scratch.get(wb.shape)
    if scratch is None:
        scratch = updater.scratch[wb.shape] = (np.empty_like(wb), np.empty_like(wb))
    return scratch


def _constants(t: int) -> dict:
    """The formulas' constants as float32 0-d arrays (float32 arithmetic, as NumPy does it)."""
    values = {
        "b1": BETA1, "c1": 1 - BETA1, "b2": BETA2, "c2": 1 - BETA2,
        "k1": 1 - BETA1**t, "k2": 1 - BETA2**t, "lr": LEARNING_RATE, "eps": EPS,
    }  # fmt: skip
    return {name: np.asarray(value, dtype=np.float32) for name, value in values.items()}


def numexpr_kernel():
    """Adam fused with numexpr, one evaluation per output; None when numexpr is missing."""
    try:
        import numexpr
    except ImportError:
        return None
    numexpr.set_num_threads(1)

    def step(w, dw, m, v, t):
        c = _constants(t)
        numexpr.evaluate("b1*m + c1*g", local_dict={**c, "m": m, "g": dw}, out=m)
        numexpr.evaluate("b2*v + c2*(g*g)", local_dict={**c, "v": v, "g": dw}, out=v)
        expr = "w - (m/k1*lr)/(sqrt(v/k2) + eps)"
        numexpr.evaluate(expr, local_dict={**c, "w": w, "m": m, "v": v}, out=w)

    return step


def import_seconds() -> float:
    """Seconds a fresh Python process takes to import `bnexp._kernels` (the start-up it costs)."""
    code = (
        "import time; s = time.perf_counter(); import bnexp._kernels; "
        "print(time.perf_counter() - s)"
    )
    return float(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
    )


def kernels() -> tuple[dict, dict]:
    """{name: step}, {name: note} of every kernel available here."""
    found = {"NumPy, whole array": updater_kernel(None, use_kernel=False)}
    for kib in (256, 1024, 4096):
        found[f"NumPy, blocks of {kib} KiB"] = updater_kernel(kib * 1024, use_kernel=False)
    notes = {f"NumPy, blocks of {train.UPDATE_BLOCK_BYTES // 1024} KiB": "without the extension"}
    step = numexpr_kernel()
    if step is not None:
        found["numexpr (fused)"] = step
    os.environ[fused.ENV_FUSED] = "1"
    if fused.enabled():
        found["bnexp fused (C)"] = updater_kernel(None, use_kernel=True)
        notes["bnexp fused (C)"] = f"import {import_seconds() * 1e3:.1f} ms"
    return found, notes


def same_bits(found: dict, reference: str) -> dict:
    """{name: True when a step from the same inputs gives bnexp's bits in w, m and v}."""
    results = {}
    for name, step in found.items():
        arrays = [a.copy() for a in _inputs()]
        step(*arrays, 3)
        results[name] = arrays
    ref = results[reference]
    return {
        name: all(np.array_equal(a, b) for a, b in zip(arrays, ref, strict=True))
        for name, arrays in results.items()
    }


def measure(rounds: int) -> dict:
    """{name: [ms of one step per round]}, one BLAS thread, kernels interleaved per round."""
    found, _ = kernels()
    w, dw, m, v = _inputs()
    times = {name: [] for name in found}
    with threadpool_limits(1):
        for _ in range(rounds):
            for name, step in found.items():
                start = time.perf_counter()
                step(w, dw, m, v, 5)
                times[name].append(1e3 * (time.perf_counter() - start))
    return times


def _worker(rounds: int, queue) -> None:
    queue.put(measure(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--procs", type=int, choices=(1, 2), default=1)
    args = parser.parse_args()

    found, notes = kernels()
    reference = f"NumPy, blocks of {train.UPDATE_BLOCK_BYTES // 1024} KiB"
    bits = same_bits(found, reference)
    if args.procs == 1:
        per_proc = [measure(args.rounds)]
    else:
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(args.rounds, queue)) for _ in range(2)]
        for p in procs:
            p.start()
        per_proc = [queue.get() for _ in procs]
        for p in procs:
            p.join()
    bandwidth = stream_bandwidth_one_core()
    floor_ms = 1e3 * 7 * 4 * np.prod(SHAPE) / (bandwidth * 1e9)

    print(f"Adam on the wide first layer {SHAPE} float32, {args.procs} process(es) at once")
    print(f"{'kernel':28} {'ms/step':>8} {'x floor':>8}  same bits  note")
    print("-" * 72)
    for name in found:
        ms = max(statistics.median(times[name]) for times in per_proc)
        same = "yes" if bits[name] else "NO"
        print(f"{name:28} {ms:8.2f} {ms / floor_ms:8.2f}  {same:9}  {notes.get(name, '')}")
    print(f"traffic floor: 7 passes of {4 * np.prod(SHAPE) / 1e6:.1f} MB at {bandwidth:.1f} GB/s "
          f"(one core) = {floor_ms:.2f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
