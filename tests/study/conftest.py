"""Shared fixtures of the study tests: one real Ray session for the whole test session, real
MLflow servers on 127.0.0.1 (started and stopped by PID), and a tiny plasticity study run twice
with a fault injected into one trial."""

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


class MlflowServer:
    """A real ``mlflow server`` (sqlite backend, proxied artifacts) on 127.0.0.1.

    Started with MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false and --workers 1 (2 processes instead of
    13); stopped by the PID of its process group, and restartable on the same port and store.
    """

    def __init__(self, root: Path, port: int | None = None, artifacts: str | None = None) -> None:
        self.root, self.port = root, port or _free_port()
        self.artifacts = artifacts or str(root / "artifacts")  # --artifacts-destination
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> None:
        exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.root / "server.log", "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [exe, "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", self.artifacts, "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        log.close()
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: "
                                   f"{(self.root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the group of the server started above
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """The URL of a real MLflow server shared by the session's tests."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_plasticity(ray_session, tmp_path_factory):
    """A tiny plasticity study (2 trunks x 2 epochs t x ratio 0.5 x regen off/on = 10 trials) run
    twice against sqlite; the first trial to reach epoch 2 kills its own Ray worker once
    (SIGKILL) and is retried from its checkpoint."""
    from tests.study.faults import FailAtEpoch
    from tests.study.helpers import run_tiny_plasticity

    root = tmp_path_factory.mktemp("plasticity")
    marker = root / "fault.marker"
    t0 = time.time()
    first = run_tiny_plasticity(root / "study", trainable=FailAtEpoch(marker, how="sigkill"))
    first_s = time.time() - t0
    t0 = time.time()
    second = run_tiny_plasticity(root / "study")
    return {"dir": root / "study", "first": first, "second": second, "marker": marker,
            "first_s": first_s, "second_s": time.time() - t0}
