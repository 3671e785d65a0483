#!/usr/bin/env python
"""Ray Tune overhead of the study layer on this machine.

1. Per-trial overhead for many tiny trials: N trials of a trivial function trainable (3 reports
   each), Tune defaults vs reuse_actors=True (the study policy); target <= 0.2 s per trial.
   Also N tiny granet_trainable trials (1 epoch of a 32-32 MLP on 1000 MNIST-1D samples, no
   MLflow) through run_tuner: wall per trial and the part that is not training.
2. Parallel efficiency: 8 trials of >= 20 s of single-threaded torch work each, on all cores via
   run_tuner, vs sequential (8 x the time of one trial alone); target >= 1.7x on 2 cores.

    python bench/ray_overhead.py [--tiny N] [--work-seconds S]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def trivial(config):
    from ray import tune

    for i in range(3):
        tune.report({"i": i})


def work_fn(config):
    """~config['seconds'] of single-threaded matmuls; reports once per second of work."""
    import torch
    from ray import tune

    torch.set_num_threads(1)
    import time

    a = torch.randn(256, 256)
    n = config["iters"]
    t_start = time.time()
    c0 = time.thread_time()
    for i in range(n):
        b = a
        for _ in range(config["inner"]):
            b = torch.tanh(b @ a) * 0.5
        tune.report({"i": i, "cpu_s": time.thread_time() - c0, "t_start": t_start,
                     "t_end": time.time()})


def calibrate(target_s: float) -> tuple[int, int, float]:
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    inner = 50
    b = a
    for _ in range(inner):  # warm-up
        b = torch.tanh(b @ a) * 0.5
    reps = 20
    c0 = time.thread_time()  # CPU time: not inflated by other load on the box
    for _ in range(reps):
        b = a
        for _ in range(inner):
            b = torch.tanh(b @ a) * 0.5
    per_iter = (time.thread_time() - c0) / reps
    iters = max(1, round(target_s / per_iter))
    return iters, inner, per_iter


spans: list[tuple[float, float]] = []


def run_plain(fn, n, reuse, cpus=1, config=None, cpu_out=None):
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        tuner = tune.Tuner(
            tune.with_resources(fn, {"cpu": cpus}),
            param_space={**(config or {}), "k": tune.grid_search(list(range(n)))},
            tune_config=tune.TuneConfig(reuse_actors=reuse),
            run_config=tune.RunConfig(storage_path=tmp, name="x", verbose=0),
        )
        t0 = time.perf_counter()
        rg = tuner.fit()
        wall = time.perf_counter() - t0
    assert rg.num_errors == 0
    if cpu_out is not None:
        cpu_out.extend(r.metrics.get("cpu_s", 0.0) for r in rg)
        spans.clear()
        spans.extend((r.metrics["t_start"], r.metrics["t_end"]) for r in rg)
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", type=int, default=32)
    ap.add_argument("--work-seconds", type=float, default=20.0)
    ap.add_argument("--skip-parallel", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    import ray

    from granet.study.base import StudyConfig, TrialContext, TrialSpec
    from granet.study.tune.trainable import granet_trainable
    from granet.study.tune.tuner import run_tuner

    cpus = os.cpu_count() or 1
    print(f"# bench/ray_overhead.py  {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  "
          f"{platform.processor() or platform.machine()}  cpus={cpus}  ray={ray.__version__}  "
          f"load-avg={os.getloadavg()[0]:.2f}")
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    print(f"ray.init {time.perf_counter() - t0:.2f} s")
    n = args.tiny
    if n <= 0:
        run_parallel(args.work_seconds, cpus)
        ray.shutdown()
        return
    print(f"## {n} trivial trials x 3 reports, 1 CPU each")
    for reuse in (False, True):
        wall = run_plain(trivial, n, reuse)
        print(f"reuse_actors={reuse!s:5s} wall {wall:6.2f} s  per trial {wall / n:.3f} s")

    print(f"## {n} tiny granet_trainable trials via run_tuner (1 epoch mlp 32-32, 1000 samples)")
    from granet.config import Config, config_to_dict

    cfg = Config()
    cfg.data.num_samples, cfg.data.batch_size = 1000, 64
    cfg.model.name, cfg.model.kwargs = "mlp", {"hidden": [32, 32]}
    cfg.sparsity.method, cfg.run.epochs, cfg.run.dead_unit_eval = "dense", 1, False
    cfg.optim.schedule, cfg.optim.milestones = "constant", []
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        common = StudyConfig(name="bench", study_dir=tmp, max_failures=0)
        ctx = TrialContext(study_dir=tmp).to_dict()
        for _warm in range(2):  # first pass also pays the actors' imports and data generation
            trials = [TrialSpec(key=f"tiny{_warm}-{i:03d}", stage=f"tiny{_warm}", study="bench",
                                train=config_to_dict(cfg)).to_dict() for i in range(n)]
            t0 = time.perf_counter()
            run_tuner(common, experiment=f"tiny{_warm}", storage=Path(tmp) / "ray",
                      trainable=granet_trainable,
                      param_space={"trial": tune.grid_search(trials), "context": ctx})
            wall = time.perf_counter() - t0
        from granet.study import results

        tr = results.read_table(tmp, "trials").to_pandas()
        tr = tr[tr.stage == "tiny1"]
        ep = results.read_table(tmp, "epochs").to_pandas()
        ep = ep[ep.stage == "tiny1"]
        train_s = ep.epoch_seconds.sum()
    print(f"wall {wall:.2f} s  per trial {wall / n:.3f} s  (in-trial wall "
          f"{tr.wall_seconds.mean():.3f} s, of which training epoch {train_s / n:.3f} s)")
    print(f"overhead per trial (wall*cpus/n - training): {wall * cpus / n - train_s / n:.3f} s")

    if not args.skip_parallel:
        run_parallel(args.work_seconds, cpus)
    ray.shutdown()


def run_parallel(work_seconds: float, cpus: int) -> None:
    iters, inner, per_iter = calibrate(work_seconds / 10)
    iters *= 10
    print(f"## parallel efficiency: 8 trials of ~{iters * per_iter:.1f} CPU-s work, 1 CPU each "
          f"(load-avg before {os.getloadavg()[0]:.2f})")
    c1: list[float] = []
    c8: list[float] = []
    t0 = time.perf_counter()
    run_plain(work_fn, 1, True, config={"iters": iters, "inner": inner}, cpu_out=c1)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_plain(work_fn, 8, True, config={"iters": iters, "inner": inner}, cpu_out=c8)
    par = time.perf_counter() - t0
    print(f"one trial alone {one:.1f} s -> sequential estimate 8x = {8 * one:.1f} s; "
          f"8 trials on {cpus} cores {par:.1f} s; speed-up {8 * one / par:.2f}x "
          f"(ideal {min(8, cpus)}x)  load-avg after {os.getloadavg()[0]:.2f}")
    # Robust to other load on the box: CPU seconds the trials' threads got per wall second.
    print(f"trial CPU s per wall s: alone {c1[0] / one:.2f}, 8 in parallel {sum(c8) / par:.2f} "
          f"-> CPU-normalised speed-up {(sum(c8) / par) / (c1[0] / one):.2f}x")
    # Ray's own cost shows as idle slots: time inside trials / (slots x span of the 8 trials).
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    busy = sum(e - s for s, e in spans)
    print(f"slot occupancy inside the run: {busy / (cpus * (last - first)):.3f} "
          f"(trial time {busy:.1f} s over {cpus} slots x {last - first:.1f} s; "
          f"fit() wall {par:.1f} s incl. actor start-up)")


if __name__ == "__main__":
    main()
