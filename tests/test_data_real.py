"""The real CIFAR-10 copy (BNEXP_DATA_DIR): known values, the cs231n splits, cold vs warm cache."""

from __future__ import annotations

import hashlib
import json
import warnings

import numpy as np
import pytest

from bnexp import data

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def raw(cifar_dir):
    """All training images (50000, 3072) uint8 and labels, test images and labels, in file order."""
    layout, folder = data.find_layout(cifar_dir)
    names = data.LAYOUTS[layout]
    train = [data.read_batch(folder / name) for name in names[1]]
    x = np.concatenate([t[0] for t in train])
    y = np.concatenate([t[1] for t in train])
    xt, yt = data.read_batch(folder / names[2])
    return x, y, xt, yt


@pytest.fixture(scope="module")
def cold_warm(cifar_dir, tmp_path_factory):
    """The default splits loaded cold (fresh cache) and then warm (from that cache)."""
    cache = tmp_path_factory.mktemp("cache")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the offline copy's 1,000-image test batch
        cold = data.load_splits(cifar_dir, cache_dir=cache)
        warm = data.load_splits(cifar_dir, cache_dir=cache)
    return cold, warm


def test_known_images_and_labels(raw):
    x, y, _, yt = raw
    assert x.shape == (50_000, 3072) and y.tolist()[:5] == [6, 9, 9, 4, 1]
    assert yt.tolist()[:4] == [3, 8, 8, 0]
    assert x[0, :10].tolist() == [59, 43, 50, 68, 98, 119, 139, 145, 149, 149]  # red, row 0
    assert np.bincount(y).tolist() == [5000] * 10
    means = x.reshape(-1, 3, 1024).mean(axis=(0, 2))
    np.testing.assert_allclose(means, [125.307, 122.950, 113.865], atol=0.01)


def test_pixel_checksums_match_readme(raw):
    x, _, xt, _ = raw
    want = ["a50e8b48728e1667", "0b825e5592c3b72e", "c6ee1dd4601a69ec", "1f6b6c799cff375a"]
    want.append("58e3bbf713e28357")
    for i, prefix in enumerate(want):
        assert hashlib.sha256(x[i * 10_000 : (i + 1) * 10_000].tobytes()).hexdigest()[:16] == prefix
    assert hashlib.sha256(xt[:1000].tobytes()).hexdigest()[:16] == "f167149948fc8fe0"


def test_default_splits(cold_warm, raw):
    s, _ = cold_warm
    x, y, xt, yt = raw
    assert s.X_train.shape == (1000, 3072) and s.X_val.shape == (1000, 3072)
    assert s.X_test.shape == (1000, 3072) and s.mean_image.shape == (3072,)
    assert s.y_train.shape == s.y_val.shape == s.y_test.shape == (1000,)
    assert all(a.dtype == np.float64 for a in (s.X_train, s.X_val, s.X_test, s.mean_image))
    # Independent path for the mean: exact int64 sum of the 49,000 images, one division.
    mean = x[:49_000].sum(axis=0, dtype=np.int64) / 49_000
    assert np.array_equal(s.mean_image, mean)
    assert np.array_equal(s.X_val, x[49_000:].astype(np.float64) - mean)  # images 49,000..49,999
    assert np.array_equal(s.y_val, y[49_000:])
    assert np.array_equal(s.X_test, xt[:1000] - mean) and np.array_equal(s.y_test, yt[:1000])
    assert np.array_equal(s.X_train, x[:1000] - mean) and np.array_equal(s.y_train, y[:1000])
    # The subset's per-feature mean is its raw mean minus the 49,000-image mean.
    np.testing.assert_allclose(s.X_train.mean(axis=0), x[:1000].mean(axis=0) - mean, atol=1e-9)
    assert abs(s.X_train.mean()) < 3  # near zero but not exactly: 1,000 of the 49,000 images


def test_warm_equals_cold_and_source(cold_warm, cifar_dir):
    cold, warm = cold_warm
    for key in ["X_train", "y_train", "X_val", "y_val", "X_test", "y_test", "mean_image"]:
        assert np.array_equal(getattr(cold, key), getattr(warm, key)), key
    assert warm.source == cold.source
    files = cold.source["files"]
    assert [f["images"] for f in files] == [10_000] * 5 + [1_000]
    folder = cifar_dir / cold.source["folder"]
    assert (
        files[-1]["sha256"] == hashlib.sha256((folder / files[-1]["name"]).read_bytes()).hexdigest()
    )


def test_fingerprint_of_the_real_files(cold_warm, cifar_dir):
    cold, warm = cold_warm
    folder = cifar_dir / cold.source["folder"]
    files = [
        [f["name"], hashlib.sha256((folder / f["name"]).read_bytes()).hexdigest()]
        for f in cold.source["files"]
    ]
    settings = {"num_training": 49000, "num_validation": 1000, "num_test": 1000}
    settings["num_train_subset"] = 1000
    blob = json.dumps({"files": files, "settings": sorted(settings.items())})
    expected = hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert cold.source["fingerprint"] == warm.source["fingerprint"] == expected
