"""Packed probes in a study: probes of one trunk checkpoint run as one Tune trial, and nothing a
user sees changes - each probe keeps its key, its Parquet rows and its MLflow run, its results
are bit-identical to the probe run alone, and the faults of the study layer behave as for single
trials (a killed worker resumes the pack from its checkpoint; an unreadable trunk checkpoint
fails every probe of the pack at once, without retries)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import ray.cloudpickle
import torch
from mlflow.tracking import MlflowClient

from granet.config import ConfigError
from granet.study import results
from granet.study.base import PACK_MODES, PackedTrial, TrialSpecError, load_study_config, pack_key
from granet.study.paths import StudyPaths
from granet.study.plasticity import PlasticityStudy

from .faults import FailAtEpoch
from .helpers import TINY, run, run_tiny_plasticity

ONE_TRUNK = ["trunk_densities=[0.1]", "probe_epochs=[1]"]  # 1 trunk, 2 probes: one pack of 2


class CorruptBeforePack:
    """Before the first pack of probes starts, truncate its trunk checkpoint (as
    faults.CorruptBeforeProbe does for a single probe); the marker records the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __call__(self, config: dict[str, Any]) -> None:
        from granet.study.tune.trainable import granet_trainable

        members = (config.get("trial") or {}).get("members") or []
        if members and not Path(self.marker).exists():
            path = Path(members[0]["probe"]["trunk_ckpt"])
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 3])
            Path(self.marker).write_text(str(path))
        granet_trainable(config)


# Ray workers unpickle the injector by value (they need not import the tests package)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _runs(study_dir: Path) -> list[Any]:
    c = MlflowClient(tracking_uri=f"sqlite:///{Path(study_dir) / 'mlflow.db'}")
    return c.search_runs([e.experiment_id for e in c.search_experiments()], max_results=5000)


