"""Run an experiment: expand its runs, plan their random numbers, train them in lockstep groups,
record each finished run, and resume where a previous invocation stopped.

Data flows one way: config -> runs -> (data, random plans) -> train -> records -> plots.

Groups and processes
--------------------
Runs that share an architecture (shapes and normalization) and every solver setting except the
per-network numbers (`PER_NETWORK_KEYS`: weight scale, learning rate, seed, dropout keep
probability, noise strength) form one *lockstep group* (`bnexp.train.train_group`): the default
sweep has two groups of 20 networks, batch norm and baseline. ``--jobs N`` hands whole groups to N
worker processes with one BLAS thread each. A group is never split across processes, so a network's
numbers never depend on ``--jobs``; the tests check that results.csv is identical for ``--jobs 1``
and ``--jobs 2``.

Resume and interruption
-----------------------
A run's id is a hash of its resolved config (`bnexp.config.run_id`); a run whose summary.json
exists is skipped. Records of a group are written as soon as the group finishes, and results.csv is
rewritten after every group, so Ctrl-C keeps every finished run and re-running the same command
trains only the rest.

A group in training is checkpointed at epoch ends (`bnexp.checkpoint`: at most every
``BNEXP_CHECKPOINT_SECONDS``, default 20 s) into OUT/checkpoints/, so an interrupted group
resumes from its last checkpoint to the same bits instead of from iteration 0; a group's
checkpoint is removed once its runs are recorded, and every checkpoint with ``--force``. Not with a
Dask scheduler: its workers may not see OUT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnexp import checkpoint, records
from bnexp.config import (
    INPUT_DIM,
    NUM_CLASSES,
    ExperimentConfig,
    Run,
    config_to_yaml,
    expand_runs,
    run_config_dict,
    run_ids,
)
from bnexp.errors import ConfigError, DataError
from bnexp.executor import execute, signals_held
from bnexp.model import NetSpec
from bnexp.plan import RunPlan, cs231n_plans, iterations_per_epoch, numpy_plan
from bnexp.probes import ProbeSettings
from bnexp.train import Member, RunResult, SolverSettings, train_group

#: Settings that differ between the networks of one lockstep group (each member carries its own);
#: any other difference (shapes, batch size, layer kinds, solver) starts a separate group.
PER_NETWORK_KEYS = (
    "seed",
    "model.weight_scale",
    "train.learning_rate",
    "model.dropout_keep",
    "model.bn_noise",
)


@dataclass(frozen=True)
class ExperimentResult:
    """What `run_experiment` did: the summaries of all finished runs and what it trained now."""

    out: Path
    summaries: list[dict]
    trained: int
    skipped: int
    plots: list[Path]


# --- runs -> specs, settings, plans ---------------------------------------------------------


def net_spec(cfg: ExperimentConfig) -> NetSpec:
    """The architecture of a run (`cfg` resolved at its grid point)."""
    return NetSpec(
        input_dim=INPUT_DIM,
        hidden_dims=tuple(cfg.model.hidden_dims),
        num_classes=NUM_CLASSES,
        normalization=cfg.model.kind,
    )


def solver_settings(cfg: ExperimentConfig) -> SolverSettings:
    """Solver settings of a run (`cfg` resolved at its grid point).

    rng=cs231n replays the reference exactly, which rounds its initial weights to the model dtype
    but computes in float64 (its data is float64 and NumPy upcasts); rng=numpy computes in the
    model dtype itself (float32 by default: the fast path).
    """
    t = cfg.train
    return SolverSettings(
        epochs=t.epochs,
        batch_size=t.batch_size,
        update_rule=t.update_rule,
        learning_rate=t.learning_rate,
        lr_decay=t.lr_decay,
        bn_eval=t.bn_eval,
        bn_eval_all=t.bn_eval_all,
        bn_momentum=t.bn_momentum,
        bn_eps=t.bn_eps,
        reg=cfg.model.reg,
        dtype=cfg.model.dtype,
        init_dtype=cfg.model.dtype,
        compute_dtype="float64" if cfg.rng == "cs231n" else cfg.model.dtype,
        loss_window=t.loss_window,
    )


def probe_settings(cfg: ExperimentConfig) -> ProbeSettings | None:
    """The probes of a run (`cfg` resolved at its grid point), None when probing is off."""
    p = cfg.probes
    if not p.every:
        return None
    return ProbeSettings(every=p.every, batch_size=p.batch_size, ics=p.ics, landscape=p.landscape)


def _num_iterations(cfg: ExperimentConfig) -> int:
    return cfg.train.epochs * iterations_per_epoch(cfg.data.num_train, cfg.train.batch_size)


def _replay_key(run: Run) -> tuple:
    """Runs the reference notebook builds together: equal in everything but the BN flag."""
    return tuple((key, value) for key, value in run.point if key != "model.batchnorm")


def _cs231n_plans(runs: Sequence[Run]) -> list[RunPlan]:
    """One legacy generator replays the notebook over the whole run list; consecutive runs that
    differ only in the BN flag form one notebook cell (weights of both, then minibatches)."""
    groups: list[list[Run]] = []
    for run in runs:
        if groups and _replay_key(groups[-1][0]) == _replay_key(run):
            groups[-1].append(run)
        else:
            groups.append([run])
    cells = [
        [
            (net_spec(r.cfg), _num_iterations(r.cfg), r.cfg.train.batch_size, r.cfg.data.num_train)
            for r in group
        ]
        for group in groups
    ]
    return [plan for cell in cs231n_plans(runs[0].seed, cells) for plan in cell]


def make_plans(runs: Sequence[Run]) -> list[RunPlan]:
    """The random plan of every run, in run order.

    rng=numpy: each run's plan depends only on its seed, layer shapes and sampling (computed once
    per distinct key, so BN and baseline runs share one plan object). rng=cs231n: see
    `_cs231n_plans` (the config guarantees sampling with replacement).
    """
    if not runs:
        return []
    if runs[0].cfg.rng == "cs231n":
        return _cs231n_plans(runs)
    cache: dict[tuple, RunPlan] = {}
    plans = []
    for run in runs:
        c = run.cfg
        iters = _num_iterations(c)
        key = (c.seed, c.model.hidden_dims, iters, c.train.batch_size, c.train.sampling)
        if key not in cache:
            cache[key] = numpy_plan(
                c.seed, net_spec(c), iters, c.train.batch_size, c.data.num_train, c.train.sampling
            )
        plans.append(cache[key])
    return plans


def _group_key(run: Run) -> tuple:
    """What the networks of one lockstep group share: the run's point without the per-network
    keys (every other setting is fixed for the whole experiment)."""
    return tuple((key, value) for key, value in run.point if key not in PER_NETWORK_KEYS)


def lockstep_groups(runs: Sequence[Run]) -> list[list[int]]:
    """Indices into `runs` grouped for lockstep training, groups and members in run order."""
    groups: dict[tuple, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(_group_key(run), []).append(i)
    return list(groups.values())


# --- records of one run ---------------------------------------------------------------------


def _finite_or_none(value: float | None) -> float | None:
    """A float for JSON, None when missing or not finite."""
    if value is None or not np.isfinite(value):
        return None
    return float(value)


def run_summary(run: Run, rid: str, result: RunResult, data) -> dict:
    """A finished run's summary.json: the fields of `bnexp.records.SUMMARY_FIELDS`, in order."""
    c = run.cfg
    per_epoch = iterations_per_epoch(c.data.num_train, c.train.batch_size)
    return {
        "run_id": rid,
        "index": run.index,
        "batchnorm": c.model.batchnorm,
        "weight_scale": float(c.model.weight_scale),
        "learning_rate": float(c.train.learning_rate),
        "seed": c.seed,
        "rng": c.rng,
        "hidden_dims": list(c.model.hidden_dims),
        "dtype": c.model.dtype,
        "num_train": int(data.X_train.shape[0]),
        "num_val": int(data.X_val.shape[0]),
        "num_test": None if data.X_test is None else int(data.X_test.shape[0]),
        "epochs": c.train.epochs,
        "batch_size": c.train.batch_size,
        "iterations_per_epoch": per_epoch,
        "update_rule": c.train.update_rule,
        "sampling": c.train.sampling,
        "bn_eval": c.train.bn_eval,
        "axes": {key: records.to_jsonable(value) for key, value in run.point},
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
        # With train.bn_eval_all only (`bnexp.records.EVERY_MODE_FIELDS`).
        **{key: _finite_or_none(value) for key, value in result.every_mode.items()},
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
    probe_settings: ProbeSettings | None = None
    checkpoint: checkpoint.Checkpoint | None = None

    @property
    def iterations(self) -> int:
        """Solver iterations of every network of the group."""
        return self.members[0].plan.batch_indices.shape[0]

    @property
    def work(self) -> int:
        """Network-iterations of the group (the progress bar's unit)."""
        return len(self.members) * self.iterations

    def run(self, data, on_progress=None) -> list[RunResult]:
        """Train the group in this process; on_progress(iterations done) after each iteration."""
        return train_group(
            self.spec,
            list(self.members),
            data,
            self.settings,
            on_progress,
            self.probe_settings,
            self.checkpoint,
        )


def _member(cfg: ExperimentConfig, plan: RunPlan) -> Member:
    """A run as a member of its lockstep group: its per-network numbers and its plan."""
    m = cfg.model
    return Member(m.weight_scale, cfg.train.learning_rate, plan, m.dropout_keep, m.bn_noise)


def _group_jobs(runs: Sequence[Run], todo: Sequence[int]) -> list[_GroupJob]:
    """The lockstep groups holding an unfinished run of `todo` (indices into `runs`), with plans.

    A group is always trained whole, finished members included: the wide first-layer GEMM may
    round differently for another number of networks, so a group cut short by an interruption
    must be retrained as the uninterrupted run trained it. Only the unfinished runs are recorded.
    """
    plans = make_plans(runs)  # the whole list: a cs231n replay depends on every run before
    unfinished = set(todo)
    jobs = []
    for indices in lockstep_groups(runs):
        if unfinished.isdisjoint(indices):
            continue
        first = runs[indices[0]].cfg
        members = tuple(_member(runs[i].cfg, plans[i]) for i in indices)
        spec, settings = net_spec(first), solver_settings(first)
        jobs.append(_GroupJob(tuple(indices), spec, members, settings, probe_settings(first)))
    return jobs


def _checkpointed(jobs: list[_GroupJob], exp, data, source: dict, seconds) -> list[_GroupJob]:
    """The jobs with their checkpoint in OUT/checkpoints (none when `seconds` is None); removes
    the checkpoints of groups that are not among them (finished, or of another config)."""
    if seconds is None:
        checkpoint.remove_others(exp.out, [])
        return jobs
    data_id = checkpoint.data_fingerprint(data, source)
    with_checkpoints = []
    for job in jobs:
        ids = [exp.ids[i] for i in job.run_indices]
        path = checkpoint.folder(exp.out) / f"{checkpoint.group_id(ids)}.npz"
        key = checkpoint.group_key(ids, exp.config_yaml, data_id)
        point = checkpoint.Checkpoint(path, key, seconds)
        with_checkpoints.append(dataclasses.replace(job, checkpoint=point))
    checkpoint.remove_others(exp.out, [job.checkpoint.path for job in with_checkpoints])
    return with_checkpoints


def feature_dtype(runs: Sequence[Run]) -> str:
    """The dtype the runs compute in when they all share one, else float64: the features are
    loaded in it once (a float32 sweep holds no float64 copy) and shared by the workers."""
    dtypes = {solver_settings(run.cfg).compute_np_dtype.name for run in runs}
    return dtypes.pop() if len(dtypes) == 1 else "float64"


def load_train_data(
    cfg: ExperimentConfig,
    data_dir: str | Path | None,
    log: Callable[[str], None],
    dtype: str = "float64",
):
    """The experiment's splits (`bnexp.data.Splits`) as `dtype` features, plus the data source
    dict for the manifest."""
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
            dtype=dtype,
        )
    for warning in caught:
        log(f"note: {warning.message}")
    return splits, splits.source


