"""Search study: Optuna (through Ray Tune's ``OptunaSearch``) over GraNet's knobs.

- The space (:mod:`granet.study.space`) is define-by-run, so conditional knobs stay conditional.
- Optional ASHA early stopping; stopped trials are told to Optuna as ``PRUNED``
  (:mod:`granet.study.tune.schedulers`).
- Optional multi-objective search (``[metric, train_flops]``); the Pareto front is reported.
- Resume: the Optuna study is reopened by name and only the missing trials are asked for, so an
  interrupted search ends with exactly ``num_samples`` finished trials
  (:mod:`granet.study.optuna_store`). ``Tuner.restore`` is not used: it would pin
  ``num_samples`` to the first pass.
- Outputs: ``best_config.yaml`` (a plain granet config, from trials of the current base config
  only: ``granet train best_config.yaml`` runs it as is) and the ``search`` table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from granet.config import ConfigError, config_hash, config_to_dict, dump_yaml
from granet.study import results
from granet.study.base import StudyConfig, build_train_config
from granet.study.optuna_store import objectives, open_storage, prepare_study, write_search_table
from granet.study.space import SpaceFunction, check_space, default_space
from granet.study.stages import SearchStage
from granet.study.storage import atomic_write_text, rmtree

__all__ = ["METRICS", "SearchStudy"]

log = logging.getLogger("granet")

STAGE = "search"

# Metrics a search may optimise: keys of the trainer's epoch record.
METRICS = (
    "best_val_acc", "val_acc", "val_loss", "test_at_best_val", "test_acc", "train_loss",
    "train_acc",
)
SECOND_OBJECTIVES = ("train_flops", "inference_flops")
SCHEDULERS = ("none", "asha")
SAMPLERS = ("tpe", "random")


@dataclass
class SearchStudy(StudyConfig):
    """A search study: ``StudyConfig`` plus the search's own fields."""

    kind = "search"

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
    space: dict[str, Any] = field(default_factory=default_space)

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
        """StudyConfig's checks, the search fields, and a pre-flight of the space."""
        super().check()
        _check_fields(self)
        check_space(self)

    def space_function(self) -> SpaceFunction:
        return SpaceFunction(self.space, config_to_dict(self.train), self.prune_min_window,
                             self.name)

    def plan(self, run: Any):
        from granet.study.tune.schedulers import FinalEpochSafeASHA, PrunedAwareOptunaSearch

        paths = run.paths
        storage = open_storage(self, paths)
        name = self.optuna_study_name or self.name
        if run.fresh:
            import optuna

            if name in optuna.get_all_study_names(storage):
                optuna.delete_study(study_name=name, storage=storage)
            for table in results.TABLES:  # the old study's rows would mix with the new ones
                rmtree(paths.table_dir(table, STAGE))
        ost, finished = prepare_study(self, storage, paths)
        fn = self.space_function()
        fn.generation = ost.user_attrs["granet.generation"]
        remaining = max(self.num_samples - finished, 0)
        run.say(f"search study '{self.name}': {finished} of {self.num_samples} trials finished, "
                f"{remaining} to run -> {paths.root}")
        metrics, modes = objectives(self)
        metric = metrics if self.multi_objective else metrics[0]
        mode = modes if self.multi_objective else modes[0]
        searcher = PrunedAwareOptunaSearch(
            space=fn, metric=metric, mode=mode, sampler=_make_sampler(self, len(ost.trials)),
            study_name=name, storage=storage, full_iterations=self.train.run.epochs,
        )
        scheduler = None
        if self.scheduler == "asha":
            scheduler = FinalEpochSafeASHA(
                metric=self.metric, mode=self.mode, time_attr="training_iteration",
                full_iterations=self.train.run.epochs, grace_period=self.asha_grace_period,
                reduction_factor=self.asha_reduction_factor,
            )
        trial = {"stage": STAGE, "study": self.name, "train": config_to_dict(self.train)}
        yield SearchStage(STAGE, trial, remaining, searcher, scheduler, metric=self.metric,
                          mode=self.mode, planned=self.num_samples)

    def summarize(self, run: Any) -> dict[str, Any]:
        from optuna.trial import FixedTrial

        paths = run.paths
        storage = open_storage(self, paths)
        ost, finished = prepare_study(self, storage, paths)
        run_ids = _link_mlflow(run.tracker, ost)
        table = write_search_table(ost, self, paths, run_ids)
        states = table.column("state").to_pylist()
        out: dict[str, Any] = {
            "files": [paths.search_table], "finished_trials": finished,
            "asked": self.num_samples, "states": {s: states.count(s) for s in sorted(set(states))},
            "optuna_storage": storage.url if hasattr(storage, "url") else str(storage),
            "optuna_study_name": self.optuna_study_name or self.name, "metrics": {},
        }
        best = _best_trial(self, ost)
        if best is None:
            return out
        fn = self.space_function()
        derived = fn(FixedTrial(best.params, number=best.number))
        sets = {k: v for k, v in {**best.params, **derived}.items()
                if k not in ("trial_key", "run_name")}
        cfg = build_train_config(config_to_dict(self.train), sets)
        metrics, _ = objectives(self)
        atomic_write_text(paths.best_config,
                          f"# best trial #{best.number} of search study {self.name!r}: "
                          f"{metrics[0]} = {best.values}\n" + dump_yaml(cfg))
        out["files"].append(paths.best_config)
        out.update(best_trial=best.number, best_values=list(best.values),
                   best_params=best.params, best_config=str(paths.best_config))
        out["metrics"] = {f"best.{m}": v for m, v in zip(metrics, best.values, strict=True)}
        if self.multi_objective:
            out["pareto_front"] = [{"number": t.number, "values": list(t.values)}
                                   for t in ost.best_trials]
        return out


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