def _rows(study_dir: Path, table: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    """A table's rows by (key, epoch, layer), without the wall-clock columns."""
    clock = {"epoch_seconds", "wall_seconds", "finished_at", "resumed_from"}
    out = {}
    for r in results.read_table(study_dir, table).to_pylist():
        out[(r["key"], r.get("epoch"), r.get("layer"))] = {k: v for k, v in r.items()
                                                           if k not in clock}
    return out


def _units(study_dir: Path, stage: str = "probe") -> list[list[str]]:
    exps = json.loads(StudyPaths(study_dir).experiments_manifest(stage).read_text())
    return [u for e in exps for u in e["units"]]


# ---------------------------------------------------------------------------- the plan


def _study(*extra: str) -> PlasticityStudy:
    return load_study_config(PlasticityStudy, None, ["study_dir=/tmp/never", "ratios=[0.5]", *TINY,
                                                     *extra], True)


def _probes(study: PlasticityStudy) -> list[Any]:
    from granet.study.plasticity import _with_trunk_results

    out = []
    for trunk in study.trunks():
        curve = {e: {"test_acc": 0.5} for e in range(1, study.train.run.epochs + 1)}
        for spec, own in study.probes(trunk):
            ckpt = f"/ck/{trunk.key}/{own['epoch_t']}"
            out.append(_with_trunk_results(spec, own, trunk, curve, ckpt))
    return out


def test_probes_of_one_trunk_checkpoint_are_packed_evenly():
    study = _study("ratios=[0.2,0.5,0.9]", "regen=[false,true]")  # 6 probes per (trunk, t)
    probes = _probes(study)
    assert len(probes) == 2 * 2 * 6
    units = study.pack_trials("probe", probes)
    assert all(isinstance(u, PackedTrial) for u in units) and len(units) == 4
    for u in units:  # one trunk checkpoint, one training config per pack; every probe once
        assert len({m.probe.trunk_ckpt for m in u.members}) == 1
        assert len({json.dumps(m.train, sort_keys=True) for m in u.members}) == 1
        assert u.key == pack_key([m.key for m in u.members]) and u.mode == "loop"
    assert sorted(m.key for u in units for m in u.members) == sorted(p.key for p in probes)
    study.pack_probes = 4  # 6 per group, at most 4 per pack: 3 + 3, not 4 + 2
    assert sorted(len(u.members) for u in study.pack_trials("probe", probes)) == [3] * 8
    study.pack_probes = 5
    sizes = [len(u.members) if isinstance(u, PackedTrial) else 1
             for u in study.pack_trials("probe", probes)]
    assert sorted(sizes) == [3] * 8
    study.pack_probes = 1  # no packing: the trials as they are
    assert study.pack_trials("probe", probes) == probes
    assert study.pack_trials("trunk", study.trunks()) == study.trunks()


def test_packed_trial_contract_round_trips_and_refuses_mixed_members():
    study = _study()
    probes = _probes(study)
    a, b = probes[0], probes[1]
    pack = PackedTrial.of([a, b], run_name="2 probes")
    assert PackedTrial.from_dict(pack.to_dict()) == pack
    data = pack.to_dict()
    other_t = [p for p in probes if p.probe.trunk_ckpt != a.probe.trunk_ckpt][0]
    with pytest.raises(TrialSpecError, match="branches from another checkpoint|another training"):
        PackedTrial.of([a, other_t])
    with pytest.raises(TrialSpecError, match=r"trial.key='pack-x': must be 'pack-"):
        PackedTrial.from_dict({**data, "key": "pack-x"})
    with pytest.raises(TrialSpecError, match="given twice"):
        PackedTrial.of([a, a])
    with pytest.raises(TrialSpecError, match=r"trial.mode='fast': must be one of loop, vmap"):
        PackedTrial.from_dict({**data, "mode": "fast"})
    with pytest.raises(TrialSpecError, match=r"trial.members=\[\]"):
        PackedTrial.from_dict({**data, "members": []})
    bad = copy.deepcopy(data)
    del bad["members"][1]["stage"]
    with pytest.raises(TrialSpecError, match=r"trial.stage: missing"):
        PackedTrial.from_dict(bad)
    from granet.pack import PACK_MODES as ENGINE_MODES

    assert PACK_MODES == ENGINE_MODES


@pytest.mark.parametrize("override, needle", [
    ("pack_probes=0", "pack_probes=0: must be >= 1 (1: no packing)"),
    ("pack_mode=fast", "pack_mode='fast': must be one of loop, vmap"),
])
def test_bad_packing_fields_are_config_errors(tmp_path, override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        run("plasticity", [f"study_dir={tmp_path / 'x'}", override], smoke=True)
    assert not (tmp_path / "x").exists()


def test_data_cache_is_the_data_set_bit_for_bit(tmp_path):
    """Workers read generated data sets from <study_dir>/cache/ instead of generating them: the
    cached tensors are exactly what load_dataset returns."""
    from granet.study.tune import workerdata as tr

    study = _study()
    cfg = study.trunks()[0].config()
    tr.prepare_data_cache(cfg, tmp_path)
    path = tr.data_cache_file(cfg, tmp_path)
    assert path is not None and path.is_file() and path.parent == tmp_path / "cache"
    tr._DATA.clear()
    cached = tr.shared_dataset(cfg, tmp_path)
    fresh = tr._load_data(cfg)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(cached, split).x, getattr(fresh, split).x)
        assert torch.equal(getattr(cached, split).y, getattr(fresh, split).y)
    assert (cached.num_classes, cached.input_shape, cached.augment) == \
        (fresh.num_classes, fresh.input_shape, fresh.augment)
    assert tr.shared_dataset(cfg, tmp_path) is cached  # once per worker process
    path.write_bytes(path.read_bytes()[:50])  # a damaged cache is rebuilt, not trusted
    tr._DATA.clear()
    again = tr.shared_dataset(cfg, tmp_path)
    assert torch.equal(again.train.x, fresh.train.x)
    tr._DATA.clear()


# ---------------------------------------------------------------------------- studies


def test_packed_study_equals_probes_run_one_by_one(tiny_plasticity, tmp_path):
    """The session's tiny study ran with packing (4 packs of 2 probes, one of its trunks killed
    once by SIGKILL); the same study with pack_probes=1 (8 Tune trials for 8 probes) gives the
    same rows, bit for bit, for every table."""
    packed = tiny_plasticity["dir"]
    assert sorted(len(u) for u in _units(packed)) == [2, 2, 2, 2]
    single = tmp_path / "single"
    out = run_tiny_plasticity(single, ["pack_probes=1"])
    assert out["statuses"] == {"done": 10} and out["launched"] == {"trunk": 2, "probe": 8}
    assert sorted(len(u) for u in _units(single)) == [1] * 8
    for table in results.TABLES:
        assert _rows(packed, table) == _rows(single, table), table
    # each packed probe has its own MLflow run holding each epoch once
    runs = [r for r in _runs(packed) if r.data.tags.get("granet.stage") == "probe"]
    assert len(runs) == len({r.data.tags["granet.trial_key"] for r in runs}) == 8
    c = MlflowClient(tracking_uri=f"sqlite:///{packed / 'mlflow.db'}")
    epochs = _rows(packed, "epochs")
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["granet.status"] == "done"
        hist = sorted((m.step, m.value) for m in c.get_metric_history(r.info.run_id, "test_acc"))
        key = r.data.tags["granet.trial_key"]
        assert hist == [(e, epochs[(key, e, None)]["test_acc"]) for e in (1, 2)]
        assert r.data.params["ratio"] == "0.5"


def test_killed_pack_worker_resumes_every_probe_from_the_pack_checkpoint(ray_session, tmp_path):
    """SIGKILL of a pack's Ray worker after its last epoch: Tune restarts the pack from its
    checkpoint (epoch 1); every probe ends done, resumed from epoch 1, with results equal to the
    uninterrupted run's, one MLflow run each and each epoch logged once."""
    marker = tmp_path / "kill.marker"
    sd = tmp_path / "killed"
    out = run_tiny_plasticity(sd, ONE_TRUNK, trainable=FailAtEpoch(marker, epoch=2,
                                                                   how="sigkill",
                                                                   stage="probe"))
    assert out["statuses"] == {"done": 3} and out["failed"] == {"trunk": 0, "probe": 0}
    pack = marker.read_text().split()[0]
    assert pack.startswith("pack-")  # the Tune trial that was killed is the pack
    starts = (tmp_path / "kill.marker.starts").read_text().split("\n")
    assert sum(line.startswith(pack) for line in starts) == 2  # started twice
    probes = [r for r in results.read_table(sd, "trials", "probe").to_pylist()]
    assert len(probes) == 2 and all(r["resumed_from"] == 1 for r in probes)
    clean = tmp_path / "clean"
    run_tiny_plasticity(clean, ONE_TRUNK)
    for table in results.TABLES:
        assert _rows(sd, table) == _rows(clean, table), table
    c = MlflowClient(tracking_uri=f"sqlite:///{sd / 'mlflow.db'}")
    runs = [r for r in _runs(sd) if r.data.tags.get("granet.stage") == "probe"]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for r in runs:
        steps = sorted(m.step for m in c.get_metric_history(r.info.run_id, "test_acc"))
        assert steps == [1, 2]


def test_unreadable_trunk_checkpoint_fails_every_packed_probe_once(ray_session, tmp_path):
    sd = tmp_path / "study"
    marker = tmp_path / "corrupt.marker"
    first = run_tiny_plasticity(sd, ONE_TRUNK, trainable=CorruptBeforePack(marker))
    assert sorted(len(u) for u in _units(sd)) == [2]
    statuses = results.trial_statuses(sd, "probe")
    assert sorted(statuses.values()) == ["failed", "failed"]  # both, at once, no retries
    assert first["failed"] == {"trunk": 0, "probe": 0} and first["statuses"]["failed"] == 2
    bad = Path(marker.read_text())
    for row in results.read_table(sd, "trials", "probe").to_pylist():
        assert f"checkpoint {str(bad)!r}: cannot be read: truncated" in row["message"]
        assert row["resumed_from"] == 0
        assert StudyPaths(sd).failure(row["key"]).read_text().startswith(
            "trunk checkpoint unusable")
    runs = [r for r in _runs(sd) if r.data.tags.get("granet.stage") == "probe"]
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]
    assert {r.data.tags["granet.status"] for r in runs} == {"failed"}
    again = run_tiny_plasticity(sd, ONE_TRUNK)  # the trunk is retrained, then the pack runs
    assert again["launched"] == {"trunk": 1, "probe": 2}
    assert again["statuses"] == {"done": 3}
    runs = [r for r in _runs(sd) if r.data.tags.get("granet.stage") == "probe"]
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)  # reopened
