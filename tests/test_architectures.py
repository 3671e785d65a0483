"""GraNet on any architecture: which weights are masked, the engine contract on attention,
recurrent, tied-embedding and grouped-conv models, FLOPs against FlopCounterMode, layer
collapse, ERK for every shape, ``granet layers``, preflight and a transformer trained by GraNet.
"""

from __future__ import annotations

import copy
import io
import math
import time
import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from granet.cli import main
from granet.config import ConfigError, SparsityConfig, load_config
from granet.models import available_models, build_model
from granet.preflight import check_user_code, layer_table
from granet.sparse import SparseEngine, layer_densities
from granet.sparse.engine import LayerCollapseWarning, UnmaskedWeightWarning
from granet.sparse.flops import EXTRA_FORMULAS, count_forward_flops
from tests.fixtures import arch_models as A

# --------------------------------------------------------------------------------- fixtures


def _ids(n: int, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, A.VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _floats(n: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


# name -> (builder, num_classes, per-sample input, batch maker)
ARCHS = {
    "attention": (A.token_transformer, 4, (8,), lambda n, s=0: _ids(n, 8, s)),
    "recurrent": (A.recurrent, 3, (2, 10), lambda n, s=0: _floats(n, (2, 10), s)),
    "tied_embedding": (A.tied_embedding, A.VOCAB, (8,), lambda n, s=0: _ids(n, 8, s)),
    "grouped_conv": (A.grouped_conv, 5, (3, 8, 8), lambda n, s=0: _floats(n, (3, 8, 8), s)),
}
# The weights the rule must find in each (beyond plain Linear/Conv).
EXPECTED = {
    "attention": [
        "encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.1.self_attn.out_proj",
        "cross.q_proj_weight", "cross.k_proj_weight", "cross.v_proj_weight", "memory", "head",
    ],
    "recurrent": [
        "lstm.weight_ih_l0", "lstm.weight_hh_l0", "lstm.weight_hr_l0", "lstm.weight_ih_l1_reverse",
        "gru.weight_ih_l0", "gru.weight_hh_l0", "cell.weight_ih", "cell.weight_hh", "head",
    ],
    "tied_embedding": ["embed", "mix"],
    "grouped_conv": ["stem", "grouped", "depthwise", "up", "bil"],
}


def make(arch: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    builder, classes, shape, batch = ARCHS[arch]
    torch.manual_seed(seed)
    model = builder(classes, shape)
    x = batch(6, seed + 1)
    y = torch.randint(0, classes, (6,), generator=torch.Generator().manual_seed(seed + 2))
    return model, x, y


def engine_for(model, opt, x, **kw) -> SparseEngine:
    cfg = SparsityConfig(**{"update_interval": 2, "prune_end_epoch": 2, **kw})
    return SparseEngine(model, opt, cfg, steps_per_epoch=4, epochs=4, seed=1, batch_size=6,
                        example_input=x[:2])


def train(model, opt, eng, x, y, steps: int, check=None) -> list[dict]:
    events = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ev = eng.step()
        if ev is not None:
            events.append(ev)
        if check is not None:
            check()
    return events


def contract(eng: SparseEngine, opt: torch.optim.Optimizer) -> int:
    """Inactive weights and their optimizer state are exact zeros; returns state tensors seen."""
    seen = 0
    for layer, m in zip(eng.layers, eng.masks, strict=True):
        assert torch.all(layer.param.detach()[~m] == 0), layer.name
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            buf = opt.state.get(layer.param, {}).get(key)
            if buf is not None:
                assert torch.all(buf[~m] == 0), f"{layer.name}.{key}"
                seen += 1
    return seen


def flop_counter_mode_macs(model: nn.Module, x: torch.Tensor) -> float:
    """FlopCounterMode's count per sample / 2, under the conditions granet counts in (eval,
    autograd on, oneDNN off so RNNs run as matmuls) and with granet's extra formulas (CPU
    attention, Bilinear) as its custom_mapping."""
    was = model.training
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.backends.mkldnn.flags(enabled=False), torch.enable_grad():
            with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as fc:
                model(x)
    model.train(was)
    return fc.get_total_flops() / 2 / len(x)


# ------------------------------------------------------------------- which weights are masked


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_matmul_and_conv_weight_is_masked(arch):
    model, x, _ = make(arch)
    eng = engine_for(model, None, x, method="static", final_density=0.3)
    names = [layer.name for layer in eng.layers]
    assert set(EXPECTED[arch]) <= set(names)
    # Ground truth from the dispatcher: every parameter that is an operand of a matmul/conv.
    used = count_forward_flops(model, x[:2]).by_param
    masked = {id(layer.param) for layer in eng.layers}
    by_id = {id(p): n for n, p in model.named_parameters()}
    unmasked = [by_id[k] for k, v in used.items() if v > 0 and k not in masked]
    assert unmasked == [], f"matmul/conv weights left dense without an exclude: {unmasked}"
    # ... and nothing else is masked: no embedding (unless tied to a Linear), norm or bias.
    for layer in eng.layers:
        assert id(layer.param) in used, f"{layer.name} is masked but never multiplied"
    assert len(masked) == len(eng.layers)  # tied parameters are one layer


def test_tied_embedding_is_one_layer_with_one_mask():
    model, x, y = make("tied_embedding")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eng = engine_for(model, opt, x, method="static", final_density=0.25,
                     distribution="uniform")
    assert [(la.name, la.param_name) for la in eng.layers] == [("embed", "embed.weight"),
                                                                ("mix", "mix.weight")]
    train(model, opt, eng, x, y, 3, check=lambda: contract(eng, opt))
    # Both uses see the one masked tensor: the decoder multiplies by the sparse embedding.
    assert model.decoder.weight is model.embed.weight
    assert int((model.decoder.weight != 0).sum()) == eng.nnz[0] == round(0.25 * 12 * 16)
    row = next(r for r in layer_table_rows_for_tied() if r.name.startswith("embed.weight"))
    assert row.name == "embed.weight = decoder.weight" and row.masked


def layer_table_rows_for_tied():
    cfg = load_config(None, [
        "data.name=tests.fixtures.user_data:vocab_tokens", "data.batch_size=32",
        "model.name=tests.fixtures.arch_models:tied_embedding", "sparsity.update_interval=4",
        "run.epochs=4", "sparsity.prune_end_epoch=2", "optim.milestones=[2]",
    ])
    return layer_table(cfg)[0]


def test_include_exclude_patterns_and_dense_layers():
    model, x, _ = make("attention")
    eng = engine_for(
        model, None, x, method="static", include=["embed.weight"],
        exclude=["re:encoder\\.layers\\.1\\..*", "*.out_proj.weight"],
        dense_layers=["head.weight"],
    )
    names = [layer.name for layer in eng.layers]
    assert names[0] == "embed"  # an embedding only when asked
    assert not any(n.startswith("encoder.layers.1.") or n.endswith("out_proj") for n in names)
    assert "head" not in names and "encoder.layers.0.self_attn.in_proj_weight" in names
    reasons = {i.name: i.reason for i in eng.param_infos}
    assert reasons["encoder.layers.1.linear1.weight"].startswith("excluded by sparsity.exclude")
    assert reasons["head.weight"] == "kept dense by sparsity.dense_layers"
    assert reasons["encoder.layers.0.norm1.weight"] == "normalisation"
    assert reasons["encoder.layers.0.linear1.bias"] == "bias"
    # An exclude wins over an include; a pattern matching nothing names itself.
    eng2 = engine_for(model, None, x, method="static", include=["embed.*"], exclude=["embed.*"])
    assert "embed" not in [layer.name for layer in eng2.layers]
    for field, pat in (("include", "embedding.weight"), ("exclude", "re:enc")):
        with pytest.raises(ConfigError, match=rf"sparsity\.{field}='{pat}': must match"):
            engine_for(model, None, x, method="static", **{field: [pat]})
    with pytest.raises(ConfigError, match=r"sparsity\.exclude\[0\]='re:\(': must be a valid"):
        load_config(None, ["sparsity.exclude=['re:(']"])
    with pytest.raises(ConfigError, match=r"sparsity\.collapse_density=1\.0: must be in"):
        load_config(None, ["sparsity.collapse_density=1.0"])


def test_unknown_layer_type_warns_until_included_or_excluded():
    model = A.raw_param(5, (1, 8))
    x = _floats(2, (1, 8))
    with pytest.warns(UnmaskedWeightWarning, match="'proj'"):
        eng = engine_for(model, None, x, method="static")
    assert [layer.name for layer in eng.layers] == ["head"]
    # The FLOPs stay right: proj's multiply counts, dense.
    assert eng.dense_flops == 8 * 16 + 16 * 5
    assert eng.inference_flops == pytest.approx(8 * 16 + 16 * 5 * eng.density())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmaskedWeightWarning)
        inc = engine_for(model, None, x, method="static", include=["proj"])
        exc = engine_for(model, None, x, method="static", exclude=["proj"])
    assert [layer.name for layer in inc.layers] == ["proj", "head"]
    assert [layer.name for layer in exc.layers] == ["head"]


# ------------------------------------------------------------------- the engine contract


@pytest.mark.parametrize("opt_kind", ["sgd", "adamw"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_contract_exact_density_on_every_architecture(arch, opt_kind):
    model, x, y = make(arch)
    if opt_kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    eng = engine_for(model, opt, x, method="granet", init_density=0.5, final_density=0.2)
    n = eng.total
    dens = layer_densities([tuple(la.param.shape) for la in eng.layers], 0.5, "erk")
    assert eng.nnz == [round(d * s) for d, s in zip(dens, eng.sizes, strict=True)]
    seen = []
    events = train(model, opt, eng, x, y, 8, check=lambda: seen.append(contract(eng, opt)))
    assert seen[-1] == (2 if opt_kind == "adamw" else 1) * len(eng.layers)
    prunes = [e for e in events if e["target_sparsity"] is not None]
    assert len(prunes) == 4
    for ev in prunes:  # exact: K = round(N (1 - s_t)) after every prune (regrowth keeps it)
        assert ev["density"] * n == round(n * (1 - ev["target_sparsity"]))
    assert sum(eng.nnz) == round(0.2 * n)
    assert sum(e["regrown"] for e in events) > 0
    assert any((~m).any() for m in eng.masks)


def _bytes_round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_state_round_trip_resumes_exactly(arch):
    model, x, y = make(arch)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kw = dict(method="granet", init_density=0.5, final_density=0.2, growth="random")
    eng = engine_for(model, opt, x, **kw)
    train(model, opt, eng, x, y, 3)
    model2 = copy.deepcopy(model)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    eng2 = SparseEngine(model2, opt2, SparsityConfig(**{"update_interval": 2,
                        "prune_end_epoch": 2, **kw}), steps_per_epoch=4, epochs=4, seed=99)
    model2.load_state_dict(model.state_dict())  # the new engine masked it with its own draw
    opt2.load_state_dict(_bytes_round_trip(opt.state_dict()))
    state = _bytes_round_trip(eng.state_dict())
    assert state["param_names"] == [la.param_name for la in eng.layers]
    eng2.load_state_dict(state)
    train(model, opt, eng, x, y, 5)
    train(model2, opt2, eng2, x, y, 5)
    assert all(torch.equal(a, b) for a, b in zip(eng.masks, eng2.masks, strict=True))
    for p1, p2 in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p1, p2)


# ------------------------------------------------------------------------------ FLOPs


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_flops_match_flop_counter_mode_on_user_models(arch):
    model, x, _ = make(arch)
    eng = engine_for(model, None, x, method="static", final_density=0.3)
    ref = flop_counter_mode_macs(model, x[:2])
    assert ref > 0
    assert eng.dense_flops == pytest.approx(ref, rel=0.01)
    # Each masked weight's ops scale with its density; weightless ops stay dense.
    idx = {id(la.param): i for i, la in enumerate(eng.layers)}
    expect = eng.flop_count.unattributed + sum(
        v * (eng.nnz[idx[k]] / eng.sizes[idx[k]] if k in idx else 1.0)
        for k, v in eng.flop_count.by_param.items()
    )
    assert eng.inference_flops == pytest.approx(expect, rel=1e-9)
    assert eng.inference_flops < 0.7 * eng.dense_flops


REGISTRY_SHAPES = {
    "mlp": (1, 40), "cnn1d": (1, 40), "cnn1d_nobn": (1, 40), "cnn_digits": (1, 8, 8),
    "transformer1d": (1, 40),
    "resnet20": (3, 32, 32), "resnet32": (3, 32, 32), "resnet56": (3, 32, 32),
    "vgg11": (3, 32, 32), "vgg16": (3, 32, 32), "vgg19": (3, 32, 32),
}


@pytest.mark.parametrize("name", available_models())
def test_flops_match_flop_counter_mode_on_registry_models(name):
    torch.manual_seed(0)
    shape = REGISTRY_SHAPES[name]
    model = build_model(name, num_classes=10, input_shape=shape)
    x = _floats(1, shape)
    eng = SparseEngine(model, None, SparsityConfig(method="static", final_density=0.1),
                       steps_per_epoch=1, epochs=1, example_input=x)
    assert eng.dense_flops == pytest.approx(flop_counter_mode_macs(model, x), rel=0.01)
    assert eng.flop_count.unattributed == (0 if name != "transformer1d" else 2 * 2 * 10 * 10 * 64)


def test_flops_by_hand_for_lstm_attention_and_tokens():
    # LSTM(4 -> 8) over 5 steps: per step 4H x in + 4H x H MACs.
    lstm = nn.Sequential()
    lstm.rnn = nn.LSTM(4, 8, batch_first=True)
    count = count_forward_flops(lstm.rnn, torch.randn(3, 5, 4))
    assert count.by_param[id(lstm.rnn.weight_ih_l0)] == 5 * 32 * 4
    assert count.by_param[id(lstm.rnn.weight_hh_l0)] == 5 * 32 * 8
    # Self-attention, E = 16, L = 5: in_proj 3E x E per token, scores and AV L x E per token.
    mha = nn.MultiheadAttention(16, 2, batch_first=True)
    q = torch.randn(2, 5, 16)
    count = count_forward_flops(mha, (q, q, q))
    assert count.by_param[id(mha.in_proj_weight)] == 5 * 48 * 16
    assert count.by_param[id(mha.out_proj.weight)] == 5 * 16 * 16
    assert count.unattributed == 2 * 5 * 5 * 16
    # Token ids through an embedding: the gather is free, the head is not.
    emb = nn.Sequential(nn.Embedding(10, 6), nn.Flatten(), nn.Linear(18, 4))
    count = count_forward_flops(emb, torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert count.total == 18 * 4 and set(count.by_param) == {id(emb[2].weight)}


# -------------------------------------------------------------------------- ERK / ER shapes


def test_erk_and_er_for_every_shape():
    shapes = [(48, 16), (32, 2), (5, 16, 16), (8, 2, 3, 3), (40,)]
    dens = layer_densities(shapes, 0.3, "erk")
    raw = [sum(s) / math.prod(s) for s in shapes]  # all dims, any rank
    eps = dens[0] / raw[0]
    for d, r in zip(dens, raw, strict=True):
        assert d == pytest.approx(min(1.0, eps * r))
    sizes = [math.prod(s) for s in shapes]
    assert sum(d * n for d, n in zip(dens, sizes, strict=True)) == pytest.approx(0.3 * sum(sizes))
    er = layer_densities(shapes, 0.3, "er")  # first two dims; a 1-D weight scores 1
    raw_er = [(48 + 16) / (48 * 16), (32 + 2) / 64, (5 + 16) / 80, (8 + 2) / 16, 1.0]
    eps = er[0] / raw_er[0]
    for d, r in zip(er, raw_er, strict=True):
        assert d == pytest.approx(min(1.0, eps * r))


# --------------------------------------------------------------------------- layer collapse


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(20, 20)
        self.small = nn.Linear(20, 5)
        with torch.no_grad():
            self.small.weight.mul_(1e-3)  # global magnitude pruning empties it first

    def forward(self, x):
        return self.small(self.big(x))


def test_collapsed_layer_warns_once_and_is_counted():
    model = _TwoLayers()
    cfg = SparsityConfig(method="gmp", final_density=0.05, update_interval=1)
    eng = SparseEngine(model, None, cfg, steps_per_epoch=10, epochs=100)
    assert eng.metrics()["collapsed_layers"] == 0
    with pytest.warns(LayerCollapseWarning, match="'small' collapsed to density 0.000000"):
        eng.prune_to_sparsity(0.7)
    assert eng.nnz[1] == 0 and eng.metrics()["collapsed_layers"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayerCollapseWarning)  # not again for the same layer
        eng.prune_to_sparsity(0.8)
    # A threshold flags near-empty layers too; the floor prevents the collapse.
    model = _TwoLayers()
    thr = SparsityConfig(method="gmp", final_density=0.05, update_interval=1,
                         collapse_density=0.5)
    eng = SparseEngine(model, None, thr, steps_per_epoch=10, epochs=100)
    with pytest.warns(LayerCollapseWarning, match="'big'"):
        eng.prune_to_sparsity(0.6)
    model = _TwoLayers()
    floor = SparsityConfig(method="gmp", final_density=0.05, min_layer_density=0.05,
                           update_interval=1)
    eng = SparseEngine(model, None, floor, steps_per_epoch=10, epochs=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayerCollapseWarning)
        eng.prune_to_sparsity(0.9)
    assert eng.nnz[1] == math.ceil(0.05 * 100) and eng.metrics()["collapsed_layers"] == 0


# ------------------------------------------------------------------ preflight, granet layers


def test_check_user_code_is_fast_and_passes_builtins():
    cfg = load_config(None, ["data.name=mnist1d", "model.name=mlp", "sparsity.update_interval=10"])
    t0 = time.perf_counter()
    check_user_code(cfg)
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["model.name=mlp", "model.kwargs={width: 2}"], "model.kwargs={'width': 2}: "),
        (["model.name=tests.fixtures.arch_models:crashes"],
         "model.name='tests.fixtures.arch_models:crashes': the forward pass fails on a "
         "data.name='mnist1d' batch of shape (2, 1, 40) float32 (RuntimeError: mat1 and mat2"),
        (["model.name=tests.fixtures.arch_models:crashes", "model.kwargs={depth: 3}"],
         "model.kwargs={'depth': 3}: depth not accepted by the user model builder"),
        (["model.name=tests.fixtures.arch_models:tied_embedding"],
         "model.name='tests.fixtures.arch_models:tied_embedding': the forward pass fails"),
        (["data.name=tests.fixtures.user_data:raises", "model.name=mlp"],
         "data.name='tests.fixtures.user_data:raises': the data function raised RuntimeError: "
         "cannot reach the data server"),
        (["model.name=mlp", "sparsity.exclude=[fc.*]"], "sparsity.exclude='fc.*': must match"),
        (["model.name=mlp", "sparsity.update_interval=5000"],
         "sparsity.update_interval=5000: longer than the pruning window"),
    ],
)
def test_check_user_code_names_the_field(sets, needle):
    cfg = load_config(None, sets)
    with pytest.raises(ConfigError) as info:
        check_user_code(cfg)
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_layers_command_prints_the_table(capsys):
    rc = main(["layers", "--set", "model.name=transformer1d", "--set", "sparsity.method=static",
               "--set", "model.kwargs={dim: 32}", "--set", "sparsity.exclude=[head.weight]"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln and not ln.startswith("-")}
    qkv = lines["encoder.layers.0.self_attn.in_proj_weight"].split()
    assert qkv[1:4] == ["96x32", "3072", "yes"] and 0 < float(qkv[4]) < 1
    assert "excluded by sparsity.exclude 'head.weight'" in lines["head.weight"]
    assert lines["pos"].split()[3] == "no" and "normalisation" in lines["norm.weight"]
    assert "masked: 9 of 31 parameters" in out
    rc = main(["layers", "--set", "model.name=mlp", "--set", "sparsity.include=[nothing]"])
    assert rc == 2 and "sparsity.include='nothing'" in capsys.readouterr().err


# ------------------------------------------------------------- training transformers by GraNet


def test_transformer1d_trained_by_granet_beats_chance():
    from granet.trainer import Trainer

    cfg = load_config(None, [
        "data.name=mnist1d", "data.batch_size=64", "model.name=transformer1d",
        "model.kwargs={dim: 32, depth: 2, heads: 4}", "optim.name=adamw", "optim.lr=0.005",
        "optim.weight_decay=0.01", "optim.schedule=cosine", "optim.milestones=[]",
        "sparsity.method=granet", "sparsity.final_density=0.3", "sparsity.update_interval=20",
        "sparsity.prune_end_epoch=3", "run.epochs=5", "run.device=cpu",
        "run.dead_unit_eval=false",
    ])
    summary = Trainer(cfg, write=False).fit(resume=False)
    assert summary["density"] == pytest.approx(0.3, abs=1e-4)
    assert summary["test_acc"] > 0.4  # chance: 0.1
    # Attention scores stay dense: the FLOPs ratio sits above the density, below dense.
    assert 0.3 < summary["inference_flops_ratio"] < 0.4


def test_token_model_on_a_user_data_set_trains():
    from granet.trainer import Trainer

    cfg = load_config(None, [
        "data.name=tests.fixtures.user_data:tokens", "data.batch_size=50",
        "model.name=tests.fixtures.arch_models:token_transformer", "optim.name=adamw",
        "optim.lr=0.01", "optim.schedule=constant", "optim.milestones=[]",
        "sparsity.method=rigl", "sparsity.final_density=0.5", "sparsity.update_interval=10",
        "run.epochs=4", "run.device=cpu",
    ])
    check_user_code(cfg)
    tr = Trainer(cfg, write=False)
    assert tr.data.train.x.dtype == torch.int64
    summary = tr.fit(resume=False)
    assert summary["density"] == pytest.approx(0.5, abs=1e-3)
    assert summary["test_acc"] > 0.4  # 4 classes
    assert 0.5 < summary["inference_flops_ratio"] < 0.7


def test_included_1d_weights_are_masked_and_filter_pruning_skips_them():
    model, x, y = make("grouped_conv")
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    eng = engine_for(model, opt, x, method="static", final_density=0.5, include=["bn.weight"],
                     distribution="uniform")
    assert [la.name for la in eng.layers][-2:] == ["bn", "bil"]
    assert eng.nnz[-2] == 2 and eng.sizes[-2] == 4  # bn.weight: 4 channels, half masked
    train(model, opt, eng, x, y, 2, check=lambda: contract(eng, opt))
    removed = eng.prune_fraction(0.5, structure="filter", scope="layerwise")
    assert removed[-2] == 0 and removed[-1] == 0 and sum(removed) > 0
