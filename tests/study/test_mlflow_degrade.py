"""MLflow that degrades, not kills, on real processes: a study whose MLflow server is killed
(by PID) and kept down finishes (exit 0) with its runs spooled, then ``granet study
sync-mlflow`` uploads them once a server is back on the same store; a server whose artifact
destination cannot be written gets the metrics, and the artifacts follow with the sync."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from granet.study import results
from granet.study.mlflow_spool import PARENT, STALL_BOUND_S, RunSpool, spools
from granet.study.paths import StudyPaths

from .conftest import MlflowServer
from .helpers import ROOT, script_env, summary_of
from .test_faults import SMOKE_PL, _driver, kill_server_after_first_trunk

pytestmark = pytest.mark.slow


def _sync(sd: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "granet", "study", "sync-mlflow", str(sd),
                           *extra], cwd=ROOT, env=script_env(join_ray=False),
                          capture_output=True, text=True, timeout=300)


def _runs(url: str) -> tuple[list, list]:
    c = MlflowClient(tracking_uri=url)
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("granet.stage") == "study"]
    return parents, [r for r in runs if "granet.trial_key" in r.data.tags]


def _epoch_rows(sd: Path) -> dict[str, int]:
    t = results.read_table(sd, "epochs")
    keys = t.column("key").to_pylist()
    return {k: keys.count(k) for k in set(keys)}


def _assert_complete(url: str, sd: Path) -> None:
    """Every trial's run exists once, with each epoch once, params, tags, its artifact and
    status FINISHED; the parent too."""
    c = MlflowClient(tracking_uri=url)
    parents, kids = _runs(url)
    assert [p.info.status for p in parents] == ["FINISHED"]
    parent = parents[0]
    assert parent.data.params  # the study's params
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "tables")}
    assert "tables/summary.json" in arts
    statuses = results.trial_statuses(sd)
    keys = [r.data.tags["granet.trial_key"] for r in kids]
    assert sorted(keys) == sorted(statuses) and len(set(keys)) == len(keys)
    epochs = _epoch_rows(sd)
    for r in kids:
        key = r.data.tags["granet.trial_key"]
        assert r.info.status == "FINISHED", key
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["granet.status"] == "done"
        assert r.data.params, key
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "epoch")]
        assert len(steps) == len(set(steps)) == epochs[key], (key, steps)
        assert [a.path for a in c.list_artifacts(r.info.run_id)] == ["layer_densities.csv"]


def test_server_killed_and_kept_down_then_synced(ray_session, tmp_path):
    server, sd, proc = kill_server_after_first_trunk(tmp_path)  # ...and it stays down
    t_kill = time.time()
    try:
        out, err = proc.communicate(timeout=400)
        after_kill = time.time() - t_kill
        assert proc.returncode == 0, out[-2000:] + err[-3000:]
        assert results.trial_statuses(sd) and \
            set(results.trial_statuses(sd).values()) == {"done"}
        # MLflow's defaults retried ~4 min per failed call (the probe pack, then the parent);
        # bounded, the rest of the study takes less than two bounds of stall
        assert after_kill < 2 * STALL_BOUND_S, after_kill
        s = summary_of(sd)
        assert s["status"] == "finished" and s["statuses"] == {"done": 5}
        pend = s["mlflow_pending"]
        probes = sorted(results.trial_statuses(sd, "probe"))
        # the probes, and the trunk when the kill came before it closed its run
        n = len(pend["keys"])
        assert pend["parent"] and set(probes) <= set(pend["keys"]) and pend["of"] == 5
        cmd = f"granet study sync-mlflow {sd} --tracking-uri {server.url}"
        assert pend["command"] == cmd
        assert f"MLflow: {n} of 5 trial runs (and the parent) did not fully reach " \
            f"{server.url}" in err and cmd in err
        end = [ln for ln in out.splitlines() if " finished in " in ln]
        assert len(end) == 1 and end[0].endswith("; MLflow incomplete (see below)"), out
        assert cmd in out
        # each spooled run failed once, then stopped calling the server
        for sp in spools(StudyPaths(sd).mlflow_spool):
            assert len(sp.read().failures) == 1, sp.name
        assert RunSpool(StudyPaths(sd).mlflow_spool, PARENT).read().status == "FINISHED"

        # a sync while the server is down: one error line naming the URI, exit 2, spool kept
        down = _sync(sd)
        assert down.returncode == 2, down.stderr[-2000:]
        assert down.stderr.startswith(f"granet: error: MLflow tracking URI {server.url}")
        assert len(spools(StudyPaths(sd).mlflow_spool)) == n + 1

        server.start()  # back, on the same port and store
        t0 = time.time()
        up = _sync(sd)
        sync_s = time.time() - t0
        assert up.returncode == 0, up.stdout + up.stderr[-3000:]
        assert up.stdout.startswith(f"uploaded {n} trial runs and the parent run to "
                                    f"{server.url}")
        assert spools(StudyPaths(sd).mlflow_spool) == []
        assert "mlflow_pending" not in summary_of(sd)
        _assert_complete(server.url, sd)
        again = _sync(sd)
        assert again.returncode == 0 and again.stdout.startswith("nothing to upload")
        _assert_complete(server.url, sd)
        print(f"\nkill -> study end {after_kill:.1f} s (bound {STALL_BOUND_S:.0f} s per "
              f"failed call); sync {sync_s:.1f} s")
    finally:
        server.stop()


def test_artifact_destination_unwritable_keeps_metrics_and_spools_artifacts(ray_session,
                                                                            tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file: no directory can be made under it (even as root)")
    server = MlflowServer(root, artifacts=str(blocker / "artifacts"))
    server.start()
    sd = tmp_path / "study"
    try:
        proc = _driver([*SMOKE_PL, "--set", f"study_dir={sd}", "--set",
                        "trunk_densities=[0.1]", "--tracking-uri", server.url])
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-2000:] + err[-3000:]
        assert set(results.trial_statuses(sd).values()) == {"done"}
        s = summary_of(sd)
        pend = s["mlflow_pending"]
        assert pend["parent"] and pend["trial_runs"] == 5 and pend["what"] == \
            ["artifacts", "status"], pend
        # metrics reached the server: every epoch of every trial, in a run still open
        c = MlflowClient(tracking_uri=server.url)
        _, kids = _runs(server.url)
        epochs = _epoch_rows(sd)
        assert len(kids) == 5
        for r in kids:
            steps = [m.step for m in c.get_metric_history(r.info.run_id, "epoch")]
            assert len(steps) == epochs[r.data.tags["granet.trial_key"]]
            assert r.info.status == "RUNNING"  # its status waits in the spool
        for sp in spools(StudyPaths(sd).mlflow_spool):
            run = sp.read()
            assert run.failures[0]["what"].startswith("artifact upload"), run.failures
            assert run.header["run_id"]
        # the destination is fixed, the server restarted on the same store: sync
        server.stop()
        blocker.unlink()
        blocker.mkdir()
        server.start()
        up = _sync(sd)
        assert up.returncode == 0, up.stdout + up.stderr[-3000:]
        assert "0 runs created" in up.stdout
        _assert_complete(server.url, sd)
        assert json.loads((sd / "summary.json").read_text()).get("mlflow_pending") is None
    finally:
        server.stop()
