"""Study figures drawn from the Parquet tables alone (matplotlib, Agg backend).

``make_report(study_dir) -> list[Path]`` draws what the tables of a study directory allow and
returns every file written (under ``<study_dir>/figures/``, each figure as PNG and PDF); the
study driver logs them to the study's parent MLflow run. Every accuracy is in points (percent).

- ``plasticity_<model>_<trunk method>_<scope>_<structure>.png/.pdf`` (table ``probes``, kind
  ``plasticity``): one figure per model, trunk method, scope and structure - never averaged
  across them; the dense trunk (trunk method "dense", density 1.0) is a panel of every figure
  of its model, scope and structure. Pruning plasticity vs the epoch of pruning t (integer
  ticks at the probe epochs), one line per prune ratio p (its own colour, marker and line
  style: readable in grayscale), mean over seeds with error bars of the sample std (ddof=1)
  and n in the legend, one panel per trunk density, one row without and one with
  regeneration; the trunk's LR decays as thin grey vertical lines (from the trunk's
  ``config_json`` in ``trials`` (multistep milestones), else from drops of ``lr`` in the
  trunk's ``epochs`` rows, else from drops of ``probes.lr_t``). The title names the data set
  (the trunk's config), model, k and seeds. Diverged probes have no row, so n counts the seeds
  that finished;
- ``final_gap_<...>.png/.pdf`` (probes of kind ``gap``, if any): the same for the final gap
  (paper Fig. 3);
- ``search_history.png/.pdf`` (table ``search``): objective per Optuna trial (COMPLETE filled,
  PRUNED hollow) and the best-so-far line; for a multi-objective search ``search_pareto``;
- ``compare_accuracy.png/.pdf`` (``compare_table.parquet``): test accuracy at the best
  validation epoch vs final sparsity (evenly spaced categories), one line per method (its own
  colour, marker and line style), error bars = sample std over seeds, n in the legend; dense as
  a dotted line with its std as a band.

:func:`plasticity_series` returns exactly the numbers a plasticity figure draws, and
:func:`draw_plasticity` the (unsaved) figure of one panel set.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from granet.study.paths import StudyPaths  # noqa: E402
from granet.study.report.tables import _mean_std  # noqa: E402
from granet.study.results import read_table  # noqa: E402
from granet.study.storage import atomic_write, read_parquet, study_path  # noqa: E402

__all__ = [
    "FORMATS",
    "PlasticityPanels",
    "SeriesPoint",
    "draw_compare",
    "draw_plasticity",
    "make_report",
    "plasticity_series",
    "plot_compare",
    "plot_plasticity",
    "plot_search",
    "read_search_table",
]

FORMATS = ("png", "pdf")
# One style per line, so lines stay apart in grayscale: (marker, line style).
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2)),
              (0, (3, 1, 1, 1)))
# Colours from dark to light (viridis up to 0.78: the lightest stays visible on white).
_CMAP_SPAN = 0.78


def read_search_table(study_dir: str | Path) -> Any:
    """The ``search`` table (Optuna snapshot) or None when the study has none."""
    path = StudyPaths(study_dir).search_table
    return read_parquet(path) if path.is_file() else None


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


def _datasets(study_dir: Path) -> dict[str, str]:
    """Trial key -> data set name, from the ``trials`` table's ``config_json``."""
    out: dict[str, str] = {}
    for t in read_table(study_dir, "trials").to_pylist():
        try:
            name = json.loads(t["config_json"] or "{}").get("data", {}).get("name")
        except ValueError:
            name = None
        if name:
            out[t["key"]] = str(name)
    return out


@dataclass(frozen=True)
class SeriesPoint:
    """One plotted point: the epoch of pruning t, mean and sample std (ddof=1; None for one
    seed) over seeds, in points (percent), and the number of seeds n."""

    t: int
    mean: float
    std: float | None
    n: int


