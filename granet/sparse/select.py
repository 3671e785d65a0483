"""Which weights are sparse: the prunable-weight rule, include/exclude patterns, dense layers.

The rule, by default: every parameter that a module uses as the weight of a matrix multiply or a
convolution is masked:

* ``weight`` of every convolution (``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d``, grouped and
  depthwise included), ``Linear`` (and its subclasses, e.g. attention's ``out_proj``) and
  ``Bilinear``;
* ``nn.MultiheadAttention``'s ``in_proj_weight`` (the stacked Q/K/V projection, one ``[3E, E]``
  matrix), or ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` when key/value dims differ;
* recurrent ``weight_ih_l*`` / ``weight_hh_l*`` (and ``weight_hr_l*``, LSTM projections) of
  ``RNN`` / ``LSTM`` / ``GRU`` and the ``*Cell`` variants.

Never by default: biases, normalisation parameters, embeddings, and any other parameter (positional
embeddings, class tokens, a custom module's raw parameters). ``sparsity.include`` adds parameters
by name pattern, ``sparsity.exclude`` removes them (exclude wins), ``sparsity.dense_layers`` keeps
named layers dense. A pattern is a glob (``fnmatch``, e.g. ``*.self_attn.in_proj_weight``) or,
written ``re:<regex>``, a regular expression; either must match the *whole* parameter name. A
parameter shared by several modules (tied weights) is one layer with one mask; a pattern matches
it under any of its names.

A layer's name is its parameter name without a trailing ``.weight`` (``features.0``,
``enc.layers.0.self_attn.out_proj``, ``lstm.weight_ih_l0``): for Conv/Linear that is the module
name, as before.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from granet.config import ConfigError

__all__ = [
    "ParamInfo",
    "classify_parameters",
    "layer_name",
    "match_pattern",
    "matmul_weight_names",
]

_RNN_WEIGHT = re.compile(r"^weight_(ih|hh|hr)(_l\d+(_reverse)?)?$")
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_NORMS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


@dataclass
class ParamInfo:
    """One parameter of the model and what the rule decided for it."""

    name: str  # first name in ``named_parameters()``
    aliases: tuple[str, ...]  # every name it has (tied parameters have several)
    param: nn.Parameter
    module: nn.Module  # the module owning ``name``
    module_name: str
    kind: str  # matmul | embedding | norm | bias | other
    role: str  # e.g. "Linear.weight", "MultiheadAttention.in_proj_weight", "LayerNorm"
    prunable: bool = False
    reason: str = ""  # why it is (not) masked, for ``granet layers``
    extra: dict = field(default_factory=dict)

    @property
    def layer_name(self) -> str:
        return layer_name(self.name)


def layer_name(param_name: str) -> str:
    """The engine's layer name: the parameter name without a trailing ``.weight``."""
    if param_name == "weight":
        return ""
    return param_name[: -len(".weight")] if param_name.endswith(".weight") else param_name


def _kind(module: nn.Module, attr: str) -> tuple[str, str]:
    """(kind, role) of parameter ``attr`` directly owned by ``module``."""
    cls = type(module).__name__
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        cls = "Linear"  # attention's out_proj
    if isinstance(module, nn.MultiheadAttention) and attr in _MHA_WEIGHTS:
        return "matmul", f"MultiheadAttention.{attr}"
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)) and _RNN_WEIGHT.match(attr):
        return "matmul", f"{cls}.{attr.split('_l')[0]}"
    if attr == "weight" and isinstance(
        module, (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)
    ):
        return "matmul", f"{cls}.weight"
    if "bias" in attr:
        return "bias", f"{cls}.{attr}"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding", f"{cls}.{attr}"
    if isinstance(module, _NORMS):
        return "norm", f"{cls}.{attr}"
    return "other", f"{cls}.{attr}"


_KIND_ORDER = {"matmul": 0, "embedding": 1, "norm": 2, "bias": 3, "other": 4}
_NOT_MASKED = {
    "embedding": "embedding (add to sparsity.include to mask)",
    "norm": "normalisation",
    "bias": "bias",
    "other": "not a matmul/conv weight of a known layer type",
}


