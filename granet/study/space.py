"""The search space: which knobs of GraNet a search samples, and how (define-by-run).

The space is a picklable callable taking an ``optuna.Trial`` (:class:`SpaceFunction`) so
conditional knobs stay conditional: ``regen_min`` is only sampled when the decay is not
``constant`` (and never above the sampled ``r_0``), the pruning window's end is sampled above
its start. Parameter names are the dotted config keys they set (``sparsity.regen_ratio``).

A YAML ``space`` maps knob names (:data:`KNOBS`) to ``{low, high[, log, step]}``,
``{choices: [...]}`` or null (not searched).
"""

from __future__ import annotations

import copy
import math
from typing import Any

from granet.config import (
    GROWTH,
    REGEN_DECAYS,
    ConfigError,
    config_from_dict,
    config_hash,
    config_to_dict,
)
from granet.study.base import build_train_config, trial_key

__all__ = ["KNOBS", "SpaceFunction", "check_space", "default_space"]

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


def default_space() -> dict[str, Any]:
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

    ``__call__(trial)`` samples the knobs through ``trial.suggest_*`` (parameter names are the
    dotted config keys, e.g. ``sparsity.regen_ratio``) and returns the derived, non-sampled
    overrides (e.g. ``regen_min`` clipped to ``r_0``) plus the trial's ``trial_key`` and
    ``run_name``. Call it with ``optuna.trial.FixedTrial(params)`` to rebuild the full override
    dict of a finished trial.
    """

    def __init__(self, space: dict[str, Any], base: dict[str, Any], min_window: float,
                 study: str) -> None:
        self.space = copy.deepcopy(space)
        self.base = copy.deepcopy(base)  # the base train config (nested dict)
        self.min_window = float(min_window)
        self.study = study
        self.generation = "0"  # token of the Optuna study (see optuna_store.prepare_study)
        self.base_hash = config_hash(config_from_dict(self.base))

    def _suggest(self, trial: Any, name: str, *, low: float | None = None,
                 high: float | None = None) -> Any:
        spec = self.space[name]
        key, kind = KNOBS[name]
        pname = key
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
            derived["sparsity.regen_min"] = float(r0)  # keep r_min <= r_0 valid
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
        sets = {**dict(getattr(trial, "params", {})), **derived}
        cfg = build_train_config(self.base, sets)
        key = trial_key(cfg, {"stage": STAGE, "generation": self.generation, "number": number})
        derived["trial_key"] = key
        derived["run_name"] = f"#{number} {_describe(sets)} | {self.study}"
        if hasattr(trial, "set_user_attr"):
            trial.set_user_attr("trial_key", key)
            trial.set_user_attr("base_hash", self.base_hash)
        return derived


def _describe(sets: dict[str, Any]) -> str:
    short = {"sparsity.regen_ratio": "r0", "sparsity.regen_decay": "", "sparsity.update_interval":
             "dt", "sparsity.prune_end_epoch": "tf", "sparsity.init_density": "di",
             "sparsity.growth": ""}
    parts = []
    for k, name in short.items():
        if k in sets:
            v = sets[k]
            v = f"{v:.3g}" if isinstance(v, float) else str(v)
            parts.append(f"{name}{v}" if name else v)
    return " ".join(parts)


def check_space(study: Any) -> SpaceFunction:
    """Validate a search study's space against its base config; ConfigError before any Ray
    work. Every one of 48 random samples must give a valid granet config."""
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
    fn = SpaceFunction(study.space, config_to_dict(study.train), study.prune_min_window,
                       study.name)
    # Pre-flight: every sampled point must give a valid granet config.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(48):
        trial = probe.ask()
        derived = fn(trial)
        try:
            build_train_config(config_to_dict(train),
                               {k: v for k, v in {**trial.params, **derived}.items()
                                if k not in ("trial_key", "run_name")})
        except ConfigError as exc:
            raise ConfigError(f"space: the sample {trial.params} is invalid: {exc}") from None
        probe.tell(trial, 0.0)
    return fn


