"""Plasticity study: branching, LR at t, idempotency, the key rule, bad configs, the script."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from granet.config import ConfigError, config_from_dict
from granet.io import load_checkpoint
from granet.study import results
from granet.study.base import load_study_config
from granet.study.paths import StudyPaths
from granet.study.plasticity import PlasticityStudy, probe_config
from granet.study.tune.trainable import build_trainer
from granet.trainer import lr_at_epoch

from .faults import FailAtEpoch
from .helpers import TINY, run, run_tiny_plasticity, script_env

REPO = Path(__file__).resolve().parents[2]


def test_first_run_completes_every_trial(tiny_plasticity):
    out = tiny_plasticity["first"]
    assert out["status"] == "finished"
    assert out["launched"] == {"trunk": 2, "probe": 8}
    assert out["failed"] == {"trunk": 0, "probe": 0}
    assert out["statuses"] == {"done": 10}
    # one trial's Ray worker was killed once (SIGKILL) and the trial was retried
    kill = tiny_plasticity["marker"].read_text().split()
    starts = (tiny_plasticity["marker"].parent / "fault.marker.starts").read_text().split("\n")
    assert sum(line.startswith(kill[0]) for line in starts) == 2
    trials = results.read_table(tiny_plasticity["dir"], "trials")
    assert sorted(trials.column("stage").to_pylist()) == ["probe"] * 8 + ["trunk"] * 2
    killed = [t for t in trials.to_pylist() if t["key"] == kill[0]][0]
    assert killed["resumed_from"] >= 1  # restarted from its own checkpoint, not from scratch


def test_second_identical_run_launches_zero_trials(tiny_plasticity):
    assert tiny_plasticity["second"]["launched"] == {"trunk": 0, "probe": 0}
    assert tiny_plasticity["second"]["statuses"] == {"done": 10}
    assert tiny_plasticity["second_s"] < tiny_plasticity["first_s"]


def test_adding_a_defaulted_config_field_rekeys_nothing(tiny_plasticity, monkeypatch):
    """The key rule hashes non-default values: a new field with a default (a granet upgrade)
    leaves every key of a finished study unchanged, and the re-run launches zero trials."""
    import granet.config as gc

    sd = tiny_plasticity["dir"]
    overrides = [f"study_dir={sd}", "ratios=[0.5]", *TINY]
    before = load_study_config(PlasticityStudy, None, overrides, True)
    keys = {t.key for t in before.trunks()} | {p.key for t in before.trunks()
                                               for p, _ in before.probes(t)}
    assert keys == set(results.read_table(sd, "trials").column("key").to_pylist())
    new = dataclasses.make_dataclass(
        "RunConfig", [("new_knob", int, dataclasses.field(default=3))], bases=(gc.RunConfig,))
    monkeypatch.setattr(gc, "RunConfig", new)
    after = load_study_config(PlasticityStudy, None, overrides, True)
    assert after.train.run.new_knob == 3  # the new field is there...
    keys_after = {t.key for t in after.trunks()} | {p.key for t in after.trunks()
                                                    for p, _ in after.probes(t)}
    assert keys_after == keys  # ...and re-keys nothing
    again = run_tiny_plasticity(sd)
    assert again["launched"] == {"trunk": 0, "probe": 0}


def test_probe_branches_from_trunk_state_and_lr_at_t(tiny_plasticity):
    from granet.branch import state_digest

    sd = tiny_plasticity["dir"]
    paths = StudyPaths(sd)
    probes = results.read_table(sd, "probes").to_pylist()
    trials = {r["key"]: r for r in results.read_table(sd, "trials").to_pylist()}
    epochs = results.read_table(sd, "epochs").to_pylist()
    assert len(probes) == 8
    for p in probes:
        trunk_cfg = config_from_dict(json.loads(trials[p["trunk_key"]]["config_json"]))
        ckpt = load_checkpoint(paths.trunk_checkpoint(p["trunk_key"], p["epoch_t"]))
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


def test_branch_in_process_tensors(tiny_plasticity):
    """The probe's state right after loading equals the trunk checkpoint at t, tensor by tensor;
    after the branch, pruned-then-regrown weights are 0 and the masks are what is applied."""
    from granet.branch import branch

    sd = tiny_plasticity["dir"]
    study = load_study_config(PlasticityStudy, None, [f"study_dir={sd}", "ratios=[0.5]", *TINY],
                              True)
    trunk = study.trunks()[1]
    spec, own = next((s, o) for s, o in study.probes(trunk) if o["regen"])
    ckpt_path = StudyPaths(sd).trunk_checkpoint(trunk.key, own["epoch_t"])
    loaded = build_trainer(spec)
    loaded.load_weights_and_masks(ckpt_path, optimizer=True)
    ckpt = load_checkpoint(ckpt_path)
    for name, value in ckpt["model"].items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    for m_trunk, m in zip(ckpt["engine"]["masks"], loaded.engine.masks, strict=True):
        assert torch.equal(m_trunk, m)
    lr_t = lr_at_epoch(config_from_dict(trunk.train), own["epoch_t"])
    assert [g["lr"] for g in loaded.optimizer.param_groups] == [pytest.approx(lr_t)] * len(
        loaded.optimizer.param_groups)
    trainer = build_trainer(spec)
    info = branch(trainer, ckpt_path, epoch_t=own["epoch_t"], ratio=own["ratio"],
                  scope=own["scope"], structure=own["structure"], regen=True)
    assert info.regrown == info.pruned > 0
    for layer, m in zip(trainer.engine.layers, trainer.engine.masks, strict=True):
        assert torch.all(layer.param.detach()[~m] == 0)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("ratios=[0.2,1.5]", "ratios=[0.2, 1.5]: each must be in (0, 1)"),
        ("scopes=[sideways]", "scopes='sideways': must be one of global, layerwise"),
        ("train.optim.lr=-1", "train.optim.lr=-1.0: must be > 0"),
        ("probe_epochs=[0]", "probe_epochs=[0]: each must be in [1, train.run.epochs-1=3]"),
        ("bogus=1", "bogus: unknown field"),
        ("trunk_method=magic", "trunk_method='magic': must be one of"),
        ("k=0", "k=0: must be >= 1 epoch"),
        ("trunk_densities=[]", "trunk_densities=[]"),
        ("regen=[]", "regen=[]"),
        ("models=[nosuchnet]", "nosuchnet"),
    ],
)
def test_bad_config_raises_before_any_work(tmp_path, override, needle):
    sd = tmp_path / "never"
    with pytest.raises(ConfigError) as exc:
        run("plasticity", [f"study_dir={sd}", override], smoke=True)
    assert needle in str(exc.value)
    assert not sd.exists()


def test_script_smoke_test_subprocess(ray_session, tmp_path):
    """``python studies/plasticity.py --smoke-test`` end to end (joins this session's Ray via
    RAY_ADDRESS, as under ``ray job submit``)."""
    sd = tmp_path / "smoke"
    proc = subprocess.run(
        [sys.executable, str(REPO / "studies" / "plasticity.py"), "--smoke-test",
         "--set", f"study_dir={sd}", "--set", "ratios=[0.9]", "--set", "trunk_densities=[0.1]"],
        cwd=tmp_path, env={**script_env(), "RAY_AUTH_MODE": "token"}, capture_output=True,
        text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MLflow UI: mlflow ui --backend-store-uri sqlite:////" in proc.stdout
    assert "plasticity study 'plasticity_mnist1d-smoke' finished" in proc.stdout
    for table in results.TABLES:
        assert results.read_table(sd, table).num_rows > 0, table
    assert (sd / "mlflow.db").is_file()
    assert json.loads((sd / "summary.json").read_text())["status"] == "finished"
    # the main config's final-gap probes, on the smoke grid: t = 1, 3 x p = 0.9 x regen off/on
    gap = [p for p in results.read_table(sd, "probes").to_pylist() if p["kind"] == "gap"]
    assert sorted((p["epoch_t"], p["k"], p["regen"]) for p in gap) == [
        (1, 3, False), (1, 3, True), (3, 1, False), (3, 1, True)]
    assert all(p["final_gap"] == pytest.approx(p["acc_after"] - p["trunk_final_acc"])
               for p in gap)
    figs = sorted(p.name for p in (sd / "figures").iterdir())
    assert figs == [f"{k}_mlp_static_global_unstructured.{e}" for k in ("final_gap", "plasticity")
                    for e in ("pdf", "png")]
    rows = (sd / "plasticity_summary.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["plasticity"] * 4 + ["gap"] * 4
    # progress: the last line of each stage counts every Tune trial done; probes run packed
    # (one Tune trial per trunk checkpoint and kind), and the line says how many probes
    lines = [x for x in proc.stdout.splitlines() if x.startswith("[")]
    assert [x for x in lines if x.startswith("[trunk]")][-1].startswith(
        "[trunk] 1/1 done, 0 running, 0 failed | best test_acc ")
    last = [x for x in lines if x.startswith("[probe]")][-1]
    m = re.match(r"\[probe\] (\d+)/(\d+) packs \(8 probes\) done, 0 running, 0 failed \| best "
                 r"test_acc 0\.\d{4} \(\d probes t[13]( gap)? \| d0\.1 mlp s0\)$", last)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) == 4, last


MAIN = REPO / "studies" / "configs" / "plasticity_mnist1d.yaml"


def _planned(study: PlasticityStudy) -> dict[str, dict]:
    return {spec.key: own for t in study.trunks() for spec, own in study.probes(t)} | {
        t.key: {"kind": "trunk", "density": t.labels["trunk_density"]} for t in study.trunks()}


def test_main_job_plans_exactly_its_final_gap_subset(tmp_path):
    """The main job's gap grid (t 14/22/24 x p 0.5/0.98 x dense and 10 % trunks x regen off/on)
    adds 24 probes trained to the end; the trunks and plasticity probes keep their keys."""
    sd = [f"study_dir={tmp_path / 's'}"]
    study = load_study_config(PlasticityStudy, MAIN, sd)
    plan = _planned(study)
    gap = {k: o for k, o in plan.items() if o["kind"] == "gap"}
    assert len(gap) == 3 * 2 * 2 * 2 == 24
    got = sorted((o["epoch_t"], o["ratio"], t.labels["trunk_density"], o["regen"])
                 for t in study.trunks() for _, o in study.probes(t) if o["kind"] == "gap")
    assert got == sorted((t, p, d, r) for t in (14, 22, 24) for p in (0.5, 0.98)
                         for d in (1.0, 0.1) for r in (False, True))
    assert all(o["k"] == 30 - o["epoch_t"] for o in gap.values())
    assert sum(o["k"] for o in gap.values()) == 2 * 2 * 2 * (16 + 8 + 6) == 240
    # without the gap probes: the same trunks and plasticity probes, the same keys
    off = _planned(load_study_config(PlasticityStudy, MAIN, [*sd, "final_gap=false"]))
    assert len(off) == 4 + 160 and set(off) == set(plan) - set(gap)
    # final_gap: true with empty gap lists is the whole grid, which holds the subset's keys
    full = _planned(load_study_config(PlasticityStudy, MAIN, [
        *sd, "gap_epochs=[]", "gap_ratios=[]", "gap_densities=[]"]))
    assert sum(o["kind"] == "gap" for o in full.values()) == 160
    assert sum(o["k"] for o in full.values() if o["kind"] == "gap") == 4 * 4 * 2 * (
        20 + 16 + 14 + 8 + 6)
    assert set(plan) <= set(full)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["gap_ratios=[0.5,0.3]"],
         "gap_ratios=[0.5, 0.3]: each must be one of ratios (0.5, 0.9); 0.3 is not"),
        (["gap_epochs=[2]"],
         "gap_epochs=[2]: each must be one of the probe epochs t (1, 3); 2 is not"),
        (["gap_densities=[0.5]"],
         "gap_densities=[0.5]: each must be one of trunk_densities (1, 0.1); 0.5 is not"),
        (["gap_ratios=[0.9,0.9]"], "gap_ratios=[0.9, 0.9]: must not repeat a value"),
        (["gap_epochs=[1,3]", "probe_epochs=[1]"],
         "gap_epochs=[1, 3]: each must be one of the probe epochs t (1); 3 is not"),
    ],
)
def test_bad_gap_grid_raises_before_any_work(tmp_path, overrides, needle):
    sd = tmp_path / "never"
    with pytest.raises(ConfigError) as exc:
        run("plasticity", [f"study_dir={sd}", "final_gap=true", *overrides], smoke=True)
    assert str(exc.value) == needle
    assert not sd.exists()


def test_gap_grid_ignored_without_final_gap(tmp_path):
    """``--set final_gap=false`` turns a config's gap probes off whatever its gap lists say."""
    study = load_study_config(PlasticityStudy, None, [
        f"study_dir={tmp_path}", "gap_ratios=[0.3]", "gap_epochs=[7]"], True)
    assert study.gap_grid() == ([], [], [])
    assert {o["kind"] for t in study.trunks() for _, o in study.probes(t)} == {"plasticity"}


def test_interrupted_stage_resumes_from_own_checkpoint(ray_session, tmp_path):
    """A trunk errors at epoch 2 with no retries left: its probes wait. The re-run restores the
    stage's Tune experiment and the trunk resumes from its epoch-2 checkpoint."""
    extra = ["max_failures=0", "trunk_densities=[0.5]", "regen=[false]", "probe_epochs=[1]",
             "final_gap=true"]
    first = run_tiny_plasticity(tmp_path / "s", extra, trainable=FailAtEpoch(tmp_path / "m"))
    assert first["failed"]["trunk"] == 1 and first["launched"]["probe"] == 0
    assert first["status"] == "failed"
    assert results.read_table(tmp_path / "s", "trials").num_rows == 0
    second = run_tiny_plasticity(tmp_path / "s", extra)
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
