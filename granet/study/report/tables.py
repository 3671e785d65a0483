"""Tables drawn from a study's Parquet results: the comparison table (paper's Table 2) and the
plasticity summary. Pure functions of the tables in the study directory.

``compare_table.parquet`` columns (:data:`TABLE_COLUMNS`): label, method, sparsity, n_seeds, then
mean and sample standard deviation (ddof=1; null for one seed) over seeds of the final test
accuracy, the test accuracy at the best validation epoch, the density, the inference FLOPs ratio
and the training FLOPs (absolute and relative to the dense run's mean). Only trials with status
"done" enter it; diverged trials are counted in ``n_diverged``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow as pa

from granet.study.paths import StudyPaths
from granet.study.results import read_table
from granet.study.storage import atomic_write_text, study_path, write_parquet

__all__ = ["TABLE_COLUMNS", "compare_table", "format_markdown", "write_compare_table",
           "write_plasticity_summary"]

STAGE = "compare"

TABLE_COLUMNS = (
    "label", "method", "sparsity", "n_seeds", "n_diverged",
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
    t = read_table(study_dir, "trials", stage).to_pylist()
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    methods: dict[str, str] = {}
    rank: dict[str, int] = {}
    for row in t:
        spec = json.loads(row["spec_json"] or "{}")
        if "label" not in spec or row.get("status") not in ("done", "diverged"):
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
        ok = [r for r in rows if r["status"] == "done"]
        rec: dict[str, Any] = {"label": label, "method": methods[label], "sparsity": s,
                               "n_seeds": len({r["seed"] for r in ok}),
                               "n_diverged": len(rows) - len(ok)}
        for stem, col in _METRICS.items():
            m, sd = _mean_std([r[col] for r in ok])
            rec[f"{stem}_mean"], rec[f"{stem}_std"] = m, sd
        tf = rec["train_flops_mean"]
        rec["train_flops_ratio"] = tf / dense_mean if (tf is not None and dense_mean) else None
        rows_out.append(rec)
    schema = pa.schema(
        [("label", pa.string()), ("method", pa.string()), ("sparsity", pa.float64()),
         ("n_seeds", pa.int64()), ("n_diverged", pa.int64())]
        + [(c, pa.float64()) for c in TABLE_COLUMNS[5:]]
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
            f"| {'—' if tf is None else f'{tf:.3g}'} | {r['n_seeds']}"
            f"{f' ({n} diverged)' if (n := r['n_diverged']) else ''} |"
        )
    lines += ["", "Mean ± sample std (ddof=1) over seeds; test accuracy at the epoch of best "
              "validation accuracy (no selection on test data). Diverged runs are left out of "
              "the means and counted beside the seeds."]
    return "\n".join(lines) + "\n"


def write_compare_table(paths: StudyPaths, title: str = "") -> tuple[Path, Path, Any]:
    """Write ``compare_table.md`` and ``compare_table.parquet``; return their paths + table."""
    table = compare_table(paths.root)
    write_parquet(table, paths.compare_parquet)
    atomic_write_text(paths.compare_md, format_markdown(table, title))
    return paths.compare_md, paths.compare_parquet, table


def write_plasticity_summary(study_dir: str | Path,
                             path: str | Path) -> tuple[Path | None, dict[str, float]]:
    """Per (kind, model, trunk method, trunk density, scope, structure, t, ratio, regen): mean,
    sample std (ddof=1) and n over seeds, in points (percent), as CSV. ``kind`` "plasticity"
    rows hold pruning plasticity, "gap" rows the final gap (probes trained to the end), so
    ``mean_points``/``std_points`` are the numbers of that kind's figure. Also the mean per kind,
    ratio and regeneration (the parent run's metrics: ``plasticity_mean.p<ratio>.<regen>``,
    ``final_gap_mean.p<ratio>.<regen>``). Diverged probes have no row."""
    value = {"plasticity": "plasticity", "gap": "final_gap"}
    rows = [r for r in read_table(study_dir, "probes").to_pylist()
            if r["kind"] in value and r[value[r["kind"]]] is not None
            and not math.isnan(r[value[r["kind"]]])]
    if not rows:
        return None, {}
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        g = (r["kind"], r["model"], r["trunk_method"], r["trunk_density"], r["scope"],
             r["structure"], r["epoch_t"], r["lr_t"], r["ratio"], r["regen"])
        groups.setdefault(g, []).append(r[value[r["kind"]]] * 100.0)
    lines = ["kind,model,trunk_method,trunk_density,scope,structure,epoch_t,lr_t,ratio,regen,n,"
             "mean_points,std_points"]
    # plasticity rows first, then gap; within a kind as before
    for g in sorted(groups, key=lambda g: (g[0] != "plasticity",)
                    + tuple(str(x) for x in g[:6]) + g[6:]):
        m, sd = _mean_std(groups[g])
        lines.append(",".join(str(x) for x in g)
                     + f",{len(groups[g])},{m:.4f},{'' if sd is None else f'{sd:.4f}'}")
    path = study_path(path) if isinstance(path, str) else path
    atomic_write_text(path, "\n".join(lines) + "\n")
    by_ratio: dict[str, list[float]] = {}
    for r in rows:
        head = "plasticity_mean" if r["kind"] == "plasticity" else "final_gap_mean"
        k = f"{head}.p{r['ratio']:g}.{'regen' if r['regen'] else 'noregen'}"
        by_ratio.setdefault(k, []).append(r[value[r["kind"]]] * 100.0)
    return path, {k: sum(v) / len(v) for k, v in by_ratio.items()}
