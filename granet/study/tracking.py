"""MLflow tracking: one parent run per study (driver), one nested child run per trial (worker).

Everything goes through ``MlflowClient`` with an explicit, absolute tracking URI (never the
process-global active run): the default ``sqlite:///mlflow.db`` of MLflow 3 is relative to the
current directory, which inside a Tune worker is the trial's throw-away working directory.

Tags: parent ``granet.study=<name>``, ``granet.stage=study``, ``granet.kind``; child
``granet.study``, ``granet.stage``, ``granet.trial_key``, ``granet.parent_key``,
``mlflow.parentRunId``. A retried or restored trial finds its run by ``granet.trial_key`` (under
the same parent) and reopens it, so there is never a second run or an orphan left RUNNING, and it
logs only the epochs (steps) that the run does not hold yet: logging is idempotent per step.
"""

from __future__ import annotations

import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["ServiceError", "StudyTracker", "TrialRun", "check_tracking_uri", "flatten"]

log = logging.getLogger("granet")

_PARAM_MAX = 6000  # MLflow 3 param value limit (characters)


class ServiceError(RuntimeError):
    """A service the study needs (MLflow, Ray, a database) is not usable; the message names the
    URI and the fix."""


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_tracking_uri(uri: str, *, origin: str = "--tracking-uri", timeout: float = 5.0) -> None:
    """Fail fast (seconds, not MLflow's minutes of retries) when ``uri`` cannot be used."""
    fix = ("start the server, or pass --tracking-uri sqlite:////abs/path/mlflow.db "
           "(the default is <study_dir>/mlflow.db)")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                return
        except urllib.error.HTTPError:
            return  # something answers (a proxy, an older server without /health)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServiceError(
                f"MLflow tracking URI {uri} (from {origin}): not reachable ({reason}); {fix}"
            ) from None
    elif uri.startswith(("postgresql", "mysql", "mssql")):
        drivers = {"postgresql": ("psycopg2", "psycopg", "pg8000"),
                   "mysql": ("pymysql", "MySQLdb", "mysql.connector"), "mssql": ("pyodbc",)}
        scheme = uri.split(":", 1)[0]
        base, _, dialect = scheme.partition("+")
        import importlib.util

        wanted = (dialect,) if dialect else drivers[base]
        def installed(module: str) -> bool:
            try:
                return importlib.util.find_spec(module) is not None
            except ModuleNotFoundError:  # "mysql.connector" without "mysql"
                return False

        if not any(installed(d) for d in wanted):
            raise ServiceError(
                f"MLflow tracking URI {uri.split('@')[-1]} (from {origin}): no database driver "
                f"for {base} is installed ({' or '.join(wanted)}); install one "
                "(e.g. pip install \"granet[cluster]\" for PostgreSQL)"
            )
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        parent = db.parent
        if not parent.is_dir():
            raise ServiceError(
                f"MLflow tracking URI {uri} (from {origin}): directory {str(parent)!r} does not "
                "exist; create it or choose another path"
            )


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"} with JSON for lists/dicts (MLflow params)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            if isinstance(v, float):
                v = float(f"{v:.6g}")
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[key] = text[:_PARAM_MAX]
    return out


def _find_run(client, experiment_id: str, tags: dict[str, str]) -> str | None:
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=flt, max_results=5,
                              order_by=["attributes.start_time ASC"])
    return runs[0].info.run_id if runs else None


def _metrics(metrics: dict[str, Any], step: int, ts: int) -> list[Any]:
    from mlflow.entities import Metric

    out = []
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out.append(Metric(k, float(v), ts, int(step)))
    return out


def _log_batch(client, run_id: str, *, metrics: list[Any] = (), params: list[Any] = ()) -> None:
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=list(metrics[i : i + 1000]))
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=list(params[i : i + 100]))


def _params(params: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, v) for k, v in flatten(params).items()]


