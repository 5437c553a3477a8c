"""Shared fixtures: where the real CIFAR-10 copy is, and a guard against an empty test run."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The real CIFAR-10 folder from BNEXP_DATA_DIR.

    Skips (with the reason) when the variable is unset, so a fresh clone's tests pass without the
    150 MB download; fails when it is set but holds no CIFAR-10, so CI cannot silently skip.
    """
    value = os.environ.get("BNEXP_DATA_DIR")
    if not value:
        pytest.skip("BNEXP_DATA_DIR is not set: real-data test skipped")
    path = Path(value)
    layouts = [path / "cifar-10-batches-bin", path / "cifar-10-batches-py"]
    if not any(p.is_dir() for p in layouts):
        pytest.fail(
            f"BNEXP_DATA_DIR={value} holds neither cifar-10-batches-bin/ nor cifar-10-batches-py/"
        )
    return path


def pytest_sessionfinish(session, exitstatus):
    """Treat 'no tests collected' as a failure (exit code 5 is easy to mistake for green)."""
    if session.testscollected == 0:
        session.exitstatus = 1
