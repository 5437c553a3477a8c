"""CIFAR-10 readers, cs231n splits and cache, on small generated datasets in both layouts."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fakecifar import N_BATCH, N_TEST, make_images, write_binary, write_python

from bnexp import data, download
from bnexp.cli import main
from bnexp.errors import ConfigError, DataError

SMALL = {"num_training": 150, "num_validation": 30, "num_test": 20, "num_train_subset": 60}


def cs231n_reference(root: Path, num_training, num_validation, num_test, num_train_subset):
    """cs231n data_utils.get_CIFAR10_data transcribed (reshape(-1) instead of 10000 images)."""

    def load_batch(path):
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="latin1")
        # Python 2 str keys load as str under latin1; our Python 3 files wrote real bytes keys.
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
        X = d["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).astype("float")
        return X, np.array(d["labels"])

    folder = root / "cifar-10-batches-py"
    xs, ys = zip(*(load_batch(folder / f"data_batch_{b}") for b in range(1, 6)), strict=True)
    X_train, y_train = np.concatenate(xs), np.concatenate(ys)
    X_test, y_test = load_batch(folder / "test_batch")
    mask = list(range(num_training, num_training + num_validation))
    X_val, y_val = X_train[mask], y_train[mask]
    X_train, y_train = X_train[:num_training], y_train[:num_training]
    X_test, y_test = X_test[:num_test], y_test[:num_test]
    mean_image = np.mean(X_train, axis=0)
    X_train -= mean_image
    X_val -= mean_image
    X_test -= mean_image
    flat = [a.transpose(0, 3, 1, 2).copy().reshape(len(a), -1) for a in (X_train, X_val, X_test)]
    return {
        "X_train": flat[0][:num_train_subset],
        "y_train": y_train[:num_train_subset],
        "X_val": flat[1],
        "y_val": y_val,
        "X_test": flat[2],
        "y_test": y_test,
        "mean_image": mean_image.transpose(2, 0, 1).reshape(-1),
    }


def load(root, cache_dir, **kw):
    """load_splits with the small settings, the short-test-batch warning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return data.load_splits(root, cache_dir=cache_dir, **{**SMALL, **kw})


@pytest.fixture
def images():
    return make_images(np.random.default_rng(0))


@pytest.fixture
def both(tmp_path, images):
    """The same generated dataset in both layouts (separate roots)."""
    return write_binary(tmp_path / "bin", *images), write_python(tmp_path / "py", *images)


def test_read_batch_binary_and_pickle_identical(both, images):
    root_bin, root_py = both
    for name in ["data_batch_1", "data_batch_5", "test_batch"]:
        xb, yb = data.read_batch(root_bin / "cifar-10-batches-bin" / f"{name}.bin")
        xp, yp = data.read_batch(root_py / "cifar-10-batches-py" / name)
        assert xb.dtype == xp.dtype == np.uint8 and yb.dtype == yp.dtype == np.int64
        np.testing.assert_array_equal(xb, xp)
        np.testing.assert_array_equal(yb, yp)
    x, y, _, _ = images
    xb, yb = data.read_batch(root_bin / "cifar-10-batches-bin" / "data_batch_2.bin")
    np.testing.assert_array_equal(xb, x[N_BATCH : 2 * N_BATCH])
    np.testing.assert_array_equal(yb, y[N_BATCH : 2 * N_BATCH])


@pytest.mark.parametrize("bytes_keys,protocol", [(True, 2), (False, 4), (True, 3)])
def test_pickle_variants_read(tmp_path, images, bytes_keys, protocol):
    root = write_python(tmp_path, *images, bytes_keys=bytes_keys, protocol=protocol)
    x, y = data.read_batch(root / "cifar-10-batches-py" / "data_batch_1")
    np.testing.assert_array_equal(x, images[0][:N_BATCH])
    np.testing.assert_array_equal(y, images[1][:N_BATCH])


