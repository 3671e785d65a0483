"""Sparse-model metrics: FLOPs per layer, dead units (SPEC §7)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["layer_forward_flops", "dead_relu_share"]

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@torch.no_grad()
def layer_forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Dense multiply-accumulates per sample of every Conv/Linear module, by module name.

    Measured with forward hooks on one zero sample (so output sizes come from the real model);
    BN, activations and pooling are not counted, as in the RigL/GraNet FLOPs accounting.
    """
    flops: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def fn(mod: nn.Module, inp, out) -> None:
            w = mod.weight
            if isinstance(mod, nn.Linear):
                # Every leading dim except the batch multiplies the work (e.g. token positions).
                positions = out.numel() // out.shape[0] // out.shape[-1]
                flops[name] = int(w.numel() * positions)
            else:
                spatial = out[0, 0].numel()
                flops[name] = int(w.numel() * spatial)
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, PRUNABLE):
            hooks.append(mod.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return flops


@torch.no_grad()
def dead_relu_share(model: nn.Module, x: torch.Tensor) -> float | None:
    """Share of ReLU units (channels for conv maps) whose output is zero on the whole batch ``x``.

    Hooks every ``nn.ReLU`` module; returns None if the model has none (functional ReLUs).
    """
    relus: Iterable[nn.Module] = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    dead = total = 0
    hooks = []

    def fn(mod, inp, out) -> None:
        nonlocal dead, total
        o = out.detach()
        alive = (o != 0).transpose(0, 1).reshape(o.shape[1], -1).any(1) if o.dim() > 1 else (o != 0)
        dead += int((~alive).sum())
        total += alive.numel()

    for m in relus:
        hooks.append(m.register_forward_hook(fn))
    if not hooks:
        return None
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return dead / total if total else None
