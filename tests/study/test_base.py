"""The study layer's contracts without Ray: trial specs, keys, config loading, the lock, the
import graph, and no test hooks in the package."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from granet.config import Config, ConfigError
from granet.study.base import (
    ProbeSpec,
    TrialContext,
    TrialSpec,
    TrialSpecError,
    load_study_config,
    trial_key,
)
from granet.study.compare import CompareStudy
from granet.study.lock import StudyLock, StudyLocked
from granet.study.plasticity import PlasticityStudy

ROOT = Path(__file__).resolve().parents[2]


def _spec(**kw):
    d = {"key": "k1", "stage": "compare", "study": "s", "train": {}}
    d.update(kw)
    return d


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"stage": "compare", "study": "s", "train": {}}, "trial.key: missing"),
        (_spec(key=3), "trial.key=3: must be str"),
        (_spec(train=[1]), "trial.train=[1]: must be dict"),
        (_spec(colour="red"), "trial.colour: unknown field"),
        (_spec(save_epochs=[0]), "trial.save_epochs=[0]: must be epochs >= 1"),
        (_spec(key="a/b"), "trial.key='a/b': must be a non-empty file-safe name"),
        (_spec(probe={"trunk_key": "t"}), "trial.probe.trunk_ckpt: missing"),
        (_spec(log_model="yes"), "trial.log_model='yes': must be bool"),
        ("not a dict", "trial='not a dict': must be a mapping"),
    ],
)
def test_trial_spec_contract_names_the_field(data, needle):
    with pytest.raises(TrialSpecError) as exc:
        TrialSpec.from_dict(data)
    assert needle in str(exc.value)


def test_trial_spec_round_trip_and_bad_train_values():
    probe = ProbeSpec(trunk_key="t", trunk_ckpt="/x.pt", kind="plasticity", epoch_t=3,
                      ratio=0.5, regen=True, scope="global", structure="unstructured", k=2,
                      regrow_mode="gradient", lr_t=0.1, acc_before=0.5, trunk_final_acc=0.6,
                      trunk_method="static", trunk_density=0.1, seed=0, model="mlp")
    train = {"run": {"epochs": 2}, "optim": {"milestones": [1]},
             "sparsity": {"method": "static"}}
    spec = TrialSpec(key="k", stage="probe", study="s", train=train,
                     parent_key="t", save_epochs=(1,), probe=probe, sets={"optim.lr": 0.05})
    back = TrialSpec.from_dict(spec.to_dict())
    assert back == spec
    assert back.config().optim.lr == 0.05 and back.config().run.epochs == 2
    bad = TrialSpec(key="k", stage="x", study="s", train={"optim": {"lr": -1}})
    with pytest.raises(TrialSpecError, match=r"trial k: train: optim.lr=-1.0: must be > 0"):
        bad.config()
    with pytest.raises(TrialSpecError, match="context.study_dir='rel': must be an absolute"):
        TrialContext.from_dict({"study_dir": "rel"})


def test_key_rule_non_default_values_own_fields_and_parent():
    a, b = Config(), Config()
    b.optim.nesterov = False  # a falsy non-default value still changes the key
    c = Config()
    c.optim.weight_decay = 0.0
    own = {"stage": "trunk"}
    keys = {trial_key(a, own), trial_key(b, own), trial_key(c, own),
            trial_key(a, {"stage": "probe"}), trial_key(a, own, parent="p")}
    assert len(keys) == 5
    assert trial_key(a, own) == trial_key(Config(), {"stage": "trunk"})
    # locations are not part of the key
    d = Config()
    d.run.output_dir = "/elsewhere"
    assert trial_key(d, own) == trial_key(a, own)


def test_smoke_gets_its_own_name_and_directory(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: real\nstudy_dir: {tmp_path / 'real'}\n")
    real = load_study_config(CompareStudy, cfg)
    smoke = load_study_config(CompareStudy, cfg, smoke_test=True)
    assert (real.name, smoke.name) == ("real", "real-smoke")
    assert smoke.study_dir == str(tmp_path / "real-smoke")
    # a new model on a smoke test does not inherit the smoke preset's MLP kwargs
    s = load_study_config(PlasticityStudy, None, ["train.model.name=cnn1d"], smoke_test=True)
    assert s.train.model.name == "cnn1d" and s.train.model.kwargs == {}


def test_empty_study_yaml_is_refused(tmp_path):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_study_config(CompareStudy, cfg)


_HOLDER = """
import sys, time
from granet.study.lock import StudyLock
lock = StudyLock(sys.argv[1]); lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_lock_refuses_a_second_driver_and_survives_a_killed_one(tmp_path):
    path = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StudyLocked) as exc:
            StudyLock(path).acquire()
        assert f"pid {holder.pid}" in str(exc.value) and str(tmp_path) in str(exc.value)
        os.kill(holder.pid, signal.SIGKILL)  # a killed driver leaves its lock file behind...
        holder.wait(timeout=10)
        assert path.exists()
        with StudyLock(path):  # ...which the kernel has released: stale, taken over
            assert f'"pid": {os.getpid()}' in path.read_text()
        assert not path.exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_lock_written_by_another_host_is_honoured(tmp_path):
    path = tmp_path / ".lock"
    path.write_text('{"host": "gpu-node-7", "pid": 4242, "started": "2026-12-01T00:00:00"}')
    with pytest.raises(StudyLocked, match="locked by a driver on host 'gpu-node-7'"):
        StudyLock(path).acquire()


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_of_granet_is_in_an_import_cycle():
    """Module-level and function-level imports alike (an AST walk, nothing imported)."""
    files = sorted((ROOT / "granet").rglob("*.py"))
    known = {_module(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for mod, f in known.items():
        pkg = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(f.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for n in names:
                while n and n not in known:
                    n = n.rpartition(".")[0]
                if n and n != mod:
                    deps.add(n)
        graph[mod] = deps
    cycles = []

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph[todo.pop()]:
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    for mod in graph:
        if mod in reach(mod):
            cycles.append(mod)
    assert cycles == []


def test_only_the_tune_subpackage_imports_ray_and_no_test_hooks_in_granet():
    for f in sorted((ROOT / "granet").rglob("*.py")):
        text = f.read_text()
        assert "TEST_FAIL" not in text and 'probe["snapshot"]' not in text, f
        tree = ast.parse(text)
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        if any(m == "ray" or m.startswith("ray.") for m in mods):
            assert "granet/study/tune" in str(f), f
