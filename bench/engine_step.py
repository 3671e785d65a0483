#!/usr/bin/env python
"""Cost of the sparse engine relative to dense training, measured side by side in one run.

For CIFAR ResNet-20 and VGG-19-BN (random (128, 3, 32, 32) batches) and the MNIST-1D CNN
(``cnn1d``, input (1, 40), batch 128), SGD (momentum 0.9, Nesterov, weight decay 5e-4), with the
engine in a sparse state (GraNet preset, init_density 0.5: masking active, no event due), prints:

1. optimizer-step overhead: (optimizer.step + engine.step, no event) / optimizer.step, plus the
   engine's own per-step time and that time as a share of one dense train step;
2. whole train step: masked (forward, backward, optimizer.step, engine.step) / dense (the same
   without engine), timed ABAB-interleaved on two identical copies of the model;
3. one mask-update event (what ``engine._maybe_update`` does at an event: a global prune to a
   higher sparsity, then regeneration with gradient growth), each repeat on a fresh copy of the
   engine/model state, in dense train steps (interleaved with dense steps);
4. memory: (masks + engine state, ``engine.sparse_state_bytes()``) / bytes of model parameters.

Every ratio comes from measurements taken in this one process, interleaved, as medians; the
spread is the interquartile range of the per-pair ratios. Wall-clock noise on a shared CPU is
large (±15% per step), so the per-step overhead is also derived from the engine's own step time,
which is far less noisy than a difference of two whole-step times.

Usage::

    python bench/engine_step.py                 # full CPU run (several minutes on 2 cores)
    python bench/engine_step.py --quick         # smoke run (seconds)
    python bench/engine_step.py --device cuda   # GPU: adds images/s, fp32 and bf16 autocast

On a CPU shared with other jobs (load average above the core count), OpenMP's spin-waiting
threads stall each other and 2-thread timings inflate 3-10x, most for small ops; run with
``OMP_WAIT_POLICY=PASSIVE`` there. The header prints the load average and this setting.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from granet.config import SparsityConfig
from granet.models import build_model
from granet.sparse.engine import SparseEngine

# Official GraNet code on this CPU kind (from the brief): added time per train step, and one
# mask-update event in dense train steps.
OFFICIAL = {
    "resnet20": {"step_overhead": 0.002, "event_steps": 0.17},
    "vgg19": {"step_overhead": 0.009, "event_steps": 2.35},
}


@dataclass(frozen=True)
class Plan:
    input_shape: tuple[int, ...]
    opt_pairs: int  # optimizer-step A/B pairs
    step_pairs: int  # whole-step dense/masked pairs per round
    rounds: int
    event_reps: int


FULL = {
    "resnet20": Plan((3, 32, 32), opt_pairs=300, step_pairs=40, rounds=3, event_reps=11),
    "vgg19": Plan((3, 32, 32), opt_pairs=40, step_pairs=10, rounds=3, event_reps=5),
    "cnn1d": Plan((1, 40), opt_pairs=1000, step_pairs=300, rounds=3, event_reps=31),
}
QUICK = {
    "resnet20": Plan((3, 32, 32), opt_pairs=20, step_pairs=4, rounds=1, event_reps=2),
    "vgg19": Plan((3, 32, 32), opt_pairs=4, step_pairs=2, rounds=1, event_reps=1),
    "cnn1d": Plan((1, 40), opt_pairs=50, step_pairs=20, rounds=1, event_reps=3),
}

# Events timed: (label, density before the event, target sparsity of the prune, regen ratio r).
# "early": the first GraNet sparse-to-sparse events (d 0.5 -> 0.4, r_t ~ r_0 = 0.5);
# "late": near the end of pruning (d 0.12 -> 0.1, r_t ~ 0.25).
EVENTS = [("early", 0.5, 0.6, 0.5), ("late", 0.12, 0.9, 0.25)]


# --------------------------------------------------------------------------------------------
# timing helpers


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], object]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def fmt_t(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def fmt_ratio(num: list[float], den: list[float]) -> str:
    """Ratio of medians, with the median and IQR of the paired ratios."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    q1, q2, q3 = quartiles(ratios)
    rom = statistics.median(num) / statistics.median(den)
    return f"{rom:.4f}  (paired median {q2:.4f}, IQR {q1:.4f}..{q3:.4f}, n={len(ratios)})"


# --------------------------------------------------------------------------------------------
# setup


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4
    )


