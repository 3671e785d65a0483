"""Study figures drawn from the Parquet tables alone (matplotlib, Agg backend).

``make_report(study_dir) -> list[Path]`` draws what the tables of a study directory allow and
returns the files written (under ``<study_dir>/figures/``); the study driver logs them to the
study's parent MLflow run.

- ``plasticity.png`` (table ``probes``, kind ``plasticity``): pruning plasticity (mean over seeds)
  vs the epoch of pruning t, one line per prune ratio p, one panel per trunk sparsity, row 1
  without and row 2 with regeneration; the trunk's LR decays as dashed vertical lines (from the
  trunk's ``config_json`` in ``trials`` (multistep milestones), else from drops of ``lr`` in the
  trunk's ``epochs`` rows, else from drops of ``probes.lr_t``);
- ``final_gap.png`` (probes of kind ``gap``, if any): the same layout for the final gap;
- ``search_history.png`` (table ``search``): objective per Optuna trial (COMPLETE filled, PRUNED
  hollow) and the best-so-far line; for a multi-objective search ``search_pareto.png``;
- ``compare_accuracy.png`` (``compare_table.parquet``): test accuracy at the best validation epoch
  vs sparsity, one line per method, error bars = std over seeds.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from granet.io import atomic_write  # noqa: E402
from granet.study.paths import StudyPaths  # noqa: E402
from granet.study.results import read_table  # noqa: E402

__all__ = [
    "make_report",
    "plot_compare",
    "plot_plasticity",
    "plot_search",
    "read_search_table",
]


def read_search_table(study_dir: str | Path) -> Any:
    """The ``search`` table (Optuna snapshot) or None when the study has none."""
    import pyarrow.parquet as pq

    path = StudyPaths(study_dir).search_table
    return pq.read_table(path) if path.is_file() else None


# --------------------------------------------------------------------------------------------
# plasticity


def _milestones_from_config(config_json: str | None) -> list[float]:
    if not config_json:
        return []
    cfg = json.loads(config_json)
    o = cfg.get("optim", {})
    if o.get("schedule") == "multistep":
        return [float(m) for m in o.get("milestones", [])]
    return []


def _lr_decays(study_dir: Path, probes: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Trunk key -> epochs (0-based boundaries) at which its learning rate drops."""
    keys = {p["trunk_key"] for p in probes}
    out: dict[str, list[float]] = {}
    trials = read_table(study_dir, "trials").to_pylist()
    for t in trials:
        if t["key"] in keys:
            ms = _milestones_from_config(t["config_json"])
            if ms:
                out[t["key"]] = ms
    epochs = read_table(study_dir, "epochs").to_pylist()
    by_key: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in epochs:
        if r["key"] in keys and r["key"] not in out and r["lr"] is not None:
            by_key[r["key"]].append((r["epoch"], r["lr"]))
    for k, rows in by_key.items():
        rows.sort()
        # record epoch e holds the LR of 0-based epoch e-1: a drop from e-1 to e means the LR
        # changed at the boundary after e-1 epochs.
        out[k] = [float(e - 1) for (_, a), (e, b) in zip(rows, rows[1:], strict=False)
                  if b < a * 0.999]
    for k in keys - set(out):
        rows = sorted({(p["epoch_t"], p["lr_t"]) for p in probes
                       if p["trunk_key"] == k and p["lr_t"] is not None})
        out[k] = [float(t) for (_, a), (t, b) in zip(rows, rows[1:], strict=False)
                  if b < a * 0.999]
    return out


def plot_plasticity(study_dir: str | Path, out: str | Path,
                    kind: str = "plasticity") -> Path | None:
    """Plasticity (or final gap) vs epoch of pruning; None when the table has no such rows."""
    study_dir = Path(study_dir)
    value = "plasticity" if kind == "plasticity" else "final_gap"
    probes = [p for p in read_table(study_dir, "probes").to_pylist()
              if p["kind"] == kind and p[value] is not None and not math.isnan(p[value])]
    if not probes:
        return None
    decays = _lr_decays(study_dir, probes)
    densities = sorted({p["trunk_density"] for p in probes}, reverse=True)
    ratios = sorted({p["ratio"] for p in probes})
    cmap = plt.get_cmap("viridis")
    colors = {r: cmap(i / max(len(ratios) - 1, 1)) for i, r in enumerate(ratios)}
    fig, axes = plt.subplots(2, len(densities), figsize=(3.6 * len(densities) + 0.6, 6.2),
                             sharex=True, sharey=True, squeeze=False)
    for col, dens in enumerate(densities):
        for row, regen in enumerate((False, True)):
            ax = axes[row][col]
            sel = [p for p in probes if p["trunk_density"] == dens and bool(p["regen"]) == regen]
            for r in ratios:
                pts: dict[int, list[float]] = defaultdict(list)
                for p in sel:
                    if p["ratio"] == r:
                        pts[p["epoch_t"]].append(p[value] * 100.0)
                if not pts:
                    continue
                xs = sorted(pts)
                ys = [sum(pts[x]) / len(pts[x]) for x in xs]
                ax.plot(xs, ys, marker="o", ms=3.5, color=colors[r], label=f"p={r:g}")
            marks = sorted({m for p in sel for m in decays.get(p["trunk_key"], [])})
            for m in marks:
                ax.axvline(m, color="grey", ls="--", lw=0.9)
            ax.axhline(0.0, color="black", lw=0.5)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"trunk sparsity {1 - dens:.0%}")
            if row == 1:
                ax.set_xlabel("epoch of pruning t")
            if col == 0:
                what = "plasticity" if kind == "plasticity" else "final gap"
                ax.set_ylabel(f"{'with' if regen else 'without'} regeneration\n{what} (points)")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="upper right", title="prune ratio", fontsize=8)
    title = "Pruning plasticity" if kind == "plasticity" else "Final performance gap"
    fig.suptitle(f"{title} (dashed: learning-rate decays)")
    fig.tight_layout(rect=(0, 0, 0.9, 0.95))
    return _save(fig, out)


