"""Search study: Optuna (through Ray Tune's ``OptunaSearch``) over GraNet's knobs.

The space is define-by-run (:class:`SpaceFunction`, a picklable callable taking an
``optuna.Trial``) so conditional knobs stay conditional: ``regen_min`` is only sampled when the
decay is not ``constant`` (and never above the sampled ``r_0``), the pruning window's end is
sampled above its start. Parameter names use the trainable's override form
``set:<dotted.key>`` so they map 1:1 to :class:`granet.config.Config` fields.

- Optional ASHA early stopping; stopped trials are told to Optuna as ``PRUNED`` (not
  ``COMPLETE`` with a truncated value) by :class:`PrunedAwareOptunaSearch`.
- Optional multi-objective search (``[metric, train_flops]``, ``[mode, min]``); the Pareto front
  (``study.best_trials``) is reported.
- Optuna storage: ``sqlite:////<abs study_dir>/optuna.db`` by default (optuna-dashboard opens
  it), any RDB URL through ``storage``.
- Resume: the Optuna study is reopened by name; COMPLETE + PRUNED trials are counted and only the
  rest are asked for, so an interrupted search ends with exactly ``num_samples`` finished
  trials. Trials left RUNNING by an interrupted pass are marked FAIL (and re-asked).
  (``Tuner.restore`` is not used here: it would pin ``num_samples`` to the first pass.)
- Outputs in the study directory: ``best_config.yaml`` (a plain granet config: ``granet train
  best_config.yaml`` runs it as is), ``search_summary.json`` and the Parquet snapshot of the
  Optuna study, table ``search`` (schema :data:`SEARCH_SCHEMA`), read by the report.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from granet.config import (
    GROWTH,
    REGEN_DECAYS,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_yaml,
    validate,
)
from granet.study.common import StudyCommon, load_study_config

__all__ = [
    "KNOBS",
    "SEARCH_SCHEMA",
    "PrunedAwareOptunaSearch",
    "SearchStudy",
    "SpaceFunction",
    "apply_set_overrides",
    "best_config",
    "load_search_config",
    "optuna_storage",
    "prepare_optuna_study",
    "run_search_study",
    "search_schema",
    "search_table",
]

STAGE = "search"

# knob name in the YAML ``space`` -> (config field, kind)
KNOBS: dict[str, tuple[str, str]] = {
    "regen_ratio": ("sparsity.regen_ratio", "float"),
    "regen_decay": ("sparsity.regen_decay", "choice"),
    "regen_min": ("sparsity.regen_min", "float"),
    "update_interval": ("sparsity.update_interval", "int"),
    "prune_start_epoch": ("sparsity.prune_start_epoch", "float"),
    "prune_end_epoch": ("sparsity.prune_end_epoch", "float"),
    "init_density": ("sparsity.init_density", "float"),
    "growth": ("sparsity.growth", "choice"),
}
# Metrics a search may optimise: keys of the trainer's epoch record.
METRICS = (
    "best_val_acc", "val_acc", "val_loss", "test_at_best_val", "test_acc", "train_loss",
    "train_acc",
)
SECOND_OBJECTIVES = ("train_flops", "inference_flops")
SCHEDULERS = ("none", "asha")
SAMPLERS = ("tpe", "random")


def _default_space() -> dict[str, Any]:
    return {
        "regen_ratio": {"low": 0.1, "high": 0.9},
        "regen_decay": {"choices": ["cosine", "linear", "constant"]},
        "regen_min": {"low": 0.0, "high": 0.05},
        "update_interval": {"low": 10, "high": 1000, "log": True},
        "prune_start_epoch": {"low": 0.0, "high": 10.0},
        "prune_end_epoch": {"low": 20.0, "high": 80.0},
        "init_density": {"choices": [1.0, 0.5]},
        "growth": {"choices": ["gradient", "momentum"]},
    }


@dataclass
class SearchStudy(StudyCommon):
    """A search study: ``StudyCommon`` plus the search's own fields."""

    num_samples: int = 20
    metric: str = "best_val_acc"
    mode: str = "max"
    multi_objective: bool = False
    second_objective: str = "train_flops"  # minimised when multi_objective
    scheduler: str = "none"  # none | asha
    asha_grace_period: int = 1
    asha_reduction_factor: float = 2.0
    sampler: str = "tpe"  # tpe | random
    sampler_seed: int = 0
    n_startup_trials: int = 5
    storage: str | None = None  # None -> sqlite:////<abs study_dir>/optuna.db
    optuna_study_name: str | None = None  # None -> name
    prune_min_window: float = 1.0  # epochs between sampled window start and end
    space: dict[str, Any] = field(default_factory=_default_space)

    def smoke(self) -> SearchStudy:
        """A tiny version: 1000 MNIST-1D samples, mlp, 2 epochs, 3 trials."""
        new = super().smoke()
        tr = new.train
        tr.data.name, tr.data.num_samples, tr.data.batch_size = "mnist1d", 1000, 32
        tr.optim.name, tr.optim.lr = "sgd", 0.1
        tr.model.name, tr.model.kwargs = "mlp", {"hidden": [64, 64]}
        tr.run.epochs, tr.run.device, tr.run.dead_unit_eval = 2, "cpu", False
        tr.optim.milestones, tr.optim.schedule = [1], "multistep"
        tr.sparsity.method, tr.sparsity.final_density = "granet", 0.1
        tr.sparsity.prune_start_epoch, tr.sparsity.prune_end_epoch = 0.0, 1.0
        tr.sparsity.update_interval = 8
        new.num_samples = min(new.num_samples, 3)
        new.asha_grace_period = 1
        new.n_startup_trials = 2
        new.prune_min_window = 0.5
        new.space = {
            "regen_ratio": {"low": 0.1, "high": 0.9},
            "regen_decay": {"choices": ["cosine", "constant"]},
            "regen_min": {"low": 0.0, "high": 0.05},
            "update_interval": {"low": 2, "high": 16, "log": True},
            "prune_start_epoch": {"low": 0.0, "high": 0.5},
            "prune_end_epoch": {"low": 1.0, "high": 2.0},
            "init_density": {"choices": [1.0, 0.5]},
            "growth": {"choices": ["gradient", "random"]},
        }
        return new

    def check(self) -> None:
        """StudyCommon's checks, the search fields, and a pre-flight of the space."""
        super().check()
        _check_fields(self)
        check_space(self)


