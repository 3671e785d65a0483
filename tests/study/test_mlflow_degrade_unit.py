"""The MLflow spool without Ray: a TrialRun against a dead server goes offline after one failed
call and spools the rest; the spool round-trips; ``sync`` replays it into a real store once,
idempotently (only the steps, params and status a run lacks)."""

from __future__ import annotations

import socket
import time

import pytest
from mlflow.tracking import MlflowClient

from granet.study import mlflow_spool as ms
from granet.study.mlflow_sync import sync
from granet.study.tracking import StudyTracker, TrialRun

from .helpers import seed_mlflow_db


def _dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on (closed right away)
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_stall_bound_and_user_values_win(monkeypatch):
    for k in ms.HTTP_RETRY_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    got = ms.bound_http_retries({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"})
    assert got["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"  # the user's
    assert got["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"  # the driver's, sent to a worker
    assert got["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "2"  # granet's
    # 3 attempts x 20 s + one backoff sleep of 2 * 2 s (+1 s jitter)
    assert ms.STALL_BOUND_S == 65.0


def test_spool_round_trip(tmp_path):
    sp = ms.RunSpool(tmp_path, "k1")
    assert not sp.exists()
    sp.write("run", experiment="e", study="s", trial_key="k1", run_name="probe k1",
             tags={"granet.stage": "probe"}, run_id=None)
    sp.write("params", params={"a": "1", "b": "x"})
    sp.write("params", params={"a": "2"})  # a retried trial: the first value stays
    sp.write("metrics", metrics=[["acc", 0.5, 1000, 1], ["acc", 0.6, 2000, 2]])
    sp.write("run", experiment="e", study="s", trial_key="k1", run_id="abc")
    sp.write("tags", tags={"granet.status": "done"})
    f = tmp_path / "layer.csv"
    f.write_text("x,y\n")
    sp.add_artifact(f, None)
    f.unlink()  # the spool holds a copy (the original was a temporary file)
    sp.write("status", status="FINISHED")
    with open(sp.ops, "a") as fh:
        fh.write('{"op": "metr')  # a line cut by a crash is skipped
    run = sp.read()
    assert run.header["run_id"] == "abc" and run.header["run_name"] == "probe k1"
    assert run.params == {"a": "1", "b": "x"}
    assert run.metrics == [["acc", 0.5, 1000, 1], ["acc", 0.6, 2000, 2]]
    assert run.tags == {"granet.status": "done"}
    assert run.status == "FINISHED"
    assert run.artifacts == [("artifacts/0/layer.csv", None)]
    assert (sp.dir / "artifacts/0/layer.csv").read_text() == "x,y\n"
    assert run.kinds() == ["metrics", "params", "tags", "artifacts", "status"]
    sp.remove()
    assert not sp.dir.exists() and ms.spools(tmp_path) == []


def _trial_offline(tmp_path, monkeypatch, key: str = "k1") -> tuple[TrialRun, float]:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    tracking = {"uri": _dead_url(), "experiment_id": "1", "parent_run_id": "p1",
                "experiment": "exp", "spool": str(tmp_path / "spool")}
    t0 = time.time()
    run = TrialRun(tracking, trial_key=key, stage="probe", study="st", parent_key="trunk1",
                   run_name=f"probe {key}", params={"lr": 0.1, "ratio": 0.5}, lazy=True)
    for e in (1, 2, 3):
        run.add_epochs([{"epoch": e, "test_acc": 0.1 * e, "train_loss": 1.0 / e}])
        run.flush()
    f = tmp_path / "layer_densities.csv"
    f.write_text("layer,density\nfc,0.1\n")
    run.log_artifact(f)
    run.flush({"plasticity": 0.25}, step=3, tags={"granet.status": "done"})
    run.finish("FINISHED")
    return run, time.time() - t0


def test_trial_run_goes_offline_after_one_failure(tmp_path, monkeypatch, caplog):
    run, seconds = _trial_offline(tmp_path, monkeypatch)
    assert run.offline and run.run_id is None
    warnings = [r.getMessage() for r in caplog.records if "MLflow" in r.getMessage()]
    assert len(warnings) == 1, warnings  # one failed call; the rest went to the spool
    assert warnings[0].startswith(f"granet: warning: MLflow {run.uri}: run create of trial "
                                  "probe k1 failed (")
    assert "Connection refused" in warnings[0] and str(tmp_path / "spool" / "k1") in warnings[0]
    assert seconds < 10
    sp = ms.RunSpool(tmp_path / "spool", "k1").read()
    assert sorted({(k, s) for k, _, _, s in sp.metrics if k == "test_acc"}) == \
        [("test_acc", 1), ("test_acc", 2), ("test_acc", 3)]
    assert [m[1] for m in sp.metrics if m[0] == "plasticity"] == [0.25]
    assert sp.params == {"lr": "0.1", "ratio": "0.5"}
    assert sp.status == "FINISHED" and sp.tags == {"granet.status": "done"}
    assert [a for a, _ in sp.artifacts] == ["artifacts/0/layer_densities.csv"]
    assert sp.kinds()[0] == "run"


def test_sync_replays_once_and_only_what_is_missing(tmp_path, monkeypatch, tmp_path_factory):
    db = seed_mlflow_db(tmp_path / "store", tmp_path_factory)
    uri = f"sqlite:///{db}"
    # the study's parent exists on the server, with one trial whose run holds epoch 1 only
    tracker = StudyTracker(uri, experiment="exp", study="st", kind="plasticity",
                           artifact_root=tmp_path / "art", spool=tmp_path / "spool")
    tracker.log_params({"ratios": [0.5]})
    info = tracker.tracking_info()
    on = TrialRun(info, trial_key="k2", stage="probe", study="st", parent_key="trunk1",
                  run_name="probe k2", params={"lr": 0.1})
    on.log_epochs([{"epoch": 1, "test_acc": 0.1}])
    _trial_offline(tmp_path, monkeypatch, "k1")  # never reached any server
    sp2 = ms.RunSpool(tmp_path / "spool", "k2")  # k2 lost the server after epoch 1
    sp2.write("run", experiment="exp", study="st", trial_key="k2", run_name="probe k2",
              tags={"granet.trial_key": "k2", "granet.stage": "probe"}, run_id=on.run_id)
    sp2.write("params", params={"lr": "0.1"})
    sp2.write("metrics", metrics=[["test_acc", 0.1, 1, 1], ["test_acc", 0.2, 2, 2]])
    sp2.write("status", status="FINISHED")
    tracker.finish("FINISHED")

    res = sync(tmp_path / "spool", uri)
    assert sorted(res.uploaded) == ["k1", "k2"] and res.created == 1
    assert res.metrics == 3 * 3 + 1 + 1  # k1: 3 epochs x 3 keys + plasticity; k2: epoch 2
    assert ms.spools(tmp_path / "spool") == []
    c = MlflowClient(tracking_uri=uri)
    kids = c.search_runs([tracker.experiment_id],
                         filter_string=f"tags.`mlflow.parentRunId` = '{tracker.parent_run_id}'")
    by_key = {r.data.tags["granet.trial_key"]: r for r in kids}
    assert sorted(by_key) == ["k1", "k2"]
    k1, k2 = by_key["k1"], by_key["k2"]
    assert [m.step for m in c.get_metric_history(k1.info.run_id, "test_acc")] == [1, 2, 3]
    assert sorted((m.step, m.value) for m in c.get_metric_history(k2.info.run_id,
                                                                  "test_acc")) == \
        [(1, 0.1), (2, 0.2)]  # epoch 1 not sent twice
    assert k1.data.params == {"lr": "0.1", "ratio": "0.5"} and k1.info.status == "FINISHED"
    assert k1.info.run_name == "probe k1" and k1.data.tags["granet.parent_key"] == "trunk1"
    assert k2.info.status == "FINISHED"
    arts = [a.path for a in c.list_artifacts(k1.info.run_id)]
    assert arts == ["layer_densities.csv"]
    # again: nothing left, nothing sent
    again = sync(tmp_path / "spool", uri)
    assert again.uploaded == [] and again.metrics == 0
    assert len(c.get_metric_history(k1.info.run_id, "test_acc")) == 3


def test_tracker_without_spool_still_raises(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(Exception, match="Connection refused|Max retries"):
        StudyTracker(_dead_url(), experiment="e", study="s", kind="plasticity")
