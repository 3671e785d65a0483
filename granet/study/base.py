"""What every study shares: the config base, the typed trial contract, and the key rule.

A study YAML is a mapping of the study dataclass's fields; the base training config sits under
``train:`` (a :class:`granet.config.Config`). ``--set`` overrides are dotted paths into that
mapping (``--set ratios=[0.2,0.5]``, ``--set train.optim.lr=0.05``). :func:`load_study_config`
validates everything before any Ray or MLflow work: a bad value raises
:class:`granet.config.ConfigError` naming the field, the value and what is allowed (``field=value:
must ...``), and nothing is written.

The trial contract, :class:`TrialSpec` (with :class:`ProbeSpec` for plasticity probes), is a frozen
dataclass built by the study driver, sent to the Ray trainable as a plain dict and checked there by
:meth:`TrialSpec.from_dict` before any work: a missing or wrong field is a :class:`TrialSpecError`
naming it, not a ``KeyError`` inside a worker.

The key rule (:func:`trial_key`): SHA-256 of the canonical JSON of the trial's *non-default*
training values (as :func:`granet.config.config_hash`), its own identifying fields and its
parent's key. Adding a defaulted field to a config dataclass therefore re-keys nothing, and a
re-run of a finished study launches zero trials.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from granet.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    non_default_values,
    parse_override,
    read_yaml_mapping,
    set_values,
    validate,
)

__all__ = [
    "PACK_MODES",
    "PackedTrial",
    "ProbeSpec",
    "StudyConfig",
    "TrialContext",
    "TrialSpec",
    "TrialSpecError",
    "build_train_config",
    "is_packed",
    "load_study_config",
    "pack_key",
    "study_to_dict",
    "trial_key",
    "validate_train",
]

S = TypeVar("S", bound="StudyConfig")

_GROUPS = ("data.", "model.", "optim.", "sparsity.", "run.")
_TRACKING_SCHEMES = ("sqlite:////", "http://", "https://", "postgresql", "mysql", "databricks")


@dataclass
class StudyConfig:
    """Fields every study YAML shares. Each study extends it (dataclass inheritance)."""

    kind: ClassVar[str] = "study"

    name: str = "study"
    study_dir: str = ""  # "" -> studies_out/<name> (made absolute at load time)
    train: Config = field(default_factory=Config)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0
    max_failures: int = 2
    tracking_uri: str | None = None
    experiment: str = "granet"
    seeds: list[int] = field(default_factory=lambda: [0])

    # ------------------------------------------------------------------ hooks
    def smoke(self: S) -> S:
        """A tiny version for ``--smoke-test``. Its own name (``<name>-smoke``) and therefore its
        own study directory: a smoke run never touches the real study's results."""
        out = copy.deepcopy(self)
        out.seeds = out.seeds[:1]
        if not out.name.endswith("-smoke"):
            out.name = f"{out.name}-smoke"
        return out

    def check(self) -> None:
        """Validate the common fields and ``train`` (subclasses extend and call super().check(),
        or call check_common() and validate their own derived training configs)."""
        self.check_common()
        validate_train(self.train)

    def check_common(self) -> None:
        """Validate the fields of StudyConfig except ``train``."""
        if not self.name or any(c in self.name for c in "/\\ ") or self.name.startswith("."):
            raise ConfigError(
                f"name={self.name!r}: must be non-empty, without spaces or slashes, not starting "
                "with '.'"
            )
        if not math.isfinite(self.cpus_per_trial) or self.cpus_per_trial <= 0:
            raise ConfigError(f"cpus_per_trial={self.cpus_per_trial!r}: must be > 0")
        if not math.isfinite(self.gpus_per_trial) or self.gpus_per_trial < 0:
            raise ConfigError(f"gpus_per_trial={self.gpus_per_trial!r}: must be >= 0")
        if self.gpus_per_trial > 1 and not float(self.gpus_per_trial).is_integer():
            raise ConfigError(
                f"gpus_per_trial={self.gpus_per_trial!r}: must be a whole number above 1 "
                "(fractions only below 1, e.g. 0.25)"
            )
        if self.max_concurrent < 0:
            raise ConfigError(f"max_concurrent={self.max_concurrent!r}: must be >= 0 (0: auto)")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures={self.max_failures!r}: must be >= 0")
        if not self.seeds:
            raise ConfigError("seeds=[]: must hold at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={self.seeds!r}: must not repeat")
        if not self.experiment or not self.experiment.strip():
            raise ConfigError(f"experiment={self.experiment!r}: must be a non-empty name")
        if self.tracking_uri is not None:
            check_tracking_uri_form(self.tracking_uri, "tracking_uri")

    # ------------------------------------------------------------------ what a study defines
    def trial_configs(self) -> list[Config]:
        """Every distinct training config the study will run (validated up front, and the
        user's model/data code is tried once on each distinct model/data pair)."""
        return [self.train]

    def plan(self, run: Any) -> Any:
        """Yield the stages to run (:mod:`granet.study.stages`), one at a time: the driver runs
        each to its end before asking for the next."""
        raise NotImplementedError

    def summarize(self, run: Any) -> dict[str, Any]:
        """Write the study's own outputs; return ``{"files": [...], "metrics": {...}, ...}``
        (files and metrics go to the parent MLflow run, the rest into the summary)."""
        raise NotImplementedError

    def pack_trials(self, stage: str, trials: list[TrialSpec]) -> list[TrialSpec | PackedTrial]:
        """How the driver launches a grid stage's trials: each alone (the default), or some of
        them together as one Tune trial (:class:`PackedTrial`: plasticity probes of one trunk
        checkpoint). Packing changes no key, row or MLflow run: only how many Tune trials
        carry them."""
        return list(trials)

    def parent_params(self) -> dict[str, Any]:
        """What the parent MLflow run logs as params: the study's fields and the base config's
        non-default values (not every default)."""
        out = {k: v for k, v in study_to_dict(self).items() if k != "train"}
        out["train"] = non_default_values(self.train)
        return out


