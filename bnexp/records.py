"""The on-disk records of an experiment: atomic writes, run folders, results.csv, manifest.

Layout of an output folder OUT::

    OUT/config.yaml          the resolved experiment config
    OUT/manifest.json        versions, BLAS, git commit, seed, data checksums, times, command line
    OUT/results.csv          one row per finished run
    OUT/runs/<run_id>/       config.yaml, metrics.jsonl (one line per accuracy check), summary.json
                             with probes on also layers.jsonl (one line per probed iteration and
                             layer) and landscape.jsonl (one line per probed iteration)
    OUT/plots/               PNG figures (SVG on request)
    OUT/checkpoints/         while groups train: one <group-id>.npz each (`bnexp.checkpoint`)
    OUT/.bnexp.lock          while a process writes into OUT: its pid and host (`output_lock`)

Every file is written to a temporary file in the same folder and moved into place with
`os.replace`, so a reader (or a Ctrl-C) never sees half a file. A run's ``summary.json`` is written
last: its presence marks the run finished, and a re-run skips it.

A summary.json holds the fields of `SUMMARY_FIELDS` (written by bnexp.sweep; the plots, the
summary table and results.csv read these names): the table lists each field with the test its
value must pass and what it means; results.csv has the columns of `results_columns`.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import errno
import io
import json
import math
import os
import platform
import secrets
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnexp.errors import BnexpError, OutputError
from bnexp.yamlfile import dump_yaml

#: results.csv columns, always present and in this order; `results_columns` appends one column
#: per other swept key (named by its dotted key, e.g. ``train.batch_size``).
RESULTS_COLUMNS = (
    "run_id",
    "batchnorm",
    "weight_scale",
    "best_train_acc",
    "best_val_acc",
    "final_train_loss",
    "diverged",
    "status",
    "seconds",
    "learning_rate",
    "seed",
    "test_acc",
)
#: Swept keys that already have a column of RESULTS_COLUMNS (and a field of summary.json).
AXIS_COLUMNS = {
    "seed": "seed",
    "model.weight_scale": "weight_scale",
    "model.batchnorm": "batchnorm",
    "train.learning_rate": "learning_rate",
}


def results_columns(summaries: Sequence[dict]) -> tuple[str, ...]:
    """RESULTS_COLUMNS, then every other swept key of the summaries' ``axes`` (first seen first),
    then the `EVERY_MODE_FIELDS` when a summary has them (train.bn_eval_all)."""
    extra: dict[str, None] = {}
    for s in summaries:
        axes = s.get("axes")
        for key in axes if isinstance(axes, dict) else ():
            if key not in AXIS_COLUMNS:
                extra[key] = None
    modes = [key for key in EVERY_MODE_FIELDS if any(key in s for s in summaries)]
    return RESULTS_COLUMNS + tuple(extra) + tuple(modes)


def results_cell(summary: dict, column: str) -> Any:
    """The value of one results.csv column for a summary (a swept key's value from ``axes``)."""
    if column in RESULTS_COLUMNS or column in EVERY_MODE_FIELDS:
        return summary.get(column)
    return (summary.get("axes") or {}).get(column)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays to Python, tuples to lists, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _json_text(obj: Any, indent: int | None = 2) -> str:
    """Standard JSON (no NaN/Infinity tokens)."""
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)


