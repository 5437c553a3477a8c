"""Click commands only: parse arguments, call one library function, turn BnexpError into one line.

Progress and logs go to stderr, results to files (and a summary table on stdout).
"""

from __future__ import annotations

import functools
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