@dataclass
class _Experiment:
    """What one invocation works on: the runs, their ids, OUT and the unfinished runs."""

    cfg: ExperimentConfig
    runs: list[Run]
    ids: list[str]
    out: Path
    config_yaml: str
    todo: list[int]


def _survey(cfg: ExperimentConfig, out: str | Path, force: bool) -> _Experiment:
    """Expand the runs and find the unfinished ones; refuse a wrong OUT. Reads no data and writes
    nothing (so an invocation with nothing to train works offline and changes no file)."""
    runs = expand_runs(cfg)
    ids = run_ids(cfg, runs)
    config_yaml = config_to_yaml(cfg)
    out = records.check_output_dir(out, config_yaml, force=force)
    todo = [i for i, rid in enumerate(ids) if not records.is_finished(out, rid)]
    return _Experiment(cfg, runs, ids, Path(out), config_yaml, todo)


def _new_manifest(exp: _Experiment, jobs: int, source: dict, earlier: dict | None) -> dict:
    """The manifest of this invocation (status 'running'), keeping earlier invocations'
    provenance under `previous`; not written yet."""
    seeds = sorted(set(exp.cfg.values("seed")))
    manifest = records.collect_manifest(
        out=exp.out,
        seed=seeds[0] if len(seeds) == 1 else seeds,
        rng=exp.cfg.rng,
        data_source=source,
        extra={"jobs": jobs, "status": "running", "runs": len(exp.runs)},
    )
    if earlier is not None:
        manifest["previous"] = [*earlier.pop("previous", []), earlier]
    return manifest


