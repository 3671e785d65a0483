"""The MLflow UI of a real (smoke) study, served on 127.0.0.1 and opened in headless Chromium:
the study's parent run and its child runs must show (scripts/check_mlflow_ui.sh)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.study.helpers import ROOT, smoke_study

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="headless Chromium not installed (Debian: apt-get update && apt-get install -y "
    "chromium); the MLflow UI check needs a real browser",
)


def _shows(name: str, dom: str) -> bool:
    return re.search(r">\s*" + re.escape(name) + r"\s*<", dom) is not None


def test_mlflow_ui_shows_parent_and_child_runs(ray_session, tmp_path_factory, tmp_path):
    from mlflow.tracking import MlflowClient

    d = smoke_study("search", tmp_path_factory)["dir"]
    out = tmp_path / "ui"
    env_py = str(Path(sys.executable))
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/check_mlflow_ui.sh"), str(d), str(out)],
        capture_output=True, text=True, timeout=300,
        env={"PATH": f"{Path(env_py).parent}:/usr/bin:/bin", "PYTHON": env_py,
             "CHROMIUM": CHROMIUM, "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "result.json").read_text())
    assert res["ok"] and len(res["parents"]) == 1
    # Independently of the script's own check: names straight from the store vs the DOM.
    client = MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}")
    exp = client.get_experiment_by_name("granet")
    parent = client.search_runs([exp.experiment_id],
                                filter_string="tags.`granet.stage` = 'study'")[0]
    kids = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert parent.info.run_name == "search_mnist1d-smoke" and len(kids) == 3
    run_dom = (out / f"run-{parent.info.run_id}.html").read_text()
    exp_dom = (out / f"experiment-{exp.experiment_id}.html").read_text()
    assert _shows(parent.info.run_name, exp_dom) and _shows(parent.info.run_name, run_dom)
    assert "Child runs" in run_dom
    for k in kids:
        assert _shows(k.info.run_name, run_dom), k.info.run_name
    png = (out / f"run-{parent.info.run_id}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    # the server was stopped by its PID (process group) when the script ended
    pid = int((out / "server.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
