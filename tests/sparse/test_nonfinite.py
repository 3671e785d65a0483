"""The non-finite guard: no mask update ever reads a NaN or inf weight or growth score."""

from __future__ import annotations

import math

import pytest
import torch

from granet.sparse.engine import NonFiniteError

from .helpers import batch, build, masks_of, run

NO_EVENTS = dict(final_density=0.3, update_interval=1000)


def _grad(model) -> None:
    x, y = batch(99)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()


def _state(model, eng):
    return masks_of(eng), {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, eng, before) -> None:
    masks, weights = before
    assert all(torch.equal(a, b) for a, b in zip(masks, eng.masks, strict=True))
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]) or (torch.isnan(v) == torch.isnan(weights[k])).all(), k


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    "update",
    [
        lambda eng: eng.prune_to_sparsity(0.8),
        lambda eng: eng.prune_to_sparsity(0.8, scope="layerwise"),
        lambda eng: eng.prune_fraction(0.5),
        lambda eng: eng.prune_fraction(0.5, scope="layerwise", structure="filter"),
        lambda eng: eng.regenerate(0.3),
        lambda eng: eng.regrow([2, 2, 2, 2]),
    ],
    ids=["global", "layerwise", "fraction", "filter", "regenerate", "regrow"],
)
def test_every_mask_update_refuses_non_finite_weights(update, value) -> None:
    model, opt, eng = build("rigl", **NO_EVENTS)
    run(model, opt, eng, 2)
    _grad(model)
    with torch.no_grad():
        w = eng.layers[2].param  # 'short'
        w.view(-1)[int(eng.masks[2].view(-1).nonzero()[0])] = value  # an active weight
    before = _state(model, eng)
    with pytest.raises(NonFiniteError) as info:
        update(eng)
    assert info.value.reason == "non-finite weights in short.weight"
    assert info.value.step == 2 and "masks not updated" in str(info.value)
    _unchanged(model, eng, before)
    assert eng.pruned_total == 0 and eng.density() == pytest.approx(0.3, abs=1e-3)


def test_gradient_growth_refuses_non_finite_gradients_random_growth_does_not_read_them():
    model, opt, eng = build("rigl", **NO_EVENTS)
    run(model, opt, eng, 2)
    _grad(model)
    eng.layers[3].param.grad[0, 0] = math.nan  # fc
    before = _state(model, eng)
    with pytest.raises(NonFiniteError, match="non-finite gradients of fc.weight"):
        eng.regenerate(0.3)
    _unchanged(model, eng, before)
    # Magnitude pruning reads weights only: finite weights, NaN gradient, still allowed.
    assert eng.prune_to_sparsity(0.8) > 0
    model2, opt2, eng2 = build("set", **NO_EVENTS)
    run(model2, opt2, eng2, 2)
    _grad(model2)
    eng2.layers[3].param.grad[0, 0] = math.nan
    nnz = list(eng2.nnz)
    assert eng2.regenerate(0.3) > 0 and eng2.nnz == nnz


def test_an_event_on_non_finite_weights_leaves_every_mask_as_it_was():
    # GraNet event every 2 steps (prune + regeneration); at step 4 a weight is NaN.
    model, opt, eng = build("granet", steps_per_epoch=5, epochs=4, update_interval=2,
                            prune_end_epoch=3, final_density=0.2)
    events = run(model, opt, eng, 3)
    assert [e["step"] for e in events] == [2]
    x, y = batch(4)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    with torch.no_grad():
        eng.layers[0].param.view(-1)[0] = math.nan
    masks = masks_of(eng)
    pruned, regrown, ever = eng.pruned_total, eng.regrown_total, eng.itop_rate()
    with pytest.raises(NonFiniteError, match=r"^step 4: non-finite weights in conv1\.weight"):
        eng.step()
    assert all(torch.equal(a, b) for a, b in zip(masks, eng.masks, strict=True))
    assert (eng.pruned_total, eng.regrown_total, eng.itop_rate()) == (pruned, regrown, ever)
    assert eng.last_event["step"] == 2 and eng.density() > 0.2
