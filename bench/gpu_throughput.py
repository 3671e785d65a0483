#!/usr/bin/env python
"""GPU throughput of ResNet-20 trials and packed probes on one card; the plasticity grid's wall
time extrapolated from it.

    python bench/gpu_throughput.py --quick      # ~4-5 minutes on one H100/H200
    python bench/gpu_throughput.py [--seconds S] [--concurrency 1,2,4,8] [--packs 1,4,16]
                                   [--compile]

Data: FakeData-shaped CIFAR tensors (``data.name: fake``: Gaussian (3, 32, 32) inputs, 10
classes), held on the GPU as granet holds small data sets; SGD Nesterov, batch 128, bf16
autocast and channels_last (``run.bf16``, ``run.channels_last``), static masks at density 0.1
(a probe). Every figure is *training images per second of wall time with each epoch's evaluation
included* (validation + test forward passes, as a trial does them), measured after a warm-up
epoch (cuDNN autotuning, lazy CUDA init).

1. **Concurrent trials per card** (what ``gpus_per_trial = 1/N`` gives): N = 1, 2, 4, 8
   processes, each a granet Trainer (the very loop a trial runs), started together, released
   together after their warm-up epoch through a file barrier, measured over the same window;
   aggregate images/s = the sum.
2. **Packed probes** (:class:`granet.pack.ProbePack`, one process): K = 1, 4, 16 probes
   branched from one checkpoint, ``mode="loop"`` (K models in turn, bit-exact) and
   ``mode="vmap"`` (one batched model); images/s = K x batch per step.
3. GPU utilisation (pynvml, else ``nvidia-smi``) sampled during each measurement.
4. The rule for ``gpus_per_trial`` (the smallest share whose aggregate throughput is within 10 %
   of the best measured) and for ``pack_probes``; then the wall time of the paper's ResNet-20
   plasticity grid (``studies/configs/plasticity_cifar10.yaml`` with ``models=[resnet20]``: 4
   trunks x 160 epochs + every probe x k = 30 epochs, 45,000 training images per epoch) on one
   card: trunks at their measured concurrency (4 at once), probes at the best measured rate.

``--compile`` also measures ``torch.compile`` of the model in one trial (eager vs compiled
images/s; not in ``--quick``: compiling takes a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TRAIN_IMAGES = 45_000  # CIFAR-10 training images per epoch after the 10 % validation split
N_FAKE = int(os.environ.get("GRANET_BENCH_SAMPLES", 8192))  # short epochs: many per window
DEVICE = os.environ.get("GRANET_BENCH_DEVICE", "cuda")  # "cpu": a dry run of this script


def _sync() -> None:
    if DEVICE == "cuda":
        import torch

        torch.cuda.synchronize()


def _cfg(model: str = "resnet20", epochs: int = 1000):
    from granet.config import Config

    cfg = Config()
    cfg.data.name, cfg.data.num_samples, cfg.data.batch_size = "fake", N_FAKE, 128
    cfg.data.eval_batch_size, cfg.data.val_fraction = 1000, 0.1
    cfg.model.name = model
    o = cfg.optim
    o.name, o.lr, o.momentum, o.nesterov, o.weight_decay = "sgd", 0.01, 0.9, True, 5e-4
    o.schedule, o.milestones, o.warmup_epochs = "constant", [], 0
    s = cfg.sparsity
    s.method, s.final_density, s.init_density = "static", 0.1, 1.0
    cfg.run.epochs, cfg.run.device, cfg.run.dead_unit_eval = epochs, DEVICE, False
    cfg.run.bf16, cfg.run.channels_last = True, True
    return cfg


# ---------------------------------------------------------------------------------- GPU use


class Utilisation:
    """Mean GPU utilisation (%) and peak memory (MiB) over a window, sampled every 100 ms."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._how = "none"
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)

            def read() -> tuple[float, float]:
                u = pynvml.nvmlDeviceGetUtilizationRates(h)
                m = pynvml.nvmlDeviceGetMemoryInfo(h)
                return float(u.gpu), m.used / 2**20

            read()
            self._read, self._how = read, "pynvml"
        except Exception:  # noqa: BLE001 - fall back to nvidia-smi, else nothing
            def read_smi() -> tuple[float, float]:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                     "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True, text=True, timeout=5).stdout.split(",")
                return float(out[0]), float(out[1])

            try:
                read_smi()
                self._read, self._how = read_smi, "nvidia-smi"
            except Exception:  # noqa: BLE001
                self._read = None

    def __enter__(self) -> Utilisation:
        if self._read is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self._read())
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.1)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._read is not None:
            self._thread.join(timeout=5)

    def text(self) -> str:
        if not self.samples:
            return "GPU util n/a"
        util = sum(s[0] for s in self.samples) / len(self.samples)
        mem = max(s[1] for s in self.samples)
        return f"GPU util {util:5.1f} % (mean of {len(self.samples)}, {self._how}), " \
               f"memory {mem:7.0f} MiB"


