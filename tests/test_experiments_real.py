"""End to end on the real CIFAR-10 copy (BNEXP_DATA_DIR): the published CS231n numbers replay
exactly, and a reduced initialization sweep shows the reference's qualitative result."""

from __future__ import annotations

from pathlib import Path

import pytest

from bnexp.config import load_config
from bnexp.sweep import run_experiment

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

#: CS231n BatchNormalization notebook (2017+), "deep network" cell, solver without batch norm:
#: train accuracy printed at epochs 0-5 after np.random.seed(231).
PUBLISHED_BASELINE_TRAIN_ACC = [0.129, 0.283, 0.316, 0.373, 0.390, 0.434]


def run(cfg, out, cifar_dir):
    return run_experiment(
        cfg, out, data_dir=cifar_dir, progress=False, plot=False, log=lambda m: None
    ).summaries


@pytest.mark.realdata
def test_cs231n_replay_reproduces_the_published_baseline(tmp_path, cifar_dir):
    cfg = load_config(CONFIGS / "cs231n_reproduction.yaml")
    assert cfg.rng == "cs231n" and cfg.values("seed") == (231,)
    summaries = run(cfg, tmp_path / "out", cifar_dir)
    baseline = next(s for s in summaries if not s["batchnorm"])
    assert baseline["train_acc_history"][:6] == PUBLISHED_BASELINE_TRAIN_ACC
    # With batch norm the same deep net learns faster (the notebook's point).
    bn = next(s for s in summaries if s["batchnorm"])
    assert bn["train_acc_history"][5] > baseline["train_acc_history"][5]


@pytest.mark.realdata
def test_reduced_sweep_shows_batch_norm_robust_to_the_init_scale(tmp_path, cifar_dir):
    cfg = load_config(
        CONFIGS / "weight_init_sweep.yaml", ["model.weight_scale=[1.0e-4, 2.0e-2, 1.0]"]
    )
    summaries = run(cfg, tmp_path / "out", cifar_dir)
    get = {(s["batchnorm"], s["weight_scale"]): s for s in summaries}
    # Baseline: stuck at chance for a tiny scale (activations vanish through 7 layers) ...
    assert get[False, 1e-4]["best_val_acc"] < 0.15
    assert get[False, 1e-4]["final_train_loss"] == pytest.approx(2.3026, abs=0.01)  # ln 10
    # ... and blowing up for a large one.
    assert get[False, 1.0]["final_train_loss"] > 1e3
    # Batch norm trains at every scale.
    for scale in (1e-4, 2e-2, 1.0):
        assert get[True, scale]["best_train_acc"] > 0.25
        assert get[True, scale]["final_train_loss"] < 5