def make_engine(
    model: torch.nn.Module, opt: torch.optim.Optimizer, init_density: float = 0.5
) -> SparseEngine:
    # Events every 10_000 steps: none falls inside the benchmark (checked on every step).
    cfg = SparsityConfig(
        method="granet",
        init_density=init_density,
        final_density=0.1,
        update_interval=10_000,
        prune_start_epoch=0,
        prune_end_epoch=80,
    )
    return SparseEngine(model, opt, cfg, steps_per_epoch=10_000, epochs=160, seed=0)


def make_batch(name: str, plan: Plan, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn((batch, *plan.input_shape), generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return x, y


def train_step(model, opt, x, y, engine=None, amp: torch.dtype | None = None) -> None:
    ctx = (
        torch.autocast(device_type=x.device.type, dtype=amp)
        if amp is not None
        else contextlib.nullcontext()
    )
    with ctx:
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if engine is not None and engine.step() is not None:
        raise RuntimeError("an event fired inside the per-step benchmark")


def build_pair(name: str, plan: Plan, device: torch.device):
    torch.manual_seed(0)
    dense = build_model(name, num_classes=10, input_shape=plan.input_shape).to(device)
    torch.manual_seed(0)
    sparse = build_model(name, num_classes=10, input_shape=plan.input_shape).to(device)
    opt_d, opt_s = make_optimizer(dense), make_optimizer(sparse)
    engine = make_engine(sparse, opt_s)
    return dense, opt_d, sparse, opt_s, engine


# --------------------------------------------------------------------------------------------
# the measurements


def bench_model(name: str, plan: Plan, device: torch.device, batch: int) -> dict[str, float]:
    timer = Timer(device)
    x, y = make_batch(name, plan, batch, device)
    dense, opt_d, sparse, opt_s, engine = build_pair(name, plan, device)
    n_params = sum(p.numel() for p in sparse.parameters())
    n_masked = engine.total
    print(
        f"\n== {name}: {n_params:,} parameters, {n_masked:,} in {len(engine.layers)} masked "
        f"layers, density {engine.density():.3f}, batch {batch}"
    )
    for _ in range(3):  # warm-up: allocator, optimizer state, kernels
        train_step(dense, opt_d, x, y)
        train_step(sparse, opt_s, x, y, engine)
    out: dict[str, float] = {}

    # 1. optimizer-step overhead, on the masked model (its .grad stays from the last backward).
    t_opt, t_opt_eng, t_eng = [], [], []

    def opt_and_engine() -> None:
        opt_s.step()
        if engine.step() is not None:
            raise RuntimeError("unexpected event")

    # Reference: the official code's per-step masking, out of place with float masks, on the
    # weight and its momentum buffer (``tensor.data = tensor.data * mask``), on the same model.
    fmasks = [m.to(p.dtype) for m, p in zip(engine.masks, engine.params, strict=True)]
    t_off = []

    def official_apply_mask() -> None:
        for p, fm in zip(engine.params, fmasks, strict=True):
            p.data = p.data * fm
            st = opt_s.state[p]
            if "momentum_buffer" in st:
                st["momentum_buffer"] = st["momentum_buffer"] * fm

    for _ in range(plan.opt_pairs):
        t_opt.append(timer(opt_s.step))
        t_opt_eng.append(timer(opt_and_engine))
        t_eng.append(timer(engine.step))
        t_off.append(timer(official_apply_mask))
    print(f"  optimizer.step                      median {fmt_t(statistics.median(t_opt))}")
    print(f"  optimizer.step + engine.step        median {fmt_t(statistics.median(t_opt_eng))}")
    print(f"  engine.step alone (masking)         median {fmt_t(statistics.median(t_eng))}")
    print(f"  official-style apply_mask (ref.)    median {fmt_t(statistics.median(t_off))}")
    print(f"  RATIO engine.step / official-style apply_mask = {fmt_ratio(t_eng, t_off)}")
    print(f"  RATIO (opt.step + engine.step) / opt.step = {fmt_ratio(t_opt_eng, t_opt)}")
    out["opt_ratio"] = statistics.median(t_opt_eng) / statistics.median(t_opt)

    # 2. whole train step, ABAB (dense first in even pairs, masked first in odd ones).
    all_d: list[float] = []
    all_s: list[float] = []
    for rnd in range(plan.rounds):
        t_d, t_s = [], []
        for i in range(plan.step_pairs):
            order = (0, 1) if i % 2 == 0 else (1, 0)
            for which in order:
                if which == 0:
                    t_d.append(timer(lambda: train_step(dense, opt_d, x, y)))
                else:
                    t_s.append(timer(lambda: train_step(sparse, opt_s, x, y, engine)))
        print(
            f"  round {rnd + 1}: dense step median {fmt_t(statistics.median(t_d))}, masked "
            f"{fmt_t(statistics.median(t_s))}, ratio {fmt_ratio(t_s, t_d)}"
        )
        all_d += t_d
        all_s += t_s
    med_d = statistics.median(all_d)
    print(f"  RATIO masked train step / dense train step = {fmt_ratio(all_s, all_d)}")
    share = statistics.median(t_eng) / med_d
    share_off = statistics.median(t_off) / med_d
    print(
        f"  engine.step / dense train step (derived overhead per step) = {share * 100:.3f}% "
        f"(official-style apply_mask: {share_off * 100:.3f}%)"
    )
    out["step_ratio"] = statistics.median(all_s) / med_d
    out["step_overhead_derived"] = share
    out["step_overhead_official_style"] = share_off

    # 3. mask-update events, each on a fresh copy of the state.
    for label, d0, target, r in EVENTS:
        out.update(bench_event(name, label, d0, target, r, plan, device, x, y, timer))

    # 4. memory
    p_bytes = sum(p.numel() * p.element_size() for p in sparse.parameters())
    e_bytes = engine.sparse_state_bytes()
    mask_bytes = sum(m.numel() * m.element_size() for m in engine.masks)
    print(
        f"  memory: engine state {e_bytes / 2**20:.2f} MiB (masks {mask_bytes / 2**20:.2f} MiB), "
        f"parameters {p_bytes / 2**20:.2f} MiB"
    )
    print(
        f"  RATIO sparse_state_bytes / parameter bytes = {e_bytes / p_bytes:.4f} "
        f"(masks alone {mask_bytes / p_bytes:.4f})"
    )
    out["mem_ratio"] = e_bytes / p_bytes
    return out


def bench_event(name, label, d0, target, r, plan, device, x, y, timer) -> dict[str, float]:
    """One event = engine.prune_to_sparsity(target) + engine.regenerate(r), as at a GraNet event."""
    dense, opt_d, sparse, opt_s, engine = build_pair(name, plan, device)
    for _ in range(2):
        train_step(dense, opt_d, x, y)
        train_step(sparse, opt_s, x, y, engine)
    if d0 < engine.density() - 1e-9:
        engine.prune_to_sparsity(1.0 - d0)  # reach the starting density (setup, not timed)
        train_step(sparse, opt_s, x, y, engine)  # fresh dense gradient in .grad
    # Snapshot everything an event changes: masks, ever-active, counters (engine state), the
    # masked weights and their optimizer state (zeroed in place by apply_masks).
    snap_engine = engine.state_dict()
    tensors = [layer.param.data for layer in engine.layers]
    for layer in engine.layers:
        tensors += [
            v
            for v in opt_s.state[layer.param].values()
            if isinstance(v, torch.Tensor) and v.shape == layer.param.shape
        ]
    snap_tensors = [t.clone() for t in tensors]
    grads = [layer.param.grad.clone() for layer in engine.layers]

    def restore() -> None:
        for t, s in zip(tensors, snap_tensors, strict=True):
            t.copy_(s)
        for layer, g in zip(engine.layers, grads, strict=True):
            layer.param.grad.copy_(g)
        st = dict(snap_engine)
        st["masks"] = [m.clone() for m in snap_engine["masks"]]
        st["ever_active"] = [e.clone() for e in snap_engine["ever_active"]]
        engine.load_state_dict(st)

    counts = {}

    def event() -> None:
        counts["pruned"] = engine.prune_to_sparsity(target)
        counts["regrown"] = engine.regenerate(r)

    def official_sort() -> None:
        # Reference: the official code's global prune sorts |w| of all masked weights (its
        # regeneration then sorts each layer's weights and gradients again): a lower bound.
        torch.sort(torch.cat([layer.param.detach().abs().flatten() for layer in engine.layers]))

    t_ev, t_d, t_sort = [], [], []
    for _ in range(plan.event_reps):
        restore()
        gc.collect()
        t_ev.append(timer(event))
        t_d.append(timer(lambda: train_step(dense, opt_d, x, y)))
        if label == "early":
            t_sort.append(timer(official_sort))
    med = statistics.median(t_ev)
    print(
        f"  event [{label}] density {d0:.2f} -> {1 - target:.2f}, r={r}: pruned "
        f"{counts['pruned']:,}, regrown {counts['regrown']:,}; event median {fmt_t(med)}, "
        f"dense step median {fmt_t(statistics.median(t_d))}"
    )
    print(f"  RATIO event [{label}] / dense train step = {fmt_ratio(t_ev, t_d)}")
    if t_sort:
        print(
            f"  reference: official-style global sort of all |w| median "
            f"{fmt_t(statistics.median(t_sort))} = {fmt_ratio(t_sort, t_d)} dense steps"
        )
    return {f"event_{label}": med / statistics.median(t_d)}


def bench_gpu_throughput(device: torch.device, batch: int, steps: int) -> None:
    """ResNet-20 images/s, dense vs GraNet (masking active), fp32 and bf16 autocast, data on GPU."""
    plan = FULL["resnet20"]
    timer = Timer(device)
    x, y = make_batch("resnet20", plan, batch, device)
    print(f"\n== GPU throughput: ResNet-20, batch {batch}, {steps} steps, data on {device}")
    for amp in (None, torch.bfloat16):
        dense, opt_d, sparse, opt_s, engine = build_pair("resnet20", plan, device)
        res = {}
        for _ in range(10):
            train_step(dense, opt_d, x, y, amp=amp)
            train_step(sparse, opt_s, x, y, engine, amp=amp)
        for _ in range(3):  # interleave whole blocks: dense, granet, dense, granet, ...
            for tag, model, opt, eng in (
                ("dense", dense, opt_d, None),
                ("granet", sparse, opt_s, engine),
            ):

                def block(model=model, opt=opt, eng=eng, amp=amp) -> None:
                    for _ in range(steps):
                        train_step(model, opt, x, y, eng, amp=amp)

                res.setdefault(tag, []).append(timer(block))
        label = "bf16" if amp is not None else "fp32"
        ips = {k: batch * steps / statistics.median(v) for k, v in res.items()}
        print(
            f"  {label}: dense {ips['dense']:,.0f} img/s, granet {ips['granet']:,.0f} img/s, "
            f"ratio granet/dense throughput {ips['granet'] / ips['dense']:.4f}"
        )


# --------------------------------------------------------------------------------------------


def machine_info(device: torch.device, threads: int) -> str:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    lines = [
        f"machine: {cpu}; {os.cpu_count()} logical CPUs; {platform.system()} {platform.release()}",
    ]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        keep = ("Model name", "CPU(s):", "Thread(s) per core", "Core(s) per socket", "L2", "L3")
        info = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        lines += [f"  lscpu {ln.strip()}" for ln in info.splitlines() if ln.startswith(keep)]
    lines.append(
        f"torch {torch.__version__}, python {platform.python_version()}, "
        f"torch threads {threads}, device {device}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}"
    )
    if device.type == "cuda":
        lines.append(f"gpu: {torch.cuda.get_device_name(device)}")
    with contextlib.suppress(OSError):
        lines.append(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--models",
        default="resnet20,vgg19,cnn1d",
        help="comma-separated subset of resnet20, vgg19, cnn1d",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--gpu-steps", type=int, default=100, help="steps per images/s block (cuda)")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device", file=sys.stderr)
            return 2
        torch.backends.cudnn.benchmark = True
    torch.set_num_threads(args.threads)
    plans = QUICK if args.quick else FULL
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        if n not in plans:
            ap.error(f"--models: unknown {n!r}; choose from {', '.join(plans)}")

    print("# bench/engine_step.py" + (" --quick" if args.quick else ""))
    print(machine_info(device, args.threads))
    t0 = time.perf_counter()
    results = {}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for n in names:
            results[n] = bench_model(n, plans[n], device, args.batch)
        if device.type == "cuda":
            bench_gpu_throughput(device, args.batch, 10 if args.quick else args.gpu_steps)
    finally:
        if gc_was:
            gc.enable()

    print(
        "\n== summary (ratios; official GraNet on this CPU kind in brackets, targets: per-step "
        "overhead <= official, event <= official / 2)"
    )
    for n, r in results.items():
        off = OFFICIAL.get(n)
        o_step = f" [official +{off['step_overhead'] * 100:.1f}%]" if off else ""
        o_ev = (
            f" [official {off['event_steps']:.2f}, target <= {off['event_steps'] / 2:.3f}]"
            if off
            else ""
        )
        derived = r["step_overhead_derived"] * 100
        print(
            f"  {n:9s} opt.step+engine / opt.step {r['opt_ratio']:.3f}; masked/dense step "
            f"{r['step_ratio']:.4f}; engine.step / dense step {derived:.3f}%{o_step}"
        )
        print(
            f"  {'':9s} event early {r['event_early']:.4f}, late {r['event_late']:.4f} "
            f"dense steps{o_ev}; memory {r['mem_ratio']:.3f} x parameter bytes"
        )
    with contextlib.suppress(OSError):
        print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"total bench time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
