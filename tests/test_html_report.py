"""`bnexp report`: one self-contained HTML file from result folders trained on generated data.

Checked against references of its own: an HTML parser (balanced tags, sections, tables,
images), results.csv with the statistics module (mean and sample SD), the figure files and data
files byte for byte (base64, sha256), and a real headless Chromium when it is installed.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import re
import shlex
import shutil
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fakecifar import make_learnable_images, write_binary
from small import TINY_OVERRIDES

from bnexp.cli import main
from bnexp.records import read_manifest

SMALL = TINY_OVERRIDES
CLAIM = 'BN <wins> & "more"'
# Elements without an end tag in HTML.
VOID = {"meta", "img", "br", "hr", "input", "link", "source", "col", "area", "base", "wbr"}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two result folders trained on generated CIFAR-10: 'grid' (3 seeds x 2 weight scales x
    BN/baseline, with a claim full of HTML characters) and 'single' (one seed, saved before
    claims existed: its config.yaml has none)."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        mp.delenv("BNEXP_DATA_DIR", raising=False)
        x, y, xt, yt = make_learnable_images(np.random.default_rng(1), 5 * 100, 60)
        cifar = write_binary(root / "cifar", x, y, xt, yt, n_batch=100)
        grid = ["seed=[1, 2, 3]", "model.weight_scale=[0.01, 0.1]", f"claim={CLAIM}"]
        for name, extra in (("grid", grid), ("single", [])):
            result = invoke("train", "-o", root / name, "--data-dir", cifar, *SMALL, *extra)
            assert result.exit_code == 0, result.output
    single = root / "single" / "config.yaml"
    text = single.read_text(encoding="utf-8")
    single.write_text(re.sub(r"^claim: .*\n", "", text, flags=re.M), encoding="utf-8")
    return {"root": root, "cifar": cifar, "grid": root / "grid", "single": root / "single"}


class Page(HTMLParser):
    """The parts of the report a test reads; fails on an unbalanced or misnested tag."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.sections: list[dict] = []
        self.links: list[str] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()
        assert not self.stack, f"unclosed tags: {self.stack}"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag not in VOID:
            self.stack.append(tag)
        if tag == "section":
            self.sections.append({"id": attrs["id"], "imgs": [], "tables": [], "text": []})
        section = self.sections[-1] if self.sections and "section" in self.stack else None
        if tag == "a":
            self.links.append(attrs.get("href", ""))
        if section is not None and tag == "img":
            section["imgs"].append(attrs)
        if section is not None and tag == "table":
            section["tables"].append([])
        if section is not None and tag == "tr":
            section["tables"][-1].append([])
        if section is not None and tag in ("td", "th"):
            section["tables"][-1][-1].append("")

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)
        if self.sections and "section" in self.stack:
            section = self.sections[-1]
            section["text"].append(data)
            if self.stack[-1] in ("td", "th"):
                section["tables"][-1][-1][-1] += data


def report_of(tmp_path, *outs) -> tuple[str, Page]:
    path = tmp_path / "r.html"
    result = invoke("report", *outs, "-o", path)
    assert result.exit_code == 0, result.output
    assert f"report: {path} ({len(outs)} experiment" in result.output
    text = path.read_text(encoding="utf-8")
    return text, Page(text)


def csv_rows(out: Path) -> list[dict]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_one_error_line(result, code, *words):
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output and all(w in lines[0] for w in words), lines[0]


def test_one_section_per_experiment_with_its_figures_and_table(tmp_path, folders):
    text, page = report_of(tmp_path, folders["grid"], folders["single"])
    assert text.startswith("<!DOCTYPE html>")
    assert [s["id"] for s in page.sections] == ["exp-grid", "exp-single"]
    assert {"#exp-grid", "#exp-single"} <= set(page.links)  # the table of contents
    for section, out in zip(page.sections, (folders["grid"], folders["single"]), strict=True):
        pngs = sorted((out / "plots").glob("*.png"))
        assert pngs and len(section["imgs"]) == len(pngs)
        embedded = sorted(
            base64.b64decode(img["src"].removeprefix("data:image/png;base64,"))
            for img in section["imgs"]
        )
        assert embedded == sorted(p.read_bytes() for p in pngs)  # the files, not redrawn
        # 150 dpi figures shown at their printed size in CSS pixels (96 per inch).
        img = next(i for i in section["imgs"] if "training_curves" in i["alt"])
        assert abs(int(img["width"]) - 15 * 96) <= 2  # training_curves is 15 inches wide
        head, *rows = section["tables"][0]
        assert head[0] == "scale" and "val BN" in head and rows


