#!/usr/bin/env python
"""Study efficiency: how much of a study's slot time goes into training (issue: per-trial
overhead, probe packing).

Runs the main job (``granet study plasticity studies/configs/plasticity_mnist1d.yaml``, 4 trunks
+ 160 probes) and the plasticity smoke grid as real commands (a fresh study directory each, a
local Ray with this machine's CPUs), one variant after the other and alternating over rounds,
so every variant meets the same load:

* ``packed``   this tree, as configured (probes of one trunk checkpoint packed, 8 per trial);
* ``single``   this tree, ``--set pack_probes=1`` (every probe its own Tune trial);
* ``baseline`` the command run from another checkout (``--baseline-tree /path``: e.g. the
               code before these changes), same config.

From the Parquet tables (``epochs.epoch_seconds``: an epoch's training *and* evaluation;
``trials.wall_seconds`` and ``finished_at``: each trial's span, from entering the trainable to
its trials row) and the stage manifests (which trials one Tune trial carried), per run:

* efficiency over the trial window = sum of epoch seconds / ((last trial end - first trial
  start) x slots), and for the whole job = sum of epoch seconds / (command wall x slots);
* per-trial fixed cost: median over trials of (span - its epochs' seconds), a pack's cost shared
  by its probes; also per stage: trunks, probes, and per probe Tune trial (a whole pack);
* time outside trials: slot-seconds of the window no trial held (Tune's gaps, the switch between
  stages, idle slots at a stage's tail), and the command's wall before the first and after the
  last trial (start-up, shut-down, report);
* probes per second in the probe stage.

Plus, in-process (no Ray, no MLflow): probes per second of the main job's probe configuration
trained one by one (build, branch, fit) vs packed (granet.pack, loop and vmap modes).

    python bench/study_efficiency.py [--quick] [--rounds N] [--variants packed,single]
                                     [--baseline-tree PATH] [--no-smoke] [--no-inprocess]

``--quick``: once, packed, nothing else, the main job's grid with probes at t = 10 and 22 only (4
trunks + 64 probes: under 2 minutes on 2 idle cores; the whole main job takes ~2.5); its last line
is ``study efficiency X.XX`` (the trial-window figure). The full run's last line is the same
figure for the first variant's main job (mean over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "studies" / "configs" / "plasticity_mnist1d.yaml"


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


# ---------------------------------------------------------------------------------- one run


# --quick: the main job's grid with probes at t = 10 and 22 only (4 trunks + 64 probes): the full
# main job (4 trunks + 160 probes of the BatchNorm cnn1d) takes ~2.5 minutes on 2 cores; without
# the main job's final-gap probes (their grid is not a subset of t = 10, 22)
QUICK = ["--set", "probe_epochs=[10,22]", "--set", "probe_around_decay=false",
         "--set", "final_gap=false"]


def run_job(tree: Path, study_dir: Path, extra: list[str], smoke: bool) -> tuple[float, str]:
    """The study command, as a user runs it; (wall seconds, output tail)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(tree)
    cmd = [sys.executable, "-m", "granet", "study", "plasticity", str(MAIN),
           "--set", f"study_dir={study_dir}", "--quiet", *extra]
    if smoke:
        cmd.append("--smoke-test")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return wall, proc.stdout[-500:]


def _units(study_dir: Path) -> dict[str, str]:
    """trial key -> the Tune trial that carried it (its pack, else itself)."""
    out: dict[str, str] = {}
    for man in (study_dir / "ray").glob("*-experiments.json"):
        for exp in json.loads(man.read_text()):
            for unit in exp.get("units") or []:
                for k in unit:
                    out[k] = unit[0] if len(unit) > 1 else k
    return out