def _new_file_mode(path: Path) -> int:
    """The mode open() would give path: its current mode if it exists, else 0o666 minus umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        pass
    umask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(
    path: str | Path, write: Callable[[Path], None], fix: str = "choose a writable output folder"
) -> None:
    """Create path atomically: `write(tmp)` fills a temporary file in the same folder, which then
    replaces path (os.replace), so a reader or a Ctrl-C never sees half a file. The file gets the
    mode open() would give it (mkstemp alone makes it 0600, unreadable to a lab's group).

    Raises OutputError naming the file, with `fix` as the advice, when it cannot be written.
    """
    path = Path(path)
    # The name is known before the file exists, so a signal at any point (Ctrl-C and SIGTERM
    # unwind as exceptions) finds it in `tmp` and the finally clause removes it; with mkstemp
    # a signal between the file's creation and the name's return would leak it.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.fchmod(fd, _new_file_mode(path))
        finally:
            os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except FileExistsError:  # another writer's temporary has this name (1 in 2**64): not ours
        tmp = None
        raise OutputError(f"{path}: cannot write (temporary name taken); try again") from None
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); {fix}") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # gone already after os.replace


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to path atomically (flushed to disk before it replaces path)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write, fix="choose a writable output folder with -o")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write obj as standard JSON atomically; NaN and +-inf become null."""
    atomic_write_text(path, _json_text(obj) + "\n")


def _refuse_file_in_the_way(out: Path) -> None:
    """OutputError when OUT, or the nearest of its parents that exists, is not a folder."""
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise OutputError(
            f"{out}: cannot create the output folder (a file is in the way); choose another -o"
        )


def check_output_dir(out: str | Path, config_yaml: str, force: bool = False) -> Path:
    """Refuse an unusable OUT before anything is written (or any data read); writes nothing.

    Raises
    ------
    OutputError : a file is in the way of OUT, OUT/config.yaml cannot be read, or it holds a
        different config and `force` is not set.
    """
    out = Path(out)
    _refuse_file_in_the_way(out)
    config_path = out / "config.yaml"
    if config_path.exists():
        try:
            old = config_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise OutputError(f"{config_path}: cannot read ({exc}); use a new -o folder") from None
        if not force and not _same_experiment(old, config_yaml):
            raise OutputError(
                f"{out} holds results of a different config; use a new -o folder or --force"
            )
    return out


def _same_experiment(saved_yaml: str, config_yaml: str) -> bool:
    from bnexp.config import same_experiment  # config imports the engine; load it on use

    return same_experiment(saved_yaml, config_yaml)


def refresh_descriptions(out: str | Path, config_yaml: str) -> bool:
    """Rewrite OUT/config.yaml when it differs from `config_yaml` only in what describes the
    experiment (its claim), so a finished folder takes a new claim without retraining; True
    when it was rewritten. Call it holding `output_lock(out)`, after `check_output_dir`."""
    path = Path(out) / "config.yaml"
    try:
        saved = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if saved == config_yaml or not _same_experiment(saved, config_yaml):
        return False
    atomic_write_text(path, config_yaml)
    return True


def prepare_output_dir(out: str | Path, config_yaml: str, force: bool = False) -> Path:
    """Create OUT and OUT/runs/ and store the resolved config in OUT/config.yaml.

    Parameters
    ----------
    out : the output folder (created with its parents when missing).
    config_yaml : the resolved config text (`config.config_to_yaml`).
    force : overwrite a different OUT/config.yaml (finished runs whose ids still match are kept).

    Returns
    -------
    Path of OUT.

    Raises
    ------
    OutputError : OUT cannot be created or written, or it holds results of a different config
        (see `check_output_dir`).
    """
    out = check_output_dir(out, config_yaml, force)
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(
            f"{out}: cannot create the output folder (a file is in the way); choose another -o"
        ) from None
    except OSError as exc:
        raise OutputError(
            f"{out}: cannot create the output folder ({exc.strerror or exc}); "
            "choose a writable -o folder"
        ) from None
    # Written even when unchanged: this is also the check that OUT is writable.
    atomic_write_text(out / "config.yaml", config_yaml)
    clean_stale_temporaries(out)
    return out


def _is_stale_temporary(path: Path) -> bool:
    """A temporary of `atomic_write` (`.<name>.<random>.tmp`)."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


def remove_temporaries(folder: Path, match: Callable[[Path], bool] = _is_stale_temporary) -> list:
    """Remove the files of `folder` that `match` says are left-over temporaries (files that
    vanish meanwhile are skipped); returns the removed paths. A missing folder has none."""
    removed = []
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if match(path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


def clean_stale_temporaries(out: str | Path) -> list[Path]:
    """Remove the temporaries a killed process left in OUT, OUT/plots, OUT/checkpoints and
    OUT/runs/*.

    Call it only while holding `output_lock(out)`: another live process's temporaries look the
    same. Returns the removed paths.
    """
    out = Path(out)
    folders = [out, out / "plots", out / "checkpoints"]
    if (out / "runs").is_dir():
        folders += sorted(p for p in (out / "runs").iterdir() if p.is_dir())
    return [path for folder in folders for path in remove_temporaries(folder)]


LOCK_NAME = ".bnexp.lock"


def _lock_holder(path: Path) -> str:
    """'pid P on host H since T' from a lock file, or a fallback when it cannot be read."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {info['pid']} on host {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_is_stale(path: Path) -> bool:
    """A lock file whose holder is a dead pid on this host (used where flock is unsupported)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return info["host"] == socket.gethostname() and not _pid_alive(int(info["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _try_lock(path: Path) -> int | None:
    """Open and exclusively flock OUT/.bnexp.lock; the fd, or None when another process holds it.

    flock is released by the kernel when its holder dies, so the lock of a killed process (a
    stale lock) is taken over without any guessing. Where flock is unsupported, a lock file of a
    dead pid on this host counts as stale.
    """
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            if not _lock_is_stale(path) and path.stat().st_size > 0:
                return None
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            return fd
        # The holder before us may have removed the file between our open and our flock: then
        # we hold a lock on a deleted file, and must lock the one now at the path instead.
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _make_folders(out: Path) -> list[Path]:
    """Create OUT with its parents; the folders created, innermost first."""
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(
            f"{out}: cannot create the output folder (a file is in the way); choose another -o"
        ) from None
    except OSError as exc:
        raise OutputError(
            f"{out}: cannot create the output folder ({exc.strerror or exc}); "
            "choose a writable -o folder"
        ) from None
    return created


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[Path]:
    """Hold OUT/.bnexp.lock (holder's pid, host and start time inside) while writing into OUT.

    OUT is created if missing, and removed again on exit if it is still empty (a data error
    then leaves nothing behind). The lock of a process that died is taken over.

    Raises
    ------
    OutputError : another live process holds the lock (the message names it), or OUT cannot be
        created (a file is in the way, no permission).
    """
    out = Path(out)
    _refuse_file_in_the_way(out)
    created = _make_folders(out)
    path = out / LOCK_NAME
    try:
        fd = _try_lock(path)
    except OSError as exc:
        _remove_empty(created)
        raise OutputError(f"{path}: cannot create the lock file ({exc.strerror or exc})") from None
    if fd is None:
        raise OutputError(
            f"{out} is in use by {_lock_holder(path)}; wait for it to finish or use another -o "
            f"(delete {path} only if no bnexp process is running)"
        )
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        yield out
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # before unlocking: a waiter that locks this inode re-checks the path
        os.close(fd)
        _remove_empty(created)


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove the folders (innermost first) that are empty; keep the others."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def run_dir(out: str | Path, run_id: str) -> Path:
    """OUT/runs/<run_id>."""
    return Path(out) / "runs" / run_id


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _opt_int(v: Any) -> bool:
    return v is None or (_is_int(v) and v >= 0)


def _opt_num(v: Any) -> bool:
    return v is None or _is_num(v)


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _num_list(v: Any) -> bool:
    return isinstance(v, list) and all(x is None or _is_num(x) for x in v)


_INT, _NUM, _STR = "an integer >= 0 or null", "a number or null", "a string or null"
_LIST = "a list of numbers (null where missing)"

#: The one schema of a run's summary.json, in the order it is written: field -> (test of a present
#: value, what was expected, meaning). A missing field is allowed when reading (older or
#: hand-made records); bnexp.sweep writes exactly these fields (a test holds it).
SUMMARY_FIELDS = {
    "run_id": (_opt_str, _STR, "hash of the run's settings (`bnexp.config.run_id`)"),
    "index": (_opt_int, _INT, "position in the experiment's run list"),
    "batchnorm": (_bool, "true or false", "batch norm in the net"),
    "weight_scale": (lambda v: _is_num(v) and 0 < v < math.inf, "a number > 0", "init scale"),
    "learning_rate": (
        lambda v: v is None or (_is_num(v) and 0 < v < math.inf),
        "a number > 0",
        "initial learning rate",
    ),
    "seed": (lambda v: v is None or _is_int(v), "an integer", "root seed of the run"),
    "rng": (_opt_str, _STR, "numpy | cs231n"),
    "hidden_dims": (
        lambda v: v is None or (isinstance(v, list) and all(_is_int(h) for h in v)),
        "a list of integers",
        "hidden layer widths",
    ),
    "dtype": (_opt_str, _STR, "parameter dtype"),
    "num_train": (_opt_int, _INT, "training images"),
    "num_val": (_opt_int, _INT, "validation images"),
    "num_test": (_opt_int, _INT, "test images (null without a test split)"),
    "epochs": (_opt_int, _INT, "epochs"),
    "batch_size": (_opt_int, _INT, "minibatch size"),
    "iterations_per_epoch": (_opt_int, _INT, "solver iterations per epoch"),
    "update_rule": (_opt_str, _STR, "sgd | sgd_momentum | adam"),
    "sampling": (_opt_str, _STR, "replacement | shuffle"),
    "bn_eval": (_opt_str, _STR, "running | population | batch"),
    "axes": (
        lambda v: isinstance(v, dict),
        "a mapping",
        "the run's value of every swept key, by dotted key",
    ),
    "train_acc_history": (_num_list, _LIST, "train accuracy per check (epochs + 1 values)"),
    "val_acc_history": (_num_list, _LIST, "val accuracy per check (null after a divergence)"),
    "check_iterations": (_num_list, _LIST, "1-based iteration of each check"),
    "test_acc": (_opt_num, _NUM, "test accuracy of the best-val snapshot"),
    "loss_history": (_num_list, _LIST, "minibatch loss per iteration (null when not finite)"),
    "best_train_acc": (_opt_num, _NUM, "highest train accuracy over the checks"),
    "best_val_acc": (_opt_num, _NUM, "highest val accuracy (from 0.0, as the Solver)"),
    "final_train_loss": (_opt_num, _NUM, "mean of the last loss_window losses"),
    "diverged": (_bool, "true or false", "a minibatch loss was not finite"),
    "diverged_iteration": (_opt_int, _INT, "iteration of the first non-finite loss"),
    "status": (_opt_str, _STR, "ok | diverged"),
    "seconds": (_opt_num, _NUM, "the lockstep group's wall time divided by its size"),
}


#: Fields a run trained with ``train.bn_eval_all: true`` writes after `SUMMARY_FIELDS` (and only
#: such a run, so other records stay as they were): the accuracy of its final parameters on the
#: validation and test sets with batch norm's running averages, the population statistics
#: (Algorithm 2), the whole set's batch statistics and each minibatch's own statistics
#: (`bnexp.train.EVERY_MODE`).
EVERY_MODE_FIELDS = {
    f"{split}_acc_{mode}": (_opt_num, _NUM, f"{split} accuracy of the final parameters, {what}")
    for split in ("val", "test")
    for mode, what in (
        ("running", "running averages"),
        ("population", "population statistics"),
        ("batch", "the whole set's batch statistics"),
        ("minibatch", "each minibatch's own statistics"),
    )
}


def summary_problem(summary: Any) -> str | None:
    """What is wrong with a parsed summary.json ('key: expected ..., got ...'), None if nothing."""
    if not isinstance(summary, dict):
        return f"expected a JSON object, got {type(summary).__name__}"
    for key, (ok, what, _) in {**SUMMARY_FIELDS, **EVERY_MODE_FIELDS}.items():
        if key in summary and not ok(summary[key]):
            shown = json.dumps(summary[key])
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            return f"{key}: expected {what}, got {shown.replace(chr(34), chr(39))}"
    return None


def _load_summary(path: Path) -> tuple[dict | None, str | None]:
    """(summary, None) for a valid summary.json, (None, problem) for a corrupt one, (None, None)
    when it does not exist (the run is unfinished)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"cannot read ({exc})"
    try:
        summary = json.loads(text)
    except ValueError as exc:
        return None, f"not valid JSON ({exc})"
    problem = summary_problem(summary)
    return (None, problem) if problem else (summary, None)


def is_finished(out: str | Path, run_id: str) -> bool:
    """True when the run's summary.json (written last, the commit marker) exists and is valid.

    A corrupt summary.json counts as unfinished, so running the command again retrains the run.
    """
    summary, _ = _load_summary(run_dir(out, run_id) / "summary.json")
    return summary is not None


def write_run(
    out: str | Path,
    run_id: str,
    run_config: dict,
    summary: dict,
    metrics: Sequence[dict],
    *,
    probe_layers: Sequence[dict] = (),
    probe_landscape: Sequence[dict] = (),
) -> Path:
    """Write a finished run: config.yaml, metrics.jsonl, the probe records, then summary.json
    (each atomic).

    Parameters
    ----------
    run_config : `config.run_config_dict(run)`.
    summary : the run's results (fields in the module docstring);
        `run_id` is added when missing. NaN/inf are stored as null.
    metrics : one dict per accuracy check (e.g. epoch, iteration, train_acc, val_acc).
    probe_layers, probe_landscape : the run's probe records (`bnexp.train.RunResult`), written
        to layers.jsonl and landscape.jsonl when not empty.

    Returns
    -------
    Path of the run folder.
    """
    folder = run_dir(out, run_id)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"{folder}: cannot create ({exc.strerror or exc}); choose a writable -o folder"
        ) from None
    atomic_write_text(folder / "config.yaml", dump_yaml(to_jsonable(run_config)))
    atomic_write_text(folder / "metrics.jsonl", _jsonl_text(metrics))
    for name, lines in ((LAYERS_FILE, probe_layers), (LANDSCAPE_FILE, probe_landscape)):
        if lines:
            atomic_write_text(folder / name, _jsonl_text(lines))
    atomic_write_json(folder / "summary.json", {"run_id": run_id, **summary})
    return folder


#: A run's probe records (`bnexp.probes`), present when it was trained with probes on.
LAYERS_FILE, LANDSCAPE_FILE = "layers.jsonl", "landscape.jsonl"
#: Summary fields copied into every probe record read back (what the probe figures group by).
_PROBE_RUN_FIELDS = ("run_id", "batchnorm", "normalization", "weight_scale", "learning_rate")


def _jsonl_text(rows: Iterable[dict]) -> str:
    """One standard JSON object per line."""
    return "".join(_json_text(row, indent=None) + "\n" for row in rows)


def _read_jsonl(path: Path) -> list[dict]:
    """The objects of a .jsonl file ([] when it does not exist); OutputError when corrupt."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise OutputError(f"{path}: cannot read ({exc}); retrain the run") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            raise OutputError(
                f"{path}:{number}: not a JSON object; delete the run's summary.json and run "
                "the experiment's command again to retrain it"
            )
        rows.append(row)
    return rows


def read_probe_records(out: str | Path, summaries: Sequence[dict]) -> tuple[list, list]:
    """The probe records of the given runs: (layer records, landscape records).

    Each record carries its run's `_PROBE_RUN_FIELDS` and ``diverged`` (what the probe figures
    group runs by). Runs trained without probes have none. Raises OutputError for a corrupt file.
    """
    layer_records, landscape_records = [], []
    for s in summaries:
        run = {key: s[key] for key in _PROBE_RUN_FIELDS if key in s}
        run["diverged"] = bool(s.get("diverged"))
        folder = run_dir(out, str(s["run_id"]))
        layer_records += [{**run, **r} for r in _read_jsonl(folder / LAYERS_FILE)]
        landscape_records += [{**run, **r} for r in _read_jsonl(folder / LANDSCAPE_FILE)]
    return layer_records, landscape_records


def read_summaries(
    out: str | Path, run_ids: Iterable[str] | None = None, *, strict: bool = False
) -> list[dict]:
    """The summaries of the finished runs in OUT/runs, ordered by (index, run_id).

    Unfinished run folders (no summary.json) are skipped. With `run_ids`, only those runs (e.g.
    the current config's, when --force left runs of an older config behind). A corrupt
    summary.json (unreadable, not JSON, or a field of the wrong type) is skipped too, or with
    `strict` raises OutputError naming the file.
    """
    runs = Path(out) / "runs"
    if not runs.is_dir():
        return []
    wanted = None if run_ids is None else set(run_ids)
    summaries = []
    for folder in sorted(p for p in runs.iterdir() if p.is_dir()):
        if wanted is not None and folder.name not in wanted:
            continue
        path = folder / "summary.json"
        summary, problem = _load_summary(path)
        if problem and strict:
            raise OutputError(
                f"{path}: corrupt run record: {problem}; run the experiment's command again "
                f"with -o {out} to retrain that run"
            )
        if summary is not None:
            summary.setdefault("run_id", folder.name)
            summaries.append(summary)
    summaries.sort(key=lambda s: (_sort_index(s.get("index")), str(s["run_id"])))
    return summaries


def read_current_summaries(out: str | Path, what: str = "show") -> tuple[list[dict], int]:
    """The finished runs of OUT's own config (OUT/config.yaml), and how many runs it has in all.

    Runs a --force re-run left behind from an older config are not included. Reads only OUT:
    no data, no training.

    Raises
    ------
    OutputError : OUT has no finished run, its config.yaml is missing or invalid, or a
        summary.json of its runs is corrupt (`what` names the action in the message).
    """
    out = Path(out)
    if not any((out / "runs").glob("*/summary.json")):  # also a missing or empty folder
        raise OutputError(
            f"{out}: nothing to {what} in OUT (no finished runs in {out / 'runs'}); "
            "check the folder or run bnexp train / sweep-init first"
        )
    ids, expected = _current_runs(out)
    summaries = read_summaries(out, ids, strict=True)
    if not summaries:
        raise OutputError(
            f"{out}: nothing to {what} in OUT (its runs are of an older config, not of "
            f"{out / 'config.yaml'}); run that experiment's command with -o {out} first"
        )
    return summaries, expected


def read_results(out: str | Path) -> list[dict]:
    """The finished runs of a result folder, one dict per run (the summary.json fields, in run
    order): what `bnexp show` prints. Reads only OUT; raises OutputError like `bnexp show`."""
    return read_current_summaries(out)[0]


def _current_runs(out: Path) -> tuple[set[str], int]:
    """Run ids and count of the runs of OUT/config.yaml.

    Raises OutputError when it is missing or not a valid experiment config: without it the
    figures could not tell the current runs from those a --force re-run left behind.
    """
    from bnexp.config import expand_runs, load_config, run_ids

    path = out / "config.yaml"
    fix = (
        f"run the experiment's command again with -o {out} --force to rewrite it "
        "(finished runs are kept)"
    )
    if not path.is_file():
        raise OutputError(f"{path} is missing, so the runs of OUT are unknown; {fix}")
    try:
        cfg = load_config(path)
    except BnexpError as exc:
        raise OutputError(f"{path} is not a valid experiment config ({exc}); {fix}") from None
    runs = expand_runs(cfg)
    return set(run_ids(cfg, runs)), len(runs)


def _sort_index(index: Any) -> int:
    return index if isinstance(index, int) and not isinstance(index, bool) else sys.maxsize


def _csv_cell(value: Any) -> str:
    """Booleans as true/false, floats with repr precision, None/NaN as empty."""
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    if isinstance(value, (float, np.floating)):
        return repr(float(value)) if math.isfinite(value) else ""
    return str(value)


def results_csv_text(summaries: Sequence[dict]) -> str:
    """results.csv text: a header of `results_columns`, one row per summary in the given order."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = results_columns(summaries)
    writer.writerow(columns)
    for s in summaries:
        writer.writerow([_csv_cell(results_cell(s, col)) for col in columns])
    return buf.getvalue()


def write_results_csv(out: str | Path, summaries: Sequence[dict]) -> Path:
    """Write OUT/results.csv atomically (see `results_csv_text`); returns its path."""
    path = Path(out) / "results.csv"
    atomic_write_text(path, results_csv_text(summaries))
    return path


def read_manifest(out: str | Path, note: Callable[[str], None] | None = None) -> dict | None:
    """OUT/manifest.json as a dict, or None when missing, unreadable or malformed.

    A manifest still at status "running" was left by a process that was killed (call this while
    holding `output_lock`, so no live process is writing it): it reads as "interrupted", with
    `status_note` saying so. A manifest whose `previous` is not a list of objects reads as
    absent. Both are reported through `note` (one line each) when given.
    """
    path = Path(out) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        _note(note, f"{path}: unreadable ({exc}); its provenance is not kept")
        return None
    if not isinstance(manifest, dict):
        _note(note, f"{path}: not a JSON object; its provenance is not kept")
        return None
    previous = manifest.get("previous", [])
    if not (isinstance(previous, list) and all(isinstance(p, dict) for p in previous)):
        _note(note, f"{path}: 'previous' is not a list of objects; its provenance is not kept")
        return None
    if manifest.get("status") == "running":
        manifest["status"] = "interrupted"
        manifest["status_note"] = "read as 'running': the process was killed before it finished"
        _note(note, f"{path}: the last invocation was killed; its finished runs are kept")
    return manifest


def _note(note: Callable[[str], None] | None, message: str) -> None:
    if note is not None:
        note(f"note: {message}")


def write_manifest(out: str | Path, manifest: dict) -> Path:
    """Write OUT/manifest.json atomically; returns its path."""
    path = Path(out) / "manifest.json"
    atomic_write_json(path, manifest)
    return path


#: What git_dirty describes, from the work tree's top (`:/`): the code, not results/.
_CODE_PATHS = (":/bnexp", ":/configs", ":/pyproject.toml")


def _git_info(folder: Path) -> dict | None:
    """{commit, dirty} of the git work tree holding folder, or None (no git, not a work tree)."""
    folder = folder if folder.is_dir() else folder.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if commit.returncode != 0:
            return None
        # Dirty means the code changed (the package, configs, pyproject), not the result files.
        status = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--", *_CODE_PATHS],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    return {"commit": commit.stdout.strip(), "dirty": dirty}


def _blas_info() -> list[dict]:
    """BLAS/OpenMP libraries numpy uses (threadpoolctl), without file paths of this machine."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("user_api", "internal_api", "prefix", "version", "threading_layer", "architecture")
    return [{k: lib[k] for k in (*keep, "num_threads") if k in lib} for lib in threadpool_info()]


def _portable(value: Any) -> Any:
    """Absolute paths in manifest fields made relative to the working dir, or reduced to a name."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_portable(v) for v in value]
    if isinstance(value, (str, Path)) and os.path.isabs(str(value)):
        path = Path(value)
        try:
            return str(path.relative_to(Path.cwd()))
        except ValueError:
            return path.name
    if isinstance(value, str) and "=" in value:  # KEY=/abs/path overrides on the command line
        key, _, rest = value.partition("=")
        if os.path.isabs(rest):
            return f"{key}={_portable(rest)}"
    return value


def now_iso() -> str:
    """The current UTC time, ISO 8601 with seconds."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def collect_manifest(
    *,
    out: str | Path | None = None,
    seed: Any = None,
    rng: str | None = None,
    data_source: dict | None = None,
    command: Sequence[str] | None = None,
    start_time: str | None = None,
    end_time: str | None = None,
    extra: dict | None = None,
) -> dict:
    """The environment and provenance fields of OUT/manifest.json.

    Parameters
    ----------
    out : the output folder; its git work tree is used when the package is not in one.
    seed, rng : the config's root seed(s) and rng mode.
    data_source : `data.Splits.source` (layout, per-file checksums).
    command : the command line (default sys.argv with argv[0] shown as 'bnexp').
    start_time, end_time : ISO 8601 strings (start defaults to now; end stays None until set).
    extra : more fields merged in last.

    Absolute paths are stored relative to the working folder (or as bare names), so a committed
    manifest does not reveal the machine it ran on.
    """
    import bnexp

    git = _git_info(Path(bnexp.__file__).resolve().parent)
    git_source = "package" if git else None
    if git is None and out is not None:
        git = _git_info(Path(out).resolve())
        git_source = "output" if git else None
    argv = list(command) if command is not None else ["bnexp", *sys.argv[1:]]
    manifest = {
        "bnexp_version": bnexp.__version__,
        "python_version": platform.python_version(),
        "numpy_version": np.__version__,
        "platform": platform.platform(),
        "blas": _blas_info(),
        "git_commit": git["commit"] if git else None,
        "git_dirty": git["dirty"] if git else None,
        "git_source": git_source,
        "seed": seed,
        "rng": rng,
        "data": _portable(data_source) if data_source is not None else None,
        "start_time": start_time or now_iso(),
        "end_time": end_time,
        "command": _portable(argv),
    }
    if extra:
        manifest.update(extra)
    return to_jsonable(manifest)
