"""CIFAR-10: locate, verify and parse the official layouts; prepare the cs231n splits; cache them.

The features are bit-for-bit those of the cs231n ``get_CIFAR10_data``: images as float64, minus the
per-pixel mean of the first ``num_training`` training images (``np.mean`` over axis 0 in float64),
flattened channel-major (R plane, G plane, B plane, each 32x32 row-major). The mean is accumulated
batch by batch from the uint8 pixels in float64; sums of at most 50,000 bytes are exact in float64,
so the result is identical to the reference, which holds all 49,000 images as float64 (1.2 GB).

A float32 experiment asks for float32 features (``dtype``): each image is still computed in
float64 and then rounded, a block of rows at a time, so the values are those of the float64
features cast to float32, without ever holding the float64 copy (the 49,000-image split is 0.6 GB
instead of 1.2 GB + 0.6 GB). The features are read-only: worker processes forked after loading
share their pages, and a write, which would silently copy them into each worker, is an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pickle
import shlex
import warnings
from pathlib import Path

import numpy as np

from bnexp.download import ARCHIVES, download, new_temp_file, sweep_temporaries
from bnexp.errors import ConfigError, DataError

__all__ = [
    "Splits",
    "describe",
    "download",
    "fingerprint",
    "load_splits",
    "read_batch",
    "resolve_data_dir",
]

RECORD = 3073  # 1 label byte + 3,072 pixel bytes
PIXELS = 3072
TEST_BATCH_SIZE = 10_000
#: Images converted to features at a time: the float64 temporary of a block stays small (6 MB).
FEATURE_BLOCK = 256
FEATURE_DTYPES = ("float64", "float32")
CACHE_VERSION = 2  # 2: keyed by folder and settings, checked against the files on load
CACHE_TEMP_PREFIX = ".tmp-cifar10-"
LAYOUTS = {  # layout -> (folder, training batch files, test batch file, meta file)
    "binary": (
        ARCHIVES["binary"][2],
        tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        "test_batch.bin",
        "batches.meta.txt",
    ),
    "python": (
        ARCHIVES["python"][2],
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
    ),
}


@dataclasses.dataclass(frozen=True)
class Splits:
    """The cs231n splits as features (float64, or float32 when asked for), read-only.

    X_train : (num_train_subset, 3072) float, the first training images (mean subtracted).
    y_train : (num_train_subset,) int64 labels 0..9.
    X_val, y_val : (num_validation, 3072), the training images after the first num_training.
    X_test, y_test : (num_test, 3072), the first test images.
    mean_image : (3072,) float64 per-pixel mean of the first num_training training images
        (computed even when it is not subtracted).
    source : JSON-ready dict for the run manifest: data dir, layout, files with bytes, image counts
        and sha256, split settings and counts, and ``fingerprint`` (see ``fingerprint()``): the
        identity of the data, the same for any copy of the same files and settings.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    mean_image: np.ndarray
    source: dict


def resolve_data_dir(cli_value: str | os.PathLike | None) -> Path:
    """The data folder: the --data-dir value, else $BNEXP_DATA_DIR, else the user cache folder.

    The user cache folder is ``$XDG_CACHE_HOME/bnexp`` (default ``~/.cache/bnexp``).
    """
    if cli_value:
        return Path(cli_value).expanduser()
    if os.environ.get("BNEXP_DATA_DIR"):
        return Path(os.environ["BNEXP_DATA_DIR"]).expanduser()
    return _user_cache() / "bnexp"