@pytest.mark.parametrize("layout", ["bin", "py"])
def test_splits_equal_cs231n_reference_bit_for_bit(tmp_path, both, layout):
    root = both[0] if layout == "bin" else both[1]
    got = load(root, tmp_path / "cache")
    ref = cs231n_reference(both[1], **SMALL)
    for key, want in ref.items():
        arr = getattr(got, key)
        assert arr.dtype == want.dtype and arr.shape == want.shape, key
        assert np.array_equal(arr, want), key  # exact, not approximate
    assert got.X_train.shape == (60, 3072) and got.X_val.shape == (30, 3072)
    assert got.X_test.shape == (20, 3072) and got.y_train.dtype == np.int64


def test_uint8_float64_mean_equals_reference_recipe():
    """The claim data.py relies on: mean from uint8 with a float64 accumulator (here summed in
    five chunks, as batches) equals the reference recipe on float64 HWC images, bit for bit."""
    rng = np.random.default_rng(1)
    n = 49_000
    hwc = rng.integers(0, 256, size=(n, 4, 4, 3), dtype=np.uint8)
    hwc[: n // 2] = rng.integers(250, 256, size=(n // 2, 4, 4, 3))  # large sums: rounding risk
    ref = hwc.astype(np.float64)
    mean = np.mean(ref, axis=0)
    ref -= mean
    ref = ref.transpose(0, 3, 1, 2).reshape(n, -1)

    chw = hwc.transpose(0, 3, 1, 2).reshape(n, -1)  # channel-major uint8, as the binary records
    total = sum(c.sum(axis=0, dtype=np.float64) for c in np.array_split(chw, 5))
    ours_mean = total / n
    assert np.array_equal(ours_mean, mean.transpose(2, 0, 1).reshape(-1))
    assert np.array_equal(np.mean(chw, axis=0, dtype=np.float64), ours_mean)
    assert np.array_equal(chw.astype(np.float64) - ours_mean, ref)


def test_layouts_give_identical_splits(tmp_path, both):
    a = load(both[0], tmp_path / "c1")
    b = load(both[1], tmp_path / "c2")
    for key in ["X_train", "y_train", "X_val", "y_val", "X_test", "y_test", "mean_image"]:
        assert np.array_equal(getattr(a, key), getattr(b, key)), key
    assert a.source["layout"] == "binary" and b.source["layout"] == "python"


def test_split_rows_and_no_mean(tmp_path, both, images):
    x, y, xt, yt = images
    s = load(both[0], tmp_path / "c", subtract_mean=False)
    np.testing.assert_array_equal(s.X_train, x[:60].astype(np.float64))
    np.testing.assert_array_equal(s.X_val, x[150:180].astype(np.float64))
    np.testing.assert_array_equal(s.y_val, y[150:180])
    np.testing.assert_array_equal(s.X_test, xt[:20].astype(np.float64))
    np.testing.assert_array_equal(s.y_test, yt[:20])
    np.testing.assert_allclose(s.mean_image, x[:150].mean(axis=0), rtol=1e-12)
    assert s.source["subtract_mean"] is False


def test_source_for_manifest(tmp_path, both):
    s = load(both[0], tmp_path / "c")
    folder = both[0] / "cifar-10-batches-bin"
    files = {f["name"]: f for f in s.source["files"]}
    assert list(files) == [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name, entry in files.items():
        raw = (folder / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(raw).hexdigest()
        assert entry["bytes"] == len(raw) and entry["images"] == len(raw) // 3073
    assert s.source["train_images"] == 200 and s.source["test_images"] == N_TEST
    assert s.source["counts"] == {"train": 60, "val": 30, "test": 20}


def test_short_test_batch_warns(tmp_path, both):
    with pytest.warns(UserWarning, match=r"test_batch\.bin holds 30 test images"):
        data.load_splits(both[0], cache_dir=tmp_path / "c", **SMALL)


# --- untrusted pickles ----------------------------------------------------------------------


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _EvilSystem:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [_Evil, _EvilSystem])
@pytest.mark.parametrize("where", ["top", "inside"])
def test_malicious_pickle_refused_before_it_runs(tmp_path, images, payload, where):
    root = write_python(tmp_path / "d", *images)
    marker = tmp_path / "pwned"
    evil = payload(marker)
    x, y = images[0][:N_BATCH], images[1][:N_BATCH]
    obj = evil if where == "top" else {b"data": x, b"labels": [int(v) for v in y], b"x": evil}
    target = root / "cifar-10-batches-py" / "data_batch_3"
    target.write_bytes(pickle.dumps(obj, protocol=2))
    assert not marker.exists()
    with pytest.raises(DataError, match=r"data_batch_3: refused to unpickle"):
        data.read_batch(target)
    with pytest.raises(DataError, match="refused"):
        load(root, tmp_path / "cache")
    assert not marker.exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_pickle_with_object_array_refused(tmp_path, images):
    root = write_python(tmp_path, *images)
    target = root / "cifar-10-batches-py" / "data_batch_1"
    obj = {b"data": np.array([[1, 2]], dtype=object), b"labels": [1]}
    target.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError, match="data_batch_1"):
        data.read_batch(target)


# --- validation -----------------------------------------------------------------------------


def assert_nothing_cached(cache_dir: Path):
    assert not cache_dir.exists() or list(cache_dir.iterdir()) == []


def test_truncated_binary_batch(tmp_path, both):
    path = both[0] / "cifar-10-batches-bin" / "data_batch_4.bin"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"data_batch_4\.bin: 122820 bytes is not a whole number"):
        load(both[0], tmp_path / "cache")
    assert_nothing_cached(tmp_path / "cache")


