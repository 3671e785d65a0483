"""One mask-update event in detail, against independent references (SPEC §4, reference notes §6):
layer-wise gradual pruning over several events, the order prune-then-regenerate inside an event,
regeneration at the end of the pruning window, and random growth drawn from the engine's own
generator.

Run: 10 epochs x 20 steps = 200 steps, Δt = 5, pruning epochs 0..6: t_f = 120, n = 24 events.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from .helpers import batch, build, make_model, masks_of, nnz_of, run

SPE, EPOCHS, DT, T_F = 20, 10, 5, 120
N_EV = T_F // DT
SHORT = dict(steps_per_epoch=SPE, epochs=EPOCHS, update_interval=DT, prune_start_epoch=0,
             prune_end_epoch=6, final_density=0.2)


def s_t(t: int, s_i: float = 0.0, s_f: float = 0.8) -> float:
    return s_f + (s_i - s_f) * (1 - t / (N_EV * DT)) ** 3


def r_t(t: int, r0: float = 0.5, r_min: float = 0.005) -> float:
    return r_min + (r0 - r_min) * (1 + math.cos(math.pi * t / (SPE * EPOCHS))) / 2


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------ layer-wise gradual pruning


@pytest.mark.parametrize("method", ["gmp", "granet"])
def test_layerwise_gradual_pruning_sets_every_layer_at_every_event(method):
    model, opt, eng = build(method, prune_scope="layerwise", **SHORT)
    per_event: dict[int, list[int]] = {}

    def after(step, ev):
        if ev is not None and ev["target_sparsity"] is not None:
            per_event[step] = nnz_of(eng)

    run(model, opt, eng, T_F + 2 * DT, after)
    assert sorted(per_event) == [DT * j for j in range(1, N_EV + 1)]
    for t, nnz in per_event.items():
        # Every layer at exactly round(n_l (1 - s_t)): never all of them to 0, never global.
        expect = [round(n * (1 - s_t(t))) for n in eng.sizes]
        assert nnz == expect, t
    assert [round(d, 2) for d in eng.layer_densities().values()] == [0.2, 0.2, 0.2, 0.2]
    assert nnz_of(eng) == per_event[T_F]  # regeneration after t_f keeps every layer's count


# ------------------------------------------------------------------ one event, by hand


def _reference_event(weights, masks, grads, t):
    """Global magnitude prune to s_t, then per layer: remove ceil(r_t nnz_l) smallest-|w|
    active weights and regrow as many by |grad| among every inactive position (the ones just
    pruned or removed included). Ties never occur here (random float weights, gradients)."""
    total = sum(w.numel() for w in weights)
    k = round(total * (1 - s_t(t)))
    flat = torch.cat([torch.where(m, w.abs(), -1.0).flatten() for w, m in zip(weights, masks,
                                                                            strict=True)])
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:k]
    kept = torch.zeros(flat.numel(), dtype=torch.bool)
    kept[order] = True
    pruned, offset = [], 0
    for w in weights:
        pruned.append(kept[offset: offset + w.numel()].view_as(w))
        offset += w.numel()
    out = []
    for w, p, g in zip(weights, pruned, grads, strict=True):
        nnz = int(p.sum())
        r = math.ceil(r_t(t) * nnz)
        active = p.flatten().nonzero().flatten().tolist()
        keep = set(sorted(active, key=lambda i: (-abs(float(w.flatten()[i])), i))[: nnz - r])
        cands = [i for i in range(w.numel()) if i not in keep]
        grown = sorted(cands, key=lambda i: (-abs(float(g.flatten()[i])), i))[:r]
        new = torch.zeros(w.numel(), dtype=torch.bool)
        new[list(keep | set(grown))] = True
        out.append(new.view_as(w))
    return pruned, out


@pytest.mark.parametrize("t", [2 * DT, 12 * DT])
def test_an_event_prunes_globally_then_regenerates_per_layer(t):
    model, opt, eng = build("granet", **SHORT)
    run(model, opt, eng, t - 1)
    x, y = batch(t)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    before = masks_of(eng)
    weights = [(layer.param.detach() * m) for layer, m in zip(eng.layers, before, strict=True)]
    grads = [layer.param.grad.clone() for layer in eng.layers]
    pruned, expect = _reference_event(weights, before, grads, t)

    event = eng.step()

    assert event["step"] == t and event["regen_rate"] == pytest.approx(r_t(t), abs=1e-12)
    assert same(eng.masks, expect)
    assert sum(eng.nnz) == round(eng.total * (1 - s_t(t)))
    assert eng.nnz == [int(p.sum()) for p in pruned]  # regeneration keeps the pruned counts
    assert event["pruned"] == sum(int(m.sum()) for m in before) - sum(eng.nnz)
    born = [m & ~p for m, p in zip(eng.masks, pruned, strict=True)]
    assert event["regrown"] == sum(int(b.sum()) for b in born) > 0
    # Regrown connections are active with value 0 (a prune after the regrowth would have
    # removed exactly these zero weights first).
    for layer, b in zip(eng.layers, born, strict=True):
        assert torch.all(layer.param.detach()[b] == 0)


# ------------------------------------------------------------------ end of the pruning window


@pytest.mark.parametrize("stop", [True, False])
def test_regeneration_at_and_after_the_end_of_the_pruning_window(stop):
    model, opt, eng = build("granet", regen_stop_at_prune_end=stop, **SHORT)
    masks, events = [masks_of(eng)], {}

    def after(step, ev):
        masks.append(masks_of(eng))
        if ev is not None:
            events[step] = ev

    run(model, opt, eng, SPE * EPOCHS, after)
    # Up to and including t_f, every event prunes and then regenerates: after the first event
    # (dense before it) the regrowth shows as positions inactive before the event.
    for t in range(DT, T_F + 1, DT):
        assert events[t]["regen_rate"] == pytest.approx(r_t(t), abs=1e-12)
        assert events[t]["regrown"] > 0, t
        if t > DT:
            assert any((a & ~b).any() for a, b in zip(masks[t], masks[t - 1], strict=True)), t
    assert events[T_F]["target_sparsity"] == 0.8
    later = sorted(t for t in events if t > T_F)
    if stop:
        assert later == []
        assert all(same(m, masks[T_F]) for m in masks[T_F:])
    else:  # the reference: regeneration every Δt to the end, r_t decaying over the whole run
        assert later == list(range(T_F + DT, SPE * EPOCHS + 1, DT))
        for t in later:
            ev = events[t]
            assert ev["target_sparsity"] is None and ev["pruned"] == 0
            assert ev["regen_rate"] == pytest.approx(r_t(t), abs=1e-12)
            assert [int(m.sum()) for m in masks[t]] == [int(m.sum()) for m in masks[T_F]]
        assert sum(events[t]["regrown"] > 0 for t in later) >= len(later) - 2
    assert sum(int(m.sum()) for m in masks[-1]) == round(eng.total * 0.2)


# ------------------------------------------------------------------ random growth


def test_random_growth_comes_from_the_engine_generator_given_identical_weights():
    """Same starting weights and masks for every engine seed: only the generator differs."""
    raw = make_model(0).state_dict()  # before any engine masks it
    _, _, ref = build("set", seed=0, **{**SHORT, "update_interval": 1000})
    ref_masks = masks_of(ref)

    def regrow(seed: int):
        model, opt, eng = build("set", seed=seed, **{**SHORT, "update_interval": 1000})
        model.load_state_dict(raw)
        state = eng.state_dict()  # this engine's own generator
        state["masks"], state["ever_active"] = ref_masks, ref_masks
        eng.load_state_dict(state)
        run(model, opt, eng, 3)
        x, y = batch(99)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        weights = [layer.param.detach().clone() for layer in eng.layers]
        before = masks_of(eng)
        torch.manual_seed(1234)  # the global RNG identical for every seed: it must not matter
        eng.regenerate(0.4)
        return weights, before, masks_of(eng), nnz_of(eng)

    w5, b5, a5, n5 = regrow(5)
    w5b, b5b, a5b, _ = regrow(5)
    w6, b6, a6, n6 = regrow(6)
    assert same(w5, w6) and same(b5, b6)  # identical start: weights and masks
    assert same(a5, a5b)  # same seed: the same regrowth
    assert not same(a5, a6)  # another seed: another regrowth ...
    assert n5 == n6 == nnz_of_masks(b5)  # ... of the same per-layer counts
    # The magnitude removal does not depend on the seed: what both kept is the same set.
    for m5, m6, b in zip(a5, a6, b5, strict=True):
        kept5, kept6 = m5 & b, m6 & b
        removed5, removed6 = b & ~m5, b & ~m6
        assert torch.equal(kept5 | removed5, kept6 | removed6)


def nnz_of_masks(masks) -> list[int]:
    return [int(m.sum()) for m in masks]
