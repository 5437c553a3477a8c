"""The shipped results are what their configs make, and the README's figures are what `bnexp plot`
draws from the committed records.

Every folder under results/ records the command that made it; loading that command's config again
must give the folder's saved config.yaml byte for byte (so no result was made by an edited config
or edited by hand), the folder must be complete, and every figure the README shows must come out of
`plot_results` on a copy of the folder's records byte for byte.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from bnexp.config import config_to_yaml, load_config, num_runs
from bnexp.records import read_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
FOLDERS = sorted(p.parent.name for p in RESULTS.glob("*/manifest.json"))
_OPTIONS_WITH_A_VALUE = {"--data-dir", "-o", "--out", "--jobs", "-j", "--scheduler"}


def _recorded_config(folder: Path):
    """The config the folder's recorded command resolves to (its -c files and KEY=VALUEs)."""
    argv = json.loads((folder / "manifest.json").read_text())["command"]
    command, rest = argv[1], iter(argv[2:])
    paths, overrides = [], []
    for arg in rest:
        if arg in ("-c", "--config"):
            paths.append(ROOT / next(rest))
        elif arg in _OPTIONS_WITH_A_VALUE:
            next(rest)
        elif not arg.startswith("-"):  # flags (--force, --no-plot) change no setting
            overrides.append(arg)
    return load_config(paths, overrides, command=command)


def test_there_are_shipped_results():
    assert len(FOLDERS) >= 10, FOLDERS


@pytest.mark.parametrize("name", FOLDERS)
def test_a_shipped_folder_holds_what_its_recorded_command_makes(name):
    folder = RESULTS / name
    cfg = _recorded_config(folder)
    assert cfg.name == name
    assert (folder / "config.yaml").read_text() == config_to_yaml(cfg)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["git_dirty"] is False, "shipped results come from a committed tree"
    assert len(read_results(folder)) == num_runs(cfg)


def _readme_figures() -> dict[str, list[str]]:
    """README image paths under results/, by result folder."""
    text = (ROOT / "README.md").read_text()
    found: dict[str, list[str]] = {}
    for folder, name in re.findall(r"\]\(results/([^/)]+)/plots/([^)]+\.(?:png|svg))\)", text):
        found.setdefault(folder, []).append(name)
    return found


def test_the_readme_shows_figures_of_shipped_folders():
    figures = _readme_figures()
    assert len(figures) >= 8
    assert set(figures) <= set(FOLDERS)


@pytest.mark.parametrize("name", sorted(_readme_figures()))
def test_readme_figures_are_redrawn_byte_for_byte_from_the_records(name, tmp_path):
    from bnexp.plots import plot_results

    copy = tmp_path / name
    shutil.copytree(RESULTS / name, copy, ignore=shutil.ignore_patterns("plots"))
    formats = tuple(sorted({Path(f).suffix[1:] for f in _readme_figures()[name]}))
    plot_results(copy, formats=formats)
    for figure in _readme_figures()[name]:
        shipped = (RESULTS / name / "plots" / figure).read_bytes()
        assert (copy / "plots" / figure).read_bytes() == shipped, figure


def test_the_shipped_report_is_what_bnexp_report_writes_from_the_records(tmp_path, monkeypatch):
    from bnexp.html_report import write_report

    monkeypatch.chdir(ROOT)  # the report names folders as `bnexp report` run from the root does
    written, count = write_report((), tmp_path / "report.html")
    assert count == len(FOLDERS)
    assert written.read_bytes() == (RESULTS / "report.html").read_bytes()
