"""Experiment configs: strict YAML into frozen dataclasses, dotted overrides, grids, run expansion.

A config file is YAML with the sections below (every key optional; the defaults are the reference
initialization sweep). Four keys are *grids* and take a scalar, a list, or
``{logspace: [start, stop, num]}`` / ``{linspace: [start, stop, num]}``: ``seed``,
``model.weight_scale``, ``model.batchnorm`` and ``train.learning_rate``. `expand_runs` turns a
config into the cartesian product of its grids, one `RunConfig` per training run.

Every problem is one `ConfigError` line naming the file (or the override) and the dotted key::

    configs/x.yaml: train.epochs: expected a positive integer, got 'ten'
"""

from __future__ import annotations

import dataclasses
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
from bnexp.yamlfile import dump_yaml, parse_yaml

CIFAR10_TRAIN_IMAGES = 50_000
CIFAR10_TEST_IMAGES = 10_000
UPDATE_RULES = ("sgd", "sgd_momentum", "adam")
SAMPLINGS = ("replacement", "shuffle")
BN_EVALS = ("running", "population", "batch")
RNGS = ("numpy", "cs231n")
DTYPES = ("float32", "float64")
GRID_KEYS = ("seed", "model.weight_scale", "model.batchnorm", "train.learning_rate")
_MAX_SEED = 2**32 - 1  # np.random.seed (the cs231n replay) accepts 0 .. 2**32 - 1


@dataclass(frozen=True)
class DataConfig:
    """Which CIFAR-10 images form the splits (the cs231n `get_CIFAR10_data` layout)."""

    num_training: int = 49_000  # train = first num_training images; the mean image is theirs
    num_validation: int = 1_000  # val = the next num_validation training images
    num_test: int = 1_000  # test = first num_test test-batch images
    num_train: int = 1_000  # the experiment trains on the first num_train of the train split
    subtract_mean: bool = True


@dataclass(frozen=True)
class ModelConfig:
    """The fully connected net; `weight_scale` and `batchnorm` are grids (tuples)."""

    hidden_dims: tuple[int, ...] = (50,) * 7
    weight_scale: tuple[float, ...] = tuple(float(v) for v in np.logspace(-4, 0, 20))
    batchnorm: tuple[bool, ...] = (True, False)
    reg: float = 0.0
    dtype: str = "float32"


