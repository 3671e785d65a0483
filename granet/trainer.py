"""The trainer: the one training loop of granet.

A single run, a plasticity trunk or probe and a search trial all run through :class:`Trainer`;
they differ only in their config and callbacks. Checkpoints are complete (weights, masks,
optimizer state, schedule state, step and epoch, RNG states), so a run resumed from one in a new
process continues bit-identically on the CPU.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from granet.config import Config, ConfigError, config_hash, dump_yaml
from granet.data import Dataset, Split, iterate_batches, load_dataset
from granet.io import RunPaths, atomic_write_text, load_checkpoint, save_checkpoint, write_parquet
from granet.models import build_model
from granet.sparse.engine import NonFiniteError, SparseEngine
from granet.sparse.metrics import dead_relu_share

__all__ = ["Callback", "Diverged", "Trainer", "lr_at_epoch", "resolve_device", "run_dir_for"]

# Keys every resumable checkpoint holds (Trainer.state_dict).
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "engine", "rng", "history", "layer_history")

# Fixed seed of the train/validation split: every run seed and every trunk/probe of a study sees
# the same split, so test and validation numbers compare across seeds.
DATA_SPLIT_SEED = 0


class Diverged(RuntimeError):
    """Training produced a non-finite loss or weight; the run stopped at once.

    Attributes:
        epoch: epochs completed (all finite) when it was detected.
        step: optimizer steps completed when it was detected.
        reason: ``"non-finite loss"`` or ``"non-finite weights in <parameter name>"``.
        summary: the trainer's summary (last finite metrics, ``status="diverged"``), set by
            :meth:`Trainer.fit` before it raises.
    """

    def __init__(self, epoch: int, step: int, reason: str) -> None:
        self.epoch = int(epoch)
        self.step = int(step)
        self.reason = reason
        self.summary: dict[str, Any] = {}
        super().__init__(f"diverged at epoch {self.epoch + 1}, step {self.step}: {reason}")


class Callback:
    """Hook points of the loop. Override what you need; every method is a no-op by default.

    A callback steers the loop through the trainer: ``trainer.stop = True`` ends training after
    the current epoch; ``trainer.request_checkpoint = True`` saves one at the end of this epoch.
    """

    def on_train_start(self, trainer: Trainer) -> None: ...

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None: ...

    def on_checkpoint(self, trainer: Trainer, path: Path, record: dict[str, Any]) -> None: ...

    def on_train_end(self, trainer: Trainer, summary: dict[str, Any]) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_dir_for(cfg: Config) -> Path:
    """``<output_dir>/<method>-<config hash>``: the same config always maps to the same run."""
    return Path(cfg.run.output_dir) / f"{cfg.sparsity.method}-{config_hash(cfg)}"


def lr_at_epoch(cfg: Config, epoch: int) -> float:
    """Learning rate during ``epoch`` (0-based): linear warm-up, then the schedule (per epoch)."""
    o, epochs = cfg.optim, cfg.run.epochs
    if epoch < o.warmup_epochs:
        return o.lr * (epoch + 1) / (o.warmup_epochs + 1)
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "multistep":
        return o.lr * o.gamma ** sum(1 for m in o.milestones if epoch >= m)
    if o.schedule == "cosine":
        span = max(epochs - o.warmup_epochs, 1)
        return 0.5 * o.lr * (1.0 + math.cos(math.pi * (epoch - o.warmup_epochs) / span))
    raise ValueError(f"optim.schedule={o.schedule!r}: must be multistep, cosine or constant")


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # Data order depends only on (seed, epoch): resuming at any epoch reproduces it exactly.
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def build_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.no_decay_norm_bias:
        decay = [p for p in model.parameters() if p.dim() > 1]
        no_decay = [p for p in model.parameters() if p.dim() <= 1]
        groups: Any = [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": list(model.parameters()), "weight_decay": o.weight_decay}]
    if o.name == "sgd":
        return torch.optim.SGD(
            groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0
        )
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas))


class Trainer:
    """Train one model under one config.

    Args:
        cfg: a validated :class:`Config`.
        run_dir: where the config, metrics, checkpoints go (default: :func:`run_dir_for`);
            ``None`` with ``write=False`` keeps everything in memory.
        callbacks: hooks (see :class:`Callback`).
        dataset: a pre-loaded data set (studies share one); loaded from the config otherwise.
        write: write the run directory (config, metrics Parquet, checkpoints).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        run_dir: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
        dataset: Dataset | None = None,
        write: bool = True,
    ) -> None:
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.write = write
        self.paths = RunPaths(run_dir if run_dir is not None else run_dir_for(cfg))
        self.device = resolve_device(cfg.run.device)
        self.use_bf16 = cfg.run.bf16 and self.device.type == "cuda"
        self.channels_last = cfg.run.channels_last and self.device.type == "cuda"

        data = dataset or load_dataset(
            cfg.data.name,
            data_dir=cfg.data.data_dir,
            download=cfg.data.download,
            val_fraction=cfg.data.val_fraction,
            seed=DATA_SPLIT_SEED,
            num_samples=cfg.data.num_samples,
            augment=cfg.data.augment,
        )
        self.data = data.to(self.device)
        n_train = len(self.data.train.y)
        if n_train < cfg.data.batch_size:
            raise ValueError(
                f"data.batch_size={cfg.data.batch_size}: larger than the training set "
                f"({n_train} samples)"
            )
        # Every training sample each epoch, the last batch partial (as the reference's loader);
        # data.drop_last skips that batch.
        bs = cfg.data.batch_size
        self.steps_per_epoch = n_train // bs if cfg.data.drop_last else -(-n_train // bs)

        torch.manual_seed(cfg.run.seed)  # model init
        try:
            model = build_model(
                cfg.model.name,
                num_classes=data.num_classes,
                input_shape=tuple(data.input_shape),
                kwargs=cfg.model.kwargs,
            )
        except ValueError as exc:  # a bad name, kwargs, or a user builder that raised
            raise ConfigError(str(exc)) from exc
        self.model = model.to(self.device)
        if self.channels_last and len(data.input_shape) == 3:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(cfg, self.model)
        self.engine = SparseEngine(
            self.model,
            self.optimizer,
            cfg.sparsity,
            steps_per_epoch=self.steps_per_epoch,
            epochs=cfg.run.epochs,
            seed=cfg.run.seed,
            batch_size=cfg.data.batch_size,
            example_input=self.data.train.x[:2],  # real samples: FLOPs of any input kind
        )
        self.epoch = 0  # epochs completed
        # "running" until fit() returns ("done") or raises Diverged ("diverged").
        self.status = "running"
        self.diverged: Diverged | None = None
        # Check the loss for non-finite values at every step (a host sync) or only at mask-update
        # events and epoch ends (a device-side flag). Either way no mask update ever reads a
        # non-finite weight: the engine refuses it (NonFiniteError).
        self.check_every_step = self.device.type == "cpu"
        self.history: list[dict[str, Any]] = []
        self.layer_history: list[dict[str, Any]] = []
        self.stop = False
        self.request_checkpoint = False
        # Global RNG (dropout etc.) after init; saved in every checkpoint.
        torch.manual_seed(cfg.run.seed + 1)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": 1,
            "meta": {
                "num_classes": int(self.data.num_classes),
                "input_shape": [int(v) for v in self.data.input_shape],
                "config_hash": config_hash(self.cfg),
            },
            "epoch": self.epoch,
            "step": self.engine.step_count,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "engine": self.engine.state_dict(),
            "rng": rng,
            "history": json.dumps(self.history),
            "layer_history": json.dumps(self.layer_history),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.engine.load_state_dict(state["engine"])
        self.epoch = int(state["epoch"])
        self.history = json.loads(state["history"])
        self.layer_history = json.loads(state["layer_history"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def load_weights_and_masks(self, path: str | Path | dict[str, Any], *,
                               optimizer: bool = True) -> dict[str, Any]:
        """Start from another run's checkpoint (a plasticity probe branching from its trunk):
        weights, masks and optionally optimizer state; epoch, step and history start afresh.
        ``path`` may also be a checkpoint already loaded with :func:`granet.io.load_checkpoint`
        (probes of one trunk share one read); the optimizer state is then copied, never shared.
        """
        if isinstance(path, dict):
            state = path
            if optimizer:  # Optimizer.load_state_dict keeps same-device tensors as they are
                import copy

                state = {**state, "optimizer": copy.deepcopy(state["optimizer"])}
        else:
            state = load_checkpoint(path, map_location=self.device, keys=("model", "engine"))
        self.model.load_state_dict(state["model"])
        if optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at_epoch(self.cfg, 0)
        engine_state = dict(state["engine"])
        engine_state["step"] = 0
        self.engine.load_state_dict(engine_state)
        return state

    def save(self, path: Path | None = None) -> Path:
        path = path or self.paths.checkpoint
        save_checkpoint(self.state_dict(), path)
        return path

    def try_resume(self) -> bool:
        """Resume from the run directory's checkpoint if there is one.

        Raises ValueError (before anything is written) if the checkpoint is of another config,
        and :class:`~granet.io.CheckpointError` if it is empty, truncated or corrupt.
        """
        if self.paths.checkpoint.exists():
            state = load_checkpoint(
                self.paths.checkpoint, map_location=self.device, keys=CHECKPOINT_KEYS
            )
            saved, current = state.get("meta", {}).get("config_hash"), config_hash(self.cfg)
            if saved is not None and saved != current:
                raise ValueError(
                    f"run directory {str(self.paths.root)!r}: its checkpoint.pt is of another "
                    f"config (hash {saved}; this config: {current}); train into another run "
                    f"directory, or pass --fresh to start this one over"
                )
            self.load_state_dict(state)
            return True
        return False

    # ------------------------------------------------------------------ loop
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            return self.model(x)

    def train_epoch(self) -> dict[str, float]:
        cfg = self.cfg
        lr = lr_at_epoch(cfg, self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        gen = _epoch_generator(cfg.run.seed, self.epoch)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        bad_loss = torch.zeros((), device=self.device, dtype=torch.bool)
        seen = 0
        events = pruned = regrown = 0
        for x, y in iterate_batches(
            self.data.train, cfg.data.batch_size, shuffle=True, generator=gen,
            augment=self.data.augment, drop_last=cfg.data.drop_last,
        ):
            out = self._forward(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=cfg.optim.label_smoothing)
            if self.check_every_step:
                if not math.isfinite(float(loss.detach())):  # before the step: weights stay finite
                    raise Diverged(self.epoch, self.engine.step_count, "non-finite loss")
            else:
                bad_loss |= ~torch.isfinite(loss.detach())  # on the device: no host sync
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            try:
                event = self.engine.step(len(y))
            except NonFiniteError as exc:
                reason = "non-finite loss" if bool(bad_loss) else exc.reason
                raise Diverged(self.epoch, self.engine.step_count, reason) from exc
            if event is not None:
                if bool(bad_loss):  # one sync per mask-update event
                    raise Diverged(self.epoch, self.engine.step_count, "non-finite loss")
                events += 1
                pruned += event["pruned"]
                regrown += event["regrown"]
            # Accumulate on the device: no host sync per step.
            loss_sum += loss.detach() * len(y)
            correct += (out.argmax(1) == y).sum()
            seen += len(y)
        if bool(bad_loss):
            raise Diverged(self.epoch, self.engine.step_count, "non-finite loss")
        bad = self.first_non_finite()
        if bad is not None:
            raise Diverged(self.epoch, self.engine.step_count, f"non-finite weights in {bad}")
        return {
            "lr": lr,
            "train_loss": float(loss_sum) / max(seen, 1),
            "train_acc": float(correct) / max(seen, 1),
            "mask_events": float(events),
            "pruned": float(pruned),
            "regrown": float(regrown),
        }

    @torch.no_grad()
    def first_non_finite(self) -> str | None:
        """Name of the first parameter or floating-point buffer holding a NaN or inf, else None
        (one host sync)."""
        named = [
            (n, t) for n, t in [*self.model.named_parameters(), *self.model.named_buffers()]
            if t.is_floating_point()
        ]
        if not named:
            return None
        finite = torch.stack([torch.isfinite(t).all() for _, t in named])
        if bool(finite.all()):
            return None
        return named[int((~finite).nonzero()[0])][0]

    @torch.no_grad()
    def evaluate(self, split: Split) -> tuple[float, float]:
        """(loss, accuracy) on a split; (nan, nan) for an empty one."""
        n = len(split.y)
        if n == 0:
            return math.nan, math.nan
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for x, y in iterate_batches(split, self.cfg.data.eval_batch_size, shuffle=False):
            out = self._forward(x).float()
            loss_sum += F.cross_entropy(out, y, reduction="sum")
            correct += (out.argmax(1) == y).sum()
        self.model.train()
        return float(loss_sum) / n, float(correct) / n

    def _record(self, train: dict[str, float], seconds: float) -> dict[str, Any]:
        """The epoch's record; ``epoch_seconds`` is ``seconds`` (training) plus the time of the
        evaluation done here: an epoch's cost is its training and its evaluation."""
        t_eval = time.perf_counter()
        val_loss, val_acc = self.evaluate(self.data.val)
        test_loss, test_acc = self.evaluate(self.data.test)
        rec: dict[str, Any] = {"epoch": self.epoch, "step": self.engine.step_count, **train}
        rec.update(val_loss=val_loss, val_acc=val_acc, test_loss=test_loss, test_acc=test_acc)
        rec.update(self.engine.metrics())
        if self.cfg.run.dead_unit_eval:
            probe = self.data.test.x[: self.cfg.data.eval_batch_size]
            dead = dead_relu_share(self.model, probe) if len(probe) else None
            rec["dead_relu"] = math.nan if dead is None else dead
        rec["epoch_seconds"] = seconds + (time.perf_counter() - t_eval)
        prev = [h for h in self.history if not math.isnan(h["val_acc"])]
        best = max(prev, key=lambda h: h["val_acc"], default=None)
        if math.isnan(val_acc):
            rec["best_val_acc"], rec["test_at_best_val"] = math.nan, math.nan
        elif best is None or val_acc > best["val_acc"]:
            rec["best_val_acc"], rec["test_at_best_val"] = val_acc, test_acc
        else:
            rec["best_val_acc"], rec["test_at_best_val"] = best["val_acc"], best["test_acc"]
        return rec

    def fit(self, *, resume: bool = True) -> dict[str, Any]:
        """Train to ``run.epochs`` (resuming from the run directory if asked); return the
        summary (``status="done"``).

        Raises :class:`Diverged` as soon as a loss or weight is non-finite. Before it raises,
        ``history`` holds the finite epochs only, the summary (``status="diverged"``, the last
        finite metrics) is written to ``summary.json`` (with ``write``) and passed to the
        callbacks' ``on_train_end``; the checkpoint keeps the last finite state it saved.
        """
        try:
            return self._fit(resume=resume)
        except Diverged as exc:
            self.status, self.diverged = "diverged", exc
            exc.summary = summary = self.summary()
            if self.write:
                self.paths.root.mkdir(parents=True, exist_ok=True)
                self._write_tables()  # the finite epochs; the checkpoint is left as it was
                atomic_write_text(self.paths.summary, json.dumps(summary, indent=2))
            for cb in self.callbacks:
                cb.on_train_end(self, summary)
            raise

    def _fit(self, *, resume: bool) -> dict[str, Any]:
        cfg = self.cfg
        if resume and self.write:
            self.try_resume()
        if self.write:
            self.paths.root.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.paths.config, dump_yaml(cfg))
        for cb in self.callbacks:
            cb.on_train_start(self)
        while self.epoch < cfg.run.epochs and not self.stop:
            t0 = time.perf_counter()
            train = self.train_epoch()
            self.epoch += 1
            rec = self._record(train, time.perf_counter() - t0)
            self.history.append(rec)
            self.layer_history.extend(
                {"epoch": self.epoch, "layer": name, "density": d, "numel": n}
                for (name, d), n in zip(
                    self.engine.layer_densities().items(), self.engine.sizes, strict=True
                )
            )
            for cb in self.callbacks:
                cb.on_epoch_end(self, rec)
            due = self.epoch % cfg.run.checkpoint_every == 0 or self.epoch == cfg.run.epochs
            if self.write and (due or self.request_checkpoint or self.stop):
                path = self.save()
                if self.epoch in cfg.run.keep_epochs:
                    self.save(self.paths.epoch_checkpoint(self.epoch))
                self._write_tables()
                for cb in self.callbacks:
                    cb.on_checkpoint(self, path, rec)
            self.request_checkpoint = False
        self.status = "done"
        summary = self.summary()
        if self.write:
            self._write_tables()
            atomic_write_text(self.paths.summary, json.dumps(summary, indent=2))
        for cb in self.callbacks:
            cb.on_train_end(self, summary)
        return summary

    def _write_tables(self) -> None:
        if self.history:
            write_parquet(self.history, self.paths.metrics)
            write_parquet(self.layer_history, self.paths.layers)

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        keys = (
            "epoch", "test_acc", "val_acc", "best_val_acc", "test_at_best_val", "density",
            "density_all", "inference_flops", "inference_flops_ratio", "train_flops", "itop_rate",
        )
        out: dict[str, Any] = {
            "run_dir": str(self.paths.root),
            "config_hash": config_hash(self.cfg),
            "method": self.cfg.sparsity.method,
            "status": self.status,
            **{k: last[k] for k in keys if k in last},
        }
        if self.diverged is not None:
            out["reason"] = self.diverged.reason
            out["diverged_epoch"] = self.diverged.epoch + 1
            out["diverged_step"] = self.diverged.step
        return out
