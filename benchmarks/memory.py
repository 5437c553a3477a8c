"""Time and peak memory of the 40-network sweep for growing training sets (one epoch each).

Each row runs ``python -m bnexp sweep-init data.num_train=N train.epochs=1 --no-plot -o TMP``
(the default --jobs: one worker per CPU) as a whole process and samples, every SAMPLE_PERIOD
seconds, /proc/<pid>/smaps_rollup of the command and of every process under it. It prints:

- seconds: wall time of the whole command (start-up and data loading included);
- us/(img*ep): that time per training image and epoch; linear time keeps it constant (the
  start-up, data loading and the fixed validation checks make the small sizes dearer);
- peak PSS: the largest sum of the processes' proportional set sizes seen (a page shared by two
  processes counts half in each), the memory the command really holds;
- peak RSS sum: the largest sum of resident sizes, which counts a shared page once per process
  (what adding up `top`'s RES column would say);
- max RSS: the largest resident size of one process seen.

Sizes run in interleaved rounds (all sizes, then all sizes again) so that load from other work
on the machine slows every size alike; the table prints medians. Linux only (/proc).

Usage: ``BNEXP_DATA_DIR=/path/to/cifar10 python benchmarks/memory.py [--sizes 1000,10000,49000]
[--rounds 1] [--compare NAME=SRC_DIR ...]``; ``--compare`` adds rows for another source tree
(e.g. a checkout of an older commit made with ``git worktree add``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE_PERIOD = 0.1
MB = 1e6


def descendants(pid: int) -> list[int]:
    """pid and every process below it (via /proc/<pid>/task/<tid>/children)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue  # ended between two reads
    return found


def rollup(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of one process in bytes; (0, 0) once it has ended."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
    except OSError:
        pass
    return pss, rss


def measure(cmd: list[str], env: dict) -> dict:
    """Run cmd to the end; its wall time, peak PSS and RSS sums and largest RSS of one process."""
    start = time.perf_counter()
    child = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tempfile.gettempdir()
    )
    peak_pss = peak_rss = maxrss = 0
    while child.poll() is None:
        sizes = [rollup(p) for p in descendants(child.pid)]
        peak_pss = max(peak_pss, sum(s[0] for s in sizes))
        peak_rss = max(peak_rss, sum(s[1] for s in sizes))
        maxrss = max([maxrss] + [s[1] for s in sizes])
        time.sleep(SAMPLE_PERIOD)
    wall = time.perf_counter() - start
    stderr = child.stderr.read().decode(errors="replace")
    if child.returncode:
        sys.exit(f"failed ({child.returncode}): {' '.join(cmd)}\n{stderr}")
    return {"seconds": wall, "pss": peak_pss, "rss": peak_rss, "maxrss": maxrss}


def sweep_command(n: int, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "bnexp", "sweep-init", f"data.num_train={n}", "train.epochs=1",
        "--no-plot", "-o", str(out),
    ]  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,49000", help="num_train values")
    parser.add_argument("--rounds", type=int, default=1, help="rounds over all sizes")
    parser.add_argument(
        "--compare", action="append", default=[], metavar="NAME=SRC_DIR",
        help="also measure the bnexp of another source tree",
    )  # fmt: skip
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if not os.environ.get("BNEXP_DATA_DIR"):
        sys.exit("set BNEXP_DATA_DIR to a folder holding CIFAR-10")
    trees = {"this": REPO}
    for item in args.compare:
        name, _, src = item.partition("=")
        trees[name] = Path(src).resolve()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows: dict[tuple[str, int], list[dict]] = {(t, n): [] for t in trees for n in sizes}
    tmp = Path(tempfile.mkdtemp(prefix="bnexp-memory-"))
    try:
        for _ in range(args.rounds):
            for n in sizes:
                for name, src in trees.items():
                    env = {**os.environ, "PYTHONPATH": str(src)}
                    out = tmp / f"{name}-{n}"
                    shutil.rmtree(out, ignore_errors=True)
                    rows[name, n].append(measure(sweep_command(n, out), env))
                    print(f"  {name} num_train={n}: {rows[name, n][-1]['seconds']:.1f} s",
                          file=sys.stderr)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows, trees, sizes, args.rounds)


def print_table(rows, trees, sizes, rounds: int) -> None:
    print(f"sweep-init, 40 nets, 1 epoch, default --jobs ({os.cpu_count()} CPUs), "
          f"medians of {rounds} round(s)")  # fmt: skip
    head = f"{'tree':<8}{'num_train':>10}{'seconds':>9}{'us/(img*ep)':>13}"
    print(head + f"{'peak PSS MB':>13}{'peak RSS sum MB':>17}{'max RSS MB':>12}")
    for name in trees:
        for n in sizes:
            runs = rows[name, n]
            sec = statistics.median(r["seconds"] for r in runs)
            pss = statistics.median(r["pss"] for r in runs) / MB
            rss = statistics.median(r["rss"] for r in runs) / MB
            maxrss = max(r["maxrss"] for r in runs) / MB
            print(f"{name:<8}{n:>10}{sec:>9.2f}{sec / n * 1e6:>13.1f}"
                  f"{pss:>13.0f}{rss:>17.0f}{maxrss:>12.0f}")  # fmt: skip
    print("peak PSS: largest sum over the command's processes of /proc/<pid>/smaps_rollup Pss,")
    print(f"sampled every {SAMPLE_PERIOD} s; max RSS: largest resident size of one process")


if __name__ == "__main__":
    main()
