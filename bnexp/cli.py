"""Click commands only: parse arguments, call one library function, turn BnexpError into one line.

Progress and logs go to stderr, results to files (and a summary table on stdout).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import signal
import sys
from pathlib import Path

import click

from bnexp import __version__
from bnexp import download as download_limits  # light: its network modules load on use
from bnexp.errors import BnexpError, Terminated

#: Exit codes of an interrupted command: 128 + the signal number, as a shell reports it.
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Turn SIGTERM (timeout, Slurm, docker stop) into `Terminated`, a KeyboardInterrupt, so it
    shuts down like Ctrl-C: workers stopped, finished runs kept, manifest 'interrupted'."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (e.g. an embedding application): leave it alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def reports_errors(
    command=None, *, interrupted="finished runs are kept; run the same command to resume"
):
    """Run a command body; a BnexpError becomes `error: ...` on stderr and its exit code, Ctrl-C
    exit 130 and SIGTERM exit 143, after one `interrupted: ...` line saying what was kept."""
    if command is None:
        return functools.partial(reports_errors, interrupted=interrupted)

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with _sigterm_as_interrupt():
                return command(*args, **kwargs)
        except BnexpError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:
            click.echo(f"interrupted: {interrupted}", err=True)
            sys.exit(EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT)

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
@click.option(
    "--stall-timeout",
    type=click.FloatRange(0, download_limits.STALE_AGE, min_open=True),
    default=download_limits.DEFAULT_STALL_TIMEOUT,
    show_default=True,
    metavar="SECONDS",
    help="Give up when no byte arrives for this long.",
)
@click.option(
    "--deadline",
    type=click.FloatRange(0, download_limits.STALE_AGE, min_open=True),
    default=download_limits.DEFAULT_DEADLINE,
    show_default=True,
    metavar="SECONDS",
    help="Give up when the whole transfer takes longer than this.",
)
@reports_errors(interrupted="nothing was kept; run the same command to download again")
def data_download(data_dir, fmt, url, stall_timeout, deadline):
    """Download the official CIFAR-10 archive, verify its MD5 and unpack it.

    Nothing partial is left behind: not on errors, not on Ctrl-C or SIGTERM; temporaries of a
    killed download are removed by the next one.
    """
    from bnexp import data as data_lib

    path = data_lib.download(
        data_lib.resolve_data_dir(data_dir),
        fmt=fmt,
        url=url,
        progress=True,
        stall_timeout=stall_timeout,
        deadline=deadline,
    )
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
            # Not click.Path(file_okay=False): a file in the way is an output error (exit 4),
            # reported by bnexp.records like every other unusable OUT.
            type=click.Path(),
            default=None,
            help="Output folder [default: results/<config name>/, or results/<config name>-<hash>/ "
            "with KEY=VALUE overrides]. One bnexp process at a time: a second one on the same "
            "folder stops (exit 4).",
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
            "--scheduler",
            envvar="BNEXP_SCHEDULER",
            default=None,
            metavar="ADDRESS",
            help="Run each lockstep group as a task on this Dask scheduler (tcp://host:8786), "
            "or on a local cluster of N one-thread workers (local:N); needs the dask extra "
            "[env: BNEXP_SCHEDULER].",
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


def default_output_dir(cfg, overrides) -> Path:
    """results/<name>, or results/<name>-<8 hex of the resolved config> when KEY=VALUE overrides
    changed it: an overridden experiment never lands in (or is refused by) the folder of the
    experiment it came from, and the same overrides always find their own folder again."""
    import dataclasses

    from bnexp.config import config_to_yaml

    if not overrides:
        return Path("results") / cfg.name
    # Without the claim: it describes the results, it does not change them.
    resolved = config_to_yaml(dataclasses.replace(cfg, claim=""))
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:8]
    return Path("results") / f"{cfg.name}-{digest}"


@contextlib.contextmanager
def _drawer(wanted: bool):
    """A `bnexp.drawing.Drawer` that readies matplotlib on a core training leaves idle while the
    runs train, when the figures are wanted and a second core exists; else None (draw here)."""
    from bnexp import drawing

    if not wanted or not drawing.can_fork():
        yield None
        return
    with drawing.Drawer() as drawer:
        yield drawer


def _run(command_name, config_path, out, data_dir, jobs, scheduler, force, no_plot, overrides):
    """Load the config, run the experiment, print the summary table and where things are."""

    from bnexp.config import load_config
    from bnexp.report import summary_table
    from bnexp.sweep import run_experiment

    cfg = load_config(config_path, overrides, command=command_name)
    if out is None:
        out = default_output_dir(cfg, overrides)
        click.echo(f"output: {out}", err=True)
    if jobs is None:
        jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with _drawer(not no_plot) as drawer:
        result = run_experiment(
            cfg,
            out,
            data_dir=data_dir,
            jobs=jobs,
            force=force,
            plot=not no_plot,
            log=lambda message: click.echo(message, err=True),
            scheduler=scheduler,
            draw=drawer and drawer.plot_results,
        )
    click.echo(summary_table(result.summaries))
    click.echo(
        f"\n{result.trained} runs trained, {result.skipped} already finished; "
        f"results in {result.out}/results.csv"
    )
    for path in result.plots:
        click.echo(f"figure: {path}")


@main.command()
@_experiment_options
@reports_errors
def train(config_path, out, data_dir, jobs, scheduler, force, no_plot, overrides):
    """Train the deep network with and without batch norm (configs/bn_vs_baseline.yaml).

    KEY=VALUE overrides use dotted config keys, e.g. train.epochs=3 seed=7 rng=cs231n.
    """
    _run("train", config_path, out, data_dir, jobs, scheduler, force, no_plot, overrides)


@main.command("sweep-init")
@_experiment_options
@reports_errors
def sweep_init(config_path, out, data_dir, jobs, scheduler, force, no_plot, overrides):
    """Sweep 20 weight-initialization scales with and without batch norm
    (configs/weight_init_sweep.yaml).

    KEY=VALUE overrides use dotted config keys, e.g. "model.weight_scale={logspace: [-4, 0, 5]}".
    """
    _run("sweep-init", config_path, out, data_dir, jobs, scheduler, force, no_plot, overrides)


_svg_option = click.option("--svg", is_flag=True, help="Also write each figure as SVG.")


@main.command()
@click.argument("out", type=click.Path())
@_svg_option
@click.option(
    "--x",
    "x_key",
    default=None,
    metavar="KEY",
    help="Swept number on the sweep figure's x axis, e.g. learning_rate or train.batch_size "
    "[default: the weight scale when it varies, else the setting with most values].",
)
@click.option(
    "--hue",
    "hue_key",
    default=None,
    metavar="KEY",
    help="Setting that colours the sweep figure's lines, e.g. train.batch_size "
    "[default: the normalization].",
)
@reports_errors
def plot(out, svg, x_key, hue_key):
    """(Re)draw the figures of a finished or partial result folder OUT (never retrains)."""
    from bnexp.plots import plot_results

    formats = ("png", "svg") if svg else ("png",)
    for path in plot_results(out, formats=formats, x=x_key, hue=hue_key):
        click.echo(f"figure: {path}")


@main.command()
@click.argument("out", type=click.Path())
@reports_errors
def show(out):
    """Print the summary table of a result folder OUT (offline: never trains, needs no data)."""
    from bnexp.records import read_current_summaries
    from bnexp.report import summary_table

    summaries, expected = read_current_summaries(out)

    click.echo(summary_table(summaries))
    click.echo(f"\n{len(summaries)} of {expected} runs finished in {out}")


@main.command()
@click.argument("outs", nargs=-1, type=click.Path(), metavar="[OUT]...")
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    default=None,
    metavar="FILE",
    help="The HTML file to write [default: results/report.html without OUT, else report.html].",
)
@reports_errors
def report(outs, output):
    """Write one self-contained HTML report of result folders OUT (default: every folder under
    results/): per experiment its claim, figures, headline numbers (mean ± SD over seeds) and
    provenance. Offline: never trains or redraws; the file needs no network and no script."""
    from bnexp.html_report import write_report

    path, count = write_report(outs, output, note=lambda line: click.echo(line, err=True))
    click.echo(f"report: {path} ({count} experiment{'s' if count != 1 else ''})")
