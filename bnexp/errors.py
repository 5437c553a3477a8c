"""Domain errors. The CLI turns each into one line on stderr and the class's exit code."""


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