def match_pattern(pattern: str, name: str) -> bool:
    """Whether ``pattern`` (glob, or ``re:<regex>``) matches the whole of ``name``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _parameters(model: nn.Module) -> list[ParamInfo]:
    """Every distinct parameter, in ``named_parameters()`` order, with all its names."""
    infos: dict[int, ParamInfo] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            if p is None:
                continue
            full = f"{mod_name}.{attr}" if mod_name else attr
            kind, role = _kind(module, attr)
            info = infos.get(id(p))
            if info is None:
                infos[id(p)] = ParamInfo(full, (full,), p, module, mod_name, kind, role)
                continue
            if full not in info.aliases:
                info.aliases = (*info.aliases, full)
            if _KIND_ORDER[kind] < _KIND_ORDER[info.kind]:  # a tied weight used by a Linear
                info.kind, info.role = kind, role
    order = [id(p) for _, p in model.named_parameters()]
    return [infos[i] for i in order]


def _validate_patterns(field_name: str, patterns: Sequence[str], infos: list[ParamInfo]) -> None:
    for pat in patterns:
        if not any(match_pattern(pat, a) for info in infos for a in info.aliases):
            shown = ", ".join(info.name for info in infos[:6]) + (", ..." if len(infos) > 6 else "")
            raise ConfigError(
                f"{field_name}={pat!r}: must match at least one parameter name of the model "
                f"(glob, or 're:<regex>', matching the whole name); names are like {shown} "
                f"(see `granet layers`)"
            )


def classify_parameters(
    model: nn.Module,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dense_layers: Sequence[str] = (),
) -> list[ParamInfo]:
    """Every distinct parameter of ``model`` with the rule's decision (``prunable``, ``reason``).

    Raises :class:`ConfigError` for a pattern that matches no parameter, a ``dense_layers`` entry
    that names no prunable layer, or when nothing is left to sparsify.
    """
    infos = _parameters(model)
    _validate_patterns("sparsity.include", include, infos)
    _validate_patterns("sparsity.exclude", exclude, infos)
    for info in infos:
        inc = next((p for p in include if any(match_pattern(p, a) for a in info.aliases)), None)
        exc = next((p for p in exclude if any(match_pattern(p, a) for a in info.aliases)), None)
        if exc is not None:
            info.prunable, info.reason = False, f"excluded by sparsity.exclude {exc!r}"
        elif inc is not None:
            if info.param.dim() == 0:
                raise ConfigError(
                    f"sparsity.include={inc!r}: matches {info.name!r}, a scalar; must match "
                    f"tensors with at least one dimension"
                )
            info.prunable, info.reason = True, f"included by sparsity.include {inc!r}"
        elif info.kind == "matmul":
            info.prunable, info.reason = True, info.role
        else:
            info.prunable, info.reason = False, _NOT_MASKED[info.kind]
    prunable = [info for info in infos if info.prunable]
    if not prunable:
        raise ConfigError(
            "model: has no weight to sparsify (no Conv/Linear/attention/recurrent weight, and "
            "none added by sparsity.include)"
        )
    names = [info.layer_name for info in prunable]
    dense: set[int] = set()
    for entry in dense_layers:
        if entry == "first":
            dense.add(0)
        elif entry == "last":
            dense.add(len(prunable) - 1)
        else:
            hit = [
                i for i, info in enumerate(prunable)
                if entry == info.layer_name or entry in info.aliases
                or entry in {layer_name(a) for a in info.aliases}
            ]
            if not hit:
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise ConfigError(
                    f"sparsity.dense_layers: {entry!r} is not a prunable layer of the model; "
                    f"allowed: first, last, or an exact layer name ({shown})"
                )
            dense.update(hit)
    for i in dense:
        prunable[i].prunable = False
        prunable[i].reason = "kept dense by sparsity.dense_layers"
    if len(dense) == len(prunable):
        raise ConfigError(
            "sparsity.dense_layers: excludes every prunable layer; nothing to sparsify"
        )
    return infos


def matmul_weight_names(model: nn.Module) -> list[str]:
    """Names of the parameters the default rule masks (before include/exclude/dense_layers)."""
    return [info.name for info in _parameters(model) if info.kind == "matmul"]