@dataclass(frozen=True)
class TrainConfig:
    """Solver settings; `learning_rate` is a grid (tuple)."""

    epochs: int = 10
    batch_size: int = 50
    update_rule: str = "adam"
    learning_rate: tuple[float, ...] = (1e-3,)
    lr_decay: float = 1.0
    sampling: str = "replacement"
    bn_eval: str = "running"
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5
    loss_window: int = 100


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment; `seed` is a grid of replicate seeds (tuple)."""

    name: str = "weight_init_sweep"
    seed: tuple[int, ...] = (231,)
    rng: str = "numpy"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class RunConfig:
    """One training run: every grid resolved to a scalar, plus its position in `expand_runs`."""

    index: int
    seed: int
    rng: str
    data: DataConfig
    hidden_dims: tuple[int, ...]
    weight_scale: float
    batchnorm: bool
    reg: float
    dtype: str
    epochs: int
    batch_size: int
    update_rule: str
    learning_rate: float
    lr_decay: float
    sampling: str
    bn_eval: str
    bn_momentum: float
    bn_eps: float
    loss_window: int


_SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
_TOP_KEYS = ("name", "seed", "rng", "data", "model", "train")

# Config files shipped with the repo, and the same experiments built in (for an installed wheel).
_DEFAULT_FILES = {"train": "bn_vs_baseline.yaml", "sweep-init": "weight_init_sweep.yaml"}
_BUILTIN = {
    "train": {
        "name": "bn_vs_baseline",
        "model": {"hidden_dims": [100] * 5, "weight_scale": 2e-2, "batchnorm": [True, False]},
    },
    "sweep-init": {},  # the dataclass defaults are the sweep
}


# --- validation -----------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A value as the user wrote it (YAML spelling for booleans and null)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return _is_int(v) or isinstance(v, (float, np.floating))


class _Checker:
    """Raises ConfigError naming the source of a key: the file, or the override that set it."""

    def __init__(self, source: str, overrides: dict[str, str]):
        self.source = source
        self.overrides = overrides

    def fail(self, key: str, problem: str, related: Sequence[str] = ()) -> None:
        """Raise for `key`; blame an override that set it (or a `related` key of a cross-check)."""
        for dotted, text in self.overrides.items():
            for k in (key, *related):
                base = k.split("[")[0]
                if base == dotted or base.startswith(dotted + ".") or dotted.startswith(base + "."):
                    raise ConfigError(f"override {text!r}: {key}: {problem}")
        raise ConfigError(f"{self.source}: {key}: {problem}")

    def int_(self, v: Any, key: str, minimum: int, what: str) -> int:
        if not _is_int(v) or v < minimum:
            self.fail(key, f"expected {what}, got {_show(v)}")
        return int(v)

    def float_(self, v: Any, key: str, *, positive=False, nonneg=False, below_one=False) -> float:
        if not _is_number(v) or not math.isfinite(float(v)):
            self.fail(key, f"expected a finite number, got {_show(v)}")
        v = float(v)
        if positive and v <= 0:
            self.fail(key, f"expected a number > 0, got {_show(v)}")
        if nonneg and v < 0:
            self.fail(key, f"expected a number >= 0, got {_show(v)}")
        if below_one and not 0 <= v < 1:
            self.fail(key, f"expected a number in [0, 1), got {_show(v)}")
        return v

    def bool_(self, v: Any, key: str) -> bool:
        if not isinstance(v, (bool, np.bool_)):
            self.fail(key, f"expected true or false, got {_show(v)}")
        return bool(v)

    def choice(self, v: Any, key: str, choices: Sequence[str]) -> str:
        if v not in choices or not isinstance(v, str):
            self.fail(key, f"expected one of {', '.join(choices)}, got {_show(v)}")
        return v

    def mapping(self, v: Any, key: str, allowed: Sequence[str]) -> dict:
        where = key or "the top level"
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            self.fail(key or "(top level)", f"expected a mapping of keys, got {_show(v)}")
        for k in v:
            if k not in allowed:
                dotted = f"{key}.{k}" if key else str(k)
                self.fail(dotted, f"unknown key in {where}; allowed keys are {', '.join(allowed)}")
        return dict(v)

    def grid(self, v: Any, key: str, kind: str) -> tuple:
        """A scalar, non-empty list or {logspace|linspace: [start, stop, num]} -> tuple."""
        if isinstance(v, Mapping):
            if kind != "float" or len(v) != 1 or next(iter(v)) not in ("logspace", "linspace"):
                allowed = (
                    "a list or {logspace: [start, stop, num]}" if kind == "float" else "a list"
                )
                self.fail(key, f"expected a value or {allowed}, got {_show(dict(v))}")
            ((fn, args),) = v.items()
            if (
                not isinstance(args, (list, tuple))
                or len(args) != 3
                or not all(_is_number(a) and math.isfinite(float(a)) for a in args[:2])
                or not _is_int(args[2])
            ):
                self.fail(key, f"{fn}: expected [start, stop, num], got {_show(args)}")
            if args[2] < 1:
                self.fail(key, f"{fn}: empty grid (num = {args[2]}); use num >= 1")
            space = np.logspace if fn == "logspace" else np.linspace
            # An overflow (logspace up to 1e400) becomes inf, reported below as one error line,
            # not also as a RuntimeWarning on stderr.
            with np.errstate(over="ignore"):
                grid = space(float(args[0]), float(args[1]), int(args[2]))
            values = [float(x) for x in grid]
        elif isinstance(v, (list, tuple)):
            if not v:
                self.fail(key, "empty grid; give at least one value")
            values = list(v)
        else:
            values = [v]
        out = []
        for i, x in enumerate(values):
            item = f"{key}[{i}]" if len(values) > 1 else key
            if kind == "seed":
                out.append(self.int_(x, item, 0, "an integer >= 0 (a seed)"))
                if out[-1] > _MAX_SEED:
                    self.fail(item, f"expected a seed <= {_MAX_SEED}, got {x}")
            elif kind == "bool":
                out.append(self.bool_(x, item))
            else:
                out.append(self.float_(x, item, positive=True))
        if len(set(out)) != len(out):
            dup = next(x for x in out if out.count(x) > 1)
            self.fail(key, f"duplicate value {_show(dup)} in grid; list each value once")
        return tuple(out)


def _validate(raw: Any, check: _Checker) -> ExperimentConfig:
    """Turn parsed YAML into an ExperimentConfig, checking every key, type and value."""
    top = check.mapping(raw, "", _TOP_KEYS)
    defaults = ExperimentConfig()
    sections = {}
    for sec, cls in _SECTIONS.items():
        names = [f.name for f in dataclasses.fields(cls)]
        sections[sec] = check.mapping(top.get(sec), sec, names)

    name = top.get("name", defaults.name)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        check.fail(
            "name", f"expected a folder-safe name (letters, digits, _ . -), got {_show(name)}"
        )
    seed = check.grid(top.get("seed", defaults.seed), "seed", "seed")
    rng = check.choice(top.get("rng", defaults.rng), "rng", RNGS)

    d, dd = sections["data"], defaults.data
    pos = "a positive integer"
    data = DataConfig(
        num_training=check.int_(
            d.get("num_training", dd.num_training), "data.num_training", 1, pos
        ),
        num_validation=check.int_(
            d.get("num_validation", dd.num_validation), "data.num_validation", 1, pos
        ),
        num_test=check.int_(d.get("num_test", dd.num_test), "data.num_test", 0, "an integer >= 0"),
        num_train=check.int_(d.get("num_train", dd.num_train), "data.num_train", 1, pos),
        subtract_mean=check.bool_(d.get("subtract_mean", dd.subtract_mean), "data.subtract_mean"),
    )
    if data.num_training + data.num_validation > CIFAR10_TRAIN_IMAGES:
        check.fail(
            "data.num_validation",
            f"num_training + num_validation = {data.num_training + data.num_validation} exceeds "
            f"the {CIFAR10_TRAIN_IMAGES:,} CIFAR-10 training images; lower one of them",
            related=("data.num_training",),
        )
    if data.num_test > CIFAR10_TEST_IMAGES:
        check.fail(
            "data.num_test", f"expected at most {CIFAR10_TEST_IMAGES:,}, got {data.num_test}"
        )
    if data.num_train > data.num_training:
        check.fail(
            "data.num_train",
            f"{data.num_train} is more than data.num_training = {data.num_training}; lower it",
            related=("data.num_training",),
        )

    m, md = sections["model"], defaults.model
    hidden = m.get("hidden_dims", list(md.hidden_dims))
    if not isinstance(hidden, (list, tuple)) or not hidden:
        check.fail(
            "model.hidden_dims", f"expected a non-empty list of layer widths, got {_show(hidden)}"
        )
    hidden = tuple(
        check.int_(h, f"model.hidden_dims[{i}]", 1, "a positive integer (a layer width)")
        for i, h in enumerate(hidden)
    )
    model = ModelConfig(
        hidden_dims=hidden,
        weight_scale=check.grid(
            m.get("weight_scale", md.weight_scale), "model.weight_scale", "float"
        ),
        batchnorm=check.grid(m.get("batchnorm", md.batchnorm), "model.batchnorm", "bool"),
        reg=check.float_(m.get("reg", md.reg), "model.reg", nonneg=True),
        dtype=check.choice(m.get("dtype", md.dtype), "model.dtype", DTYPES),
    )

    t, td = sections["train"], defaults.train
    train = TrainConfig(
        epochs=check.int_(t.get("epochs", td.epochs), "train.epochs", 1, pos),
        batch_size=check.int_(t.get("batch_size", td.batch_size), "train.batch_size", 1, pos),
        update_rule=check.choice(
            t.get("update_rule", td.update_rule), "train.update_rule", UPDATE_RULES
        ),
        learning_rate=check.grid(
            t.get("learning_rate", td.learning_rate), "train.learning_rate", "float"
        ),
        lr_decay=check.float_(t.get("lr_decay", td.lr_decay), "train.lr_decay", positive=True),
        sampling=check.choice(t.get("sampling", td.sampling), "train.sampling", SAMPLINGS),
        bn_eval=check.choice(t.get("bn_eval", td.bn_eval), "train.bn_eval", BN_EVALS),
        bn_momentum=check.float_(
            t.get("bn_momentum", td.bn_momentum), "train.bn_momentum", below_one=True
        ),
        bn_eps=check.float_(t.get("bn_eps", td.bn_eps), "train.bn_eps", positive=True),
        loss_window=check.int_(t.get("loss_window", td.loss_window), "train.loss_window", 1, pos),
    )
    if train.batch_size > data.num_train:
        check.fail(
            "train.batch_size",
            f"{train.batch_size} is larger than the {data.num_train} training images "
            "(data.num_train); lower it",
            related=("data.num_train",),
        )
    # Checked here, not when training starts: a config error must stop before OUT is written.
    if rng == "cs231n" and train.sampling != "replacement":
        check.fail(
            "train.sampling",
            f"rng=cs231n replays the reference's sampling with replacement, got "
            f"{train.sampling!r}; set train.sampling=replacement or rng=numpy",
            related=("rng",),
        )
    if train.bn_eval == "population" and train.batch_size < 2 and True in model.batchnorm:
        check.fail(
            "train.bn_eval",
            "'population' statistics of batch norm need train.batch_size >= 2 (the unbiased "
            f"variance divides by batch_size - 1), got {train.batch_size}; raise the batch size "
            "or use bn_eval running",
            related=("train.batch_size", "model.batchnorm"),
        )
    return ExperimentConfig(name=name, seed=seed, rng=rng, data=data, model=model, train=train)


# --- overrides ------------------------------------------------------------------------------


def _apply_override(raw: dict, text: str) -> str:
    """Set one dotted `KEY=VALUE` (VALUE parsed as YAML) into raw; return the dotted key."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.epochs=3")
    key, _, value_text = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    known_key = (len(parts) == 1 and key in _TOP_KEYS) or (
        len(parts) == 2
        and parts[0] in _SECTIONS
        and parts[1] in {f.name for f in dataclasses.fields(_SECTIONS[parts[0]])}
    )
    if not known_key:
        known = [k for k in _TOP_KEYS if k not in _SECTIONS] + [
            f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)
        ]
        raise ConfigError(
            f"override {text!r}: unknown key {key!r}; known keys are {', '.join(known)}"
        )
    value = parse_yaml(value_text, f"override {text!r}")
    if len(parts) == 1:
        if key in _SECTIONS and isinstance(value, Mapping) and isinstance(raw.get(key), Mapping):
            raw[key] = {**raw[key], **value}  # data={num_train: 500} changes only that key
        else:
            raw[key] = value
    else:
        section = raw.get(parts[0])
        if section is None:
            section = raw[parts[0]] = {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"override {text!r}: {parts[0]} is not a mapping in the config")
        raw[parts[0]] = {**section, parts[1]: value}
    return key