def _user_cache() -> Path:
    """$XDG_CACHE_HOME or ~/.cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()


def _is_default_folder(data_dir: Path) -> bool:
    """Whether ``data_dir`` is the user cache folder, the only one bnexp fills on its own.

    A folder the user named (--data-dir, BNEXP_DATA_DIR) is theirs: a missing copy there is an
    error, never a 163 MB download they did not ask for.
    """
    default = _user_cache() / "bnexp"
    return Path(os.path.abspath(data_dir)) == Path(os.path.abspath(default))


def find_layout(data_dir: Path) -> tuple[str, Path] | None:
    """(layout, folder) of the CIFAR-10 copy in ``data_dir``, binary first; None if none."""
    for layout, (folder, *_) in LAYOUTS.items():
        if (data_dir / folder).is_dir():
            return layout, data_dir / folder
    return None


def _missing_message(data_dir: Path) -> str:
    """One line: where we looked, what is missing and the command that fetches it."""
    folders = " or ".join(f"{spec[0]}/" for spec in LAYOUTS.values())
    where = "the folder does not exist" if not data_dir.exists() else f"looked for {folders}"
    fetch = "bnexp data download"
    if not _is_default_folder(data_dir):
        fetch += f" --data-dir {shlex.quote(str(data_dir))}"
    return (
        f"no CIFAR-10 in {data_dir} ({where}); fetch it with `{fetch}`, "
        "or pass --data-dir / set BNEXP_DATA_DIR to a folder that holds one"
    )


# --- readers --------------------------------------------------------------------------------


def read_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file of either layout (``.bin`` = binary records, otherwise a pickle).

    Returns images (N, 3072) uint8 channel-major and labels (N,) int64 in 0..9.
    """
    path = Path(path)
    images, labels, _ = _read_batch_bytes(path, _read_file(path))
    return images, labels


def _read_file(path: Path) -> bytes:
    """The bytes of a batch file, with a DataError naming it when it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(
            f"missing batch file {path}; re-download with `bnexp data download`"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _read_batch_bytes(path: Path, raw: bytes) -> tuple[np.ndarray, np.ndarray, str]:
    """Parse and validate the bytes of ``path``; also return their sha256."""
    sha256 = hashlib.sha256(raw).hexdigest()
    if path.suffix == ".bin":
        images, labels = _parse_binary(path, raw)
    else:
        images, labels = _parse_pickle(path, raw)
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        bad = labels[(labels < 0) | (labels > 9)][0]
        raise DataError(f"{path}: label {bad} outside 0..9; the file is corrupt, re-download it")
    return images, labels, sha256


def _parse_binary(path: Path, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """3,073-byte records -> (images (N, 3072) uint8 view, labels (N,) int64)."""
    if len(raw) == 0 or len(raw) % RECORD:
        raise DataError(
            f"{path}: {len(raw)} bytes is not a whole number of 3,073-byte records "
            "(truncated or not a CIFAR-10 binary batch); re-download it"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD)
    return records[:, 1:], records[:, 0].astype(np.int64)


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only what the official batches contain: dicts, lists, bytes, str, numpy arrays."""

    def find_class(self, module, name):
        allowed = _allowed_globals()
        if (module, name) not in allowed:
            raise DataError(
                f"{self.path}: refused to unpickle {module}.{name} (not part of a CIFAR-10 "
                "batch; the file may be malicious); use the official archive"
            )
        return allowed[(module, name)]

    def persistent_load(self, pid):
        raise DataError(f"{self.path}: persistent ids are not part of a CIFAR-10 batch")


def _latin1_encode(text, encoding="latin1"):
    """The one use of _codecs.encode in numpy pickles written by Python 3 at protocol 2."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed")
    return text.encode("latin1")


def _allowed_globals() -> dict:
    """(module, name) -> object for every global an official CIFAR-10 pickle may reference."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    recon = multiarray._reconstruct
    return {
        ("numpy.core.multiarray", "_reconstruct"): recon,
        ("numpy._core.multiarray", "_reconstruct"): recon,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytes"): bytes,
        ("__builtin__", "bytes"): bytes,
    }


def _safe_unpickle(path: Path, raw: bytes):
    """Unpickle ``raw`` with the restricted unpickler; any refusal or damage is a DataError."""
    unpickler = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes")
    unpickler.path = path
    try:
        return unpickler.load()
    except DataError:
        raise
    except Exception as exc:  # truncated / damaged pickles raise many different types
        raise DataError(
            f"{path}: not a readable CIFAR-10 pickle ({exc!r}); re-download it"
        ) from exc


