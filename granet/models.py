"""Model registry: built-in networks, torchvision models and user models by import path.

``build_model(name, num_classes=..., input_shape=...)`` accepts

* a registry name (:func:`available_models`): ``mlp``, ``cnn1d`` (BatchNorm after each conv),
  ``cnn1d_nobn`` (the same net without normalisation), ``cnn_digits``, ``resnet20``, ``resnet32``,
  ``resnet56``, ``vgg11``, ``vgg16``, ``vgg19``, ``transformer1d``;
* ``torchvision:<name>``: any torchvision classification model, built without weights;
* ``package.module:function``: a user builder called as
  ``fn(num_classes=..., input_shape=..., **kwargs)`` (each of the first two only if the signature
  accepts it). It must be a Python function, or an ``nn.Module`` subclass, defined in a Python
  module: builtins (``os:system``), other classes and callable instances are refused before
  anything is called. Naming a builder runs code, as Hydra's ``_target_`` does: importing the
  module runs its top level, and the builder runs with the config's kwargs.

Every nonlinearity of the CNNs and the MLP is an ``nn.ReLU`` *module*, one per use, so forward
hooks can count dead units (``transformer1d`` uses GELU inside ``nn.TransformerEncoder``: its
dead-ReLU share is not measured).
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "MLP",
    "VGG",
    "CNN1d",
    "CNNDigits",
    "CifarResNet",
    "Transformer1d",
    "available_models",
    "build_model",
    "validate_model_name",
]


# --------------------------------------------------------------------------------------------
# Built-in architectures
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Fully connected network on the flattened input: Linear-ReLU per hidden size, then Linear."""

    def __init__(self, in_features: int, num_classes: int, hidden: list[int] | tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, int(h)), nn.ReLU()]
            prev = int(h)
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN1d(nn.Module):
    """Small 1-D CNN for MNIST-1D-like sequences (C, L); ``width`` scales every channel count.

    With ``batchnorm`` (the default, as in every model of the GraNet paper) each conv is
    bias-free and followed by a BatchNorm1d; without it the convs carry biases and nothing
    normalises. Sparse-from-scratch training at 95-98 % sparsity fails on the BN-free net (static,
    SET and RigL stay at chance on MNIST-1D) and works with BN.
    """

    def __init__(
        self,
        in_channels: int,
        length: int,
        num_classes: int,
        width: float = 1.0,
        batchnorm: bool = True,
    ):
        super().__init__()
        c1, c2, c3 = (max(1, round(c * width)) for c in (32, 32, 64))
        hidden = max(1, round(128 * width))

        def block(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
            conv = nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2, bias=not batchnorm)
            return [conv, nn.BatchNorm1d(c_out), nn.ReLU()] if batchnorm else [conv, nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, c1, 5),
            *block(c1, c2, 3),
            nn.MaxPool1d(2),
            *block(c2, c3, 3),
            nn.MaxPool1d(2),
        )
        out_len = length // 2 // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c3 * out_len, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNNDigits(nn.Module):
    """Small 2-D CNN for 8x8 images (sklearn digits): two conv blocks, one pool, two Linear."""

    def __init__(
        self, in_channels: int, height: int, width_px: int, num_classes: int, width: float = 1.0
    ):
        super().__init__()
        c1, c2 = (max(1, round(c * width)) for c in (16, 32))
        hidden = max(1, round(64 * width))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * (height // 2) * (width_px // 2), hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """CIFAR ResNet block: two 3x3 convs with BN; 1x1 conv + BN shortcut when the shape changes."""

    def __init__(self, f_in: int, f_out: int, downsample: bool):
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = nn.Conv2d(f_in, f_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(f_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(f_out, f_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(f_out)
        self.relu2 = nn.ReLU()
        if downsample or f_in != f_out:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(f_in, f_out, 1, stride=stride, bias=False), nn.BatchNorm2d(f_out)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs (He et al. 2016): 3 stages of ``n`` blocks, ``w``/2w/4w filters.

    The reference's ResNet-20 (GraNet ``CIFAR/models/cifar_resnet.py``, from open_lth): same
    layers, names (``conv``, ``blocks``, ``fc``) and initialisation.
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3, width: int = 16):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        blocks: list[nn.Module] = []
        current = width
        for stage, filters in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(BasicBlock(current, filters, downsample=stage > 0 and i == 0))
                current = filters
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(current, num_classes)
        # As the reference (GraNet's open_lth copy, initializers.kaiming_normal): Kaiming normal
        # with torch's defaults (fan_in, gain sqrt(2)) on every conv and the fc weight; biases
        # and BatchNorm keep torch's defaults.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn(self.conv(x)))
        out = self.pool(self.blocks(out))
        return self.fc(torch.flatten(out, 1))


# The reference's configurations (GraNet ``CIFAR/models/vgg.py``): no max-pool after the last
# block; the 2x2 map of a 32x32 input is average-pooled instead.
VGG_CFGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    19: [
        64, 64, "M",
        128, 128, "M",
        256, 256, 256, 256, "M",
        512, 512, 512, 512, "M",
        512, 512, 512, 512,
    ],
}


class VGG(nn.Module):
    """CIFAR VGG with BN as the reference builds it (GraNet ``CIFAR/models/vgg.py``).

    Bias-free 3x3 convs each followed by BN and ReLU, four max-pools, an average pool over the
    last feature map (2x2 for 32x32 inputs: the reference's ``AvgPool2d(2)``; adaptive, so other
    input sizes work too) and one Linear head. Initialisation as the reference's
    ``weights_init``: Kaiming normal (fan_out, ReLU) convs, N(0, 0.01) head weight, zero head bias.
    The reference returns log-softmax; this returns logits (the same loss under cross-entropy).
    """

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if depth not in VGG_CFGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CFGS)}, got {depth}")
        layers: list[nn.Module] = []
        prev = in_channels
        for v in VGG_CFGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [
                    nn.Conv2d(prev, int(v), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(v)),
                    nn.ReLU(),
                ]
                prev = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # = AvgPool2d(2) on the 2x2 map of a 32x32 input
        self.classifier = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.features(x))
        return self.classifier(torch.flatten(out, 1))