def _same_data(exp: _Experiment, source: dict, earlier: dict | None, force: bool) -> _Experiment:
    """Refuse to add runs trained on other data to OUT's finished ones (DataError, exit 3);
    with `force`, start over: every run of the config is trained again.

    The data's identity is `bnexp.data.fingerprint` of the files the splits came from and the
    split settings, as the manifest of the invocation that trained the finished runs records.
    """
    from bnexp.data import fingerprint

    old_source = (earlier or {}).get("data") or {}
    new = source.get("fingerprint")
    if new is None or len(exp.todo) == len(exp.runs) or "files" not in old_source:
        return exp  # in-memory data, nothing finished yet, or no record of the data
    old = old_source.get("fingerprint") or fingerprint(old_source)
    if old == new:
        return exp
    if not force:
        raise DataError(
            f"{exp.out} holds runs trained on other data (fingerprint {old}, this data {new}); "
            "point --data-dir at the same CIFAR-10 files, use a new -o folder, or --force to "
            "start over"
        )
    return dataclasses.replace(exp, todo=list(range(len(exp.runs))))


def _train_and_record(exp: _Experiment, data, options: dict, manifest: dict, source: dict) -> int:
    """Train the unfinished runs group by group, recording each group as it finishes; the
    manifest's final status says whether all finished, Ctrl-C stopped it, or it failed. With a
    Dask `scheduler`, the manifest also names the worker that trained each group.

    options: jobs, progress, scheduler and checkpoint_seconds (None: no checkpoints) as given
    to `run_experiment`; source: the data's origin (its fingerprint ties checkpoints to it).
    """
    status, trained, start = "failed", 0, time.perf_counter()
    workers: list[dict] = []
    scheduler = options["scheduler"]
    try:
        # Inside the try: a signal right after 'running' is written still ends as 'interrupted'.
        records.write_manifest(exp.out, manifest)
        group_jobs = _group_jobs(exp.runs, exp.todo)
        seconds = options["checkpoint_seconds"] if scheduler is None else None
        group_jobs = _checkpointed(group_jobs, exp, data, source, seconds)
        jobs, progress = options["jobs"], options["progress"]
        ran = execute(group_jobs, data, jobs, progress, scheduler=scheduler, workers=workers)
        # closing: the workers are stopped before the checkpoint temporaries are cleaned below.
        with contextlib.closing(ran):
            for run_indices, results in ran:
                trained += _record_group(exp, data, run_indices, results)
                job = next(j for j in group_jobs if j.run_indices == tuple(run_indices))
                if job.checkpoint is not None:
                    job.checkpoint.remove()
        status = "complete"
    except KeyboardInterrupt:
        # A signal after the last record (while the workers stop) leaves nothing to resume.
        finished = all(records.is_finished(exp.out, rid) for rid in exp.ids)
        status = "complete" if finished else "interrupted"
        raise
    finally:
        with signals_held():  # a second signal must not cut the closing writes short
            _close(exp, manifest, status, trained, time.perf_counter() - start, workers, scheduler)
    return trained