class StudyTracker:
    """Driver side: the study's parent run (created once, reopened on re-runs)."""

    def __init__(self, uri: str, *, experiment: str, study: str, kind: str,
                 artifact_root: Path | None = None) -> None:
        self.uri = uri
        self.study = study
        self.client = _client(uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = artifact_root.resolve().as_uri() if artifact_root is not None else None
            self.experiment_id = self.client.create_experiment(experiment,
                                                               artifact_location=location)
        else:
            self.experiment_id = exp.experiment_id
        tags = {"granet.study": study, "granet.stage": "study"}
        run_id = _find_run(self.client, self.experiment_id, tags)
        self.reopened = run_id is not None
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=study,
                                         tags={**tags, "granet.kind": kind})
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.parent_run_id = run_id

    def tracking_info(self) -> dict[str, str]:
        """What a trial context carries under "tracking" to open its child run."""
        return {"uri": self.uri, "experiment_id": self.experiment_id,
                "parent_run_id": self.parent_run_id}

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params once (MLflow forbids changing a param: a re-run keeps the first values)."""
        have = self.client.get_run(self.parent_run_id).data.params
        items = [p for p in _params(params) if p.key not in have]
        changed = [p.key for p in _params(params) if p.key in have and have[p.key] != p.value]
        if changed:
            log.warning("granet: warning: MLflow params %s of study %s keep their first values",
                        ", ".join(changed[:5]), self.study)
        _log_batch(self.client, self.parent_run_id, params=items)

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str) -> None:
        for p in paths:
            p = Path(p)
            if p.is_dir():
                self.client.log_artifacts(self.parent_run_id, str(p), artifact_path)
            else:
                self.client.log_artifact(self.parent_run_id, str(p), artifact_path)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        _log_batch(self.client, self.parent_run_id,
                   metrics=_metrics(metrics, step, int(time.time() * 1000)))

    def child_runs(self) -> list[Any]:
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
            max_results=50000,
        )

    def close_running_children(self, status: str = "KILLED") -> int:
        """Close child runs left RUNNING (their trial was stopped); returns how many."""
        n = 0
        for run in self.child_runs():
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, status=status)
                n += 1
        return n

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_run_id, status=status)

    def ui_command(self) -> str:
        if self.uri.startswith("sqlite:"):
            return f"mlflow ui --backend-store-uri {self.uri} --host 127.0.0.1 --port 5000"
        return f"open {self.uri} (experiment id {self.experiment_id})"


class TrialRun:
    """Worker side: the trial's child run, created or reopened by ``granet.trial_key``.

    Metrics are buffered (:meth:`add_epochs`) and sent in one ``log_batch`` call with whatever
    else is pending - params of a new run, final metrics, tags - by :meth:`flush` (the trainable
    flushes before each Tune checkpoint and at the end, so what a retry resumes from is always
    logged, and a retried epoch is never logged twice: steps the run holds are skipped).

    ``lazy=True`` defers finding or creating the run to the first flush; :meth:`open_all` opens
    many lazy runs of one parent trial with one search (a pack of probes).
    """

    def __init__(self, tracking: dict[str, str], *, trial_key: str, stage: str, study: str,
                 parent_key: str | None, run_name: str, params: dict[str, Any],
                 lazy: bool = False) -> None:
        self.client = _client(tracking["uri"])
        self.experiment_id = tracking["experiment_id"]
        self.parent_run_id = tracking["parent_run_id"]
        self.trial_key, self.stage, self.study = trial_key, stage, study
        self.parent_key, self.run_name, self.params = parent_key, run_name, params
        self.run_id: str | None = None
        self.reopened = False
        self.last_step = -1
        self._records: list[dict[str, Any]] = []
        self._params_pending = False
        if not lazy:
            tags = {"granet.trial_key": trial_key, "mlflow.parentRunId": self.parent_run_id}
            self._open(_find_run(self.client, self.experiment_id, tags), None)

    # ------------------------------------------------------------------ opening
    def _open(self, run_id: str | None, has_params: bool | None) -> None:
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id, run_name=self.run_name,
                tags={"granet.trial_key": self.trial_key, "mlflow.parentRunId": self.parent_run_id,
                      "granet.study": self.study, "granet.stage": self.stage,
                      "granet.parent_key": self.parent_key or ""},
            )
            self.run_id = run.info.run_id
            self._params_pending = True  # sent with the first flush
            return
        self.reopened = True
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        hist = self.client.get_metric_history(run_id, "epoch")
        self.last_step = max((int(m.step) for m in hist), default=-1)
        if has_params is None:
            has_params = bool(self.client.get_run(run_id).data.params)
        self._params_pending = not has_params  # created, then killed before its first flush

    @staticmethod
    def open_all(runs: list[TrialRun]) -> None:
        """Open the lazy ``runs`` (children of one parent trial: same ``parent_key`` and stage)
        with one search; create the ones that do not exist yet."""
        todo = [r for r in runs if r.run_id is None]
        if not todo:
            return
        r0 = todo[0]
        flt = (f"tags.`mlflow.parentRunId` = '{r0.parent_run_id}' and "
               f"tags.`granet.stage` = '{r0.stage}' and "
               f"tags.`granet.parent_key` = '{r0.parent_key or ''}'")
        found: dict[str, Any] = {}
        for run in r0.client.search_runs([r0.experiment_id], filter_string=flt,
                                         max_results=50000,
                                         order_by=["attributes.start_time DESC"]):
            key = run.data.tags.get("granet.trial_key")
            found[key] = run  # newest first: the oldest run of a key wins (as _find_run)
        for r in todo:
            hit = found.get(r.trial_key)
            r._open(hit.info.run_id if hit is not None else None,
                    bool(hit.data.params) if hit is not None else None)

    def _ensure(self) -> str:
        if self.run_id is None:
            TrialRun.open_all([self])
        assert self.run_id is not None
        return self.run_id

    # ------------------------------------------------------------------ logging
    def add_epochs(self, records: list[dict[str, Any]]) -> None:
        """Buffer epoch records (step = epoch) for the next :meth:`flush`."""
        self._records.extend(records)

    def flush(self, metrics: dict[str, Any] | None = None, step: int = 0,
              tags: dict[str, Any] | None = None) -> None:
        """One ``log_batch`` call: the buffered epochs the run does not hold yet, ``metrics``
        at ``step``, the params of a new run and ``tags``."""
        run_id = self._ensure()
        ts = int(time.time() * 1000)
        items: list[Any] = []
        last = self.last_step
        for rec in self._records:
            st = int(rec["epoch"])
            if st > last:
                items += _metrics(rec, st, ts)
                last = st
        if metrics:
            fresh = _metrics(metrics, step, ts)
            if self.reopened:  # a trial ending again after a crash: no second point per step
                fresh = [m for m in fresh if not any(
                    h.step == m.step for h in self.client.get_metric_history(run_id, m.key))]
            items += fresh
        params = _params(self.params) if self._params_pending else []
        from mlflow.entities import RunTag

        tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        if items or params or tag_list:
            _log_all(self.client, run_id, items, params, tag_list)
        self.last_step = last
        self._records = []
        self._params_pending = False

    def log_epochs(self, records: list[dict[str, Any]]) -> None:
        """One batched call for the epochs the run does not hold yet (step = epoch)."""
        self.add_epochs(records)
        self.flush()

    def log_metrics(self, metrics: dict[str, Any], step: int = 0) -> None:
        self.flush(metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self._ensure(), str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.flush(tags=tags)

    def finish(self, status: str = "FINISHED") -> None:
        """Flush what is buffered, then end the run with ``status``."""
        self.flush()
        self.client.set_terminated(self._ensure(), status=status)


def _log_all(client, run_id: str, metrics: list[Any], params: list[Any], tags: list[Any]) -> None:
    """As few ``log_batch`` calls as MLflow's limits allow (1000 entities, of them at most 100
    params and 100 tags per call): one for a trial's whole pending state in practice."""
    while metrics or params or tags:
        p, params = params[:100], params[100:]
        t, tags = tags[:100], tags[100:]
        room = 1000 - len(p) - len(t)
        m, metrics = metrics[:room], metrics[room:]
        client.log_batch(run_id, metrics=m, params=p, tags=t)
