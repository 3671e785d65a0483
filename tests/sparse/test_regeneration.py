"""Zero-cost neuroregeneration (paper Eqs. 2-3): exact removal / regrowth sets, zero init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from .helpers import batch, build, nnz_of, run

NO_EVENTS = dict(final_density=0.3, update_interval=1000)  # events only when called by hand


def fresh_grad(model: nn.Module, step: int = 99) -> None:
    x, y = batch(step)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


def expected_masks(engine, ratio, scores):
    """Independent per-layer reference of remove-then-regrow, by sorting."""
    out = []
    for layer, m, score in zip(engine.layers, engine.masks, scores, strict=True):
        w = layer.param.detach().flatten()
        mf = m.flatten()
        nnz = int(mf.sum())
        r = math.ceil(ratio * nnz)
        active = mf.nonzero().flatten().tolist()
        by_mag = sorted(active, key=lambda i: (-abs(float(w[i])), i))
        keep = set(by_mag[: nnz - r])
        sf = score.flatten()
        cands = [i for i in range(mf.numel()) if i not in keep]
        grown = sorted(cands, key=lambda i: (-float(sf[i]), i))[:r]
        new = torch.zeros_like(mf)
        new[list(keep | set(grown))] = True
        out.append(new.view_as(m))
    return out


@pytest.mark.parametrize("opt_kind", ["sgd", "adamw"])
@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5])
def test_gradient_regeneration_exact_sets_and_values(opt_kind, ratio):
    model, opt, eng = build("rigl", opt=opt_kind, **NO_EVENTS)
    run(model, opt, eng, 5)
    fresh_grad(model)
    # Give a large gradient to a few of the smallest active weights of each layer: they are
    # removed by magnitude and must be regrown with their value (and state) kept.
    revived = []
    for layer, m in zip(eng.layers, eng.masks, strict=True):
        w, g = layer.param.detach(), layer.param.grad
        mags = torch.where(m, w.abs(), torch.full_like(w, math.inf)).flatten()
        small = mags.argsort()[:2]
        g.view(-1)[small] = 1e3 + torch.arange(2.0)
        revived.append(small)
    scores = [layer.param.grad.abs() for layer in eng.layers]
    expect = expected_masks(eng, ratio, scores)
    old_masks = [m.clone() for m in eng.masks]
    old_w = [layer.param.detach().clone() for layer in eng.layers]
    key = "momentum_buffer" if opt_kind == "sgd" else "exp_avg"
    old_state = [opt.state[layer.param][key].clone() for layer in eng.layers]
    nnz_before, itop_before = nnz_of(eng), eng.itop_rate()

    regrown = eng.regenerate(ratio)

    assert nnz_of(eng) == nnz_before
    assert eng.density() == sum(nnz_before) / eng.total
    newly = 0
    for i, (layer, m_old, m_new, exp) in enumerate(
        zip(eng.layers, old_masks, eng.masks, expect, strict=True)
    ):
        assert torch.equal(m_new, exp), f"{layer.name}: regrown set differs from the reference"
        w = layer.param.detach()
        born = m_new & ~m_old
        assert born.any()
        newly += int(born.sum())
        assert torch.all(w[born] == 0)
        for k, buf in opt.state[layer.param].items():
            if isinstance(buf, torch.Tensor) and buf.shape == w.shape:
                assert torch.all(buf[born] == 0) and torch.all(buf[~m_new] == 0), k
        stay = m_new & m_old  # kept or removed-then-regrown: value and state unchanged
        assert torch.equal(w[stay], old_w[i][stay])
        assert torch.equal(opt.state[layer.param][key][stay], old_state[i][stay])
        assert torch.all(w[~m_new] == 0)
        assert bool(m_new.flatten()[revived[i]].all())
        assert torch.all(w.flatten()[revived[i]] != 0)
    assert regrown == newly
    assert eng.itop_rate() > itop_before >= eng.density()


def test_regeneration_with_zero_ratio_is_identity():
    model, opt, eng = build("rigl", **NO_EVENTS)
    run(model, opt, eng, 2)
    old = [m.clone() for m in eng.masks]
    assert eng.regenerate(0.0) == 0
    assert all(torch.equal(a, b) for a, b in zip(old, eng.masks, strict=True))


def test_random_growth_reproducible_and_seed_dependent():
    def once(seed):
        model, opt, eng = build("set", seed=seed, model_seed=0, **NO_EVENTS)
        # Same initial mask for every engine seed: the mask is loaded, only regrowth draws differ.
        state = eng.state_dict()
        _, _, ref = build("set", seed=0, model_seed=0, **NO_EVENTS)
        state["masks"] = [m.clone() for m in ref.masks]
        state["ever_active"] = [m.clone() for m in ref.masks]
        eng.load_state_dict(state)
        run(model, opt, eng, 3)
        fresh_grad(model)
        before = [m.clone() for m in eng.masks]
        nnz = nnz_of(eng)
        eng.regenerate(0.4)
        assert nnz_of(eng) == nnz
        return before, [m.clone() for m in eng.masks]

    b1, a1 = once(5)
    b2, a2 = once(5)
    b3, a3 = once(6)
    assert all(torch.equal(x, y) for x, y in zip(b1, b3, strict=True))  # same start...
    assert all(
        torch.equal(x, y) for x, y in zip(a1, a2, strict=True)
    )  # ...same seed, same regrowth
    assert any(
        not torch.equal(x, y) for x, y in zip(a1, a3, strict=True)
    )  # other seed, other regrowth
    assert any(not torch.equal(x, y) for x, y in zip(a1, b1, strict=True))


@pytest.mark.parametrize("opt_kind", ["sgd", "adamw"])
def test_momentum_growth_uses_the_dense_gradient_momentum(opt_kind):
    # The optimizer's buffers are 0 at inactive positions (masking contract), so momentum growth
    # ranks by the engine's own exponential average of the dense gradient (SNFS).
    model, opt, eng = build("rigl", opt=opt_kind, growth="momentum", **NO_EVENTS)
    assert eng.grad_momentum is not None
    ema = [torch.zeros_like(layer.param) for layer in eng.layers]
    for i in range(3):
        x, y = batch(i)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads = [layer.param.grad.clone() for layer in eng.layers]
        opt.step()
        eng.step()
        ema = [0.9 * e + 0.1 * g for e, g in zip(ema, grads, strict=True)]
    for got, want in zip(eng.grad_momentum, ema, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    g = torch.Generator().manual_seed(7)
    for buf in eng.grad_momentum:
        # A designed momentum whose ranking is unrelated to the gradient's.
        buf.copy_(torch.randn(buf.shape, generator=g))
    scores = [buf.abs() for buf in eng.grad_momentum]
    expect = expected_masks(eng, 0.3, scores)
    by_grad = expected_masks(eng, 0.3, [layer.param.grad.abs() for layer in eng.layers])
    eng.regenerate(0.3)
    assert all(torch.equal(m, e) for m, e in zip(eng.masks, expect, strict=True))
    assert any(not torch.equal(m, e) for m, e in zip(eng.masks, by_grad, strict=True))


def test_regrow_adds_exact_counts_at_top_scores():
    model, opt, eng = build("static", final_density=0.3)
    run(model, opt, eng, 2)
    fresh_grad(model)
    old = [m.clone() for m in eng.masks]
    counts = [3, 0, 5, 2]
    assert eng.regrow(counts, mode="gradient") == sum(counts)
    for layer, m0, m1, c in zip(eng.layers, old, eng.masks, counts, strict=True):
        born = m1 & ~m0
        assert int(born.sum()) == c and not (m0 & ~m1).any()
        g = torch.where(m0, torch.full_like(layer.param.grad, -1.0), layer.param.grad.abs())
        if c:
            assert float(g[born].min()) >= float(g[~m1].max())
        assert torch.all(layer.param.detach()[born] == 0)


def test_gradient_flows_to_inactive_positions():
    # Masked weights are exact zeros (not masked in the forward): their gradient is dense.
    model, opt, eng = build("static", final_density=0.1)
    fresh_grad(model)
    for layer, m in zip(eng.layers, eng.masks, strict=True):
        assert (layer.param.grad[~m] != 0).float().mean() > 0.5
