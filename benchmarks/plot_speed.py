"""Time `bnexp plot` and `bnexp show` on a result folder as whole processes (Python start-up and
imports included).

The folder is copied to a temporary directory first (never written in place), once per source
tree, and each row runs ``python -m bnexp plot COPY`` with PYTHONPATH set to its tree. Runs are
interleaved (A B A B ...) so that a machine shared with other work slows every row alike. The
table prints the median and the fastest wall time and the median CPU time (user + system) of
each row (children included: `bnexp plot` draws one figure in a forked process). Reference rows
time ``python -c pass`` (the interpreter's start) and ``python -c "import matplotlib.figure"``,
the start-up every figure pays: together with reading the records they bound `bnexp plot`.

Usage: ``python benchmarks/plot_speed.py [RESULT_DIR] [--runs N] [--compare NAME=SRC_DIR ...]``.
RESULT_DIR defaults to results/weight_init_sweep (the default sweep, 40 runs). ``--compare``
adds rows for other source trees, e.g. a checkout of an older commit:
``git worktree add /tmp/old HEAD~3 && python benchmarks/plot_speed.py --compare old=/tmp/old``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MATPLOTLIB_IMPORT = ("import matplotlib.figure",)


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds user + system) of one child process; it must succeed."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    # cwd: `python -m` puts the working directory first on sys.path, before PYTHONPATH.
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def plot_command(folder: Path) -> list[str]:
    return [sys.executable, "-m", "bnexp", "plot", str(folder)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("result_dir", nargs="?", default=str(REPO / "results/weight_init_sweep"))
    parser.add_argument("--runs", type=int, default=7, help="runs of each row (default 7)")
    parser.add_argument(
        "--compare", action="append", default=[], metavar="NAME=SRC_DIR",
        help="also time the bnexp of another source tree",
    )  # fmt: skip
    return parser.parse_args()


def rows_to_time(args: argparse.Namespace, tmp: Path) -> dict[str, tuple[list[str], dict]]:
    """Row name -> (command, environment); each bnexp row plots its own copy of the folder."""
    trees = [("this tree", REPO)]
    for item in args.compare:
        name, _, src = item.partition("=")
        trees.append((name, Path(src).resolve()))
    floor = [sys.executable, "-c", *MATPLOTLIB_IMPORT]
    rows = {
        "python start only": ([sys.executable, "-c", "pass"], dict(os.environ)),
        "matplotlib import only": (floor, dict(os.environ)),
    }
    for i, (name, src) in enumerate(trees):
        copy = tmp / f"result{i}"
        shutil.copytree(args.result_dir, copy)
        shutil.rmtree(copy / "plots", ignore_errors=True)
        env = {**os.environ, "PYTHONPATH": str(src)}
        rows[f"bnexp plot ({name})"] = (plot_command(copy), env)
        rows[f"bnexp show ({name})"] = ([sys.executable, "-m", "bnexp", "show", str(copy)], env)
    return rows


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bnexp-plot-speed-") as tmp:
        rows = rows_to_time(args, Path(tmp))
        for cmd, env in rows.values():  # warm the file cache; not timed
            timed(cmd, env)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
        for _ in range(args.runs):
            for name, (cmd, env) in rows.items():
                times[name].append(timed(cmd, env))
    print(f"{Path(args.result_dir).name}: {args.runs} interleaved runs each, {os.cpu_count()} CPUs")
    print(f"{'':32}  {'median s':>8}  {'fastest s':>9}  {'median CPU s':>12}")
    for name, samples in times.items():
        walls, cpus = [w for w, _ in samples], [c for _, c in samples]
        print(
            f"{name:32}  {statistics.median(walls):8.2f}  {min(walls):9.2f}  "
            f"{statistics.median(cpus):12.2f}"
        )


if __name__ == "__main__":
    main()
