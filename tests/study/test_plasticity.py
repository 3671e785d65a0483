"""Plasticity study: branching, LR at t, idempotency, bad configs, the script end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from granet.config import ConfigError, config_from_dict
from granet.io import load_checkpoint
from granet.study import results
from granet.study.plasticity import (
    PlasticityStudy,
    branch,
    plan,
    run_plasticity_study,
    state_digest,
)
from granet.study.trainable import build_trainer, trunk_checkpoint_path
from granet.trainer import lr_at_epoch

from .conftest import TINY

REPO = Path(__file__).resolve().parents[2]


def test_first_run_completes_every_trial(tiny_plasticity):
    out = tiny_plasticity["first"]
    assert out["launched"] == {"trunk": 2, "probe": 8}
    assert out["failed"] == {"trunk": 0, "probe": 0}
    assert tiny_plasticity["marker"].exists()  # one trial failed once and was retried
    trials = results.read_table(tiny_plasticity["dir"], "trials")
    assert sorted(trials.column("stage").to_pylist()) == ["probe"] * 8 + ["trunk"] * 2


def test_second_identical_run_launches_zero_trials(tiny_plasticity):
    assert tiny_plasticity["second"]["launched"] == {"trunk": 0, "probe": 0}
    assert tiny_plasticity["second_s"] < tiny_plasticity["first_s"]


def test_probe_branches_from_trunk_state_and_lr_at_t(tiny_plasticity):
    sd = tiny_plasticity["dir"]
    probes = results.read_table(sd, "probes").to_pylist()
    trials = {r["key"]: r for r in results.read_table(sd, "trials").to_pylist()}
    epochs = results.read_table(sd, "epochs").to_pylist()
    assert len(probes) == 8
    for p in probes:
        trunk_cfg = config_from_dict(json.loads(trials[p["trunk_key"]]["config_json"]))
        ckpt = load_checkpoint(trunk_checkpoint_path(sd, p["trunk_key"], p["epoch_t"]))
        # exactly the trunk's weights and masks at t (digest computed in the probe after loading)
        assert p["branch_digest"] == state_digest(ckpt["model"], ckpt["engine"]["masks"])
        lr_t = lr_at_epoch(trunk_cfg, p["epoch_t"])
        assert p["lr_t"] == pytest.approx(lr_t)
        lrs = [e["lr"] for e in epochs if e["key"] == p["key"]]
        assert len(lrs) == p["k"] and all(lr == pytest.approx(lr_t) for lr in lrs)
        # the trunk's test accuracy at t is the "before" of the plasticity
        trunk_t = [e for e in epochs if e["key"] == p["trunk_key"] and e["epoch"] == p["epoch_t"]]
        assert p["acc_before"] == trunk_t[0]["test_acc"]
        assert p["plasticity"] == pytest.approx(p["acc_after"] - p["acc_before"])
        if p["regen"]:
            assert p["regrown"] == p["pruned"] > 0
            assert p["density_after"] == pytest.approx(p["density_before"])
        else:
            assert p["regrown"] == 0
            assert p["density_after"] < p["density_before"]


def test_branch_in_process_tensors(tiny_plasticity, tmp_path):
    """The probe's state right after loading equals the trunk checkpoint at t, tensor by tensor."""
    from granet.study.common import load_study_config

    sd = tiny_plasticity["dir"]
    study = load_study_config(PlasticityStudy, None, [f"study_dir={sd}", "ratios=[0.5]", *TINY],
                              True)
    _, probes = plan(study)
    entry = next(p for p in probes if p["probe_spec"]["regen"])
    spec = entry["probe_spec"]
    ckpt_path = trunk_checkpoint_path(sd, entry["parent_key"], spec["epoch_t"])
    trainer = build_trainer({"train": entry["train"]})
    snap = tmp_path / "branch-start.pt"
    info = branch(trainer, {**spec, "trunk_ckpt": str(ckpt_path), "snapshot": str(snap)})
    trunk, start = load_checkpoint(ckpt_path), load_checkpoint(snap)
    for name, value in trunk["model"].items():
        assert torch.equal(start["model"][name], value), name
    for m_trunk, m_start in zip(trunk["engine"]["masks"], start["masks"], strict=True):
        assert torch.equal(m_trunk, m_start)
    assert start["lr"] == [pytest.approx(lr_at_epoch(config_from_dict(entry["trunk"]["train"]),
                                                     spec["epoch_t"]))] * len(start["lr"])
    assert info["regrown"] == info["pruned"] > 0
    # pruned-then-regrown weights start at 0 and the masks are what the engine applies
    for layer, m in zip(trainer.engine.layers, trainer.engine.masks, strict=True):
        assert torch.all(layer.param.detach()[~m] == 0)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("ratios=[0.2,1.5]", "ratios"),
        ("scopes=[sideways]", "scopes"),
        ("train.optim.lr=-1", "train.optim.lr"),
        ("probe_epochs=[0]", "probe_epochs"),
        ("bogus=1", "bogus"),
        ("trunk_method=magic", "trunk_method"),
    ],
)
def test_bad_config_raises_before_any_work(tmp_path, override, needle):
    sd = tmp_path / "never"
    with pytest.raises(ConfigError, match=needle):
        run_plasticity_study(None, [f"study_dir={sd}", override], True)
    assert not sd.exists()


