"""The compare study's grid, trained in-process (no Ray, no MLflow): a Markdown table and a verdict.

Builds every trial exactly as the compare study does (``granet.study.compare.plan_trials`` on the
study config loaded by ``load_compare_config``), trains each with :class:`granet.trainer.Trainer`
in memory, one torch thread per run, and prints the mean ± sample std over seeds of the final test
accuracy per method x sparsity (the paper's Table 2 shape), then the ordering at the highest
sparsity: Static < SET <= RigL < GraNet, as in the paper.

    nice -n 10 python bench/compare_methods.py                 # the whole grid of the config
    nice -n 10 python bench/compare_methods.py --quick         # seed 0, the highest sparsity
    python bench/compare_methods.py --seeds 0 1 --epochs 20 --set train.optim.lr=0.1
    python bench/compare_methods.py --methods Static RigL --sparsities 0.98 --jobs 2
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from granet.config import config_from_dict  # noqa: E402
from granet.study.compare import load_compare_config, plan_trials  # noqa: E402

DEFAULT_CONFIG = ROOT / "studies" / "configs" / "compare_mnist1d.yaml"
CHANCE = 0.10


def _train_one(trial: dict[str, Any]) -> dict[str, Any]:
    import torch

    from granet.trainer import Trainer

    torch.set_num_threads(1)
    cfg = config_from_dict(trial["train"])
    t0 = time.perf_counter()
    summary = Trainer(cfg, write=False).fit(resume=False)
    return {
        **trial["spec"],
        "test_acc": float(summary["test_acc"]),
        "test_at_best_val": float(summary["test_at_best_val"]),
        "density": float(summary["density"]),
        "seconds": time.perf_counter() - t0,
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    mean, std = _mean_std(values)
    return f"{100 * mean:.2f}" if math.isnan(std) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def table(rows: list[dict[str, Any]], labels: list[str], sparsities: list[float],
          key: str = "test_acc") -> str:
    """Markdown: one row per method label, one column per sparsity (dense: one value)."""
    head = "| method | " + " | ".join(f"{100 * s:g} %" for s in sparsities) + " |"
    lines = [head, "|---|" + "---|" * len(sparsities)]
    for label in labels:
        mine = [r for r in rows if r["label"] == label]
        if not mine:
            continue
        if mine[0]["method"] == "dense":
            cells = [_cell([r[key] for r in mine])] * len(sparsities)
        else:
            cells = [_cell([r[key] for r in mine if r["sparsity"] == s]) for s in sparsities]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]], sparsity: float) -> list[str]:
    """The paper's ordering at ``sparsity``: Static < SET <= RigL < GraNet, each pair checked."""
    means: dict[str, float] = {}
    for label in {r["label"] for r in rows}:
        vals = [r["test_acc"] for r in rows if r["label"] == label and r["sparsity"] == sparsity]
        if vals:
            means[label] = statistics.fmean(vals)
    out = [f"Ordering at {100 * sparsity:g} % sparsity (mean final test accuracy):"]
    out.append("  " + ", ".join(f"{k} {100 * v:.2f}" for k, v in
                                sorted(means.items(), key=lambda kv: kv[1])))
    granets = sorted(k for k in means if k.lower().startswith("granet"))
    pairs = [("Static", "SET", "<"), ("SET", "RigL", "<=")]
    pairs += [("RigL", g, "<") for g in granets]
    ok_all, missing = True, False
    for a, b, op in pairs:
        if a not in means or b not in means:
            out.append(f"  {a} {op} {b}: not measured")
            missing = True
            continue
        ok = means[a] < means[b] if op == "<" else means[a] <= means[b]
        ok_all &= ok
        out.append(f"  {a} {op} {b}: {'yes' if ok else 'NO'} "
                   f"({100 * means[a]:.2f} vs {100 * means[b]:.2f})")
    holds = "does not hold" if not ok_all else "not measured" if missing else "holds"
    out.append(f"  paper's ordering Static < SET <= RigL < GraNet: {holds}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="compare study YAML")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the config's)")
    p.add_argument("--epochs", type=int, help="override train.run.epochs")
    p.add_argument("--sparsities", type=float, nargs="+", help="subset of the config's")
    p.add_argument("--methods", nargs="+", help="method labels to run (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="seed 0 and the highest sparsity only (unless --seeds/--sparsities)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="study override, e.g. train.optim.lr=0.1 (repeatable)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    args = p.parse_args(argv)

    overrides = list(args.set)
    if args.epochs is not None:
        overrides.append(f"train.run.epochs={args.epochs}")
    study = load_compare_config(args.config, overrides)
    if args.seeds:
        study.seeds = list(args.seeds)
    elif args.quick:
        study.seeds = study.seeds[:1]
    if args.sparsities:
        study.sparsities = list(args.sparsities)
    elif args.quick:
        study.sparsities = [max(study.sparsities)]
    if args.methods:
        keep = set(args.methods)
        study.methods = [m for m in study.methods if m.get("label", m["method"]) in keep]
    trials = plan_trials(study)
    labels = [m.get("label", m["method"]) for m in study.methods]
    tr = study.train
    print(f"# compare grid: {args.config}" + (f" {' '.join(overrides)}" if overrides else ""))
    print(f"# {tr.data.name} {tr.model.name} {tr.model.kwargs or ''} {tr.run.epochs} epochs, "
          f"batch {tr.data.batch_size}, {tr.optim.name} lr {tr.optim.lr} {tr.optim.schedule} "
          f"{tr.optim.milestones if tr.optim.schedule == 'multistep' else ''}, "
          f"seeds {study.seeds}, sparsities {study.sparsities}; {len(trials)} runs, "
          f"{args.jobs} at a time", flush=True)

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for row in pool.map(_train_one, trials):
            rows.append(row)
            print(f"  {row['label']:<18} s={row['sparsity']:<5g} seed={row['seed']} "
                  f"test {100 * row['test_acc']:6.2f}  best-val test "
                  f"{100 * row['test_at_best_val']:6.2f}  density {row['density']:.4f}  "
                  f"{row['seconds']:.1f} s", flush=True)
    wall = time.perf_counter() - t0
    secs = [r["seconds"] for r in rows]
    print(f"\n{len(rows)} runs in {wall / 60:.1f} min wall; per run {statistics.fmean(secs):.1f} s "
          f"mean ({min(secs):.1f}-{max(secs):.1f})\n")
    sparsities = sorted(study.sparsities)
    print(f"Final test accuracy (%), mean ± std over seeds {study.seeds}:\n")
    print(table(rows, labels, sparsities))
    print(f"\nTest accuracy at the best validation epoch (%), mean ± std over seeds "
          f"{study.seeds}:\n")
    print(table(rows, labels, sparsities, key="test_at_best_val"))
    below = sorted({(r["label"], r["sparsity"]) for r in rows if r["test_acc"] < 2 * CHANCE})
    print(f"\nRuns below twice chance ({100 * 2 * CHANCE:g} %): "
          + (", ".join(f"{a} s={b:g}" for a, b in below) if below else "none"))
    print()
    print("\n".join(verdict(rows, max(sparsities))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
