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
            click.echo("interrupted: finished runs are kept; run the same command to resume", err=True)
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