def _close(exp: _Experiment, manifest, status, trained, seconds, workers, scheduler) -> None:
    """After training (finished, interrupted or failed): remove checkpoint temporaries, rewrite
    results.csv, and write the manifest's final status."""
    # A worker stopped while writing a checkpoint leaves its temporary behind.
    records.remove_temporaries(checkpoint.folder(exp.out))
    checkpoint.remove_folder_if_empty(exp.out)
    records.write_results_csv(exp.out, records.read_summaries(exp.out, exp.ids))
    manifest.update(
        status=status,
        end_time=records.now_iso(),
        runs_trained=trained,
        train_seconds=round(seconds, 3),
    )
    if scheduler is not None:
        manifest["scheduler"] = scheduler
        manifest["group_workers"] = [
            {"runs": [exp.ids[i] for i in w["run_indices"]], "worker": w["worker"]} for w in workers
        ]
    records.write_manifest(exp.out, manifest)


def _record_group(exp: _Experiment, data, run_indices, results: list[RunResult]) -> int:
    """Write the records of a group's unfinished runs and results.csv; how many were written."""
    unfinished, written = set(exp.todo), 0
    for i, result in zip(run_indices, results, strict=True):
        if i not in unfinished:
            continue  # trained again only to keep its group whole; its record stands
        summary = run_summary(exp.runs[i], exp.ids[i], result, data)
        config = run_config_dict(exp.runs[i])
        records.write_run(
            exp.out,
            exp.ids[i],
            config,
            summary,
            run_metrics(summary),
            probe_layers=result.probe_layers,
            probe_landscape=result.probe_landscape,
        )
        written += 1
    records.write_results_csv(exp.out, records.read_summaries(exp.out, exp.ids))
    return written


