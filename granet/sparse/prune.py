"""Magnitude pruning: exact-k selection, global and layer-wise, and structured filters (L1)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "topk_mask",
    "global_magnitude",
    "layerwise_magnitude",
    "filter_prune",
]


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (shape of ``scores``) with exactly ``k`` True at the largest scores.

    Ties at the threshold are broken by position (lowest flat index wins), so the result is
    deterministic. O(N): one ``kthvalue`` selection instead of a full sort.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    thr = torch.kthvalue(flat, n - k + 1).values  # the k-th largest value
    keep = flat > thr
    need = k - int(keep.sum())
    if need > 0:
        ties = torch.nonzero(flat == thr).flatten()[:need]
        keep[ties] = True
    return keep.view_as(scores)


def _active_scores(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # |w| for active entries, -1 for inactive ones: an inactive weight is never preferred.
    w = weight.detach()
    return torch.where(mask, w.abs(), torch.full_like(w, -1.0))


def global_magnitude(
    weights: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    keep: int,
    *,
    min_keep: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """One threshold over all layers: keep exactly ``keep`` active weights with the largest |w|.

    ``keep`` is clamped to the number of active weights (pruning never revives a weight).
    ``min_keep[l]`` protects the layer's largest weights (a per-layer density floor).
    """
    scores = [_active_scores(w, m).flatten() for w, m in zip(weights, masks, strict=True)]
    if min_keep is not None:
        for i, (s, m) in enumerate(zip(scores, masks, strict=True)):
            floor = min(int(min_keep[i]), int(m.sum()))
            if floor > 0:
                protect = topk_mask(s, floor)
                scores[i] = torch.where(protect, torch.full_like(s, math.inf), s)
    active = sum(int(m.sum()) for m in masks)
    flat = torch.cat([s.float().to(scores[0].device) for s in scores])
    kept = topk_mask(flat, min(keep, active))
    out, offset = [], 0
    for w in weights:
        n = w.numel()
        out.append(kept[offset : offset + n].view_as(w).to(w.device))
        offset += n
    return out


def layerwise_magnitude(
    weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], keeps: Sequence[int]
) -> list[torch.Tensor]:
    """Each layer keeps exactly ``keeps[l]`` (clamped to its active count) of its largest |w|."""
    out = []
    for w, m, k in zip(weights, masks, keeps, strict=True):
        out.append(topk_mask(_active_scores(w, m), min(int(k), int(m.sum()))))
    return out


def filter_prune(
    weights: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    ratio: float,
    *,
    scope: str = "layerwise",
    skip: Sequence[bool] | None = None,
) -> list[torch.Tensor]:
    """Structured pruning of whole filters (output channels, dim 0) ranked by L1 norm (Li et al.).

    layerwise: each layer loses round(ratio · alive filters) of its lowest-L1 alive filters.
    global: filters of all layers are ranked by mean |w| per weight (so layers of different fan-in
    compare) and removed lowest first until ``ratio`` of the active weights are gone.
    A layer always keeps at least one filter; ``skip[l]`` leaves layer l untouched (the classifier,
    whose output units are the classes).
    """
    skip = list(skip) if skip is not None else [False] * len(weights)
    l1 = [(w.detach().abs() * m).flatten(1).sum(1) for w, m in zip(weights, masks, strict=True)]
    alive = [m.flatten(1).any(1) for m in masks]
    remove: list[torch.Tensor] = [torch.zeros_like(a) for a in alive]
    if scope == "layerwise":
        for i, (score, a) in enumerate(zip(l1, alive, strict=True)):
            n_alive = int(a.sum())
            k = min(round(ratio * n_alive), n_alive - 1)
            if skip[i] or k <= 0:
                continue
            s = torch.where(a, -score, torch.full_like(score, -math.inf))
            remove[i] = topk_mask(s, k)
    elif scope == "global":
        entries = []  # (mean |w|, layer, filter, active count)
        for i, (score, a, m) in enumerate(zip(l1, alive, masks, strict=True)):
            if skip[i]:
                continue
            counts = m.flatten(1).sum(1)
            for f in torch.nonzero(a).flatten().tolist():
                c = int(counts[f])
                entries.append((float(score[f]) / c, i, f, c))
        target = ratio * sum(int(m.sum()) for m in masks)
        left = [int(a.sum()) for a in alive]
        removed = 0
        for _, i, f, c in sorted(entries, key=lambda e: (e[0], e[1], e[2])):
            if removed >= target:
                break
            if left[i] <= 1:
                continue
            remove[i][f] = True
            left[i] -= 1
            removed += c
    else:
        raise ValueError(f"scope={scope!r}: must be global or layerwise")
    return [m & ~r.view(-1, *([1] * (m.dim() - 1))) for m, r in zip(masks, remove, strict=True)]