class Transformer1d(nn.Module):
    """A small transformer classifier for (C, L) sequences such as MNIST-1D's (1, 40).

    The signal is cut into ``patch``-step patches (zero-padded at the end), each embedded by a
    Linear, plus a learned position embedding; then a pre-norm ``nn.TransformerEncoder`` (so
    ``nn.MultiheadAttention``: its ``in_proj_weight`` and ``out_proj`` are masked like any
    Linear), a final LayerNorm, mean pooling over patches and a Linear head.
    """

    def __init__(
        self,
        in_channels: int,
        length: int,
        num_classes: int,
        *,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        patch: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"model.kwargs: dim={dim} must be a multiple of heads={heads}")
        self.patch = int(patch)
        self.n_patches = math.ceil(length / self.patch)
        self.pad = self.n_patches * self.patch - length
        self.embed = nn.Linear(in_channels * self.patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, self.n_patches, dim))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, max(1, round(dim * mlp_ratio)), dropout, activation="gelu",
            batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            x = nn.functional.pad(x, (0, self.pad))
        b, c, _ = x.shape
        tokens = x.reshape(b, c, self.n_patches, self.patch).permute(0, 2, 1, 3).flatten(2)
        h = self.encoder(self.embed(tokens) + self.pos)
        return self.head(self.norm(h).mean(1))


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

Builder = Callable[[int, tuple[int, ...], dict[str, Any]], nn.Module]


class _KwargError(ValueError):
    """A registry builder's own check of its kwargs or input shape (already names the field)."""


def _need_dims(name: str, input_shape: tuple[int, ...], ndim: int) -> None:
    if len(input_shape) != ndim:
        raise _KwargError(
            f"model.name='{name}' needs a {ndim}-d per-sample input shape, got {tuple(input_shape)}"
        )


def _mlp(num_classes: int, input_shape: tuple[int, ...], kw: dict[str, Any]) -> nn.Module:
    hidden = kw.pop("hidden", [256, 256])
    _no_extra("mlp", kw)
    return MLP(math.prod(input_shape), num_classes, list(hidden))


