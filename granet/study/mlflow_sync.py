"""``granet study sync-mlflow``: replay a study's MLflow spool (:mod:`granet.study.mlflow_spool`)
into a tracking server, idempotently: runs are found by their tags (the parent by
``granet.study``, a trial's run by ``granet.trial_key`` under it) or created, only the metric
steps and params a run lacks are sent, then its tags, artifacts and final status; each run's
spool is removed once all of it is uploaded."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from granet.study.mlflow_spool import PARENT, RunSpool, SpooledRun, spools
from granet.study.storage import local_copy
from granet.study.tracking import _client, _find_run, _log_all

__all__ = ["SyncResult", "sync"]

log = logging.getLogger("granet")

@dataclass
class SyncResult:
    uploaded: list[str] = field(default_factory=list)  # spool names fully uploaded (removed)
    metrics: int = 0  # metric points sent
    artifacts: int = 0
    created: int = 0  # runs created on the server


def _experiment_id(client: Any, name: str, cache: dict[str, str]) -> str:
    if name not in cache:
        exp = client.get_experiment_by_name(name)
        cache[name] = exp.experiment_id if exp is not None else client.create_experiment(name)
    return cache[name]


def _find_or_create(client: Any, exp_id: str, find: dict[str, str], name: str | None,
                    tags: dict[str, str], res: SyncResult) -> str:
    run_id = _find_run(client, exp_id, find)
    if run_id is None:
        run_id = client.create_run(exp_id, run_name=name, tags={**tags, **find}).info.run_id
        res.created += 1
    return run_id


def _replay(client: Any, run_id: str, sp: RunSpool, run: SpooledRun, res: SyncResult) -> None:
    from mlflow.entities import Metric, Param, RunTag

    have = client.get_run(run_id).data.params
    params = [Param(k, v) for k, v in run.params.items() if k not in have]
    held: dict[str, set[int]] = {}
    metrics, seen = [], set()
    for key, value, ts, step in run.metrics:
        if key not in held:
            held[key] = {int(m.step) for m in client.get_metric_history(run_id, key)}
        if int(step) in held[key] or (key, int(step)) in seen:
            continue
        seen.add((key, int(step)))
        metrics.append(Metric(key, float(value), int(ts), int(step)))
    tags = [RunTag(k, str(v)) for k, v in run.tags.items()]
    _log_all(client, run_id, metrics, params, tags)
    for rel, artifact_path in run.artifacts:
        with local_copy([sp.dir / rel]) as local:  # a spool on a bucket: download it first
            for f in local:
                client.log_artifact(run_id, str(f), artifact_path)
    if run.status:
        client.set_terminated(run_id, status=run.status)
    res.metrics += len(metrics)
    res.artifacts += len(run.artifacts)


def sync(root: str | Path, uri: str) -> SyncResult:
    """Upload every spooled run to ``uri`` (the parent first), removing each spool once its run
    holds all of it. Raises on the first failure (what was uploaded stays uploaded; what was
    not stays spooled: running it again is safe)."""
    client = _client(uri)
    res = SyncResult()
    exps: dict[str, str] = {}
    parents: dict[tuple[str, str], str] = {}  # (experiment, study) -> parent run id

    def parent_of(h: dict[str, Any]) -> tuple[str, str]:
        exp_id = _experiment_id(client, h["experiment"], exps)
        key = (h["experiment"], h["study"])
        if key not in parents:
            find = {"granet.study": h["study"], "granet.stage": "study"}
            parents[key] = _find_or_create(client, exp_id, find, h["study"],
                                           {"granet.kind": h.get("kind", "")}, res)
        return exp_id, parents[key]

    for sp in spools(root):
        run = sp.read()
        h = run.header
        if not h.get("experiment") or not h.get("study"):
            log.warning("granet: warning: %s has no run header; left as it is", sp.ops)
            continue
        exp_id, parent_id = parent_of(h)
        if sp.name == PARENT:
            run_id = parent_id
        else:
            find = {"granet.trial_key": h["trial_key"], "mlflow.parentRunId": parent_id}
            run_id = _find_or_create(client, exp_id, find, h.get("run_name"),
                                     dict(h.get("tags") or {}), res)
        _replay(client, run_id, sp, run, res)
        sp.remove()
        res.uploaded.append(sp.name)
    return res
