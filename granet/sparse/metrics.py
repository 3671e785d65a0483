"""Sparse-model metrics: FLOPs per layer, dead units (SPEC §7)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from granet.sparse.flops import count_forward_flops
from granet.sparse.select import layer_name

__all__ = ["layer_forward_flops", "dead_relu_share"]

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # kept for callers; see sparse.select


def layer_forward_flops(
    model: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    *,
    example_input: Any = None,
) -> dict[str, float]:
    """Dense multiply-accumulates per sample of every weight that is a matmul/conv operand,
    by layer name (parameter name without ``.weight``; the module name for Conv/Linear).

    Counted at the dispatcher on ``example_input`` (a real batch), or on one all-zeros float
    sample of ``input_shape`` (:func:`granet.sparse.flops.count_forward_flops`). BN, activations
    and pooling are not counted, as in the RigL/GraNet FLOPs accounting; attention's QK^T / AV
    have no weight and are left out here (the engine counts them as dense).
    """
    if example_input is None:
        if input_shape is None:
            raise ValueError("layer_forward_flops: needs input_shape or example_input")
        p = next(model.parameters())
        example_input = torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype)
    count = count_forward_flops(model, example_input)
    names = {id(p): layer_name(n) for n, p in model.named_parameters()}
    return {names[k]: v for k, v in count.by_param.items() if k in names}


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
