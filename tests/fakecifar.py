"""Small generated CIFAR-10 folders in the official layouts, for tests that must not need the
real 150 MB copy."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

N_BATCH, N_TEST = 40, 30  # images per generated training batch (x5) and in the test batch


def make_images(rng: np.random.Generator, n_train: int = 5 * N_BATCH, n_test: int = N_TEST):
    """Random uint8 images (N, 3072) channel-major and labels 0..9 for train and test."""
    x = rng.integers(0, 256, size=(n_train, 3072), dtype=np.uint8)
    y = rng.integers(0, 10, size=n_train)
    xt = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    yt = rng.integers(0, 10, size=n_test)
    return x, y, xt, yt


def write_binary(root: Path, x, y, xt, yt, n_batch: int = N_BATCH) -> Path:
    """Write the official binary layout (label byte + 3,072 pixel bytes per record)."""
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)

    def records(images, labels):
        return np.column_stack([labels.astype(np.uint8), images]).tobytes()

    for i in range(5):
        rows = slice(i * n_batch, (i + 1) * n_batch)
        (folder / f"data_batch_{i + 1}.bin").write_bytes(records(x[rows], y[rows]))
    (folder / "test_batch.bin").write_bytes(records(xt, yt))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship"]
    names.append("truck")
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n")
    return root


def write_python(root: Path, x, y, xt, yt, n_batch=N_BATCH, bytes_keys=True, protocol=2) -> Path:
    """Write the official python layout: pickled dicts with data (N, 3072) uint8 and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name, images, labels):
        d = {"batch_label": "generated", "data": images, "labels": [int(v) for v in labels]}
        if bytes_keys:  # what Python 3 sees when reading the official Python 2 pickles
            d = {k.encode(): v for k, v in d.items()}
        (folder / name).write_bytes(pickle.dumps(d, protocol=protocol))

    for i in range(5):
        rows = slice(i * n_batch, (i + 1) * n_batch)
        dump(f"data_batch_{i + 1}", x[rows].copy(), y[rows])
    dump("test_batch", xt, yt)
    return root


def make_learnable_images(rng: np.random.Generator, n_train: int, n_test: int):
    """Like `make_images`, but each class brightens its own block of pixels, so a network can
    learn the labels (accuracy well above chance) within a few epochs."""
    x, y, xt, yt = make_images(rng, n_train, n_test)
    block = 3072 // 10
    for images, labels in ((x, y), (xt, yt)):
        low = images // 2  # room to brighten without wrapping around
        for c in range(10):
            rows = labels == c
            low[np.ix_(rows, np.arange(c * block, (c + 1) * block))] += 120
        images[...] = low
    return x, y, xt, yt


def learnable_splits(n_train: int = 100, n_val: int = 60, n_test: int = 40, seed: int = 0):
    """bnexp.data.Splits of learnable generated features (no images): the class shifts the mean
    of its own block of 300 features. X: (N, 3072) float64, y: (N,) int."""
    from bnexp.data import Splits

    rng = np.random.default_rng(seed)

    def split(n):
        y = rng.integers(0, 10, n)
        X = rng.normal(size=(n, 3072))
        for c in range(10):
            X[y == c, c * 300 : (c + 1) * 300] += 1.0
        return X, y

    (Xtr, ytr), (Xv, yv), (Xt, yt) = split(n_train), split(n_val), split(n_test)
    return Splits(Xtr, ytr, Xv, yv, Xt, yt, mean_image=np.zeros(3072), source={})
