"""Checkpoints of a lockstep group in training: one ``.npz`` file per group, so an interrupted
group resumes from its last epoch end instead of iteration 0.

A checkpoint is ``OUT/checkpoints/<group-id>.npz``: the group's arrays under their names, plus
one ``meta`` array holding UTF-8 JSON (the iteration reached, the random generators' states, the
probe records so far, ...). It is read with ``np.load(..., allow_pickle=False)`` and `json`
only: a file in OUT never runs code. What goes into it is `bnexp.train`'s business; this module
knows the file: where it lives, when one is due, how it is written, and when it is refused.

A checkpoint is tied to its group by a key (`group_key`: the group's run ids, the whole config,
the data's fingerprint and `FORMAT`); a file whose key differs is removed unread. A file that
cannot be read is removed too, with one note on stderr, and the group trains from iteration 0.

Writes are atomic (`bnexp.records.atomic_write`): a kill leaves the previous checkpoint or the
new one, and at most a ``.<name>.<random>.tmp`` temporary, which the next run in OUT removes.
The file is not fsynced: after a power loss it may be empty or truncated, which only costs the
retraining of its group.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnexp import records
from bnexp.errors import OutputError

#: Version of the file's content; part of the key, so a file of another version is not used.
FORMAT = 1
#: Folder of OUT holding the checkpoints.
FOLDER = "checkpoints"
#: Default seconds of training between two checkpoints of a group (checked at epoch ends). A
#: checkpoint of a default-sweep group (56 MB) takes about 0.1 s to write, so this costs at most
#: about 0.5 % of the training time; the default sweep's groups (6 s on an idle machine) write none,
#: and with the 49,000-image split (an epoch of 20-30 s) every epoch end writes one.
DEFAULT_SECONDS = 20.0
#: Environment variable overriding `DEFAULT_SECONDS` (0: at every epoch end; "off": never).
SECONDS_VARIABLE = "BNEXP_CHECKPOINT_SECONDS"


_FIX = f"free some disk space, or set {SECONDS_VARIABLE}=off to train without checkpoints"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (unreadable, or its content does not fit)."""


def period_from_environment() -> float | None:
    """Seconds between checkpoints from `SECONDS_VARIABLE` (default `DEFAULT_SECONDS`); None
    (never checkpoint) for "off". A value that is not a number >= 0 is one ValueError line."""
    text = os.environ.get(SECONDS_VARIABLE, "").strip()
    if not text:
        return DEFAULT_SECONDS
    if text.lower() == "off":
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise ValueError(
            f"{SECONDS_VARIABLE}={text!r} is not a number of seconds >= 0 or 'off'; "
            "set it to e.g. 60, 0 (every epoch) or off"
        )
    return seconds


def group_id(run_ids: Sequence[str]) -> str:
    """16 hex digits naming a group's checkpoint file, from its run ids (in member order)."""
    return hashlib.sha256("\n".join(run_ids).encode()).hexdigest()[:16]


def group_key(run_ids: Sequence[str], config_yaml: str, data_fingerprint: str) -> str:
    """What a checkpoint must have been written for: the group's runs (in member order), the
    experiment's whole resolved config (a cs231n replay's plans depend on every run), the data
    and the file format. sha256 hex."""
    blob = json.dumps([FORMAT, list(run_ids), config_yaml, data_fingerprint])
    return hashlib.sha256(blob.encode()).hexdigest()


def data_fingerprint(data, source: dict) -> str:
    """The data's identity: `bnexp.data.fingerprint` of its files when it was loaded from them,
    else a sha256 of the split arrays themselves (data handed over in memory)."""
    if source.get("fingerprint"):
        return str(source["fingerprint"])
    digest = hashlib.sha256()
    for name in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test"):
        array = getattr(data, name, None)
        if array is None:
            digest.update(f"{name}:none".encode())
            continue
        array = np.ascontiguousarray(array)
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.data)
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Checkpoint:
    """Where and how often one group is checkpointed (picklable: it travels with the group to a
    worker process).

    path : OUT/checkpoints/<group-id>.npz.
    key : `group_key` of the group; a file with another key is removed unread.
    seconds : a checkpoint is written at an epoch end once this many seconds of training have
        passed since the last one (or since the group started); 0 writes one at every epoch end.
    """

    path: Path
    key: str
    seconds: float = DEFAULT_SECONDS

    def due(self, last: float) -> bool:
        """Whether a checkpoint is due now, the last one (or the start) at perf_counter `last`."""
        return time.perf_counter() - last >= self.seconds

    def save(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """Write the arrays and the JSON-able meta atomically (replacing the previous file)."""
        text = json.dumps({**meta, "key": self.key}, allow_nan=True, default=_plain)
        arrays = {**arrays, "meta": np.frombuffer(text.encode(), dtype=np.uint8)}

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.path.parent}: cannot create ({exc}); {_FIX}") from None
        records.atomic_write(self.path, write, fix=_FIX)

    def load(self) -> tuple[dict[str, np.ndarray], dict] | None:
        """The arrays and meta of this group's checkpoint, or None when there is none to use
        (none written; or another group's, config's or data's: removed with a note; or
        unreadable: removed with a note)."""
        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                meta = json.loads(npz["meta"].tobytes().decode())
                if not isinstance(meta, dict):
                    raise CheckpointError("its meta is not a JSON object")
                if meta.get("key") != self.key:
                    self.discard("written for another config or data")
                    return None
                arrays = {name: npz[name] for name in npz.files if name != "meta"}
        except Exception as exc:  # a damaged file fails anywhere in zip, npy header or JSON
            self.discard(f"unreadable ({type(exc).__name__}: {exc})")
            return None
        return arrays, meta

    def discard(self, why: str) -> None:
        """Remove the file, with one note on stderr saying why (the group trains from 0)."""
        self.remove()
        self.note(f"checkpoint {self.path} not used ({why}); removed, its group trains from 0")

    @staticmethod
    def note(message: str) -> None:
        """One line on stderr (from a worker process too: its stderr is the command's)."""
        print(f"note: {message}", file=sys.stderr, flush=True)

    def remove(self) -> None:
        """Delete the file if it exists."""
        self.path.unlink(missing_ok=True)


def _plain(value):
    """json.dumps fallback: NumPy scalars and arrays as Python numbers and lists."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def folder(out: str | Path) -> Path:
    """OUT/checkpoints."""
    return Path(out) / FOLDER


def remove_others(out: str | Path, keep: Sequence[Path]) -> list[Path]:
    """Delete the files in OUT/checkpoints but those in `keep`: checkpoints of groups that have
    finished or are no group of this config, and temporaries of a killed writer; then the folder
    when it is empty. Returns the removed paths. Call it only while holding OUT's lock and while
    no group trains (a live writer's temporary looks the same)."""
    where = folder(out)
    if not where.is_dir():
        return []
    wanted = {Path(p).name for p in keep}
    removed = []
    for path in sorted(where.iterdir()):
        if path.name not in wanted and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    remove_folder_if_empty(out)
    return removed


def remove_all(out: str | Path) -> None:
    """Delete OUT/checkpoints with everything in it (``--force``: start every group afresh)."""
    shutil.rmtree(folder(out), ignore_errors=True)


def remove_folder_if_empty(out: str | Path) -> None:
    """Remove OUT/checkpoints when nothing is left in it."""
    with contextlib.suppress(OSError):  # not empty (a temporary of a live writer), or gone
        folder(out).rmdir()
