"""MLflow: one parent per study, one child per trial with params and one point per epoch, a
retried trial reopens its run (sqlite, and a real ``mlflow server``)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from granet.study import results

from .faults import FailAtEpoch
from .helpers import run_tiny_plasticity


def _check_tracking(uri: str, parent_run_id: str, study_dir, marker) -> None:
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_run_id)
    assert parent.data.tags["granet.stage"] == "study"
    assert parent.info.status == "FINISHED"
    exp = parent.info.experiment_id
    children = client.search_runs(
        [exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=1000
    )
    trials = results.read_table(study_dir, "trials").to_pylist()
    keys = [c.data.tags["granet.trial_key"] for c in children]
    assert sorted(keys) == sorted(t["key"] for t in trials)  # one child per trial, no orphans
    by_key = {c.data.tags["granet.trial_key"]: c for c in children}
    for t in trials:
        run = by_key[t["key"]]
        assert run.info.status == "FINISHED"
        assert run.data.tags["granet.stage"] == t["stage"]
        assert run.data.tags["granet.study"] == t["study"]
        assert run.data.tags["granet.parent_key"] == (t["parent_key"] or "")
        # params: the study-level fields and the non-default training values only
        assert run.data.params["train.run.epochs"] == str(t["epochs"])
        assert "train.optim.betas" not in run.data.params  # a default (and AdamW-only)
        assert not any(k.startswith("spec.") for k in run.data.params)
        hist = client.get_metric_history(run.info.run_id, "test_acc")
        assert sorted(m.step for m in hist) == list(range(1, t["epochs"] + 1)), t["key"]
        if t["stage"] == "probe":  # the science is a metric of the probe's run
            probe = [p for p in results.read_table(study_dir, "probes").to_pylist()
                     if p["key"] == t["key"]][0]
            for name in ("plasticity", "acc_before", "acc_pruned", "acc_after"):
                assert run.data.metrics[name] == pytest.approx(probe[name]), name
    # the parent carries the mean plasticity per ratio and regeneration
    means = {k: v for k, v in parent.data.metrics.items() if k.startswith("plasticity_mean.")}
    assert set(means) == {"plasticity_mean.p0.5.noregen", "plasticity_mean.p0.5.regen"} or \
        set(means) == {"plasticity_mean.p0.5.regen"}
    # the trial that failed once at epoch 2 and was retried has one run with one point per epoch
    failed_key = marker.read_text().split()[0]
    assert keys.count(failed_key) == 1
    arts = [a.path for a in client.list_artifacts(by_key[failed_key].info.run_id)]
    assert "layer_densities.csv" in arts


def test_sqlite_parent_children_retry(tiny_plasticity):
    out = tiny_plasticity["first"]
    assert out["tracking_uri"].startswith("sqlite:////")
    assert out["tracking_uri"].endswith("/mlflow.db")
    _check_tracking(out["tracking_uri"], out["parent_run_id"], tiny_plasticity["dir"],
                    tiny_plasticity["marker"])
    # the re-run reopened the same parent run
    assert tiny_plasticity["second"]["parent_run_id"] == out["parent_run_id"]


def test_mlflow_server_parent_children_retry(ray_session, mlflow_server, tmp_path):
    marker = tmp_path / "fail-once.marker"
    out = run_tiny_plasticity(
        tmp_path / "study", ["trunk_densities=[0.5]", "probe_epochs=[3]", "regen=[true]"],
        tracking_uri=mlflow_server, trainable=FailAtEpoch(marker),
    )
    assert out["launched"] == {"trunk": 1, "probe": 1}
    assert out["tracking_uri"] == mlflow_server
    assert marker.exists()
    _check_tracking(mlflow_server, out["parent_run_id"], tmp_path / "study", marker)
    assert not (tmp_path / "study" / "mlflow.db").exists()