# --- public API -----------------------------------------------------------------------------


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load, override and validate an experiment config.

    Parameters
    ----------
    path : YAML file, or None for the built-in defaults (the reference initialization sweep).
    overrides : dotted ``KEY=VALUE`` strings applied in order; VALUE is parsed as YAML
        (``train.epochs=3``, ``model.weight_scale=[1e-3,1e-2]``, ``seed=7``).

    Returns
    -------
    ExperimentConfig

    Raises
    ------
    ConfigError : missing/unreadable file, malformed YAML (with line and column), unknown key,
        wrong type or impossible value; the message names the file or override and the key.
    """
    if path is None:
        return _load_raw({}, "built-in defaults", overrides)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; check the -c path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc}); check the -c path") from None
    raw = parse_yaml(text, str(path))
    return _load_raw(raw, str(path), overrides)


def _load_raw(raw: Any, source: str, overrides: Sequence[str]) -> ExperimentConfig:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"{source}: expected a mapping of keys at the top level, got {_show(raw)}"
        )
    raw = dict(raw)
    applied: dict[str, str] = {}
    for text in overrides:
        applied[_apply_override(raw, text)] = text
    return _validate(raw, _Checker(source, applied))


def default_config_path(command: str) -> Path | None:
    """The repo's config file for a command ('train' or 'sweep-init'), or None when not present.

    None happens for an installed wheel; then `load_default_config` uses the built-in copy.
    """
    if command not in _DEFAULT_FILES:
        raise ValueError(
            f"no default config for command {command!r}; use one of {list(_DEFAULT_FILES)}"
        )
    path = Path(__file__).resolve().parent.parent / "configs" / _DEFAULT_FILES[command]
    return path if path.is_file() else None


def load_default_config(command: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The default experiment of a command: the repo's YAML if present, else the built-in copy."""
    path = default_config_path(command)
    if path is not None:
        return load_config(path, overrides)
    return _load_raw(dict(_BUILTIN[command]), f"built-in {command} config", overrides)


