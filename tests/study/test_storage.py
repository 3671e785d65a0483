"""Study directories on object storage: a real S3-compatible server (moto) on 127.0.0.1.

Round trips of granet.study.storage on a local path and on s3://, Parquet tables and trunk
checkpoints in a bucket, bad URIs refused before anything is written (exit 2), and a smoke
plasticity study with ``study_dir=s3://...`` on a local Ray that resumes from the bucket.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from granet.errors import run_command
from granet.io import CheckpointError
from granet.study import results, storage
from granet.study.paths import StudyPaths
from granet.study.storage import UriPath, study_path

from .helpers import ROOT, TINY, run, run_tiny_plasticity, seed_mlflow_db
from .s3server import S3Server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    monkeypatch.setenv("GRANET_STATE_DIR", str(d))
    return d


def _roots(tmp_path: Path, s3: S3Server) -> list:
    return [tmp_path / "local", study_path(s3.uri(s3.bucket(), "studies/a"))]


def test_round_trips_local_and_s3(s3, tmp_path):
    for root in _roots(tmp_path, s3):
        remote = isinstance(root, UriPath)
        p = root / "sub" / "x.txt"
        assert not p.exists()
        storage.atomic_write_text(p, "one")
        storage.atomic_write_text(p, "two")  # replaced whole
        assert p.read_text() == "two" and p.is_file() and (root / "sub").is_dir()
        storage.write_bytes(root / "sub" / "y.bin", b"\x00\x01")
        assert [q.name for q in root.rglob("*.bin")] == ["y.bin"]
        assert sorted(q.name for q in (root / "sub").glob("*")) == ["x.txt", "y.bin"]
        # no temporary file is left beside a published one
        assert sorted(q.name for q in (root / "sub").iterdir()) == ["x.txt", "y.bin"]
        p.unlink()
        p.unlink(missing_ok=True)
        assert not p.exists()
        with pytest.raises(FileNotFoundError if not remote else OSError):
            p.unlink()
        # checkpoints through a buffer
        state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3}
        ck = root / "checkpoints" / "t" / "epoch-0003.pt"
        storage.save_checkpoint(state, ck)
        back = storage.load_checkpoint(str(ck), keys=("model",))
        assert back["epoch"] == 3 and torch.equal(back["model"]["w"], state["model"]["w"])
        storage.write_bytes(root / "bad.pt", b"not a checkpoint")
        with pytest.raises(CheckpointError, match="cannot be read"):
            storage.load_checkpoint(root / "bad.pt")
        with pytest.raises(CheckpointError, match="does not exist"):
            storage.load_checkpoint(root / "missing.pt")
        storage.rmtree(root / "sub")
        assert not (root / "sub").exists()
        if remote:  # str() is the URI a worker rebuilds the same place from
            assert str(root).startswith("s3://test:test@") and "endpoint_override" in str(root)
            assert study_path(str(ck)).read_bytes() == ck.read_bytes()


def test_parquet_tables_in_a_bucket(s3):
    root = s3.uri(s3.bucket(), "studies/tables")
    rows = [{"key": "k1", "study": "s", "stage": "trunk", "epoch": e, "step": 10 * e,
             "test_acc": 0.1 * e} for e in (1, 2, 3)]
    path = results.write_rows(root, "epochs", "trunk", "k1", rows)
    assert isinstance(path, UriPath) and path.is_file()
    results.write_rows(root, "trials", "trunk", "k1",
                       [{"key": "k1", "study": "s", "stage": "trunk", "status": "done"}])
    results.write_rows(root, "trials", "probe", "k2",
                       [{"key": "k2", "study": "s", "stage": "probe", "status": "failed"}])
    t = results.read_table(root, "epochs")
    assert t.column("epoch").to_pylist() == [1, 2, 3]
    assert t.column("test_acc").to_pylist() == pytest.approx([0.1, 0.2, 0.3])
    assert results.finished_keys(root) == {"k1"}
    assert results.trial_status(root, "probe", "k2") == "failed"
    assert results.trial_status(root, "probe", "nope") is None
    # a truncated file: its trial is forgotten (every table), the others stay
    storage.write_bytes(results.table_path(root, "epochs", "trunk", "k1"), b"PAR1trunc")
    assert set(results.forget_unreadable(root)) == {"k1"}
    assert results.finished_keys(root) == set()
    assert results.trial_statuses(root) == {"k2": "failed"}


def test_state_dir_of_a_uri_is_local(s3, state_dir):
    uri = s3.uri(s3.bucket("bkt-state"), "a/b")
    paths = StudyPaths(uri)
    assert paths.is_uri and paths.state == state_dir.resolve() / "s3" / "bkt-state" / "a" / "b"
    assert paths.lock == paths.state / ".lock" and paths.cache == paths.state / "cache"
    assert paths.default_tracking_uri() == f"sqlite:///{paths.state / 'mlflow.db'}"
    assert str(paths.remote_lock) == f"s3://test:test@bkt-state/a/b/.lock{s3.query()}"
    local = StudyPaths(Path("/tmp/x"))  # a local study keeps its layout
    assert local.state == Path("/tmp/x") and local.lock == Path("/tmp/x/.lock")


@pytest.mark.parametrize("which, needle", [
    ("scheme", "not a usable storage URI"),
    ("nobucket", "must name a bucket"),
    ("missing", "cannot write there"),
    ("unreachable", "cannot write there"),
    ("silent", "cannot write there (no answer within 3 s"),
])
def test_bad_uri_exits_2_before_anything_is_written(s3, tmp_path, state_dir, monkeypatch,
                                                    capsys, which, needle):
    import socket
    import time

    # an endpoint that accepts connections and never answers: the SDK alone waits ~100 s
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    monkeypatch.setenv("GRANET_STORAGE_TIMEOUT_S", "3")
    uri = {"scheme": "foo://bucket/x",
           "nobucket": f"s3:///x{s3.query()}",
           "missing": s3.uri("s3://test:test@no-such-bucket-7", "x"),
           "unreachable": "s3://test:test@b/x?endpoint_override=127.0.0.1:9&scheme=http"
                          "&region=us-east-1",
           "silent": f"s3://test:test@b/x?endpoint_override=127.0.0.1:"
                     f"{silent.getsockname()[1]}&scheme=http&region=us-east-1"}[which]
    monkeypatch.chdir(tmp_path)
    t0 = time.time()
    try:
        code = run_command(lambda: run("plasticity", [f"study_dir={uri}", *TINY], smoke=True))
    finally:
        silent.close()
    assert time.time() - t0 < 30
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("granet: error: study_dir=") and needle in err
    assert uri.split("?")[0].split("@")[-1] in err
    if "test:test@" in uri:  # the URI's secret key is never printed, its access key is
        assert "test:test@" not in err and "s3://test:***@" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no "s3:" folder, no state dir


def test_smoke_plasticity_study_on_s3_resumes_from_the_bucket(ray_session, s3, tmp_path,
                                                             tmp_path_factory, state_dir,
                                                             monkeypatch):
    bucket = s3.bucket()
    uri = s3.uri(bucket, "studies/plast")
    paths = StudyPaths(uri)
    seed_mlflow_db(paths.state, tmp_path_factory)
    monkeypatch.chdir(tmp_path)
    worker_cache = Path("~/.cache/granet/studies/s3").expanduser() / bucket.split("@")[-1]
    try:
        first = run_tiny_plasticity(uri)
        assert first["status"] == "finished", first
        assert first["statuses"] == {"done": 10} and first["launched"] == {"trunk": 2,
                                                                           "probe": 8}
        assert first["study_dir"] == uri
        root = paths.root
        names = {p.path[len(root.path) + 1:] for p in root.rglob("*")}
        assert {"study.json", "summary.json", "plasticity_summary.csv",
                "ray/trunk-experiments.json", "ray/probe-experiments.json"} <= names
        assert len([n for n in names if n.startswith("results/trials/")]) == 10
        assert len([n for n in names if n.startswith("results/probes/")]) == 8
        assert len([n for n in names if n.startswith("checkpoints/")]) == 4  # 2 trunks x t=1,3
        assert any(n.startswith("figures/plasticity") and n.endswith(".png") for n in names)
        assert any(n.startswith("ray/trunk-") and "/" in n[4:] for n in names)  # Tune's files
        assert ".lock" not in names  # released
        summary = json.loads((root / "summary.json").read_text())
        assert summary["statuses"] == {"done": 10}
        probes = results.read_table(uri, "probes").to_pylist()
        assert len(probes) == 8 and all(p["acc_after"] is not None for p in probes)
        # nothing landed on local disk under an "s3:" name
        assert not (tmp_path / "s3:").exists() and not (ROOT / "s3:").exists()
        assert (paths.state / "mlflow.db").is_file()
        again = run_tiny_plasticity(uri)
        assert again["launched"] == {"trunk": 0, "probe": 0}
        assert again["statuses"] == {"done": 10}
    finally:
        shutil.rmtree(worker_cache, ignore_errors=True)  # the Ray workers' data cache
        for d in (worker_cache.parent, worker_cache.parent.parent):  # ...and the folders made
            try:  # for it, when nothing else is in them
                d.rmdir()
            except OSError:
                pass


def test_mlflow_spool_in_a_bucket_syncs_to_a_store(s3, tmp_path, monkeypatch, tmp_path_factory):
    """A trial on a worker that lost MLflow spools into the study's bucket (the driver, on
    another machine, must see it); ``sync`` uploads it from there and empties it."""
    import socket

    from mlflow.tracking import MlflowClient

    from granet.study import mlflow_spool as ms
    from granet.study.mlflow_sync import sync
    from granet.study.tracking import StudyTracker, TrialRun

    paths = StudyPaths(s3.uri(s3.bucket(), "studies/spool"))
    assert isinstance(paths.mlflow_spool, UriPath)
    db = seed_mlflow_db(tmp_path / "store", tmp_path_factory)
    uri = f"sqlite:///{db}"
    tracker = StudyTracker(uri, experiment="exp", study="st", kind="plasticity",
                           artifact_root=tmp_path / "art", spool=paths.mlflow_spool)
    info = tracker.tracking_info()
    with socket.socket() as sock:  # a port nobody listens on: the trial's server is gone
        sock.bind(("127.0.0.1", 0))
        info["uri"] = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run = TrialRun(info, trial_key="k1", stage="probe", study="st", parent_key="t1",
                   run_name="probe k1", params={"lr": 0.1}, lazy=True)
    for e in (1, 2):
        run.add_epochs([{"epoch": e, "test_acc": 0.25 * e}])
        run.flush()
    art = tmp_path / "layer_densities.csv"
    art.write_text("layer,density\nfc,0.1\n")
    run.log_artifact(art)
    run.finish("FINISHED")
    assert run.offline
    assert not (Path.cwd() / "s3:").exists() and not (tmp_path / "s3:").exists()
    spooled = ms.RunSpool(paths.mlflow_spool, "k1")
    assert (paths.mlflow_spool / "k1" / "ops.jsonl").is_file()  # in the bucket
    assert spooled.read().status == "FINISHED"
    tracker.finish("FINISHED")

    res = sync(str(paths.mlflow_spool), uri)
    assert res.uploaded == ["k1"] and res.created == 1 and res.artifacts == 1
    assert not (paths.mlflow_spool / "k1").exists()
    c = MlflowClient(tracking_uri=uri)
    kid = c.search_runs([tracker.experiment_id],
                        filter_string="tags.`granet.trial_key` = 'k1'")[0]
    assert [(m.step, m.value) for m in c.get_metric_history(kid.info.run_id, "test_acc")] == \
        [(1, 0.25), (2, 0.5)]
    assert [a.path for a in c.list_artifacts(kid.info.run_id)] == ["layer_densities.csv"]
    assert kid.info.status == "FINISHED"


@pytest.mark.slow
def test_bucket_gone_mid_study_ends_it_at_once_naming_the_uri(ray_session, tmp_path, state_dir):
    """The S3 server dies while probes run (SIGTERM by PID): the first failing trial makes the
    driver probe the bucket and end the study with one ``granet: error:`` naming the URI (exit
    1, nothing claims success), instead of every trial spending its retries against it (ten
    minutes, then a pyarrow traceback, before this was handled)."""
    import time

    from .test_faults import SMOKE_PL, _driver, _wait_rows

    server = S3Server(tmp_path).start()
    try:
        uri = server.uri(server.bucket(), "studies/gone")
        proc = _driver([*SMOKE_PL, "--set", f"study_dir={uri}"], slow=0.4)
        _wait_rows(uri, "probe", 1, proc)
        server.stop()
        t_stop = time.time()
        out, err = proc.communicate(timeout=600)
        elapsed = time.time() - t_stop
    finally:
        server.stop()
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("granet: error: the study's storage s3://"), err[-3000:]
    assert "studies/gone" in last and "stopped working while the study ran" in last
    assert "run the same command again" in last
    assert "Traceback" not in err.split("granet: error:")[-1]
    assert " finished in " not in out  # nothing claims success
    assert elapsed < 180, elapsed


@pytest.mark.slow
def test_interrupted_study_on_s3_restores_its_tune_experiment_from_the_bucket(
        ray_session, s3, tmp_path, state_dir, monkeypatch):
    """Ctrl-C mid-probes on an ``s3://`` study, then the same command: the unfinished Tune
    experiment is restored from the bucket (Tuner.restore with its pyarrow file system) and only
    the probes that had not finished run."""
    import os
    import signal

    from .test_faults import SMOKE_PL, _driver, _wait_rows

    uri = s3.uri(s3.bucket(), "studies/resume")
    proc = _driver([*SMOKE_PL, "--set", f"study_dir={uri}"], slow=0.4)
    _wait_rows(uri, "probe", 2, proc)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    before = set(results.trial_statuses(uri, "probe"))
    assert 2 <= len(before) < 8
    monkeypatch.chdir(tmp_path)
    again = run("plasticity", [f"study_dir={uri}", "ratios=[0.5]", *TINY], smoke=True)
    assert again["status"] == "finished", again
    assert again["launched"] == {"trunk": 0, "probe": 8 - len(before)}, again
    assert again["statuses"] == {"done": 10}
    manifest = json.loads((StudyPaths(uri).experiments_manifest("probe")).read_text())
    assert len(manifest) == 1  # restored, not a second experiment for the same probes