def check_tracking_uri_form(uri: str, where: str) -> None:
    """The form of an MLflow tracking URI (reachability is checked by the driver)."""
    if not isinstance(uri, str) or not uri.startswith(_TRACKING_SCHEMES):
        raise ConfigError(
            f"{where}={uri!r}: must be an absolute sqlite:////abs/path.db, an http(s):// "
            "server or a database URI (postgresql://, mysql://)"
        )


def validate_train(cfg: Config, prefix: str = "train") -> None:
    """granet.config.validate with the field paths prefixed (``train.optim.lr=...``)."""
    try:
        validate(cfg)
    except ConfigError as exc:
        msg = str(exc)
        if msg.startswith(_GROUPS):
            msg = f"{prefix}.{msg}"
        raise ConfigError(msg) from None


def build_train_config(data: dict[str, Any], sets: dict[str, Any] | None = None) -> Config:
    """Build and validate a Config from a nested dict and optional typed dotted overrides."""
    if sets:
        data = set_values(data, sets)
    cfg = config_from_dict(data)
    validate(cfg)
    return cfg


def _apply_study_overrides(data: dict[str, Any], overrides: list[str], cls: type) -> dict:
    data = copy.deepcopy(data)
    names = {f.name for f in fields(cls)}
    train_over: list[str] = []
    for text in overrides:
        key, value = parse_override(text)
        top, _, rest = key.partition(".")
        if top not in names:
            raise ConfigError(f"{top}: unknown field; allowed: {', '.join(sorted(names))}")
        if top == "train":
            if not rest:
                raise ConfigError(
                    "train: is a group; set one of its fields, e.g. train.optim.lr=0.1"
                )
            train_over.append(f"{rest}={text.split('=', 1)[1]}")
        elif rest:
            raise ConfigError(f"{key}: {top} has no sub-fields")
        else:
            data[top] = value
    if train_over:
        try:
            data["train"] = apply_overrides(data.get("train") or {}, train_over)
        except ConfigError as exc:
            raise ConfigError(f"train.{exc}" if str(exc).startswith(_GROUPS) else str(exc)) \
                from None
    return data


