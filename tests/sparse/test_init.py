"""Initial layer densities (uniform / ER / ERK) and exact-count random masks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from granet.models import build_model
from granet.sparse import layer_densities, random_mask


def shapes_of(name: str) -> list[tuple[int, ...]]:
    model = build_model(name, num_classes=10, input_shape=(3, 32, 32))
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


SHAPES = {name: shapes_of(name) for name in ("resnet20", "vgg19")}


def raw_score(shape: tuple[int, ...], distribution: str) -> float:
    if distribution == "erk":
        return sum(shape) / math.prod(shape)
    return (shape[0] + shape[1]) / (shape[0] * shape[1])


def test_realistic_shapes():
    # ResNet-20: first conv, 18 block convs, 2 shortcut 1x1 convs, classifier; VGG-19: 16 + 1.
    assert len(SHAPES["resnet20"]) == 22 and SHAPES["resnet20"][0] == (16, 3, 3, 3)
    assert sum(len(s) == 4 and s[2] == 1 for s in SHAPES["resnet20"]) == 2
    assert len(SHAPES["vgg19"]) == 17 and SHAPES["vgg19"][-1] == (10, 512)


@pytest.mark.parametrize("model", ["resnet20", "vgg19"])
@pytest.mark.parametrize("distribution", ["erk", "er", "uniform"])
@pytest.mark.parametrize("density", [0.5, 0.1, 0.02])
def test_total_matches_target_within_one_weight_per_layer(model, distribution, density):
    shapes = SHAPES[model]
    sizes = [math.prod(s) for s in shapes]
    dens = layer_densities(shapes, density, distribution)
    assert len(dens) == len(shapes)
    assert all(0.0 < d <= 1.0 for d in dens)
    target = density * sum(sizes)
    assert sum(d * n for d, n in zip(dens, sizes, strict=True)) == pytest.approx(target, rel=1e-9)
    counts = [round(d * n) for d, n in zip(dens, sizes, strict=True)]
    assert abs(sum(counts) - target) <= len(shapes)
    if distribution == "uniform":
        assert dens == [density] * len(shapes)
        return
    # Characterisation of the (re-)solved ER/ERK scale: one ε with d_l = min(1, ε · raw_l).
    raw = [raw_score(s, distribution) for s in shapes]
    sparse = [i for i, d in enumerate(dens) if d < 1.0]
    eps = dens[sparse[0]] / raw[sparse[0]]
    for i, (d, r) in enumerate(zip(dens, raw, strict=True)):
        if d < 1.0:
            assert d == pytest.approx(eps * r, rel=1e-9)
        else:
            assert eps * r >= 1.0 - 1e-12, f"layer {i} made dense although ε·raw < 1"


def test_erk_resnet20_dense_layers_and_ordering():
    shapes = SHAPES["resnet20"]
    # At 10%: the 32x16 1x1 shortcut (raw 50/512) and the classifier (74/640) exceed 1.
    dens = layer_densities(shapes, 0.1, "erk")
    dense = [s for s, d in zip(shapes, dens, strict=True) if d == 1.0]
    assert dense == [(32, 16, 1, 1), (10, 64)]
    # The first conv is just below 1; larger layers get lower density under ERK.
    assert 0.9 < dens[0] < 1.0
    by = {s: d for s, d in zip(shapes, dens, strict=True)}
    assert by[(16, 16, 3, 3)] > by[(32, 32, 3, 3)] > by[(64, 64, 3, 3)]
    # At 50%: the whole first stage is dense, and so is everything small.
    dens = layer_densities(shapes, 0.5, "erk")
    assert all(d == 1.0 for d in dens[:8]) and dens[-1] == 1.0
    assert dens[15] < dens[14] < dens[8] < 1.0
    # At 2% nothing needs to be dense.
    assert all(d < 1.0 for d in layer_densities(shapes, 0.02, "erk"))


def test_erk_dense_layer_and_resolve_by_hand():
    shapes = [(4, 1, 3, 3), (64, 64, 3, 3), (10, 64)]
    sizes = [36, 36864, 640]
    dens = layer_densities(shapes, 0.5, "erk")
    # Naive ε = 0.5 N / Σ raw·n = 18770 / 219 ≈ 85.7: layers 0 (raw 11/36) and 2 (74/640) exceed
    # 1 and become dense; the big conv takes the rest of the budget.
    assert dens[0] == 1.0 and dens[2] == 1.0
    expected = (0.5 * sum(sizes) - 36 - 640) / 36864
    assert dens[1] == pytest.approx(expected, rel=1e-12)
    assert sum(d * n for d, n in zip(dens, sizes, strict=True)) == pytest.approx(
        0.5 * sum(sizes), rel=1e-12
    )
    # Uniform gives the same density to all; ER ignores the kernel dims.
    assert layer_densities(shapes, 0.5, "uniform") == [0.5, 0.5, 0.5]
    er = layer_densities([(4, 1, 3, 3), (64, 64, 3, 3)], 0.01, "er")
    assert er[0] / er[1] == pytest.approx((5 / 4) / (128 / 4096), rel=1e-12)


def test_layer_densities_edge_cases():
    assert layer_densities([(3, 4), (5, 6, 1, 1)], 1.0, "erk") == [1.0, 1.0]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="density"):
            layer_densities([(3, 4)], bad, "erk")
    with pytest.raises(ValueError, match="sparsity.distribution"):
        layer_densities([(3, 4)], 0.5, "gaussian")


@pytest.mark.parametrize("shape", [(7,), (5, 9), (4, 3, 3, 3)])
def test_random_mask_exact_count(shape):
    n = math.prod(shape)
    g = torch.Generator().manual_seed(0)
    for count in (0, 1, n // 3, n - 1, n):
        m = random_mask(shape, count, g)
        assert m.dtype == torch.bool and tuple(m.shape) == shape
        assert int(m.sum()) == count
    assert int(random_mask(shape, n + 10, g).sum()) == n
    assert int(random_mask(shape, -3, g).sum()) == 0


def test_random_mask_seeded_and_seed_dependent():
    a = random_mask((32, 16, 3, 3), 500, torch.Generator().manual_seed(1))
    b = random_mask((32, 16, 3, 3), 500, torch.Generator().manual_seed(1))
    c = random_mask((32, 16, 3, 3), 500, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Successive draws of one generator differ too (the generator advances).
    g = torch.Generator().manual_seed(1)
    assert not torch.equal(random_mask((100,), 50, g), random_mask((100,), 50, g))


def test_random_mask_is_roughly_uniform():
    # Over many draws every position is picked about count/n of the time.
    g = torch.Generator().manual_seed(3)
    hits = sum(random_mask((20,), 5, g).float() for _ in range(4000))
    freq = hits / 4000
    assert torch.all((freq - 0.25).abs() < 0.04)
