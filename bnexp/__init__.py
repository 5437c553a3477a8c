"""bnexp: batch normalization experiments on CIFAR-10 with a hand-written NumPy network.

The few things a notebook needs, importable from the package itself::

    import bnexp
    cfg = bnexp.load_config("configs/bn_vs_baseline.yaml", ["train.epochs=2"])
    result = bnexp.run_experiment(cfg, "my_results", data_dir="path/to/cifar10")
    rows = bnexp.read_results("my_results")   # one dict per finished run
    print(bnexp.summary_table(rows))

Each name is imported on first use, so ``import bnexp`` stays cheap (the CLI imports it too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["__version__", "load_config", "read_results", "run_experiment", "summary_table"]

if TYPE_CHECKING:  # pragma: no cover
    from bnexp.config import load_config
    from bnexp.records import read_results
    from bnexp.report import summary_table
    from bnexp.sweep import run_experiment

_HOMES = {
    "load_config": "bnexp.config",
    "read_results": "bnexp.records",
    "run_experiment": "bnexp.sweep",
    "summary_table": "bnexp.report",
}


def __getattr__(name: str):
    """Import a public name from its module on first use."""
    if name not in _HOMES:
        raise AttributeError(f"module 'bnexp' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOMES[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