def load_study_config(
    cls: type[S],
    path: str | Path | None,
    overrides: list[str] | None = None,
    smoke_test: bool = False,
    tracking_uri: str | None = None,
) -> S:
    """Read a study YAML (or defaults), apply overrides, shrink for smoke tests, validate.

    Raises :class:`ConfigError` on any problem; reads files only, writes nothing.
    """
    data = read_yaml_mapping(path, allow_empty=False)
    overrides = list(overrides or [])
    study = config_from_dict(_apply_study_overrides(data, overrides, cls), cls)
    if smoke_test:  # shrink, then apply the overrides again: they win over the smoke grid
        small = study_to_dict(study.smoke())
        if any(o.startswith("train.model.name=") for o in overrides):
            # a new model does not take the smoke preset's kwargs (those belong to its model)
            small["train"]["model"]["kwargs"] = {}
        study = config_from_dict(_apply_study_overrides(small, overrides, cls), cls)
    if tracking_uri:
        check_tracking_uri_form(tracking_uri, "--tracking-uri")
        study.tracking_uri = tracking_uri
    from granet.study.storage import is_uri, study_path

    if not study.study_dir:
        study.study_dir = str(Path("studies_out") / study.name)
    elif smoke_test and not any(o.startswith("study_dir=") for o in overrides):
        # the smoke run of a study with an explicit study_dir gets a sibling directory
        root = study_path(study.study_dir)  # a URI: its scheme and bucket are checked here
        study.study_dir = str(root.with_name(root.name + "-smoke"))
    if is_uri(study.study_dir):  # s3://, gs://...: checked here, reached in run_study
        study.study_dir = str(study_path(study.study_dir))
    else:
        study.study_dir = str(study_path(study.study_dir).expanduser().resolve())
    study.check()
    return study


def study_to_dict(study: Any) -> dict[str, Any]:
    """Plain dict of a study dataclass (the nested train config included)."""
    out = dataclasses.asdict(study)
    out["train"] = config_to_dict(study.train)
    return out


# ---------------------------------------------------------------------------------- keys


def trial_key(train: Config, own: dict[str, Any], parent: str | None = None,
              length: int = 16) -> str:
    """The key of a trial: SHA-256 of the canonical JSON of the non-default values of its
    training config, its own identifying fields and its parent's key (16 hex characters)."""
    canon = json.dumps(
        {"train": non_default_values(train), "own": own, "parent": parent},
        sort_keys=True, separators=(",", ":"), default=str,
    )
    return hashlib.sha256(canon.encode()).hexdigest()[:length]


# ---------------------------------------------------------------------------------- trial contract


class TrialSpecError(ValueError):
    """A trial dict that does not satisfy the :class:`TrialSpec` contract."""


def _require(data: dict[str, Any], name: str, types: tuple[type, ...], where: str,
             optional: bool = False) -> Any:
    if name not in data:
        if optional:
            return None
        raise TrialSpecError(f"{where}.{name}: missing (a granet trial needs it)")
    value = data[name]
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in types:
        raise TrialSpecError(f"{where}.{name}={value!r}: must be {types[0].__name__}")
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise TrialSpecError(f"{where}.{name}={value!r}: must be {names}")
    return value


