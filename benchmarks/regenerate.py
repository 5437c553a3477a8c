"""Regenerate every shipped result folder and time it.

Each folder under ``results/`` records in its ``manifest.json`` the command that made it (for
example ``bnexp sweep-init -c configs/gradient_flow.yaml``). This script re-runs exactly that
command for every folder into a fresh ``INTO/<name>``, one after another with the default
``--jobs``, and prints a table of the whole-process seconds of each and their sum. The data
folder comes from ``--data-dir`` or ``BNEXP_DATA_DIR`` (a recorded ``--data-dir`` names only the
folder, never its path, so it is replaced).

By default the folders are written to a fresh temporary folder and the shipped results are left
alone; ``--into results`` regenerates the shipped results in place (from a clean checkout, so
their manifests name a commit). Either way each new ``results.csv`` is compared with the shipped
one, every column but ``seconds`` (the only column that depends on the machine's load): ``same``,
or how many rows differ and in which columns.

Usage: ``BNEXP_DATA_DIR=... python benchmarks/regenerate.py [--into DIR] [NAME ...]``
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def recorded_command(folder: Path) -> list[str]:
    """The bnexp arguments a result folder was made with, without ``--data-dir`` and ``-o``."""
    argv = json.loads((folder / "manifest.json").read_text())["command"][1:]
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--data-dir", "-o", "--out"):
            skip = True
        elif not arg.startswith(("--data-dir=", "--out=")):
            kept.append(arg)
    return kept


def rows_without_seconds(text: str) -> list[dict]:
    rows = csv.DictReader(text.splitlines())
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def compare(shipped: str, regenerated: str) -> str:
    """``same`` when every row of two results.csv texts agrees in every column but ``seconds``,
    else what differs."""
    old, new = rows_without_seconds(shipped), rows_without_seconds(regenerated)
    if len(old) != len(new) or (old and old[0].keys() != new[0].keys()):
        return "different columns or row count"
    differing = [a != b for a, b in zip(old, new, strict=True)]
    columns = sorted({k for a, b in zip(old, new, strict=True) for k in a if a[k] != b[k]})
    if not columns:
        return "same"
    return f"{sum(differing)} of {len(old)} rows differ in {', '.join(columns)}"


def regenerate(name: str, into: Path, data_dir: str) -> tuple[float, str]:
    """Re-run one folder's recorded command into a fresh ``into/name``; its seconds and how its
    results.csv compares with the shipped one."""
    shipped = (RESULTS / name / "results.csv").read_text()
    out = into / name
    # A finished folder trains nothing again (not even with --force, which only lets another
    # config in), so the command always writes a fresh folder. In place, the old one is set
    # aside and put back if the command fails; the default OUT (results/<name>) keeps the
    # recorded command as it was.
    in_place = into.resolve() == RESULTS.resolve()
    aside = RESULTS / f".{name}.old"
    if in_place:
        out.rename(aside)
    args = recorded_command(RESULTS / name if not in_place else aside)
    args += [] if in_place else ["-o", str(out)]
    env = {**os.environ, "BNEXP_DATA_DIR": data_dir}
    start = time.perf_counter()
    try:
        subprocess.run([sys.executable, "-m", "bnexp", *args], check=True, cwd=ROOT, env=env,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    except BaseException:
        if in_place:
            shutil.rmtree(out, ignore_errors=True)
            aside.rename(out)
        raise
    seconds = time.perf_counter() - start
    if in_place:
        shutil.rmtree(aside)
    return seconds, compare(shipped, (out / "results.csv").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="result folders to regenerate (default: all)")
    parser.add_argument("--data-dir", default=os.environ.get("BNEXP_DATA_DIR"))
    parser.add_argument("--into", type=Path, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    if not args.data_dir:
        sys.exit("error: set BNEXP_DATA_DIR or --data-dir to the CIFAR-10 folder")
    names = args.names or sorted(p.parent.name for p in RESULTS.glob("*/manifest.json"))
    with tempfile.TemporaryDirectory() as tmp:
        into = args.into or Path(tmp)
        total = 0.0
        print(f"{'result folder':28s} {'seconds':>8s}  results.csv against the shipped one")
        for name in names:
            seconds, verdict = regenerate(name, into, args.data_dir)
            total += seconds
            print(f"{name:28s} {seconds:8.1f}  {verdict}", flush=True)
        print(f"{'all':28s} {total:8.1f}  ({total / 60:.1f} min)")


if __name__ == "__main__":
    main()
