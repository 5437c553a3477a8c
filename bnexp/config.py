"""Experiment configs: strict YAML into frozen dataclasses, layered files, overrides, grids, runs.

Every config key is ONE dataclass field below, declared with `setting`: its default, its kind and
its bounds or choices. Validation is a loop over those fields; only the checks that relate two
keys are written by hand (`_cross_checks`). Lists of choices come from the module that implements
them (update rules from `bnexp.optim`, sampling and rng modes from `bnexp.plan`, batch-norm
evaluation modes from `bnexp.train`, dtypes from `bnexp.model`).

Grids. Every key of ``model`` and ``train`` and ``seed`` may be a *sweep axis*: a list of values, or
``{logspace: [start, stop, num]}`` / ``{linspace: [start, stop, num]}`` for numbers.
``model.hidden_dims`` is already a list, so its axis is a list of lists,
``model.hidden_dims=[[100,100,100,100,100],[50,50,50,50,50,50,50]]``. ``ExperimentConfig`` holds
one scalar per key (for a swept key, the first value of its axis) plus ``axes``, the ordered swept
keys and their values. `expand_runs` turns it into the cartesian product, one `Run` per point:
seed outermost, then ``train.learning_rate``, ``model.weight_scale``, ``model.batchnorm`` (the
notebook's order, which the rng=cs231n replay depends on), then every other swept key in the order
of `AXIS_ORDER` (fields in declaration order, model before train), the last innermost. A run's
``cfg`` is the experiment resolved at its point (every field a scalar, ``axes`` empty).

Layers. A config is built from the command's default experiment (the repo's YAML, else a built-in
copy), then each ``-c`` file in order (a later file wins key by key), then the ``KEY=VALUE``
overrides. An empty file is an error.

Limits. Before anything is materialised the loader refuses configs beyond the ``limits`` section
(raise them with a file or an override such as ``limits.runs=50000``): values of one grid, runs,
layer width, parameters per network, total network-iterations and an estimate of memory.

Adding a key: add one `setting` field to its section (default, kind, bounds or choices) and read it
from ``run.cfg`` where it is used; a key new at its default stays out of the run-id hash and of the
saved config (`_ID_KEYS` lists the original keys), so existing results keep their ids and resume.

Every problem is one `ConfigError` line naming the file (or the override) and the dotted key::

    configs/x.yaml: train.epochs: expected a positive integer, got 'ten'
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnexp.errors import ConfigError
from bnexp.model import DTYPES, NOISY_BN_STRENGTH, NORMALIZATIONS
from bnexp.optim import UPDATE_RULES
from bnexp.plan import RNG_MODES, SAMPLING_MODES, iterations_per_epoch
from bnexp.train import BN_EVAL_MODES
from bnexp.yamlfile import dump_yaml, parse_yaml

CIFAR10_TRAIN_IMAGES = 50_000
CIFAR10_TEST_IMAGES = 10_000
#: CIFAR-10 images flattened channel-major, and its classes.
INPUT_DIM = 3 * 32 * 32
NUM_CLASSES = 10
_MAX_SEED = 2**32 - 1  # np.random.seed (the cs231n replay) accepts 0 .. 2**32 - 1
_EXCERPT = 40  # characters of a value quoted in an error line
_MAX_TEXT = 1_000  # characters of a free-text key (a claim is a sentence or two)


def setting(
    default: Any,
    kind: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    choices: Sequence[str] = (),
    axis: bool = True,
) -> Any:
    """A config field: default, kind and bounds in the field's metadata (read by `_check_value`).

    kind : 'int', 'float', 'bool', 'choice', 'dims' (list of layer widths), 'seed', 'name' or
        'text' (free text, at most `_MAX_TEXT` characters).
    ge, gt, lt, le : bounds of a number. choices : allowed strings of a 'choice'.
    axis : whether a list or grid of values may be given (a sweep axis).
    """
    meta = {"kind": kind, "ge": ge, "gt": gt, "lt": lt, "le": le, "choices": tuple(choices)}
    return field(default=default, metadata={**meta, "axis": axis})


@dataclass(frozen=True)
class DataConfig:
    """Which CIFAR-10 images form the splits (the cs231n `get_CIFAR10_data` layout).

    One data set per experiment: these keys cannot be sweep axes.
    """

    num_training: int = setting(49_000, "int", ge=1, axis=False)  # train = the first ones
    num_validation: int = setting(1_000, "int", ge=1, axis=False)  # val = the next ones
    num_test: int = setting(1_000, "int", ge=0, le=CIFAR10_TEST_IMAGES, axis=False)
    num_train: int = setting(1_000, "int", ge=1, axis=False)  # trained on: first of train split
    subtract_mean: bool = setting(True, "bool", axis=False)


#: Normalizations the original key ``model.batchnorm`` spells (true, false).
_BATCHNORM_KINDS = {True: "batchnorm", False: "none"}


@dataclass(frozen=True)
class ModelConfig:
    """The fully connected net.

    ``normalization`` (none, batchnorm, layernorm, noisy_batchnorm) supersedes the original
    ``batchnorm`` flag: when it is given, the flag follows it (true only for batchnorm). It is
    stored as None whenever the flag alone says the same (none, batchnorm), so such runs keep
    the ids of the runs made with the flag. `kind` is the normalization either way.
    ``dropout_keep`` is the probability of keeping a unit in the inverted dropout after every
    ReLU (1: no dropout). ``bn_noise`` is the strength of noisy batch norm's per-unit, per-step
    random scale in [1, 1 + s] and shift in [-s, s] (`bnexp.layers.sample_bn_noise`; default 1:
    a unit's mean moves by up to one normalized standard deviation per step).
    """

    hidden_dims: tuple[int, ...] = setting((100,) * 5, "dims")
    weight_scale: float = setting(2e-2, "float", gt=0)
    batchnorm: bool = setting(True, "bool")
    normalization: str | None = setting(None, "choice", choices=NORMALIZATIONS)
    reg: float = setting(0.0, "float", ge=0)
    dtype: str = setting("float32", "choice", choices=DTYPES)
    dropout_keep: float = setting(1.0, "float", gt=0, le=1)
    bn_noise: float = setting(NOISY_BN_STRENGTH, "float", ge=0)

    def __post_init__(self) -> None:
        norm = self.normalization
        if norm is not None:
            object.__setattr__(self, "batchnorm", norm == "batchnorm")
            if norm in _BATCHNORM_KINDS.values():
                object.__setattr__(self, "normalization", None)

    @property
    def kind(self) -> str:
        """The normalization, one of `bnexp.model.NORMALIZATIONS`."""
        return self.normalization or _BATCHNORM_KINDS[bool(self.batchnorm)]


@dataclass(frozen=True)
class TrainConfig:
    """Solver settings (CS231n Solver semantics, see `bnexp.train`)."""

    epochs: int = setting(10, "int", ge=1)
    batch_size: int = setting(50, "int", ge=1)
    update_rule: str = setting("adam", "choice", choices=tuple(UPDATE_RULES))
    learning_rate: float = setting(1e-3, "float", gt=0)
    lr_decay: float = setting(1.0, "float", gt=0)
    sampling: str = setting("replacement", "choice", choices=SAMPLING_MODES)
    bn_eval: str = setting("running", "choice", choices=BN_EVAL_MODES)
    # Train once, evaluate every mode: the final parameters of every network with running,
    # population, whole-set batch and minibatch statistics (`bnexp.train.EVERY_MODE_FIELDS`).
    # It changes no training number, so it is no sweep axis.
    bn_eval_all: bool = setting(False, "bool", axis=False)
    bn_momentum: float = setting(0.9, "float", ge=0, lt=1)
    bn_eps: float = setting(1e-5, "float", gt=0)
    loss_window: int = setting(100, "int", ge=1)


@dataclass(frozen=True)
class ProbesConfig:
    """Probes inside the networks while they train (`bnexp.probes`), off by default.

    Recorded after `every` updates, every `every` updates and at the last iteration (0: off),
    on the first `batch_size` images of the training subset (the same for every network and
    probe); `ics` and `landscape` add the per-step measurements of Santurkar et al. (2018).
    Probes never change a network's numbers, so these keys cannot be sweep axes; they enter a
    run's id only when probing is on (its records then hold the probe files).
    """

    every: int = setting(0, "int", ge=0, axis=False)
    batch_size: int = setting(200, "int", ge=1, axis=False)
    ics: bool = setting(False, "bool", axis=False)
    landscape: bool = setting(False, "bool", axis=False)


@dataclass(frozen=True)
class LimitsConfig:
    """Resource guards checked at load time, before anything is built (raise them to go further).

    grid_values: values of one sweep axis; runs: grid points; layer_width: widest hidden layer;
    parameters: per network; iterations: solver iterations summed over all runs; memory_mb: the
    estimated peak of the random plans, histories and the largest lockstep group's arrays.
    """

    grid_values: int = setting(10_000, "int", ge=1, axis=False)
    runs: int = setting(10_000, "int", ge=1, axis=False)
    layer_width: int = setting(100_000, "int", ge=1, axis=False)
    parameters: int = setting(50_000_000, "int", ge=1, axis=False)
    iterations: int = setting(20_000_000, "int", ge=1, axis=False)
    memory_mb: int = setting(8_192, "int", ge=1, axis=False)


Axis = tuple[str, tuple]


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment: one value per key plus the sweep axes.

    A swept key's field holds the first value of its axis; `values` gives the whole axis.
    """

    name: str = setting("experiment", "name", axis=False)
    # What the experiment sets out to show, in a sentence; the report prints it. It describes
    # the results without changing them: not part of a run's id nor of OUT's identity.
    claim: str = setting("", "text", axis=False)
    seed: int = setting(231, "seed")
    rng: str = setting("numpy", "choice", choices=RNG_MODES, axis=False)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    axes: tuple[Axis, ...] = ()

    def get(self, key: str) -> Any:
        """The scalar value of a dotted key, e.g. ``cfg.get("train.epochs")``."""
        obj = self
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def values(self, key: str) -> tuple:
        """Every value a dotted key takes in the experiment: its axis, or (its scalar,)."""
        return dict(self.axes).get(key, (self.get(key),))


@dataclass(frozen=True)
class Run:
    """One training run: its index in `expand_runs`, seed, grid point and resolved config.

    point: ((dotted key, value), ...) of every axis; cfg: the experiment at that point (every
    field a scalar, no axes). The engine reads every setting from ``cfg``.
    """

    index: int
    seed: int
    point: tuple[tuple[str, Any], ...]
    cfg: ExperimentConfig


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "probes": ProbesConfig,
    "limits": LimitsConfig,
}
_TOP_SCALARS = ("name", "claim", "seed", "rng")
#: Top-level keys that describe an experiment without changing its results: left out of every
#: run's id and of the comparison of an output folder's saved config (`same_experiment`).
DESCRIPTIVE_KEYS = frozenset({"claim"})
_TOP_KEYS = (*_TOP_SCALARS, *_SECTIONS)


