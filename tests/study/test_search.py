"""Search study: real Ray Tune + Optuna + MLflow on tiny MNIST-1D runs (no mocks)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from granet.config import ConfigError, load_config
from granet.study.base import load_study_config
from granet.study.results import read_table
from granet.study.search import SearchStudy
from granet.study.space import SpaceFunction
from granet.study.tune.schedulers import PrunedAwareOptunaSearch
from tests.study.helpers import (
    TINY_SPACE,
    TINY_TRAIN,
    run,
    seed_mlflow_db,
    smoke_study,
    tiny_search_yaml,
)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _study(study_dir: Path, name: str = "tiny_search") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{study_dir / 'optuna.db'}")


# ------------------------------------------------------------------------------ unit (no Ray)


def test_pruned_aware_searcher_tells_pruned_complete_fail(tmp_path):
    """Against real Optuna (sqlite RDBStorage): a truncated trial is PRUNED with its last value,
    a full one COMPLETE, an errored one FAIL; Ray's own OptunaSearch says COMPLETE (the gotcha)."""
    from ray.tune.search.optuna import OptunaSearch

    from granet.config import config_from_dict, config_to_dict

    base = config_to_dict(config_from_dict(dict(TINY_TRAIN, sparsity=dict(
        TINY_TRAIN["sparsity"], regen_ratio=0.5, regen_min=0.005, regen_decay="cosine"))))
    fn = SpaceFunction(TINY_SPACE, base, 0.5, "unit")
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    s = PrunedAwareOptunaSearch(space=fn, metric="acc", mode="max", study_name="unit",
                                storage=storage, full_iterations=3)
    cfgs = {t: s.suggest(t) for t in ("a", "b", "c")}
    # parameter names are the dotted config keys they set
    assert all(k.startswith("sparsity.") for c in cfgs.values() for k in c
               if k not in ("trial_key", "run_name"))
    # conditional knob: regen_min only when the decay is not constant
    for c in cfgs.values():
        assert ("sparsity.regen_min" in c) == (c["sparsity.regen_decay"] != "constant")
        assert c["sparsity.prune_end_epoch"] >= c["sparsity.prune_start_epoch"] + 0.5
    s.on_trial_result("a", {"acc": 0.2, "epoch": 1, "training_iteration": 1})
    s.on_trial_complete("a", {"acc": 0.7, "epoch": 3, "training_iteration": 3})
    s.on_trial_result("b", {"acc": 0.1, "epoch": 1, "training_iteration": 1})
    s.on_trial_complete("b", {"acc": 0.15, "epoch": 2, "training_iteration": 2})  # ASHA stop
    s.on_trial_complete("c", {"acc": 0.3, "epoch": 1, "training_iteration": 1}, error=True)
    trials = optuna.load_study(study_name="unit", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert trials[0].value == pytest.approx(0.7)
    assert trials[1].value == pytest.approx(0.15)  # the truncated value, kept as PRUNED
    assert [t.user_attrs["trial_key"] for t in trials] == [cfgs[k]["trial_key"] for k in "abc"]
    # The searcher (with its define-by-run space) survives Tune's pickle checkpoint.
    s.save(str(tmp_path / "searcher.pkl"))
    # Ray's plain OptunaSearch records the same early-stopped trial as COMPLETE.
    plain = OptunaSearch(space=fn, metric="acc", mode="max", study_name="plain",
                         storage=storage)
    plain.suggest("x")
    plain.on_trial_complete("x", {"acc": 0.15, "epoch": 2, "training_iteration": 2})
    assert optuna.load_study(study_name="plain", storage=storage).trials[0].state == \
        TrialState.COMPLETE


@pytest.mark.parametrize(
    "override, needle",
    [
        ("space={regen_speed: {low: 0, high: 1}}", "space.regen_speed: unknown knob; allowed:"),
        ("space={regen_ratio: {low: 0.1, high: 1.5}}", "space.regen_ratio=[0.1, 1.5]: must lie"),
        ("space={prune_end_epoch: {low: 1, high: 9}}", "space.prune_end_epoch=[1, 9]: must lie"),
        ("space={growth: {choices: [gradient, magic]}}", "space.growth.choices: 'magic' must be"),
        ("space={regen_decay: {low: 0, high: 1}}", "space.regen_decay="),
        ("metric=test_acc_top5", "metric='test_acc_top5': must be one of"),
        ("scheduler=hyperband", "scheduler='hyperband': must be one of none, asha"),
        ("num_samples=0", "num_samples=0: must be >= 1"),
        ("mode=maximise", "mode='maximise': must be one of max, min"),
        ("sampler=grid", "sampler='grid': must be one of tpe, random"),
        ("second_objective=params", "second_objective='params': must be one of"),
        ("asha_reduction_factor=1", "asha_reduction_factor=1.0: must be > 1"),
        ("prune_min_window=0", "prune_min_window"),
        ("storage=notaurl", "storage='notaurl': must be an RDB URL"),
        ("asha_grace_period=9", "asha_grace_period=9: must be in [1, train.run.epochs=3]"),
        ("storage=sqlite:///rel.db", "storage='sqlite:///rel.db': a sqlite URL must be absolute"),
        ("train.sparsity.method=rigl", "train.sparsity.method='rigl'"),
        ("train.optim.lr=-1", "train.optim.lr=-1"),
        ("space={init_density: {choices: [1.0, 0.05]}}", "space.init_density: 0.05 must be"),
    ],
)
def test_bad_search_config_raises_before_any_work(tmp_path, override, needle):
    study_dir = tmp_path / "never"
    cfg = tiny_search_yaml(tmp_path / "s.yaml", study_dir)
    with pytest.raises(ConfigError) as exc:
        run("search", [override], cfg)
    assert needle in str(exc.value)
    assert not study_dir.exists()  # nothing written, no Ray/Optuna/MLflow work


def test_shipped_search_config_validates():
    study = load_study_config(
        SearchStudy, Path(__file__).parents[2] / "studies/configs/search_mnist1d.yaml")
    assert study.scheduler == "asha" and study.num_samples == 30


# ------------------------------------------------------------------------------ real runs


def test_search_smoke_script_and_best_config_trains(ray_session, tmp_path_factory, tmp_path):
    smoke = smoke_study("search", tmp_path_factory)
    s, d = smoke["summary"], smoke["dir"]
    assert s["finished_trials"] == s["asked"] == 3
    assert sum(s["states"].get(k, 0) for k in ("COMPLETE", "PRUNED")) == 3
    best = Path(s["best_config"])
    assert best == d / "best_config.yaml"
    cfg = load_config(best)  # a plain granet config
    assert cfg.sparsity.regen_ratio == pytest.approx(s["best_params"]["sparsity.regen_ratio"])
    for key, value in s["best_params"].items():
        group, name = key.split(".")
        assert getattr(getattr(cfg, group), name) == value
    # `granet train best_config.yaml` runs it as is
    from granet.cli import main

    assert main(["train", str(best), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epoch"] == cfg.run.epochs
    assert (d / "optuna.db").is_file() and (d / "results/search/stage=search").is_dir()


def test_search_resume_exact_count_no_duplicates(ray_session, tmp_path, tmp_path_factory):
    d = tmp_path / "study"
    seed_mlflow_db(d, tmp_path_factory)
    cfg = tiny_search_yaml(tmp_path / "s.yaml", d, **{"train": dict(
        TINY_TRAIN, run=dict(TINY_TRAIN["run"], epochs=2),
        optim=dict(TINY_TRAIN["optim"], milestones=[1]),
        sparsity=dict(TINY_TRAIN["sparsity"], prune_end_epoch=1.5)),
        "space": dict(TINY_SPACE, prune_end_epoch={"low": 1.0, "high": 2.0})})
    first = run("search", ["num_samples=2", "max_concurrent=1"], cfg)
    assert first["launched"] == {"search": 2} and first["finished_trials"] == 2
    first_params = [t.params for t in _study(d).trials]
    # An interrupted pass leaves a RUNNING trial behind: it must not count, nor block.
    _study(d).ask()
    second = run("search", ["num_samples=4", "max_concurrent=1"], cfg)
    assert second["launched"] == {"search": 2}  # Ray ran only the missing trials
    trials = _study(d).trials
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == 4
    assert len({t.number for t in finished}) == 4
    assert [t.state for t in trials].count(TrialState.FAIL) == 1  # the stale one
    keys = [t.user_attrs["trial_key"] for t in finished]
    assert len(set(keys)) == 4
    assert all(t.params not in first_params for t in finished[2:])  # no replayed draws
    done = read_table(d, "trials", "search").column("key").to_pylist()
    assert sorted(done) == sorted(keys)
    # Asking again for 4 runs nothing.
    third = run("search", ["num_samples=4"], cfg)
    assert third["launched"] == {"search": 0} and third["finished_trials"] == 4
    assert (d / "best_config.yaml").is_file()


def test_asha_stopped_trials_are_pruned_in_optuna(ray_session, tmp_path, tmp_path_factory):
    d = tmp_path / "study"
    seed_mlflow_db(d, tmp_path_factory)
    cfg = tiny_search_yaml(tmp_path / "s.yaml", d, scheduler="asha", asha_grace_period=1,
                           asha_reduction_factor=3, metric="val_loss", mode="min",
                           num_samples=5, max_concurrent=1)
    summary = run("search", [], cfg)
    assert summary["finished_trials"] == 5
    trials = _study(d).trials
    epochs = read_table(d, "epochs", "search").to_pylist()
    last = {}
    for r in epochs:
        last[r["key"]] = max(last.get(r["key"], 0), r["epoch"])
    done = set(read_table(d, "trials", "search").column("key").to_pylist())
    states = [t.state for t in trials]
    assert TrialState.PRUNED in states, states
    assert TrialState.COMPLETE in states, states
    for t in trials:
        key = t.user_attrs["trial_key"]
        if t.state == TrialState.PRUNED:
            assert last[key] < 3  # stopped early by ASHA
            assert t.value is not None  # keeps its truncated value
        else:
            assert t.state == TrialState.COMPLETE
            assert last[key] == 3 and key in done  # ran to the end, wrote its trials row
    assert summary["best_trial"] in [t.number for t in trials if t.state == TrialState.COMPLETE]
    # MLflow child runs carry the Optuna state; early-stopped ones are KILLED, not FAILED.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("granet").experiment_id],
                              filter_string="tags.`granet.stage` = 'search'")
    status = {r.data.tags["granet.trial_key"]: (r.info.status, r.data.tags["optuna.state"])
              for r in runs}
    by_key = {r.data.tags["granet.trial_key"]: r for r in runs}
    for t in trials:
        want = ("KILLED", "PRUNED") if t.state == TrialState.PRUNED else ("FINISHED", "COMPLETE")
        assert status[t.user_attrs["trial_key"]] == want
        # every epoch an ASHA-stopped trial reported is in MLflow (logged before tune.report)
        hist = client.get_metric_history(by_key[t.user_attrs["trial_key"]].info.run_id,
                                         "val_loss")
        assert sorted(m.step for m in hist) == list(range(1, last[t.user_attrs["trial_key"]] + 1))
        if t.state == TrialState.PRUNED:
            assert by_key[t.user_attrs["trial_key"]].data.tags["granet.pruned"] == "true"
        # linked both ways: the Optuna trial names its MLflow run, the run its Optuna number
        child = by_key[t.user_attrs["trial_key"]]
        assert t.user_attrs["mlflow_run_id"] == child.info.run_id
        assert child.data.tags["optuna.number"] == str(t.number)
    assert _study(d).metric_names == ["val_loss"]
    assert all(not k.startswith("set:") for t in trials for k in t.params)


def test_multi_objective_reports_pareto_front(ray_session, tmp_path, tmp_path_factory):
    d = tmp_path / "study"
    seed_mlflow_db(d, tmp_path_factory)
    cfg = tiny_search_yaml(tmp_path / "s.yaml", d, multi_objective=True, num_samples=3,
                           max_concurrent=1)
    summary = run("search", [], cfg)
    ost = _study(d)
    assert [x.name for x in ost.directions] == ["MAXIMIZE", "MINIMIZE"]
    front = ost.best_trials
    assert front and summary["pareto_front"] == [
        {"number": t.number, "values": list(t.values)} for t in front]
    done = [t for t in ost.trials if t.state == TrialState.COMPLETE]
    for f in front:  # non-dominated among the complete trials
        assert not any(
            o.values[0] >= f.values[0] and o.values[1] <= f.values[1] and o.values != f.values
            for o in done
        )
    import pyarrow.parquet as pq

    table = pq.read_table(d / "results/search/stage=search/optuna.parquet").to_pylist()
    assert {r["number"] for r in table if r["best"]} == {t.number for t in front}
    assert all(r["objective_2"] == "train_flops" for r in table)
    assert summary["best_trial"] in {t.number for t in front}
    load_config(d / "best_config.yaml")
