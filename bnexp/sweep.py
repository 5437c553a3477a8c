"""Run an experiment: expand its runs, plan their random numbers, train them in lockstep groups,
record each finished run, and resume where a previous invocation stopped.

Data flows one way: config -> runs -> (data, random plans) -> train -> records -> plots.

Groups and processes
--------------------
Runs that share an architecture and every solver setting except weight scale, learning rate and
seed form one *lockstep group* (`bnexp.train.train_group`): the default sweep has two groups of 20
networks, batch norm and baseline. ``--jobs N`` hands whole groups to N worker processes with one
BLAS thread each. A group is never split across processes, so a network's numbers never depend on
``--jobs``; the tests check that results.csv is identical for ``--jobs 1`` and ``--jobs 2``.

Resume and interruption
-----------------------
A run's id is a hash of its resolved config (`bnexp.config.run_id`); a run whose summary.json
exists is skipped. Records of a group are written as soon as the group finishes, and results.csv is
rewritten after every group, so Ctrl-C keeps every finished run and re-running the same command
trains only the rest.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bnexp import records
from bnexp.config import (
    ExperimentConfig,
    RunConfig,
    config_to_yaml,
    expand_runs,
    run_config_dict,
    run_id,
)
from bnexp.errors import ConfigError
from bnexp.executor import execute
from bnexp.model import NetSpec
from bnexp.plan import RunPlan, cs231n_plans, iterations_per_epoch, numpy_plan
from bnexp.train import Member, RunResult, SolverSettings, TrainData, train_group

#: CIFAR-10 images flattened channel-major, and its classes.
INPUT_DIM = 3 * 32 * 32
NUM_CLASSES = 10


@dataclass(frozen=True)
class ExperimentResult:
    """What `run_experiment` did: the summaries of all finished runs and what it trained now."""

    out: Path
    summaries: list[dict]
    trained: int
    skipped: int
    plots: list[Path]


# --- runs -> specs, settings, plans ---------------------------------------------------------


def net_spec(run: RunConfig) -> NetSpec:
    """The architecture of a run."""
    return NetSpec(
        input_dim=INPUT_DIM,
        hidden_dims=tuple(run.hidden_dims),
        num_classes=NUM_CLASSES,
        batchnorm=run.batchnorm,
    )


def solver_settings(run: RunConfig) -> SolverSettings:
    """Solver settings of a run (the learning rate travels with the group member).

    rng=cs231n replays the reference exactly, which rounds its initial weights to the model dtype
    but computes in float64 (its data is float64 and NumPy upcasts); rng=numpy computes in the
    model dtype itself (float32 by default: the fast path).
    """
    replay = run.rng == "cs231n"
    return SolverSettings(
        epochs=run.epochs,
        batch_size=run.batch_size,
        update_rule=run.update_rule,
        learning_rate=run.learning_rate,
        lr_decay=run.lr_decay,
        bn_eval=run.bn_eval,
        bn_momentum=run.bn_momentum,
        bn_eps=run.bn_eps,
        reg=run.reg,
        dtype=run.dtype,
        init_dtype=run.dtype,
        compute_dtype="float64" if replay else run.dtype,
        loss_window=run.loss_window,
    )


def num_iterations(run: RunConfig) -> int:
    """Solver iterations of a run."""
    return run.epochs * iterations_per_epoch(run.data.num_train, run.batch_size)


def _replay_key(run: RunConfig) -> tuple:
    """Runs the reference notebook builds together: equal in everything but the BN flag."""
    return (run.seed, run.learning_rate, run.weight_scale)


def make_plans(runs: Sequence[RunConfig]) -> list[RunPlan]:
    """The random plan of every run, in run order.

    rng=numpy: each run's plan depends only on its seed and layer shapes (computed once per
    distinct key, so BN and baseline runs share one plan object). rng=cs231n: one legacy
    generator replays the notebook over the whole run list, consecutive runs that differ only in
    the BN flag forming one notebook cell (weights of both, then minibatches of both).
    """
    if not runs:
        return []
    if runs[0].rng == "cs231n":
        if any(run.sampling != "replacement" for run in runs):
            # load_config rejects this combination; runs built by hand must not slip through.
            raise ValueError("make_plans: rng=cs231n replays sampling with replacement only")
        groups: list[list[RunConfig]] = []
        for run in runs:
            if groups and _replay_key(groups[-1][0]) == _replay_key(run):
                groups[-1].append(run)
            else:
                groups.append([run])
        plan_groups = cs231n_plans(
            runs[0].seed,
            [
                [(net_spec(r), num_iterations(r), r.batch_size, r.data.num_train) for r in g]
                for g in groups
            ],
        )
        return [plan for group in plan_groups for plan in group]
    cache: dict[tuple, RunPlan] = {}
    plans = []
    for run in runs:
        key = (run.seed, run.hidden_dims, num_iterations(run), run.batch_size, run.sampling)
        if key not in cache:
            cache[key] = numpy_plan(
                run.seed,
                net_spec(run),
                num_iterations(run),
                run.batch_size,
                run.data.num_train,
                run.sampling,
            )
        plans.append(cache[key])
    return plans


def lockstep_groups(runs: Sequence[RunConfig]) -> list[list[int]]:
    """Indices into `runs` grouped for lockstep training, groups and members in run order."""
    groups: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        # The learning rate is per member; everything else in the settings must match.
        key = (net_spec(run), replace(solver_settings(run), learning_rate=0.0), run.data)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


# --- records of one run ---------------------------------------------------------------------


def _finite_or_none(value: float | None) -> float | None:
    """A float for JSON, None when missing or not finite."""
    if value is None or not np.isfinite(value):
        return None
    return float(value)


def run_summary(run: RunConfig, rid: str, result: RunResult, data: TrainData) -> dict:
    """The summary.json of a finished run (field names documented in `bnexp.records`)."""
    per_epoch = iterations_per_epoch(run.data.num_train, run.batch_size)
    return {
        "run_id": rid,
        "index": run.index,
        "batchnorm": run.batchnorm,
        "weight_scale": float(run.weight_scale),
        "learning_rate": float(run.learning_rate),
        "seed": run.seed,
        "rng": run.rng,
        "hidden_dims": list(run.hidden_dims),
        "dtype": run.dtype,
        "num_train": int(data.X_train.shape[0]),
        "num_val": int(data.X_val.shape[0]),
        "num_test": None if data.X_test is None else int(data.X_test.shape[0]),
        "epochs": run.epochs,
        "batch_size": run.batch_size,
        "iterations_per_epoch": per_epoch,
        "update_rule": run.update_rule,
        "sampling": run.sampling,
        "bn_eval": run.bn_eval,
        "train_acc_history": [_finite_or_none(a) for a in result.train_acc_history],
        "val_acc_history": [_finite_or_none(a) for a in result.val_acc_history],
        "check_iterations": [int(t) + 1 for t in result.check_iterations],
        "test_acc": _finite_or_none(result.test_acc),
        "loss_history": [_finite_or_none(v) for v in result.loss_history],
        "best_train_acc": _finite_or_none(result.best_train_acc),
        "best_val_acc": _finite_or_none(result.best_val_acc),
        "final_train_loss": _finite_or_none(result.final_train_loss),
        "diverged": result.diverged,
        "diverged_iteration": result.diverged_iteration,
        "status": "diverged" if result.diverged else "ok",
        "seconds": round(float(result.seconds), 4),
    }


def run_metrics(summary: dict) -> list[dict]:
    """metrics.jsonl lines: one per accuracy check (epoch 0 is the check after iteration 1)."""
    per_epoch = summary["iterations_per_epoch"]
    return [
        {"epoch": iteration // per_epoch, "iteration": iteration, "train_acc": tr, "val_acc": va}
        for iteration, tr, va in zip(
            summary["check_iterations"],
            summary["train_acc_history"],
            summary["val_acc_history"],
            strict=True,
        )
    ]


# --- execution ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GroupJob:
    """One lockstep group, ready to train anywhere (picklable for worker processes)."""

    run_indices: tuple[int, ...]
    spec: NetSpec
    members: tuple[Member, ...]
    settings: SolverSettings

    @property
    def work(self) -> int:
        """Network-iterations of the group (the progress bar's unit)."""
        return len(self.members) * self.members[0].plan.batch_indices.shape[0]

    @property
    def iterations(self) -> int:
        """Solver iterations of every network of the group."""
        return self.members[0].plan.batch_indices.shape[0]

    def run(self, data: TrainData, on_progress=None) -> list[RunResult]:
        """Train the group in this process; on_progress(iterations done) after each iteration."""
        return train_group(self.spec, list(self.members), data, self.settings, on_progress)


def load_train_data(cfg: ExperimentConfig, data_dir: str | Path | None, log: Callable[[str], None]):
    """The experiment's splits as TrainData, plus the data source dict for the manifest."""
    from bnexp.data import load_splits, resolve_data_dir

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_splits(
            resolve_data_dir(data_dir),
            num_training=cfg.data.num_training,
            num_validation=cfg.data.num_validation,
            num_test=cfg.data.num_test,
            num_train_subset=cfg.data.num_train,
            subtract_mean=cfg.data.subtract_mean,
            download_if_missing=True,
            progress=True,
        )
    for warning in caught:
        log(f"note: {warning.message}")
    data = TrainData(
        X_train=splits.X_train,
        y_train=splits.y_train,
        X_val=splits.X_val,
        y_val=splits.y_val,
        X_test=splits.X_test,
        y_test=splits.y_test,
    )
    return data, splits.source


def run_experiment(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    data_dir: str | Path | None = None,
    jobs: int = 1,
    force: bool = False,
    progress: bool = True,
    plot: bool = True,
    log: Callable[[str], None] | None = None,
    data: TrainData | None = None,
) -> ExperimentResult:
    """Train every run of `cfg` not finished in `out`, record it, and draw the figures.

    Parameters
    ----------
    cfg : the validated experiment.
    out : the output folder (created; refused if it holds a different config, unless `force`).
    data_dir : CIFAR-10 folder (None: BNEXP_DATA_DIR, else the user cache; downloaded if absent).
    jobs : worker processes; whole lockstep groups are distributed, results do not depend on it.
    progress : show a progress bar on stderr (only when stderr is a terminal).
    plot : draw OUT/plots at the end.
    log : where one-line notes go (default: stderr).
    data : already loaded splits (tests); skips loading from `data_dir`.

    Raises
    ------
    ConfigError, DataError, OutputError : one line each, before anything is trained (and,
        for config and data errors, before anything is written into `out`).
    KeyboardInterrupt : after every finished group has been recorded (manifest status
        "interrupted"; any other exception leaves status "failed").
    """
    if log is None:

        def log(message: str) -> None:
            print(message, file=sys.stderr)

    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    runs = expand_runs(cfg)
    ids = [run_id(run, cfg) for run in runs]
    config_yaml = config_to_yaml(cfg)
    # Refuse a wrong OUT before reading (or downloading) the data, but write nothing into it
    # until the data has loaded: a data error must not leave an OUT/config.yaml behind that
    # would then refuse the next, different config as if it held results.
    records.check_output_dir(out, config_yaml, force=force)
    source = {"provided": "in-memory arrays"}
    if data is None:
        data, source = load_train_data(cfg, data_dir, log)
    out = records.prepare_output_dir(out, config_yaml, force=force)

    seeds = sorted(set(cfg.seed))
    manifest = records.collect_manifest(
        out=out,
        seed=seeds[0] if len(seeds) == 1 else seeds,
        rng=cfg.rng,
        data_source=source,
        extra={"jobs": jobs, "status": "running", "runs": len(runs)},
    )
    # A resumed experiment keeps the provenance of the invocations that trained its earlier runs.
    earlier = records.read_manifest(out)
    if earlier is not None:
        manifest["previous"] = [*earlier.pop("previous", []), earlier]
    records.write_manifest(out, manifest)

    todo = [i for i, rid in enumerate(ids) if not records.is_finished(out, rid)]
    skipped = len(runs) - len(todo)
    if skipped:
        log(f"resuming: {skipped} of {len(runs)} runs already finished in {out}")
    plans = make_plans(runs) if todo else []
    todo_runs = [runs[i] for i in todo]
    jobs_list = []
    for group in lockstep_groups(todo_runs):
        indices = tuple(todo[g] for g in group)
        jobs_list.append(
            _GroupJob(
                run_indices=indices,
                spec=net_spec(runs[indices[0]]),
                members=tuple(
                    Member(runs[i].weight_scale, runs[i].learning_rate, plans[i]) for i in indices
                ),
                settings=solver_settings(runs[indices[0]]),
            )
        )

    status = "failed"
    trained = 0
    start = time.perf_counter()
    try:
        for run_indices, results in execute(jobs_list, data, jobs, progress):
            for i, result in zip(run_indices, results, strict=True):
                summary = run_summary(runs[i], ids[i], result, data)
                records.write_run(
                    out, ids[i], run_config_dict(runs[i]), summary, run_metrics(summary)
                )
                trained += 1
            records.write_results_csv(out, records.read_summaries(out, ids))
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        summaries = records.read_summaries(out, ids)
        records.write_results_csv(out, summaries)
        manifest.update(
            status=status,
            end_time=records.now_iso(),
            runs_trained=trained,
            train_seconds=round(time.perf_counter() - start, 3),
        )
        records.write_manifest(out, manifest)

    plots: list[Path] = []
    if plot and summaries:
        from bnexp.plots import plot_results

        plots = plot_results(out)
    return ExperimentResult(
        out=out, summaries=summaries, trained=trained, skipped=skipped, plots=plots
    )