def _section_fields(section: str) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(_SECTIONS[section])


def _all_fields() -> list[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every config key, in declaration order."""
    top = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    out = [(name, top[name]) for name in _TOP_SCALARS]
    return out + [(f"{s}.{f.name}", f) for s in _SECTIONS for f in _section_fields(s)]


#: The order of the product, outermost first (see the module docstring).
_NOTEBOOK_AXES = ("seed", "train.learning_rate", "model.weight_scale", "model.batchnorm")
AXIS_ORDER = _NOTEBOOK_AXES + tuple(
    key for key, f in _all_fields() if f.metadata["axis"] and key not in _NOTEBOOK_AXES
)
#: Keys that existed before any other could be added; they are always part of a run's id. Any key
#: added since (a field not listed here) is left out of a run's id, and of a saved config, while it
#: is at its default, so existing results keep their ids and still resume.
_ID_KEYS = frozenset(
    (
        "seed",
        "rng",
        *(f"data.{k}" for k in ("num_training", "num_validation", "num_test", "num_train")),
        "data.subtract_mean",
        *(f"model.{k}" for k in ("hidden_dims", "weight_scale", "batchnorm", "reg", "dtype")),
        *(f"train.{k}" for k in ("epochs", "batch_size", "update_rule", "learning_rate")),
        *(f"train.{k}" for k in ("lr_decay", "sampling", "bn_eval", "bn_momentum", "bn_eps")),
        "train.loss_window",
    )
)
#: Keys written as lists in a saved config even with one value (how configs were always saved).
_ALWAYS_LISTED = frozenset(_NOTEBOOK_AXES)

# Config files shipped with the repo, and the same experiments built in (for an installed wheel).
_DEFAULT_FILES = {"train": "bn_vs_baseline.yaml", "sweep-init": "weight_init_sweep.yaml"}
_BUILTIN = {
    "train": {
        "name": "bn_vs_baseline",
        "claim": "Batch norm speeds up the training of a deep network.",
        "model": {"batchnorm": [True, False]},
    },
    "sweep-init": {
        "name": "weight_init_sweep",
        "claim": "Batch norm makes training robust to the scale of the weight initialization.",
        "model": {
            "hidden_dims": [50] * 7,
            "weight_scale": {"logspace": [-4, 0, 20]},
            "batchnorm": [True, False],
        },
    },
}


# --- validation of one value ----------------------------------------------------------------


def _show(value: Any) -> str:
    """A value as the user wrote it (YAML spelling for booleans and null), cut to an excerpt."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= _EXCERPT else text[: _EXCERPT - 3] + "..."


def _override_label(text: str) -> str:
    """How an error names an override: its text, cut to a short excerpt."""
    shown = text if len(text) <= 2 * _EXCERPT else text[: 2 * _EXCERPT - 3] + "..."
    return f"override {shown!r}"


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return _is_int(v) or isinstance(v, (float, np.floating))


def _suggest(word: str, allowed: Sequence[str]) -> str:
    """'did you mean X? ' for the closest allowed spelling, or ''."""
    close = difflib.get_close_matches(str(word), list(allowed), n=1, cutoff=0.6)
    return f"did you mean {close[0]}? " if close else ""


class _Checker:
    """Raises ConfigError naming where a key was set: a file, or the override that set it."""

    def __init__(self, origin: dict[str, str], default_source: str):
        self.origin = origin  # dotted key (or section) -> "path" or "override 'k=v'"
        self.default_source = default_source

    def _source_of(self, key: str) -> str | None:
        base = key.split("[")[0]
        for dotted in (base, base.split(".")[0]):
            if dotted in self.origin:
                return self.origin[dotted]
        return None

    def fail(self, key: str, problem: str, related: Sequence[str] = ()) -> None:
        """Raise for `key`; blame an override that set it (or a `related` key of a cross-check),
        else the file that set it, else the default experiment."""
        found = [s for s in map(self._source_of, (key, *related)) if s is not None]

        def rank(source: str) -> int:
            return 0 if source.startswith("override ") else int(source == self.default_source)

        chosen = min(found, key=rank) if found else self.default_source
        raise ConfigError(f"{chosen}: {key}: {problem}")


def _what_int(meta: dict) -> str:
    return "a positive integer" if meta["ge"] == 1 else f"an integer >= {meta['ge']}"


def _check_number(check: _Checker, v: Any, key: str, meta: dict) -> float:
    if not _is_number(v) or not math.isfinite(float(v)):
        check.fail(key, f"expected a finite number, got {_show(v)}")
    v = float(v)
    ge, gt, lt, le = meta["ge"], meta["gt"], meta["lt"], meta["le"]
    if ge is not None and lt is not None and not ge <= v < lt:
        check.fail(key, f"expected a number in [{ge:g}, {lt:g}), got {_show(v)}")
    if gt is not None and le is not None and not gt < v <= le:
        check.fail(key, f"expected a number in ({gt:g}, {le:g}], got {_show(v)}")
    if gt is not None and v <= gt:
        check.fail(key, f"expected a number > {gt:g}, got {_show(v)}")
    if ge is not None and v < ge:
        check.fail(key, f"expected a number >= {ge:g}, got {_show(v)}")
    return v


def _check_int(check: _Checker, v: Any, key: str, meta: dict) -> int:
    if not _is_int(v) or v < meta["ge"]:
        check.fail(key, f"expected {_what_int(meta)}, got {_show(v)}")
    if meta["le"] is not None and v > meta["le"]:
        check.fail(key, f"expected at most {meta['le']:,}, got {v}")
    return int(v)


def _check_dims(check: _Checker, v: Any, key: str, max_width: int) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or not v:
        check.fail(key, f"expected a non-empty list of layer widths, got {_show(v)}")
    dims = []
    for i, h in enumerate(v):
        if not _is_int(h) or h < 1:
            check.fail(
                f"{key}[{i}]", f"expected a positive integer (a layer width), got {_show(h)}"
            )
        if h > max_width:
            check.fail(
                f"{key}[{i}]",
                f"width {h:,} exceeds the limit of {max_width:,} (limits.layer_width); "
                "use narrower layers or raise limits.layer_width",
            )
        dims.append(int(h))
    return tuple(dims)


def _check_value(check: _Checker, v: Any, key: str, f: dataclasses.Field, limits) -> Any:
    """One scalar value of field f, checked against its metadata -> the typed value."""
    meta, kind = f.metadata, f.metadata["kind"]
    if kind == "int":
        return _check_int(check, v, key, meta)
    if kind == "float":
        return _check_number(check, v, key, meta)
    if kind == "bool":
        if not isinstance(v, (bool, np.bool_)):
            check.fail(key, f"expected true or false, got {_show(v)}")
        return bool(v)
    if kind == "choice":
        if not isinstance(v, str) or v not in meta["choices"]:
            check.fail(key, f"expected one of {', '.join(meta['choices'])}, got {_show(v)}")
        return v
    if kind == "dims":
        return _check_dims(check, v, key, limits.layer_width)
    if kind == "seed":
        if not _is_int(v) or v < 0:
            check.fail(key, f"expected an integer >= 0 (a seed), got {_show(v)}")
        if v > _MAX_SEED:
            check.fail(key, f"expected a seed <= {_MAX_SEED}, got {v}")
        return int(v)
    if kind == "text":
        return _check_text(check, v, key)
    assert kind == "name", kind
    if not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
        check.fail(key, f"expected a folder-safe name (letters, digits, _ . -), got {_show(v)}")
    return v


def _check_text(check: _Checker, v: Any, key: str) -> str:
    """Free text: a string (an empty key, null, is no text) of at most _MAX_TEXT characters."""
    if v is None:
        return ""
    if not isinstance(v, str):
        check.fail(key, f"expected text, got {_show(v)}; put the text in quotes")
    if len(v) > _MAX_TEXT:
        check.fail(key, f"{len(v):,} characters, more than {_MAX_TEXT:,}; shorten it")
    return v


# --- grids ----------------------------------------------------------------------------------


def _is_grid(v: Any, kind: str) -> bool:
    """Whether a raw value is a list/grid of values rather than one value of its kind."""
    if kind == "dims":
        return isinstance(v, (list, tuple)) and bool(v) and isinstance(v[0], (list, tuple))
    return isinstance(v, (list, tuple, Mapping))


def _space(check: _Checker, v: Mapping, key: str, kind: str, limit: int) -> list[float]:
    """{logspace|linspace: [start, stop, num]} -> its values, refused above `limit` values."""
    if kind != "float" or len(v) != 1 or next(iter(v)) not in ("logspace", "linspace"):
        allowed = "a list or {logspace: [start, stop, num]}" if kind == "float" else "a list"
        check.fail(key, f"expected a value or {allowed}, got {_show(dict(v))}")
    ((fn, args),) = v.items()
    if (
        not isinstance(args, (list, tuple))
        or len(args) != 3
        or not all(_is_number(a) and math.isfinite(float(a)) for a in args[:2])
        or not _is_int(args[2])
    ):
        check.fail(key, f"{fn}: expected [start, stop, num], got {_show(args)}")
    if args[2] < 1:
        check.fail(key, f"{fn}: empty grid (num = {args[2]}); use num >= 1")
    _check_grid_size(check, key, int(args[2]), limit)
    space = np.logspace if fn == "logspace" else np.linspace
    # An overflow (logspace up to 1e400) becomes inf, reported later as one error line, not also
    # as a RuntimeWarning on stderr.
    with np.errstate(over="ignore"):
        return [float(x) for x in space(float(args[0]), float(args[1]), int(args[2]))]


def _check_grid_size(check: _Checker, key: str, size: int, limit: int) -> None:
    if size > limit:
        check.fail(
            key,
            f"a grid of {size:,} values exceeds the limit of {limit:,} (limits.grid_values); "
            "use fewer values or raise limits.grid_values",
        )


def _check_grid(check: _Checker, v: Any, key: str, f: dataclasses.Field, limits) -> tuple:
    """A list or {logspace|linspace: ...} of field f -> tuple of checked, distinct values."""
    kind = f.metadata["kind"]
    if not f.metadata["axis"]:
        check.fail(key, f"expected a single value (this key cannot be swept), got {_show(v)}")
    if isinstance(v, Mapping):
        raw = _space(check, v, key, kind, limits.grid_values)
    else:
        if not v:
            check.fail(key, "empty grid; give at least one value")
        _check_grid_size(check, key, len(v), limits.grid_values)
        raw = list(v)
    out = []
    for i, x in enumerate(raw):
        out.append(_check_value(check, x, f"{key}[{i}]" if len(raw) > 1 else key, f, limits))
    if len(set(out)) != len(out):
        dup = next(x for x in out if out.count(x) > 1)
        shown = _show(list(dup) if isinstance(dup, tuple) else dup)
        check.fail(key, f"duplicate value {shown} in grid; list each value once")
    return tuple(out)


# --- validation of a whole config -----------------------------------------------------------


def _mapping(check: _Checker, v: Any, key: str, allowed: Sequence[str]) -> dict:
    """A section (or the top level) as a dict whose keys are all allowed."""
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        check.fail(key or "(top level)", f"expected a mapping of keys, got {_show(v)}")
    for k in v:
        if k not in allowed:
            dotted = f"{key}.{k}" if key else str(k)
            check.fail(
                dotted,
                f"unknown key in {key or 'the top level'}; {_suggest(k, allowed)}"
                f"allowed keys are {', '.join(allowed)}",
            )
    return dict(v)


def _limits(check: _Checker, raw: dict) -> LimitsConfig:
    """The limits section first: the other keys are checked against it."""
    given = _mapping(
        check, raw.get("limits"), "limits", [f.name for f in _section_fields("limits")]
    )
    values = {
        f.name: _check_value(check, given[f.name], f"limits.{f.name}", f, None)
        for f in _section_fields("limits")
        if f.name in given
    }
    return LimitsConfig(**values)


def _validate(raw: Any, check: _Checker) -> ExperimentConfig:
    """Turn merged raw YAML into an ExperimentConfig: every key, type, value, limit."""
    top = _mapping(check, raw, "", _TOP_KEYS)
    limits = _limits(check, top)
    sections = {
        s: _mapping(check, top.get(s), s, [f.name for f in _section_fields(s)])
        for s in _SECTIONS
        if s != "limits"
    }
    scalars: dict[str, Any] = {}
    axes: dict[str, tuple] = {}
    for key, f in _all_fields():
        section, _, name = key.rpartition(".")
        if section == "limits":
            continue
        given = sections[section] if section else top
        if name not in given:
            continue
        v = given[name]
        if _is_grid(v, f.metadata["kind"]):
            values = _check_grid(check, v, key, f, limits)
            scalars[key] = values[0]
            if len(values) > 1:
                axes[key] = values
        else:
            scalars[key] = _check_value(check, v, key, f, limits)
    _supersede_batchnorm(scalars, axes, check)
    cfg = _build(scalars, limits, tuple((k, axes[k]) for k in AXIS_ORDER if k in axes))
    _cross_checks(cfg, check)
    _check_resources(cfg, check)
    return cfg


def _supersede_batchnorm(scalars: dict, axes: dict, check: _Checker) -> None:
    """A given model.normalization replaces model.batchnorm (and its axis) of the command's
    default experiment; both given by the user is ambiguous."""
    if "model.normalization" not in scalars:
        return
    source = check.origin.get("model.batchnorm")
    if source is not None and source != check.default_source:
        check.fail(
            "model.normalization",
            f"replaces model.batchnorm, which {source} also sets; give only one "
            "(batchnorm true = normalization batchnorm, false = none)",
            related=("model.batchnorm",),
        )
    scalars.pop("model.batchnorm", None)
    axes.pop("model.batchnorm", None)


def normalization_kinds(cfg: ExperimentConfig) -> tuple[str, ...]:
    """Every normalization the experiment's runs use (from either key)."""
    if "model.normalization" in dict(cfg.axes):
        return cfg.values("model.normalization")
    return tuple(
        dataclasses.replace(cfg.model, batchnorm=b).kind for b in cfg.values("model.batchnorm")
    )


def _build(scalars: dict[str, Any], limits: LimitsConfig, axes: tuple) -> ExperimentConfig:
    """An ExperimentConfig from {dotted key: value} (missing keys at their defaults)."""
    parts: dict[str, Any] = {k: v for k, v in scalars.items() if "." not in k}
    for section, cls in _SECTIONS.items():
        if section != "limits":
            own = {k.split(".", 1)[1]: v for k, v in scalars.items() if k.startswith(section + ".")}
            parts[section] = cls(**own)
    return ExperimentConfig(**parts, limits=limits, axes=axes)


def _cross_checks(cfg: ExperimentConfig, check: _Checker) -> None:
    """The checks that relate two keys; a product of axes holds every combination, so the
    extreme values of each axis decide."""
    data, batch_sizes = cfg.data, cfg.values("train.batch_size")
    if data.num_training + data.num_validation > CIFAR10_TRAIN_IMAGES:
        check.fail(
            "data.num_validation",
            f"num_training + num_validation = {data.num_training + data.num_validation} exceeds "
            f"the {CIFAR10_TRAIN_IMAGES:,} CIFAR-10 training images; lower one of them",
            related=("data.num_training",),
        )
    if data.num_train > data.num_training:
        check.fail(
            "data.num_train",
            f"{data.num_train} is more than data.num_training = {data.num_training}; lower it",
            related=("data.num_training",),
        )
    if max(batch_sizes) > data.num_train:
        check.fail(
            "train.batch_size",
            f"{max(batch_sizes)} is larger than the {data.num_train} training images "
            "(data.num_train); lower it",
            related=("data.num_train",),
        )
    # Checked here, not when training starts: a config error must stop before OUT is written.
    samplings = cfg.values("train.sampling")
    if cfg.rng == "cs231n" and any(s != "replacement" for s in samplings):
        bad = next(s for s in samplings if s != "replacement")
        check.fail(
            "train.sampling",
            f"rng=cs231n replays the reference's sampling with replacement, got {bad!r}; "
            "set train.sampling=replacement or rng=numpy",
            related=("rng",),
        )
    _check_random_layers(cfg, check)
    if cfg.probes.every and cfg.probes.batch_size > data.num_train:
        check.fail(
            "probes.batch_size",
            f"{cfg.probes.batch_size} probe images is more than the {data.num_train} training "
            "images (data.num_train); lower it",
            related=("data.num_train",),
        )
    population = "population" in cfg.values("train.bn_eval")
    every_mode = cfg.train.bn_eval_all  # evaluates with population statistics too
    batch_stats = {"batchnorm", "noisy_batchnorm"} & set(normalization_kinds(cfg))
    if (population or every_mode) and min(batch_sizes) < 2 and batch_stats:
        key, fix = (
            ("train.bn_eval", "use bn_eval running")
            if population
            else ("train.bn_eval_all", "set train.bn_eval_all=false")
        )
        check.fail(
            key,
            "'population' statistics of batch norm need train.batch_size >= 2 (the unbiased "
            f"variance divides by batch_size - 1), got {min(batch_sizes)}; raise the batch size "
            f"or {fix}",
            related=("train.batch_size", "model.batchnorm"),
        )


def _check_random_layers(cfg: ExperimentConfig, check: _Checker) -> None:
    """rng=cs231n replays the notebook, which has neither the new normalizations nor dropout."""
    if cfg.rng != "cs231n":
        return
    kinds = set(normalization_kinds(cfg)) - {"batchnorm", "none"}
    if "model.normalization" in dict(cfg.axes) or kinds:
        check.fail(
            "model.normalization",
            "rng=cs231n replays the reference notebook, which pairs batch norm with a baseline; "
            "use model.batchnorm (true/false) or rng=numpy",
            related=("rng",),
        )
    if min(cfg.values("model.dropout_keep")) < 1:
        check.fail(
            "model.dropout_keep",
            "rng=cs231n replays the reference notebook, which has no dropout; set "
            "model.dropout_keep=1 or rng=numpy",
            related=("rng",),
        )


# --- resource estimates ---------------------------------------------------------------------


def num_runs(cfg: ExperimentConfig) -> int:
    """Grid points of the experiment (the product of the axis lengths)."""
    return math.prod(len(values) for _, values in cfg.axes)


def parameter_count(hidden_dims: Sequence[int]) -> int:
    """Parameters of one net: weights, biases and (upper bound) batch-norm gamma and beta."""
    dims = (INPUT_DIM, *hidden_dims, NUM_CLASSES)
    return sum(a * b + b for a, b in itertools.pairwise(dims)) + 2 * sum(hidden_dims)


def _estimates(cfg: ExperimentConfig) -> dict[str, float]:
    """Worst-case runs, parameters per net, total iterations and memory (MB) of an experiment.

    Memory: every run's plan (float64 normals, int64 minibatch indices) and loss history exist at
    once, plus the largest lockstep group (all runs, at worst) holding parameters, gradients and
    two optimiser moments and snapshot (x5), and activations of ~8 arrays per hidden unit.
    """
    runs = num_runs(cfg)
    params = max(parameter_count(h) for h in cfg.values("model.hidden_dims"))
    width = max(sum(h) for h in cfg.values("model.hidden_dims"))
    batch = max(cfg.values("train.batch_size"))
    per_epoch = max(
        iterations_per_epoch(cfg.data.num_train, b) for b in cfg.values("train.batch_size")
    )
    iterations = max(cfg.values("train.epochs")) * per_epoch
    plan_bytes = params * 8 + iterations * (batch + 1) * 8
    group_bytes = params * 5 * 8 + batch * width * 8 * 8
    return {
        "runs": runs,
        "parameters": params,
        "iterations": runs * iterations,
        "memory_mb": runs * (plan_bytes + group_bytes) / 2**20,
    }


def _check_resources(cfg: ExperimentConfig, check: _Checker) -> None:
    """Refuse an experiment beyond its limits, with the estimate and the limit in one line."""
    axes = tuple(key for key, _ in cfg.axes)
    sizes = ("model.hidden_dims", "train.epochs", "train.batch_size", "data.num_train")
    what = {
        "runs": ("runs", axes),
        "parameters": ("parameters per network", ("model.hidden_dims",)),
        "iterations": ("solver iterations over all runs", (*sizes, *axes)),
        "memory_mb": ("MB of memory (estimated)", (*sizes, *axes)),
    }
    for name, estimate in _estimates(cfg).items():
        limit = getattr(cfg.limits, name)
        if estimate > limit:
            unit, causes = what[name]
            check.fail(
                f"limits.{name}",
                f"the experiment needs {estimate:,.0f} {unit}, more than the limit of {limit:,}; "
                f"shrink it or raise limits.{name}",
                related=causes,
            )


# --- layers: default experiment, files, overrides -------------------------------------------


def _merge(base: dict, layer: Mapping, origin: dict[str, str], source: str) -> dict:
    """base updated by one layer, section by section (a later layer wins key by key)."""
    merged = dict(base)
    for key, value in layer.items():
        if key in _SECTIONS and isinstance(value, Mapping):
            previous = merged.get(key)
            merged[key] = {**previous, **value} if isinstance(previous, Mapping) else dict(value)
            for sub in value:
                origin[f"{key}.{sub}"] = source
        else:
            merged[key] = value
            origin[str(key)] = source
    return merged


def _parse_override(text: str) -> tuple[str, Any]:
    """One dotted `KEY=VALUE` (VALUE parsed as YAML) -> (dotted key, value)."""
    if "=" not in text:
        raise ConfigError(f"{_override_label(text)}: expected KEY=VALUE, e.g. train.epochs=3")
    key, _, value_text = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    known = [k for k in _TOP_KEYS if k not in _SECTIONS] + [
        f"{s}.{f.name}" for s in _SECTIONS for f in _section_fields(s)
    ]
    if key not in known and key not in _SECTIONS:
        raise ConfigError(
            f"{_override_label(text)}: unknown key {key!r}; {_suggest(key, known)}"
            f"known keys are {', '.join(known)}"
        )
    value = parse_yaml(value_text, f"{_override_label(text)}")
    if len(parts) == 1:
        return key, value
    return parts[0], {parts[1]: value}


def _read_file(path: Path) -> dict:
    """A config file's top-level mapping; a missing, unreadable or empty file is an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; check the -c path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc}); check the -c path") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raise ConfigError(
            f"{path}: the config file is empty; give the keys to change (the others come from "
            "the command's default experiment)"
        )
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {_show(raw)}")
    return dict(raw)


def _default_layer(command: str) -> tuple[dict, str]:
    """The command's default experiment as raw YAML and its source name."""
    path = default_config_path(command)
    if path is not None:
        return _read_file(path), str(path)
    return dict(_BUILTIN[command]), f"built-in {command} config"


def _load_layers(layers: Sequence[tuple[dict, str]], overrides: Sequence[str]) -> ExperimentConfig:
    """Merge raw layers in order, then overrides, and validate; errors name the layer."""
    origin: dict[str, str] = {}
    raw: dict = {}
    for layer, source in layers:
        raw = _merge(raw, layer, origin, source)
    for text in overrides:
        key, value = _parse_override(text)
        if key in _SECTIONS and not isinstance(raw.get(key) or {}, Mapping):
            raise ConfigError(f"{_override_label(text)}: {key} is not a mapping in the config")
        raw = _merge(raw, {key: value}, origin, f"{_override_label(text)}")
    default_source = layers[0][1]
    return _validate(raw, _Checker(origin, default_source))


# --- public API -----------------------------------------------------------------------------


def load_config(
    paths: str | Path | Sequence[str | Path] | None = None,
    overrides: Sequence[str] = (),
    *,
    command: str = "sweep-init",
) -> ExperimentConfig:
    """Load, layer, override and validate an experiment config.

    Parameters
    ----------
    paths : YAML file(s), applied in order over the command's default experiment (a later file
        wins key by key); None or () for the default alone.
    overrides : dotted ``KEY=VALUE`` strings applied last, in order; VALUE is parsed as YAML
        (``train.epochs=3``, ``model.weight_scale=[1e-3,1e-2]``, ``limits.runs=50000``).
    command : 'train' (default experiment bn_vs_baseline) or 'sweep-init' (the init sweep).

    Returns
    -------
    ExperimentConfig

    Raises
    ------
    ConfigError : missing, unreadable or empty file, malformed YAML (with line and column),
        unknown key (with the closest valid one), wrong type, impossible value or an experiment
        beyond its `limits`; the message names the file or override and the key.
    """
    if paths is None:
        paths = ()
    elif isinstance(paths, (str, Path)):
        paths = (paths,)
    layers = [_default_layer(command)]
    layers += [(_named(_read_file(Path(p)), Path(p)), str(p)) for p in paths]
    return _load_layers(layers, overrides)


def _named(raw: dict, path: Path) -> dict:
    """A file describes an experiment of its own: one that names none is named after itself (its
    stem, made folder-safe), so its results do not go to the default experiment's folder, and
    one that states no claim has none (the default experiment's claim is not about it)."""
    raw = {"claim": "", **raw}
    if "name" in raw:
        return raw
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem).lstrip("._-") or "experiment"
    return {"name": stem, **raw}


