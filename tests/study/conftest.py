"""Shared fixtures of the study tests (engineers A and B): one real Ray session for the whole test
session, a real MLflow server on 127.0.0.1, and tiny-study helpers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

# Tiny MNIST-1D trunks/probes: a few seconds of training per study on 2 cores.
TINY = [
    "train.data.num_samples=1000",
    "train.data.batch_size=64",
    "train.model.name=mlp",
    "train.model.kwargs={hidden: [32, 32]}",
]


@pytest.fixture(scope="session")
def ray_session():
    """ray.init(num_cpus=2) once per test session (shut down at the end)."""
    import ray

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
    yield ray
    if started:
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` (sqlite backend, proxied artifacts) on 127.0.0.1; its URL.

    Started with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false and --workers 1 (2 processes instead of
    13); stopped by the PID (process group) of the process started here.
    """
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [exe, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log_text = (root / "server.log").read_text()
                raise RuntimeError(f"mlflow server did not start: {log_text}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the group of the server started above
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def run_tiny_plasticity(study_dir: Path, extra: list[str] = (), **kw):
    from granet.study.plasticity import run_plasticity_study

    return run_plasticity_study(
        None, [f"study_dir={study_dir}", "ratios=[0.5]", *TINY, *extra], True, **kw
    )


@pytest.fixture(scope="session")
def tiny_plasticity(ray_session, tmp_path_factory):
    """A tiny plasticity study (2 trunks x 2 epochs t x ratio 0.5 x regen off/on = 10 trials) run
    twice against sqlite; the first trial to reach epoch 2 fails once (GRANET_TEST_FAIL_ONCE)."""
    root = tmp_path_factory.mktemp("plasticity")
    marker = root / "fail-once.marker"
    os.environ["GRANET_TEST_FAIL_ONCE"] = str(marker)
    try:
        t0 = time.time()
        first = run_tiny_plasticity(root / "study")
        first_s = time.time() - t0
    finally:
        os.environ.pop("GRANET_TEST_FAIL_ONCE", None)
    t0 = time.time()
    second = run_tiny_plasticity(root / "study")
    return {"dir": root / "study", "first": first, "second": second, "marker": marker,
            "first_s": first_s, "second_s": time.time() - t0}
