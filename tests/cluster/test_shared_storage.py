"""A worker node that cannot see the head's disk (its own mount namespace, a tmpfs over the
shared directory): a local study_dir is refused before any trial runs; an s3:// study_dir (a
real S3-compatible server, moto, on 127.0.0.1) runs trials on both nodes.

The S3 endpoint and credentials reach the job's driver and every worker through the nodes'
environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...), as README's cluster section says.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.cluster.localcluster import LocalCluster
from tests.cluster.test_two_nodes import (
    N_PROBES,
    N_TRUNKS,
    _check_complete,
    _check_mlflow,
    _markers,
    _study_args,
    _workdir,
)
from tests.study.s3server import S3Server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_env(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto")).start()
    env = {"AWS_ENDPOINT_URL": f"http://{server.endpoint}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the nodes and the client inherit them
    try:
        yield server
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture(scope="module")
def blind_cluster(cluster_bin, s3_env):
    cluster = LocalCluster(cluster_bin, private_worker_shared=True)
    try:
        cluster.bring_up()
        yield cluster
    finally:
        cluster.stop()


def test_worker_cannot_see_the_head_disk(blind_cluster):
    c = blind_cluster
    (c.shared / "seen-by-head").write_text("x")
    assert set(c.node_ids()) == {"head", "worker"}
    # the refusal below is about this: the worker's view of `shared` is an empty tmpfs
    wd = _workdir(c.root, "blind-local")
    log_dir = c.root / "models-local"
    study_dir = c.shared / "studies" / "blind-local"
    t0 = time.time()
    proc = c.submit(wd, _study_args(log_dir), study_dir=study_dir)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "granet: error: a multi-node Ray cluster needs storage every node sees" in out, \
        c.diagnostics(out)
    assert "node 127.0.0.3" in out and f"study_dir={str(study_dir)!r}" in out
    assert "s3://" in out  # the fix
    assert "node 127.0.0.2" not in out  # the head sees it
    assert _markers(log_dir) == []  # no trial built a model
    from granet.study.results import read_table

    assert read_table(study_dir, "trials").num_rows == 0
    assert not list(study_dir.glob(".granet-visible-*"))  # the marker is removed
    print(f"\n[storage] refused in {time.time() - t0:.1f} s (job submit to exit)")


def test_s3_study_dir_runs_on_both_nodes(blind_cluster, s3_env):
    c = blind_cluster
    bucket = s3_env.bucket().split("@", 1)[1]  # credentials come from the environment
    uri = f"s3://{bucket}/studies/blind-s3"
    wd = _workdir(c.root, "blind-s3")
    log_dir = c.root / "models-s3"
    proc = c.submit(wd, _study_args(log_dir), study_dir=uri)
    if proc.returncode != 0:
        pytest.fail(c.diagnostics(proc.stdout + proc.stderr))
    trials, _ = _check_complete(uri)
    assert len(trials) == N_TRUNKS + N_PROBES
    nodes = {m["node_id"] for m in _markers(log_dir)}
    assert nodes == set(c.node_ids().values()), (nodes, c.node_ids())
    _check_mlflow(c.mlflow_url, trials[0]["study"], {r["key"] for r in trials})
    assert not (wd / "s3:").exists()
    from granet.study.storage import study_path

    root = study_path(uri)
    assert (root / "summary.json").is_file() and (root / "plasticity_summary.csv").is_file()
    assert len(list((root / "checkpoints").rglob("epoch-*.pt"))) == 2 * N_TRUNKS
