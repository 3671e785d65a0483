"""MLflow tracking: one parent run per study (driver), one nested child run per trial (worker).

Everything goes through ``MlflowClient`` with an explicit, absolute tracking URI (never the
process-global active run): the default ``sqlite:///mlflow.db`` of MLflow 3 is relative to the
current directory, which inside a Tune worker is the trial's throw-away working directory.

Tags: parent ``granet.study=<name>``, ``granet.stage=study``; child ``granet.study``,
``granet.stage``, ``granet.trial_key``, ``granet.parent_key``, ``mlflow.parentRunId``. A retried
or restored trial finds its run by ``granet.trial_key`` (under the same parent) and reopens it, so
there is never a second run or an orphan left RUNNING.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from granet.study.common import StudyCommon, resolve_tracking_uri

__all__ = ["StudyTracker", "TrialRun", "flatten"]

_PARAM_MAX = 6000  # MLflow 3 param value limit (characters)


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"} with JSON for lists/dicts (MLflow params)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = text[:_PARAM_MAX]
    return out


def _find_run(client, experiment_id: str, tags: dict[str, str]) -> str | None:
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=flt, max_results=5,
                              order_by=["attributes.start_time ASC"])
    return runs[0].info.run_id if runs else None


class StudyTracker:
    """Driver side: the study's parent run (created once, reopened on re-runs)."""

    def __init__(self, common: StudyCommon, *, extra_tags: dict[str, str] | None = None) -> None:
        self.uri = resolve_tracking_uri(common)
        self.client = _client(self.uri)
        exp = self.client.get_experiment_by_name(common.experiment)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:"):
                # sqlite store: artifacts next to the DB, absolute (the default is ./mlartifacts)
                db = Path(self.uri[len("sqlite:///"):])
                location = (db.parent / "mlartifacts").resolve().as_uri()
            try:
                self.experiment_id = self.client.create_experiment(
                    common.experiment, artifact_location=location
                )
            except Exception:  # created concurrently
                self.experiment_id = self.client.get_experiment_by_name(
                    common.experiment
                ).experiment_id
        else:
            self.experiment_id = exp.experiment_id
        tags = {"granet.study": common.name, "granet.stage": "study"}
        run_id = _find_run(self.client, self.experiment_id, tags)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id, run_name=common.name, tags={**tags, **(extra_tags or {})}
            )
            run_id = run.info.run_id
            self.reopened = False
        else:
            self.client.update_run(run_id, status="RUNNING")
            self.reopened = True
        self.parent_run_id = run_id
        self.study = common.name

    def tracking_info(self) -> dict[str, str]:
        """What a trial config carries under "tracking" to open its child run."""
        return {"uri": self.uri, "experiment_id": self.experiment_id,
                "parent_run_id": self.parent_run_id}

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            try:
                self.client.log_batch(self.parent_run_id, params=items[i : i + 100])
            except Exception:  # a param changed value on a re-run: MLflow forbids overwriting
                pass

    def log_figures(self, paths: Iterable[str | Path], artifact_path: str = "figures") -> None:
        for p in paths:
            self.client.log_artifact(self.parent_run_id, str(p), artifact_path)

    def log_table(self, path: str | Path, artifact_path: str = "tables") -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.parent_run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.parent_run_id, str(p), artifact_path)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        _log_metrics(self.client, self.parent_run_id, metrics, step)

    def child_runs(self) -> list[Any]:
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=50000,
        )

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_run_id, status=status)

    def ui_command(self) -> str:
        if self.uri.startswith("sqlite:"):
            return f"mlflow ui --backend-store-uri {self.uri} --host 127.0.0.1 --port 5000"
        return f"open {self.uri} (experiment '{self.experiment_id}')"


def _log_metrics(client, run_id: str, metrics: dict[str, Any], step: int) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = []
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        v = float(v)
        if math.isfinite(v):
            items.append(Metric(k, v, ts, int(step)))
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


class TrialRun:
    """Worker side: the trial's child run, created or reopened by ``granet.trial_key``."""

    def __init__(
        self,
        tracking: dict[str, str],
        *,
        trial_key: str,
        stage: str,
        study: str,
        parent_key: str | None,
        run_name: str,
        params: dict[str, Any],
    ) -> None:
        self.client = _client(tracking["uri"])
        self.experiment_id = tracking["experiment_id"]
        parent = tracking["parent_run_id"]
        tags = {"granet.trial_key": trial_key, "mlflow.parentRunId": parent}
        run_id = _find_run(self.client, self.experiment_id, tags)
        self.reopened = run_id is not None
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=run_name,
                tags={
                    **tags,
                    "granet.study": study,
                    "granet.stage": stage,
                    "granet.parent_key": parent_key or "",
                },
            )
            run_id = run.info.run_id
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in flatten(params).items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[i : i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def last_logged_step(self, metric: str = "test_acc") -> int:
        """Highest step logged for ``metric`` (-1 if none): a resumed trial logs only newer ones."""
        hist = self.client.get_metric_history(self.run_id, metric)
        return max((m.step for m in hist), default=-1)

    def log_epoch(self, record: dict[str, Any]) -> None:
        """One batched call: every numeric metric of the epoch record at step=epoch."""
        _log_metrics(self.client, self.run_id, record, int(record["epoch"]))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
