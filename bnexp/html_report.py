"""One self-contained HTML file from result folders (`bnexp report`): per experiment its claim,
its figures, the headline numbers (the summary table of `bnexp show`: mean ± SD over seeds) and
its provenance (commit, versions, BLAS, data checksums, dates, the exact command).

It renders records that already exist: it never trains and never redraws a figure. The file
needs nothing but itself: the figures of OUT/plots are embedded as ``data:`` URIs (an SVG one
too, as an image: an inline ``<svg>`` would share its element ids with the other figures'), the
style is one ``<style>`` block, and there is no script, no font and no external address. Every
text taken from the records is escaped.
"""

from __future__ import annotations

import base64
import html
import re
import shlex
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bnexp import __version__, records
from bnexp.errors import OutputError
from bnexp.report import every_mode_rows, summary_rows
from bnexp.yamlfile import parse_yaml

#: Where `bnexp report` looks for result folders, and writes, when given no OUT.
RESULTS_DIR = Path("results")
DEFAULT_NAME = "report.html"
#: Figure files embedded, by suffix, with their media type; an SVG is preferred to a PNG of
#: the same name (it scales without blur).
FIGURE_TYPES = {".svg": "image/svg+xml", ".png": "image/png"}

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #1a1a1a; background: #fff; line-height: 1.45; }
h1 { border-bottom: 2px solid #333; padding-bottom: .2em; }
section { border-top: 1px solid #bbb; margin-top: 2.5em; padding-top: .5em; }
.claim { font-size: 1.15em; font-style: italic; }
.note { background: #fff4d6; border-left: 4px solid #e0a000; padding: .4em .8em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .82em; margin: .5em 0; }
th, td { border: 1px solid #ccc; padding: .15em .4em; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.legend, figcaption { font-size: .85em; color: #555; margin-top: .2em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
dl.prov { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; }
dl.prov dt { font-weight: bold; }
dl.prov dd { margin: 0; overflow-wrap: anywhere; }
code, pre { font-family: ui-monospace, monospace; font-size: .9em; }
pre { background: #f6f6f6; padding: .5em; overflow-x: auto; }
"""


@dataclass(frozen=True)
class Experiment:
    """What the report shows of one result folder (read from its records only)."""

    out: Path  # as given (shown as the folder)
    title: str  # the folder's own name, also for OUT given as "." or "results/x/"
    anchor: str  # id of its <section>, unique in the report
    claim: str  # "" when its config.yaml records none
    summaries: list[dict]  # the finished runs of OUT/config.yaml (`records.read_results`)
    expected: int  # runs of OUT/config.yaml
    manifest: dict | None  # OUT/manifest.json, None when missing or unreadable
    config_text: str
    figures: list[Path]


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# --- reading --------------------------------------------------------------------------------


def result_folders(root: Path = RESULTS_DIR) -> list[Path]:
    """The result folders directly under `root` (those with a config.yaml or a runs/ folder),
    by name. Raises OutputError when there is none."""
    folders = []
    if root.is_dir():
        folders = [
            p
            for p in sorted(root.iterdir())
            if p.is_dir() and ((p / "config.yaml").is_file() or (p / "runs").is_dir())
        ]
    if not folders:
        raise OutputError(
            f"{root}: no result folders to report; run an experiment first or name OUT folders"
        )
    return folders


def _figure_files(out: Path) -> list[Path]:
    """OUT/plots figures, one file per figure name (SVG before PNG): sweeps first, then the
    training curves, then the probes."""
    files: dict[str, Path] = {}
    plots = out / "plots"
    for suffix in FIGURE_TYPES:  # SVG first: it wins a name
        for path in sorted(plots.glob(f"*{suffix}")) if plots.is_dir() else []:
            if not path.name.startswith("."):  # a temporary of a plot being drawn
                files.setdefault(path.stem, path)

    def rank(stem: str) -> tuple[int, str]:
        order = ("weight_init_sweep", "sweep_", "training_curves", "probe_")
        return next((i for i, p in enumerate(order) if stem.startswith(p)), len(order)), stem

    return [files[stem] for stem in sorted(files, key=rank)]


def _claim(config_text: str) -> str:
    """The claim recorded in a saved config ("" when none: configs saved before claims)."""
    raw = parse_yaml(config_text, "config.yaml")
    claim = raw.get("claim") if isinstance(raw, dict) else None
    return claim if isinstance(claim, str) else ""


def load_experiment(
    out: str | Path, anchor: str, note: Callable[[str], None] | None = None
) -> Experiment:
    """An `Experiment` of result folder OUT.

    Raises OutputError (one line) when OUT is not a result folder: no finished run, a missing
    or invalid config.yaml, a corrupt summary.json (as `bnexp show`).
    """
    out = Path(out)
    summaries, expected = records.read_current_summaries(out, what="report")
    config_text = (out / "config.yaml").read_text(encoding="utf-8")  # read_current_... checked it
    return Experiment(
        out=out,
        title=out.resolve().name,
        anchor=anchor,
        claim=_claim(config_text),
        summaries=summaries,
        expected=expected,
        manifest=records.read_manifest(out, note=note),
        config_text=config_text,
        figures=_figure_files(out),
    )


def _anchors(outs: Sequence[Path]) -> list[str]:
    """Unique section ids from the folder names (a second 'x' becomes 'x-2')."""
    seen: dict[str, int] = {}
    anchors = []
    for out in outs:
        base = "exp-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", out.resolve().name) or "folder")
        seen[base] = seen.get(base, 0) + 1
        anchors.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return anchors


# --- rendering ------------------------------------------------------------------------------


def _incomplete(exp: Experiment) -> str | None:
    """Why the experiment is incomplete, or None when every run finished and the manifest says
    'complete'."""
    status = (exp.manifest or {}).get("status")
    if len(exp.summaries) == exp.expected and status == "complete":
        return None
    parts = [f"{len(exp.summaries)} of {exp.expected} runs finished"]
    if exp.manifest is None:
        parts.append("no readable manifest.json")
    else:
        parts.append(f"manifest status {status!r}")
        if exp.manifest.get("status_note"):
            parts.append(str(exp.manifest["status_note"]))
    if (exp.out / records.LOCK_NAME).exists():  # a live process removes it when it stops
        parts.append(f"a bnexp process may still be writing it ({records.LOCK_NAME} is there)")
    return "; ".join(parts)


def _claim_html(exp: Experiment) -> str:
    if exp.claim:
        return f'<p class="claim">Claim: {_esc(exp.claim)}</p>'
    return '<p class="claim">No claim recorded.</p>'


def _cell(text: str, header: bool) -> str:
    if header:
        return f"<th>{_esc(text)}</th>"
    # A break opportunity after ± lets a wide table (3 normalizations) wrap instead of scroll.
    return f'<td class="num">{_esc(text).replace("±", "±<wbr>")}</td>'


def _html_rows(head: list[str], rows: list[list[str]]) -> str:
    lines = ["<tr>" + "".join(_cell(c, True) for c in head) + "</tr>"]
    lines += ["<tr>" + "".join(_cell(c, False) for c in row) + "</tr>" for row in rows]
    return "".join(lines)


def _every_mode_html(summaries: Sequence[dict]) -> str:
    """The bn_eval_all table of `bnexp show` (nothing when the runs were not evaluated so)."""
    table = every_mode_rows(summaries)
    if table is None:
        return ""
    head, *rows = table
    caption = (
        "The final parameters' validation and test accuracy with batch-norm statistics from: "
        "run = running averages, pop = population (Algorithm 2), batch = the whole evaluated set, "
        "minibatch = consecutive minibatches of the training batch size."
    )
    return (
        f'<div class="scroll"><table>{_html_rows(head, rows)}</table></div>'
        f'<p class="legend">{_esc(caption)}</p>'
    )


def _table_html(summaries: Sequence[dict]) -> str:
    """The summary tables of `bnexp show` as HTML tables, with what their columns mean."""
    head, *rows = summary_rows(summaries)
    several = "n" in head
    spread = (
        "Each cell is the mean ± sample SD over the n seeds of its setting (finite values only)."
        if several
        else "One seed: each cell is one run's value."
    )
    caption = (
        f"{spread} val / train: best validation / training accuracy; loss: final training loss "
        "(mean of the last minibatch losses); test: test accuracy of the best-val parameters. "
        "BN: batch norm, base: no normalization, LN: layer norm; (div): diverged."
    )
    return (
        f'<div class="scroll"><table>{_html_rows(head, rows)}</table></div>'
        f'<p class="legend">{_esc(caption)}</p>' + _every_mode_html(summaries)
    )


def _png_css_size(data: bytes) -> tuple[int, int] | None:
    """A PNG's size in CSS pixels (96 per inch) from its pixel size and its pHYs dots per metre
    (matplotlib writes the figure's dpi there), or None when either is not there."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    at = data.find(b"pHYs", 0, 4096)  # an ancillary chunk before the image data
    if at < 0:
        return None
    per_metre, _, unit = struct.unpack(">IIB", data[at + 4 : at + 13])
    if unit != 1 or per_metre == 0:
        return None
    scale = 96 / (per_metre * 0.0254)
    return round(width * scale), round(height * scale)


def _figure_html(path: Path, exp: Experiment) -> str:
    """One figure as an <img> with its file as a data: URI, at its printed size (a 150 dpi PNG
    would otherwise show 1.5 times too large)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise OutputError(
            f"{path}: cannot read ({exc.strerror or exc}); redraw it with bnexp plot {exp.out}"
        ) from None
    data = base64.b64encode(raw).decode("ascii")
    size = _png_css_size(raw) if path.suffix == ".png" else None
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    alt = f"{path.stem} of {exp.title}"
    return (
        f'<figure><img src="data:{FIGURE_TYPES[path.suffix]};base64,{data}"{dims} '
        f'alt="{_esc(alt)}">'
        f"<figcaption>{_esc(path.relative_to(exp.out))}</figcaption></figure>"
    )


def _figures_html(exp: Experiment) -> str:
    if not exp.figures:
        return (
            f'<p class="note">No figures in {_esc(exp.out / "plots")}; draw them with '
            f"<code>bnexp plot {_esc(exp.out)}</code>.</p>"
        )
    return "".join(_figure_html(path, exp) for path in exp.figures)


def _blas_text(blas: Any) -> str:
    """'openblas 0.3.27 (SkylakeX, pthreads, 2 threads in the main process)' per library,
    '; '-separated (training itself runs one BLAS thread per process, `bnexp.executor`)."""
    if not isinstance(blas, list) or not blas:
        return "not recorded"
    texts = []
    for lib in blas:
        if isinstance(lib, dict):
            extra = [lib.get("architecture"), lib.get("threading_layer")]
            if lib.get("num_threads") is not None:
                extra.append(f"{lib['num_threads']} threads in the main process")
            details = ", ".join(str(e) for e in extra if e)
            name = f"{lib.get('internal_api', '?')} {lib.get('version', '')}".strip()
            texts.append(f"{name} ({details})" if details else name)
    return "; ".join(texts)


def _commit_text(manifest: dict) -> str:
    commit = manifest.get("git_commit")
    if not commit:
        return "not in a git work tree"
    dirty = {True: " with uncommitted changes", False: " (clean)"}.get(manifest.get("git_dirty"))
    return f"{commit}{dirty or ''}"


def _command_text(command: Any) -> str:
    if isinstance(command, list):
        return shlex.join(str(c) for c in command)
    return str(command) if command else "not recorded"


def _seeds_text(summaries: Sequence[dict]) -> str:
    seeds = sorted({s["seed"] for s in summaries if isinstance(s.get("seed"), int)})
    return f"{len(seeds)}: {', '.join(map(str, seeds))}" if seeds else "not recorded"


def _provenance_items(exp: Experiment) -> list[tuple[str, str]]:
    """(label, text) rows of the provenance list."""
    m = exp.manifest or {}
    versions = (
        f"bnexp {m.get('bnexp_version', '?')}, Python {m.get('python_version', '?')}, "
        f"NumPy {m.get('numpy_version', '?')}"
    )
    return [
        ("Command", _command_text(m.get("command"))),
        ("Git commit", _commit_text(m)),
        ("Versions", versions),
        ("BLAS", _blas_text(m.get("blas"))),
        ("Platform", str(m.get("platform", "not recorded"))),
        ("Started", str(m.get("start_time") or "not recorded")),
        ("Finished", str(m.get("end_time") or "not recorded")),
        ("Status", str(m.get("status", "not recorded"))),
        ("Runs", f"{len(exp.summaries)} finished of {exp.expected}"),
        ("Seeds", _seeds_text(exp.summaries)),
        ("Random streams", str(m.get("rng", "not recorded"))),
    ]


def _data_html(data: Any) -> str:
    """The data the runs were trained on: layout and image counts, then a <details> table of
    its files with their sizes and SHA-256 checksums."""
    if not isinstance(data, dict):
        return "<p>Data: not recorded.</p>"
    counts = data.get("counts") or {}
    summary = ", ".join(f"{k} {v}" for k, v in counts.items()) if isinstance(counts, dict) else ""
    where = f"{data.get('folder', data.get('provided', '?'))} ({data.get('layout', '?')})"
    files = [f for f in data.get("files") or [] if isinstance(f, dict)]
    rows = "".join(
        f'<tr><td>{_esc(f.get("name", "?"))}</td><td class="num">{_esc(f.get("bytes", ""))}'
        f"</td><td><code>{_esc(f.get('sha256', ''))}</code></td></tr>"
        for f in files
    )
    table = (
        f"<details><summary>Data files and SHA-256 checksums ({len(files)})</summary>"
        f'<div class="scroll"><table><tr><th>file</th><th>bytes</th><th>sha256</th></tr>{rows}'
        "</table></div></details>"
    )
    line = f"<p>Data: {_esc(where)}; images used: {_esc(summary or 'not recorded')}.</p>"
    return line + (table if files else "")


def _provenance_html(exp: Experiment) -> str:
    if exp.manifest is None:
        note = f"No readable {_esc(exp.out / 'manifest.json')}: provenance not recorded."
        return f'<p class="note">{note}</p>{_config_html(exp)}'
    items = "".join(
        f"<dt>{_esc(label)}</dt><dd>{_esc(text)}</dd>" for label, text in _provenance_items(exp)
    )
    earlier = exp.manifest.get("previous") or []
    before = f"<p>Earlier invocations on this folder: {len(earlier)}.</p>" if earlier else ""
    return (
        f'<dl class="prov">{items}</dl>{before}{_data_html(exp.manifest.get("data"))}'
        f"{_config_html(exp)}"
    )


def _config_html(exp: Experiment) -> str:
    return (
        f"<details><summary>Resolved config ({_esc(exp.out / 'config.yaml')})</summary>"
        f"<pre>{_esc(exp.config_text)}</pre></details>"
    )


def _section_html(exp: Experiment) -> str:
    why = _incomplete(exp)
    note = (
        f'<p class="note">Incomplete: {_esc(why)}. The numbers and figures cover the finished '
        "runs only.</p>"
        if why
        else ""
    )
    return (
        f'<section id="{_esc(exp.anchor)}"><h2>{_esc(exp.title)}</h2>{_claim_html(exp)}{note}'
        f"<p>Folder <code>{_esc(exp.out)}</code>.</p>"
        f"<h3>Headline numbers</h3>{_table_html(exp.summaries)}"
        f"<h3>Figures</h3>{_figures_html(exp)}"
        f"<h3>Provenance</h3>{_provenance_html(exp)}</section>"
    )


def _toc_html(experiments: Sequence[Experiment]) -> str:
    items = []
    for exp in experiments:
        claim = f" — {_esc(exp.claim)}" if exp.claim else " — no claim recorded"
        flag = " (incomplete)" if _incomplete(exp) else ""
        items.append(f'<li><a href="#{_esc(exp.anchor)}">{_esc(exp.title)}</a>{claim}{flag}</li>')
    return f"<nav><h2>Contents</h2><ol>{''.join(items)}</ol></nav>"


def render(experiments: Sequence[Experiment]) -> str:
    """The whole HTML document. No generation date: the same records give the same file."""
    intro = (
        f"<p>{len(experiments)} experiment{'s' if len(experiments) != 1 else ''}, each with its "
        "claim, its headline numbers, its figures and where they came from. Written by "
        f"<code>bnexp report</code> (bnexp {_esc(__version__)}) from the records of each result "
        "folder; nothing was retrained or redrawn.</p>"
    )
    body = intro + _toc_html(experiments) + "".join(_section_html(e) for e in experiments)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>bnexp report</title><style>{STYLE}</style></head>"
        f"<body><h1>bnexp report</h1>{body}</body></html>\n"
    )


# --- the command ----------------------------------------------------------------------------


def _output_path(output: str | Path) -> Path:
    """The report file, its folder created; OutputError when it is a folder or cannot be."""
    path = Path(output)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name with -o, e.g. -o {DEFAULT_NAME}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"{path}: cannot create its folder ({exc.strerror or exc}); choose another -o"
        ) from None
    return path


def write_report(
    outs: Sequence[str | Path] = (),
    output: str | Path | None = None,
    note: Callable[[str], None] | None = None,
) -> tuple[Path, int]:
    """Write the report of result folders `outs` (default: every one under results/) to
    `output` (default: results/report.html without `outs`, else report.html), atomically.

    Returns the path written and the number of experiments. Raises OutputError (one line) for
    a folder that is not a result folder or a report file that cannot be written; `note` gets
    one line per folder whose manifest could not be read as it is.
    """
    folders = [Path(o) for o in outs] or result_folders()
    if output is None:
        output = RESULTS_DIR / DEFAULT_NAME if not outs else Path(DEFAULT_NAME)
    unique = list(dict.fromkeys(f.resolve() for f in folders))  # a folder named twice, once
    folders = [next(f for f in folders if f.resolve() == u) for u in unique]
    experiments = [
        load_experiment(f, a, note) for f, a in zip(folders, _anchors(folders), strict=True)
    ]
    path = _output_path(output)
    records.atomic_write_text(path, render(experiments))
    return path, len(experiments)
