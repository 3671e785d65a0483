"""Helpers of the study tests: tiny study YAMLs, studies run in-process or as scripts, smoke
studies run once per test session (subprocess)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]

TINY_TRAIN: dict[str, Any] = {
    "data": {"name": "mnist1d", "num_samples": 1000, "batch_size": 32},
    "model": {"name": "mlp", "kwargs": {"hidden": [32, 32]}},
    "optim": {"name": "sgd", "lr": 0.1, "schedule": "multistep", "milestones": [2]},
    "sparsity": {"method": "granet", "final_density": 0.1, "prune_start_epoch": 0.0,
                 "prune_end_epoch": 2.0, "update_interval": 8},
    "run": {"epochs": 3, "device": "cpu", "dead_unit_eval": False},
}
TINY_SPACE: dict[str, Any] = {
    "regen_ratio": {"low": 0.1, "high": 0.9},
    "regen_decay": {"choices": ["cosine", "constant"]},
    "regen_min": {"low": 0.0, "high": 0.05},
    "update_interval": {"low": 2, "high": 16, "log": True},
    "prune_start_epoch": {"low": 0.0, "high": 1.0},
    "prune_end_epoch": {"low": 1.5, "high": 3.0},
    "init_density": {"choices": [1.0, 0.5]},
    "growth": {"choices": ["gradient", "random"]},
}

_SMOKE: dict[str, dict[str, Any]] = {}
_TEMPLATE: list[Path] = []


def seed_mlflow_db(study_dir: Path, tmp_path_factory: Any) -> Path:
    """Copy an empty, already migrated MLflow sqlite DB into ``study_dir`` (creating one costs
    ~10 s of schema migrations on this machine; the study then just opens it)."""
    if not _TEMPLATE:
        from mlflow.tracking import MlflowClient

        db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
        _TEMPLATE.append(db)
    study_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_TEMPLATE[0], study_dir / "mlflow.db")
    return study_dir / "mlflow.db"


def tiny_search_yaml(path: Path, study_dir: Path, **fields: Any) -> Path:
    """A tiny search study YAML (3 epochs of a small MLP on 1000 MNIST-1D samples)."""
    data: dict[str, Any] = {
        "name": "tiny_search", "study_dir": str(study_dir), "num_samples": 2,
        "max_concurrent": 2, "n_startup_trials": 2, "prune_min_window": 0.5,
        "space": TINY_SPACE, "train": TINY_TRAIN,
    }
    data.update(fields)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


TINY = [
    "train.data.num_samples=1000",
    "train.data.batch_size=64",
    "train.model.name=mlp",
    "train.model.kwargs={hidden: [32, 32]}",
]


def run(kind: str, overrides: list[str], config: Path | None = None, *, smoke: bool = False,
        **kw: Any) -> dict[str, Any]:
    """Run a study in this process (joins the session's Ray), quietly by default."""
    from granet.study.cli import study_class
    from granet.study.driver import run_study

    kw.setdefault("quiet", True)
    return run_study(study_class(kind), config, overrides, smoke_test=smoke, **kw)


def run_tiny_plasticity(study_dir: Path, extra: list[str] = (), **kw: Any) -> dict[str, Any]:
    """2 trunks (dense, 10 %) x probes at t=1,3 x ratio 0.5 x regen off/on (10 trials)."""
    return run("plasticity", [f"study_dir={study_dir}", "ratios=[0.5]", *TINY, *extra],
               smoke=True, **kw)


def tiny_compare_yaml(path: Path, study_dir: Path, **fields: Any) -> Path:
    data = {"name": "tiny_compare", "study_dir": str(study_dir), "seeds": [0, 1],
            "sparsities": [0.9], "train": TINY_TRAIN, **fields}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def summary_of(study_dir: Path) -> dict[str, Any]:
    return json.loads((Path(study_dir) / "summary.json").read_text())


def script_env(join_ray: bool = True) -> dict[str, str]:
    """The environment of a study subprocess: it joins this process's Ray cluster when there is
    one (RAY_ADDRESS), as a study submitted to a running cluster would (saves a second cluster
    start on 2 cores)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    import ray

    if join_ray and ray.is_initialized():
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return env


def run_script(args: list[str], timeout: float = 400,
               join_ray: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    """Run a script or ``-m granet ...`` with the test's Python; (process, seconds)."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=script_env(join_ray),
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - t0


def smoke_study(kind: str, tmp_path_factory: Any) -> dict[str, Any]:
    """Run ``python studies/<kind>.py --smoke-test`` once per session; its dir and summary."""
    if kind not in _SMOKE:
        study_dir = tmp_path_factory.mktemp(f"{kind}-smoke") / "study"
        seed_mlflow_db(study_dir, tmp_path_factory)
        proc, seconds = run_script(
            [f"studies/{kind}.py", "--smoke-test", "--set", f"study_dir={study_dir}"]
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        _SMOKE[kind] = {"dir": study_dir, "summary": summary_of(study_dir),
                        "seconds": seconds, "stdout": proc.stdout}
    return _SMOKE[kind]
