"""Reports: figures from the Parquet tables alone (synthetic tables and real smoke studies)."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread

from granet.study import results
from granet.study.optuna_store import search_schema
from granet.study.paths import StudyPaths
from granet.study.report import make_report
from granet.study.report.figures import _lr_decays
from granet.study.report.tables import write_compare_table
from tests.study.helpers import run_script, smoke_study

PNG = b"\x89PNG\r\n\x1a\n"


def _png_ok(path, min_bytes: int = 8000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > min_bytes, path
    h, w = imread(path).shape[:2]
    assert h > 200 and w > 300


def _synthetic_study(d) -> None:
    """Schema-conformant rows in every table the report reads."""
    trunks = {1.0: "trunk-dense", 0.5: "trunk-d50"}
    for dens, key in trunks.items():
        cfg = {"optim": {"schedule": "multistep", "milestones": [4, 7]}}
        results.write_rows(d, "trials", "trunk", key, [{
            "key": key, "study": "synth", "stage": "trunk", "status": "done",
            "config_json": json.dumps(cfg), "spec_json": "{}", "method": "static", "seed": 0,
            "epochs": 10, "density": dens}])
    n = 0
    for dens, tkey in trunks.items():
        for regen in (False, True):
            for ratio in (0.2, 0.5, 0.9):
                for t in (0, 2, 4, 6, 8):
                    for kind in ("plasticity", "gap"):
                        lr = 0.1 * 0.1 ** sum(t >= m for m in (4, 7))
                        val = -ratio * (1.0 - 10 * lr) * (0.5 if regen else 1.0) * 0.1
                        n += 1
                        results.write_rows(d, "probes", "probe", f"p{n}", [{
                            "key": f"p{n}", "study": "synth", "trunk_key": tkey, "kind": kind,
                            "trunk_method": "static", "trunk_density": dens, "seed": 0,
                            "model": "mlp", "epoch_t": t, "ratio": ratio, "regen": regen,
                            "scope": "global", "structure": "unstructured", "k": 2, "lr_t": lr,
                            "acc_before": 0.8, "acc_after": 0.8 + val,
                            "plasticity": val if kind == "plasticity" else None,
                            "final_gap": val if kind == "gap" else None}])
    rows = []
    for i in range(6):
        state = "PRUNED" if i in (2, 4) else "COMPLETE"
        rows.append({"study": "synth", "number": i, "state": state, "value": 0.5 + 0.05 * i,
                     "value_2": 1e6 * (1 + i % 3), "objective": "best_val_acc",
                     "objective_2": "train_flops", "direction": "max", "direction_2": "min",
                     "params": "{}", "trial_key": f"search-{i}", "mlflow_run_id": None,
                     "started": 0.0,
                     "duration_s": 1.0, "best": i in (3, 5)})
    path = d / "results/search/stage=search/optuna.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=search_schema()), path)
    for k, (label, method, s) in enumerate([("Dense", "dense", 0.0), ("RigL", "rigl", 0.9),
                                            ("GraNet", "granet", 0.9)]):
        for seed in (0, 1):
            key = f"c{k}{seed}"
            results.write_rows(d, "trials", "compare", key, [{
                "key": key, "study": "synth", "stage": "compare", "status": "done",
                "config_json": "{}", "method": method, "seed": seed, "epochs": 3,
                "spec_json": json.dumps({"label": label, "method": method, "sparsity": s,
                                         "seed": seed, "order": k}),
                "test_acc": 0.7 + 0.01 * seed + 0.02 * k, "test_at_best_val": 0.7,
                "density": 1 - s, "inference_flops_ratio": 1 - s,
                "train_flops": 1e9 * (1 - s / 2)}])


def test_report_from_synthetic_tables(tmp_path):
    d = tmp_path / "synth"
    d.mkdir()
    _synthetic_study(d)
    write_compare_table(StudyPaths(d), "synth")
    outs = make_report(d)
    names = sorted(p.name for p in outs)
    assert names == sorted(["plasticity.png", "final_gap.png", "search_history.png",
                            "search_pareto.png", "compare_accuracy.png"])
    for p in outs:
        if p.suffix == ".png":
            assert p.parent == d / "figures"
            _png_ok(p)
    md = (d / "compare_table.md").read_text()
    assert "| GraNet | 90% | 0.1000 | 74.50 ± 0.71 |" in md
    # LR decays: from the trunk config, else the trunk's epoch LRs, else the probes' lr_t.
    probes = results.read_table(d, "probes").to_pylist()
    assert _lr_decays(d, probes) == {"trunk-dense": [4.0, 7.0], "trunk-d50": [4.0, 7.0]}
    e = tmp_path / "no-config"
    e.mkdir()
    results.write_rows(e, "epochs", "trunk", "tk", [
        {"key": "tk", "stage": "trunk", "epoch": i + 1, "lr": 0.1 * 0.1 ** (i >= 3)}
        for i in range(6)])
    fake = [{"trunk_key": "tk", "epoch_t": 0, "lr_t": 0.1},
            {"trunk_key": "lt", "epoch_t": 2, "lr_t": 0.1},
            {"trunk_key": "lt", "epoch_t": 5, "lr_t": 0.01}]
    assert _lr_decays(e, fake) == {"tk": [3.0], "lt": [5.0]}


def test_report_no_tables_writes_nothing(tmp_path):
    assert make_report(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        make_report(tmp_path / "missing")
    # `granet report` on a directory without results says so and fails
    proc, _ = run_script(["-m", "granet", "report", str(tmp_path)], join_ray=False)
    assert proc.returncode == 2
    assert f"granet: error: study directory {str(tmp_path)!r}: holds no study results" in \
        proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_report_from_real_smoke_studies_logs_to_parent_run(ray_session, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    for kind, want in (("compare", {"compare_accuracy.png"}),
                       ("search", {"search_history.png"})):
        d = smoke_study(kind, tmp_path_factory)["dir"]
        outs = make_report(d)
        assert {p.name for p in outs} == want
        for p in outs:
            if p.suffix == ".png":
                _png_ok(p)
        client = MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}")
        exp = client.get_experiment_by_name("granet")
        parent = client.search_runs([exp.experiment_id],
                                    filter_string="tags.`granet.stage` = 'study'")[0]
        logged = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
        assert {f"figures/{n}" for n in want if n.endswith(".png")} <= logged
    table = pq.read_table(smoke_study("compare", tmp_path_factory)["dir"]
                          / "compare_table.parquet")
    assert not any(math.isnan(v) for v in table.column("final_test_acc_mean").to_pylist())
