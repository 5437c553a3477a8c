"""Figures drawn in other processes: the same bytes as drawn in one process, errors passed on,
no temporary file or process left behind when drawing stops early."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fakecifar import make_images, write_binary

from bnexp import drawing, plots
from bnexp.errors import OutputError

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "results" / "weight_init_sweep"
#: A small sweep on generated data: 2 groups of 5 networks, 3 epochs.
SMALL = [
    "data.num_training=400", "data.num_validation=100", "data.num_test=50",
    "data.num_train=200", "model.hidden_dims=[32, 32, 32]", "train.epochs=3",
    "model.weight_scale={logspace: [-3, 0, 5]}",
]  # fmt: skip

pytestmark = pytest.mark.skipif(not drawing.can_fork(), reason="needs fork and two CPUs")


@pytest.fixture
def folders(tmp_path):
    """Two copies of the default sweep's records (40 runs), without their figures."""
    copies = []
    for name in ("a", "b"):
        shutil.copytree(SWEEP, tmp_path / name, ignore=shutil.ignore_patterns("plots"))
        copies.append(tmp_path / name)
    return copies


def figure_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "plots").iterdir())}


def test_figures_drawn_in_two_processes_are_the_bytes_of_one(folders, monkeypatch):
    forked, alone = folders
    paths = plots.plot_results(forked, formats=("png", "svg"))
    names = ["training_curves.png", "training_curves.svg"]
    assert [p.name for p in paths] == [*names, "weight_init_sweep.png", "weight_init_sweep.svg"]
    with monkeypatch.context() as m:
        m.setattr(drawing, "can_fork", lambda: False)  # everything in this process
        plots.plot_results(alone, formats=("png", "svg"))
    assert figure_bytes(forked) == figure_bytes(alone)


def test_the_forked_figure_error_is_raised_here_and_leaves_no_temporary(folders, monkeypatch):
    out = folders[0]

    def broken(*args, **kwargs):
        raise OutputError("the sweep figure broke")

    monkeypatch.setattr(plots, "build_sweep_figure", broken)  # runs in the forked child
    with pytest.raises(OutputError, match="the sweep figure broke"):
        plots.plot_results(out)
    assert sorted(figure_bytes(out)) == ["training_curves.png"]


def test_a_stopped_child_removes_its_temporary_file(tmp_path):
    def slow_write():
        def write(tmp):
            tmp.write_bytes(b"half")
            time.sleep(30)

        from bnexp import records

        records.atomic_write(tmp_path / "figure.png", write)

    child = drawing.Forked(slow_write)
    deadline = time.monotonic() + 10
    while not list(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [p.name.startswith(".figure.png.") for p in tmp_path.iterdir()] == [True]
    start = time.monotonic()
    child.kill()
    assert time.monotonic() - start < drawing.STOP_GRACE
    assert list(tmp_path.iterdir()) == []


def test_the_drawer_draws_the_same_figures_and_passes_errors_on(folders):
    drawn, alone = folders
    with drawing.Drawer() as drawer:
        paths = drawer.plot_results(drawn)
        with pytest.raises(OutputError, match="no finished run"):
            drawer.plot_results(drawn.parent / "empty")
        process = drawer.process
    assert not process.is_alive()
    assert [p.name for p in paths] == ["training_curves.png", "weight_init_sweep.png"]
    plots.plot_results(alone)
    assert figure_bytes(drawn) == figure_bytes(alone)


def test_a_drawer_still_warming_up_stops_at_once():
    def raising(signum, frame):  # as the CLI turns SIGTERM into an interrupt
        raise KeyboardInterrupt

    # The drawer is stopped at once, even before it has set its own handlers: it must not run
    # this one (which would unwind this process's code in the child), but end quietly.
    previous = signal.signal(signal.SIGTERM, raising)
    try:
        start = time.monotonic()
        for _ in range(3):
            with drawing.Drawer() as drawer:
                process = drawer.process
            assert not process.is_alive() and process.exitcode == 0
        assert time.monotonic() - start < 3 * drawing.STOP_GRACE
    finally:
        signal.signal(signal.SIGTERM, previous)


def _matplotlib_imported(args: list[str], cwd: Path, env: dict | None = None) -> bool:
    """Run `bnexp ARGS` in a fresh process; whether that process imported matplotlib."""
    script = (
        "import sys\n"
        "from bnexp.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print('matplotlib' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=cwd, env=env
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1] == "True"


def test_show_never_imports_matplotlib(tmp_path):
    """`bnexp show` prints a table: no second of matplotlib start-up."""
    shutil.copytree(SWEEP, tmp_path / "out")
    assert not _matplotlib_imported(["show", str(tmp_path / "out")], tmp_path)


def test_a_sweep_draws_its_figures_in_the_drawer(tmp_path):
    """The figures of a sweep appear, and its own process never imported matplotlib: the
    drawer drew them (the same bytes as `bnexp plot`, which draws them in its process)."""
    x, y, xt, yt = make_images(np.random.default_rng(1), 5 * 100, 60)
    data_dir = write_binary(tmp_path / "cifar", x, y, xt, yt, n_batch=100)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    args = ["sweep-init", "-o", str(tmp_path / "out"), "--data-dir", str(data_dir), *SMALL]
    assert not _matplotlib_imported(args, tmp_path, env)
    drawn = figure_bytes(tmp_path / "out")
    assert sorted(drawn) == ["training_curves.png", "weight_init_sweep.png"]
    plots.plot_results(tmp_path / "out")
    assert figure_bytes(tmp_path / "out") == drawn