def test_script_smoke_test_subprocess(ray_session, tmp_path):
    """``python studies/plasticity.py --smoke-test`` end to end (joins this session's Ray via
    RAY_ADDRESS, as under ``ray job submit``)."""
    sd = tmp_path / "smoke"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "RAY_AUTH_MODE": "token"}
    env.pop("GRANET_TEST_FAIL_ONCE", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "studies" / "plasticity.py"), "--smoke-test",
         "--set", f"study_dir={sd}", "--set", "ratios=[0.9]", "--set", "trunk_densities=[0.1]"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MLflow UI: mlflow ui --backend-store-uri sqlite:////" in proc.stdout
    for table in results.TABLES:
        assert results.read_table(sd, table).num_rows > 0, table
    assert (sd / "mlflow.db").is_file()


def test_interrupted_stage_resumes_from_own_checkpoint(ray_session, tmp_path, monkeypatch):
    """A trunk errors at epoch 2 with no retries left: its probes wait. The re-run restores the
    stage's Tune experiment and the trunk resumes from its epoch-2 checkpoint."""
    from .conftest import run_tiny_plasticity

    marker = tmp_path / "fail.marker"
    monkeypatch.setenv("GRANET_TEST_FAIL_ONCE", str(marker))
    extra = ["max_failures=0", "trunk_densities=[0.5]", "regen=[false]", "probe_epochs=[1]",
             "final_gap=true"]
    first = run_tiny_plasticity(tmp_path / "s", extra, quiet=True, report=False)
    assert first["failed"]["trunk"] == 1 and first["launched"]["probe"] == 0
    assert results.read_table(tmp_path / "s", "trials").num_rows == 0
    second = run_tiny_plasticity(tmp_path / "s", extra, quiet=True, report=False)
    assert second["launched"] == {"trunk": 1, "probe": 2}
    assert second["failed"] == {"trunk": 0, "probe": 0}
    trunk = results.read_table(tmp_path / "s", "trials", "trunk").to_pylist()[0]
    assert trunk["resumed_from"] == 2
    # the final-gap probe continues with the rest of the trunk's schedule to the end
    gap = [p for p in results.read_table(tmp_path / "s", "probes").to_pylist()
           if p["kind"] == "gap"][0]
    trunk_cfg = config_from_dict(json.loads(trunk["config_json"]))
    assert gap["k"] == trunk_cfg.run.epochs - 1
    assert gap["final_gap"] == pytest.approx(gap["acc_after"] - gap["trunk_final_acc"])
    assert gap["trunk_final_acc"] == trunk["test_acc"] and gap["plasticity"] is None
    lrs = [e["lr"] for e in results.read_table(tmp_path / "s", "epochs", "probe").to_pylist()
           if e["key"] == gap["key"]]
    assert lrs == pytest.approx([lr_at_epoch(trunk_cfg, 1 + e) for e in range(gap["k"])])


def test_probe_config_continues_the_trunk_schedule():
    from granet.config import Config
    from granet.study.plasticity import probe_config

    trunk = Config()
    trunk.run.epochs, trunk.optim.milestones = 160, [80, 120]
    for t in (10, 79, 80, 81, 119, 121):
        gap = probe_config(trunk, t, "gap", 30)
        assert gap.run.epochs == 160 - t and gap.sparsity.method == "static"
        for e in range(gap.run.epochs):
            assert lr_at_epoch(gap, e) == pytest.approx(lr_at_epoch(trunk, t + e))
        plast = probe_config(trunk, t, "plasticity", 30)
        assert plast.optim.schedule == "constant" and plast.run.epochs == 30
        assert all(lr_at_epoch(plast, e) == lr_at_epoch(trunk, t) for e in range(30))
