"""Reports: figures from the Parquet tables alone (synthetic tables and real smoke studies)."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics

import matplotlib.pyplot as plt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.image import imread

from granet.study import results
from granet.study.optuna_store import search_schema
from granet.study.paths import StudyPaths
from granet.study.report import make_report
from granet.study.report.figures import (
    _lr_decays,
    draw_compare,
    draw_plasticity,
    plasticity_series,
)
from granet.study.report.tables import write_compare_table, write_plasticity_summary
from tests.study.helpers import run_script, smoke_study

PNG = b"\x89PNG\r\n\x1a\n"


def _png_ok(path, min_bytes: int = 8000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > min_bytes, path
    h, w = imread(path).shape[:2]
    assert h > 200 and w > 300


# (model, trunk method, scope, structure): one figure each, never averaged together. Each of
# the first four has a dense trunk (trunk method "dense"); the last has none of its own: the
# dense trunk of the first (same model, scope and structure) is drawn in its figure too.
COMBOS = [("mlp", "static", "global", "unstructured"), ("mlp", "static", "layerwise",
                                                      "unstructured"),
          ("cnn1d", "static", "global", "unstructured"), ("mlp", "gmp", "global", "filter"),
          ("mlp", "gmp", "global", "unstructured")]
WITH_DENSE = 4  # combos 0..3 write a dense trunk


def _source(c: int, dens: float) -> int:
    """The combo whose rows a (figure c, trunk density) panel draws."""
    if dens < 1.0 or c < WITH_DENSE:
        return c
    model, _, scope, structure = COMBOS[c]
    return next(i for i, x in enumerate(COMBOS[:WITH_DENSE])
                if (x[0], x[2], x[3]) == (model, scope, structure))
EPOCHS_T = (0, 2, 4, 6, 8)
RATIOS = (0.2, 0.5, 0.9)
SEEDS = (0, 1)
# one probe "diverged" (no row): combo 0, density 0.5, regen, p=0.9, t=8, seed 1
MISSING = (0, 0.5, True, 0.9, 8, 1)


def _value(c: int, dens: float, regen: bool, ratio: float, t: int, seed: int) -> float:
    """A synthetic probe value (a fraction): differs per combo, density and seed."""
    lr = 0.1 * 0.1 ** sum(t >= m for m in (4, 7))
    return (-ratio * (1.0 - 10 * lr) * (0.5 if regen else 1.0) * 0.1 * (2 - dens)
            + 0.003 * (seed + 1) * (c + 1) * (1 + ratio) + 0.001 * c)


def _synthetic_study(d) -> None:
    """Schema-conformant rows in every table the report reads: 5 (model, trunk method, scope,
    structure) combinations x trunk densities 1.0 (dense; 4 of them) / 0.5 x 2 seeds x regen
    off/on x 3 ratios x 5 probe epochs, kinds plasticity and gap."""
    n = 0
    for c, (model, sparse_method, scope, structure) in enumerate(COMBOS):
        rows = []
        for dens in (1.0, 0.5) if c < WITH_DENSE else (0.5,):
            method = "dense" if dens == 1.0 else sparse_method
            for seed in SEEDS:
                tkey = f"trunk-{c}-{dens}-{seed}"
                cfg = {"data": {"name": "mnist1d"}, "model": {"name": model},
                       "optim": {"schedule": "multistep", "milestones": [4, 7]}}
                results.write_rows(d, "trials", "trunk", tkey, [{
                    "key": tkey, "study": "synth", "stage": "trunk", "status": "done",
                    "config_json": json.dumps(cfg), "spec_json": "{}", "method": method,
                    "seed": seed, "epochs": 10, "density": dens}])
                for regen in (False, True):
                    for ratio in RATIOS:
                        for t in EPOCHS_T:
                            if (c, dens, regen, ratio, t, seed) == MISSING:
                                continue
                            for kind in ("plasticity", "gap"):
                                val = _value(c, dens, regen, ratio, t, seed)
                                val += 0.0 if kind == "plasticity" else 0.05
                                n += 1
                                rows.append({
                                    "key": f"p{n}", "study": "synth", "trunk_key": tkey,
                                    "kind": kind, "trunk_method": method,
                                    "trunk_density": dens, "seed": seed, "model": model,
                                    "epoch_t": t, "ratio": ratio, "regen": regen,
                                    "scope": scope, "structure": structure,
                                    "k": 2 if kind == "plasticity" else 10 - t, "lr_t": 0.1,
                                    "acc_before": 0.8, "acc_after": 0.8 + val,
                                    "plasticity": val if kind == "plasticity" else None,
                                    "final_gap": val if kind == "gap" else None})
        results.write_rows(d, "probes", "probe", f"combo{c}", rows)
    rows = []
    for i in range(6):
        state = "PRUNED" if i in (2, 4) else "COMPLETE"
        rows.append({"study": "synth", "number": i, "state": state, "value": 0.5 + 0.05 * i,
                     "value_2": 1e6 * (1 + i % 3), "objective": "best_val_acc",
                     "objective_2": "train_flops", "direction": "max", "direction_2": "min",
                     "params": "{}", "trial_key": f"search-{i}", "mlflow_run_id": None,
                     "started": 0.0,
                     "duration_s": 1.0, "best": i in (3, 5)})
    path = d / "results/search/stage=search/optuna.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=search_schema()), path)
    for k, (label, method, s) in enumerate([("Dense", "dense", 0.0), ("RigL", "rigl", 0.9),
                                            ("GraNet", "granet", 0.9)]):
        for seed in (0, 1):
            key = f"c{k}{seed}"
            results.write_rows(d, "trials", "compare", key, [{
                "key": key, "study": "synth", "stage": "compare", "status": "done",
                "config_json": json.dumps({"data": {"name": "mnist1d"},
                                           "model": {"name": "cnn1d"}}),
                "method": method, "seed": seed, "epochs": 3,
                "spec_json": json.dumps({"label": label, "method": method, "sparsity": s,
                                         "seed": seed, "order": k}),
                "test_acc": 0.7 + 0.01 * seed + 0.02 * k,
                "test_at_best_val": 0.68 + 0.02 * seed + 0.01 * k,
                "density": 1 - s, "inference_flops_ratio": 1 - s,
                "train_flops": 1e9 * (1 - s / 2)}])


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth") / "synth"
    d.mkdir()
    _synthetic_study(d)
    write_compare_table(StudyPaths(d), "synth")
    # an earlier report's figure (an old name) goes; a file of the user's stays
    (d / "figures").mkdir()
    (d / "figures" / "plasticity.png").write_bytes(PNG)
    (d / "figures" / "final_gap_mlp_dense_global_unstructured.pdf").write_bytes(b"%PDF-")
    (d / "figures" / "notes.txt").write_text("mine")
    return {"dir": d, "outs": make_report(d)}


def _stem(kind: str, combo: tuple[str, str, str, str]) -> str:
    return "_".join(("plasticity" if kind == "plasticity" else "final_gap", *combo))


def test_report_writes_one_figure_per_combination_as_png_and_pdf(synth):
    d, outs = synth["dir"], synth["outs"]
    stems = ([_stem(k, c) for k in ("plasticity", "gap") for c in COMBOS]
             + ["search_history", "search_pareto", "compare_accuracy"])
    assert len(outs) == len(set(outs)) == 2 * len(stems) == 26
    assert sorted(p.name for p in outs) == sorted(f"{s}.{e}" for s in stems
                                                  for e in ("png", "pdf"))
    for p in outs:
        assert p.parent == d / "figures" and p.is_file()
        if p.suffix == ".png":
            _png_ok(p)
        else:
            data = p.read_bytes()
            assert data[:5] == b"%PDF-" and b"%%EOF" in data[-64:] and len(data) > 5000, p
    assert sorted(p.name for p in (d / "figures").iterdir()) == sorted(
        [p.name for p in outs] + ["notes.txt"])
    md = (d / "compare_table.md").read_text()
    assert "| GraNet | 90% | 0.1000 | 74.50 ± 0.71 |" in md


def test_plasticity_series_mean_std_n_per_combination(synth):
    d = synth["dir"]
    for kind, shift in (("plasticity", 0.0), ("gap", 0.05)):
        sets = plasticity_series(d, kind)
        assert [(s.model, s.trunk_method, s.scope, s.structure) for s in sets] == sorted(COMBOS)
        for s in sets:
            c = COMBOS.index((s.model, s.trunk_method, s.scope, s.structure))
            assert s.datasets == ["mnist1d"] and s.seeds == [0, 1]
            assert s.epochs == list(EPOCHS_T) and s.ratios == list(RATIOS)
            assert s.densities == [1.0, 0.5] and s.regens == [False, True]
            assert s.k == ([2] if kind == "plasticity" else [2, 4, 6, 8, 10])
            assert s.decays == {1.0: [4.0, 7.0], 0.5: [4.0, 7.0]}
            assert len(s.series) == 2 * 2 * 3
            for (dens, regen, ratio), pts in s.series.items():
                assert [p.t for p in pts] == list(EPOCHS_T)
                src = _source(c, dens)
                for p in pts:
                    vals = [100 * (_value(src, dens, regen, ratio, p.t, seed) + shift)
                            for seed in SEEDS
                            if (src, dens, regen, ratio, p.t, seed) != MISSING]
                    assert p.n == len(vals)
                    assert p.mean == pytest.approx(statistics.mean(vals), abs=1e-9)
                    if len(vals) == 1:
                        assert p.std is None
                    else:
                        assert p.std == pytest.approx(statistics.stdev(vals), abs=1e-9)
                        assert p.std > 0.01  # seeds differ: a real spread is drawn
    one = next(s for s in plasticity_series(d)
               if (s.model, s.trunk_method, s.scope, s.structure) == COMBOS[0])
    # the diverged probe: n=1 at t=8 of its line, no std
    miss = one.series[(0.5, True, 0.9)][-1]
    assert (miss.t, miss.n, miss.std) == (8, 1, None)
    assert one.title == ("Pruning plasticity: mnist1d, mlp, static + dense trunks, global "
                         "unstructured, k=2, seeds 0,1")
    # the dense trunk of combo 0 is drawn, the same numbers, in the gmp figure of combo 4
    other = next(s for s in plasticity_series(d)
                 if (s.model, s.trunk_method, s.scope, s.structure) == COMBOS[4])
    assert other.series[(1.0, True, 0.5)] == one.series[(1.0, True, 0.5)]
    assert other.series[(0.5, True, 0.5)] != one.series[(0.5, True, 0.5)]


def test_plasticity_summary_csv_and_figure_in_the_same_points(synth, tmp_path):
    """One unit everywhere: the CSV's mean/std are the figures' numbers, plasticity and final
    gap rows alike (``kind`` says which)."""
    d = synth["dir"]
    path, means = write_plasticity_summary(d, tmp_path / "summary.csv")
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["kind", "model", "trunk_method", "trunk_density", "scope",
                             "structure", "epoch_t", "lr_t", "ratio", "regen", "n",
                             "mean_points", "std_points"]
    kinds = [r["kind"] for r in rows]
    assert kinds == sorted(kinds, key=lambda k: k != "plasticity")  # plasticity rows first
    seen = {}
    for kind in ("plasticity", "gap"):
        figs = plasticity_series(d, kind)
        mine = [r for r in rows if r["kind"] == kind]
        # the dense trunk of combo 0 is in two figures (static and gmp): its panels' points twice
        assert len(mine) + 2 * len(RATIOS) * len(EPOCHS_T) == sum(
            len(pts) for s in figs for pts in s.series.values())
        seen[kind] = 0
        for r in mine:
            for s in figs:
                if (s.model, s.scope, s.structure) != (r["model"], r["scope"], r["structure"]) \
                        or r["trunk_method"] not in (s.trunk_method, "dense"):
                    continue
                pts = s.series[(float(r["trunk_density"]), r["regen"] == "True",
                                float(r["ratio"]))]
                p = next(p for p in pts if p.t == int(r["epoch_t"]))
                assert float(r["mean_points"]) == pytest.approx(p.mean, abs=1e-4)
                assert int(r["n"]) == p.n
                if p.std is not None:
                    assert float(r["std_points"]) == pytest.approx(p.std, abs=1e-4)
                seen[kind] += 1
        assert seen[kind] == sum(len(pts) for s in figs for pts in s.series.values())
    # a final-gap row's numbers from the synthetic values (gap = value + 0.05): combo 2 (cnn1d),
    # 50 % trunk, no regeneration, p = 0.9, t = 4, seeds 0 and 1
    row = next(r for r in rows if r["kind"] == "gap" and r["model"] == "cnn1d"
               and r["trunk_density"] == "0.5" and r["regen"] == "False"
               and r["ratio"] == "0.9" and r["epoch_t"] == "4")
    vals = [100 * (_value(2, 0.5, False, 0.9, 4, seed) + 0.05) for seed in SEEDS]
    assert (int(row["n"]), float(row["mean_points"]), float(row["std_points"])) == (
        2, pytest.approx(statistics.mean(vals), abs=1e-4),
        pytest.approx(statistics.stdev(vals), abs=1e-4))
    assert float(row["mean_points"]) == pytest.approx(-4.385, abs=1e-4)
    # the parent run's means per kind, ratio and regeneration (every row of that cell)
    assert sorted(means) == sorted(f"{h}.p{p:g}.{g}" for h in ("plasticity_mean",
                                                             "final_gap_mean")
                                   for p in RATIOS for g in ("noregen", "regen"))
    gap_vals = [100 * (_value(c, dens, True, 0.2, t, seed) + 0.05)
                for c in range(len(COMBOS)) for dens in ((1.0, 0.5) if c < WITH_DENSE else (0.5,))
                for t in EPOCHS_T for seed in SEEDS
                if (c, dens, True, 0.2, t, seed) != MISSING]
    assert means["final_gap_mean.p0.2.regen"] == pytest.approx(statistics.mean(gap_vals))
    assert means["final_gap_mean.p0.2.regen"] - means["plasticity_mean.p0.2.regen"] == \
        pytest.approx(5.0)


def test_drawn_plasticity_figure(synth):
    """The figure draws the series' means with std error bars, integer ticks at the probe
    epochs, a distinct marker and line style per ratio, n in the legend."""
    sets = plasticity_series(synth["dir"])
    s = next(x for x in sets if (x.model, x.scope) == ("mlp", "global")
             and x.trunk_method == "static")
    fig = draw_plasticity(s)
    try:
        axes = fig.axes
        assert len(axes) == 4  # 2 densities x regen off/on
        styles = {}
        for ax in axes:
            ticks = list(ax.get_xticks())
            assert ticks == list(EPOCHS_T) and all(float(t).is_integer() for t in ticks)
            if ax.get_subplotspec().is_last_row():  # shared x: labels on the bottom row
                assert [t.get_text() for t in ax.get_xticklabels()] == \
                    [str(t) for t in EPOCHS_T]
            conts = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
            assert len(conts) == len(RATIOS)
            dens = 1.0 if ax.get_subplotspec().colspan.start == 0 else 0.5
            regen = ax.get_subplotspec().rowspan.start == 1
            for cont in conts:
                m = re.fullmatch(r"p=([0-9.]+) \(n=([0-9-]+)\)", cont.get_label())
                assert m, cont.get_label()
                ratio = float(m.group(1))
                pts = s.series[(dens, regen, ratio)]
                line = cont.lines[0]
                assert list(line.get_ydata()) == pytest.approx([p.mean for p in pts])
                xs = list(line.get_xdata())
                assert [round(x) for x in xs] == list(EPOCHS_T)
                assert max(abs(x - round(x)) for x in xs) < 0.2
                assert m.group(2) == ("1-2" if ratio == 0.9 else "2")  # n over the figure
                # error bar half-lengths = the std over seeds
                segs = cont.lines[2][0].get_segments()
                half = [(seg[1][1] - seg[0][1]) / 2 for seg in segs]
                assert half == pytest.approx([p.std or 0.0 for p in pts], abs=1e-9)
                styles.setdefault(ratio, set()).add((line.get_marker(),
                                                     str(line.get_linestyle())))
        assert all(len(v) == 1 for v in styles.values())
        got = [next(iter(v)) for v in styles.values()]
        assert len({g[0] for g in got}) == len(RATIOS)  # markers differ
        assert len({g[1] for g in got}) == len(RATIOS)  # line styles differ
        assert s.title in fig._suptitle.get_text()
        # the one point with a seed missing says so
        notes = [t.get_text() for ax in axes for t in ax.texts]
        assert notes == ["n=1"]
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend == ["p=0.2 (n=2)", "p=0.5 (n=2)", "p=0.9 (n=1-2)", "LR decay"]
    finally:
        plt.close(fig)


def test_drawn_compare_figure(synth):
    """The compare figure draws the table's means and stds in percent, n in the legend, one
    tick per sparsity; data set and model in the title."""
    d = synth["dir"]
    rows = pq.read_table(d / "compare_table.parquet").to_pylist()
    fig = draw_compare(rows, "mnist1d, cnn1d")
    try:
        ax = fig.axes[0]
        conts = {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}
        assert sorted(conts) == ["GraNet (n=2)", "RigL (n=2)"]
        # test_at_best_val = 0.68 + 0.02 seed + 0.01 k (k: 0 dense, 1 RigL, 2 GraNet), seeds 0, 1
        for label, k in (("RigL", 1), ("GraNet", 2)):
            vals = [100 * (0.68 + 0.02 * seed + 0.01 * k) for seed in (0, 1)]
            cont = conts[f"{label} (n=2)"]
            assert list(cont.lines[0].get_ydata()) == pytest.approx([statistics.mean(vals)])
            seg = cont.lines[2][0].get_segments()[0]
            assert (seg[1][1] - seg[0][1]) / 2 == pytest.approx(statistics.stdev(vals))
        dense = [ln for ln in ax.lines if ln.get_label() == "Dense (n=2)"]
        assert len(dense) == 1 and list(dense[0].get_ydata()) == pytest.approx([69.0, 69.0])
        assert [t.get_text() for t in ax.get_xticklabels()] == ["90"]
        assert "mnist1d, cnn1d" in ax.get_title()
    finally:
        plt.close(fig)


def test_lr_decays_from_config_epochs_or_probes(synth, tmp_path):
    # LR decays: from the trunk config, else the trunk's epoch LRs, else the probes' lr_t.
    d = synth["dir"]
    probes = results.read_table(d, "probes").to_pylist()
    decays = _lr_decays(d, probes)
    assert len(decays) == 18 and set(map(tuple, decays.values())) == {(4.0, 7.0)}
    e = tmp_path / "no-config"
    e.mkdir()
    results.write_rows(e, "epochs", "trunk", "tk", [
        {"key": "tk", "stage": "trunk", "epoch": i + 1, "lr": 0.1 * 0.1 ** (i >= 3)}
        for i in range(6)])
    fake = [{"trunk_key": "tk", "epoch_t": 0, "lr_t": 0.1},
            {"trunk_key": "lt", "epoch_t": 2, "lr_t": 0.1},
            {"trunk_key": "lt", "epoch_t": 5, "lr_t": 0.01}]
    assert _lr_decays(e, fake) == {"tk": [3.0], "lt": [5.0]}


def test_report_no_tables_writes_nothing(tmp_path):
    assert make_report(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        make_report(tmp_path / "missing")
    # `granet report` on a directory without results says so and fails
    proc, _ = run_script(["-m", "granet", "report", str(tmp_path)], join_ray=False)
    assert proc.returncode == 2
    assert f"granet: error: study directory {str(tmp_path)!r}: holds no study results" in \
        proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_report_from_real_smoke_studies_logs_to_parent_run(ray_session, tmp_path_factory):
    from mlflow.tracking import MlflowClient

    for kind, stems in (("compare", ["compare_accuracy"]), ("search", ["search_history"])):
        d = smoke_study(kind, tmp_path_factory)["dir"]
        want = {f"{s}.{e}" for s in stems for e in ("png", "pdf")}
        # the driver drew and logged them at the study's end; `make_report` draws them again
        drawn = {p.name for p in (d / "figures").iterdir()}
        outs = make_report(d)
        assert {p.name for p in outs} == want == drawn
        for p in outs:
            if p.suffix == ".png":
                _png_ok(p)
            else:
                assert p.read_bytes()[:5] == b"%PDF-"
        client = MlflowClient(tracking_uri=f"sqlite:///{d / 'mlflow.db'}")
        exp = client.get_experiment_by_name("granet")
        parent = client.search_runs([exp.experiment_id],
                                    filter_string="tags.`granet.stage` = 'study'")[0]
        logged = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
        assert logged == {f"figures/{n}" for n in want}
    table = pq.read_table(smoke_study("compare", tmp_path_factory)["dir"]
                          / "compare_table.parquet")
    assert not any(math.isnan(v) for v in table.column("final_test_acc_mean").to_pylist())
