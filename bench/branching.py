#!/usr/bin/env python
"""Checkpoint branching vs re-training every probe from scratch (plasticity studies).

1. Exact trained-epoch counts: branching trains every trunk once to the end plus k epochs per
   probe; from scratch, every probe re-trains its trunk prefix (t epochs) and then k epochs.
   Computed for the smoke grid, the default MNIST-1D grid and the paper's CIFAR-10 grid
   (target: branching / scratch <= 1/3 on the paper's grid).
2. Wall time of the smoke grid, both ways, sequential in one process (plain Trainer loops, one
   torch thread; the same branch() code the trials run), plus the wall time of the real Ray study
   (branching) for the smoke grid.

    python bench/branching.py [--no-ray]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from granet.branch import branch
from granet.study.base import TrialSpec, load_study_config
from granet.study.plasticity import PlasticityStudy
from granet.study.tune.trainable import build_trainer
from granet.trainer import Callback

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "smoke": (REPO / "studies/configs/plasticity_mnist1d.yaml", True),
    "mnist1d default": (REPO / "studies/configs/plasticity_mnist1d.yaml", False),
    "paper CIFAR-10 (resnet20+vgg19)": (REPO / "studies/configs/plasticity_cifar10.yaml", False),
}


def plan(study: PlasticityStudy) -> tuple[list[TrialSpec], list[tuple[TrialSpec, dict]]]:
    trunks = study.trunks()
    return trunks, [p for t in trunks for p in study.probes(t)]


def epoch_counts(study: PlasticityStudy) -> tuple[int, int, int, int]:
    trunks, probes = plan(study)
    total = study.train.run.epochs
    branching = len(trunks) * total + sum(own["k"] for _, own in probes)
    scratch = sum(own["epoch_t"] + own["k"] for _, own in probes)
    return len(trunks), len(probes), branching, scratch


class _StopAt(Callback):
    def __init__(self, t: int, path: Path) -> None:
        self.t, self.path = t, path

    def on_epoch_end(self, trainer, record) -> None:
        if trainer.epoch == self.t:
            from granet.io import save_checkpoint

            save_checkpoint(trainer.state_dict(), self.path)
            trainer.stop = True


class _SaveAt(Callback):
    def __init__(self, ts: list[int], root: Path) -> None:
        self.ts, self.root = set(ts), root

    def on_epoch_end(self, trainer, record) -> None:
        if trainer.epoch in self.ts:
            from granet.io import save_checkpoint

            save_checkpoint(trainer.state_dict(), self.root / f"e{trainer.epoch}.pt")


def _probe(probe: tuple[TrialSpec, dict], ckpt: Path) -> None:
    spec, own = probe
    tr = build_trainer(spec)
    branch(tr, ckpt, epoch_t=own["epoch_t"], ratio=own["ratio"], scope=own["scope"],
           structure=own["structure"], regen=own["regen"], regrow_mode=own["regrow_mode"])
    tr.fit(resume=False)


def wall_sequential(study: PlasticityStudy) -> tuple[float, float]:
    torch.set_num_threads(1)
    trunks, probes = plan(study)
    by_trunk = {t.key: t for t in trunks}
    build_trainer(trunks[0])  # data generation outside the timing
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        for t in trunks:
            tr = build_trainer(t, callbacks=[_SaveAt(list(t.save_epochs), root / t.key)])
            tr.fit(resume=False)
        for p in probes:
            _probe(p, root / p[0].parent_key / f"e{p[1]['epoch_t']}.pt")
        branching = time.perf_counter() - t0
        t0 = time.perf_counter()
        for p in probes:
            ck = root / "scratch.pt"
            tr = build_trainer(by_trunk[p[0].parent_key], callbacks=[_StopAt(p[1]["epoch_t"], ck)])
            tr.fit(resume=False)
            _probe(p, ck)
        scratch = time.perf_counter() - t0
    return branching, scratch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    print(f"# bench/branching.py  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  "
          f"{platform.processor() or platform.machine()}  cpus={os.cpu_count()}  "
          f"torch={torch.__version__}  load-avg={os.getloadavg()[0]:.2f}")
    print("## trained epochs (exact)")
    print(f"{'grid':34s} {'trunks':>6s} {'probes':>6s} {'branching':>10s} {'scratch':>9s} "
          f"{'ratio':>6s}")
    for name, (path, smoke) in CONFIGS.items():
        study = load_study_config(PlasticityStudy, path, ["study_dir=/tmp/unused"], smoke)
        n_t, n_p, b, s = epoch_counts(study)
        print(f"{name:34s} {n_t:6d} {n_p:6d} {b:10d} {s:9d} {b / s:6.3f}")
    study = load_study_config(PlasticityStudy, CONFIGS["smoke"][0], ["study_dir=/tmp/unused"],
                              True)
    b, s = wall_sequential(study)
    print("## wall time, sequential plain loops (1 thread), same branch() code as the trials")
    print(f"smoke grid:   branching {b:.2f} s  scratch {s:.2f} s  ratio {b / s:.3f}")
    sub = ["study_dir=/tmp/unused", "trunk_densities=[0.1]", "ratios=[0.5]", "regen=[false]"]
    study = load_study_config(PlasticityStudy, CONFIGS["mnist1d default"][0], sub)
    _, _, be, se = epoch_counts(study)
    b, s = wall_sequential(study)
    print(f"default grid slice (1 trunk d=0.1, 5 epochs t, p=0.5, no regen; epochs {be} vs {se}):"
          f" branching {b:.2f} s  scratch {s:.2f} s  ratio {b / s:.3f}")
    if not args.no_ray:
        import ray

        from granet.study.driver import run_study

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = run_study(PlasticityStudy, CONFIGS["smoke"][0], [f"study_dir={tmp}/s"],
                            smoke_test=True, quiet=True)
            wall = time.perf_counter() - t0
        ray.shutdown()
        print("## smoke grid as a Ray study (branching; MLflow sqlite; Ray already started)")
        print(f"trials {out['launched']}  wall {wall:.1f} s")


if __name__ == "__main__":
    main()
