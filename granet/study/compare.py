"""Comparison study: methods x final sparsities x seeds, summarised like the paper's Table 2.

Each entry of ``methods`` is ``{label, method, set}``: a label for the table, a
``sparsity.method`` and optional dotted overrides of the base ``train`` config (e.g. GraNet with
``s_i = 0.5`` is ``{label: "granet (s_i=0.5)", method: granet, set: {sparsity.init_density:
0.5}}``). ``dense`` runs once per seed (no sparsity axis); every other method runs at every
sparsity in ``sparsities`` (``sparsity.final_density = 1 - s``) and every seed. All trial configs
are built and validated before any Ray/MLflow work.

Resume: trials already in the ``trials`` table (stage ``compare``) are skipped, the rest run in a
fresh Tuner; so a re-run finishes an interrupted study and adding a seed runs only the new trials.

Outputs: ``compare_table.md`` and ``compare_table.parquet`` (schema :data:`TABLE_COLUMNS`) in the
study directory, both derived from the Parquet ``trials`` table alone (:func:`compare_table`):
mean and sample standard deviation (ddof=1; null for one seed) over seeds of the final test
accuracy, the test accuracy at the best validation epoch, the density, the inference FLOPs ratio
and the training FLOPs (absolute and relative to the dense run's mean).
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from granet.config import (
    METHODS,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    validate,
)
from granet.study.common import StudyCommon, load_study_config, trial_key

__all__ = [
    "TABLE_COLUMNS",
    "CompareStudy",
    "compare_table",
    "format_markdown",
    "load_compare_config",
    "plan_trials",
    "run_compare_study",
]

STAGE = "compare"

TABLE_COLUMNS = (
    "label", "method", "sparsity", "n_seeds",
    "final_test_acc_mean", "final_test_acc_std",
    "test_at_best_val_mean", "test_at_best_val_std",
    "density_mean", "density_std",
    "inference_flops_ratio_mean", "inference_flops_ratio_std",
    "train_flops_mean", "train_flops_std", "train_flops_ratio",
)
# table column stem -> trials-table column
_METRICS = {
    "final_test_acc": "test_acc",
    "test_at_best_val": "test_at_best_val",
    "density": "density",
    "inference_flops_ratio": "inference_flops_ratio",
    "train_flops": "train_flops",
}


def _default_methods() -> list[dict[str, Any]]:
    return [
        {"label": "Dense", "method": "dense"},
        {"label": "Static", "method": "static"},
        {"label": "SET", "method": "set"},
        {"label": "RigL", "method": "rigl"},
        {"label": "GMP", "method": "gmp", "set": {"sparsity.init_density": 1.0}},
        {"label": "GraNet (s_i=0)", "method": "granet", "set": {"sparsity.init_density": 1.0}},
        {"label": "GraNet (s_i=0.5)", "method": "granet", "set": {"sparsity.init_density": 0.5}},
    ]


@dataclass
class CompareStudy(StudyCommon):
    """A comparison study: ``StudyCommon`` plus methods and sparsities."""

    methods: list[dict[str, Any]] = field(default_factory=_default_methods)
    sparsities: list[float] = field(default_factory=lambda: [0.9, 0.95, 0.98])

    def smoke(self) -> CompareStudy:
        """Tiny: MNIST-1D 1000 samples, mlp, 3 epochs, one sparsity, two seeds (for the std)."""
        new = copy.deepcopy(self)
        new.seeds = list(self.seeds[:2]) if len(self.seeds) >= 2 else [self.seeds[0],
                                                                         self.seeds[0] + 1]
        tr = new.train
        tr.data.name, tr.data.num_samples, tr.data.batch_size = "mnist1d", 1000, 32
        tr.optim.name, tr.optim.lr = "sgd", 0.1
        tr.model.name, tr.model.kwargs = "mlp", {"hidden": [64, 64]}
        tr.run.epochs, tr.run.device, tr.run.dead_unit_eval = 3, "cpu", False
        tr.optim.schedule, tr.optim.milestones = "multistep", [2]
        tr.sparsity.update_interval = 8
        tr.sparsity.prune_start_epoch, tr.sparsity.prune_end_epoch = 0.0, 2.0
        new.sparsities = [self.sparsities[0]] if self.sparsities else [0.9]
        return new

    def check(self) -> None:
        """StudyCommon's checks, then every planned trial config is built and validated."""
        super().check()
        plan_trials(self)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "m"