def _cnn1d(batchnorm: bool) -> Builder:
    name = "cnn1d" if batchnorm else "cnn1d_nobn"

    def build(num_classes: int, input_shape: tuple[int, ...], kw: dict[str, Any]) -> nn.Module:
        _need_dims(name, input_shape, 2)
        width = float(kw.pop("width", 1.0))
        _no_extra(name, kw)
        return CNN1d(input_shape[0], input_shape[1], num_classes, width=width,
                     batchnorm=batchnorm)

    return build


def _cnn_digits(num_classes: int, input_shape: tuple[int, ...], kw: dict[str, Any]) -> nn.Module:
    _need_dims("cnn_digits", input_shape, 3)
    width = float(kw.pop("width", 1.0))
    _no_extra("cnn_digits", kw)
    return CNNDigits(input_shape[0], input_shape[1], input_shape[2], num_classes, width=width)


def _resnet(depth: int) -> Builder:
    def build(num_classes: int, input_shape: tuple[int, ...], kw: dict[str, Any]) -> nn.Module:
        _need_dims(f"resnet{depth}", input_shape, 3)
        width = int(kw.pop("width", 16))
        _no_extra(f"resnet{depth}", kw)
        return CifarResNet(depth, num_classes, in_channels=input_shape[0], width=width)

    return build


def _vgg(depth: int) -> Builder:
    def build(num_classes: int, input_shape: tuple[int, ...], kw: dict[str, Any]) -> nn.Module:
        _need_dims(f"vgg{depth}", input_shape, 3)
        _no_extra(f"vgg{depth}", kw)
        return VGG(depth, num_classes, in_channels=input_shape[0])

    return build


def _transformer1d(num_classes: int, input_shape: tuple[int, ...], kw: dict[str, Any]) -> nn.Module:
    _need_dims("transformer1d", input_shape, 2)
    allowed = ("dim", "depth", "heads", "patch", "mlp_ratio", "dropout")
    extra = {k: v for k, v in kw.items() if k not in allowed}
    _no_extra("transformer1d", extra)
    ints = {k: int(kw[k]) for k in ("dim", "depth", "heads", "patch") if k in kw}
    floats = {k: float(kw[k]) for k in ("mlp_ratio", "dropout") if k in kw}
    return Transformer1d(input_shape[0], input_shape[1], num_classes, **ints, **floats)


def _no_extra(name: str, kw: dict[str, Any]) -> None:
    if kw:
        raise _KwargError(f"model.kwargs={kw!r}: not accepted by model.name='{name}'")


_REGISTRY: dict[str, Builder] = {
    "mlp": _mlp,
    "cnn1d": _cnn1d(batchnorm=True),
    "cnn1d_nobn": _cnn1d(batchnorm=False),
    "cnn_digits": _cnn_digits,
    "resnet20": _resnet(20),
    "resnet32": _resnet(32),
    "resnet56": _resnet(56),
    "vgg11": _vgg(11),
    "vgg16": _vgg(16),
    "vgg19": _vgg(19),
    "transformer1d": _transformer1d,
}

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


def available_models() -> list[str]:
    """Registry names accepted by :func:`build_model` (besides torchvision/import-path forms)."""
    return list(_REGISTRY)


def _allowed() -> str:
    return ", ".join(available_models()) + ", 'torchvision:<name>' or 'package.module:function'"