def test_truncated_pickle_batch(tmp_path, both):
    path = both[1] / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="data_batch_2: not a readable CIFAR-10 pickle"):
        load(both[1], tmp_path / "cache")
    assert_nothing_cached(tmp_path / "cache")


def test_label_out_of_range(tmp_path, images):
    x, y, xt, yt = images
    y = y.copy()
    y[3 * N_BATCH + 7] = 10
    root = write_binary(tmp_path / "d", x, y, xt, yt)
    with pytest.raises(DataError, match=r"data_batch_4\.bin: label 10 outside 0\.\.9"):
        load(root, tmp_path / "cache")
    assert_nothing_cached(tmp_path / "cache")
    root = write_python(tmp_path / "p", x, y, xt, yt)
    with pytest.raises(DataError, match=r"data_batch_4: label 10 outside"):
        load(root, tmp_path / "cache")


def test_missing_batch(tmp_path, both):
    (both[0] / "cifar-10-batches-bin" / "data_batch_5.bin").unlink()
    with pytest.raises(DataError, match=r"missing batch file\(s\) data_batch_5\.bin"):
        load(both[0], tmp_path / "cache")
    assert_nothing_cached(tmp_path / "cache")


def test_empty_directory(tmp_path):
    with pytest.raises(DataError) as info:
        data.load_splits(tmp_path, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert str(tmp_path) in msg and "bnexp data download" in msg and "BNEXP_DATA_DIR" in msg
    assert "\n" not in msg
    assert_nothing_cached(tmp_path / "cache")


def test_named_folder_without_data_is_refused_not_downloaded(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded into a folder the user named")

    monkeypatch.setattr(data, "download", no_download)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    named = tmp_path / "mine" / "cifar"
    with pytest.raises(DataError) as info:
        data.load_splits(named, download_if_missing=True, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert msg.startswith(f"no CIFAR-10 in {named} (the folder does not exist)")
    assert f"`bnexp data download --data-dir {named}`" in msg and "\n" not in msg
    assert not (tmp_path / "mine").exists() and not (tmp_path / "xdg").exists()
    assert_nothing_cached(tmp_path / "cache")


def test_cli_train_with_empty_data_dir_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    args = ["train", "--data-dir", str(empty), "-o", str(out), "train.epochs=1"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == DataError.exit_code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no CIFAR-10 in {empty} (looked for")
    assert f"bnexp data download --data-dir {empty}" in lines[0]
    assert list(empty.iterdir()) == [] and not out.exists() and not (tmp_path / "xdg").exists()


def test_settings_beyond_data_and_impossible_settings(tmp_path, both):
    with pytest.raises(DataError, match="holds 200 training images"):
        load(both[0], tmp_path / "c", num_training=190, num_validation=20)
    with pytest.raises(DataError, match="holds 30 test images"):
        load(both[0], tmp_path / "c", num_test=31)
    with pytest.raises(ConfigError, match="num_train_subset"):
        load(both[0], tmp_path / "c", num_train_subset=151)
    with pytest.raises(ConfigError, match="num_validation"):
        load(both[0], tmp_path / "c", num_validation=-1)
    assert_nothing_cached(tmp_path / "c")


# --- cache ----------------------------------------------------------------------------------


def test_warm_load_equals_cold_and_skips_parsing(tmp_path, both, monkeypatch):
    cache = tmp_path / "cache"
    cold = load(both[0], cache)
    assert len(list(cache.glob("*.npz"))) == 1 and not list(cache.glob(".tmp*"))

    def no_read(path):
        raise AssertionError(f"warm load read {path}")

    monkeypatch.setattr(data, "_read_file", no_read)
    warm = load(both[0], cache)
    for f in ["X_train", "y_train", "X_val", "y_val", "X_test", "y_test", "mean_image"]:
        a, b = getattr(cold, f), getattr(warm, f)
        assert a.dtype == b.dtype and np.array_equal(a, b), f
    assert warm.source == cold.source
    with pytest.warns(UserWarning, match="holds 30 test images"):  # kept across warm loads
        data.load_splits(both[0], cache_dir=cache, **SMALL)


def test_cache_keyed_by_settings_and_rebuilt_when_a_file_changes(tmp_path, both):
    cache = tmp_path / "cache"
    load(both[0], cache)
    load(both[0], cache, num_train_subset=50)
    assert len(list(cache.glob("*.npz"))) == 2
    path = both[0] / "cifar-10-batches-bin" / "data_batch_1.bin"
    raw = bytearray(path.read_bytes())
    raw[1] ^= 0xFF  # first pixel of image 0 changes: the stale cache must not be used
    path.write_bytes(bytes(raw))
    fresh = load(both[0], cache, subtract_mean=False)
    assert fresh.X_train[0, 0] == raw[1]
    assert len(list(cache.glob("*.npz"))) == 2  # the stale file was replaced, not kept beside


def rewrite_keeping_size_and_mtime(path: Path, offset: int) -> int:
    """Flip the byte at ``offset`` and put the old atime/mtime back (os.utime); the new byte."""
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    return raw[offset]


@pytest.mark.parametrize("image", [0, 37])  # a pixel at the start and one deep in the file
def test_same_size_and_mtime_rewrite_rebuilds_cache(tmp_path, both, image):
    cache = tmp_path / "cache"
    cold = load(both[0], cache, subtract_mean=False)
    path = both[0] / "cifar-10-batches-bin" / "data_batch_1.bin"
    new = rewrite_keeping_size_and_mtime(path, image * 3073 + 1 + 100)
    assert cold.X_train[image, 100] != new
    again = load(both[0], cache, subtract_mean=False)
    assert again.X_train[image, 100] == new  # rebuilt from the file, not the stale arrays
    assert again.source["fingerprint"] != cold.source["fingerprint"]
    (cache_file,) = cache.glob("*.npz")
    mtime = cache_file.stat().st_mtime_ns
    warm = load(both[0], cache, subtract_mean=False)  # the rebuilt cache is trusted again
    assert cache_file.stat().st_mtime_ns == mtime and np.array_equal(warm.X_train, again.X_train)


def test_file_check_samples_big_files_and_sees_ctime(tmp_path):
    # A batch-sized file (30 MB in CIFAR-10) is only sampled: a change in the head or in a sampled
    # block moves the digest; a change between blocks is still seen through the ctime that the
    # write (and the os.utime that hides it) moves.
    path = tmp_path / "big.bin"
    path.write_bytes(np.random.default_rng(1).bytes(3 * 1024 * 1024))
    before = data._file_check(path)
    rewrite_keeping_size_and_mtime(path, 10)  # in the head
    head = data._file_check(path)
    assert head["sample_sha256"] != before["sample_sha256"]
    assert (head["size"], head["mtime_ns"]) == (before["size"], before["mtime_ns"])
    rewrite_keeping_size_and_mtime(path, path.stat().st_size - 1)  # in the last block
    tail = data._file_check(path)
    assert tail["sample_sha256"] != head["sample_sha256"]
    time.sleep(0.05)  # ctime has the kernel's clock tick as resolution
    rewrite_keeping_size_and_mtime(path, data.SAMPLE_HEAD + data.SAMPLE_BLOCK + 7)  # unsampled
    between = data._file_check(path)
    assert between["sample_sha256"] == tail["sample_sha256"]
    assert between["ctime_ns"] != tail["ctime_ns"] and between != tail


def test_fingerprint_is_the_identity_of_files_and_settings(tmp_path, both):
    cold = load(both[0], tmp_path / "cache")
    folder = both[0] / "cifar-10-batches-bin"
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    files = [[n, hashlib.sha256((folder / n).read_bytes()).hexdigest()] for n in names]
    blob = json.dumps({"files": files, "settings": sorted(SMALL.items())})
    assert cold.source["fingerprint"] == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert load(both[0], tmp_path / "cache").source["fingerprint"] == cold.source["fingerprint"]
    copy = tmp_path / "copy"
    shutil.copytree(both[0], copy)  # another folder, the same files: the same data
    assert load(copy, tmp_path / "cache").source["fingerprint"] == cold.source["fingerprint"]
    other = load(both[0], tmp_path / "cache", num_validation=29).source["fingerprint"]
    assert other != cold.source["fingerprint"]
    assert data.fingerprint(cold.source) == cold.source["fingerprint"]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_cache_file_respects_umask(tmp_path, both, umask):
    old = os.umask(umask)
    try:
        load(both[0], tmp_path / "cache")
    finally:
        os.umask(old)
    (cache_file,) = (tmp_path / "cache").glob("*.npz")
    assert stat.S_IMODE(cache_file.stat().st_mode) == 0o666 & ~umask


def test_stale_cache_temporary_of_a_dead_process_is_swept(tmp_path, both):
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = dead_pid()
    stale = cache / f".tmp-cifar10-{download._host()}-{dead}-0000.npz"
    stale.write_bytes(b"half")
    live = cache / f".tmp-cifar10-{download._host()}-{os.getpid()}-0000.npz"
    live.write_bytes(b"being written")
    load(both[0], cache)
    assert not stale.exists() and live.exists()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.filterwarnings("ignore:.*holds 30 test images")
def test_corrupt_cache_ignored_and_rebuilt(tmp_path, both):
    cache = tmp_path / "cache"
    cold = load(both[0], cache)
    (cache_file,) = cache.glob("*.npz")
    cache_file.write_bytes(cache_file.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="ignoring unreadable cache file"):
        again = data.load_splits(both[0], cache_dir=cache, **SMALL)
    assert np.array_equal(again.X_train, cold.X_train)
    assert np.array_equal(again.X_val, cold.X_val)
    warm = load(both[0], cache)  # the rebuilt file is good again
    assert np.array_equal(warm.X_test, cold.X_test)


def test_use_cache_false_writes_nothing(tmp_path, both):
    load(both[0], tmp_path / "cache", use_cache=False)
    assert_nothing_cached(tmp_path / "cache")


# --- data dir and CLI -----------------------------------------------------------------------


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("BNEXP_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.resolve_data_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert data.resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("BNEXP_DATA_DIR")
    assert data.resolve_data_dir(None) == tmp_path / "xdg" / "bnexp"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.resolve_data_dir(None) == tmp_path / "home" / ".cache" / "bnexp"


def test_cli_data_info(both):
    result = CliRunner().invoke(main, ["data", "info", "--data-dir", str(both[1])])
    assert result.exit_code == 0, result.output
    raw = (both[1] / "cifar-10-batches-py" / "test_batch").read_bytes()
    assert "layout:   python" in result.output
    assert f"test_batch             {N_TEST} images  sha256 {hashlib.sha256(raw).hexdigest()}" in (
        result.output
    )
    assert "training images: 200   test images: 30" in result.output


def test_cli_data_info_uses_env_and_reports_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("BNEXP_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["data", "info"])
    assert result.exit_code == DataError.exit_code
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no CIFAR-10 in ")