def test_an_svg_figure_is_embedded_instead_of_its_png(tmp_path, folders):
    out = tmp_path / "svg"
    shutil.copytree(folders["single"], out)
    assert invoke("plot", out, "--svg").exit_code == 0
    svgs = sorted((out / "plots").glob("*.svg"))
    assert svgs and len(svgs) == len(list((out / "plots").glob("*.png")))
    _, page = report_of(tmp_path, out)
    prefix = "data:image/svg+xml;base64,"
    srcs = [img["src"] for img in page.sections[0]["imgs"]]
    assert len(srcs) == len(svgs) and all(s.startswith(prefix) for s in srcs)
    assert sorted(base64.b64decode(s.removeprefix(prefix)) for s in srcs) == sorted(
        p.read_bytes() for p in svgs
    )


def test_headline_numbers_are_mean_and_sd_over_seeds_of_results_csv(tmp_path, folders):
    _, page = report_of(tmp_path, folders["grid"], folders["single"])
    head, *rows = page.sections[0]["tables"][0]
    runs = csv_rows(folders["grid"])
    assert len(rows) == 2  # two weight scales, each 3 seeds x BN/baseline
    for row in rows:
        cells = dict(zip(head, row, strict=True))
        assert cells["n"] == "3"
        for bn, side in (("true", "BN"), ("false", "base")):
            same = [
                r
                for r in runs
                if r["batchnorm"] == bn and float(r["weight_scale"]) == float(cells["scale"])
            ]
            assert len(same) == 3
            for column, stem in (("best_val_acc", "val"), ("test_acc", "test")):
                values = [float(r[column]) for r in same]
                expected = f"{statistics.mean(values):.3f}±{statistics.stdev(values):.3f}"
                assert cells[f"{stem} {side}"] == expected
            losses = [float(r["final_train_loss"]) for r in same]
            mean, sd = (float(v) for v in cells[f"loss {side}"].split("±"))
            assert mean == pytest.approx(statistics.mean(losses), rel=1e-3)  # 4 digits shown
            assert sd == pytest.approx(statistics.stdev(losses), rel=0.05)  # 2 digits shown
    # One seed: each run's own value, no n column.
    head, *rows = page.sections[1]["tables"][0]
    (bn,) = [r for r in csv_rows(folders["single"]) if r["batchnorm"] == "true"]
    assert "n" not in head and len(rows) == 1
    assert dict(zip(head, rows[0], strict=True))["train BN"] == f"{float(bn['best_train_acc']):.3f}"


