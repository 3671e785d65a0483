"""Shared builders for the engine tests: a tiny Conv+Linear model, optimizers, a train loop."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from granet.config import SparsityConfig
from granet.sparse import SparseEngine

INPUT_SHAPE = (3, 8, 8)
NUM_CLASSES = 5


class TinyNet(nn.Module):
    """Two convolutions (one bias-free), a 1x1 shortcut-like conv and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.short = nn.Conv2d(8, 16, 1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.conv2(h) + self.short(h))
        return self.fc(torch.flatten(self.pool(h), 1))


PRUNABLE_NAMES = ["conv1", "conv2", "short", "fc"]


def make_model(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if kind == "nesterov":
        return torch.optim.SGD(
            model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    raise ValueError(kind)


def batch(step: int, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic random minibatch for ``step`` (independent of the global RNG)."""
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn((size, *INPUT_SHAPE), generator=g)
    y = torch.randint(0, NUM_CLASSES, (size,), generator=g)
    return x, y


def train_step(model: nn.Module, opt: torch.optim.Optimizer, engine: SparseEngine, step: int):
    x, y = batch(step)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return engine.step()


def run(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    engine: SparseEngine,
    steps: int,
    after: Callable[[int, object], None] | None = None,
) -> list[dict]:
    """Train ``steps`` steps; call ``after(step, event)`` after every ``engine.step()``."""
    events = []
    for _ in range(steps):
        t = engine.step_count + 1
        event = train_step(model, opt, engine, t)
        if event is not None:
            events.append(event)
        if after is not None:
            after(engine.step_count, event)
    return events


def build(
    method: str,
    *,
    opt: str = "sgd",
    steps_per_epoch: int = 6,
    epochs: int = 6,
    seed: int = 0,
    model_seed: int = 0,
    **cfg_kw,
) -> tuple[TinyNet, torch.optim.Optimizer, SparseEngine]:
    model = make_model(model_seed)
    optimizer = make_optimizer(opt, model)
    cfg = SparsityConfig(method=method, **cfg_kw)
    engine = SparseEngine(
        model,
        optimizer,
        cfg,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        seed=seed,
        batch_size=8,
        input_shape=INPUT_SHAPE,
    )
    return model, optimizer, engine


def masks_of(engine: SparseEngine) -> list[torch.Tensor]:
    return [m.clone() for m in engine.masks]


def nnz_of(engine: SparseEngine) -> list[int]:
    return [int(m.sum()) for m in engine.masks]
