"""The six methods as presets of one engine (SPEC §4.3), on a short run.

10 epochs x 20 steps = 200 steps, Δt = 5, pruning epochs 0..6: t0 = 0, t_f = 120, n = 24.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from granet.config import SparsityConfig
from granet.sparse import SparseEngine, layer_densities, prunable_layers

from .helpers import PRUNABLE_NAMES, build, masks_of, nnz_of, run

SPE, EPOCHS, DT, T_F = 20, 10, 5, 120
N_EV = T_F // DT
SHORT = dict(
    steps_per_epoch=SPE,
    epochs=EPOCHS,
    update_interval=DT,
    prune_start_epoch=0,
    prune_end_epoch=6,
    final_density=0.2,
)


def record(method: str, **kw):
    """Run 200 steps; return (engine, per-step nnz lists, per-step masks, events by step)."""
    model, opt, eng = build(method, **{**SHORT, **kw})
    nnz, masks, events = [nnz_of(eng)], [masks_of(eng)], {}

    def after(step, ev):
        nnz.append(nnz_of(eng))
        masks.append(masks_of(eng))
        if ev is not None:
            events[step] = ev
        assert eng.density() == sum(nnz[-1]) / eng.total

    run(model, opt, eng, SPE * EPOCHS, after)
    return eng, nnz, masks, events


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def s_t(t: int, s_i: float, s_f: float) -> float:
    return s_f + (s_i - s_f) * (1 - t / (N_EV * DT)) ** 3


def test_dense_stays_dense():
    eng, nnz, masks, events = record("dense")
    assert events == {}
    assert all(sum(n) == eng.total for n in nnz)
    assert eng.density() == 1.0 and eng.itop_rate() == 1.0
    assert all(int((layer.param != 0).sum()) == layer.param.numel() for layer in eng.layers)


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_static_never_changes_its_mask(distribution):
    eng, nnz, masks, events = record("static", distribution=distribution)
    assert events == {}
    assert all(same(m, masks[0]) for m in masks)
    shapes = [tuple(layer.param.shape) for layer in eng.layers]
    dens = layer_densities(shapes, 0.2, distribution)
    assert nnz[0] == [round(d * n) for d, n in zip(dens, eng.sizes, strict=True)]
    assert abs(sum(nnz[0]) - 0.2 * eng.total) <= len(eng.layers)
    assert eng.itop_rate() == eng.density()


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_set_and_rigl_keep_exact_counts_and_move_the_mask(method):
    eng, nnz, masks, events = record(method)
    assert sorted(events) == list(range(DT, SPE * EPOCHS + 1, DT))  # all run long
    assert all(n == nnz[0] for n in nnz)  # per layer, every step
    changed = sum(not same(a, b) for a, b in zip(masks, masks[1:], strict=False))
    assert changed >= len(events) // 2
    assert not same(masks[0], masks[-1])
    assert all(ev["target_sparsity"] is None and ev["pruned"] == 0 for ev in events.values())
    assert sum(ev["regrown"] for ev in events.values()) == eng.regrown_total > 0
    for t, ev in events.items():
        r = (
            eng.cfg.regen_min
            + (eng.cfg.regen_ratio - eng.cfg.regen_min)
            * (1 + math.cos(math.pi * t / (SPE * EPOCHS)))
            / 2
        )
        assert ev["regen_rate"] == pytest.approx(r, abs=1e-12)
    assert eng.itop_rate() > eng.density()


@pytest.mark.parametrize("method", ["gmp", "granet"])
@pytest.mark.parametrize("init_density", [1.0, 0.5])
def test_gradual_methods_reach_s_f_exactly_at_the_last_event(method, init_density):
    eng, nnz, masks, events = record(method, init_density=init_density)
    s_i, s_f = 1 - init_density, 0.8
    prune_events = sorted(t for t, ev in events.items() if ev["target_sparsity"] is not None)
    assert prune_events == [DT * j for j in range(1, N_EV + 1)]
    for t in prune_events:
        s = events[t]["target_sparsity"]
        assert s == pytest.approx(s_t(t, s_i, s_f), abs=1e-12)
        assert sum(nnz[t]) == round(eng.total * (1 - s))
        assert events[t]["pruned"] == sum(nnz[t - 1]) - sum(nnz[t])
        assert events[t]["density"] == sum(nnz[t]) / eng.total
    assert events[T_F]["target_sparsity"] == s_f
    assert sum(nnz[T_F]) == round(eng.total * 0.2)
    # Before the first event: the starting density.
    if init_density == 1.0:
        assert all(sum(n) == eng.total for n in nnz[:DT])
    else:
        assert all(n == nnz[0] for n in nnz[:DT])
    # After t_f: s_f kept, per layer, to the end.
    assert all(n == nnz[T_F] for n in nnz[T_F:])
    after = {t: ev for t, ev in events.items() if t > T_F}
    if method == "gmp":
        assert after == {}
        assert all(same(m, masks[T_F]) for m in masks[T_F:])
    else:
        assert sorted(after) == list(range(T_F + DT, SPE * EPOCHS + 1, DT))
        assert all(ev["target_sparsity"] is None and ev["pruned"] == 0 for ev in after.values())
        assert sum(ev["regrown"] for ev in after.values()) > 0
        assert not same(masks[T_F], masks[-1])
        # During the window too, regeneration never moves the per-layer counts of the prune:
        # the gradual prune sets the total exactly, regeneration keeps it.
        assert all("regen_rate" in events[t] for t in prune_events)


def test_granet_sparse_to_sparse_starts_at_erk_half_density():
    model, opt, eng = build("granet", **SHORT, init_density=0.5)
    shapes = [tuple(layer.param.shape) for layer in eng.layers]
    dens = layer_densities(shapes, 0.5, "erk")
    assert nnz_of(eng) == [round(d * n) for d, n in zip(dens, eng.sizes, strict=True)]
    assert abs(sum(nnz_of(eng)) - 0.5 * eng.total) <= len(eng.layers)
    assert eng.layer_densities() == {
        layer.name: round(d * n) / n
        for layer, d, n in zip(eng.layers, dens, eng.sizes, strict=True)
    }
    for layer, m in zip(eng.layers, eng.masks, strict=True):
        assert torch.all(layer.param[~m] == 0)


def test_granet_regen_stop_at_prune_end():
    eng, nnz, masks, events = record("granet", regen_stop_at_prune_end=True)
    assert max(events) == T_F
    assert all(same(m, masks[T_F]) for m in masks[T_F:])
    assert all(n == nnz[T_F] for n in nnz[T_F:])
    assert sum(nnz[-1]) == round(eng.total * 0.2)


@pytest.mark.parametrize(
    ("dense_layers", "excluded"),
    [
        (["first"], "conv1"),
        (["last"], "fc"),
        (["short"], "short"),
        (["first", "last"], ("conv1", "fc")),
    ],
)
def test_dense_layers_are_not_masked(dense_layers, excluded):
    excluded = (excluded,) if isinstance(excluded, str) else excluded
    eng, nnz, masks, events = record("granet", dense_layers=dense_layers)
    names = [layer.name for layer in eng.layers]
    assert names == [n for n in PRUNABLE_NAMES if n not in excluded]
    mods = dict(eng.model.named_modules())
    for name in excluded:
        w = mods[name].weight
        assert int((w != 0).sum()) == w.numel()
    assert sum(nnz[-1]) == round(eng.total * 0.2)
    n_all = sum(p.numel() for p in eng.model.parameters())
    assert eng.density_all() == (n_all - eng.total + sum(nnz[-1])) / n_all


def test_bad_dense_layer_name_and_method():
    with pytest.raises(ValueError, match="sparsity.dense_layers"):
        build("granet", **SHORT, dense_layers=["conv"])  # substring of conv1/conv2: no guessing
    with pytest.raises(ValueError, match="sparsity.dense_layers"):
        build("granet", **SHORT, dense_layers=list(PRUNABLE_NAMES))
    with pytest.raises(ValueError, match="sparsity.method"):
        build("snip", **SHORT)
    with pytest.raises(ValueError, match="sparsity.update_interval"):
        build("gmp", **{**SHORT, "update_interval": 500})


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3)
        self.c3 = nn.Conv3d(1, 3, 2)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(6, 5))

    def forward(self, x):
        return self.head(self.norm(x))


def test_custom_architecture_discovered_by_type_and_biases_untouched():
    model = Mixed()
    assert [layer.name for layer in prunable_layers(model)] == ["c1", "c3", "head.1"]
    biases = [model.c1.bias.clone(), model.c3.bias.clone(), model.head[1].bias.clone()]
    cfg = SparsityConfig(method="static", final_density=0.25, distribution="uniform")
    eng = SparseEngine(model, None, cfg, steps_per_epoch=1, epochs=1)
    assert nnz_of(eng) == [round(0.25 * 24), round(0.25 * 24), round(0.25 * 30)]
    assert torch.equal(model.c1.bias, biases[0]) and torch.equal(model.c3.bias, biases[1])
    assert torch.equal(model.head[1].bias, biases[2])
    assert torch.all(model.norm.weight == 1)
