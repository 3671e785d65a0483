#!/usr/bin/env python
"""Exactness check of the fast exact-k selection on tensors large enough to take its fast path.

``granet.sparse.prune.kth_largest`` brackets the k-th largest value with a strided sample on CPU
tensors of 2**17+ elements (the unit tests use smaller ones). This compares it, and
``topk_mask``, with ``torch.kthvalue`` and with a stable-sort reference (largest first, ties by
lowest index) on distributions that stress the bracket: sentinel blocks, heavy ties, signed
zeros, infinities, NaN, sorted and 64-periodic data (the sample sees one phase), several dtypes.
Prints the number of cases checked; exits non-zero on the first mismatch. About a minute
on 2 cores.
"""

from __future__ import annotations

import math
import sys

import torch

from granet.sparse.prune import _BRACKET_MIN, kth_largest, topk_mask


def original_topk(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The selection as first written (full kthvalue, ``> thr``, ties by lowest index)."""
    thr = torch.kthvalue(flat, flat.numel() - k + 1).values
    keep = flat > thr
    need = k - int(keep.sum())
    if need > 0:
        keep[torch.nonzero(flat == thr).flatten()[:need]] = True
    return keep


def sort_reference(flat: torch.Tensor, k: int) -> torch.Tensor:
    # Stable descending sort = ties by lowest index; NaN sorts as largest in torch.sort.
    order = torch.sort(flat, descending=True, stable=True).indices
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    out[order[:k]] = True
    return out


def cases(g: torch.Generator, n: int):
    def r(p):
        return torch.rand(n, generator=g) < p

    x = torch.randn(n, generator=g)
    yield "randn", x
    s = x.abs().clone()
    s[r(0.7)] = -1.0
    yield "sentinel -1 (70%)", s
    s = x.abs().clone()
    s[r(0.4)] = -math.inf
    yield "sentinel -inf (40%)", s
    yield "ties (5 values)", torch.randint(0, 5, (n,), generator=g).float()
    s = torch.zeros(n)
    s[r(0.01)] = 1.0 + torch.rand(1, generator=g)
    yield "mostly zero", s
    s = x.clone()
    s[r(0.3)] = math.inf
    yield "+inf", s
    s = x.clone()
    u = torch.rand(n, generator=g)
    s[u < 0.3] = 0.0
    s[u > 0.7] = -0.0
    yield "signed zeros", s
    s = x.clone()
    s[r(0.001)] = float("nan")
    yield "nan", s
    base = (torch.arange(n) % 64).float()
    yield "64-periodic", base + 0.01 * torch.rand(n, generator=g) * (base != 0)
    yield "sorted", torch.sort(x).values
    yield "sorted desc", torch.sort(x, descending=True).values
    yield "constant", torch.full((n,), 3.0)
    yield "float64", x.double()
    yield "float16", x.half()
    yield "bfloat16", x.bfloat16()


def main() -> int:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    checked = 0
    for n in (_BRACKET_MIN, _BRACKET_MIN + 1, 300_001):
        for name, flat in cases(g, n):
            ks = [1, 2, 3, n // 1000, n // 10, int(0.4 * n), n // 2, int(0.9 * n), n - 2, n - 1]
            ks += torch.randint(1, n, (4,), generator=g).tolist()
            for k in ks:
                want = torch.kthvalue(flat, n - k + 1).values
                got = kth_largest(flat, k)
                same = bool(want == got) or bool(torch.isnan(want) and torch.isnan(got))
                mask = topk_mask(flat, k)
                ok = same and torch.equal(mask, original_topk(flat, k))
                if not torch.isnan(flat.double()).any():  # with NaN, < k are kept
                    ok = ok and torch.equal(mask, sort_reference(flat, k))
                if not ok:
                    print(f"MISMATCH {name} n={n} k={k}: kthvalue {want} vs {got}")
                    return 1
                checked += 1
    print(
        f"ok: {checked} (distribution, n, k) cases: kth_largest == kthvalue, topk_mask == the "
        "original kthvalue selection and (without NaN) == a stable-sort reference"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