def default_config_path(command: str) -> Path | None:
    """The repo's config file for a command ('train' or 'sweep-init'), or None when not present.

    None happens for an installed wheel; then the built-in copy is used.
    """
    if command not in _DEFAULT_FILES:
        raise ValueError(
            f"no default config for command {command!r}; use one of {list(_DEFAULT_FILES)}"
        )
    path = Path(__file__).resolve().parent.parent / "configs" / _DEFAULT_FILES[command]
    return path if path.is_file() else None


def load_default_config(command: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The default experiment of a command: the repo's YAML if present, else the built-in copy."""
    return load_config(None, overrides, command=command)


def builtin_config(command: str) -> ExperimentConfig:
    """The built-in default experiment of a command (what an installed wheel uses)."""
    return _load_layers([(dict(_BUILTIN[command]), f"built-in {command} config")], ())


def _plain(value: Any) -> Any:
    """A config value as plain YAML/JSON types (tuples as lists)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: ExperimentConfig) -> dict:
    """The resolved config as plain YAML/JSON types, axes as explicit lists.

    The notebook's four grid keys are always lists; `probes` and `limits` appear only when
    changed, keys added later only when not at their defaults (so saved configs of earlier
    experiments stay as they were), and model.batchnorm not when model.normalization supersedes
    it.
    """
    out: dict[str, Any] = {}
    superseded = cfg.values("model.normalization") != (None,)
    for key, f in _all_fields():
        section, _, name = key.rpartition(".")
        if section in ("limits", "probes") or (key == "model.batchnorm" and superseded):
            continue
        values = cfg.values(key)
        newer = section in ("data", "model", "train") and key not in _ID_KEYS
        newer = newer or key in DESCRIPTIVE_KEYS
        if newer and values == (f.default,):
            continue
        listed = key in _ALWAYS_LISTED or len(values) > 1
        value = _plain(list(values) if listed else values[0])
        (out.setdefault(section, {}) if section else out)[name] = value
    if cfg.probes != ProbesConfig():  # so a config without probes is saved as it always was
        out["probes"] = dataclasses.asdict(cfg.probes)
    if cfg.limits != LimitsConfig():
        out["limits"] = dataclasses.asdict(cfg.limits)
    return out


def config_to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (grids as explicit lists); `load_config` of it gives `cfg`."""
    return dump_yaml(config_to_dict(cfg))


def same_experiment(saved_yaml: str, config_yaml: str) -> bool:
    """Whether a saved config (OUT/config.yaml) and a resolved one (`config_to_yaml`) describe
    the same results: equal but for `DESCRIPTIVE_KEYS` (a changed claim is the same experiment).
    A saved config that is not valid YAML is not the same."""
    if saved_yaml == config_yaml:
        return True
    try:
        saved, new = parse_yaml(saved_yaml, "saved config"), parse_yaml(config_yaml, "config")
    except ConfigError:
        return False
    if not (isinstance(saved, dict) and isinstance(new, dict)):
        return False
    keep = [{k: v for k, v in d.items() if k not in DESCRIPTIVE_KEYS} for d in (saved, new)]
    return keep[0] == keep[1]


def _resolve(cfg: ExperimentConfig, point: tuple[tuple[str, Any], ...]) -> ExperimentConfig:
    """The experiment at one grid point: each swept key set to its value, no axes left."""
    top: dict[str, Any] = {"axes": ()}
    sections: dict[str, dict] = {}
    for key, value in point:
        section, _, name = key.rpartition(".")
        if section:
            sections.setdefault(section, {})[name] = value
        else:
            top[name] = value
    for section, values in sections.items():
        top[section] = dataclasses.replace(getattr(cfg, section), **values)
    return dataclasses.replace(cfg, **top)


def expand_runs(cfg: ExperimentConfig) -> list[Run]:
    """The cartesian product of the axes, in the fixed order of `AXIS_ORDER`.

    Seed outermost, then learning_rate, then weight_scale, then batchnorm, then the other swept
    keys, each axis in its listed order: the init sweep goes scale by scale, BN run then baseline,
    as the reference notebook does (which the rng=cs231n replay depends on).
    """
    keys = [key for key, _ in cfg.axes]
    runs = []
    for index, values in enumerate(itertools.product(*(v for _, v in cfg.axes))):
        point = tuple(zip(keys, values, strict=True))
        resolved = _resolve(cfg, point)
        runs.append(Run(index=index, seed=resolved.seed, point=point, cfg=resolved))
    return runs


def _plain_section(section: str, obj: Any) -> dict:
    """One section of a run's settings: the id keys always, a newer key only when not default."""
    out = {}
    for f in _section_fields(section):
        value = getattr(obj, f.name)
        if f"{section}.{f.name}" in _ID_KEYS or value != f.default:
            out[f.name] = _plain(value)
    return out


def run_config_dict(run: Run) -> dict:
    """A run's settings as JSON/YAML types (Python ints, floats, bools, lists), nested as the
    config; the run id hashes this (keys added later are left out at their defaults)."""
    cfg = run.cfg
    return {
        "index": int(run.index),
        "seed": int(cfg.seed),
        "rng": cfg.rng,
        **{s: _plain_section(s, getattr(cfg, s)) for s in ("data", "model", "train")},
        # A probed run has more records than an unprobed one: probing on is part of its id.
        **({"probes": dataclasses.asdict(cfg.probes)} if cfg.probes.every else {}),
    }


def _digest(obj: Any) -> str:
    """sha256 hex of canonical JSON (sorted keys, no spaces, floats by repr)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_id(run: Run, cfg: ExperimentConfig, runs: Sequence[Run] | None = None) -> str:
    """12 hex chars identifying a run's results.

    rng=numpy: a hash of the run's settings without its index, so growing a grid keeps the ids
    (and the finished results) of the runs already done. rng=cs231n: a run's random draws depend
    on every run replayed before it, so the id also covers its index and the whole run list
    (`runs`, default `expand_runs(cfg)`).
    """
    d = run_config_dict(run)
    if cfg.rng == "cs231n":
        d["replay"] = _digest([run_config_dict(r) for r in (runs or expand_runs(cfg))])
    else:
        del d["index"]
    return _digest(d)[:12]


def run_ids(cfg: ExperimentConfig, runs: Sequence[Run]) -> list[str]:
    """`run_id` of every run of `expand_runs(cfg)` (the replay digest computed once)."""
    if cfg.rng != "cs231n":
        return [run_id(r, cfg) for r in runs]
    replay = _digest([run_config_dict(r) for r in runs])
    return [_digest({**run_config_dict(r), "replay": replay})[:12] for r in runs]