def analyze(study_dir: Path, wall: float, t_start: float, slots: int) -> dict[str, Any]:
    """The figures of one finished study directory (see the module docstring)."""
    sys.path.insert(0, str(REPO))
    from granet.study import results

    trials = results.read_table(study_dir, "trials").to_pylist()
    epochs = results.read_table(study_dir, "epochs").to_pylist()
    ep: dict[str, float] = {}
    for e in epochs:
        ep[e["key"]] = ep.get(e["key"], 0.0) + (e["epoch_seconds"] or 0.0)
    unit_of = _units(study_dir)
    units: dict[str, dict[str, Any]] = {}
    for t in trials:
        end = t["finished_at"].timestamp()
        start = end - t["wall_seconds"]
        u = units.setdefault(unit_of.get(t["key"], t["key"]),
                             {"start": start, "end": end, "ep": 0.0, "n": 0, "stage": t["stage"]})
        u["start"], u["end"] = min(u["start"], start), max(u["end"], end)
        u["ep"] += ep.get(t["key"], 0.0)
        u["n"] += 1
    first = min(u["start"] for u in units.values())
    last = max(u["end"] for u in units.values())
    window = last - first
    train = sum(ep.values())
    spans = sum(u["end"] - u["start"] for u in units.values())
    fixed = [u["end"] - u["start"] - u["ep"] for u in units.values()]
    # per trial key: a pack's cost shared by its members (the median is over trials, not packs)
    fixed_member = [(u["end"] - u["start"] - u["ep"]) / u["n"] for u in units.values()
                    for _ in range(u["n"])]

    def stage_median(stage: str, per_key: bool) -> float:
        vals = [(u["end"] - u["start"] - u["ep"]) / (u["n"] if per_key else 1)
                for u in units.values() if u["stage"] == stage]
        return statistics.median(vals) if vals else float("nan")

    probes = [u for u in units.values() if u["stage"] == "probe"]
    probe_window = (max(u["end"] for u in probes) - min(u["start"] for u in probes)
                    if probes else float("nan"))
    trunks = [u for u in units.values() if u["stage"] == "trunk"]
    switch = (min(u["start"] for u in probes) - max(u["end"] for u in trunks)
              if probes and trunks else float("nan"))
    return {
        "trials": len(trials), "tune_trials": len(units), "wall": wall, "window": window,
        "train_s": train, "eff_window": train / (window * slots),
        "eff_job": train / (wall * slots),
        "fixed_tune_trial": statistics.median(fixed), "fixed_trial": statistics.median(
            fixed_member), "fixed_trunk": stage_median("trunk", False),
        "fixed_probe": stage_median("probe", True), "fixed_pack": stage_median("probe", False),
        "outside_slot_s": window * slots - spans,
        "startup": first - t_start, "tail": t_start + wall - last, "stage_switch": switch,
        "probes_per_s": sum(u["n"] for u in probes) / probe_window if probes else float("nan"),
    }


def fmt(label: str, r: dict[str, Any]) -> str:
    return (f"{label:<18} wall {r['wall']:6.1f} s  window {r['window']:6.1f} s  "
            f"epochs {r['train_s']:6.1f} s  eff window {r['eff_window']:.3f}  "
            f"eff job {r['eff_job']:.3f}  tune trials {r['tune_trials']:3d}  "
            f"fixed/trial {r['fixed_trial'] * 1000:5.0f} ms (trunk "
            f"{r['fixed_trunk'] * 1000:5.0f}, probe {r['fixed_probe'] * 1000:4.0f}, probe Tune "
            f"trial {r['fixed_pack'] * 1000:5.0f})  "
            f"outside trials {r['outside_slot_s']:5.1f} slot-s  start-up {r['startup']:4.1f} s  "
            f"stage switch {r['stage_switch']:4.1f} s  tail {r['tail']:4.1f} s  "
            f"probes/s {r['probes_per_s']:5.2f}")


# ---------------------------------------------------------------------------------- in-process


def inprocess(k: int = 8, repeats: int = 2) -> list[str]:
    """Probes/s of the main job's probe config (t=10 of the 0.1-density trunk), one by one vs
    packed (one thread, no Ray, no MLflow): trainer build + branch + k epochs each."""
    import torch

    from granet.branch import branch
    from granet.io import load_checkpoint, save_checkpoint
    from granet.pack import ProbePack
    from granet.study.base import load_study_config
    from granet.study.plasticity import PlasticityStudy
    from granet.study.tune.trainable import build_trainer, shared_dataset
    from granet.trainer import Callback

    torch.set_num_threads(1)
    study = load_study_config(PlasticityStudy, MAIN, ["trunk_densities=[0.1]",
                                                      "probe_epochs=[10]",
                                                      "probe_around_decay=false"])
    trunk = study.trunks()[0]
    probes = [s for s, _ in study.probes(trunk)][:k]
    data = shared_dataset(probes[0].config())
    tmp = Path(tempfile.mkdtemp(prefix="granet-bench-"))
    ckpt = tmp / "trunk-t10.pt"

    class Stop(Callback):
        def on_epoch_end(self, trainer, record) -> None:
            if trainer.epoch == 10:
                save_checkpoint(trainer.state_dict(), ckpt)
                trainer.stop = True

    build_trainer(trunk, [Stop()], data).fit(resume=False)
    own = [s for s in study.probes(trunk)][:k]

    def branch_of(t, state, o) -> None:
        branch(t, state, epoch_t=10, ratio=o["ratio"], scope=o["scope"],
               structure=o["structure"], regen=o["regen"])

    def one_by_one() -> float:
        t0 = time.perf_counter()
        for spec, o in own:
            t = build_trainer(spec, (), data)
            branch_of(t, str(ckpt), o)
            t.fit(resume=False)
        return time.perf_counter() - t0

    def packed(mode: str) -> float:
        t0 = time.perf_counter()
        trainers = [build_trainer(spec, (), data) for spec, _ in own]
        pack = ProbePack(trainers, mode=mode)
        state = load_checkpoint(ckpt, keys=("model", "engine"))
        for i, (_, o) in enumerate(own):
            pack.call(i, lambda t, o=o: branch_of(t, state, o))
        pack.fit()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"one by one": [], "packed loop": [], "packed vmap": []}
    for _ in range(repeats):  # interleaved: the same load for each
        times["one by one"].append(one_by_one())
        times["packed loop"].append(packed("loop"))
        times["packed vmap"].append(packed("vmap"))
    shutil.rmtree(tmp, ignore_errors=True)
    base = min(times["one by one"])
    out = [f"## in-process: {k} probes of the main job (cnn1d, k={study.k} epochs), 1 thread, "
           f"best of {repeats} (load {load()})"]
    for name, ts in times.items():
        best = min(ts)
        out.append(f"{name:<12} {best:6.2f} s  {k / best:5.2f} probes/s  "
                   f"x{base / best:.2f} vs one by one")
    return out