def _unknown(name: str, why: str = "unknown model") -> ValueError:
    return ValueError(f"model.name='{name}': {why}; allowed: {_allowed()}")


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def _check_torchvision(name: str, tv_name: str) -> None:
    names = _torchvision_names()
    if tv_name not in names:
        examples = ", ".join(
            n
            for n in (
                "resnet18",
                "resnet50",
                "vgg16_bn",
                "mobilenet_v2",
                "efficientnet_b0",
                "densenet121",
            )
            if n in names
        )
        raise ValueError(
            f"model.name='{name}': unknown torchvision classification model '{tv_name}'; "
            f"allowed: 'torchvision:<name>' with a name from torchvision.models.list_models("
            f"module=torchvision.models), e.g. {examples}"
        )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _resolve_import_path(name: str) -> Callable[..., Any]:
    """The builder named ``package.module:function``, checked to be a Python function or an
    ``nn.Module`` subclass defined in a Python module; never called here."""
    module_name, attr = name.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _unknown(name, f"cannot import module '{module_name}' ({exc})") from exc
    except Exception as exc:  # the module's own top level failed (SyntaxError, NameError...)
        raise _unknown(
            name, f"importing module '{module_name}' failed ({_one_line(exc)})"
        ) from exc
    if not hasattr(module, attr):
        raise _unknown(name, f"module '{module_name}' has no attribute '{attr}'")
    fn = getattr(module, attr)
    if not callable(fn):
        raise _unknown(name, f"'{attr}' in module '{module_name}' is not callable")
    # Only code written as a model builder: a Python function, or an nn.Module class. Builtins
    # (os.system, eval), other classes (subprocess.Popen) and callable instances are refused
    # before anything is called, whatever the kwargs.
    if inspect.isclass(fn):
        if not issubclass(fn, nn.Module):
            raise _unknown(
                name, f"'{attr}' is a class but not a torch.nn.Module subclass; a builder must "
                "be a Python function or an nn.Module class"
            )
    elif not inspect.isfunction(fn):
        kind = "a built-in" if inspect.isbuiltin(fn) else f"a {type(fn).__name__} object"
        raise _unknown(
            name, f"'{attr}' is {kind}, not a Python function or nn.Module class defined in a "
            "module"
        )
    source = inspect.getmodule(fn)
    file = getattr(source, "__file__", None) or ""
    if not file.endswith((".py", ".pyc")):
        raise _unknown(name, f"'{attr}' is not defined in a Python source module")
    return fn


def validate_model_name(name: str) -> None:
    """Check ``name`` without building: registry/torchvision names exist, import paths resolve.

    Raises ValueError naming the value and the allowed forms.
    """
    if not isinstance(name, str) or not name:
        raise _unknown(str(name), "empty or not a string")
    if name.lower() in _REGISTRY:
        return
    if name.startswith("torchvision:"):
        _check_torchvision(name, name.split(":", 1)[1])
        return
    if ":" in name:
        if not _IMPORT_PATH.match(name):
            raise _unknown(name, "malformed import path")
        _resolve_import_path(name)
        return
    raise _unknown(name)


def _call_user(
    fn: Callable[..., Any], num_classes: int, input_shape: tuple[int, ...], kwargs: dict[str, Any]
) -> Any:
    call_kw = dict(kwargs)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins etc.: pass everything
        params = None
    has_var_kw = params is None or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )
    if has_var_kw or "num_classes" in params:
        call_kw["num_classes"] = num_classes
    if has_var_kw or "input_shape" in params:
        call_kw["input_shape"] = input_shape
    if params is not None and not has_var_kw:
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise _KwargError(
                f"model.kwargs={kwargs!r}: {', '.join(unknown)} not accepted by the user model "
                f"builder; it takes {', '.join(params) or 'no arguments'}"
            )
    return fn(**call_kw)


def build_model(
    name: str, *, num_classes: int, input_shape: tuple[int, ...], kwargs: dict | None = None
) -> nn.Module:
    """Build the model ``name`` for ``num_classes`` outputs and per-sample ``input_shape``."""
    kw: dict[str, Any] = dict(kwargs or {})
    input_shape = tuple(int(d) for d in input_shape)
    validate_model_name(name)
    key = name.lower()
    given = dict(kw)
    try:
        if key in _REGISTRY:
            return _REGISTRY[key](num_classes, input_shape, kw)
        if name.startswith("torchvision:"):
            import torchvision.models as tvm

            tv = name.split(":", 1)[1]
            return tvm.get_model(tv, weights=None, num_classes=num_classes, **kw)
    except _KwargError:
        raise
    except Exception as exc:  # e.g. a kwarg of the wrong type: one line, naming the fields
        raise ValueError(
            f"model.name='{name}' with model.kwargs={given!r}: building the model failed "
            f"({_one_line(exc)})"
        ) from exc
    fn = _resolve_import_path(name)
    try:
        model = _call_user(fn, num_classes, input_shape, kw)
    except _KwargError:
        raise
    except Exception as exc:
        raise ValueError(
            f"model.name='{name}': the user builder raised {_one_line(exc)} "
            f"(model.kwargs={given!r})"
        ) from exc
    if not isinstance(model, nn.Module):
        raise _unknown(name, f"the builder returned {type(model).__name__}, not a torch.nn.Module")
    return model
