"""What every study YAML shares (:class:`StudyCommon`), loading + validation, trial keys.

A study YAML is a mapping of the study dataclass's fields; the base training config sits under
``train:`` (a :class:`granet.config.Config`). ``--set`` overrides are dotted paths into that
mapping (``--set ratios=[0.2,0.5]``, ``--set train.optim.lr=0.05``). Everything is validated by
:func:`load_study_config` before any Ray or MLflow work: a bad value raises
:class:`granet.config.ConfigError` naming the field, the value and what is allowed, and nothing
is written.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from granet.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    parse_override,
    read_yaml_mapping,
    validate,
)

__all__ = [
    "StudyCommon",
    "load_study_config",
    "study_to_dict",
    "trial_key",
    "resolve_tracking_uri",
    "validate_train",
]

S = TypeVar("S", bound="StudyCommon")

_GROUPS = ("data.", "model.", "optim.", "sparsity.", "run.")


@dataclass
class StudyCommon:
    """Fields every study YAML shares (see API.md)."""

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
        """A tiny version for ``--smoke-test`` (subclasses shrink their grids further)."""
        out = copy.deepcopy(self)
        out.seeds = out.seeds[:1]
        return out

    def check(self) -> None:
        """Validate the common fields and ``train`` (subclasses extend and call super().check(),
        or call check_common() and validate their own derived training configs)."""
        self.check_common()
        validate_train(self.train)

    def check_common(self) -> None:
        """Validate the fields of StudyCommon except ``train``."""
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ConfigError(f"name={self.name!r}: must be non-empty, without spaces or slashes")
        if self.cpus_per_trial <= 0:
            raise ConfigError(f"cpus_per_trial={self.cpus_per_trial!r}: must be > 0")
        if self.gpus_per_trial < 0:
            raise ConfigError(f"gpus_per_trial={self.gpus_per_trial!r}: must be >= 0")
        if self.gpus_per_trial > 1 and not float(self.gpus_per_trial).is_integer():
            raise ConfigError(
                f"gpus_per_trial={self.gpus_per_trial!r}: fractions only below 1 (e.g. 0.25)"
            )
        if self.max_concurrent < 0:
            raise ConfigError(f"max_concurrent={self.max_concurrent!r}: must be >= 0 (0: auto)")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures={self.max_failures!r}: must be >= 0")
        if not self.seeds:
            raise ConfigError("seeds=[]: needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={self.seeds!r}: must not repeat")
        if self.tracking_uri is not None and not self.tracking_uri.startswith(
            ("sqlite:////", "http://", "https://", "postgresql", "mysql", "databricks")
        ):
            raise ConfigError(
                f"tracking_uri={self.tracking_uri!r}: must be an absolute sqlite:////abs/path.db, "
                "http(s):// server or database URI"
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
            raise ConfigError(f"train.{exc}") from None
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
    data = read_yaml_mapping(path)
    overrides = list(overrides or [])
    study = config_from_dict(_apply_study_overrides(data, overrides, cls), cls)
    if smoke_test:  # shrink, then apply the overrides again: they win over the smoke grid
        small = study_to_dict(study.smoke())
        study = config_from_dict(_apply_study_overrides(small, overrides, cls), cls)
    if tracking_uri:
        study.tracking_uri = tracking_uri
    if not study.study_dir:
        study.study_dir = str(Path("studies_out") / study.name)
    study.study_dir = str(Path(study.study_dir).expanduser().resolve())
    study.check()
    return study


def study_to_dict(study: Any) -> dict[str, Any]:
    """Plain dict of a study dataclass (the nested train config included)."""
    out = dataclasses.asdict(study)
    out["train"] = config_to_dict(study.train)
    return out


def trial_key(payload: Any, parent: str | None = None, length: int = 16) -> str:
    """Stable key of a trial: SHA-256 of the canonical JSON of its payload and its parent's key."""
    canon = json.dumps({"parent": parent, "payload": payload}, sort_keys=True,
                       separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:length]


def resolve_tracking_uri(study: StudyCommon) -> str:
    """study.tracking_uri (or --tracking-uri), else MLFLOW_TRACKING_URI, else the study's sqlite."""
    if study.tracking_uri:
        return study.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        if env.startswith("sqlite:///") and not env.startswith("sqlite:////"):
            # relative sqlite path: pin it to the driver's cwd (workers run elsewhere)
            return "sqlite:///" + str(Path(env[len("sqlite:///"):]).resolve())
        return env
    return "sqlite:///" + str(Path(study.study_dir).resolve() / "mlflow.db")


def train_config(data: dict[str, Any], sets: dict[str, Any] | None = None) -> Config:
    """Build + validate a Config from a nested dict and optional dotted overrides."""
    if sets:
        data = apply_overrides(
            data, [f"{k}={json.dumps(v)}" for k, v in sets.items()]
        )
    cfg = config_from_dict(data)
    validate(cfg)
    return cfg
