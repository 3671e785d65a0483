"""Tests for granet.models: shapes, parameter counts, torchvision and user models, bad names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from granet.models import available_models, build_model, validate_model_name

SHAPES = {
    "mlp": (1, 40),
    "cnn1d": (1, 40),
    "cnn1d_nobn": (1, 40),
    "cnn_digits": (1, 8, 8),
    "resnet20": (3, 32, 32),
    "resnet32": (3, 32, 32),
    "resnet56": (3, 32, 32),
    "vgg11": (3, 32, 32),
    "vgg16": (3, 32, 32),
    "vgg19": (3, 32, 32),
    "transformer1d": (1, 40),
}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_lists_all_names() -> None:
    assert sorted(available_models()) == sorted(SHAPES)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_output_shape(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, input_shape=SHAPES[name])
    out = model(torch.randn(3, *SHAPES[name]))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


def test_param_counts() -> None:
    assert (
        260_000
        <= n_params(build_model("resnet20", num_classes=10, input_shape=(3, 32, 32)))
        <= 280_000
    )
    assert (
        19_900_000
        <= n_params(build_model("vgg19", num_classes=10, input_shape=(3, 32, 32)))
        <= 20_100_000
    )
    # cnn1d_nobn: 32*1*5+32 + 32*32*3+32 + 64*32*3+64 + 640*128+128 + 128*10+10
    assert n_params(build_model("cnn1d_nobn", num_classes=10, input_shape=(1, 40))) == 92_842
    # cnn1d: the same without conv biases (-128), plus BN weight and bias per channel (+256)
    assert n_params(build_model("cnn1d", num_classes=10, input_shape=(1, 40))) == 92_970


def test_relu_modules_are_distinct() -> None:
    for name in ("mlp", "cnn1d", "resnet20", "vgg11"):
        model = build_model(name, num_classes=10, input_shape=SHAPES[name])
        relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
        assert len(relus) >= 2
        assert len({id(r) for r in relus}) == len(relus)
    # resnet20: stem ReLU + 2 per block * 9 blocks
    resnet = build_model("resnet20", num_classes=10, input_shape=(3, 32, 32))
    assert sum(isinstance(m, nn.ReLU) for m in resnet.modules()) == 19


def test_mlp_hidden_kwarg_and_width() -> None:
    mlp = build_model("mlp", num_classes=4, input_shape=(1, 8, 8), kwargs={"hidden": [32]})
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(64, 32), (32, 4)]
    narrow = build_model("cnn1d", num_classes=10, input_shape=(1, 40), kwargs={"width": 0.5})
    assert narrow(torch.randn(2, 1, 40)).shape == (2, 10)
    assert n_params(narrow) < 92_970 / 2


def test_resnet_projection_shortcuts_and_channels() -> None:
    model = build_model("resnet20", num_classes=100, input_shape=(1, 32, 32))
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    one_by_one = [c for c in convs if c.kernel_size == (1, 1)]
    assert [(c.in_channels, c.out_channels) for c in one_by_one] == [(16, 32), (32, 64)]


def test_vgg19_structure() -> None:
    model = build_model("vgg19", num_classes=10, input_shape=(3, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16 and all(c.bias is None for c in convs)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == 512


def test_torchvision_model() -> None:
    model = build_model("torchvision:resnet18", num_classes=7, input_shape=(3, 32, 32))
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_user_model_by_import_path() -> None:
    model = build_model("tests.fixtures.user_model:tiny_net", num_classes=5, input_shape=(1, 40))
    assert model(torch.randn(4, 1, 40)).shape == (4, 5)
    validate_model_name("tests.fixtures.user_model:tiny_net")


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("foo", "unknown model"),
        ("torchvision:not_a_model", "unknown torchvision"),
        ("no_such_pkg.mod:fn", "cannot import module"),
        ("tests.fixtures.user_model:missing", "has no attribute"),
        ("tests.fixtures.user_model:NOT_CALLABLE", "not callable"),
        ("bad path:fn", "malformed"),
    ],
)
def test_bad_names_raise(name: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_model_name(name)
    msg = str(info.value)
    assert f"model.name='{name}'" in msg and fragment in msg
    with pytest.raises(ValueError):
        build_model(name, num_classes=10, input_shape=(1, 40))


def test_unknown_message_lists_allowed() -> None:
    with pytest.raises(ValueError, match="allowed: mlp, cnn1d, ") as info:
        build_model("foo", num_classes=10, input_shape=(1, 40))
    assert "'torchvision:<name>' or 'package.module:function'" in str(info.value)


def test_user_builder_returning_non_module() -> None:
    with pytest.raises(ValueError, match=r"not a torch\.nn\.Module"):
        build_model("tests.fixtures.user_model:not_a_module", num_classes=3, input_shape=(1, 40))


def test_unknown_kwarg_rejected() -> None:
    with pytest.raises(ValueError, match=r"model\.kwargs"):
        build_model("vgg19", num_classes=10, input_shape=(3, 32, 32), kwargs={"depth": 3})


def test_validate_accepts_good_names() -> None:
    for name in [*available_models(), "RESNET20", "torchvision:resnet18"]:
        validate_model_name(name)


def test_user_builders_must_be_model_code(tmp_path, monkeypatch) -> None:
    """A Python function or an nn.Module class from a Python module is built; a built-in, a
    non-Module class or a callable instance is refused before it is called."""
    (tmp_path / "granet_models_fixture.py").write_text(
        "import os\n"
        "from torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, num_classes, input_shape, width=4):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(input_shape[-1], num_classes)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x).flatten(1)\n"
        "class Store:\n"
        "    def __init__(self, path):\n"
        "        open(path, 'w').close()\n"
        "def make(num_classes, path):\n"
        "    raise OSError(f'cannot read {path}')\n"
        "system = os.system\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("granet_models_fixture:Net", num_classes=3, input_shape=(1, 40),
                        kwargs={"width": 2})
    assert model(torch.randn(2, 1, 40)).shape == (2, 3)
    touched = tmp_path / "touched"
    for name, fragment in [
        ("granet_models_fixture:Store", "'Store' is a class but not a torch.nn.Module subclass"),
        ("granet_models_fixture:system", "'system' is a built-in"),
        ("os:system", "'system' is a built-in"),
    ]:
        with pytest.raises(ValueError) as info:
            build_model(name, num_classes=3, input_shape=(1, 40),
                        kwargs={"path": str(touched), "command": f"touch {touched}"})
        assert f"model.name='{name}'" in str(info.value) and fragment in str(info.value)
        with pytest.raises(ValueError, match=fragment):
            validate_model_name(name)
    assert not touched.exists()
    # A plain function is called; what it raises comes back as one line naming model.name.
    with pytest.raises(ValueError) as info:
        build_model("granet_models_fixture:make", num_classes=3, input_shape=(1, 40),
                    kwargs={"path": "/x"})
    assert str(info.value) == (
        "model.name='granet_models_fixture:make': the user builder raised OSError: cannot read "
        "/x (model.kwargs={'path': '/x'})"
    )
    assert isinstance(info.value.__cause__, OSError)


def test_transformer1d_structure_and_kwargs() -> None:
    model = build_model("transformer1d", num_classes=10, input_shape=(1, 40))
    attn = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(attn) == 2 and attn[0].in_proj_weight.shape == (192, 64)
    assert model.n_patches == 10 and model.pad == 0
    odd = build_model(
        "transformer1d", num_classes=3, input_shape=(2, 21),
        kwargs={"dim": 16, "depth": 1, "heads": 2, "patch": 5, "mlp_ratio": 1.0},
    )
    assert (odd.n_patches, odd.pad) == (5, 4) and odd.embed.in_features == 10
    assert odd(torch.randn(4, 2, 21)).shape == (4, 3)
    # embed 10*16+16, pos 5*16, in_proj 48*16+48, out_proj 16*16+16, ff 2*(16*16+16),
    # 2 LayerNorms in the layer + 1 final (32 each), head 16*3+3
    assert n_params(odd) == 176 + 80 + 816 + 272 + 544 + 96 + 51
    with pytest.raises(ValueError, match=r"model\.kwargs=\{'width': 2\}"):
        build_model("transformer1d", num_classes=3, input_shape=(1, 40), kwargs={"width": 2})
    with pytest.raises(ValueError, match="dim=10 must be a multiple of heads=4"):
        build_model("transformer1d", num_classes=3, input_shape=(1, 40), kwargs={"dim": 10})


# --------------------------------------------------------------------------------------------
# The MNIST-1D CNN with and without BatchNorm; fidelity to the reference's CIFAR models


def test_cnn1d_has_batchnorm_after_each_conv_and_nobn_has_none() -> None:
    bn = build_model("cnn1d", num_classes=10, input_shape=(1, 40))
    mods = list(bn.features)
    convs = [i for i, m in enumerate(mods) if isinstance(m, nn.Conv1d)]
    assert len(convs) == 3
    for i in convs:
        assert mods[i].bias is None
        assert isinstance(mods[i + 1], nn.BatchNorm1d)
        assert mods[i + 1].num_features == mods[i].out_channels
        assert isinstance(mods[i + 2], nn.ReLU)
    plain = build_model("cnn1d_nobn", num_classes=10, input_shape=(1, 40))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv1d))
    # Same prunable layers (names and shapes) apart from the BN entries between them.
    shapes = {
        name: tuple(m.weight.shape)
        for name, m in plain.named_modules()
        if isinstance(m, (nn.Conv1d, nn.Linear))
    }
    bn_shapes = [
        tuple(m.weight.shape) for m in bn.modules() if isinstance(m, (nn.Conv1d, nn.Linear))
    ]
    assert list(shapes.values()) == bn_shapes
    with pytest.raises(ValueError, match="cnn1d_nobn"):
        build_model("cnn1d_nobn", num_classes=10, input_shape=(1, 40), kwargs={"depth": 2})


def _reference_vgg19(model: nn.Module, num_classes: int) -> nn.Module:
    """VGG-19-BN built as GraNet's CIFAR/models/vgg.py builds it (cfg without a last max-pool,
    AvgPool2d(2) on the 2x2 map), with ``model``'s weights copied in by position."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
           512, 512, 512, 512]
    layers: list[nn.Module] = []
    prev = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(prev, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                       nn.ReLU(inplace=True)]
            prev = v
    ref = nn.Sequential(nn.Sequential(*layers), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(512, num_classes))
    src = [t for t in model.state_dict().values()]
    dst = ref.state_dict()
    assert len(src) == len(dst)
    ref.load_state_dict(dict(zip(dst, src, strict=True)))
    return ref


