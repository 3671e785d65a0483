"""The Optuna side of a search: storage, the study, resume after a killed driver, the snapshot.

- Storage: ``sqlite:////<study_dir>/optuna.db`` by default (optuna-dashboard opens it), any RDB
  URL through the study's ``storage``. OptunaSearch needs an ``RDBStorage`` instance.
- Resume: the Optuna study is reopened by name. Trials a killed driver left RUNNING are settled
  from the study's own results: a trial whose ``trials`` row says "done" is told COMPLETE with
  its recorded values, "stopped" PRUNED, anything else FAIL - so a finished trial is never
  re-asked and leaves no orphan row.
- Snapshot: table ``search`` (:func:`search_schema`), one row per Optuna trial, rewritten after
  each pass at ``<study_dir>/results/search/stage=search/optuna.parquet``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any

from granet.config import ConfigError
from granet.study import results
from granet.study.paths import StudyPaths
from granet.study.storage import write_parquet

__all__ = ["objectives", "open_storage", "prepare_study", "search_schema", "search_table"]

log = logging.getLogger("granet")

STAGE = "search"


def objectives(study: Any) -> tuple[list[str], list[str]]:
    """The metric names and modes the search optimises (one or two)."""
    if study.multi_objective:
        return [study.metric, study.second_objective], [study.mode, "min"]
    return [study.metric], [study.mode]


def open_storage(study: Any, paths: StudyPaths) -> Any:
    """The ``RDBStorage`` of the search (OptunaSearch rejects URL strings)."""
    import optuna

    url = study.storage or paths.default_optuna_url()
    try:
        return optuna.storages.RDBStorage(url)
    except (ImportError, ModuleNotFoundError) as exc:
        raise ConfigError(
            f"storage={url.split('@')[-1]!r}: no database driver ({exc}); install one (e.g. "
            "pip install \"granet[cluster]\" for PostgreSQL)"
        ) from None


def prepare_study(study: Any, storage: Any, paths: StudyPaths) -> tuple[Any, int]:
    """Open or create the Optuna study, settle trials a killed driver left RUNNING, and count
    the finished trials of the current base config. Returns ``(optuna_study, finished)``."""
    import optuna
    from optuna.trial import TrialState

    metrics, modes = objectives(study)
    directions = ["minimize" if m == "min" else "maximize" for m in modes]
    name = study.optuna_study_name or study.name
    ost = optuna.create_study(storage=storage, study_name=name, directions=directions,
                              load_if_exists=True)
    have = [d.name.lower() for d in ost.directions]
    if have != [d.lower() for d in directions]:
        raise ConfigError(
            f"optuna_study_name={name!r}: the stored study optimises {have}, this config asks "
            f"for {directions}; use another study name or study_dir"
        )
    ost.set_metric_names(metrics)
    if "granet.generation" not in ost.user_attrs:
        # A token per created study, part of every trial key: a study deleted and re-created
        # (--fresh) never reuses the old trials' keys (Parquet files, MLflow child runs).
        token = hashlib.sha256(f"{name}-{time.time_ns()}-{os.getpid()}".encode()).hexdigest()
        ost.set_user_attr("granet.generation", token[:4])
    for t in ost.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
        _settle(storage, t, paths, metrics)
    from granet.config import config_hash

    base = config_hash(study.train)
    finished = [t for t in ost.get_trials(deepcopy=False,
                                          states=(TrialState.COMPLETE, TrialState.PRUNED))
                if t.user_attrs.get("base_hash", base) == base]
    return ost, len(finished)


def _settle(storage: Any, t: Any, paths: StudyPaths, metrics: list[str]) -> None:
    from optuna.trial import TrialState

    key = t.user_attrs.get("trial_key")
    row = None
    if key:
        rows = [r for r in results.read_table(paths.root, "trials", STAGE).to_pylist()
                if r["key"] == key]
        row = rows[0] if rows else None
    if row is not None and row["status"] == "done" and all(
        row.get(m) is not None for m in metrics
    ):
        storage.set_trial_state_values(t._trial_id, TrialState.COMPLETE,
                                       [float(row[m]) for m in metrics])
        log.warning("granet: Optuna trial #%d finished before the driver stopped: recorded as "
                    "COMPLETE", t.number)
    elif row is not None and row["status"] == "stopped":
        storage.set_trial_state_values(t._trial_id, TrialState.PRUNED)
    else:
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


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
        ("params", pa.string()),  # JSON of the Optuna params (dotted config keys)
        ("trial_key", pa.string()),
        ("mlflow_run_id", pa.string()),
        ("started", pa.float64()),  # POSIX seconds
        ("duration_s", pa.float64()),
        ("best", pa.bool_()),  # single objective: the best trial; multi: on the Pareto front
    ])


def search_table(ost: Any, study: Any, run_ids: dict[str, str] | None = None) -> Any:
    """The Optuna study as a pyarrow table (schema: :func:`search_schema`)."""
    import pyarrow as pa
    from optuna.trial import TrialState

    metrics, modes = objectives(study)
    trials = ost.get_trials(deepcopy=False)
    if len(metrics) > 1:
        best_numbers = {t.number for t in ost.best_trials}
    else:
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        best_numbers = {ost.best_trial.number} if done else set()
    rows: dict[str, list[Any]] = {f.name: [] for f in search_schema()}
    for t in trials:
        vals = list(t.values) if t.values is not None else []
        if not vals and t.intermediate_values:
            vals = [t.intermediate_values[max(t.intermediate_values)]]
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
        rows["mlflow_run_id"].append(t.user_attrs.get("mlflow_run_id")
                                     or (run_ids or {}).get(t.user_attrs.get("trial_key")))
        rows["started"].append(t.datetime_start.timestamp() if t.datetime_start else None)
        rows["duration_s"].append(t.duration.total_seconds() if t.duration is not None else None)
        rows["best"].append(t.number in best_numbers)
    return pa.table(rows, schema=search_schema())


def write_search_table(ost: Any, study: Any, paths: StudyPaths,
                       run_ids: dict[str, str] | None = None) -> Any:
    table = search_table(ost, study, run_ids)
    write_parquet(table, paths.search_table)
    return table