def test_nothing_external_and_no_script(tmp_path, folders):
    text, _ = report_of(tmp_path, folders["grid"], folders["single"])
    for match in re.finditer(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", text, re.I):
        assert match.group(1).startswith(("data:", "#")), match.group(0)[:80]
    assert not re.search(r"<script|javascript:|@import|url\(|<link|<iframe|@font-face", text, re.I)
    assert not re.search(r"https?://", text)
    assert re.search(r"<style>.*</style>", text, re.S)


def test_the_claim_is_shown_escaped_and_an_old_folder_has_none(tmp_path, folders):
    text, page = report_of(tmp_path, folders["grid"], folders["single"])
    assert CLAIM not in text and html.escape(CLAIM, quote=True) in text
    grid, single = ("".join(s["text"]) for s in page.sections)
    assert f"Claim: {CLAIM}" in grid
    assert "No claim recorded" in single and "Claim:" not in single
    assert f"grid — {CLAIM}" in "".join(page.text)  # the table of contents too


def test_provenance_names_commit_versions_data_checksums_and_command(tmp_path, folders):
    _, page = report_of(tmp_path, folders["grid"])
    section = "".join(page.sections[0]["text"])
    manifest = read_manifest(folders["grid"])
    assert shlex.join(manifest["command"]) in section
    assert manifest["start_time"] in section and manifest["end_time"] in section
    assert f"NumPy {np.__version__}" in section and "Seeds3: 1, 2, 3" in section
    assert "12 finished of 12" in section
    if manifest["git_commit"]:
        assert manifest["git_commit"] in section
    files = sorted((folders["cifar"] / "cifar-10-batches-bin").glob("*.bin"))
    assert len(files) == 6
    for path in files:  # checksums computed here, from the files the runs were trained on
        assert hashlib.sha256(path.read_bytes()).hexdigest() in section


def test_without_out_every_result_folder_under_results_goes_to_results_report_html(
    tmp_path, folders, monkeypatch
):
    results = tmp_path / "results"
    for name in ("grid", "single"):
        shutil.copytree(folders[name], results / name)
    (results / "notes").mkdir()  # not a result folder: not reported
    monkeypatch.chdir(tmp_path)
    result = invoke("report")
    assert result.exit_code == 0, result.output
    page = Page((results / "report.html").read_text(encoding="utf-8"))
    assert [s["id"] for s in page.sections] == ["exp-grid", "exp-single"]
    # Again with the report inside results/: still two, the report is no result folder.
    assert invoke("report").exit_code == 0
    assert not list(results.glob(".report.html.*"))  # no temporary left by the atomic write


def test_an_unfinished_folder_is_reported_with_a_note(tmp_path, folders):
    out = tmp_path / "partial"
    shutil.copytree(folders["grid"], out)
    next(iter(sorted(out.glob("runs/*/summary.json")))).unlink()
    _, page = report_of(tmp_path, out)
    section = "".join(page.sections[0]["text"])
    assert "Incomplete: 11 of 12 runs finished" in section
    assert "(incomplete)" in "".join(page.text)
    # A manifest left at 'running' by a process that is still training, or was killed.
    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"complete"', '"running"'))
    (out / ".bnexp.lock").write_text("{}")
    _, page = report_of(tmp_path, out)
    section = "".join(page.sections[0]["text"])
    assert "manifest status 'interrupted'" in section and "may still be writing" in section


def test_the_same_records_give_the_same_file_and_dot_is_named_after_its_folder(
    tmp_path, folders, monkeypatch
):
    first, _ = report_of(tmp_path, folders["grid"])
    again, _ = report_of(tmp_path, folders["grid"])
    assert first == again  # no generation date: a regenerated report changes with its records
    monkeypatch.chdir(folders["grid"])
    _, page = report_of(tmp_path, ".")
    assert page.sections[0]["id"] == "exp-grid" and "grid" in page.sections[0]["text"]


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: d / "missing", ["missing", "nothing to report"]),
        (lambda d: (d / "empty").mkdir() or d / "empty", ["empty", "nothing to report"]),
    ],
)
def test_a_folder_that_holds_no_results_is_one_line_exit_4(tmp_path, folders, make, words):
    result = invoke("report", folders["grid"], make(tmp_path), "-o", tmp_path / "r.html")
    assert_one_error_line(result, 4, *words)
    assert not (tmp_path / "r.html").exists()


def test_bad_output_and_no_results_are_one_line(tmp_path, folders, monkeypatch):
    assert_one_error_line(invoke("report", folders["grid"], "-o", tmp_path), 4, "is a folder")
    (tmp_path / "file").write_text("x")
    blocked = invoke("report", folders["grid"], "-o", tmp_path / "file" / "r.html")
    assert_one_error_line(blocked, 4, "file")
    monkeypatch.chdir(tmp_path)
    assert_one_error_line(invoke("report"), 4, "no result folders")
    assert invoke("report", "--no-such-option").exit_code == 2  # click's usage error


def test_a_real_browser_renders_the_report(tmp_path, folders):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed: browser rendering not checked")
    path = tmp_path / "r.html"
    assert invoke("report", folders["grid"], folders["single"], "-o", path).exit_code == 0
    shot = tmp_path / "shot.png"
    command = [browser, "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}"]
    command += ["--window-size=1200,3000", "--hide-scrollbars", path.resolve().as_uri()]
    subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (3000, 1200)
    colours = np.unique((pixels[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 200  # text, tables and the embedded figures, not a blank page
    # The figures were drawn: the blue of batch norm's lines is on the page.
    blue = np.all(np.abs(pixels[..., :3] - np.array([0.12, 0.47, 0.71])) < 0.05, axis=-1)
    assert blue.sum() > 100