def _train(exp: _Experiment, data, data_dir, force, log, options: dict) -> int:
    """Load the data, check it is the data of OUT's finished runs, then train and record."""
    source = {"provided": "in-memory arrays"}
    if data is None:
        data, source = load_train_data(exp.cfg, data_dir, log, feature_dtype(exp.runs))
    earlier = records.read_manifest(exp.out, note=log)
    exp = _same_data(exp, source, earlier, force)
    # Written only once the data has loaded: a data error must not leave an OUT/config.yaml
    # behind that would then refuse the next, different config as if it held results.
    records.prepare_output_dir(exp.out, exp.config_yaml, force=force)
    if force:
        checkpoint.remove_all(exp.out)  # --force starts every group afresh
    manifest = _new_manifest(exp, options["jobs"], source, earlier)
    return _train_and_record(exp, data, options, manifest, source)


def _settle_manifest(out: Path, log: Callable[[str], None]) -> None:
    """Every run is recorded: a manifest not 'complete' was left by a process killed after its
    last record and before its closing write (it reads 'running'); it now says 'complete'."""
    manifest = records.read_manifest(out)
    if manifest is None or manifest.get("status") == "complete":
        return
    manifest["status"] = "complete"
    manifest["status_note"] = (
        "the invocation was killed after recording its last run; a later one found all recorded"
    )
    with signals_held():
        records.write_manifest(out, manifest)
    log(f"note: {out / 'manifest.json'}: every run is recorded; status set to complete")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


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
    data=None,
    scheduler: str | None = None,
    draw: Callable[[Path], list[Path]] | None = None,
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
    scheduler : a Dask scheduler address (``tcp://host:8786``) or ``local:N``: each lockstep
        group runs as one Dask task instead of in `jobs` processes (`bnexp.cluster`); the
        results are the same.
    data : already loaded splits with X_train, y_train, X_val, y_val, X_test, y_test (tests);
        skips loading from `data_dir`.
    draw : what draws the figures of OUT (default `bnexp.plots.plot_results`), e.g. a
        `bnexp.drawing.Drawer` that got matplotlib ready while the runs trained.

    When every run is already finished, no data is loaded and nothing is written but a changed
    claim in OUT/config.yaml (the figures are drawn only if OUT has none; `bnexp plot` redraws
    them).

    Raises
    ------
    ConfigError, DataError, OutputError : one line each, before anything is trained (and,
        for config and data errors, before anything is written into `out`).
    KeyboardInterrupt : after every finished group has been recorded (manifest status
        "interrupted"; any other exception leaves status "failed").
    """
    log = log or _stderr
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    try:
        seconds = checkpoint.period_from_environment()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    options = {"jobs": jobs, "progress": progress, "scheduler": scheduler}
    options["checkpoint_seconds"] = seconds
    # One process per OUT: a second one stops with one line naming the holder (exit 4).
    with records.output_lock(out):
        exp = _survey(cfg, out, force)
        # At once: a signal during the data loading below must not find a killed process's
        # temporaries still there (they would look like this process's own leftovers).
        records.clean_stale_temporaries(exp.out)
        skipped, trained = len(exp.runs) - len(exp.todo), 0
        if skipped:
            log(f"resuming: {skipped} of {len(exp.runs)} runs already finished in {exp.out}")
        if exp.todo:
            trained = _train(exp, data, data_dir, force, log, options)
        else:
            checkpoint.remove_others(exp.out, [])  # of a group killed after its records
            _settle_manifest(exp.out, log)
            if records.refresh_descriptions(exp.out, exp.config_yaml):
                log(f"note: updated the claim in {exp.out / 'config.yaml'} (nothing to retrain)")
    summaries = records.read_summaries(exp.out, exp.ids)
    plots: list[Path] = []
    drawn = sorted((exp.out / "plots").glob("*.png"))
    if plot and summaries and (trained or not drawn):
        if draw is None:
            from bnexp.plots import plot_results as draw
        plots = draw(exp.out)
    elif plot:
        plots = drawn  # nothing new to draw: an invocation that trains nothing writes nothing
    return ExperimentResult(
        out=exp.out, summaries=summaries, trained=trained, skipped=skipped, plots=plots
    )
