"""Engine metrics (SPEC §7): densities, ITOP rate, FLOPs, units without input, dead ReLUs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from granet.config import SparsityConfig
from granet.sparse import SparseEngine
from granet.sparse.metrics import dead_relu_share, layer_forward_flops

from .helpers import build, run


def engine_for(model, input_shape, method="static", **kw):
    cfg = SparsityConfig(method=method, distribution="uniform", **kw)
    return SparseEngine(
        model, None, cfg, steps_per_epoch=10, epochs=1, batch_size=4, input_shape=input_shape
    )


def set_masks(eng, masks):
    state = eng.state_dict()
    state["masks"] = [m.clone() for m in masks]
    state["ever_active"] = [m.clone() for m in masks]
    eng.load_state_dict(state)


def test_linear_flops_by_hand():
    eng = engine_for(nn.Linear(10, 5), (10,), final_density=0.4)
    assert eng.density() == 0.4
    assert eng.dense_flops == 50.0
    assert eng.inference_flops == pytest.approx(0.4 * 50)
    m = torch.zeros(5, 10, dtype=torch.bool)
    m[0, :7] = True
    m[3, 2] = True
    set_masks(eng, [m])
    assert eng.density() == 8 / 50
    assert eng.inference_flops == pytest.approx(8.0)
    assert eng.metrics()["inference_flops_ratio"] == pytest.approx(8 / 50)


def test_conv_linear_flops_by_hand_with_a_dense_layer():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)
    )
    conv_macs = 3 * 2 * 9 * 16  # out ch x in ch x kernel x output positions
    fc_macs = 48 * 5
    flops = layer_forward_flops(model, (2, 4, 4))
    assert flops == {"0": conv_macs, "3": fc_macs}
    eng = engine_for(model, (2, 4, 4), final_density=0.5, dense_layers=["last"])
    assert [layer.name for layer in eng.layers] == ["0"]
    assert eng.inference_flops == pytest.approx(conv_macs * 27 / 54 + fc_macs)
    assert eng.dense_flops == conv_macs + fc_macs
    # Training FLOPs: 3 x batch x sparse forward per step (no events for static).
    for _ in range(3):
        eng.step()
    assert eng.train_flops == pytest.approx(3 * 3 * 4 * eng.inference_flops)


def test_linear_flops_count_token_positions():
    flops = layer_forward_flops(nn.Linear(4, 6), (7, 4))  # 7 positions per sample
    assert flops == {"": 4 * 6 * 7}
    with pytest.raises(RuntimeError, match="input_shape"):
        _ = SparseEngine(
            nn.Linear(3, 2), None, SparsityConfig(method="dense"), steps_per_epoch=1, epochs=1
        ).inference_flops


def test_units_without_input_and_layer_densities_by_hand():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 5))
    eng = engine_for(model, (2, 4, 4), final_density=0.5)
    conv = torch.ones(3, 2, 3, 3, dtype=torch.bool)
    conv[1] = False  # filter 1 has no input
    fc = torch.zeros(5, 12, dtype=torch.bool)
    fc[1, 3] = fc[2, :] = fc[4, 0] = True  # units 0 and 3 have no input
    set_masks(eng, [conv, fc])
    assert eng.units_without_input() == pytest.approx(3 / 8)
    assert eng.layer_densities() == {"0": 36 / 54, "2": 14 / 60}
    assert eng.density() == 50 / 114
    n_all = 54 + 3 + 60 + 5
    assert eng.density_all() == (n_all - 114 + 50) / n_all
    assert eng.metrics()["units_without_input"] == pytest.approx(3 / 8)


def test_itop_rate_at_least_density_and_grows_with_regeneration():
    model, opt, eng = build("rigl", final_density=0.2, update_interval=4, epochs=4)
    assert eng.itop_rate() == eng.density()
    rates = []

    def after(step, ev):
        assert eng.itop_rate() >= eng.density()
        rates.append(eng.itop_rate())
        if ev is not None:
            assert ev["regrown"] > 0

    run(model, opt, eng, 24, after)
    assert all(a <= b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[-1] > rates[3] > eng.density()
    assert eng.metrics()["itop_rate"] == rates[-1]


def test_dead_relu_share_by_hand():
    lin = nn.Linear(2, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
        lin.bias.copy_(torch.tensor([0.0, 0.0, -1.0, 1.0]))
    model = nn.Sequential(lin, nn.ReLU())
    x = torch.tensor([[1.0, -1.0], [-1.0, -2.0]])  # unit 1 and unit 2 are never positive
    assert dead_relu_share(model, x) == pytest.approx(2 / 4)
    assert dead_relu_share(nn.Linear(2, 2), x) is None
