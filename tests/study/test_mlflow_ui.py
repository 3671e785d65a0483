"""The MLflow UI of a real (smoke) study, served on 127.0.0.1 and opened in headless Chromium:
the study's parent run and its child runs, a child's metrics and the parent's artifacts (figures,
tables) must show (scripts/check_mlflow_ui.sh); the check writes nothing into the study."""

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


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_mlflow_ui_shows_runs_metrics_and_artifacts(ray_session, tmp_path_factory, tmp_path):
    from mlflow.tracking import MlflowClient

    d = smoke_study("search", tmp_path_factory)["dir"]
    out = tmp_path / "ui"  # outside the study directory
    assert not out.resolve().is_relative_to(d.resolve())
    env_py = str(Path(sys.executable))
    env = {"PATH": f"{Path(env_py).parent}:/usr/bin:/bin", "PYTHON": env_py,
           "CHROMIUM": CHROMIUM, "HOME": str(tmp_path)}
    before = _tree(d)
    # an output directory inside the study is refused before anything is created
    inside = subprocess.run(
        ["bash", str(ROOT / "scripts/check_mlflow_ui.sh"), str(d), str(d / "ui-check")],
        capture_output=True, text=True, timeout=60, env=env)
    assert inside.returncode == 2 and "must lie outside the study directory" in inside.stderr
    assert _tree(d) == before
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/check_mlflow_ui.sh"), str(d), str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # nothing written into the study directory (sqlite may leave a journal while open)
    assert {p for p in _tree(d) - before if not p.startswith("mlflow.db-")} == set()
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

    # a child's page shows its metrics: test_acc with its last value, as the UI prints it
    child = res["parents"][0]["child"]
    run = client.get_run(child["run_id"])
    assert run.info.run_name in {k.info.run_name for k in kids}
    acc = run.data.metrics["test_acc"]
    assert child["test_acc"] == acc and child["metrics"] == len(run.data.metrics) >= 20
    child_dom = (out / f"child-{child['run_id']}.html").read_text()
    for name in ("test_acc", "val_acc", "density", "train_flops"):
        assert _shows(name, child_dom), name
    i = child_dom.index(">test_acc<")
    assert re.search(r'title="' + re.escape(repr(acc)) + '"', child_dom[i:i + 800])

    # the parent's artifacts: the figures (PNG + PDF) and the tables, listed in the UI
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")} | \
        {a.path for a in client.list_artifacts(parent.info.run_id, "tables")}
    assert {"figures/search_history.png", "figures/search_history.pdf",
            "tables/summary.json"} <= arts
    fig_dom = (out / f"artifacts-{parent.info.run_id}-figures.html").read_text()
    tab_dom = (out / f"artifacts-{parent.info.run_id}-tables.html").read_text()
    for path, dom in [(a, fig_dom if a.startswith("figures/") else tab_dom) for a in arts]:
        assert f'artifact-name="{path.split("/")[1]}"' in dom, path
    assert re.search(r'<img[^>]*alt="figures/search_history.png"[^>]*src="blob:', fig_dom)
    assert _shows("tables/summary.json", tab_dom) and _shows('"status"', tab_dom)
    shot = (out / f"artifacts-{parent.info.run_id}-figures.png").read_bytes()
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000
    # the server was stopped by its PID (process group) when the script ended
    pid = int((out / "server.pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
