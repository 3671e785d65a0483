"""Forward FLOPs by weight parameter, counted at the dispatcher (works for functional calls).

:func:`count_forward_flops` runs the model once on a real batch under a ``TorchDispatchMode``
that counts every matmul / convolution / attention op with PyTorch's own formulas
(``torch.utils.flop_counter``, the ones ``FlopCounterMode`` uses, plus :data:`EXTRA_FORMULAS` for
ops it does not count), and attributes each op to the parameter among its operands (matched by
memory: ``weight.t()``, a chunk of ``in_proj_weight`` or a flattened RNN buffer still lie inside
the parameter's storage). Ops with no parameter operand (attention's QK^T and AV) are
"unattributed": they stay dense at any sparsity.

granet reports multiply-accumulates (MACs) per sample, as the RigL/GraNet accounting does:
``FlopCounterMode``'s count / 2 / batch size.

How the count is taken, and why:

* ``model.eval()`` (no BN statistics move, no dropout) with autograd *on*: in eval mode with
  autograd off, ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` take a fused "fast
  path" op that no formula counts.
* oneDNN (CPU) and cuDNN (CUDA) are off when the model has a recurrent module: their fused RNN ops
  are counted by no formula either; without them the RNN runs as the matmuls it is.
* The global RNG states are restored afterwards, so counting changes nothing in a run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

__all__ = ["FlopCount", "EXTRA_FORMULAS", "count_forward_flops"]

aten = torch.ops.aten


def _trilinear_flop(i1, i2, i3, expand1, expand2, expand3, sumdim, *args, out_val=None, **kw):
    """``aten._trilinear`` (``nn.Bilinear``): 2 x the size of the broadcast product, i.e. 2 x
    batch x out x in1 x in2 for a bilinear layer."""
    ndim = i1.dim() + len(expand1)
    sizes = [1] * ndim
    for t, exp in ((i1, expand1), (i2, expand2), (i3, expand3)):
        dims = [d for d in range(ndim) if d not in set(exp)]
        for d, s in zip(dims, t.shape, strict=True):
            sizes[d] = max(sizes[d], int(s))
    return 2 * math.prod(sizes)


def _cpu_sdpa_flop(*args, out_val=None, **kwargs) -> int:
    """The CPU SDPA kernel: the formula ``FlopCounterMode`` applies to the CUDA ones."""
    return flop_registry[aten._scaled_dot_product_flash_attention](*args, out_val=out_val, **kwargs)


# Both take the op's raw arguments (``_get_raw``), as FlopCounterMode's custom_mapping expects.
_trilinear_flop._get_raw = True  # type: ignore[attr-defined]
_cpu_sdpa_flop._get_raw = True  # type: ignore[attr-defined]

EXTRA_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    aten._trilinear: _trilinear_flop,
}
"""Formulas for ops ``FlopCounterMode`` does not count (CPU attention, ``nn.Bilinear``); pass
them as its ``custom_mapping`` to compare like with like."""

# Which positional arguments are the multiplied operands (a bias is not).
_OPERANDS: dict[Any, tuple[int, ...]] = {
    aten.mm: (1, 0),
    aten.bmm: (1, 0),
    aten._scaled_mm: (1, 0),
    aten.addmm: (2, 1),
    aten.baddbmm: (2, 1),
    aten.convolution: (1, 0),
    aten._convolution: (1, 0),
    aten.cudnn_convolution: (1, 0),
    aten.convolution_overrideable: (1, 0),
    aten._slow_conv2d_forward: (1, 0),
    aten._trilinear: (1, 0, 2),
}


@dataclass
class FlopCount:
    """Forward MACs per sample: ``by_param`` (id(param) -> MACs of the ops it is an operand of)
    and ``unattributed`` (ops with no parameter operand)."""

    by_param: dict[int, float] = field(default_factory=dict)
    unattributed: float = 0.0
    batch: int = 1

    @property
    def total(self) -> float:
        return self.unattributed + sum(self.by_param.values())


class _Spans:
    """Find the parameter whose memory holds a tensor's first element."""

    def __init__(self, params: Iterable[nn.Parameter], prefer: set[int]) -> None:
        self.spans = []
        for p in params:
            if p.numel() == 0 or p.layout != torch.strided:
                continue
            extent = sum((s - 1) * st for s, st in zip(p.shape, p.stride(), strict=True)) + 1
            start = p.data_ptr()
            self.spans.append((start, start + extent * p.element_size(), p.device, p))
        self.prefer = prefer

    def owners(self, tensors: list[torch.Tensor]) -> list[nn.Parameter]:
        found = []
        for t in tensors:
            try:
                ptr = t.data_ptr()
            except RuntimeError:  # no storage (e.g. a tensor subclass)
                continue
            for start, end, device, p in self.spans:
                if start <= ptr < end and t.device == device and all(p is not q for q in found):
                    found.append(p)
        found.sort(key=lambda p: id(p) not in self.prefer)  # masked weights first
        return found


class _Counter(TorchDispatchMode):
    def __init__(self, registry: dict[Any, Callable[..., int]], spans: _Spans) -> None:
        super().__init__()
        self.registry = registry
        self.spans = spans
        self.by_param: dict[int, int] = {}
        self.unattributed = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        # As FlopCounterMode does: an op without a formula is decomposed if it can be, so the
        # matmuls inside a composite op are seen.
        if func not in self.registry:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if packet in self.registry:
            flops = int(self.registry[packet](*args, **kwargs, out_val=out))
            positions = _OPERANDS.get(packet, tuple(range(len(args))))
            tensors = [args[i] for i in positions if i < len(args)]
            owners = self.spans.owners([t for t in tensors if isinstance(t, torch.Tensor)])
            if owners:
                key = id(owners[0])
                self.by_param[key] = self.by_param.get(key, 0) + flops
            else:
                self.unattributed += flops
        return out


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def _batch_size(example_input: Any) -> int:
    first = example_input[0] if isinstance(example_input, (tuple, list)) else example_input
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise ValueError("example_input: must be a batched tensor (or a tuple of them)")
    return int(first.shape[0])


def count_forward_flops(
    model: nn.Module,
    example_input: Any,
    *,
    prefer: Iterable[nn.Parameter] = (),
    extra_formulas: dict[Any, Callable[..., int]] | None = None,
) -> FlopCount:
    """Forward MACs per sample of ``model`` on ``example_input`` (a batch, or a tuple of
    positional inputs), attributed to parameters.

    ``prefer``: when an op has two parameter operands, it is attributed to one of these (the
    masked weights) first.
    """
    registry = {**flop_registry, **EXTRA_FORMULAS, **(extra_formulas or {})}
    batch = _batch_size(example_input)
    params = list({id(p): p for p in model.parameters()}.values())
    spans = _Spans(params, {id(p) for p in prefer})
    counter = _Counter(registry, spans)
    was_training = model.training
    has_rnn = any(isinstance(m, (nn.RNNBase, nn.RNNCellBase)) for m in model.modules())
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    model.eval()
    try:
        with ExitStack() as stack:
            if has_rnn:
                stack.enter_context(warnings.catch_warnings())
                # Setting the oneDNN flags prints a notice about TF32 on Intel GPUs.
                warnings.filterwarnings("ignore", message=".*TF32 acceleration on top of oneDNN")
                stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
                stack.enter_context(torch.backends.cudnn.flags(enabled=False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(counter)
            _call(model, example_input)
    finally:
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    scale = 2.0 * batch
    return FlopCount(
        by_param={k: v / scale for k, v in counter.by_param.items()},
        unattributed=counter.unattributed / scale,
        batch=batch,
    )
