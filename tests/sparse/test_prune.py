"""Magnitude pruning: exact k, global / layer-wise, per-layer floor, structured filter pruning."""

from __future__ import annotations

import math

import pytest
import torch

from granet.sparse import filter_prune, global_magnitude, layerwise_magnitude, topk_mask

from .helpers import build, nnz_of


def ref_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sort-based reference: largest first, ties by lowest flat index (stable sort)."""
    flat = scores.reshape(-1)
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    out[order[: max(0, min(k, flat.numel()))]] = True
    return out.view_as(scores)


def test_topk_exact_k_no_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 5, 3, generator=g)
    n = scores.numel()
    for k in (0, 1, 2, n // 2, n - 1, n, n + 5, -2):
        m = topk_mask(scores, k)
        assert m.shape == scores.shape and m.dtype == torch.bool
        assert int(m.sum()) == max(0, min(k, n))
        assert torch.equal(m, ref_topk(scores, k))


def test_topk_ties_lowest_index_wins():
    s = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, 3.0])
    assert topk_mask(s, 2).nonzero().flatten().tolist() == [0, 2]
    assert topk_mask(s, 3).nonzero().flatten().tolist() == [0, 2, 4]
    assert topk_mask(s, 5).nonzero().flatten().tolist() == [0, 2, 3, 4, 5]
    assert topk_mask(torch.zeros(10), 4).nonzero().flatten().tolist() == [0, 1, 2, 3]
    # Many ties in a large tensor, and +-inf: same as the stable sort, every time.
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 3, (40, 25), generator=g).float()
    s[0, :3] = math.inf
    s[1, :5] = -math.inf
    for k in (1, 3, 7, 333, 500, 998):
        m = topk_mask(s, k)
        assert int(m.sum()) == k
        assert torch.equal(m, ref_topk(s, k))
        assert torch.equal(m, topk_mask(s.clone(), k))


def layers_with_masks(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weights = [
        torch.randn(8, 4, 3, 3, generator=g),
        torch.randn(30, 20, generator=g),
        torch.randn(5, 30, generator=g) * 0.3,
    ]
    masks = [torch.rand(w.shape, generator=g) < 0.7 for w in weights]
    # Inactive weights are exact zeros in the engine; here they hold huge values to prove that
    # pruning never looks at them.
    weights = [
        torch.where(m, w, torch.full_like(w, 100.0)) for w, m in zip(weights, masks, strict=True)
    ]
    return weights, masks


@pytest.mark.parametrize("keep", [0, 1, 100, 517, 700])
def test_global_magnitude_keeps_the_k_largest_active(keep):
    weights, masks = layers_with_masks()
    active = sum(int(m.sum()) for m in masks)
    out = global_magnitude(weights, masks, keep)
    assert sum(int(o.sum()) for o in out) == min(keep, active)
    for o, m in zip(out, masks, strict=True):
        assert o.shape == m.shape and not (o & ~m).any()  # never revives
    # Reference: sort the |w| of all active weights; the kept set is the K largest.
    vals = torch.cat([w[m].abs() for w, m in zip(weights, masks, strict=True)])
    if 0 < keep < active:
        thr = vals.sort(descending=True).values[keep - 1]
        for o, w, m in zip(out, weights, masks, strict=True):
            assert torch.equal(o, m & (w.abs() >= thr))


def test_global_magnitude_more_than_active_keeps_the_mask():
    weights, masks = layers_with_masks()
    out = global_magnitude(weights, masks, 10**6)
    assert all(torch.equal(o, m) for o, m in zip(out, masks, strict=True))


def test_global_magnitude_min_keep_floor():
    weights, masks = layers_with_masks(2)
    weights[2] = torch.where(masks[2], weights[2] * 1e-4, weights[2])  # would be wiped out
    keep = 200
    plain = global_magnitude(weights, masks, keep)
    assert int(plain[2].sum()) == 0
    out = global_magnitude(weights, masks, keep, min_keep=[0, 0, 12])
    assert sum(int(o.sum()) for o in out) == keep
    assert int(out[2].sum()) == 12
    # The protected weights are that layer's 12 largest; the rest is the global top-188.
    assert torch.equal(out[2], topk_mask(torch.where(masks[2], weights[2].abs(), -1.0), 12))
    rest = torch.cat([(w.abs() * m).flatten() for w, m in zip(weights[:2], masks[:2], strict=True)])
    assert torch.equal(torch.cat([o.flatten() for o in out[:2]]), topk_mask(rest, keep - 12))


def test_layerwise_magnitude_exact_per_layer():
    weights, masks = layers_with_masks(3)
    keeps = [50, 10**6, 7]
    out = layerwise_magnitude(weights, masks, keeps)
    for o, w, m, k in zip(out, weights, masks, keeps, strict=True):
        k = min(k, int(m.sum()))
        assert int(o.sum()) == k and not (o & ~m).any()
        thr = w[m].abs().sort(descending=True).values[k - 1]
        assert torch.equal(o, m & (w.abs() >= thr))


@pytest.mark.parametrize("sparsity", [0.3, 0.9, 0.98])
def test_engine_prune_to_sparsity_global_and_layerwise(sparsity):
    _, _, eng = build("gmp", update_interval=36, prune_end_epoch=6)
    n = eng.total
    eng.prune_to_sparsity(sparsity)
    assert sum(nnz_of(eng)) == round(n * (1 - sparsity))
    _, _, eng = build("gmp", update_interval=36, prune_end_epoch=6, prune_scope="layerwise")
    eng.prune_to_sparsity(sparsity)
    assert nnz_of(eng) == [round(s * (1 - sparsity)) for s in eng.sizes]
    for layer, m in zip(eng.layers, eng.masks, strict=True):
        assert torch.all(layer.param[~m] == 0)


def test_engine_min_layer_density_floor():
    _, _, eng = build("gmp", update_interval=36, prune_end_epoch=6)
    with torch.no_grad():
        eng.layers[0].param.mul_(1e-4)  # conv1 would collapse under a global threshold
    eng.prune_to_sparsity(0.95)
    assert nnz_of(eng)[0] == 0
    _, _, eng = build("gmp", update_interval=36, prune_end_epoch=6, min_layer_density=0.03)
    with torch.no_grad():
        eng.layers[0].param.mul_(1e-4)
    eng.prune_to_sparsity(0.95)
    assert sum(nnz_of(eng)) == round(eng.total * 0.05)
    for nnz, size in zip(nnz_of(eng), eng.sizes, strict=True):
        assert nnz >= math.ceil(0.03 * size)
    assert nnz_of(eng)[0] == math.ceil(0.03 * eng.sizes[0])


def conv_stack(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weights = [
        torch.randn(12, 3, 3, 3, generator=g),
        torch.randn(10, 12, 3, 3, generator=g),
        torch.randn(6, 40, generator=g),
    ]
    masks = [torch.rand(w.shape, generator=g) < 0.8 for w in weights]
    masks[1][4] = False  # one dead filter
    weights = [w * m for w, m in zip(weights, masks, strict=True)]
    return weights, masks


def filter_l1(w, m):
    return (w.abs() * m).flatten(1).sum(1)


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.9])
def test_filter_prune_layerwise(ratio):
    weights, masks = conv_stack()
    out = filter_prune(weights, masks, ratio, scope="layerwise", skip=[False, False, True])
    for i, (o, w, m) in enumerate(zip(out, weights, masks, strict=True)):
        assert not (o & ~m).any()
        for f in range(m.shape[0]):  # each filter kept whole or removed whole
            assert torch.equal(o[f], m[f]) or not o[f].any()
        if i == 2:  # skipped
            assert torch.equal(o, m)
            continue
        alive = m.flatten(1).any(1)
        n_alive = int(alive.sum())
        k = min(round(ratio * n_alive), n_alive - 1)
        removed = alive & ~o.flatten(1).any(1)
        assert int(removed.sum()) == k
        l1 = filter_l1(w, m)
        # The removed filters are the k lowest-L1 alive ones.
        expected = sorted(torch.nonzero(alive).flatten().tolist(), key=lambda f: float(l1[f]))[:k]
        assert sorted(torch.nonzero(removed).flatten().tolist()) == sorted(expected)


def test_filter_prune_global():
    weights, masks = conv_stack(1)
    ratio = 0.4
    out = filter_prune(weights, masks, ratio, scope="global", skip=[False, False, True])
    assert torch.equal(out[2], masks[2])
    for o, m in zip(out, masks, strict=True):
        for f in range(m.shape[0]):
            assert torch.equal(o[f], m[f]) or not o[f].any()
        assert o.flatten(1).any(1).sum() >= 1
    # Independent greedy: filters of layers 0-1 by mean |w| of their active weights.
    entries = []
    for i in (0, 1):
        counts = masks[i].flatten(1).sum(1)
        l1 = filter_l1(weights[i], masks[i])
        for f in range(masks[i].shape[0]):
            if counts[f] > 0:
                entries.append((float(l1[f] / counts[f]), i, f, int(counts[f])))
    entries.sort()
    target = ratio * sum(int(m.sum()) for m in masks)
    removed_ref, gone = set(), 0
    for _, i, f, c in entries:
        if gone >= target:
            break
        removed_ref.add((i, f))
        gone += c
    removed = {
        (i, f)
        for i in (0, 1)
        for f in range(masks[i].shape[0])
        if masks[i][f].any() and not out[i][f].any()
    }
    assert removed == removed_ref
    lost = sum(int(m.sum()) - int(o.sum()) for m, o in zip(masks, out, strict=True))
    assert lost == gone >= target


def test_filter_prune_bad_scope():
    weights, masks = conv_stack()
    with pytest.raises(ValueError, match="scope"):
        filter_prune(weights, masks, 0.5, scope="random")


def test_engine_prune_fraction_filter_and_unstructured():
    _, _, eng = build("static", final_density=0.6, distribution="uniform")
    before = nnz_of(eng)
    old = [m.clone() for m in eng.masks]
    removed = eng.prune_fraction(0.5, scope="layerwise", structure="filter")
    assert removed == [b - a for b, a in zip(before, nnz_of(eng), strict=True)]
    assert removed[-1] == 0 and torch.equal(eng.masks[-1], old[-1])  # classifier untouched
    for o, m, layer in zip(old, eng.masks, eng.layers, strict=True):
        for f in range(m.shape[0]):
            assert torch.equal(m[f], o[f]) or not m[f].any()
        assert torch.all(layer.param[~m] == 0)
    for o, m in zip(old[:-1], eng.masks[:-1], strict=True):
        alive = int(o.flatten(1).any(1).sum())
        assert alive - int(m.flatten(1).any(1).sum()) == min(round(0.5 * alive), alive - 1)
    # Unstructured: global keeps round(nnz (1 - p)); layer-wise per layer.
    total = sum(nnz_of(eng))
    eng.prune_fraction(0.2)
    assert sum(nnz_of(eng)) == round(total * 0.8)
    per = nnz_of(eng)
    eng.prune_fraction(0.3, scope="layerwise")
    assert nnz_of(eng) == [round(n * 0.7) for n in per]
    with pytest.raises(ValueError, match="ratio"):
        eng.prune_fraction(1.0)
    with pytest.raises(ValueError, match="structure"):
        eng.prune_fraction(0.1, structure="channel")
