"""A real two-node Ray cluster (head + worker on loopback addresses, token auth, the MLflow server
of the head's start command), brought up and used with the README's cluster commands.

The job runs from a clean working directory holding only ``my_study.yaml`` and a user package
``src/mypkg`` that exists nowhere else (shipped by ``py_modules``). The user model records, each
time a trial builds it, the Ray node, process and Tune trial it runs in: that is how the test
sees which trial ran on which node (the study's tables carry no node).

Tests run in this order on one cluster: the job on both nodes, token refusal, then the killed
worker (the worker stays dead).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.cluster.localcluster import marked_pids

pytestmark = pytest.mark.slow

USER_NETS = '''\
"""A user model package that exists only in the job's working dir (shipped with py_modules)."""

import json
import os
import time
from pathlib import Path

from torch import nn


class Slowed(nn.Module):
    """Sleeps ``delay`` seconds per forward pass: trials long enough to kill one mid-way."""

    def __init__(self, inner: nn.Module, delay: float) -> None:
        super().__init__()
        self.inner, self.delay = inner, delay

    def forward(self, x):
        time.sleep(self.delay)
        return self.inner(x)


def tiny_mlp(num_classes, input_shape, hidden=32, delay=0.0, log_dir=None):
    if log_dir:
        rec = {"pid": os.getpid(), "time": time.time(), "node_id": None, "actor_id": None,
               "trial": None}
        try:
            import ray

            ctx = ray.get_runtime_context()
            rec["node_id"], rec["actor_id"] = ctx.get_node_id(), ctx.get_actor_id()
            from ray import tune

            rec["trial"] = tune.get_context().get_trial_name()
        except Exception:
            pass
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns()}-{os.getpid()}.json"
        Path(log_dir, "." + name).write_text(json.dumps(rec))
        os.replace(Path(log_dir, "." + name), Path(log_dir, name))
    n = 1
    for d in input_shape:
        n *= d
    net = nn.Sequential(nn.Flatten(), nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                        nn.ReLU(), nn.Linear(hidden, num_classes))
    return Slowed(net, delay) if delay else net
