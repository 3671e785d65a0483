"""Typed run configuration: dataclass groups, YAML load, dotted overrides, validation, hashing.

A run is described by :class:`Config` (data, model, optim, sparsity, run). Every field has a default
and a help text. ``load_config`` reads YAML, applies ``key.sub=value`` overrides and validates the
result; every invalid value raises :class:`ConfigError` naming the field, the value and what is
allowed, before anything is trained or written.

The config hash is the SHA-256 of the canonical JSON of the *non-default* values, so adding a new
field with a default does not rename existing runs (the open_lth convention); the locations
``run.output_dir`` and ``data.data_dir`` are left out of it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from granet.errors import ConfigError

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "SparsityConfig",
    "RunConfig",
    "Config",
    "load_config",
    "apply_overrides",
    "set_values",
    "non_default_values",
    "config_from_dict",
    "config_to_dict",
    "config_hash",
    "dump_yaml",
    "validate",
]

METHODS = ("dense", "static", "set", "rigl", "gmp", "granet")
DISTRIBUTIONS = ("uniform", "er", "erk")
GROWTH = ("gradient", "random", "momentum")
PRUNE_SCOPES = ("global", "layerwise")
STRUCTURES = ("unstructured", "filter")
REGEN_DECAYS = ("cosine", "linear", "constant")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("multistep", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class DataConfig:
    name: str = _help("data set: mnist1d, digits, cifar10, cifar100, fake", "mnist1d")
    data_dir: str = _help("directory holding (or receiving) downloaded data sets", "data")
    download: bool = _help("download CIFAR if absent (needs a network)", False)
    val_fraction: float = _help("share of the training set held out for validation", 0.1)
    batch_size: int = _help("training batch size", 128)
    eval_batch_size: int = _help("evaluation batch size", 1000)
    num_samples: int | None = _help(
        "mnist1d/fake: number of samples generated (None: default)", None
    )
    augment: bool = _help("CIFAR: random crop + horizontal flip", True)
    drop_last: bool = _help(
        "skip the last partial training batch of each epoch (false: every sample is trained "
        "each epoch, ceil(n / batch_size) steps, as the reference code)", False
    )


@dataclass
class ModelConfig:
    name: str = _help(
        "registry name, 'torchvision:<name>', or a user model 'package.module:function'", "cnn1d"
    )
    kwargs: dict[str, Any] = _help("keyword arguments passed to the model builder", factory=dict)


@dataclass
class OptimConfig:
    name: str = _help("optimizer: sgd or adamw", "sgd")
    lr: float = _help("peak learning rate", 0.1)
    momentum: float = _help("SGD momentum", 0.9)
    nesterov: bool = _help("SGD Nesterov momentum", True)
    betas: list[float] = _help("AdamW betas", factory=lambda: [0.9, 0.999])
    weight_decay: float = _help("weight decay", 5e-4)
    no_decay_norm_bias: bool = _help("exclude normalisation and bias parameters from decay", False)
    schedule: str = _help("LR schedule: multistep, cosine, constant", "multistep")
    milestones: list[int] = _help("multistep: epochs at which the LR is multiplied by gamma",
                                  factory=lambda: [80, 120])
    gamma: float = _help("multistep: LR factor at each milestone", 0.1)
    warmup_epochs: int = _help("linear warm-up epochs before the schedule", 0)
    label_smoothing: float = _help("label smoothing of the cross-entropy loss", 0.0)


@dataclass
class SparsityConfig:
    method: str = _help("dense, static, set, rigl, gmp, granet (SPEC §4.3)", "granet")
    init_density: float = _help(
        "gmp/granet: initial density d_i = 1 - s_i (1: dense-to-sparse, 0.5: sparse-to-sparse)", 1.0
    )
    final_density: float = _help("target density d_f (static/set/rigl: the constant density)", 0.1)
    distribution: str = _help("initial layer densities: uniform, er, erk", "erk")
    update_interval: int = _help("Δt: optimizer steps between mask updates", 1000)
    prune_start_epoch: float = _help("t_0: epoch where gradual pruning (and updates) start", 0.0)
    prune_end_epoch: float = _help("t_f: epoch where gradual pruning reaches d_f", 80.0)
    prune_scope: str = _help("gradual prune: global (one threshold) or layerwise", "global")
    min_layer_density: float = _help(
        "per-layer density floor for global pruning (0: off, as in the RigL/GraNet papers)", 0.0
    )
    collapse_density: float = _help(
        "a layer at or below this density counts as collapsed: one warning per layer and the "
        "collapsed_layers metric (0: only layers with no active weight)", 0.0
    )
    regen_ratio: float = _help("r_0: initial regeneration ratio", 0.5)
    regen_min: float = _help("r_min: final regeneration ratio", 0.005)
    regen_decay: str = _help("regeneration decay: cosine, linear, constant", "cosine")
    regen_stop_at_prune_end: bool = _help(
        "stop regenerating at t_f (reference: keeps going)", False
    )
    growth: str | None = _help("growth score: gradient, random, momentum (None: method default)",
                               None)
    dense_layers: list[str] = _help(
        "layers kept dense: exact layer (module) or parameter names, or 'first' / 'last'",
        factory=list,
    )
    include: list[str] = _help(
        "parameter-name patterns masked besides the default rule (every matmul/conv weight): "
        "globs like '*.embed.weight', or regexes written 're:<regex>'; each must match a "
        "parameter", factory=list,
    )
    exclude: list[str] = _help(
        "parameter-name patterns kept dense (glob or 're:<regex>', whole name; wins over "
        "include); each must match a parameter", factory=list,
    )
    compat_floored_schedule: bool = _help(
        "reproduce the reference code's floored schedule grid (s_f approached, never set)", False
    )


@dataclass
class RunConfig:
    epochs: int = _help("training epochs", 160)
    seed: int = _help("seed for weights, data order and mask draws", 0)
    device: str = _help("auto, cpu or cuda", "auto")
    output_dir: str = _help("parent directory of run directories", "runs")
    bf16: bool = _help("CUDA only: bf16 autocast", False)
    channels_last: bool = _help("CUDA only: channels_last memory format for 4-D inputs", False)
    checkpoint_every: int = _help("save the resumable checkpoint every N epochs", 1)
    keep_epochs: list[int] = _help("epochs whose checkpoints are kept as ckpt-epoch<N>.pt",
                                   factory=list)
    dead_unit_eval: bool = _help("measure dead units on one evaluation batch each epoch", True)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    run: RunConfig = field(default_factory=RunConfig)


# --------------------------------------------------------------------------------------------
# dict <-> dataclass


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Check/convert ``value`` to the annotated type ``hint``; raise ConfigError otherwise."""
    origin = get_origin(hint)
    args = get_args(hint)
    if hint is Any:
        return value
    if origin is None and hint is type(None):
        if value is not None:
            raise ConfigError(f"{path}={value!r}: must be null")
        return None
    # Optional[X] / X | None
    if args and type(None) in args and origin is not list and origin is not dict:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner[0])
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}={value!r}: must be a boolean (true/false)")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}={value!r}: must be an integer")
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads exponents without a dot ("1e-3") as strings; accept any float literal.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}={value!r}: must be a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r}: must be a number")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{path}={value!r}: must be a finite number")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r}: must be a string")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r}: must be a list")
        return [_coerce(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}={value!r}: must be a mapping")
        return {str(k): v for k, v in value.items()}
    raise TypeError(f"unsupported annotation {hint!r} for {path}")


def _from_dict(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}={data!r}: must be a mapping")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        path = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(
            f"{path}={data[unknown[0]]!r}: unknown field; allowed: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        path = f"{prefix}.{f.name}" if prefix else f.name
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _from_dict(hint, data[f.name], path)
        else:
            kwargs[f.name] = _coerce(path, data[f.name], hint)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], cls: type = Config) -> Any:
    """Build a config dataclass from a nested dict (unknown keys and wrong types raise)."""
    return _from_dict(cls, data, "")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


