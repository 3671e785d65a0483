"""Initial layer densities (uniform / ER / ERK) and exact-count random masks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["layer_densities", "random_mask"]


def _raw_score(shape: Sequence[int], distribution: str) -> float:
    """ERK: (sum of all dims) / (product of all dims) of the weight as stored, any rank: a
    Linear [out, in], a conv [out, in/groups, *kernel], attention's stacked in_proj [3E, E], an
    LSTM's gate-stacked weight_ih [4H, in], a Bilinear [out, in1, in2]. ER: the first two dims
    only, (d0 + d1) / (d0 d1) (kernel dims and a Bilinear's second input left out); a 1-D weight
    (only through sparsity.include) scores 1 under both."""
    if distribution == "erk" or (distribution == "er" and len(shape) < 2):
        # Erdős–Rényi-Kernel: (sum of all dims) / (product of all dims), kernel dims included.
        return sum(shape) / math.prod(shape)
    if distribution == "er":
        n_out, n_in = shape[0], shape[1]
        return (n_out + n_in) / (n_out * n_in)
    raise ValueError(f"sparsity.distribution={distribution!r}: must be one of uniform, er, erk")


def layer_densities(
    shapes: Sequence[Sequence[int]], density: float, distribution: str
) -> list[float]:
    """Per-layer densities whose weighted total is ``density``.

    ER/ERK: d_l = ε · raw_l with ε solved so Σ d_l n_l = density · N; any layer whose d_l would
    exceed 1 is made dense and ε re-solved until none does (RigL's scheme).
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density}: must be in (0, 1]")
    sizes = [math.prod(s) for s in shapes]
    if density == 1.0:
        return [1.0] * len(sizes)
    if distribution == "uniform":
        return [density] * len(sizes)
    raw = [_raw_score(s, distribution) for s in shapes]
    total = density * sum(sizes)
    dense: set[int] = set()
    while True:
        budget = total - sum(sizes[i] for i in dense)
        denom = sum(raw[i] * sizes[i] for i in range(len(sizes)) if i not in dense)
        eps = budget / denom
        over = {i for i in range(len(sizes)) if i not in dense and eps * raw[i] > 1.0}
        if not over:
            break
        dense |= over
    return [1.0 if i in dense else eps * raw[i] for i in range(len(sizes))]


def random_mask(
    shape: Sequence[int], count: int, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A bool mask with exactly ``count`` True entries at uniformly random positions."""
    n = math.prod(shape)
    count = max(0, min(int(count), n))
    scores = torch.rand(n, generator=generator)
    mask = torch.zeros(n, dtype=torch.bool)
    if count:
        mask[torch.topk(scores, count, sorted=False).indices] = True
    return mask.view(*shape).to(device)
