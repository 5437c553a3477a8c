"""Domain errors. The CLI turns each into one line on stderr and the class's exit code.

Exit codes: 1 other, 2 config, 3 data, 4 output; 130 Ctrl-C (SIGINT), 143 SIGTERM (both keep
finished runs and mark the manifest "interrupted").
"""


class BnexpError(Exception):
    """Base class: a problem the user can fix; its message says what, where and how."""

    exit_code = 1


class ConfigError(BnexpError):
    """Malformed YAML, unknown key, wrong type or impossible value in a config or override."""

    exit_code = 2


class DataError(BnexpError):
    """CIFAR-10 missing, truncated, corrupt, or cannot be downloaded."""

    exit_code = 3


class OutputError(BnexpError):
    """The output folder cannot be written, or holds results of a different config."""

    exit_code = 4


class ClusterError(BnexpError):
    """Dask is not installed, or its scheduler cannot be reached or went away mid-run."""

    exit_code = 5


class Terminated(KeyboardInterrupt):
    """SIGTERM (from `timeout`, Slurm, a container runtime), handled like Ctrl-C: finished work
    is kept and the process exits with 143 (128 + SIGTERM) instead of 130."""


def excerpt(value: object, width: int = 40) -> str:
    """repr(value) cut to `width` characters, so an error line never quotes a huge value."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