# ---------------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="once, packed, probes at t = 10 and 22 only (under 2 minutes)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default="packed,single",
                   help="comma list of packed, single, baseline")
    p.add_argument("--baseline-tree", default=None,
                   help="another checkout run as variant 'baseline' (its own code, same config)")
    p.add_argument("--no-smoke", action="store_true", help="skip the smoke grid")
    p.add_argument("--no-inprocess", action="store_true", help="skip the in-process bench")
    p.add_argument("--keep", default=None, help="keep the study directories under this path")
    args = p.parse_args()

    slots = os.cpu_count() or 1
    import torch

    print(f"# bench/study_efficiency.py  {time.strftime('%Y-%m-%d %H:%M:%S')}  "
          f"{platform.machine()}  cpus={slots}  torch={torch.__version__}  load-avg {load()}",
          flush=True)
    variants: dict[str, tuple[Path, list[str]]] = {
        "packed": (REPO, []), "single": (REPO, ["--set", "pack_probes=1"]),
    }
    if args.baseline_tree:
        variants["baseline"] = (Path(args.baseline_tree).resolve(), [])
    names = ["packed"] if args.quick else [v for v in args.variants.split(",") if v]
    for n in names:
        if n not in variants:
            p.error(f"--variants: {n!r} unknown or (baseline) needs --baseline-tree")
    jobs = [("main", False)] if args.quick or args.no_smoke else [("main", False),
                                                                   ("smoke", True)]
    rounds = 1 if args.quick else args.rounds
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="granet-effic-"))
    got: dict[tuple[str, str], list[dict[str, Any]]] = {}
    try:
        for rnd in range(rounds):
            for job, smoke in jobs:
                for name in names:
                    tree, extra = variants[name]
                    sd = root / f"{job}-{name}-{rnd}"
                    before = load()
                    t_start = time.time()
                    wall, _ = run_job(tree, sd, extra + (QUICK if args.quick else []), smoke)
                    r = analyze(sd, wall, t_start, slots)
                    got.setdefault((job, name), []).append(r)
                    print(fmt(f"{job} {name} #{rnd + 1}", r) + f"  load {before} -> {load()}",
                          flush=True)
                    if not args.keep:
                        shutil.rmtree(sd, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    if not args.quick:
        print(f"## means over {rounds} rounds (alternated; ratios against {names[0]})")
        for job, _ in jobs:
            ref = None
            for name in names:
                rs = got[(job, name)]
                mean = {k: statistics.mean(r[k] for r in rs) for k in rs[0]}
                print(fmt(f"{job} {name}", mean))
                if ref is None:
                    ref = mean
                else:
                    print(f"{'':<18} {names[0]} vs {name}: wall {name}/{names[0]} "
                          f"{mean['wall'] / ref['wall']:.2f}, eff window "
                          f"{ref['eff_window']:.3f} vs {mean['eff_window']:.3f}, eff job "
                          f"{ref['eff_job']:.3f} vs {mean['eff_job']:.3f}, fixed/trial "
                          f"{ref['fixed_trial'] * 1000:.0f} vs {mean['fixed_trial'] * 1000:.0f} ms,"
                          f" probes/s {names[0]}/{name} "
                          f"{ref['probes_per_s'] / mean['probes_per_s']:.2f}")
        if not args.no_inprocess:
            for line in inprocess():
                print(line, flush=True)
    main_runs = got[("main", names[0])]
    print(f"study efficiency {statistics.mean(r['eff_window'] for r in main_runs):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