@dataclass
class PlasticityPanels:
    """Everything one plasticity (or final-gap) figure draws: one (model, trunk method, scope,
    structure); a panel per trunk density and regeneration setting, a line per ratio."""

    kind: str  # "plasticity" | "gap"
    model: str
    trunk_method: str
    scope: str
    structure: str
    datasets: list[str]
    k: list[int]
    seeds: list[int]
    epochs: list[int]  # every probe epoch t of the set (the x ticks)
    densities: list[float]  # trunk densities, dense first
    regens: list[bool]
    ratios: list[float]
    # (trunk density, regen, ratio) -> points sorted by t
    series: dict[tuple[float, bool, float], list[SeriesPoint]] = field(default_factory=dict)
    decays: dict[float, list[float]] = field(default_factory=dict)  # density -> LR decay epochs

    @property
    def stem(self) -> str:
        """The file name without suffix: ``plasticity_<model>_<method>_<scope>_<structure>``."""
        head = "plasticity" if self.kind == "plasticity" else "final_gap"
        parts = [self.model, self.trunk_method, self.scope, self.structure]
        return "_".join([head, *(re.sub(r"[^A-Za-z0-9.-]+", "-", str(p)) for p in parts)])

    @property
    def title(self) -> str:
        what = "Pruning plasticity" if self.kind == "plasticity" else "Final performance gap"
        data = ", ".join(self.datasets) or "data set unknown"
        k = (f"k={','.join(str(x) for x in self.k)}" if self.kind == "plasticity"
             else "trained to the end")
        seeds = ("seed " if len(self.seeds) == 1 else "seeds ") + ",".join(
            str(s) for s in self.seeds)
        trunks = (f"{self.trunk_method} trunks" if self.trunk_method == "dense"
                  or 1.0 not in self.densities else f"{self.trunk_method} + dense trunks")
        return (f"{what}: {data}, {self.model}, {trunks}, {self.scope} {self.structure}, {k}, "
                f"{seeds}")