def _known_fields(cls: type, data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise TrialSpecError(f"{where}={data!r}: must be a mapping")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise TrialSpecError(f"{where}.{unknown[0]}: unknown field")


@dataclass(frozen=True)
class ProbeSpec:
    """A plasticity probe: where it branches from and what it does at the branch.

    ``trunk_ckpt`` is the trunk's full checkpoint at ``epoch_t``; ``lr_t``, ``acc_before`` and
    ``trunk_final_acc`` come from the finished trunk (its epochs table)."""

    trunk_key: str
    trunk_ckpt: str
    kind: str  # "plasticity" | "gap"
    epoch_t: int
    ratio: float
    regen: bool
    scope: str
    structure: str
    k: int
    regrow_mode: str
    lr_t: float
    acc_before: float
    trunk_final_acc: float
    trunk_method: str
    trunk_density: float
    seed: int
    model: str

    @classmethod
    def from_dict(cls, data: Any) -> ProbeSpec:
        where = "trial.probe"
        _known_fields(cls, data, where)
        num = (int, float)
        kw = {
            "trunk_key": _require(data, "trunk_key", (str,), where),
            "trunk_ckpt": _require(data, "trunk_ckpt", (str,), where),
            "kind": _require(data, "kind", (str,), where),
            "epoch_t": _require(data, "epoch_t", (int,), where),
            "ratio": float(_require(data, "ratio", num, where)),
            "regen": _require(data, "regen", (bool,), where),
            "scope": _require(data, "scope", (str,), where),
            "structure": _require(data, "structure", (str,), where),
            "k": _require(data, "k", (int,), where),
            "regrow_mode": _require(data, "regrow_mode", (str,), where),
            "lr_t": float(_require(data, "lr_t", num, where)),
            "acc_before": float(_require(data, "acc_before", num, where)),
            "trunk_final_acc": float(_require(data, "trunk_final_acc", num, where)),
            "trunk_method": _require(data, "trunk_method", (str,), where),
            "trunk_density": float(_require(data, "trunk_density", num, where)),
            "seed": _require(data, "seed", (int,), where),
            "model": _require(data, "model", (str,), where),
        }
        if kw["kind"] not in ("plasticity", "gap"):
            raise TrialSpecError(f"{where}.kind={kw['kind']!r}: must be plasticity or gap")
        if not 0.0 < kw["ratio"] < 1.0:
            raise TrialSpecError(f"{where}.ratio={kw['ratio']!r}: must be in (0, 1)")
        return cls(**kw)


@dataclass(frozen=True)
class TrialSpec:
    """One trial: what to train and where its results belong.

    Identity (hashed into ``key``): ``train`` (non-default values), ``own`` and ``parent_key``.
    Everything else describes the trial for tables and MLflow (``labels``: study-level fields
    such as the method label or the probe's ratio, logged as params and as ``spec_json``).
    Search trials carry ``sets``: the sampled ``{"dotted.key": value}`` overrides applied on top
    of ``train`` (their key is derived from them).
    """

    key: str
    stage: str
    study: str
    train: dict[str, Any]
    parent_key: str | None = None
    run_name: str = ""
    labels: dict[str, Any] = field(default_factory=dict)
    save_epochs: tuple[int, ...] = ()
    probe: ProbeSpec | None = None
    sets: dict[str, Any] = field(default_factory=dict)
    log_model: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["save_epochs"] = list(self.save_epochs)
        return out

    def config(self) -> Config:
        """The validated training config (``train`` with ``sets`` applied)."""
        try:
            return build_train_config(self.train, self.sets)
        except ConfigError as exc:
            raise TrialSpecError(f"trial {self.key}: train: {exc}") from None

    @classmethod
    def from_dict(cls, data: Any) -> TrialSpec:
        """Check a trial dict (as Tune hands it to the trainable) against the contract."""
        where = "trial"
        _known_fields(cls, data, where)
        probe = data.get("probe")
        save = _require(data, "save_epochs", (list, tuple), where, optional=True) or ()
        if not all(isinstance(e, int) and not isinstance(e, bool) and e >= 1 for e in save):
            raise TrialSpecError(f"{where}.save_epochs={save!r}: must be epochs >= 1")
        spec = cls(
            key=_require(data, "key", (str,), where),
            stage=_require(data, "stage", (str,), where),
            study=_require(data, "study", (str,), where),
            train=_require(data, "train", (dict,), where),
            parent_key=_require(data, "parent_key", (str,), where, optional=True),
            run_name=_require(data, "run_name", (str,), where, optional=True) or "",
            labels=_require(data, "labels", (dict,), where, optional=True) or {},
            save_epochs=tuple(save),
            probe=ProbeSpec.from_dict(probe) if probe is not None else None,
            sets=_require(data, "sets", (dict,), where, optional=True) or {},
            log_model=bool(_require(data, "log_model", (bool,), where, optional=True)),
        )
        if not spec.key or any(c in spec.key for c in "/\\ "):
            raise TrialSpecError(f"{where}.key={spec.key!r}: must be a non-empty file-safe name")
        return spec


@dataclass(frozen=True)
class TrialContext:
    """Where a trial writes (not part of its identity): the study directory, the MLflow parent
    run, torch threads. Sent to the trainable beside the TrialSpec."""

    study_dir: str
    tracking: dict[str, str] | None = None  # {"uri", "experiment_id", "parent_run_id"}
    num_threads: int = 1
    # Send each epoch's metrics to MLflow at once (a scheduler may stop a trial, and its actor,
    # at any report). False (grid stages): batched until the next Tune checkpoint, which is where
    # an interrupted trial resumes and logs the rest.
    mlflow_every_epoch: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> TrialContext:
        where = "context"
        if not isinstance(data, dict):
            raise TrialSpecError(f"{where}={data!r}: must be a mapping")
        study_dir = _require(data, "study_dir", (str,), where)
        if not os.path.isabs(study_dir) and "://" not in study_dir:
            raise TrialSpecError(f"{where}.study_dir={study_dir!r}: must be an absolute path "
                                 "or a storage URI")
        tracking = _require(data, "tracking", (dict,), where, optional=True)
        if tracking is not None:
            for k in ("uri", "experiment_id", "parent_run_id"):
                _require(tracking, k, (str,), f"{where}.tracking")
        threads = _require(data, "num_threads", (int,), where, optional=True) or 1
        every = _require(data, "mlflow_every_epoch", (bool,), where, optional=True)
        return cls(study_dir=study_dir, tracking=tracking, num_threads=max(1, threads),
                   mlflow_every_epoch=True if every is None else every)


# ---------------------------------------------------------------------------------- packed trials

PACK_MODES = ("loop", "vmap")


def pack_key(keys: list[str] | tuple[str, ...]) -> str:
    """The Tune-side name of a pack: ``pack-`` + 12 hex characters of SHA-256 of its sorted
    member keys (the members keep their own keys; this one names no result)."""
    return "pack-" + hashlib.sha256(",".join(sorted(keys)).encode()).hexdigest()[:12]


def is_packed(data: Any) -> bool:
    """Whether a Tune config's ``trial`` dict is a :class:`PackedTrial`."""
    return isinstance(data, dict) and "members" in data


@dataclass(frozen=True)
class PackedTrial:
    """Trials trained together in one Tune trial, one data pass per batch
    (:class:`granet.pack.ProbePack`): plasticity probes branched from the same trunk checkpoint,
    with the same training config. Each member keeps its key, its Parquet rows and its MLflow run;
    ``key`` (:func:`pack_key`) only names the Tune trial and its directory. ``mode``: "loop"
    (bit-identical to the members trained one by one) or "vmap" (one batched model; within
    floating-point tolerance)."""

    key: str
    stage: str
    members: tuple[TrialSpec, ...]
    mode: str = "loop"
    run_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "stage": self.stage, "mode": self.mode,
                "run_name": self.run_name, "members": [m.to_dict() for m in self.members]}

    @classmethod
    def of(cls, members: list[TrialSpec], mode: str = "loop", run_name: str = "") -> PackedTrial:
        """A pack of ``members`` (checked as :meth:`from_dict` checks it)."""
        return cls.from_dict({"key": pack_key([m.key for m in members]),
                              "stage": members[0].stage if members else "", "mode": mode,
                              "run_name": run_name, "members": [m.to_dict() for m in members]})

    @classmethod
    def from_dict(cls, data: Any) -> PackedTrial:
        """Check a packed trial dict: every member a valid TrialSpec, all of one stage with one
        training config and (probes) one trunk checkpoint, no key twice."""
        where = "trial"
        if not isinstance(data, dict):
            raise TrialSpecError(f"{where}={data!r}: must be a mapping")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise TrialSpecError(f"{where}.{unknown[0]}: unknown field")
        raw = _require(data, "members", (list, tuple), where)
        if not raw:
            raise TrialSpecError(f"{where}.members=[]: a pack needs at least one trial")
        members = tuple(TrialSpec.from_dict(m) for m in raw)
        mode = _require(data, "mode", (str,), where, optional=True) or "loop"
        if mode not in PACK_MODES:
            raise TrialSpecError(f"{where}.mode={mode!r}: must be one of {', '.join(PACK_MODES)}")
        stage = _require(data, "stage", (str,), where)
        lead = members[0]
        keys = [m.key for m in members]
        if len(set(keys)) != len(keys):
            raise TrialSpecError(f"{where}.members: key {keys[0]!r} given twice")
        for m in members:
            if m.stage != stage:
                raise TrialSpecError(f"{where}.members: trial {m.key} is of stage {m.stage!r}, "
                                     f"the pack of {stage!r}")
            if m.train != lead.train or m.sets != lead.sets:
                raise TrialSpecError(f"{where}.members: trial {m.key} has another training "
                                     f"config than {lead.key}; packed trials share one")
            ckpt = m.probe.trunk_ckpt if m.probe else None
            if ckpt != (lead.probe.trunk_ckpt if lead.probe else None):
                raise TrialSpecError(f"{where}.members: trial {m.key} branches from another "
                                     f"checkpoint than {lead.key}")
        key = _require(data, "key", (str,), where)
        if key != pack_key(keys):
            raise TrialSpecError(f"{where}.key={key!r}: must be {pack_key(keys)!r} (pack_key of "
                                 "its members)")
        return cls(key=key, stage=stage, members=members, mode=mode,
                   run_name=_require(data, "run_name", (str,), where, optional=True) or "")
