"""MLflow tracking: one parent run per study (driver), one nested child run per trial (worker).

Everything goes through ``MlflowClient`` with an explicit, absolute tracking URI (never the
process-global active run): the default ``sqlite:///mlflow.db`` of MLflow 3 is relative to the
current directory, which inside a Tune worker is the trial's throw-away working directory.

Tags: parent ``granet.study=<name>``, ``granet.stage=study``, ``granet.kind``; child
``granet.study``, ``granet.stage``, ``granet.trial_key``, ``granet.parent_key``,
``mlflow.parentRunId``. A retried or restored trial finds its run by ``granet.trial_key`` (under
the same parent) and reopens it, so there is never a second run or an orphan left RUNNING, and it
logs only the epochs (steps) that the run does not hold yet: logging is idempotent per step.

MLflow that degrades, not kills: MLflow's HTTP retries are bounded
(:func:`granet.study.mlflow_spool.bound_http_retries`); a call that still fails is one warning
line, the run stops calling the server and writes the rest to the study's spool
(:class:`~granet.study.mlflow_spool.RunSpool`), and the trial goes on. A new trial (or a retry)
tries the server again. ``granet study sync-mlflow`` uploads the spool later.
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


class _Degrades:
    """The common part of a run that spools instead of failing (see the module docstring)."""

    uri: str
    spool: Any  # RunSpool | None
    offline: bool
    run_id: str | None

    def _header(self) -> dict[str, Any]:
        raise NotImplementedError

    def _who(self) -> str:
        raise NotImplementedError

    def _go_offline(self, what: str, exc: BaseException) -> None:
        """After a failed call: one warning, then every later call goes to the spool. Without
        a spool (no study directory given), the error is raised as before."""
        if self.spool is None:
            raise exc
        from granet.study.mlflow_spool import short_error

        err = short_error(exc)
        first = not self.offline
        self.offline = True
        self.spool.write("run", **self._header(), run_id=self.run_id)
        self.spool.write("failure", what=what, error=err)
        if first:
            self._spool_initial()
        log.warning("granet: warning: MLflow %s: %s of %s failed (%s); kept in %s", self.uri,
                    what, self._who(), err, self.spool.dir)

    def _spool_initial(self) -> None:
        """What a run re-created from the spool needs beyond the header (its params)."""

    def _spool_batch(self, metrics: list[Any], params: list[Any], tags: list[Any]) -> None:
        if metrics:
            self.spool.write("metrics", metrics=[[m.key, m.value, m.timestamp, m.step]
                                                 for m in metrics])
        if params:
            self.spool.write("params", params={p.key: p.value for p in params})
        if tags:
            self.spool.write("tags", tags={t.key: t.value for t in tags})

    def _spool_artifact(self, path: str | Path, artifact_path: str | None) -> None:
        import posixpath

        p = Path(path)
        if not p.is_dir():
            self.spool.add_artifact(p, artifact_path)
            return
        for f in sorted(p.rglob("*")):  # as MlflowClient.log_artifacts lays a directory out
            if f.is_file():
                sub = f.parent.relative_to(p).as_posix()
                ap = posixpath.join(artifact_path or "", "" if sub == "." else sub).rstrip("/")
                self.spool.add_artifact(f, ap or None)


def _spool(tracking_or_dir: Any, name: str) -> Any:
    from granet.study.mlflow_spool import RunSpool

    root = tracking_or_dir.get("spool") if isinstance(tracking_or_dir, dict) else tracking_or_dir
    return RunSpool(root, name) if root else None


class StudyTracker(_Degrades):
    """Driver side: the study's parent run (created once, reopened on re-runs).

    ``spool``: the study's spool directory (``StudyPaths.mlflow_spool``); with it, a failed
    call degrades the run to the spool instead of raising (the run is then ``offline``)."""

    def __init__(self, uri: str, *, experiment: str, study: str, kind: str,
                 artifact_root: Path | None = None, spool: str | Path | None = None) -> None:
        from granet.study.mlflow_spool import PARENT, bound_http_retries

        self.http_env = bound_http_retries()
        self.uri = uri
        self.study, self.experiment, self.kind = study, experiment, kind
        self.spool_dir = spool
        self.spool = _spool(spool, PARENT)
        self.offline = False
        self.run_id: str | None = None
        self.experiment_id = ""
        self.parent_run_id = ""
        self.reopened = False
        self.client = _client(uri)
        try:
            self._open(artifact_root)
        except Exception as exc:  # noqa: BLE001 - the study goes on; its trials spool too
            self._go_offline("run create", exc)

    def _open(self, artifact_root: Path | None) -> None:
        experiment, study, kind = self.experiment, self.study, self.kind
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
        self.parent_run_id = self.run_id = run_id

    def _header(self) -> dict[str, Any]:
        return {"uri": self.uri, "experiment": self.experiment, "experiment_id":
                self.experiment_id, "study": self.study, "kind": self.kind,
                "run_name": self.study}

    def _who(self) -> str:
        return f"the parent run of study {self.study}"

    def _spool_initial(self) -> None:
        if getattr(self, "_params", None) and not getattr(self, "_params_sent", False):
            self.spool.write("params", params=self._params)

    def tracking_info(self) -> dict[str, str]:
        """What a trial context carries under "tracking" to open its child run (and spool)."""
        info = {"uri": self.uri, "experiment_id": self.experiment_id,
                "parent_run_id": self.parent_run_id, "experiment": self.experiment,
                **self.http_env}
        if self.spool_dir is not None:
            info["spool"] = str(self.spool_dir)
        return info

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params once (MLflow forbids changing a param: a re-run keeps the first values)."""
        self._params = flatten(params)
        if self.offline:
            self.spool.write("params", params=self._params)
            return
        try:
            have = self.client.get_run(self.parent_run_id).data.params
            items = [p for p in _params(params) if p.key not in have]
            changed = [p.key for p in _params(params)
                       if p.key in have and have[p.key] != p.value]
            if changed:
                log.warning("granet: warning: MLflow params %s of study %s keep their first "
                            "values", ", ".join(changed[:5]), self.study)
            _log_batch(self.client, self.parent_run_id, params=items)
            self._params_sent = True
        except Exception as exc:  # noqa: BLE001 - degrade (the params are spooled with it)
            self._go_offline("params", exc)

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str) -> None:
        for p in paths:
            p = Path(p)
            if not self.offline:
                try:
                    if p.is_dir():
                        self.client.log_artifacts(self.parent_run_id, str(p), artifact_path)
                    else:
                        self.client.log_artifact(self.parent_run_id, str(p), artifact_path)
                    continue
                except Exception as exc:  # noqa: BLE001 - degrade
                    self._go_offline(f"artifact upload ({p.name})", exc)
            self._spool_artifact(p, artifact_path)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        items = _metrics(metrics, step, int(time.time() * 1000))
        if not self.offline and items:
            try:
                _log_batch(self.client, self.parent_run_id, metrics=items)
                return
            except Exception as exc:  # noqa: BLE001 - degrade
                self._go_offline("metrics batch", exc)
        if self.offline:
            self._spool_batch(items, [], [])

    def child_runs(self) -> list[Any]:
        """The trials' runs ([] once the server failed: nothing more is asked of it)."""
        if self.offline:
            return []
        try:
            return self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'",
                max_results=50000,
            )
        except Exception as exc:  # noqa: BLE001 - degrade
            self._go_offline("search of child runs", exc)
            return []

    def close_running_children(self, status: str = "KILLED") -> int:
        """Close child runs left RUNNING (their trial was stopped); returns how many. Runs with
        a spool are left to it (their status is spooled: ``sync-mlflow`` sets it)."""
        from granet.study.mlflow_spool import spools

        spooled = ({s.name for s in spools(self.spool_dir) if s.exists()}
                   if self.spool_dir is not None else set())
        n = 0
        for run in self.child_runs():
            if run.info.status == "RUNNING" and \
                    run.data.tags.get("granet.trial_key") not in spooled:
                try:
                    self.client.set_terminated(run.info.run_id, status=status)
                except Exception as exc:  # noqa: BLE001 - degrade
                    self._go_offline("set terminated of child runs", exc)
                    break
                n += 1
        return n

    def finish(self, status: str = "FINISHED") -> None:
        if not self.offline:
            try:
                self.client.set_terminated(self.parent_run_id, status=status)
                return
            except Exception as exc:  # noqa: BLE001 - degrade
                self._go_offline("set terminated", exc)
        self.spool.write("status", status=status)

    def ui_command(self) -> str:
        if self.uri.startswith("sqlite:"):
            return f"mlflow ui --backend-store-uri {self.uri} --host 127.0.0.1 --port 5000"
        return f"open {self.uri} (experiment id {self.experiment_id})"