# ---------------------------------------------------------------------------------- trials


def _images_per_epoch(trainer: Any) -> int:
    """Training samples one epoch trains on (every sample, or full batches with drop_last)."""
    bs = trainer.cfg.data.batch_size
    n = len(trainer.data.train.y)
    return n - n % bs if trainer.cfg.data.drop_last else n


def worker(index: int, n: int, barrier: str, seconds: float) -> None:
    """One concurrent trial: a granet Trainer on the GPU; epoch 1 warms up, then a file barrier
    releases every trial at once; trains until ``seconds`` after the release; prints JSON."""
    import torch

    from granet.trainer import Callback, Trainer

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // n))  # as Ray's cpus_per_trial would
    cfg = _cfg()
    state: dict[str, Any] = {}

    class Timer(Callback):
        def on_epoch_end(self, trainer, record) -> None:
            _sync()
            now = time.time()
            if "release" not in state:
                Path(f"{barrier}.{index}").write_text("ready")
                while sum(Path(f"{barrier}.{i}").exists() for i in range(n)) < n:
                    time.sleep(0.01)
                state["release"] = time.time()
                return
            state["last"] = now
            state["epochs"] = state.get("epochs", 0) + 1
            state["images"] = state["epochs"] * _images_per_epoch(trainer)
            if now - state["release"] >= seconds:
                trainer.stop = True

    t = Trainer(cfg, write=False, callbacks=[Timer()])
    t.fit(resume=False)
    print(json.dumps({"index": index, "images": state["images"],
                      "seconds": state["last"] - state["release"],
                      "release": state["release"]}), flush=True)