def plasticity_series(study_dir: str | Path, kind: str = "plasticity") -> list[PlasticityPanels]:
    """The numbers the plasticity (``kind="plasticity"``) or final-gap (``"gap"``) figures draw,
    one :class:`PlasticityPanels` per (model, trunk method, scope, structure), sorted by those.
    Values are in points (acc difference x 100); rows whose value is null or NaN are left out."""
    study_dir = study_path(study_dir)
    value = "plasticity" if kind == "plasticity" else "final_gap"
    probes = [p for p in read_table(study_dir, "probes").to_pylist()
              if p["kind"] == kind and p[value] is not None and not math.isnan(p[value])]
    if not probes:
        return []
    decays = _lr_decays(study_dir, probes)
    datasets = _datasets(study_dir)
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    dense: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for p in probes:
        if p["trunk_method"] == "dense":  # the density-1.0 trunk of every trunk method
            dense[(p["model"], p["scope"], p["structure"])].append(p)
        else:
            groups[(p["model"], p["trunk_method"], p["scope"], p["structure"])].append(p)
    for (model, scope, structure), rows in dense.items():
        # the dense trunk's panel goes into each figure of the same model, scope and structure
        # (as in the paper's figure); alone, it makes a figure of its own
        same = [g for g in groups if (g[0], g[2], g[3]) == (model, scope, structure)]
        for g in same or [(model, "dense", scope, structure)]:
            groups[g] = groups[g] + rows
    out = []
    for (model, method, scope, structure), rows in sorted(
            groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        vals: dict[tuple[float, bool, float], dict[int, list[float]]] = defaultdict(
            lambda: defaultdict(list))
        for p in rows:
            vals[(p["trunk_density"], bool(p["regen"]), p["ratio"])][int(p["epoch_t"])].append(
                p[value] * 100.0)
        series = {}
        for key, by_t in vals.items():
            pts = []
            for t in sorted(by_t):
                mean, std = _mean_std(by_t[t])
                pts.append(SeriesPoint(t, mean, std, len(by_t[t])))
            series[key] = pts
        dens_decays: dict[float, set[float]] = defaultdict(set)
        for p in rows:
            dens_decays[p["trunk_density"]].update(decays.get(p["trunk_key"], []))
        out.append(PlasticityPanels(
            kind=kind, model=str(model), trunk_method=str(method), scope=str(scope),
            structure=str(structure),
            datasets=sorted({datasets[p["trunk_key"]] for p in rows
                             if p["trunk_key"] in datasets}),
            k=sorted({int(p["k"]) for p in rows if p["k"] is not None}),
            seeds=sorted({int(p["seed"]) for p in rows if p["seed"] is not None}),
            epochs=sorted({int(p["epoch_t"]) for p in rows}),
            densities=sorted({p["trunk_density"] for p in rows}, reverse=True),
            regens=sorted({bool(p["regen"]) for p in rows}),
            ratios=sorted({p["ratio"] for p in rows}),
            series=series,
            decays={d: sorted(v) for d, v in dens_decays.items()},
        ))
    return out


def _n_label(ns: list[int]) -> str:
    lo, hi = min(ns), max(ns)
    return f"n={hi}" if lo == hi else f"n={lo}-{hi}"


def _ratio_styles(ratios: list[float]) -> dict[float, dict[str, Any]]:
    cmap = plt.get_cmap("viridis")
    return {r: {"color": cmap(_CMAP_SPAN * i / max(len(ratios) - 1, 1)),
                "marker": MARKERS[i % len(MARKERS)], "ls": LINESTYLES[i % len(LINESTYLES)]}
            for i, r in enumerate(ratios)}


def draw_plasticity(panels: PlasticityPanels) -> Any:
    """The figure of one panel set (not saved): a column per trunk density, a row per
    regeneration setting, one error-bar line per ratio (label ``p=<ratio> (n=...)``, n over the
    figure; a point with fewer seeds than the figure's most is marked ``n=<n>``). Points are
    offset slightly per ratio around the integer t so that error bars do not overlap."""
    dens, regens, ratios = panels.densities, panels.regens, panels.ratios
    styles = _ratio_styles(ratios)
    # n over the whole figure per ratio: one legend entry per ratio
    n_of = {r: _n_label([p.n for (_, _, rr), pts in panels.series.items() if rr == r
                         for p in pts]) for r in ratios}
    gaps = [b - a for a, b in zip(panels.epochs, panels.epochs[1:], strict=False)]
    dodge = 0.06 * min(gaps, default=1)
    fig, axes = plt.subplots(len(regens), len(dens),
                             figsize=(3.8 * len(dens) + 1.8, 3.1 * len(regens) + 0.9),
                             sharex=True, sharey=True, squeeze=False)
    what = "plasticity" if panels.kind == "plasticity" else "final gap"
    for col, d in enumerate(dens):
        for row, regen in enumerate(regens):
            ax = axes[row][col]
            for m in panels.decays.get(d, []):
                ax.axvline(m, color="0.6", ls="-", lw=2.5, alpha=0.35, zorder=0,
                           label="LR decay")
            ax.axhline(0.0, color="black", lw=0.6, zorder=1)
            for i, r in enumerate(ratios):
                pts = panels.series.get((d, regen, r))
                if not pts:
                    continue
                st = styles[r]
                off = (i - (len(ratios) - 1) / 2) * dodge
                xs = [p.t + off for p in pts]
                ys = [p.mean for p in pts]
                es = [p.std if p.std is not None else 0.0 for p in pts]
                ax.errorbar(xs, ys, yerr=es, color=st["color"], marker=st["marker"],
                            ls=st["ls"], ms=4.5, lw=1.4, capsize=2.5, elinewidth=0.9,
                            label=f"p={r:g} ({n_of[r]})", zorder=3)
                top = max(p.n for pts_ in panels.series.values() for p in pts_)
                for p, x, y in zip(pts, xs, ys, strict=True):
                    if p.n < top:  # a seed missing here (diverged or not run): say so
                        ax.annotate(f"n={p.n}", (x, y), fontsize=7, xytext=(4, 4),
                                    textcoords="offset points", color="black")
            ax.set_xticks(panels.epochs)
            ax.set_xticklabels([str(t) for t in panels.epochs])
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title("dense trunk" if d >= 1.0 else
                             f"trunk density {d:g} (sparsity {1 - d:.0%})", fontsize=10)
            if row == len(regens) - 1:
                ax.set_xlabel("epoch of pruning t")
            if col == 0:
                ax.set_ylabel(f"{'with' if regen else 'without'} regeneration\n"
                              f"{what} (points)")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    order = sorted(range(len(labels)), key=lambda i: labels[i] == "LR decay")
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="center right",
               title="prune ratio", fontsize=8, title_fontsize=8)
    many = max((p.n for pts in panels.series.values() for p in pts), default=1) > 1
    fig.suptitle(panels.title + ("\nmean ± sample std over seeds (error bars)" if many
                                 else "\none seed per point: no spread"), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    return fig


def plot_plasticity(study_dir: str | Path, figdir: str | Path,
                    kind: str = "plasticity") -> list[Path]:
    """Plasticity (or final gap) figures, one per (model, trunk method, scope, structure), each
    as PNG and PDF; the files written (none when the table has no such rows)."""
    outs: list[Path] = []
    for panels in plasticity_series(study_dir, kind):
        outs += _save(draw_plasticity(panels), study_path(figdir) / panels.stem)
    return outs


# --------------------------------------------------------------------------------------------
# search


def plot_search(study_dir: str | Path, figdir: str | Path) -> list[Path]:
    """Optimisation history (and Pareto front for a multi-objective search), PNG and PDF."""
    t = read_search_table(study_dir)
    if t is None or t.num_rows == 0:
        return []
    rows = sorted(t.to_pylist(), key=lambda r: r["number"])
    figdir = study_path(figdir)
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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers are integers
    ax.set_xlabel("Optuna trial number")
    ax.set_ylabel(obj)
    ax.set_title(f"Search history ({rows[0]['study']}, {direction} {obj})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    outs += _save(fig, figdir / "search_history")
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
        outs += _save(fig, figdir / "search_pareto")
    return outs


# --------------------------------------------------------------------------------------------
# comparison


def _compare_context(study_dir: Path) -> str:
    """"<data set>, <model>" of the comparison trials (from their ``config_json``)."""
    data, models = set(), set()
    for t in read_table(study_dir, "trials", "compare").to_pylist():
        try:
            cfg = json.loads(t["config_json"] or "{}")
        except ValueError:
            continue
        if cfg.get("data", {}).get("name"):
            data.add(str(cfg["data"]["name"]))
        if cfg.get("model", {}).get("name"):
            models.add(str(cfg["model"]["name"]))
    return ", ".join([", ".join(sorted(data)), ", ".join(sorted(models))]).strip(", ")


def draw_compare(rows: list[dict[str, Any]], context: str = "") -> Any:
    """The (unsaved) accuracy-vs-sparsity figure of compare-table rows (:data:`~granet.study.
    report.tables.TABLE_COLUMNS`); ``context`` ("<data set>, <model>") goes in the title."""
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    sparse = [lab for lab in labels
              if not any(r["method"] == "dense" for r in rows if r["label"] == lab)]
    # sparsities as evenly spaced categories (90 / 95 / 98 % apart), methods offset within one
    sparsities = sorted({r["sparsity"] for r in rows if r["method"] != "dense"})
    pos = {s: i for i, s in enumerate(sparsities)}
    dodge = 0.5 / max(len(sparse), 1)
    for lab in labels:
        sel = sorted((r for r in rows if r["label"] == lab), key=lambda r: r["sparsity"])
        ys = [(r["test_at_best_val_mean"] if r["test_at_best_val_mean"] is not None
               else math.nan) * 100 for r in sel]
        es = [(r["test_at_best_val_std"] or 0.0) * 100 for r in sel]
        n = _n_label([r["n_seeds"] for r in sel])
        if sel[0]["method"] == "dense":
            ax.axhline(ys[0], color="black", ls=":", label=f"{lab} ({n})")
            if es[0]:
                ax.axhspan(ys[0] - es[0], ys[0] + es[0], color="black", alpha=0.08)
            continue
        i = sparse.index(lab)
        off = (i - (len(sparse) - 1) / 2) * dodge
        ax.errorbar([pos[r["sparsity"]] + off for r in sel], ys, yerr=es,
                    marker=MARKERS[i % len(MARKERS)], ls=LINESTYLES[i % len(LINESTYLES)],
                    ms=5, capsize=3, color=f"C{i % 10}", label=f"{lab} ({n})")
    if sparsities:
        ax.set_xticks(range(len(sparsities)))
        ax.set_xticklabels([f"{s * 100:g}" for s in sparsities])
        ax.set_xlim(-0.5, len(sparsities) - 0.5)
    ax.set_xlabel("final sparsity (%)")
    ax.set_ylabel("test accuracy at best validation (%)")
    ax.set_title(f"Comparison{f': {context}' if context else ''}\nmean ± sample std over "
                 "seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def plot_compare(study_dir: str | Path, figdir: str | Path) -> list[Path]:
    """The accuracy-vs-sparsity figure of a comparison study (from compare_table.parquet),
    PNG and PDF."""
    study_dir = study_path(study_dir)
    paths = StudyPaths(study_dir)
    if not paths.compare_parquet.is_file():
        return []
    rows = read_parquet(paths.compare_parquet).to_pylist()
    if not rows:
        return []
    fig = draw_compare(rows, _compare_context(study_dir))
    return _save(fig, study_path(figdir) / "compare_accuracy")


# --------------------------------------------------------------------------------------------


def _save(fig: Any, stem: str | Path) -> list[Path]:
    """``<stem>.png`` and ``<stem>.pdf``, each written atomically; the figure is closed."""
    outs = []
    try:
        for fmt in FORMATS:
            stem = study_path(stem) if isinstance(stem, str) else stem
            path = stem.with_name(f"{stem.name}.{fmt}")
            # no creation date in the PDF: the same tables give the same bytes
            meta = {"CreationDate": None} if fmt == "pdf" else None
            atomic_write(path, lambda tmp, fmt=fmt, meta=meta: fig.savefig(
                tmp, dpi=110, format=fmt, metadata=meta))
            outs.append(path)
    finally:
        plt.close(fig)
    return outs


def make_report(study_dir: str | Path) -> list[Path]:
    """Draw every figure the study's tables allow; return every file written (PNG and PDF;
    nothing when the directory holds no results). Figures of earlier reports under this
    module's names that this one did not draw are removed."""
    study_dir = study_path(study_dir).resolve()
    if not study_dir.is_dir():
        raise FileNotFoundError(f"study directory {str(study_dir)!r}: not found")
    figdir = StudyPaths(study_dir).figures
    outs: list[Path] = []
    for kind in ("plasticity", "gap"):
        outs += plot_plasticity(study_dir, figdir, kind)
    outs += plot_search(study_dir, figdir)
    outs += plot_compare(study_dir, figdir)
    _remove_stale(figdir, outs)
    return outs


# the names this module draws (and drew in earlier versions: plasticity.png, final_gap.png)
_OWN = ("plasticity*", "final_gap*", "search_history", "search_pareto", "compare_accuracy")


def _remove_stale(figdir: Path, written: list[Path]) -> None:
    """Remove figures of this module's names that this report did not draw (a grid that
    changed, a study started over): the directory shows one report. Other files stay."""
    if not figdir.is_dir():
        return
    keep = {p.name for p in written}
    for pattern in _OWN:
        for fmt in FORMATS:
            for p in figdir.glob(f"{pattern}.{fmt}"):
                if p.name not in keep and p.is_file():
                    p.unlink()
