"""Faults on real processes: Ctrl-C, two drivers on one study, a killed driver, corrupt files,
unreachable and vanishing services, environment faults. Each test breaks something real (a
signal to a driver process, a killed MLflow server, a truncated file, a read-only or full file
system) and then checks what was kept and that the next run finishes the study."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from granet.study import results
from granet.study.paths import StudyPaths

from .conftest import MlflowServer
from .faults import CorruptBeforeProbe, FailAtEpoch
from .helpers import ROOT, TINY, run, run_tiny_plasticity, script_env, summary_of

# every test here runs or breaks real study processes: 5-60 s each on 2 cores
pytestmark = pytest.mark.slow


def _driver(args: list[str], slow: float = 0.0, join_ray: bool = True) -> subprocess.Popen:
    """A study driver process (``granet study ...`` with an optional slow-down injected)."""
    kind = args[0]
    cmd = [sys.executable, "-m", "tests.study.drive", kind, "--slow", str(slow), "--",
           *args[1:]]
    return subprocess.Popen(cmd, cwd=ROOT, env=script_env(join_ray), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_rows(study_dir: Path, stage: str, n: int, proc: subprocess.Popen,
               timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(results.trial_statuses(study_dir, stage)) >= n:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"driver ended early ({proc.returncode}): {out[-2000:]}"
                                 f"{err[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"fewer than {n} {stage} trials finished in {timeout} s")


def _client(study_dir: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{Path(study_dir) / 'mlflow.db'}")


def _runs(study_dir: Path) -> list:
    c = _client(study_dir)
    return c.search_runs([e.experiment_id for e in c.search_experiments()], max_results=5000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SMOKE_PL = ["plasticity", "--smoke-test", "--set", "ratios=[0.5]", *[
    x for o in TINY for x in ("--set", o)]]


# ---------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_kills_parent_leaves_no_running_child_and_resumes(ray_session, tmp_path):
    sd = tmp_path / "study"
    proc = _driver([*SMOKE_PL, "--set", f"study_dir={sd}"], slow=0.4)
    _wait_rows(sd, "probe", 2, proc)
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    assert "granet: error: [probe] interrupted" in err
    assert "Resume with:" in err
    assert " finished in " not in out  # nothing claims success
    s = summary_of(sd)
    assert s["status"] == "interrupted" and s["figures"] == []
    runs = _runs(sd)
    parent = [r for r in runs if r.data.tags.get("granet.stage") == "study"]
    assert [p.info.status for p in parent] == ["KILLED"]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    # progress counters never overshoot the stage's total
    for line in out.splitlines():
        if line.startswith("[probe] ") and "/" in line:
            done, total = line.split()[1].split("/")
            assert int(done) <= int(total), line
    # the same command again finishes the study, from where it stopped
    before = results.trial_statuses(sd)
    again = run_tiny_plasticity(sd)
    assert again["status"] == "finished"
    assert again["statuses"] == {"done": 10}
    finished_probes = [k for k, st in before.items() if st == "done"
                       and k not in results.trial_statuses(sd, "trunk")]
    assert again["launched"]["probe"] == 8 - len(finished_probes)
    runs = _runs(sd)
    assert [r.info.status for r in runs if r.data.tags.get("granet.stage") == "study"] == \
        ["FINISHED"]
    keys = [r.data.tags["granet.trial_key"] for r in runs if "granet.trial_key" in r.data.tags]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 10  # no second run per trial


# ---------------------------------------------------------------------------- two drivers


def test_second_driver_on_the_same_study_is_refused(ray_session, tmp_path):
    sd = tmp_path / "study"
    first = _driver([*SMOKE_PL, "--set", f"study_dir={sd}"], slow=0.3)
    _wait_rows(sd, "trunk", 0, first)
    deadline = time.time() + 120
    while not StudyPaths(sd).lock.exists() and time.time() < deadline:
        time.sleep(0.2)
    t0 = time.time()
    second = subprocess.run(
        [sys.executable, "-m", "granet", "study", *SMOKE_PL, "--set", f"study_dir={sd}"],
        cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"granet: error: study directory '{sd}' is in use by another granet driver (pid " \
        f"{first.pid} on {socket.gethostname()}" in second.stderr
    assert time.time() - t0 < 60
    out, err = first.communicate(timeout=400)
    assert first.returncode == 0, err[-3000:]
    # every trial trained once: one MLflow run each, one epochs row per epoch
    keys = [r.data.tags["granet.trial_key"] for r in _runs(sd)
            if "granet.trial_key" in r.data.tags]
    assert len(keys) == len(set(keys)) == 10
    epochs = results.read_table(sd, "epochs").to_pylist()
    assert len(epochs) == len({(e["key"], e["epoch"]) for e in epochs})


def test_two_drivers_started_at_the_same_instant(ray_session, tmp_path):
    """No MLflow migration race: exactly one holds the study, the other is refused at once."""
    sd = tmp_path / "study"
    procs = [_driver([*SMOKE_PL, "--set", f"study_dir={sd}", "--set", "trunk_densities=[0.1]",
                      "--set", "probe_epochs=[1]"]) for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-2000:] for o in outs]
    refused = outs[[p.returncode for p in procs].index(2)][1]
    assert "is in use by another granet driver" in refused
    assert summary_of(sd)["statuses"] == {"done": 3}


# ---------------------------------------------------------------------------- killed drivers


def test_killed_plasticity_driver_resumes_without_rerunning_finished_trials(ray_session,
                                                                            tmp_path):
    sd = tmp_path / "study"
    proc = _driver([*SMOKE_PL, "--set", f"study_dir={sd}"], slow=0.4)
    _wait_rows(sd, "probe", 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver (and its process group), no cleanup
    proc.wait(timeout=30)
    finished = {r["key"]: r["finished_at"] for r in
                results.read_table(sd, "trials").to_pylist()}
    again = run_tiny_plasticity(sd)
    assert again["status"] == "finished" and again["statuses"] == {"done": 10}
    after = {r["key"]: r["finished_at"] for r in results.read_table(sd, "trials").to_pylist()}
    # a restored Tune experiment relaunches trials that were running; finished ones are not
    # trained again (not even for 0 epochs): their rows are untouched
    assert all(after[k] == v for k, v in finished.items())
    runs = _runs(sd)
    keys = [r.data.tags["granet.trial_key"] for r in runs if "granet.trial_key" in r.data.tags]
    assert len(keys) == len(set(keys)) == 10
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_killed_search_driver_keeps_finished_trials(ray_session, tmp_path):
    """A search killed after a trial finished: on resume that trial is COMPLETE in Optuna (its
    results exist), nothing is re-asked, no orphan rows."""
    import optuna
    from optuna.trial import TrialState

    from .helpers import tiny_search_yaml

    sd = tmp_path / "study"
    cfg = tiny_search_yaml(tmp_path / "s.yaml", sd, num_samples=3, max_concurrent=1)
    proc = _driver(["search", str(cfg), "--quiet"], slow=0.5)
    _wait_rows(sd, "search", 1, proc)
    time.sleep(1.0)  # the next trial is running when the driver dies
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    storage = f"sqlite:///{sd / 'optuna.db'}"
    before = optuna.load_study(study_name="tiny_search", storage=storage).trials
    done_keys = set(results.trial_statuses(sd, "search"))
    again = run("search", [], cfg)
    trials = optuna.load_study(study_name="tiny_search", storage=storage).trials
    by_key = {t.user_attrs.get("trial_key"): t for t in trials}
    for key in done_keys:  # finished before the kill -> COMPLETE, with the recorded value
        assert by_key[key].state == TrialState.COMPLETE
        row = [r for r in results.read_table(sd, "trials", "search").to_pylist()
               if r["key"] == key][0]
        assert by_key[key].value == pytest.approx(row["best_val_acc"])
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and again["finished_trials"] == 3
    assert len(trials) <= len(before) + 3 - len(done_keys)
    rows = set(results.trial_statuses(sd, "search"))
    assert rows == {t.user_attrs["trial_key"] for t in complete}  # no orphan rows


# ---------------------------------------------------------------------------- corrupt files


def test_unreadable_trunk_checkpoint_fails_probe_once_then_trunk_retrains(ray_session,
                                                                          tmp_path):
    sd = tmp_path / "study"
    marker = tmp_path / "corrupt.marker"
    extra = ["trunk_densities=[0.1]", "probe_epochs=[1]", "regen=[false]"]
    first = run_tiny_plasticity(sd, extra, trainable=CorruptBeforeProbe(marker))
    bad = Path(marker.read_text())
    statuses = results.trial_statuses(sd, "probe")
    assert list(statuses.values()) == ["failed"]  # one start, no pointless retries
    key = next(iter(statuses))
    row = results.read_table(sd, "trials", "probe").to_pylist()[0]
    assert f"checkpoint {str(bad)!r}: cannot be read: truncated" in row["message"]
    assert "delete it and re-run" in row["message"]
    assert (StudyPaths(sd).failure(key)).read_text().startswith("trunk checkpoint unusable")
    assert first["failed"] == {"trunk": 0, "probe": 0} and first["statuses"]["failed"] == 1
    trunk_runs = [r for r in _runs(sd) if r.data.tags.get("granet.stage") == "trunk"]
    steps_before = sorted(m.step for m in _client(sd).get_metric_history(
        trunk_runs[0].info.run_id, "test_acc"))
    # the re-run finds the unreadable file, retrains the trunk and runs the probe
    again = run_tiny_plasticity(sd, extra)
    assert again["launched"] == {"trunk": 1, "probe": 1}
    assert again["statuses"] == {"done": 2}
    from granet.io import load_checkpoint

    assert load_checkpoint(bad)["epoch"] == 1
    # MLflow logging is idempotent per step: the retrained trunk's run has each epoch once
    steps = sorted(m.step for m in _client(sd).get_metric_history(trunk_runs[0].info.run_id,
                                                                  "test_acc"))
    assert steps == steps_before == [1, 2, 3, 4]


def test_truncated_parquet_file_is_named_and_its_trial_reruns(ray_session, tmp_path, capsys):
    sd = tmp_path / "study"
    extra = ["trunk_densities=[0.1]", "probe_epochs=[1]", "regen=[false]"]
    run_tiny_plasticity(sd, extra)
    probe_key = next(iter(results.trial_statuses(sd, "probe")))
    f = results.table_path(sd, "epochs", "probe", probe_key)
    f.write_bytes(f.read_bytes()[:100])
    again = run_tiny_plasticity(sd, extra)
    assert again["launched"] == {"trunk": 0, "probe": 1}
    assert results.scan_table(sd, "epochs")[1] == {}  # rewritten, readable
    assert again["statuses"] == {"done": 2}


# ---------------------------------------------------------------------------- services


@pytest.mark.parametrize(
    "args, env, needle",
    [
        (["--tracking-uri", "http://127.0.0.1:{port}"], {},
         "MLflow tracking URI http://127.0.0.1:{port} (from tracking_uri): not reachable"),
        ([], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"},
         "(from MLFLOW_TRACKING_URI (environment)): not reachable"),
        ([], {"MLFLOW_TRACKING_URI": "mlruns"},
         "MLFLOW_TRACKING_URI (environment)='mlruns': must be an absolute sqlite:////"),
        (["--tracking-uri", "mysql://u:p@127.0.0.1:{port}/mlflow"], {},
         "no database driver for mysql is installed"),
        (["--ray-address", "127.0.0.1:1"], {}, "Ray cluster at 127.0.0.1:1: not reachable"),
        (["--set", "gpus_per_trial=1"], {}, "gpus_per_trial=1.0: this machine has 0 GPUs"),
        (["--set", "cpus_per_trial=64"], {}, "cpus_per_trial=64.0: this machine has"),
        (["--set", "train.data.download=true", "--set", "train.data.name=cifar10",
          "--set", "train.data.data_dir={tmp}/nodata"], {}, "data"),
    ],
)
def test_unusable_service_or_resource_fails_fast_and_writes_nothing(tmp_path, args, env, needle):
    port = _free_port()
    sd = tmp_path / "study"
    fill = {"port": port, "tmp": tmp_path}
    cmd = [sys.executable, "-m", "granet", "study", *SMOKE_PL, "--set", f"study_dir={sd}",
           *[a.format(**fill) for a in args]]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**script_env(join_ray=False),
                               **{k: v.format(**fill) for k, v in env.items()}})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("granet: error: ") and len(proc.stderr.splitlines()) == 1, \
        proc.stderr[-3000:]
    assert needle.format(**fill) in proc.stderr
    assert "u:p@" not in proc.stderr  # a URI's password is never printed
    assert time.time() - t0 < 45
    assert not sd.exists()


def kill_server_after_first_trunk(tmp_path: Path) -> tuple[MlflowServer, Path, subprocess.Popen]:
    """A smoke study (1 trunk, 4 probes, slowed) logging to a real MLflow server, which is
    SIGKILLed once the trunk has finished: (the server, stopped; the study dir; the driver)."""
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    server.start()
    sd = tmp_path / "study"
    try:
        proc = _driver([*SMOKE_PL, "--set", f"study_dir={sd}", "--set",
                        "trunk_densities=[0.1]", "--tracking-uri", server.url], slow=0.3)
        _wait_rows(sd, "trunk", 1, proc)
    except BaseException:
        server.stop()
        raise
    server.stop(signal.SIGKILL)  # the server dies mid-study
    return server, sd, proc


def test_mlflow_server_going_away_mid_study_is_survived(ray_session, tmp_path):
    server, sd, proc = kill_server_after_first_trunk(tmp_path)
    try:
        time.sleep(4)
        server.start()  # ...and comes back on the same port and store
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, out[-2000:] + err[-3000:]
        c = MlflowClient(tracking_uri=server.url)
        runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
        kids = [r for r in runs if "granet.trial_key" in r.data.tags]
        assert len(kids) == 5 and all(r.info.status == "FINISHED" for r in kids)
        assert summary_of(sd)["statuses"] == {"done": 5}
    finally:
        server.stop()


# ---------------------------------------------------------------------------- environment


def _granet_study(sd: Path, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "granet", "study", *SMOKE_PL, "--set", f"study_dir={sd}",
         *extra], cwd=ROOT, env=script_env(join_ray=False), capture_output=True, text=True,
        timeout=timeout)


def test_study_dir_under_a_regular_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    proc = _granet_study(f / "study")
    assert proc.returncode == 2
    assert f"granet: error: study_dir='{f / 'study'}': '{f}' is a regular file, not a " \
        "directory" in proc.stderr
    assert f.read_text() == "x"


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                       capture_output=True)
    return r.returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    mounted: list[Path] = []

    def make(name: str, options: str) -> Path:
        p = tmp_path / name
        if not _mount_tmpfs(p, options):
            pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN (CI and this machine "
                        "kind have it); the read-only and full-disk faults need a real mount")
        mounted.append(p)
        return p

    yield make
    for p in mounted:
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


def test_read_only_file_system(tmpfs):
    ro = tmpfs("ro", "ro,size=1m")
    proc = _granet_study(ro / "study")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Read-only file system" in proc.stderr
    assert "choose a writable study_dir" in proc.stderr
    assert list(ro.iterdir()) == []


def test_disk_full_mid_study_stops_cleanly_keeping_what_finished(ray_session, tmpfs):
    small = tmpfs("small", "size=3m")
    sd = small / "study"
    proc = subprocess.run(
        [sys.executable, "-m", "granet", "study", *SMOKE_PL, "--set", f"study_dir={sd}",
         "--set", "max_failures=0"],
        cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"granet: error: No space left on device ({sd}) while the study ran; free some space")
    # (the lines above it are Ray's own log of the trials that hit the full disk)
    assert not (sd / "summary.json").exists() or summary_of(sd)["status"] != "finished"
    # what finished is readable; nothing half-written stands under a final name
    for table in results.TABLES:
        results.scan_table(sd, table)
    for r in results.read_table(sd, "trials").to_pylist():
        assert r["status"] in ("done", "failed")


# ---------------------------------------------------------------------------- divergence


def test_diverged_trials_are_recorded_and_left_out_of_the_table(ray_session, tmp_path):
    """A method with a learning rate of 1e6 diverges at once: its trials end "diverged" with
    their last finite metrics (Parquet, MLflow tag, console, summary), are not retried, and the
    comparison table leaves them out of the means and counts them."""
    from .helpers import tiny_compare_yaml

    sd = tmp_path / "study"
    cfg = tiny_compare_yaml(tmp_path / "c.yaml", sd, seeds=[0], methods=[
        {"label": "SET", "method": "set"},
        {"label": "SET lr=1e6", "method": "set", "set": {"optim.lr": 1.0e6}}])
    out = run("compare", [], cfg)
    assert out["status"] == "finished" and out["failed"] == {"compare": 0}
    assert out["statuses"] == {"done": 1, "diverged": 1}
    rows = {r["status"]: r for r in results.read_table(sd, "trials").to_pylist()}
    bad = rows["diverged"]
    assert bad["message"].startswith("diverged at epoch 1 (non-finite")
    assert bad["resumed_from"] == 0  # one start: not retried
    # the masks were never updated from non-finite weights: the density is the target's
    assert bad["density"] is None or bad["density"] == pytest.approx(0.1, abs=0.01)
    run_tags = {r.data.tags.get("granet.status") for r in _runs(sd)
                if "granet.trial_key" in r.data.tags}
    assert run_tags == {"done", "diverged"}
    import pyarrow.parquet as pq

    table = {r["label"]: r for r in pq.read_table(sd / "compare_table.parquet").to_pylist()}
    assert table["SET lr=1e6"]["n_diverged"] == 1 and table["SET lr=1e6"]["n_seeds"] == 0
    assert table["SET lr=1e6"]["final_test_acc_mean"] is None
    assert "(1 diverged)" in (sd / "compare_table.md").read_text()
    again = run("compare", [], cfg)  # a diverged trial is a result: not re-run
    assert again["launched"] == {"compare": 0}


def test_failed_trial_message_points_at_the_copy_in_the_study_dir(ray_session, tmp_path,
                                                                  capsys):
    sd = tmp_path / "study"
    extra = ["max_failures=0", "trunk_densities=[0.1]", "probe_epochs=[1]", "regen=[false]"]
    out = run_tiny_plasticity(sd, extra, trainable=FailAtEpoch(tmp_path / "m", stage="trunk"),
                              quiet=False)
    assert out["failed"] == {"trunk": 1, "probe": 0} and out["status"] == "failed"
    key = (tmp_path / "m").read_text().split()[0]
    copy = StudyPaths(sd).failure(key)
    printed = capsys.readouterr().out
    assert f"failed (no retries left): {copy}" in printed
    assert "injected failure" in copy.read_text()
    assert "[probe] 1 probes skipped: their trunk did not finish" in printed


def test_killed_worker_recovers_from_its_checkpoint(tiny_plasticity):
    """The session fixture SIGKILLed one trial's Ray worker at epoch 2: the trial restarted in
    a new worker from its own checkpoint (time to recover printed for the README)."""
    kill_key, kill_t = tiny_plasticity["marker"].read_text().split()
    starts = [line.split() for line in (tiny_plasticity["marker"].parent / "fault.marker.starts")
              .read_text().splitlines()]
    restart = [float(t) for k, t in starts if k == kill_key and float(t) > float(kill_t)]
    assert len(restart) == 1
    row = [r for r in results.read_table(tiny_plasticity["dir"], "trials").to_pylist()
           if r["key"] == kill_key][0]
    assert row["resumed_from"] == 2 and row["status"] == "done"
    print(f"\nrecovery: SIGKILL of a trial's worker -> trial restarted in "
          f"{restart[0] - float(kill_t):.2f} s, resumed at epoch 2 (0 epochs lost)")
