"""Comparison study: real Ray Tune + MLflow on tiny MNIST-1D runs; the table vs the Parquet."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from granet.config import ConfigError
from granet.study.base import load_study_config
from granet.study.compare import CompareStudy
from granet.study.results import read_table
from tests.study.helpers import ROOT, run, smoke_study, tiny_compare_yaml

CONFIG = ROOT / "studies/configs/compare_mnist1d.yaml"


def _tiny(tmp_path: Path, study_dir: Path, **fields) -> Path:
    return tiny_compare_yaml(tmp_path / "c.yaml", study_dir, **fields)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("methods=[{label: X, method: lottery}]", "methods[0].method='lottery': must be one of"),
        ("methods=[{label: A, method: set}, {label: A, method: rigl}]",
         "methods[1].label='A': must be unique"),
        ("methods=[{label: A, method: set, sett: {}}]", "methods[0].sett: unknown key"),
        ("methods=[{label: G, method: granet, set: {sparsity.init_density: 0.5}}]",
         "methods[0] (G) at sparsity 0.3 seed 0: sparsity.final_density=0.7: must be <= "
         "sparsity.init_density=0.5"),
        ("methods=[{label: G, method: gmp, set: {sparsity.regen_speed: 1}}]",
         "sparsity.regen_speed: unknown field"),
        ("sparsities=[0.9, 1.2]", "sparsities=[0.9, 1.2]: each must be in (0, 1)"),
        ("sparsities=[0.9, 0.9]", "sparsities=[0.9, 0.9]: must not repeat"),
        ("seeds=[]", "seeds=[]: must hold at least one seed"),
        ("seeds=[1, 1]", "seeds=[1, 1]: must not repeat"),
        ("methods=[]", "methods=[]: must hold at least one method"),
        ("cpus_per_trial=0", "cpus_per_trial=0.0: must be > 0"),
        ("gpus_per_trial=1.5", "gpus_per_trial=1.5: must be a whole number above 1"),
        ("max_failures=-1", "max_failures=-1: must be >= 0"),
        ("name=a/b", "name='a/b': must be non-empty, without spaces or slashes"),
        ("tracking_uri=mlflow.db", "tracking_uri='mlflow.db': must be an absolute sqlite:////"),
        ("tracking_uri=sqlite:///rel.db", "tracking_uri='sqlite:///rel.db': must be an absolute"),
        ("train.model.name=os:system", "model.name"),
        ("train.data.name=imagenet", "data.name='imagenet': must be one of"),
    ],
)
def test_bad_compare_config_raises_before_any_work(tmp_path, override, needle):
    study_dir = tmp_path / "never"
    cfg = _tiny(tmp_path, study_dir, sparsities=[0.3])
    with pytest.raises(ConfigError) as exc:
        run("compare", [override], cfg)
    assert needle in str(exc.value)
    assert not study_dir.exists()


def test_plan_shipped_config():
    study = load_study_config(CompareStudy, CONFIG)
    trials = study.trials()
    # dense once per seed, every other method at every sparsity and seed
    assert len(trials) == 3 * (1 + 6 * 3)
    assert len({t.key for t in trials}) == len(trials)
    g05 = [t for t in trials if t.labels["label"] == "GraNet (s_i=0.5)"]
    assert {t.train["sparsity"]["init_density"] for t in g05} == {0.5}
    assert {t.train["sparsity"]["final_density"] for t in g05} == {0.1, 0.05, 0.02}
    # the smoke version has its own name and directory
    smoke = load_study_config(CompareStudy, CONFIG, smoke_test=True)
    assert smoke.name == "compare_mnist1d-smoke" and smoke.study_dir != study.study_dir
    assert Path(smoke.study_dir).name == "compare_mnist1d-smoke"


def test_compare_smoke_table_matches_parquet(ray_session, tmp_path_factory, tmp_path):
    smoke = smoke_study("compare", tmp_path_factory)
    d, s = smoke["dir"], smoke["summary"]
    assert s["planned"] == {"compare": 14} and s["statuses"] == {"done": 14}  # 7 methods x 2
    assert s["failed"] == {"compare": 0}
    # Independent recomputation from the *epochs* table (last epoch of each trial), labels from
    # the trials table's spec_json.
    spec = {r["key"]: json.loads(r["spec_json"])
            for r in read_table(d, "trials", "compare").to_pylist()}
    last: dict[str, dict] = {}
    for r in read_table(d, "epochs", "compare").to_pylist():
        if r["key"] not in last or r["epoch"] > last[r["key"]]["epoch"]:
            last[r["key"]] = r
    assert set(last) == set(spec)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for key, r in last.items():
        groups[(spec[key]["label"], spec[key]["sparsity"])].append(r)
    table = pq.read_table(d / "compare_table.parquet").to_pylist()
    assert len(table) == len(groups) == 7
    dense_flops = np.mean([r["train_flops"] for (lab, _), rows in groups.items()
                           if lab == "Dense" for r in rows])
    for row in table:
        rows = groups[(row["label"], row["sparsity"])]
        assert row["n_seeds"] == 2
        for stem, col in (("final_test_acc", "test_acc"), ("test_at_best_val", "test_at_best_val"),
                          ("density", "density"),
                          ("inference_flops_ratio", "inference_flops_ratio"),
                          ("train_flops", "train_flops")):
            vals = np.array([r[col] for r in rows], dtype=float)
            assert row[f"{stem}_mean"] == pytest.approx(vals.mean(), rel=1e-12, abs=1e-12)
            assert row[f"{stem}_std"] == pytest.approx(vals.std(ddof=1), rel=1e-9, abs=1e-12)
        assert row["train_flops_ratio"] == pytest.approx(row["train_flops_mean"] / dense_flops)
    order = [r["label"] for r in table]
    assert order == ["Dense", "Static", "SET", "RigL", "GMP", "GraNet (s_i=0)",
                     "GraNet (s_i=0.5)"]
    for r in table[1:]:
        assert r["density_mean"] == pytest.approx(0.1, abs=2e-3)
        assert r["inference_flops_ratio_mean"] < 0.2
    md = (d / "compare_table.md").read_text()
    assert md.count("\n| ") == 1 + 7  # header + one row per (method, sparsity)
    dense = table[0]
    m, sd = dense["final_test_acc_mean"] * 100, dense["final_test_acc_std"] * 100
    assert f"| Dense | 0% | 1.0000 | {m:.2f} ± {sd:.2f} |" in md
    # A re-run finds every trial done and runs nothing.
    again = run("compare", ["study_dir=" + str(d)], CONFIG, smoke=True)
    assert again["launched"] == {"compare": 0} and again["statuses"] == {"done": 14}