'''

# The smoke plasticity grid with one ratio: 2 trunks (4 epochs) + 2 trunks x t in {1, 3} x regen
# off/on = 8 probes (2 epochs), on the user's model.
N_TRUNKS, N_PROBES = 2, 8


def _workdir(root: Path, name: str) -> Path:
    """A clean job directory: my_study.yaml and src/mypkg/ only."""
    wd = root / f"job-{name}"
    (wd / "src" / "mypkg").mkdir(parents=True)
    (wd / "src" / "mypkg" / "__init__.py").write_text("")
    (wd / "src" / "mypkg" / "nets.py").write_text(USER_NETS)
    (wd / "my_study.yaml").write_text(
        f"name: {name}\nexperiment: granet-cluster-test\nmax_failures: 3\n"
    )
    return wd


def _study_args(log_dir: Path, delay: float = 0.0) -> list[str]:
    return [
        "--smoke-test",
        "--set", "ratios=[0.5]",
        "--set", "train.model.name=mypkg.nets:tiny_mlp",
        "--set", f"train.model.kwargs={{hidden: 32, delay: {delay}, log_dir: '{log_dir}'}}",
    ]


def _markers(log_dir: Path) -> list[dict]:
    """Trial-side model builds (the driver's own checks, if any, have no actor)."""
    out = []
    for p in sorted(log_dir.glob("[0-9]*.json")):
        rec = json.loads(p.read_text())
        if rec.get("actor_id") and rec.get("trial"):
            out.append(rec)
    return out


def _tables(study_dir: Path):
    from granet.study.results import read_table

    return read_table(study_dir, "trials").to_pylist(), read_table(study_dir, "probes").to_pylist()


def _check_complete(study_dir: Path) -> tuple[list[dict], list[dict]]:
    trials, probes = _tables(study_dir)
    stages = sorted(r["stage"] for r in trials)
    assert stages == ["probe"] * N_PROBES + ["trunk"] * N_TRUNKS, stages
    assert len({r["key"] for r in trials}) == len(trials), "duplicate trials rows"
    assert all(r["status"] == "done" for r in trials), [r["status"] for r in trials]
    assert len(probes) == N_PROBES and len({r["key"] for r in probes}) == N_PROBES
    return trials, probes


def _check_mlflow(url: str, study: str, trial_keys: set[str]) -> int:
    """One FINISHED child run per trial under the study's parent run; returns the run count."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    exp = client.get_experiment_by_name("granet-cluster-test")
    assert exp is not None, "the study's experiment is not on the MLflow server"
    runs = client.search_runs([exp.experiment_id], f"tags.`granet.study` = '{study}'",
                              max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    keys = [r.data.tags.get("granet.trial_key") for r in children]
    assert sorted(keys) == sorted(trial_keys), "one child run per trial, no more"
    assert {r.info.status for r in children} == {"FINISHED"}
    return len(runs)


def test_job_runs_trials_on_both_nodes(local_cluster, tmp_path):
    c = local_cluster
    ids = c.node_ids()
    assert set(ids) == {"head", "worker"}, ids
    wd = _workdir(c.root, "cluster-smoke")
    log_dir = c.root / "models-1"
    study_dir = c.shared / "studies" / "cluster-smoke"
    t0 = time.time()
    proc = c.submit(wd, _study_args(log_dir), study_dir=study_dir)
    total = time.time() - t0
    if proc.returncode != 0:
        pytest.fail(c.diagnostics(proc.stdout + proc.stderr))
    # the working dir stayed clean: the job wrote only to study_dir and the MLflow server
    assert sorted(str(p.relative_to(wd)) for p in wd.rglob("*")) == [
        "my_study.yaml", "src", "src/mypkg", "src/mypkg/__init__.py", "src/mypkg/nets.py"]

    trials, _ = _check_complete(study_dir)
    marks = _markers(log_dir)
    first = min(m["time"] for m in marks)
    node_of = {}
    for m in marks:
        node_of.setdefault(m["trial"], set()).add(m["node_id"])
    # every trial built the user's model inside a Tune trial on some node; the probes of one
    # trunk epoch run together, as one packed Tune trial named after its members' keys
    from collections import defaultdict

    from granet.study.base import pack_key

    packs: dict[tuple, list[str]] = defaultdict(list)
    for r in trials:
        if r["stage"] == "probe":
            spec = json.loads(r["spec_json"])
            packs[(r["parent_key"], spec["epoch_t"], spec["kind"])].append(r["key"])
    pack_of = {k: f"probe-{pack_key(keys)}" for keys in packs.values() for k in keys}
    for r in trials:
        name = (pack_of.get(r["key"]) or f"{r['stage']}-{r['key']}")[:60]
        assert name in node_of, f"no model build recorded for {name}"
    per_node = {n: sum(1 for s in node_of.values() if ids[n] in s) for n in ids}
    assert per_node["head"] >= 1 and per_node["worker"] >= 1, per_node
    n_runs = _check_mlflow(c.mlflow_url, trials[0]["study"], {r["key"] for r in trials})
    print(f"\n[cluster] ray job submit -> first trial running: {first - t0:.1f} s; "
          f"job end to end {total:.1f} s; trials per node {per_node}; MLflow runs {n_runs}; "
          f"start-up {c.timings}")


def test_user_package_travels_by_py_modules(local_cluster):
    """Without the README's --runtime-env-json, src/mypkg is shipped with the working dir but is
    not importable (src/ is not on the path): the study stops before any trial."""
    c = local_cluster
    wd = _workdir(c.root, "no-py-modules")
    argv = c.job_argv(_study_args(c.root / "models-none"), c.shared / "no-py-modules")
    i = argv.index("--runtime-env-json")
    proc = c.run(argv[:i] + argv[i + 2:], env=c.client_env(), cwd=wd, timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "mypkg.nets:tiny_mlp" in out and "No module named 'mypkg'" in out, out[-3000:]
    assert not (c.root / "models-none").exists()  # no trial built a model


def test_token_is_required(local_cluster):
    c = local_cluster
    wd = _workdir(c.root, "refused")
    empty_home = c.root / "home-without-token"
    empty_home.mkdir()
    cases = {
        # token mode, no token anywhere: refused before anything is sent
        "missing": (c.client_env(HOME=str(empty_home)),
                    "couldn't find an authentication token"),
        # token mode, a wrong token: the server refuses it (403)
        "wrong": (c.client_env(RAY_AUTH_TOKEN="0" * 32),
                  "Forbidden: Invalid authentication token"),
        # RAY_AUTH_MODE not exported (clients default to disabled): no token is sent, even with
        # the token file in place (401)
        "not exported": (c.client_env(RAY_AUTH_MODE="disabled"),
                         "Unauthorized: Missing authentication token"),
    }
    for name, (env, message) in cases.items():
        proc = c.submit(wd, ["--smoke-test"], study_dir=c.shared / "refused", env=env,
                        timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"{name}: the job was accepted:\n{out[-3000:]}"
        assert "AuthenticationError" in out and message in out, f"{name}:\n{out[-3000:]}"
    # nothing ran: no study directory, no job besides the first test's
    assert not (c.shared / "refused").exists()
    jobs = c.api("/api/jobs/")
    assert all("refused" not in json.dumps(j) for j in jobs), jobs
    # the dashboard's HTTP API itself: 401 without a token, 403 with a wrong one
    for token, code in (("", 401), ("0" * 32, 403)):
        with pytest.raises(urllib.error.HTTPError) as err:
            c.api("/api/jobs/", token=token)
        assert err.value.code == code


def test_mlflow_start_is_idempotent(local_cluster):
    """The head's MLflow step again (as on a second `ray up`): nothing starts; the server takes
    its own URL and an SSH tunnel's Host header, and refuses other names."""
    import psutil

    c = local_cluster
    pidfile = c.home / ".granet-mlflow" / "mlflow.pid"
    pid = pidfile.read_text().strip()
    t0 = time.time()
    proc = c.run(c.mlflow_argv, env=c.node_env["head"], timeout=60)
    assert "already answers" in proc.stdout and "nothing to do" in proc.stdout, proc.stdout
    assert time.time() - t0 < 20
    assert pidfile.read_text().strip() == pid
    servers = [p for p in marked_pids(c.mark)
               if "server" in psutil.Process(p).cmdline()
               and any(a.endswith("mlflow") for a in psutil.Process(p).cmdline())]
    assert servers == [int(pid)]

    def status(host: str) -> int:
        # /health answers any Host; the tracking API checks it
        req = urllib.request.Request(
            c.mlflow_url + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default",
            headers={"Host": host})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    port = c.ports["mlflow"]
    assert status(f"127.0.0.2:{port}") == 200  # the URL the nodes use
    assert status(f"127.0.0.1:{port}") == 200  # ssh -L PORT:<head private IP>:PORT
    assert status(f"localhost:{port}") == 200
    assert status(f"mlflow.example.com:{port}") == 403


def test_killed_worker_loses_no_trial(local_cluster):
    c = local_cluster
    import psutil

    ids = c.node_ids()
    wd = _workdir(c.root, "cluster-kill")
    log_dir = c.root / "models-2"
    study_dir = c.shared / "studies" / "cluster-kill"
    # ~0.05 s per forward pass: a trunk epoch takes about a second
    cmd = c.job_argv(_study_args(log_dir, delay=0.05), study_dir)
    t0 = time.time()
    out_path = c.root / "job-kill.out"
    with open(out_path, "w") as out_file:
        job = subprocess.Popen(cmd, cwd=wd, env=c.client_env(), stdout=out_file,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        # wait until the Tune driver has taken a checkpoint of a trunk running on the worker
        # (a line with a checkpoint in the trial's result.json, written by the driver), then
        # kill that node's raylet
        victim, result_json = None, None
        deadline = time.time() + 240
        while victim is None:
            assert job.poll() is None, "the job ended before a trunk ran on the worker"
            assert time.time() < deadline, "no trunk trial ran on the worker node"
            for m in _markers(log_dir):
                if m["node_id"] == ids["worker"] and m["trial"].startswith("trunk-"):
                    for p in study_dir.glob(f"ray/*/{m['trial']}/result.json"):
                        if '"checkpoint_dir_name": "checkpoint_' in p.read_text():
                            victim, result_json = m["trial"][len("trunk-"):], p
            time.sleep(0.1)
        # The whole node dies, as a machine does: SIGKILL its raylet and, in the same instant,
        # every process of it. (Killing the raylet alone is survived differently: the running
        # trial's worker process finishes its trial without the raylet - it talks to the driver
        # directly - and nothing is retried.)
        pids = c.node_pids("worker")
        # the trial writes its epochs rows right before each checkpoint it reports
        epochs_file = (study_dir / "results" / "epochs" / "stage=trunk"
                       / f"trial-{victim}.parquet")
        last_ckpt = epochs_file.stat().st_mtime
        t_kill = time.time()
        for pid in pids:
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        reported = result_json.read_text().count('"checkpoint_dir_name": "checkpoint_')
        job.wait(timeout=400)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    if job.returncode != 0:
        pytest.fail(c.diagnostics(out_path.read_text()))
    total = time.time() - t0

    trials, _ = _check_complete(study_dir)
    victim_row = next(r for r in trials if r["key"] == victim)
    # it resumed from its own last checkpoint (the driver may have taken one more than its
    # result.json showed at the kill), not from epoch 0, and trained again after the restart
    if not reported <= victim_row["resumed_from"] < victim_row["epochs"]:
        pytest.fail(f"resumed_from={victim_row['resumed_from']}, checkpoints seen before the "
                    f"kill: {reported}\n{c.diagnostics(out_path.read_text())}")
    restarts = [m for m in _markers(log_dir)
                if m["trial"] == f"trunk-{victim}" and m["time"] > t_kill]
    assert restarts, "the killed trial never built its model again"
    assert {m["node_id"] for m in restarts} == {ids["head"]}
    recover = min(m["time"] for m in restarts) - t_kill
    _check_mlflow(c.mlflow_url, trials[0]["study"], {r["key"] for r in trials})
    lost = t_kill - last_ckpt
    busy = sum(r["wall_seconds"] for r in trials) + lost
    # the GCS knows the worker is gone and nothing of it runs (nothing can write a late duplicate)
    assert c.alive_nodes() == 1
    assert c.node_processes("worker") == []
    print(f"\n[cluster] killed the worker node {t_kill - t0:.1f} s into the job, in trunk "
          f"{victim[:8]} after its checkpoint at epoch {victim_row['resumed_from']}; "
          f"kill -> trial rebuilt on the head {recover:.1f} s; work lost {lost:.2f} s = "
          f"{lost / busy:.1%} of {busy:.1f} trial-seconds; job {total:.1f} s")
