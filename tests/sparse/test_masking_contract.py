"""The per-step masking contract (SPEC §2.3) and exact engine state round trips."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from granet.config import SparsityConfig
from granet.sparse import SparseEngine

from .helpers import INPUT_SHAPE, build, make_optimizer, masks_of, run

PRESETS = [
    ("dense", {}),
    ("static", {}),
    ("set", {}),
    ("rigl", {}),
    ("gmp", {"init_density": 1.0}),
    ("gmp", {"init_density": 0.5}),
    ("granet", {"init_density": 1.0}),
    ("granet", {"init_density": 0.5}),
]
IDS = [f"{m}-{kw.get('init_density', '')}" for m, kw in PRESETS]
OPTIMIZERS = ["sgd", "nesterov", "adamw"]
# 6 steps/epoch x 6 epochs = 36 steps; Δt = 3; pruning epochs 0..3 -> events at 3, 6, ..., 18.
COMMON = dict(final_density=0.3, update_interval=3, prune_start_epoch=0, prune_end_epoch=3)
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")


def check_contract(engine: SparseEngine, opt: torch.optim.Optimizer) -> int:
    """Assert inactive weights and their same-shaped optimizer state are exact zeros."""
    checked = 0
    for layer, m in zip(engine.layers, engine.masks, strict=True):
        p = layer.param
        assert m.shape == p.shape and m.dtype == torch.bool
        assert torch.all(p.detach()[~m] == 0), f"{layer.name}: active weight outside the mask"
        for key in STATE_KEYS:
            buf = opt.state.get(p, {}).get(key)
            if isinstance(buf, torch.Tensor):
                assert buf.shape == p.shape
                assert torch.all(buf[~m] == 0), f"{layer.name}.{key} nonzero at inactive positions"
                checked += 1
    return checked


@pytest.mark.parametrize("opt_kind", OPTIMIZERS)
@pytest.mark.parametrize(("method", "kw"), PRESETS, ids=IDS)
def test_masked_weights_and_optimizer_state_are_zero_after_every_step(method, kw, opt_kind):
    model, opt, eng = build(method, opt=opt_kind, **COMMON, **kw)
    check_contract(eng, opt)  # right after construction too
    initial = masks_of(eng)
    n_state = []
    changes = 0
    prev = masks_of(eng)

    def after(step, event):
        nonlocal changes, prev
        n_state.append(check_contract(eng, opt))
        cur = masks_of(eng)
        changes += any(not torch.equal(a, b) for a, b in zip(prev, cur, strict=True))
        prev = cur
        # No position is ever active outside the current mask (weights hold exact zeros there)
        # and the density is the mask's.
        assert eng.density() == sum(int(m.sum()) for m in eng.masks) / eng.total

    events = run(model, opt, eng, 36, after)
    # Optimizer state exists for every masked layer once it has stepped.
    per_layer = 2 if opt_kind == "adamw" else 1
    assert n_state[-1] == per_layer * len(eng.layers)
    if method in ("dense", "static"):
        assert events == [] and changes == 0
        assert all(torch.equal(a, b) for a, b in zip(initial, eng.masks, strict=True))
    else:
        assert len(events) >= 6 and changes >= 3
    if method != "dense":
        # Inactive positions exist, so the contract above was not vacuous.
        assert any((~m).any() for m in eng.masks)


def _save_load(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _resume(model, opt, eng, method, kw, opt_kind, seed):
    """A fresh model/optimizer/engine (different seed) resumed from the running ones' state."""
    model2 = copy.deepcopy(model)
    opt2 = make_optimizer(opt_kind, model2)
    cfg = SparsityConfig(method=method, **COMMON, **kw)
    eng2 = SparseEngine(
        model2,
        opt2,
        cfg,
        steps_per_epoch=6,
        epochs=6,
        seed=seed,
        batch_size=8,
        input_shape=INPUT_SHAPE,
    )
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(_save_load(opt.state_dict()))  # no tensor shared with opt
    eng2.load_state_dict(_save_load(eng.state_dict()))
    return model2, opt2, eng2


@pytest.mark.parametrize("opt_kind", OPTIMIZERS)
@pytest.mark.parametrize(("method", "kw"), PRESETS, ids=IDS)
def test_state_dict_round_trip_resumes_exactly(method, kw, opt_kind):
    regen = method in ("set", "rigl", "granet")
    kw = {**kw, "growth": "random"} if regen else kw
    model, opt, eng = build(method, opt=opt_kind, seed=3, **COMMON, **kw)
    # Stop mid pruning window (events at 3, 6, ..., 18 and, for regrowth, on to 36).
    run(model, opt, eng, 10)
    model2, opt2, eng2 = _resume(model, opt, eng, method, kw, opt_kind, seed=99)
    assert eng2.step_count == eng.step_count == 10
    assert all(torch.equal(a, b) for a, b in zip(eng.masks, eng2.masks, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(eng.ever_active, eng2.ever_active, strict=True))
    assert torch.equal(eng.generator.get_state(), eng2.generator.get_state())
    assert eng2.density() == eng.density() and eng2.itop_rate() == eng.itop_rate()
    assert eng2.train_flops == eng.train_flops
    assert (eng2.pruned_total, eng2.regrown_total) == (eng.pruned_total, eng.regrown_total)
    # A control whose generator is not resumed: random regrowth must then differ.
    model3, opt3, eng3 = _resume(model, opt, eng, method, kw, opt_kind, seed=99)
    eng3.generator.manual_seed(12345)

    diverged = False
    for _ in range(14):
        t = eng.step_count + 1
        ev1 = _train(model, opt, eng, t)
        ev2 = _train(model2, opt2, eng2, t)
        _train(model3, opt3, eng3, t)
        assert eng.step_count == eng2.step_count
        assert (ev1 is None) == (ev2 is None)
        assert all(torch.equal(a, b) for a, b in zip(eng.masks, eng2.masks, strict=True))
        for p1, p2 in zip(model.parameters(), model2.parameters(), strict=True):
            assert torch.equal(p1, p2)
        diverged |= any(not torch.equal(a, b) for a, b in zip(eng.masks, eng3.masks, strict=True))
    assert eng.regen_rate() == eng2.regen_rate()
    assert diverged == regen


def _train(model, opt, eng, t):
    from .helpers import train_step

    return train_step(model, opt, eng, t)


def test_load_state_dict_rejects_other_layers():
    _, _, eng = build("static", **COMMON)
    _, _, other = build("static", dense_layers=["fc"], **COMMON)
    with pytest.raises(ValueError, match="layers"):
        other.load_state_dict(eng.state_dict())