# --------------------------------------------------------------------------------------------
# search


def plot_search(study_dir: str | Path, figdir: str | Path) -> list[Path]:
    """Optimisation history (and Pareto front for a multi-objective search)."""
    t = read_search_table(study_dir)
    if t is None or t.num_rows == 0:
        return []
    rows = sorted(t.to_pylist(), key=lambda r: r["number"])
    figdir = Path(figdir)
    outs: list[Path] = []
    obj, direction = rows[0]["objective"], rows[0]["direction"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for state, style in (("COMPLETE", dict(color="C0")),
                         ("PRUNED", dict(facecolors="none", edgecolors="C1"))):
        sel = [r for r in rows if r["state"] == state and r["value"] is not None]
        if sel:
            ax.scatter([r["number"] for r in sel], [r["value"] for r in sel], s=28,
                       label=state.lower(), **style)
    best, xs, ys = None, [], []
    for r in rows:
        if r["state"] == "COMPLETE" and r["value"] is not None:
            v = r["value"]
            if best is None or (v > best if direction == "max" else v < best):
                best = v
        if best is not None:
            xs.append(r["number"])
            ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="C2", label="best so far")
    ax.set_xlabel("Optuna trial number")
    ax.set_ylabel(obj)
    ax.set_title(f"Search history ({rows[0]['study']}, {direction} {obj})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    outs.append(_save(fig, figdir / "search_history.png"))
    if rows[0]["objective_2"]:
        obj2 = rows[0]["objective_2"]
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        done = [r for r in rows if r["state"] == "COMPLETE" and r["value_2"] is not None]
        front = sorted((r for r in done if r["best"]), key=lambda r: r["value_2"])
        ax.scatter([r["value_2"] for r in done], [r["value"] for r in done], color="C0", s=24,
                   label="complete")
        if front:
            ax.plot([r["value_2"] for r in front], [r["value"] for r in front], "o-", color="C3",
                    label="Pareto front")
            for r in front:
                ax.annotate(str(r["number"]), (r["value_2"], r["value"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"{obj2} ({rows[0]['direction_2']})")
        ax.set_ylabel(f"{obj} ({direction})")
        ax.set_title("Search: Pareto front")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        outs.append(_save(fig, figdir / "search_pareto.png"))
    return outs


# --------------------------------------------------------------------------------------------
# comparison


def plot_compare(study_dir: str | Path, figdir: str | Path) -> list[Path]:
    """The accuracy-vs-sparsity figure of a comparison study (from compare_table.parquet)."""
    import pyarrow.parquet as pq

    paths = StudyPaths(study_dir)
    if not paths.compare_parquet.is_file():
        return []
    rows = pq.read_table(paths.compare_parquet).to_pylist()
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for i, lab in enumerate(labels):
        sel = sorted((r for r in rows if r["label"] == lab), key=lambda r: r["sparsity"])
        xs = [r["sparsity"] * 100 for r in sel]
        ys = [(r["test_at_best_val_mean"] or math.nan) * 100 for r in sel]
        es = [(r["test_at_best_val_std"] or 0.0) * 100 for r in sel]
        if sel[0]["method"] == "dense":
            ax.axhline(ys[0], color="black", ls=":", label=lab)
        else:
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, color=f"C{i % 10}",
                        label=lab)
    ax.set_xlabel("final sparsity (%)")
    ax.set_ylabel("test accuracy at best validation (%)")
    ax.set_title("Comparison (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return [_save(fig, Path(figdir) / "compare_accuracy.png")]


# --------------------------------------------------------------------------------------------


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def make_report(study_dir: str | Path) -> list[Path]:
    """Draw every figure the study's tables allow; return the files written (nothing when the
    directory holds no results)."""
    study_dir = Path(study_dir).resolve()
    if not study_dir.is_dir():
        raise FileNotFoundError(f"study directory {str(study_dir)!r}: not found")
    figdir = StudyPaths(study_dir).figures
    outs: list[Path] = []
    for kind, name in (("plasticity", "plasticity.png"), ("gap", "final_gap.png")):
        p = plot_plasticity(study_dir, figdir / name, kind)
        if p is not None:
            outs.append(p)
    outs += plot_search(study_dir, figdir)
    outs += plot_compare(study_dir, figdir)
    return outs