def _check_entry(i: int, entry: Any) -> tuple[str, str, dict[str, Any]]:
    where = f"methods[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}={entry!r}: must be a mapping {{label, method, set}}")
    unknown = sorted(set(entry) - {"label", "method", "set"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; allowed: label, method, set")
    method = entry.get("method")
    if method not in METHODS:
        raise ConfigError(f"{where}.method={method!r}: must be one of {', '.join(METHODS)}")
    label = entry.get("label", method)
    if not isinstance(label, str) or not label.strip():
        raise ConfigError(f"{where}.label={label!r}: must be a non-empty string")
    sets = entry.get("set") or {}
    if not isinstance(sets, dict):
        raise ConfigError(f"{where}.set={sets!r}: must be a mapping of dotted key -> value")
    return label, method, sets


def plan_trials(study: CompareStudy) -> list[dict[str, Any]]:
    """Every trial of the study as a ``trial`` dict for the trainable (validated configs)."""
    if not study.methods:
        raise ConfigError("methods=[]: needs at least one method")
    if not study.sparsities:
        raise ConfigError("sparsities=[]: needs at least one sparsity")
    for s in study.sparsities:
        if not 0.0 < s < 1.0:
            raise ConfigError(f"sparsities: {s!r} must be in (0, 1)")
    if len(set(study.sparsities)) != len(study.sparsities):
        raise ConfigError(f"sparsities={study.sparsities!r}: must not repeat")
    labels: set[str] = set()
    base = config_to_dict(study.train)
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(study.methods):
        label, method, sets = _check_entry(i, entry)
        if label in labels:
            raise ConfigError(f"methods[{i}].label={label!r}: must be unique")
        labels.add(label)
        sparsities = [0.0] if method == "dense" else list(study.sparsities)
        for s in sparsities:
            for seed in study.seeds:
                over = {"sparsity.method": method, "run.seed": seed}
                if method != "dense":
                    over["sparsity.final_density"] = round(1.0 - s, 10)
                over.update(sets)
                try:
                    data = apply_overrides(base, [f"{k}={json.dumps(v)}" for k, v in over.items()])
                    cfg = config_from_dict(data)
                    validate(cfg)
                except ConfigError as exc:
                    raise ConfigError(
                        f"methods[{i}] ({label}) at sparsity {s} seed {seed}: {exc}"
                    ) from None
                train = config_to_dict(cfg)
                spec = {"label": label, "method": method, "sparsity": s, "seed": seed,
                        "order": i}
                key = f"{_slug(label)}-{trial_key({'train': train, 'spec': spec})[:12]}"
                out.append({
                    "train": train,
                    "trial_key": key,
                    "spec": spec,
                    "run_name": f"{study.name}-{_slug(label)}-s{round(s * 100, 2):g}-seed{seed}",
                })
    return out


def load_compare_config(path: str | Path | None, overrides: list[str] | None = None,
                        smoke_test: bool = False,
                        tracking_uri: str | None = None) -> CompareStudy:
    """Load + validate (ConfigError before any Ray/MLflow work, nothing written)."""
    return load_study_config(CompareStudy, path, list(overrides or []), smoke_test, tracking_uri)


# --------------------------------------------------------------------------------------------
# the table


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var)


def compare_table(study_dir: str | Path, stage: str = STAGE) -> Any:
    """The comparison table (pyarrow, columns :data:`TABLE_COLUMNS`) from the ``trials`` table.

    Groups finished trials by (label, sparsity) from their ``spec_json``; rows ordered by
    sparsity (dense first), then by the position of the method in the study's list.
    """
    import pyarrow as pa

    from granet.study.results import read_table

    t = read_table(study_dir, "trials", stage).to_pylist()
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    methods: dict[str, str] = {}
    rank: dict[str, int] = {}
    for row in t:
        spec = json.loads(row["spec_json"] or "{}")
        if "label" not in spec or row.get("status") != "done":
            continue
        k = (spec["label"], float(spec["sparsity"]))
        groups.setdefault(k, []).append(row)
        methods[spec["label"]] = spec.get("method", row.get("method"))
        rank[spec["label"]] = int(spec.get("order", 0))
    dense_flops = [r["train_flops"] for (lab, _), rows in groups.items() for r in rows
                   if methods.get(lab) == "dense" and r["train_flops"] is not None]
    dense_mean = sum(dense_flops) / len(dense_flops) if dense_flops else None
    order = {lab: (methods[lab] != "dense", rank[lab], lab) for lab in methods}
    rows_out: list[dict[str, Any]] = []
    for (label, s), rows in sorted(groups.items(), key=lambda kv: (kv[0][1] > 0, kv[0][1],
                                                                   order[kv[0][0]])):
        rec: dict[str, Any] = {"label": label, "method": methods[label], "sparsity": s,
                               "n_seeds": len({r["seed"] for r in rows})}
        for stem, col in _METRICS.items():
            m, sd = _mean_std([r[col] for r in rows])
            rec[f"{stem}_mean"], rec[f"{stem}_std"] = m, sd
        tf = rec["train_flops_mean"]
        rec["train_flops_ratio"] = tf / dense_mean if (tf is not None and dense_mean) else None
        rows_out.append(rec)
    schema = pa.schema(
        [("label", pa.string()), ("method", pa.string()), ("sparsity", pa.float64()),
         ("n_seeds", pa.int64())]
        + [(c, pa.float64()) for c in TABLE_COLUMNS[4:]]
    )
    return pa.Table.from_pylist(rows_out, schema=schema)


def _pm(mean: float | None, std: float | None, scale: float = 100.0, nd: int = 2) -> str:
    if mean is None:
        return "—"
    if std is None:
        return f"{mean * scale:.{nd}f}"
    return f"{mean * scale:.{nd}f} ± {std * scale:.{nd}f}"


def format_markdown(table: Any, title: str = "") -> str:
    """Markdown like the paper's Table 2 (accuracies in %, FLOPs as multiples of dense)."""
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines += [
        "| Method | Sparsity | Density | Test acc. final (%) | Test acc. @ best val (%) "
        "| Inference FLOPs (×dense) | Training FLOPs (×dense) | Training FLOPs | Seeds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table.to_pylist():
        tf = r["train_flops_mean"]
        lines.append(
            f"| {r['label']} | {r['sparsity'] * 100:g}% | {_pm(r['density_mean'], None, 1, 4)} "
            f"| {_pm(r['final_test_acc_mean'], r['final_test_acc_std'])} "
            f"| {_pm(r['test_at_best_val_mean'], r['test_at_best_val_std'])} "
            f"| {_pm(r['inference_flops_ratio_mean'], None, 1, 3)}× "
            f"| {_pm(r['train_flops_ratio'], None, 1, 3)}"
            f"{'×' if r['train_flops_ratio'] is not None else ''} "
            f"| {'—' if tf is None else f'{tf:.3g}'} | {r['n_seeds']} |"
        )
    lines += ["", "Mean ± sample std (ddof=1) over seeds; test accuracy at the epoch of best "
              "validation accuracy (no selection on test data)."]
    return "\n".join(lines) + "\n"


def write_compare_table(study_dir: str | Path, title: str = "") -> tuple[Path, Path, Any]:
    """Write ``compare_table.md`` and ``compare_table.parquet``; return their paths + table."""
    import os

    import pyarrow.parquet as pq

    d = Path(study_dir)
    table = compare_table(d)
    md, pq_path = d / "compare_table.md", d / "compare_table.parquet"
    tmp = d / f".tmp-{os.getpid()}-compare_table.parquet"
    pq.write_table(table, tmp)
    os.replace(tmp, pq_path)
    md.write_text(format_markdown(table, title))
    return md, pq_path, table


# --------------------------------------------------------------------------------------------
# driver


def run_compare_study(cfg_path: str | Path | None, overrides: list[str] | None = None,
                      smoke_test: bool = False, resume: bool = True,
                      tracking_uri: str | None = None, *, progress: bool = True
                      ) -> dict[str, Any]:
    """Run (or finish) a comparison study; return a summary (also ``compare_summary.json``)."""
    study = load_compare_config(cfg_path, overrides, smoke_test, tracking_uri)
    trials = plan_trials(study)
    t0 = time.time()
    from granet.study.results import done_keys
    from granet.study.runner import run_tuner
    from granet.study.tracking import StudyTracker

    study_dir = Path(study.study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    done = done_keys(study_dir, STAGE) if resume else set()
    todo = [t for t in trials if t["trial_key"] not in done]
    tracker = StudyTracker(study)
    status = "FINISHED"
    try:
        errors = 0
        if todo:
            from ray import tune

            grid = run_tuner(
                study, stage=STAGE,
                param_space={"trial": tune.grid_search(todo), "tracking": tracker.tracking_info()},
                resume=False, progress=progress, metric="test_at_best_val", mode="max",
            )
            errors = grid.num_errors
        md, pq_path, table = write_compare_table(study_dir, f"Comparison study {study.name}")
        try:
            tracker.log_table(md)
            tracker.log_table(pq_path)
        except Exception:  # noqa: BLE001 - artifacts are a convenience
            pass
        keys = done_keys(study_dir, STAGE)
        summary = {
            "study": study.name, "study_dir": str(study_dir), "planned": len(trials),
            "tracking_uri": tracker.uri, "mlflow_ui": tracker.ui_command(),
            "ran_this_pass": len(todo), "finished": sum(t["trial_key"] in keys for t in trials),
            "errors": errors, "failed": errors, "table_md": str(md),
            "table_parquet": str(pq_path),
            "seconds": time.time() - t0,
        }
        (study_dir / "compare_summary.json").write_text(json.dumps(summary, indent=2))
        if errors:
            status = "FAILED"
        return summary
    except BaseException:
        status = "FAILED"
        raise
    finally:
        tracker.finish(status)