def concurrent(n: int, seconds: float) -> tuple[float, str]:
    """Aggregate images/s of ``n`` trial processes on the card."""
    with tempfile.TemporaryDirectory() as tmp:
        barrier = str(Path(tmp) / "ready")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs = [subprocess.Popen(
            [sys.executable, __file__, "--worker", f"{i},{n},{barrier},{seconds}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for i in range(n)]
        while sum(Path(f"{barrier}.{i}").exists() for i in range(n)) < n:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
        with Utilisation() as util:
            outs = [p.communicate(timeout=600) for p in procs]
    rates = []
    for p, (out, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"trial process failed:\n{err[-3000:]}")
        r = json.loads(out.strip().splitlines()[-1])
        rates.append(r["images"] / r["seconds"])
    return sum(rates), util.text()


# ---------------------------------------------------------------------------------- packs


def packed(k: int, mode: str, seconds: float) -> tuple[float, str]:
    """Images/s of K probes (density 0.1 trunk checkpoint, each pruned further) trained as one
    ProbePack."""
    import torch

    from granet.branch import branch
    from granet.pack import ProbePack
    from granet.study.tune.trainable import shared_dataset
    from granet.trainer import Trainer

    cfg = _cfg()
    data = shared_dataset(cfg, None, torch.device(DEVICE))
    trunk = Trainer(cfg, write=False, dataset=data)
    state = trunk.state_dict()
    trainers = [Trainer(cfg, write=False, dataset=data) for _ in range(k)]
    pack = ProbePack(trainers, mode=mode)
    ratios = [0.2, 0.5, 0.9, 0.98]
    for i in range(k):
        pack.call(i, lambda t, i=i: branch(t, state, epoch_t=1, ratio=ratios[i % 4],
                                           scope="global", structure="unstructured",
                                           regen=bool(i // 4 % 2)))
    times: list[float] = []

    def after(epoch: int) -> None:
        _sync()
        times.append(time.time())
        if len(times) > 1 and times[-1] - times[1] >= seconds:  # epoch 1 warms up
            for t in trainers:
                t.stop = True

    util = Utilisation()

    def after_util(epoch: int) -> None:
        after(epoch)
        if len(times) == 1:  # sample from the end of the warm-up epoch on
            util.__enter__()

    pack.fit(after_epoch=after_util)
    util.__exit__()
    epochs = len(times) - 1
    rate = epochs * _images_per_epoch(trainers[0]) * k / (times[-1] - times[0])
    return rate, util.text()


def compiled(seconds: float) -> str:
    """Eager vs torch.compile of one trial's model (train steps only, same batches)."""
    import torch
    import torch.nn.functional as F

    from granet.trainer import Trainer

    out = []
    for name in ("eager", "compile"):
        t = Trainer(_cfg(), write=False)
        model = torch.compile(t.model) if name == "compile" else t.model
        x = t.data.train.x[:128]
        if DEVICE == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        y = t.data.train.y[:128]

        def step(model=model, x=x, y=y, t=t) -> None:
            with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
                loss = F.cross_entropy(model(x).float(), y)
            t.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t.optimizer.step()
            t.engine.step(128)

        t0 = time.time()
        for _ in range(20):
            step()
        _sync()
        warm = time.time() - t0
        n, t0 = 0, time.time()
        while time.time() - t0 < seconds:
            for _ in range(20):
                step()
            n += 20
            _sync()
        out.append(f"{name:<8} {n * 128 / (time.time() - t0):9.0f} images/s "
                   f"(warm-up {warm:5.1f} s)")
    return "; ".join(out)


# ---------------------------------------------------------------------------------- grid


def grid_epochs() -> tuple[int, int, int, int]:
    """(trunks, trunk epochs, probes, probe epochs) of the paper's ResNet-20 plasticity grid."""
    from granet.study.base import load_study_config
    from granet.study.plasticity import PlasticityStudy

    study = load_study_config(PlasticityStudy, REPO / "studies/configs/plasticity_cifar10.yaml",
                              ["models=[resnet20]", "study_dir=/tmp/never"])
    trunks = study.trunks()
    probes = [own for t in trunks for _, own in study.probes(t)]
    return (len(trunks), len(trunks) * study.train.run.epochs, len(probes),
            sum(o["k"] for o in probes))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short windows (~4-5 minutes in all)")
    p.add_argument("--seconds", type=float, default=None, help="measurement window per figure")
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--packs", default="1,4,16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        i, n, barrier, seconds = args.worker.split(",")
        worker(int(i), int(n), barrier, float(seconds))
        return 0
    import torch

    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_throughput: no CUDA device; this benchmark needs a GPU", file=sys.stderr)
        return 2
    seconds = args.seconds or (8.0 if args.quick else 20.0)
    t_all = time.time()
    print(f"# bench/gpu_throughput.py  {time.strftime('%Y-%m-%d %H:%M:%S')}  "
          f"{torch.cuda.get_device_name(0) if DEVICE == 'cuda' else 'CPU (dry run)'}  "
          f"torch {torch.__version__}  window {seconds:g} s",
          flush=True)
    print("## ResNet-20, fake CIFAR-shaped data on the GPU, batch 128, bf16 + channels_last, "
          "density 0.1; training images/s per wall second, epochs include their evaluation")
    conc: dict[int, float] = {}
    for n in [int(v) for v in args.concurrency.split(",") if v]:
        rate, util = concurrent(n, seconds)
        conc[n] = rate
        print(f"concurrent trials {n:2d}: {rate:9.0f} images/s  ({rate / n:8.0f} per trial)  "
              f"{util}", flush=True)
    packs: dict[tuple[int, str], float] = {}
    for k in [int(v) for v in args.packs.split(",") if v]:
        for mode in ("loop", "vmap"):
            try:
                rate, util = packed(k, mode, seconds)
            except Exception as exc:  # noqa: BLE001 - report and go on
                print(f"packed probes K={k:2d} {mode}: failed ({type(exc).__name__}: {exc})")
                continue
            packs[(k, mode)] = rate
            print(f"packed probes K={k:2d} {mode:<4}: {rate:9.0f} images/s  {util}", flush=True)
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    if args.compile:
        print(f"torch.compile, one trial: {compiled(seconds)}", flush=True)
    # the rules
    best_n = max(conc.values()) if conc else 0.0
    share = min((n for n, r in conc.items() if r >= 0.9 * best_n), default=1)
    print(f"rule: gpus_per_trial = 1/{share} = {1 / share:.3g} (the fewest trials per card within "
          f"10 % of the best aggregate, {best_n:.0f} images/s)")
    if packs:
        (bk, bm), best_p = max(packs.items(), key=lambda kv: kv[1])
        kp = min((k for (k, m), r in packs.items() if m == bm and r >= 0.9 * best_p),
                 default=bk)
        print(f"rule: pack_probes = {kp}, pack_mode = {bm} ({best_p:.0f} images/s at K={bk})")
    else:
        best_p = 0.0
    # the grid
    n_trunks, trunk_ep, n_probes, probe_ep = grid_epochs()
    trunk_conc = max((n for n in conc if n <= n_trunks), default=1)
    trunk_rate = conc.get(trunk_conc, 0.0) / trunk_conc  # per trunk, trunks side by side
    trunk_s = (trunk_ep / n_trunks) * TRAIN_IMAGES / trunk_rate if trunk_rate else float("nan")
    probe_rate = max(best_n, best_p)
    probe_s = probe_ep * TRAIN_IMAGES / probe_rate if probe_rate else float("nan")
    print(f"## paper's ResNet-20 plasticity grid: {n_trunks} trunks ({trunk_ep} epochs) + "
          f"{n_probes} probes ({probe_ep} epochs), {TRAIN_IMAGES} images per epoch")
    print(f"trunks {n_trunks} side by side at {trunk_rate:.0f} images/s each: "
          f"{trunk_s / 60:6.1f} min; probes at {probe_rate:.0f} images/s: {probe_s / 60:6.1f} min")
    print(f"extrapolated wall time on one card: {(trunk_s + probe_s) / 3600:.2f} h "
          f"(goal: under 1 h; per-trial fixed costs not included)")
    print(f"bench wall {time.time() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
