"""Regrowth scores: gradient (RigL, GraNet's default), random (SET), momentum (SNFS)."""

from __future__ import annotations

import torch

__all__ = ["growth_scores", "GROWTH_MODES"]

GROWTH_MODES = ("gradient", "random", "momentum")


def growth_scores(
    mode: str,
    param: torch.nn.Parameter,
    optimizer: torch.optim.Optimizer | None,
    generator: torch.Generator,
    momentum: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score of every position of ``param`` for regrowth (higher is grown first).

    gradient: |∂L/∂w| of the current minibatch, dense because inactive weights are exact zeros in
    the forward pass, not masked inside it. momentum: |``momentum``|, the engine's exponential
    average of the dense gradient (SNFS); without it, |SGD momentum buffer| or |Adam first moment|,
    which are zero at inactive positions under the masking contract (falls back to |grad|).
    random: uniform draws from the engine's seeded generator, so random growth is reproducible
    and resumable.
    """
    if mode == "random":
        return torch.rand(param.shape, generator=generator).to(param.device)
    grad = param.grad
    if mode == "momentum" and momentum is not None:
        return momentum.detach().abs().float()
    if mode == "momentum" and optimizer is not None:
        state = optimizer.state.get(param, {})
        buf = state.get("momentum_buffer", state.get("exp_avg"))
        if isinstance(buf, torch.Tensor) and buf.shape == param.shape:
            return buf.detach().abs().float()
    elif mode not in ("gradient", "momentum"):
        raise ValueError(f"sparsity.growth={mode!r}: must be one of {', '.join(GROWTH_MODES)}")
    if grad is None:
        return torch.zeros(param.shape, device=param.device)
    return grad.detach().abs().float()
