"""scripts/start_mlflow_server.sh: idempotent, stale PID files, a server that dies.

A stand-in ``mlflow`` (first on PATH) answers /health like the real server and records how it was
started, so the script's own logic is tested in seconds; the real ``mlflow server`` goes through
the same script in the two-node test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster.localcluster import REPO, free_ports

SCRIPT = REPO / "scripts" / "start_mlflow_server.sh"

FAKE_MLFLOW = '''#!{python}
"""Stand-in for `mlflow server`: records its argv/env, serves /health (or dies if told)."""
import http.server, json, os, sys
args = sys.argv[1:]
opt = dict(zip(args[1::2], args[2::2]))
with open(os.environ["FAKE_MLFLOW_RECORD"], "a") as f:
    f.write(json.dumps({{"argv": args, "pid": os.getpid(), "pgid": os.getpgid(0),
                        "job_execution": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION")}})
            + "\\n")
if os.environ.get("FAKE_MLFLOW_DIE"):
    print("fake mlflow: dying as told", flush=True)
    sys.exit(3)

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")
    def log_message(self, *a):
        pass

http.server.HTTPServer((opt["--host"], int(opt["--port"])), H).serve_forever()
'''


@pytest.fixture
def env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "mlflow"
    fake.write_text(FAKE_MLFLOW.format(python=sys.executable))
    fake.chmod(0o755)
    e = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
         "PYTHON": sys.executable, "FAKE_MLFLOW_RECORD": str(tmp_path / "record.jsonl")}
    e.pop("FAKE_MLFLOW_DIE", None)
    yield e, tmp_path
    for rec in _records(tmp_path):  # stop what the script started, by process group
        try:
            os.killpg(rec["pgid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def _records(tmp_path: Path) -> list[dict]:
    f = tmp_path / "record.jsonl"
    return [json.loads(ln) for ln in f.read_text().splitlines()] if f.exists() else []


def _run(env, tmp_path, port, extra_env=None, state="state"):
    args = [str(SCRIPT), "127.0.0.1", str(port), f"sqlite:///{tmp_path}/db/mlflow.db",
            str(tmp_path / "artifacts"), str(tmp_path / state)]
    return subprocess.run(args, env={**env, **(extra_env or {})}, capture_output=True,
                          text=True, timeout=60)


def test_starts_once_then_does_nothing(env):
    e, tmp = env
    (port,) = free_ports(1)
    first = _run(e, tmp, port)
    assert first.returncode == 0, first.stderr
    assert "answers at http://127.0.0.1:" in first.stdout
    (rec,) = _records(tmp)
    # its own session (stoppable as a group), one worker, no job runner, explicit Host list
    assert rec["pgid"] == rec["pid"]
    assert rec["job_execution"] == "false"
    argv = rec["argv"]
    assert argv[0] == "server" and argv[argv.index("--workers") + 1] == "1"
    hosts = argv[argv.index("--allowed-hosts") + 1].split(",")
    assert f"127.0.0.1:{port}" in hosts and f"localhost:{port}" in hosts
    assert (tmp / "db").is_dir() and (tmp / "artifacts").is_dir()
    assert (tmp / "state" / "mlflow.pid").read_text().strip() == str(rec["pid"])

    t0 = time.time()
    second = _run(e, tmp, port)
    assert second.returncode == 0 and "nothing to do" in second.stdout
    assert time.time() - t0 < 10
    assert len(_records(tmp)) == 1  # no second server


def test_stale_pid_file_and_a_dying_server(env):
    e, tmp = env
    (port,) = free_ports(1)
    state = tmp / "state"
    state.mkdir()
    # a PID that is alive but no mlflow server (this test's own process): not waited for
    (state / "mlflow.pid").write_text(str(os.getpid()))
    ok = _run(e, tmp, port)
    assert ok.returncode == 0 and "starting" in ok.stdout, ok.stdout + ok.stderr
    assert len(_records(tmp)) == 1

    (port2,) = free_ports(1)
    dead = _run(e, tmp, port2, {"FAKE_MLFLOW_DIE": "1"}, state="state2")
    assert dead.returncode == 1
    assert "mlflow server exited" in dead.stderr and "dying as told" in dead.stderr
