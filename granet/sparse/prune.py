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
    deterministic. O(N): one selection of the k-th largest value (:func:`kth_largest`) instead
    of a full sort.
    """
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    thr = kth_largest(flat, k)
    keep = flat >= thr
    if count_true(keep) != k:
        # Ties at the threshold: everything above it, then the lowest positions equal to it.
        # (Without ties, ``>= thr`` is that set already: no index search over the tensor.)
        keep = flat > thr
        need = k - count_true(keep)
        if need > 0:
            ties = torch.nonzero(flat == thr).flatten()[:need]
            keep[ties] = True
    return keep.view_as(scores)


# Below this size (or off CPU) kth_largest is a plain kthvalue; 1/_SAMPLE_STRIDE is the sample.
_BRACKET_MIN = 1 << 17
_SAMPLE_STRIDE = 64


def kth_largest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of the 1-D ``flat`` (1 <= k < n): ``kthvalue(flat, n - k + 1)``.

    Large CPU float tensors skip most of the quickselect (CPU ``kthvalue`` moves values and
    int64 indices, single-threaded): two order statistics of a strided 1/64 sample bracket the
    value, two vectorised counts check that the bracket holds it, and the selection runs on the
    few values inside the bracket only. If NaNs are present or the bracket misses (a sample that
    misrepresents the data), it falls back to the full ``kthvalue``: the value is always exact.
    """
    n = flat.numel()
    if n < _BRACKET_MIN or flat.device.type != "cpu" or not flat.is_floating_point():
        return torch.kthvalue(flat, n - k + 1).values
    # NaN sorts last in kthvalue but fails every comparison: leave it to kthvalue. (A NaN sum
    # is one cheap reduction; +inf and -inf together also give NaN and merely fall back.)
    if bool(torch.isnan(flat.sum())):
        return torch.kthvalue(flat, n - k + 1).values
    sample = flat[::_SAMPLE_STRIDE].contiguous()
    ns = sample.numel()
    pos = k * ns / n  # expected rank of the value in the sample, counted from the top
    margin = 4.0 * math.sqrt(max(pos * (1.0 - k / n), 1.0)) + 2.0  # ~4 standard deviations
    hi_rank, lo_rank = math.floor(pos - margin), math.ceil(pos + margin)
    # hi / lo: sample values expected just above / below the k-th largest (None: unbounded).
    hi = torch.kthvalue(sample, ns - hi_rank + 1).values if hi_rank >= 1 else None
    lo = torch.kthvalue(sample, ns - lo_rank + 1).values if lo_rank <= ns else None
    above = flat > hi if hi is not None else None
    at_least_lo = flat >= lo if lo is not None else None
    n_above = count_true(above) if above is not None else 0
    n_at_least_lo = count_true(at_least_lo) if at_least_lo is not None else n
    if not n_above < k <= n_at_least_lo:  # the bracket missed the value
        return torch.kthvalue(flat, n - k + 1).values
    if lo is not None and hi is not None and bool(lo == hi):
        return lo  # every value in [lo, hi] equals lo
    if above is None:
        inside = at_least_lo
    elif at_least_lo is None:
        inside = ~above
    else:
        inside = at_least_lo & ~above  # lo <= x <= hi
    band = flat[inside] if inside is not None else flat
    j = k - n_above  # the value is the j-th largest inside the bracket
    return torch.kthvalue(band, band.numel() - j + 1).values


def count_true(mask: torch.Tensor) -> int:
    """Number of True entries (``count_nonzero``: several times faster than ``sum`` on bool)."""
    return int(torch.count_nonzero(mask))


def _active_scores(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # |w| for active entries, -1 for inactive ones: an inactive weight is never preferred.
    w = weight.detach()
    return torch.where(mask, w.abs(), -1.0)


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
            floor = min(int(min_keep[i]), count_true(m))
            if floor > 0:
                protect = topk_mask(s, floor)
                scores[i] = torch.where(protect, torch.full_like(s, math.inf), s)
    active = sum(count_true(m) for m in masks)
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
        out.append(topk_mask(_active_scores(w, m), min(int(k), count_true(m))))
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
    # A 1-D weight (a bias or norm added by sparsity.include) has no filters: left untouched.
    skip = [s or w.dim() < 2 for s, w in zip(skip, weights, strict=True)]
    l1 = [
        (w.detach().abs() * m).reshape(m.shape[0], -1).sum(1)
        for w, m in zip(weights, masks, strict=True)
    ]
    alive = [m.reshape(m.shape[0], -1).any(1) for m in masks]
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