def _make_sampler(study: SearchStudy, offset: int) -> Any:
    import optuna

    # Offset the seed by the trials already in the study: a resumed pass must not replay the
    # first pass's random draws.
    seed = study.sampler_seed + offset
    if study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=study.n_startup_trials,
                                      multivariate=False)




def _best_trial(study: SearchStudy, ost: Any) -> Any:
    """The best COMPLETE trial of the current base config (multi-objective: the Pareto trial best
    on the first objective), or None."""
    from optuna.trial import TrialState

    base = config_hash(study.train)
    mine = [t for t in ost.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("base_hash") == base]
    if not mine:
        return None
    sign = -1.0 if study.mode == "max" else 1.0
    if study.multi_objective:
        front = {t.number for t in ost.best_trials}
        mine = [t for t in mine if t.number in front] or mine
    return min(mine, key=lambda t: (sign * t.values[0], t.number))


def _link_mlflow(tracker: Any, ost: Any) -> dict[str, str]:
    """Each trial's MLflow child run gets its Optuna number and state (an ASHA-stopped trial's
    run is KILLED); returns {trial key: MLflow run id} for the search table."""
    if tracker is None:
        return {}
    from optuna.trial import TrialState

    by_key = {r.data.tags.get("granet.trial_key"): r for r in tracker.child_runs()}
    try:
        _set_links(tracker, ost, by_key, TrialState.PRUNED)
    except Exception as exc:  # noqa: BLE001 - MLflow degrades: the search's results stand
        log.warning("granet: warning: MLflow %s: Optuna numbers not linked to the trial runs "
                    "(%s: %s); running the same search again (it launches nothing) links them",
                    tracker.uri, type(exc).__name__, str(exc).splitlines()[0][:160])
    return {k: r.info.run_id for k, r in by_key.items() if k}


def _set_links(tracker: Any, ost: Any, by_key: dict[str, Any], pruned: Any) -> None:
    for t in ost.get_trials(deepcopy=False):
        run = by_key.get(t.user_attrs.get("trial_key"))
        if run is None:
            continue
        tracker.client.set_tag(run.info.run_id, "optuna.number", str(t.number))
        tracker.client.set_tag(run.info.run_id, "optuna.state", t.state.name)
        if t.state == pruned:
            # the trial tags itself when Tune stops it, unless its actor is gone first
            tracker.client.set_tag(run.info.run_id, "granet.pruned", "true")
            if run.info.status != "KILLED":
                tracker.client.set_terminated(run.info.run_id, status="KILLED")