class TrialRun(_Degrades):
    """Worker side: the trial's child run, created or reopened by ``granet.trial_key``.

    Metrics are buffered (:meth:`add_epochs`) and sent in one ``log_batch`` call with whatever
    else is pending - params of a new run, final metrics, tags - by :meth:`flush` (the trainable
    flushes before each Tune checkpoint and at the end, so what a retry resumes from is always
    logged, and a retried epoch is never logged twice: steps the run holds are skipped).

    ``lazy=True`` defers finding or creating the run to the first flush; :meth:`open_all` opens
    many lazy runs of one parent trial with one search (a pack of probes).

    With a spool directory in ``tracking["spool"]``, a call that fails (after MLflow's bounded
    retries) is one warning and the run goes ``offline``: it calls the server no more and writes
    the rest (metrics, params, tags, artifacts, final status) to its spool; nothing raises.
    """

    def __init__(self, tracking: dict[str, str], *, trial_key: str, stage: str, study: str,
                 parent_key: str | None, run_name: str, params: dict[str, Any],
                 lazy: bool = False) -> None:
        from granet.study.mlflow_spool import HTTP_RETRY_ENV, bound_http_retries

        bound_http_retries({k: v for k, v in tracking.items() if k in HTTP_RETRY_ENV})
        self.uri = tracking["uri"]
        self.client = _client(tracking["uri"])
        self.experiment_id = tracking["experiment_id"]
        self.experiment = tracking.get("experiment", "")
        self.parent_run_id = tracking["parent_run_id"]
        self.trial_key, self.stage, self.study = trial_key, stage, study
        self.parent_key, self.run_name, self.params = parent_key, run_name, params
        self.spool = _spool(tracking, trial_key)
        self.offline = False
        self.run_id: str | None = None
        self.reopened = False
        self.last_step = -1
        self._records: list[dict[str, Any]] = []
        self._params_pending = False
        if not self.parent_run_id:  # the parent run was not created: the server failed
            self._go_offline("run create", RuntimeError("the study's parent run was not created"))
        elif not lazy:
            try:
                tags = {"granet.trial_key": trial_key, "mlflow.parentRunId": self.parent_run_id}
                self._open(_find_run(self.client, self.experiment_id, tags), None)
            except Exception as exc:  # noqa: BLE001 - degrade, the trial goes on
                self._go_offline("run create", exc)

    def _tags(self) -> dict[str, str]:
        return {"granet.trial_key": self.trial_key, "granet.study": self.study,
                "granet.stage": self.stage, "granet.parent_key": self.parent_key or ""}

    def _header(self) -> dict[str, Any]:
        return {"uri": self.uri, "experiment": self.experiment,
                "experiment_id": self.experiment_id, "parent_run_id": self.parent_run_id,
                "study": self.study, "trial_key": self.trial_key, "run_name": self.run_name,
                "tags": self._tags()}

    def _who(self) -> str:
        return f"trial {self.run_name}"

    def _spool_initial(self) -> None:
        if self.run_id is None or self._params_pending:  # else the run holds them
            self.spool.write("params", params=flatten(self.params))

    # ------------------------------------------------------------------ opening
    def _open(self, run_id: str | None, has_params: bool | None) -> None:
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id, run_name=self.run_name,
                tags={**self._tags(), "mlflow.parentRunId": self.parent_run_id},
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
        with one search; create the ones that do not exist yet. A failure sends every run not
        opened yet to its spool."""
        todo = [r for r in runs if r.run_id is None and not r.offline]
        if not todo:
            return
        r0 = todo[0]
        try:
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
        except Exception as exc:  # noqa: BLE001 - degrade, the trials go on
            if any(r.spool is None for r in todo):
                raise
            for r in todo:
                if r.run_id is None or r.reopened:
                    r._go_offline("run create", exc)

    def _ensure(self) -> str | None:
        """The run's id (None: it could not be opened, the run is offline)."""
        if self.run_id is None and not self.offline:
            TrialRun.open_all([self])
        return self.run_id

    # ------------------------------------------------------------------ logging
    def add_epochs(self, records: list[dict[str, Any]]) -> None:
        """Buffer epoch records (step = epoch) for the next :meth:`flush`."""
        self._records.extend(records)

    def flush(self, metrics: dict[str, Any] | None = None, step: int = 0,
              tags: dict[str, Any] | None = None) -> None:
        """One ``log_batch`` call: the buffered epochs the run does not hold yet, ``metrics``
        at ``step``, the params of a new run and ``tags`` (to the spool once offline)."""
        from mlflow.entities import RunTag

        ts = int(time.time() * 1000)
        items: list[Any] = []
        last = self.last_step
        for rec in self._records:
            st = int(rec["epoch"])
            if st > last:
                items += _metrics(rec, st, ts)
                last = st
        fresh = _metrics(metrics, step, ts) if metrics else []
        tag_list = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        params = _params(self.params) if self._params_pending else []
        run_id = self._ensure()
        if not self.offline:
            what = "metrics batch" if items or fresh else "params" if params else "tags"
            try:
                if fresh and self.reopened:  # a trial ending again after a crash: no second
                    fresh = [m for m in fresh if not any(  # point per step
                        h.step == m.step for h in self.client.get_metric_history(run_id, m.key))]
                if items or fresh or params or tag_list:
                    _log_all(self.client, run_id, items + fresh, params, tag_list)
            except Exception as exc:  # noqa: BLE001 - degrade, the trial goes on
                self._go_offline(what, exc)
        if self.offline:
            self._spool_batch(items + fresh, [], tag_list)  # params: spooled when it went offline
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
        run_id = self._ensure()
        if not self.offline:
            try:
                self.client.log_artifact(run_id, str(path), artifact_path)
                return
            except Exception as exc:  # noqa: BLE001 - degrade, the trial goes on
                self._go_offline(f"artifact upload ({Path(path).name})", exc)
        self._spool_artifact(path, artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.flush(tags=tags)

    def finish(self, status: str = "FINISHED") -> None:
        """Flush what is buffered, then end the run with ``status``."""
        self.flush()
        run_id = self._ensure()
        if not self.offline:
            try:
                self.client.set_terminated(run_id, status=status)
                return
            except Exception as exc:  # noqa: BLE001 - degrade
                self._go_offline("set terminated", exc)
        self.spool.write("status", status=status)


def _log_all(client, run_id: str, metrics: list[Any], params: list[Any], tags: list[Any]) -> None:
    """As few ``log_batch`` calls as MLflow's limits allow (1000 entities, of them at most 100
    params and 100 tags per call): one for a trial's whole pending state in practice."""
    while metrics or params or tags:
        p, params = params[:100], params[100:]
        t, tags = tags[:100], tags[100:]
        room = 1000 - len(p) - len(t)
        m, metrics = metrics[:room], metrics[room:]
        client.log_batch(run_id, metrics=m, params=p, tags=t)