# Where a run lives, not what it computes: left out of the hash, so the same experiment has the
# same hash under any output or data directory.
HASH_EXCLUDED = ("run.output_dir", "data.data_dir")


def _non_default(cfg: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    default = type(cfg)()
    for f in fields(cfg):
        path = f"{prefix}{f.name}"
        if path in HASH_EXCLUDED:
            continue
        value, ref = getattr(cfg, f.name), getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            sub = _non_default(value, f"{path}.")
            if sub:
                out[f.name] = sub
        elif value != ref:
            out[f.name] = value
    return out


def non_default_values(cfg: Any) -> dict[str, Any]:
    """The values of a config that differ from its defaults (nested; locations left out)."""
    return _non_default(cfg)


def config_hash(cfg: Any, length: int = 12) -> str:
    """Stable hash: SHA-256 of the canonical JSON of the non-default values (except the
    locations in ``HASH_EXCLUDED``)."""
    canon = json.dumps(_non_default(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:length]


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# --------------------------------------------------------------------------------------------
# overrides


def parse_override(text: str) -> tuple[str, Any]:
    """``'sparsity.final_density=0.05'`` -> ``('sparsity.final_density', 0.05)`` (YAML-typed)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. sparsity.final_density=0.05")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({exc})") from None
    return key, value


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type = Config) -> dict:
    """Apply dotted ``key=value`` overrides (YAML text) to a nested dict; unknown keys raise."""
    data = copy.deepcopy(data)
    for text in overrides:
        key, value = parse_override(text)
        _set_path(data, key, value, cls, f"--set {text!r}: ")
    return data


def set_values(data: dict[str, Any], values: dict[str, Any], cls: type = Config) -> dict:
    """Apply already-typed ``{"dotted.key": value}`` overrides to a nested dict (a copy).

    The one override path of granet besides :func:`apply_overrides` (which parses text first):
    study grids, search samples and method entries all go through it.
    """
    data = copy.deepcopy(data)
    for key, value in values.items():
        _set_path(data, key, value, cls, "")
    return data


def _set_path(data: dict[str, Any], key: str, value: Any, cls: type, where_: str) -> None:
    parts = key.split(".")
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        names = {f.name: f for f in fields(node_cls)}
        if part not in names:
            where = ".".join(parts[: i + 1])
            raise ConfigError(
                f"{where_}{where}: unknown field; allowed: {', '.join(sorted(names))}"
            )
        hint = get_type_hints(node_cls)[part]
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(hint):
            if last:
                raise ConfigError(
                    f"{where_}{key} is a group; set one of its fields, e.g. {key}.x=1"
                )
            if node.get(part) is None:  # absent, or an empty group ("optim:") in the file
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"{where}={node!r}: must be a mapping")
            node_cls = hint
        elif not last:
            raise ConfigError(
                f"{where_}{key}: {'.'.join(parts[: i + 1])} has no sub-fields"
            )
        else:
            node[part] = value


def read_yaml_mapping(path: str | Path | None, *, allow_empty: bool = True) -> dict[str, Any]:
    """The top-level mapping of a YAML file ({} for None); ConfigError otherwise.

    A file that is empty or holds only comments gives {} with ``allow_empty``, and a ConfigError
    without it: a config file that says nothing is more likely a mistake (a wrong or truncated
    file) than a request for the defaults, which is what omitting the file means.
    """
    if path is None:
        return {}
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {str(p)!r}: is a directory, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r}: not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r}: not UTF-8 text ({exc.reason} at byte "
                          f"{exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(p)!r}: cannot be read ({exc.strerror})") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r}: invalid YAML ({exc})") from None
    if loaded is None:
        if not allow_empty:
            raise ConfigError(
                f"config file {str(p)!r}: is empty (or holds only comments); to train the "
                f"defaults, omit the config file"
            )
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(p)!r}: top level must be a mapping")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or defaults), apply overrides, validate. Raises ConfigError."""
    data = apply_overrides(read_yaml_mapping(path, allow_empty=False), overrides or [])
    cfg = config_from_dict(data)
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# validation


def _choice(path: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r}: must be one of {', '.join(allowed)}")


def _range(path: str, value: float, lo: float, hi: float, *, lo_open=False, hi_open=False):
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ConfigError(f"{path}={value!r}: must be in {lb}{lo}, {hi}{rb}")


def _positive(path: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{path}={value!r}: must be > 0")


def _check_pattern(path: str, pattern: str) -> None:
    import re

    if not pattern or pattern == "re:":
        raise ConfigError(f"{path}={pattern!r}: must be a non-empty glob or 're:<regex>'")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise ConfigError(
                f"{path}={pattern!r}: must be a valid regular expression ({exc})"
            ) from None


def validate(cfg: Config) -> None:
    """Check every value and cross-field constraint; raise ConfigError on the first problem."""
    from granet.data import validate_data_name
    from granet.models import validate_model_name

    d, m, o, s, r = cfg.data, cfg.model, cfg.optim, cfg.sparsity, cfg.run
    # First: the milestone, warm-up and pruning-window checks below are relative to it.
    if r.epochs < 1:
        raise ConfigError(f"run.epochs={r.epochs!r}: must be >= 1")
    try:
        validate_data_name(d.name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not d.data_dir.strip():
        raise ConfigError(f"data.data_dir={d.data_dir!r}: must be a directory path")
    _range("data.val_fraction", d.val_fraction, 0.0, 1.0, hi_open=True)
    _positive("data.batch_size", d.batch_size)
    _positive("data.eval_batch_size", d.eval_batch_size)
    if d.num_samples is not None:
        _positive("data.num_samples", d.num_samples)
    try:
        validate_model_name(m.name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    _choice("optim.name", o.name, OPTIMIZERS)
    _positive("optim.lr", o.lr)
    _range("optim.momentum", o.momentum, 0.0, 1.0, hi_open=True)
    if o.nesterov and o.name == "sgd" and o.momentum == 0:
        raise ConfigError("optim.nesterov=True: needs optim.momentum > 0")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas={o.betas!r}: must be two numbers in [0, 1)")
    _range("optim.weight_decay", o.weight_decay, 0.0, 1.0)
    _choice("optim.schedule", o.schedule, LR_SCHEDULES)
    if any(b <= a for a, b in zip(o.milestones, o.milestones[1:], strict=False)):
        raise ConfigError(f"optim.milestones={o.milestones!r}: must be strictly increasing")
    if any(ms <= 0 or ms > r.epochs for ms in o.milestones) and o.schedule == "multistep":
        raise ConfigError(
            f"optim.milestones={o.milestones!r}: must lie in [1, run.epochs={r.epochs}]"
        )
    _range("optim.gamma", o.gamma, 0.0, 1.0, lo_open=True)
    if o.warmup_epochs < 0 or o.warmup_epochs >= max(r.epochs, 1):
        raise ConfigError(
            f"optim.warmup_epochs={o.warmup_epochs!r}: must be in [0, run.epochs={r.epochs})"
        )
    _range("optim.label_smoothing", o.label_smoothing, 0.0, 1.0, hi_open=True)

    _choice("sparsity.method", s.method, METHODS)
    _range("sparsity.init_density", s.init_density, 0.0, 1.0, lo_open=True)
    _range("sparsity.final_density", s.final_density, 0.0, 1.0, lo_open=True)
    if s.method in ("gmp", "granet") and s.final_density > s.init_density:
        raise ConfigError(
            f"sparsity.final_density={s.final_density!r}: must be <= sparsity.init_density="
            f"{s.init_density!r} for method {s.method}"
        )
    _choice("sparsity.distribution", s.distribution, DISTRIBUTIONS)
    if s.update_interval < 1:
        raise ConfigError(f"sparsity.update_interval={s.update_interval!r}: must be >= 1 step")
    _range("sparsity.prune_start_epoch", s.prune_start_epoch, 0.0, float(r.epochs))
    if s.method in ("gmp", "granet"):
        if not s.prune_start_epoch < s.prune_end_epoch <= r.epochs:
            raise ConfigError(
                f"sparsity.prune_end_epoch={s.prune_end_epoch!r}: must be in "
                f"(sparsity.prune_start_epoch={s.prune_start_epoch!r}, run.epochs={r.epochs}]"
            )
    _choice("sparsity.prune_scope", s.prune_scope, PRUNE_SCOPES)
    _range("sparsity.min_layer_density", s.min_layer_density, 0.0, 1.0)
    if s.min_layer_density > s.final_density:
        raise ConfigError(
            f"sparsity.min_layer_density={s.min_layer_density!r}: must be <= "
            f"sparsity.final_density={s.final_density!r}"
        )
    _range("sparsity.collapse_density", s.collapse_density, 0.0, 1.0, hi_open=True)
    for group in ("include", "exclude"):
        for i, pat in enumerate(getattr(s, group)):
            _check_pattern(f"sparsity.{group}[{i}]", pat)
    _range("sparsity.regen_ratio", s.regen_ratio, 0.0, 1.0)
    _range("sparsity.regen_min", s.regen_min, 0.0, 1.0)
    if s.regen_min > s.regen_ratio:
        raise ConfigError(
            f"sparsity.regen_min={s.regen_min!r}: must be <= sparsity.regen_ratio={s.regen_ratio!r}"
        )
    _choice("sparsity.regen_decay", s.regen_decay, REGEN_DECAYS)
    if s.growth is not None:
        _choice("sparsity.growth", s.growth, GROWTH)
    if s.growth == "momentum" and o.name == "sgd" and o.momentum == 0:
        raise ConfigError("sparsity.growth='momentum': needs optim.momentum > 0 (or adamw)")

    _choice("run.device", r.device, DEVICES)
    if r.checkpoint_every < 1:
        raise ConfigError(f"run.checkpoint_every={r.checkpoint_every!r}: must be >= 1")
    for e in r.keep_epochs:
        if not 0 <= e <= r.epochs:
            raise ConfigError(f"run.keep_epochs={r.keep_epochs!r}: each must be in [0, {r.epochs}]")
    if r.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("run.device='cuda': no CUDA device is available; use auto or cpu")