def _parse_pickle(path: Path, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A pickled dict with data (N, 3072) uint8 and labels (list of N ints), bytes or str keys."""
    obj = _safe_unpickle(path, raw)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: 'data' is not a 2-D uint8 array; not a CIFAR-10 batch")
    if data.shape[1] != PIXELS or data.shape[0] == 0:
        raise DataError(f"{path}: 'data' has shape {data.shape}, expected (N, 3072) with N > 0")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != data.shape[0]:
        raise DataError(f"{path}: 'labels' must list one label per image ({data.shape[0]})")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataError(f"{path}: 'labels' are not integers") from exc
    return data, labels


# --- splits ---------------------------------------------------------------------------------


def load_splits(
    data_dir: str | os.PathLike,
    *,
    num_training: int = 49000,
    num_validation: int = 1000,
    num_test: int = 1000,
    num_train_subset: int = 1000,
    subtract_mean: bool = True,
    download_if_missing: bool = False,
    use_cache: bool = True,
    progress: bool = False,
    cache_dir: str | os.PathLike | None = None,
    dtype: str = "float64",
) -> Splits:
    """Load the cs231n splits of CIFAR-10 from ``data_dir`` (either official layout).

    Parameters
    ----------
    data_dir : folder holding ``cifar-10-batches-bin/`` or ``cifar-10-batches-py/``.
    num_training : training images 0..num_training-1 form the train split (mean computed on them).
    num_validation : the next training images form the validation split.
    num_test : the first test images form the test split.
    num_train_subset : returned X_train is the first ``num_train_subset`` train-split images.
    subtract_mean : subtract ``mean_image`` from every split (as the reference does by default).
    download_if_missing : download the binary archive when no copy is found, but only into the
        user cache folder (``resolve_data_dir(None)`` with BNEXP_DATA_DIR unset); a folder the
        user named is never filled on its own: a missing copy there is a DataError.
    use_cache : read/write the prepared splits in ``cache_dir``.
    progress : progress bar for a download.
    cache_dir : default ``$XDG_CACHE_HOME/bnexp/prepared`` (``~/.cache/bnexp/prepared``).
    dtype : "float64" (the reference), or "float32": the float64 features rounded to float32,
        computed without a float64 copy of the whole split.

    Returns
    -------
    Splits with X_train (num_train_subset, 3072), X_val (num_validation, 3072), X_test
    (num_test, 3072) read-only features of `dtype`, int64 labels, mean_image (3072,) float64
    and ``source``.

    Raises
    ------
    DataError : no copy found (and no download requested), missing/truncated/corrupt batch files,
        fewer images than the settings ask for.
    ConfigError : impossible split settings.
    """
    settings = {
        "num_training": num_training,
        "num_validation": num_validation,
        "num_test": num_test,
        "num_train_subset": num_train_subset,
    }
    _check_settings(settings)
    if dtype not in FEATURE_DTYPES:
        choices = ", ".join(FEATURE_DTYPES)
        raise ConfigError(f"feature dtype must be one of {choices}, got {dtype!r}")
    data_dir = Path(data_dir).expanduser()
    found = find_layout(data_dir)
    if found is None and download_if_missing and _is_default_folder(data_dir):
        download(data_dir, "binary", progress=progress)
        found = find_layout(data_dir)
    if found is None:
        raise DataError(_missing_message(data_dir))
    layout, folder = found
    files = _batch_paths(layout, folder)
    cache_file = checks = None
    if use_cache:
        cache_dir = Path(cache_dir) if cache_dir else _user_cache() / "bnexp" / "prepared"
        cache_file = cache_dir / f"cifar10-{_cache_key(layout, folder, settings)}.npz"
        checks = [_file_check(p) for p in files]  # before reading: a later change is noticed
        cached = _read_cache(cache_file, settings, checks)
        if cached is not None:
            for note in cached[-1].get("warnings", []):
                warnings.warn(note, stacklevel=2)
            return _features(*cached, subtract_mean=subtract_mean, dtype=dtype)
    parts = _prepare(layout, folder, files, settings)
    for note in parts[-1]["warnings"]:
        warnings.warn(note, stacklevel=2)
    if cache_file is not None:
        _write_cache(cache_file, parts, checks)
    return _features(*parts, subtract_mean=subtract_mean, dtype=dtype)


def _check_settings(s: dict) -> None:
    """Raise ConfigError for split settings no data could satisfy."""
    for key, value in s.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"data setting {key} must be a non-negative integer, got {value!r}")
    if s["num_training"] < 1:
        raise ConfigError("data setting num_training must be at least 1")
    if not 1 <= s["num_train_subset"] <= s["num_training"]:
        raise ConfigError(
            f"data setting num_train_subset={s['num_train_subset']} must be between 1 and "
            f"num_training={s['num_training']}"
        )


def _batch_paths(layout: str, folder: Path) -> list[Path]:
    """The six batch files (five training, then test); DataError naming those missing."""
    _, train_names, test_name, _ = LAYOUTS[layout]
    paths = [folder / name for name in (*train_names, test_name)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{folder} is missing batch file(s) {', '.join(missing)}; "
            "re-download with `bnexp data download`"
        )
    return paths


def _prepare(layout: str, folder: Path, files: list[Path], s: dict):
    """Read every batch once: uint8 rows of the splits, the float64 mean image and the source."""
    n_train, n_val, n_sub = s["num_training"], s["num_validation"], s["num_train_subset"]
    total = np.zeros(PIXELS, dtype=np.float64)
    sub, val, sub_y, val_y = [], [], [], []
    offset = 0
    entries, notes = [], []
    for path in files[:-1]:
        images, labels, sha = _read_batch_bytes(path, _read_file(path))
        n = len(labels)
        entries.append(
            {"name": path.name, "bytes": path.stat().st_size, "images": n, "sha256": sha}
        )
        # Integer sums up to 50,000 * 255 are exact in float64, so the batchwise sum equals the
        # reference's np.mean over one float64 array bit for bit (verified in tests/test_data.py).
        total += images[: max(0, min(n, n_train - offset))].sum(axis=0, dtype=np.float64)
        # Copies, so that no view keeps a whole 30 MB batch buffer alive.
        k = max(0, min(n, n_sub - offset))
        sub.append(images[:k].copy())
        sub_y.append(labels[:k])
        a, b = max(0, n_train - offset), max(0, min(n, n_train + n_val - offset))
        val.append(images[a:b].copy())
        val_y.append(labels[a:b])
        offset += n
    if offset < n_train + n_val:
        raise DataError(
            f"{folder} holds {offset} training images, but num_training + num_validation = "
            f"{n_train + n_val}; lower them or use a complete copy"
        )
    test_path = files[-1]
    test_images, test_labels, sha = _read_batch_bytes(test_path, _read_file(test_path))
    n = len(test_labels)
    entries.append(
        {"name": test_path.name, "bytes": test_path.stat().st_size, "images": n, "sha256": sha}
    )
    if n < TEST_BATCH_SIZE:
        notes.append(f"{test_path} holds {n} test images (the official file has {TEST_BATCH_SIZE})")
    if n < s["num_test"]:
        raise DataError(f"{test_path} holds {n} test images, but num_test = {s['num_test']}")
    source = {
        "data_dir": str(folder.parent.resolve()),
        "layout": layout,
        "folder": folder.name,
        "files": entries,
        "train_images": offset,
        "test_images": n,
        "settings": dict(s),
        "counts": {"train": n_sub, "val": n_val, "test": s["num_test"]},
        "warnings": notes,
    }
    source["fingerprint"] = fingerprint(source)
    rows = (
        np.concatenate(sub),
        np.concatenate(sub_y),
        np.concatenate(val).reshape(-1, PIXELS),
        np.concatenate(val_y),
        np.ascontiguousarray(test_images[: s["num_test"]]),
        test_labels[: s["num_test"]].copy(),
    )
    return (*rows, total / n_train, source)


def _features(sub, sub_y, val, val_y, test, test_y, mean_image, source, *, subtract_mean, dtype):
    """uint8 rows -> read-only features of `dtype` (minus the mean image when asked), as Splits."""

    def feat(rows):
        return features(rows, mean_image if subtract_mean else None, dtype)

    source = {**source, "subtract_mean": bool(subtract_mean)}
    return Splits(feat(sub), sub_y, feat(val), val_y, feat(test), test_y, mean_image, source)


def features(rows: np.ndarray, mean_image: np.ndarray | None, dtype: str) -> np.ndarray:
    """Features (N, 3072) of `dtype`, read-only, from uint8 rows (N, 3072).

    Each value is computed in float64 (``float64(pixel) - mean``, as the reference) and then
    rounded to `dtype`, FEATURE_BLOCK rows at a time: the result equals the float64 features
    cast to `dtype` bit for bit, without a float64 copy of all rows.
    """
    out = np.empty(rows.shape, dtype=dtype)
    for start in range(0, rows.shape[0], FEATURE_BLOCK):
        block = rows[start : start + FEATURE_BLOCK].astype(np.float64)
        if mean_image is not None:
            block -= mean_image
        out[start : start + FEATURE_BLOCK] = block  # rounds to nearest, as astype(dtype) does
    out.setflags(write=False)
    return out


# --- cache ----------------------------------------------------------------------------------
# The cache stores the uint8 rows of the three splits and the float64 mean image (about 9 MB
# for the default splits instead of 74 MB of float64 features); the features are rebuilt from
# them by the same code as on a cold load, so warm and cold loads are bit-identical.
#
# One cache file per (folder, layout, settings), overwritten when the files change. It is used
# only when every source file still matches what it was built from: size, mtime and ctime (any
# write, and even os.utime restoring the mtime, moves the ctime) and a sha256 over the first
# SAMPLE_HEAD bytes plus SAMPLE_BLOCKS evenly spaced blocks (the whole file when it is small),
# which catches a same-size rewrite even where ctime is unreliable (some network file systems).
# That reads about 0.3 MB per 30 MB batch, so a warm load stays cheap.

_CACHE_ARRAYS = ("sub", "sub_y", "val", "val_y", "test", "test_y", "mean_image")
SAMPLE_HEAD = 1 << 16
SAMPLE_BLOCK = 1 << 12
SAMPLE_BLOCKS = 64


def fingerprint(source: dict) -> str:
    """The data's identity: 16 hex digits of sha256 over the files' names and sha256 sums and
    the split settings (from a ``Splits.source``). The same for any copy of the same files in
    any folder or layout folder name; different when any file's content or a setting differs."""
    files = [[f["name"], f["sha256"]] for f in source["files"]]
    blob = json.dumps({"files": files, "settings": sorted(source["settings"].items())})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_key(layout: str, folder: Path, settings: dict) -> str:
    """Hash of the cache format, the layout folder and the split settings."""
    blob = json.dumps([CACHE_VERSION, layout, str(folder.resolve()), sorted(settings.items())])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _file_check(path: Path) -> dict:
    """What must match for a cache built from ``path`` to be used: stat fields and a sampled
    sha256 (see the comment above). JSON-ready."""
    digest = hashlib.sha256()
    try:
        st = path.stat()
        with open(path, "rb") as f:
            if st.st_size <= SAMPLE_HEAD + SAMPLE_BLOCKS * SAMPLE_BLOCK:
                digest.update(f.read())
            else:
                digest.update(f.read(SAMPLE_HEAD))
                span = st.st_size - SAMPLE_HEAD - SAMPLE_BLOCK
                for i in range(SAMPLE_BLOCKS):  # the last block ends at the end of the file
                    f.seek(SAMPLE_HEAD + i * span // (SAMPLE_BLOCKS - 1))
                    digest.update(f.read(SAMPLE_BLOCK))
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return {
        "name": path.name,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "sample_sha256": digest.hexdigest(),
    }


def _read_cache(path: Path, s: dict, checks: list[dict]):
    """The cached parts, or None when absent, built from other file contents (then it is
    rebuilt silently), or unreadable or inconsistent (rebuilt with a warning)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["checks"])) != checks:
                return None
            parts = [z[name] for name in _CACHE_ARRAYS]
            source = json.loads(str(z["source"]))
        shapes = [
            (s["num_train_subset"], PIXELS),
            (s["num_validation"], PIXELS),
            (s["num_test"], PIXELS),
        ]
        for rows, labels, shape in zip(parts[0:6:2], parts[1:6:2], shapes, strict=True):
            if rows.shape != shape or rows.dtype != np.uint8 or labels.shape != shape[:1]:
                raise ValueError("unexpected shape")
        if parts[6].shape != (PIXELS,) or parts[6].dtype != np.float64:
            raise ValueError("unexpected mean image")
    except Exception as exc:  # any damage: ignore the file, the caller rebuilds and overwrites it
        warnings.warn(f"ignoring unreadable cache file {path} ({exc!r}); rebuilding", stacklevel=3)
        return None
    return (*parts, source)


def _write_cache(path: Path, parts, checks: list[dict]) -> None:
    """Write the parts atomically (temp file + os.replace); a failure only warns.

    The file gets the mode open() would give (0o666 minus the umask), so that a shared cache
    is readable by the group as the umask intends.
    """
    arrays = dict(zip(_CACHE_ARRAYS, parts[:-1], strict=True))
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(path.parent, (CACHE_TEMP_PREFIX,))
        tmp, fd = new_temp_file(path.parent, CACHE_TEMP_PREFIX, ".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                source=np.array(json.dumps(parts[-1])),
                checks=np.array(json.dumps(checks)),
                **arrays,
            )
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        warnings.warn(f"could not write the data cache {path}: {exc}", stacklevel=3)
    finally:  # also on Ctrl-C: no half-written temporary is left
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# --- info -----------------------------------------------------------------------------------


def describe(data_dir: str | os.PathLike) -> str:
    """Human-readable report for `bnexp data info`: location, layout, counts, sha256 per file."""
    data_dir = Path(data_dir).expanduser()
    found = find_layout(data_dir)
    if found is None:
        raise DataError(_missing_message(data_dir))
    layout, folder = found
    files = _batch_paths(layout, folder)
    lines = [f"location: {folder.resolve()}", f"layout:   {layout}", "files:"]
    counts = []
    for path in files:
        _, labels, sha = _read_batch_bytes(path, _read_file(path))
        counts.append(len(labels))
        per_class = np.bincount(labels, minlength=10)
        lines.append(f"  {path.name:<18} {len(labels):>6} images  sha256 {sha}")
        lines.append(f"  {'':<18} per class {' '.join(str(c) for c in per_class)}")
    n_train, n_test = sum(counts[:-1]), counts[-1]
    lines.append(f"training images: {n_train}   test images: {n_test}")
    if n_test < TEST_BATCH_SIZE:
        lines.append(f"note: the test batch is partial (the official file has {TEST_BATCH_SIZE})")
    meta = folder / LAYOUTS[layout][3]
    if meta.is_file() and layout == "binary":
        names = [n for n in meta.read_text(encoding="utf-8").split() if n]
        lines.append(f"classes: {', '.join(names)}")
    lines.append(
        "default cs231n splits: train 0..48999 (mean image), val 49000..49999, "
        "test 0..999, experiment subset 0..999"
    )
    return "\n".join(lines)