# --------------------------------------------------------------------------------------------
# config helpers


def apply_set_overrides(train: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Apply ``{"set:a.b": v}`` entries to a nested train-config dict (others are ignored)."""
    out = copy.deepcopy(train)
    for key, value in params.items():
        if not key.startswith("set:"):
            continue
        parts = key[4:].split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _cfg_with(train: Config, params: dict[str, Any]) -> Config:
    cfg = config_from_dict(apply_set_overrides(config_to_dict(train), params))
    validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------------
# the space


def _check_spec(name: str, spec: Any, kind: str) -> None:
    where = f"space.{name}"
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise ConfigError(
            f"{where}={spec!r}: must be null (not searched), {{low, high[, log, step]}} "
            "or {choices: [...]}"
        )
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        if extra:
            raise ConfigError(f"{where}.{extra[0]}: unknown key next to choices; allowed: choices")
        ch = spec["choices"]
        if not isinstance(ch, list) or not ch:
            raise ConfigError(f"{where}.choices={ch!r}: must be a non-empty list")
        if name == "regen_decay":
            for c in ch:
                if c not in REGEN_DECAYS:
                    raise ConfigError(
                        f"{where}.choices: {c!r} must be one of {', '.join(REGEN_DECAYS)}"
                    )
        if name == "growth":
            for c in ch:
                if c not in GROWTH:
                    raise ConfigError(f"{where}.choices: {c!r} must be one of {', '.join(GROWTH)}")
        return
    if kind == "choice":
        raise ConfigError(f"{where}={spec!r}: a categorical knob needs {{choices: [...]}}")
    extra = sorted(set(spec) - {"low", "high", "log", "step"})
    if extra:
        raise ConfigError(f"{where}.{extra[0]}: unknown key; allowed: high, log, low, step")
    for k in ("low", "high"):
        v = spec.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{where}.{k}={v!r}: must be a finite number")
        if kind == "int" and not float(v).is_integer():
            raise ConfigError(f"{where}.{k}={v!r}: must be an integer")
    if spec["low"] > spec["high"]:
        raise ConfigError(f"{where}.low={spec['low']!r}: must be <= high={spec['high']!r}")
    if spec.get("log") and spec["low"] <= 0:
        raise ConfigError(f"{where}.low={spec['low']!r}: must be > 0 with log: true")
    if not isinstance(spec.get("log", False), bool):
        raise ConfigError(f"{where}.log={spec['log']!r}: must be a boolean")


def _ranges(name: str, lo: float, hi: float, allowed: tuple[float, float]) -> None:
    if lo < allowed[0] or hi > allowed[1]:
        raise ConfigError(
            f"space.{name}=[{lo!r}, {hi!r}]: must lie in [{allowed[0]}, {allowed[1]}]"
        )


class SpaceFunction:
    """The define-by-run space (picklable: Tune checkpoints the searcher with pickle).

    ``__call__(trial)`` samples the knobs through ``trial.suggest_*`` (names ``set:<key>``) and
    returns the derived, non-sampled overrides (e.g. ``regen_min`` clipped to ``r_0``) plus the
    trial's ``trial_key``. Call it with ``optuna.trial.FixedTrial(params)`` to rebuild the full
    override dict of a finished trial.
    """

    def __init__(self, space: dict[str, Any], base: dict[str, Any], min_window: float,
                 study: str) -> None:
        self.space = copy.deepcopy(space)
        self.base = copy.deepcopy(base)  # the base train config (nested dict)
        self.min_window = float(min_window)
        self.study = study
        self.generation = "0"  # token of the Optuna study (see prepare_optuna_study)

    def _suggest(self, trial: Any, name: str, *, low: float | None = None,
                 high: float | None = None) -> Any:
        spec = self.space[name]
        key, kind = KNOBS[name]
        pname = f"set:{key}"
        if "choices" in spec:
            return trial.suggest_categorical(pname, list(spec["choices"]))
        lo = spec["low"] if low is None else low
        hi = spec["high"] if high is None else high
        if kind == "int":
            return trial.suggest_int(pname, int(lo), int(hi), log=bool(spec.get("log", False)),
                                     step=int(spec.get("step", 1)))
        step = spec.get("step")
        if step is not None and not spec.get("log"):
            return trial.suggest_float(pname, float(lo), float(hi), step=float(step))
        return trial.suggest_float(pname, float(lo), float(hi), log=bool(spec.get("log", False)))

    def _on(self, name: str) -> bool:
        return self.space.get(name) is not None

    def __call__(self, trial: Any) -> dict[str, Any]:
        sp = self.base["sparsity"]
        epochs = float(self.base["run"]["epochs"])
        derived: dict[str, Any] = {}
        r0 = self._suggest(trial, "regen_ratio") if self._on("regen_ratio") else sp["regen_ratio"]
        decay = (
            self._suggest(trial, "regen_decay") if self._on("regen_decay") else sp["regen_decay"]
        )
        if decay != "constant" and self._on("regen_min"):
            spec = self.space["regen_min"]
            hi = min(float(spec["high"]), float(r0))
            lo = min(float(spec["low"]), hi)
            self._suggest(trial, "regen_min", low=lo, high=hi)
        elif sp["regen_min"] > r0:
            derived["set:sparsity.regen_min"] = float(r0)  # keep r_min <= r_0 valid
        if self._on("update_interval"):
            self._suggest(trial, "update_interval")
        start = (
            self._suggest(trial, "prune_start_epoch") if self._on("prune_start_epoch")
            else float(sp["prune_start_epoch"])
        )
        if self._on("prune_end_epoch"):
            spec = self.space["prune_end_epoch"]
            hi = min(float(spec["high"]), epochs)
            lo = min(max(float(spec["low"]), float(start) + self.min_window), hi)
            self._suggest(trial, "prune_end_epoch", low=lo, high=hi)
        if self._on("init_density"):
            self._suggest(trial, "init_density")
        if self._on("growth"):
            self._suggest(trial, "growth")
        number = getattr(trial, "number", 0)
        params = dict(getattr(trial, "params", {}))
        digest = hashlib.sha256(
            json.dumps({**params, **derived}, sort_keys=True, default=str).encode()
        ).hexdigest()[:8]
        derived["trial_key"] = f"{STAGE}-{self.generation}-{number:04d}-{digest}"
        derived["run_name"] = f"{self.study}-{STAGE}-{number:04d}"
        if hasattr(trial, "set_user_attr"):
            trial.set_user_attr("trial_key", derived["trial_key"])
        return derived


def check_space(study: SearchStudy) -> SpaceFunction:
    """Validate the space against the base config; raise ConfigError before any Ray work."""
    import optuna

    if not isinstance(study.space, dict):
        raise ConfigError(f"space={study.space!r}: must be a mapping of knob -> spec")
    unknown = sorted(set(study.space) - set(KNOBS))
    if unknown:
        raise ConfigError(f"space.{unknown[0]}: unknown knob; allowed: {', '.join(sorted(KNOBS))}")
    for name, spec in study.space.items():
        _check_spec(name, spec, KNOBS[name][1])
    train = study.train
    if train.sparsity.method not in ("gmp", "granet"):
        raise ConfigError(
            f"train.sparsity.method={train.sparsity.method!r}: the search tunes gradual pruning"
            " and regeneration; must be one of gmp, granet"
        )
    sp = study.space
    epochs = float(train.run.epochs)
    if sp.get("regen_ratio") and "low" in sp["regen_ratio"]:
        _ranges("regen_ratio", sp["regen_ratio"]["low"], sp["regen_ratio"]["high"], (0.0, 1.0))
    if sp.get("regen_min") and "low" in sp["regen_min"]:
        _ranges("regen_min", sp["regen_min"]["low"], sp["regen_min"]["high"], (0.0, 1.0))
    if sp.get("update_interval") and "low" in sp["update_interval"]:
        if sp["update_interval"]["low"] < 1:
            raise ConfigError(
                f"space.update_interval.low={sp['update_interval']['low']!r}: must be >= 1 step"
            )
    if sp.get("init_density"):
        spec = sp["init_density"]
        vals = spec["choices"] if "choices" in spec else [spec["low"], spec["high"]]
        for v in vals:
            if not isinstance(v, (int, float)) or not train.sparsity.final_density <= v <= 1.0:
                raise ConfigError(
                    f"space.init_density: {v!r} must be a number in [train.sparsity.final_density="
                    f"{train.sparsity.final_density}, 1]"
                )
    for name in ("prune_start_epoch", "prune_end_epoch"):
        spec = sp.get(name)
        if spec and "low" in spec:
            _ranges(name, spec["low"], spec["high"], (0.0, epochs))
    start_lo = (
        sp["prune_start_epoch"].get("low", min(sp["prune_start_epoch"].get("choices", [0])))
        if sp.get("prune_start_epoch") else train.sparsity.prune_start_epoch
    )
    if sp.get("prune_end_epoch") and "low" in sp["prune_end_epoch"]:
        if start_lo + study.prune_min_window > min(sp["prune_end_epoch"]["high"], epochs):
            raise ConfigError(
                f"space.prune_end_epoch.high={sp['prune_end_epoch']['high']!r}: leaves no window "
                f"of prune_min_window={study.prune_min_window} epochs after the start"
            )
    if study.prune_min_window <= 0:
        raise ConfigError(f"prune_min_window={study.prune_min_window!r}: must be > 0")
    fn = space_function(study)
    # Pre-flight: every sampled point must give a valid granet config.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(48):
        trial = probe.ask()
        derived = fn(trial)
        try:
            _cfg_with(train, {**trial.params, **derived})
        except ConfigError as exc:
            raise ConfigError(f"space: the sample {trial.params} is invalid: {exc}") from None
        probe.tell(trial, 0.0)
    return fn


def _check_fields(study: SearchStudy) -> None:
    if study.num_samples < 1:
        raise ConfigError(f"num_samples={study.num_samples!r}: must be >= 1")
    if study.metric not in METRICS:
        raise ConfigError(f"metric={study.metric!r}: must be one of {', '.join(METRICS)}")
    if study.mode not in ("min", "max"):
        raise ConfigError(f"mode={study.mode!r}: must be one of max, min")
    if study.second_objective not in SECOND_OBJECTIVES:
        raise ConfigError(
            f"second_objective={study.second_objective!r}: must be one of "
            f"{', '.join(SECOND_OBJECTIVES)}"
        )
    if study.scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler={study.scheduler!r}: must be one of {', '.join(SCHEDULERS)}")
    if study.sampler not in SAMPLERS:
        raise ConfigError(f"sampler={study.sampler!r}: must be one of {', '.join(SAMPLERS)}")
    # ASHA fields are checked even when ASHA is off (switching it on later cannot surprise).
    if not 1 <= study.asha_grace_period <= study.train.run.epochs:
        raise ConfigError(
            f"asha_grace_period={study.asha_grace_period!r}: must be in "
            f"[1, train.run.epochs={study.train.run.epochs}]"
        )
    if study.asha_reduction_factor <= 1:
        raise ConfigError(f"asha_reduction_factor={study.asha_reduction_factor!r}: must be > 1")
    if study.n_startup_trials < 0:
        raise ConfigError(f"n_startup_trials={study.n_startup_trials!r}: must be >= 0")
    if study.storage is not None:
        if not isinstance(study.storage, str) or "://" not in study.storage:
            raise ConfigError(
                f"storage={study.storage!r}: must be an RDB URL (sqlite:////abs/path.db, "
                "postgresql://...) or null"
            )
        if study.storage.startswith("sqlite:///") and not study.storage.startswith("sqlite:////"):
            raise ConfigError(
                f"storage={study.storage!r}: a sqlite URL must be absolute (sqlite:////abs/x.db)"
            )


def space_function(study: SearchStudy) -> SpaceFunction:
    return SpaceFunction(study.space, config_to_dict(study.train), study.prune_min_window,
                         study.name)


def load_search_config(path: str | Path | None, overrides: list[str] | None = None,
                       smoke_test: bool = False,
                       tracking_uri: str | None = None) -> tuple[SearchStudy, SpaceFunction]:
    """Load + fully validate a search study config (ConfigError before any Ray/Optuna work)."""
    study = load_study_config(SearchStudy, path, list(overrides or []), smoke_test, tracking_uri)
    return study, space_function(study)


# --------------------------------------------------------------------------------------------
# Optuna side


def optuna_storage(study: SearchStudy) -> Any:
    """The ``RDBStorage`` instance (OptunaSearch rejects URL strings)."""
    import optuna

    url = study.storage
    if url is None:
        d = Path(study.study_dir).resolve()
        d.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{d / 'optuna.db'}"
    return optuna.storages.RDBStorage(url)


def _objectives(study: SearchStudy) -> tuple[str | list[str], str | list[str]]:
    if study.multi_objective:
        return [study.metric, study.second_objective], [study.mode, "min"]
    return study.metric, study.mode


def prepare_optuna_study(study: SearchStudy, storage: Any) -> tuple[Any, int]:
    """Open/create the Optuna study; fail stale RUNNING/WAITING trials; count finished ones.

    Returns ``(optuna_study, finished)`` with finished = COMPLETE + PRUNED.
    """
    import optuna
    from optuna.trial import TrialState

    _, modes = _objectives(study)
    modes_l = modes if isinstance(modes, list) else [modes]
    directions = ["minimize" if m == "min" else "maximize" for m in modes_l]
    name = study.optuna_study_name or study.name
    ost = optuna.create_study(storage=storage, study_name=name, directions=directions,
                              load_if_exists=True)
    have = [d.name.lower() for d in ost.directions]
    want = [d.lower() for d in directions]
    if have != want:
        raise ConfigError(
            f"optuna_study_name={name!r}: the stored study optimises {have}, this config asks "
            f"for {want}; use another study name or study_dir"
        )
    if "granet.generation" not in ost.user_attrs:
        # A token per created study, part of every trial key: a study deleted and re-created
        # (--fresh) never reuses the old trials' keys (Parquet files, MLflow child runs).
        token = hashlib.sha256(f"{name}-{time.time_ns()}-{os.getpid()}".encode()).hexdigest()
        ost.set_user_attr("granet.generation", token[:4])
    for t in ost.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    finished = len(ost.get_trials(deepcopy=False,
                                  states=(TrialState.COMPLETE, TrialState.PRUNED)))
    return ost, finished


def _base_optuna_search() -> type:
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch


class PrunedAwareOptunaSearch(_base_optuna_search()):  # type: ignore[misc]
    """``OptunaSearch`` that tells Optuna ``PRUNED`` for early-stopped trials.

    Ray's ``OptunaSearch.on_trial_complete`` tells ``COMPLETE`` with the truncated value whenever
    the last result holds the metric, so ASHA-stopped trials look finished to TPE. Here a trial
    whose last result has ``result[iteration_key] < full_iterations`` is told ``PRUNED`` (its last
    result is first reported as an intermediate value, which Optuna keeps as the PRUNED trial's
    value; single objective only), an errored trial ``FAIL``. Touches the private
    ``_ot_trials``/``_ot_study``/``_completed_trials`` of Ray 2.60's OptunaSearch: pinned and
    unit-tested against real Optuna.
    """

    def __init__(self, *args: Any, full_iterations: int, iteration_key: str = "epoch",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.full_iterations = int(full_iterations)
        self.iteration_key = iteration_key

    def _iteration(self, result: dict[str, Any] | None) -> int | None:
        if not result:
            return None
        for key in (self.iteration_key, "training_iteration"):
            if result.get(key) is not None:
                return int(result[key])
        return None

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        from optuna.trial import TrialState

        it = self._iteration(result)
        stopped_early = it is not None and it < self.full_iterations
        if not (error or stopped_early) or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result=result, error=error)
        ot_trial = self._ot_trials[trial_id]
        state = TrialState.FAIL if error else TrialState.PRUNED
        value = result.get(self.metric) if (result and isinstance(self.metric, str)) else None
        if state == TrialState.PRUNED and isinstance(value, (int, float)) and math.isfinite(value):
            # Tune hands the stopping result to on_trial_complete only, never to
            # on_trial_result: record it so the PRUNED trial keeps its truncated value.
            try:
                ot_trial.report(float(value), it)
            except Exception:  # noqa: BLE001 - e.g. the step was reported already
                pass
        try:
            self._ot_study.tell(ot_trial, None, state=state)
        except Exception as exc:  # noqa: BLE001 - same policy as the base class
            import logging

            logging.getLogger(__name__).warning(exc)
        self._completed_trials.add(trial_id)


def _make_sampler(study: SearchStudy, offset: int) -> Any:
    import optuna

    # Offset the seed by the trials already in the study: a resumed pass must not replay the
    # first pass's random draws.
    seed = study.sampler_seed + offset
    if study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=study.n_startup_trials,
                                      multivariate=False)


def make_searcher(study: SearchStudy, fn: SpaceFunction, storage: Any,
                  offset: int) -> PrunedAwareOptunaSearch:
    metric, mode = _objectives(study)
    return PrunedAwareOptunaSearch(
        space=fn, metric=metric, mode=mode, sampler=_make_sampler(study, offset),
        study_name=study.optuna_study_name or study.name, storage=storage,
        full_iterations=study.train.run.epochs,
    )


def _asha_base() -> type:
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler


class FinalEpochSafeASHA(_asha_base()):  # type: ignore[misc]
    """ASHA that never stops a trial at (or after) its last epoch.

    Plain ASHA with ``max_t = epochs`` answers STOP to the last report, so Tune kills the trial
    before the trainable returns and its end-of-trial work (the ``trials``/``layers`` Parquet
    rows, closing the MLflow run) never runs. Here ``max_t = epochs + 1`` and any decision at
    iteration >= epochs is CONTINUE; the trial then ends by itself.
    """

    def __init__(self, *, full_iterations: int, **kwargs: Any) -> None:
        super().__init__(max_t=int(full_iterations) + 1, **kwargs)
        self.full_iterations = int(full_iterations)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if result.get(self._time_attr, 0) >= self.full_iterations:
            if action == self.STOP:
                self._num_stopped -= 1
            return self.CONTINUE
        return action


def make_scheduler(study: SearchStudy) -> Any:
    if study.scheduler != "asha":
        return None
    return FinalEpochSafeASHA(
        metric=study.metric, mode=study.mode, time_attr="training_iteration",
        full_iterations=study.train.run.epochs, grace_period=study.asha_grace_period,
        reduction_factor=study.asha_reduction_factor,
    )


# --------------------------------------------------------------------------------------------
# results


def search_schema() -> Any:
    """The pyarrow schema of the ``search`` table."""
    import pyarrow as pa

    return pa.schema([
        ("study", pa.string()),
        ("number", pa.int64()),
        ("state", pa.string()),
        ("value", pa.float64()),  # primary objective (PRUNED: last intermediate value, if any)
        ("value_2", pa.float64()),  # second objective (multi-objective only)
        ("objective", pa.string()),
        ("objective_2", pa.string()),
        ("direction", pa.string()),
        ("direction_2", pa.string()),
        ("params", pa.string()),  # JSON of the Optuna params ("set:<key>": value)
        ("trial_key", pa.string()),
        ("started", pa.float64()),  # POSIX seconds
        ("duration_s", pa.float64()),
        ("best", pa.bool_()),  # single objective: the best trial; multi: on the Pareto front
    ])


SEARCH_SCHEMA_DOC = """table "search": one row per Optuna trial of the study (a snapshot rewritten
after each pass) at <study_dir>/results/search/stage=search/optuna.parquet; columns: study,
number, state (COMPLETE|PRUNED|FAIL|RUNNING|WAITING), value, value_2, objective, objective_2,
direction, direction_2, params (JSON), trial_key, started, duration_s, best."""
SEARCH_SCHEMA = SEARCH_SCHEMA_DOC


def _write_atomic(table: Any, path: Path) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def search_table(ost: Any, study: SearchStudy) -> Any:
    """The Optuna study as a pyarrow table (schema: :data:`SEARCH_SCHEMA`)."""
    import pyarrow as pa
    from optuna.trial import TrialState

    metric, mode = _objectives(study)
    metrics = metric if isinstance(metric, list) else [metric]
    modes = mode if isinstance(mode, list) else [mode]
    trials = ost.get_trials(deepcopy=False)
    if len(metrics) > 1:
        best_numbers = {t.number for t in ost.best_trials}
    else:
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        best_numbers = {ost.best_trial.number} if done else set()
    rows: dict[str, list[Any]] = {f.name: [] for f in search_schema()}
    for t in trials:
        vals = list(t.values) if t.values is not None else []
        rows["study"].append(study.name)
        rows["number"].append(t.number)
        rows["state"].append(t.state.name)
        rows["value"].append(float(vals[0]) if vals else None)
        rows["value_2"].append(float(vals[1]) if len(vals) > 1 else None)
        rows["objective"].append(metrics[0])
        rows["objective_2"].append(metrics[1] if len(metrics) > 1 else None)
        rows["direction"].append(modes[0])
        rows["direction_2"].append(modes[1] if len(modes) > 1 else None)
        rows["params"].append(json.dumps(t.params, sort_keys=True, default=str))
        rows["trial_key"].append(t.user_attrs.get("trial_key"))
        rows["started"].append(t.datetime_start.timestamp() if t.datetime_start else None)
        dur = t.duration.total_seconds() if t.duration is not None else None
        rows["duration_s"].append(dur)
        rows["best"].append(t.number in best_numbers)
    return pa.table(rows, schema=search_schema())


def best_config(study: SearchStudy, fn: SpaceFunction, ost: Any) -> tuple[Config, Any]:
    """The best trial's full granet config (multi-objective: the Pareto trial best on the first
    objective) and that trial."""
    from optuna.trial import FixedTrial

    if study.multi_objective:
        front = ost.best_trials
        if not front:
            raise RuntimeError("no COMPLETE trial: no Pareto front")
        sign = -1.0 if study.mode == "max" else 1.0
        best = min(front, key=lambda t: (sign * t.values[0], t.number))
    else:
        best = ost.best_trial
    derived = fn(FixedTrial(best.params, number=best.number))
    cfg = _cfg_with(study.train, {**best.params, **derived})
    return cfg, best


# --------------------------------------------------------------------------------------------
# driver


def run_search_study(cfg_path: str | Path | None, overrides: list[str] | None = None,
                     smoke_test: bool = False, resume: bool = True,
                     tracking_uri: str | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a search study; return a summary dict (also ``search_summary.json``)."""
    study, fn = load_search_config(cfg_path, overrides, smoke_test, tracking_uri)
    t0 = time.time()
    from optuna.trial import TrialState

    from granet.study.runner import ensure_ray, run_tuner
    from granet.study.tracking import StudyTracker

    study_dir = Path(study.study_dir).resolve()
    study_dir.mkdir(parents=True, exist_ok=True)
    storage = optuna_storage(study)
    if not resume:
        import optuna

        name = study.optuna_study_name or study.name
        if name in optuna.get_all_study_names(storage):
            optuna.delete_study(study_name=name, storage=storage)
        for table_dir in (study_dir / "results").glob(f"*/stage={STAGE}"):
            shutil.rmtree(table_dir)  # the old study's rows would mix with the new ones
    ost, finished = prepare_optuna_study(study, storage)
    fn.generation = ost.user_attrs["granet.generation"]
    remaining = max(study.num_samples - finished, 0)
    tracker = StudyTracker(study)
    status = "FINISHED"
    ran = failed = 0
    try:
        if remaining:
            ensure_ray()
            searcher = make_searcher(study, fn, storage, offset=len(ost.trials))
            param_space = {
                "train": config_to_dict(study.train),
                "stage": STAGE,
                "study": study.name,
                "study_dir": str(study_dir),
                "tracking": tracker.tracking_info(),
            }
            grid = run_tuner(
                study, stage=STAGE, param_space=param_space, num_samples=remaining,
                search_alg=searcher, scheduler=make_scheduler(study), resume=False,
                progress=progress, metric=study.metric, mode=study.mode,
            )
            ran, failed = len(grid), grid.num_errors
        ost, finished = prepare_optuna_study(study, storage)
        for t in ost.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                          TrialState.PRUNED)):
            if "trial_key" not in t.user_attrs:
                derived = fn(_fixed(t))
                storage.set_trial_user_attr(t._trial_id, "trial_key", derived["trial_key"])
        ost, finished = prepare_optuna_study(study, storage)
        _annotate_child_runs(tracker, ost)
        table = search_table(ost, study)
        table_path = study_dir / "results" / STAGE / f"stage={STAGE}" / "optuna.parquet"
        _write_atomic(table, table_path)
        summary: dict[str, Any] = {
            "study": study.name, "study_dir": str(study_dir), "ran_this_pass": ran,
            "tracking_uri": tracker.uri, "mlflow_ui": tracker.ui_command(),
            "failed": failed, "finished_trials": finished, "asked": study.num_samples,
            "states": {s: table.column("state").to_pylist().count(s)
                       for s in sorted(set(table.column("state").to_pylist()))},
            "storage": storage.url if hasattr(storage, "url") else str(storage),
            "optuna_study_name": study.optuna_study_name or study.name,
        }
        try:
            cfg, best = best_config(study, fn, ost)
        except (RuntimeError, ValueError):
            cfg, best = None, None
        if cfg is not None:
            path = study_dir / "best_config.yaml"
            path.write_text(
                f"# best trial #{best.number} of search study {study.name!r}: "
                f"{_objectives(study)[0]} = {best.values}\n" + dump_yaml(cfg)
            )
            summary.update(best_trial=best.number, best_values=list(best.values),
                           best_params=best.params, best_config=str(path))
            if study.multi_objective:
                summary["pareto_front"] = [
                    {"number": t.number, "values": list(t.values)} for t in ost.best_trials
                ]
        summary["seconds"] = time.time() - t0
        (study_dir / "search_summary.json").write_text(json.dumps(summary, indent=2, default=str))
        try:
            tracker.log_table(table_path)
            if cfg is not None:
                tracker.log_table(study_dir / "best_config.yaml")
        except Exception:  # noqa: BLE001 - artifacts are a convenience
            pass
        return summary
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker.finish(status)


def _annotate_child_runs(tracker: Any, ost: Any) -> None:
    """Tag each trial's MLflow child run with its Optuna number/state; an ASHA-stopped (PRUNED)
    trial's run, which the trainable closes as FAILED when Tune stops it, becomes KILLED."""
    from optuna.trial import TrialState

    try:
        runs = tracker.child_runs()
    except Exception:  # noqa: BLE001 - tracking is best effort here
        return
    by_key = {r.data.tags.get("granet.trial_key"): r for r in runs}
    for t in ost.get_trials(deepcopy=False):
        run = by_key.get(t.user_attrs.get("trial_key"))
        if run is None:
            continue
        try:
            tracker.client.set_tag(run.info.run_id, "optuna.number", str(t.number))
            tracker.client.set_tag(run.info.run_id, "optuna.state", t.state.name)
            if t.state == TrialState.PRUNED and run.info.status != "KILLED":
                tracker.client.set_terminated(run.info.run_id, status="KILLED")
        except Exception:  # noqa: BLE001
            pass


def _fixed(t: Any) -> Any:
    from optuna.trial import FixedTrial

    return FixedTrial(t.params, number=t.number)
