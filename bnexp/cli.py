"""Click commands only: parse arguments, call one library function, turn BnexpError into one line.

Progress and logs go to stderr, results to files (and a summary table on stdout).
"""

from __future__ import annotations

import functools
import os
import sys

import click

from bnexp import __version__
from bnexp.errors import BnexpError


def reports_errors(command):
    """Run a command body; a BnexpError becomes `error: ...` on stderr and its exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BnexpError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo(
                "interrupted: finished runs are kept; run the same command to resume", err=True
            )
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnexp")
def main():
    """Batch normalization experiments on CIFAR-10 (Ioffe & Szegedy 2015, CS231n)."""


# --- data -----------------------------------------------------------------------------------


@main.group()
def data():
    """Locate, download and inspect CIFAR-10."""


_data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder holding cifar-10-batches-bin/ or -py/ [default: $BNEXP_DATA_DIR, else "
    "$XDG_CACHE_HOME/bnexp].",
)


@data.command("info")
@_data_dir_option
@reports_errors
def data_info(data_dir):
    """Print where CIFAR-10 is, its layout, image counts and checksums."""
    from bnexp import data as data_lib

    click.echo(data_lib.describe(data_lib.resolve_data_dir(data_dir)))


@data.command("download")
@_data_dir_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["binary", "python"]),
    default="binary",
    show_default=True,
    help="Official archive: binary records or python pickles.",
)
@click.option("--url", default=None, help="Mirror of the official archive (MD5 still checked).")
@reports_errors
def data_download(data_dir, fmt, url):
    """Download the official CIFAR-10 archive, verify its MD5 and unpack it."""
    from bnexp import data as data_lib

    path = data_lib.download(data_lib.resolve_data_dir(data_dir), fmt=fmt, url=url, progress=True)
    click.echo(str(path))


# --- experiments ----------------------------------------------------------------------------


def _experiment_options(command):
    """Options shared by `train` and `sweep-init`."""
    options = [
        click.option(
            "-c",
            "--config",
            "config_path",
            type=click.Path(dir_okay=False),
            multiple=True,
            help="Experiment YAML over the command's default experiment (configs/); repeat to "
            "layer several, a later file wins.",
        ),
        click.option(
            "-o",
            "--out",
            type=click.Path(file_okay=False),
            default=None,
            help="Output folder [default: results/<config name>/].",
        ),
        _data_dir_option,
        click.option(
            "--jobs",
            "-j",
            type=click.IntRange(min=1),
            default=None,
            help="Worker processes, each training whole lockstep groups with one BLAS thread; "
            "results do not depend on it [default: the number of CPUs].",
        ),
        click.option(
            "--force", is_flag=True, help="Write into OUT even if it holds a different config."
        ),
        click.option("--no-plot", is_flag=True, help="Skip drawing the figures at the end."),
        click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]..."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _run(command_name, config_path, out, data_dir, jobs, force, no_plot, overrides):
    """Load the config, run the experiment, print the summary table and where things are."""
    from pathlib import Path

    from bnexp.config import load_config
    from bnexp.report import summary_table
    from bnexp.sweep import run_experiment

    cfg = load_config(config_path, overrides, command=command_name)
    out = Path(out) if out is not None else Path("results") / cfg.name
    if jobs is None:
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result = run_experiment(
        cfg,
        out,
        data_dir=data_dir,
        jobs=jobs,
        force=force,
        plot=not no_plot,
        log=lambda message: click.echo(message, err=True),
    )
    click.echo(summary_table(result.summaries))
    click.echo(
        f"\n{result.trained} runs trained, {result.skipped} already finished; "
        f"results in {result.out}/results.csv"
    )
    for path in result.plots:
        if path.suffix == ".png":
            click.echo(f"figure: {path}")


@main.command()
@_experiment_options
@reports_errors
def train(config_path, out, data_dir, jobs, force, no_plot, overrides):
    """Train the deep network with and without batch norm (configs/bn_vs_baseline.yaml).

    KEY=VALUE overrides use dotted config keys, e.g. train.epochs=3 seed=7 rng=cs231n.
    """
    _run("train", config_path, out, data_dir, jobs, force, no_plot, overrides)


@main.command("sweep-init")
@_experiment_options
@reports_errors
def sweep_init(config_path, out, data_dir, jobs, force, no_plot, overrides):
    """Sweep 20 weight-initialization scales with and without batch norm
    (configs/weight_init_sweep.yaml).

    KEY=VALUE overrides use dotted config keys, e.g. "model.weight_scale={logspace: [-4, 0, 5]}".
    """
    _run("sweep-init", config_path, out, data_dir, jobs, force, no_plot, overrides)


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@reports_errors
def plot(out):
    """(Re)draw the figures of a finished or partial result folder OUT (never retrains)."""
    from bnexp.plots import plot_results

    for path in plot_results(out):
        click.echo(f"figure: {path}")