def builtin_config(command: str) -> ExperimentConfig:
    """The built-in default experiment of a command (what an installed wheel uses)."""
    return _load_raw(dict(_BUILTIN[command]), f"built-in {command} config", ())


def config_to_dict(cfg: ExperimentConfig) -> dict:
    """The resolved config as plain YAML/JSON types, grids as explicit lists."""
    return {
        "name": cfg.name,
        "seed": list(cfg.seed),
        "rng": cfg.rng,
        "data": dataclasses.asdict(cfg.data),
        "model": {
            "hidden_dims": list(cfg.model.hidden_dims),
            "weight_scale": list(cfg.model.weight_scale),
            "batchnorm": list(cfg.model.batchnorm),
            "reg": cfg.model.reg,
            "dtype": cfg.model.dtype,
        },
        "train": {
            **dataclasses.asdict(cfg.train),
            "learning_rate": list(cfg.train.learning_rate),
        },
    }


def config_to_yaml(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (grids as explicit lists); `load_config` of it gives `cfg`."""
    return dump_yaml(config_to_dict(cfg))


def expand_runs(cfg: ExperimentConfig) -> list[RunConfig]:
    """The cartesian product of the grids, in a fixed order.

    Seed outermost, then learning_rate, then weight_scale, then batchnorm innermost, each axis in
    its listed order: the sweep goes scale by scale, BN run then baseline, as the reference
    notebook does (which the rng=cs231n replay depends on).
    """
    m, t = cfg.model, cfg.train
    runs = []
    for index, (seed, lr, scale, bn) in enumerate(
        itertools.product(cfg.seed, t.learning_rate, m.weight_scale, m.batchnorm)
    ):
        runs.append(
            RunConfig(
                index=index,
                seed=seed,
                rng=cfg.rng,
                data=cfg.data,
                hidden_dims=m.hidden_dims,
                weight_scale=scale,
                batchnorm=bn,
                reg=m.reg,
                dtype=m.dtype,
                epochs=t.epochs,
                batch_size=t.batch_size,
                update_rule=t.update_rule,
                learning_rate=lr,
                lr_decay=t.lr_decay,
                sampling=t.sampling,
                bn_eval=t.bn_eval,
                bn_momentum=t.bn_momentum,
                bn_eps=t.bn_eps,
                loss_window=t.loss_window,
            )
        )
    return runs


def run_config_dict(run: RunConfig) -> dict:
    """A run as JSON/YAML types (Python ints, floats, bools, lists), nested as the config."""
    return {
        "index": int(run.index),
        "seed": int(run.seed),
        "rng": run.rng,
        "data": {
            k: v if isinstance(v, bool) else int(v) for k, v in dataclasses.asdict(run.data).items()
        },
        "model": {
            "hidden_dims": [int(h) for h in run.hidden_dims],
            "weight_scale": float(run.weight_scale),
            "batchnorm": bool(run.batchnorm),
            "reg": float(run.reg),
            "dtype": run.dtype,
        },
        "train": {
            "epochs": int(run.epochs),
            "batch_size": int(run.batch_size),
            "update_rule": run.update_rule,
            "learning_rate": float(run.learning_rate),
            "lr_decay": float(run.lr_decay),
            "sampling": run.sampling,
            "bn_eval": run.bn_eval,
            "bn_momentum": float(run.bn_momentum),
            "bn_eps": float(run.bn_eps),
            "loss_window": int(run.loss_window),
        },
    }


def _digest(obj: Any) -> str:
    """sha256 hex of canonical JSON (sorted keys, no spaces, floats by repr)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_id(run: RunConfig, cfg: ExperimentConfig) -> str:
    """12 hex chars identifying a run's results.

    rng=numpy: a hash of the run's settings without its index, so growing a grid keeps the ids
    (and the finished results) of the runs already done. rng=cs231n: a run's random draws depend
    on every run replayed before it, so the id also covers its index and the whole run list.
    """
    d = run_config_dict(run)
    if run.rng == "cs231n":
        d["replay"] = _digest([run_config_dict(r) for r in expand_runs(cfg)])
    else:
        del d["index"]
    return _digest(d)[:12]