def test_vgg19_matches_the_reference_construction_with_average_pooling() -> None:
    torch.manual_seed(0)
    model = build_model("vgg19", num_classes=10, input_shape=(3, 32, 32))
    # Four max-pools (the reference has none after the last block), then an average pool.
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    assert isinstance(model.pool, (nn.AvgPool2d, nn.AdaptiveAvgPool2d))
    ref = _reference_vgg19(model, 10)
    model.eval(), ref.eval()
    # Random BN statistics so the comparison is not of near-identity layers.
    g = torch.Generator().manual_seed(1)
    for m, r in zip(
        (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)),
        (r for r in ref.modules() if isinstance(r, nn.BatchNorm2d)),
        strict=True,
    ):
        mean = torch.randn(m.num_features, generator=g) * 0.1
        var = torch.rand(m.num_features, generator=g) + 0.5
        for bn in (m, r):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
    x = torch.randn(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        out, expected = model(x), ref(x)
        assert out.shape == (4, 10)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        # The old construction (max-pool of the 2x2 map) gives a different output.
        feats = ref[0](x)
        maxed = ref[3](torch.flatten(nn.functional.max_pool2d(feats, 2), 1))
        assert (maxed - expected).abs().max() > 1e-3
    # The reference's head initialisation: N(0, 0.01) weight, zero bias.
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.count_nonzero(model.classifier.bias) == 0


def test_resnet_init_is_kaiming_normal_fan_in_on_convs_and_fc() -> None:
    """The reference's ResNet-20 (open_lth initializers.kaiming_normal): std = sqrt(2 / fan_in)
    for every conv and the fc weight (fan_in = in_channels * kernel area)."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, input_shape=(3, 32, 32))
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            w = m.weight.detach()
            fan_in = w[0].numel()
            expected = (2.0 / fan_in) ** 0.5
            # Sample std of n normal draws: relative error ~ 1/sqrt(2n); 432 draws at least.
            tol = 4 / (2 * w.numel()) ** 0.5
            assert w.std().item() == pytest.approx(expected, rel=tol), name
            assert abs(w.mean().item()) < 4 * expected / w.numel() ** 0.5, name
            checked += 1
    assert checked == 19 + 2 + 1  # 19 3x3 convs, two 1x1 shortcuts, the fc
    # The 16->32 1x1 shortcut: fan_in gives sqrt(2/16) = 0.354, fan_out sqrt(2/32) = 0.25.
    short = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert short[0].weight.std().item() > 0.3
