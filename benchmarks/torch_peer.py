"""bnexp against a PyTorch CPU peer on the default sweep, as whole processes, interleaved.

The peer is the sweep as a PyTorch user writes it: the 40 networks (20 weight scales x batch
norm or not; hidden [50]*7, W ~ scale * N(0, 1), b = 0) trained one after another with
``torch.optim.Adam(lr=1e-3)``, 200 steps of batch 50 drawn with replacement from the same 1,000
CIFAR-10 images, BatchNorm1d (momentum 0.1, PyTorch's spelling of CS231n's 0.9), and the Solver's
11 accuracy checks on the 1,000 training and 1,000 validation images (eval mode), then the test
accuracy. It reads the prepared splits through bnexp.data (not timed apart: both sides load
them). bnexp runs ``bnexp sweep-init -o TMP --no-plot`` (default --jobs). The two alternate for
`--rounds` rounds (A B A B ...); the table shows each side's median wall time and their ratio.

torch is an optional extra (``pip install -e '.[torch]'``); this script is not part of the tests.

Usage: ``BNEXP_DATA_DIR=... python benchmarks/torch_peer.py [--rounds 3] [--threads 2]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peer(data_dir: str, threads: int) -> None:
    """The PyTorch sweep (runs inside a child process)."""
    import numpy as np
    import torch

    from bnexp import data as bdata

    torch.set_num_threads(threads)
    splits = bdata.load_splits(bdata.resolve_data_dir(data_dir))
    to = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    xtr, xva, xte = to(splits.X_train), to(splits.X_val), to(splits.X_test)
    ytr, yva, yte = (torch.as_tensor(y) for y in (splits.y_train, splits.y_val, splits.y_test))
    gen = torch.Generator().manual_seed(0)
    for scale in np.logspace(-4, 0, 20):
        for batchnorm in (True, False):
            layers, din = [], 3072
            for h in [50] * 7:
                layers.append(torch.nn.Linear(din, h))
                if batchnorm:
                    layers.append(torch.nn.BatchNorm1d(h, momentum=0.1))
                layers.append(torch.nn.ReLU())
                din = h
            layers.append(torch.nn.Linear(din, 10))
            net = torch.nn.Sequential(*layers)
            with torch.no_grad():
                for m in net:
                    if isinstance(m, torch.nn.Linear):
                        m.weight.normal_(0.0, float(scale), generator=gen)
                        m.bias.zero_()
            opt = torch.optim.Adam(net.parameters(), lr=1e-3)
            for t in range(200):
                net.train()
                idx = torch.randint(0, xtr.shape[0], (50,), generator=gen)
                loss = torch.nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if t == 0 or (t + 1) % 20 == 0:
                    net.eval()
                    with torch.no_grad():
                        (net(xtr).argmax(1) == ytr).float().mean()
                        (net(xva).argmax(1) == yva).float().mean()
            net.eval()
            with torch.no_grad():
                (net(xte).argmax(1) == yte).float().mean()


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("BNEXP_DATA_DIR"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.data_dir:
        sys.exit("error: set BNEXP_DATA_DIR or --data-dir to the CIFAR-10 folder")
    if args.peer:
        peer(args.data_dir, args.threads)
        return
    ours, theirs = [], []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "bnexp", "sweep-init", "-o", tmp + "/out", "--no-plot"]
            ours.append(timed([*cmd, "--data-dir", args.data_dir]))
        me = [sys.executable, __file__, "--peer", "--data-dir", args.data_dir]
        theirs.append(timed([*me, "--threads", str(args.threads)]))
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"{'side':<40} {'median s':>9}  rounds")
    print(f"{'bnexp sweep-init --no-plot':<40} {a:9.2f}  {', '.join(f'{t:.1f}' for t in ours)}")
    label = f"PyTorch CPU, one net at a time, {args.threads} thr"
    print(f"{label:<40} {b:9.2f}  {', '.join(f'{t:.1f}' for t in theirs)}")
    print(f"ratio (PyTorch / bnexp): {b / a:.2f}x")


if __name__ == "__main__":
    main()
