"""Check a run's user code once, before any trial starts; print the weights the engine will mask.

:func:`check_user_code` builds the data (a user data function is called and validated; a
built-in data set is described without loading it), builds the model, runs one small batch
forward and backward, and builds the :class:`~granet.sparse.SparseEngine` (the prunable-weight
rule, include/exclude patterns, initial masks, FLOPs count). Any failure in user code is a
:class:`~granet.config.ConfigError` with one line naming the field to fix (``data.name``,
``model.name``, ``model.kwargs``, ``sparsity.*``). Everything runs on the CPU, in a forked RNG
state, and writes nothing.

:func:`layer_table` / :func:`format_layer_table` are ``granet layers``: one row per parameter
with its shape, whether it is masked (and why, or why not), its initial density and its forward
MACs per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from granet.config import Config, ConfigError
from granet.data import builtin_info, is_user_data, load_dataset
from granet.models import build_model
from granet.sparse.engine import SparseEngine

__all__ = ["check_user_code", "layer_table", "format_layer_table", "LayerRow"]

_PROBE_BATCH = 2  # samples run through the model: two, so BatchNorm in train mode works


@dataclass
class _Probe:
    input_shape: tuple[int, ...]
    num_classes: int
    n_train: int
    x: torch.Tensor
    y: torch.Tensor


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _probe_data(cfg: Config) -> _Probe:
    from granet.trainer import DATA_SPLIT_SEED

    d = cfg.data
    if not is_user_data(d.name):
        info = builtin_info(d.name, num_samples=d.num_samples, val_fraction=d.val_fraction)
        g = torch.Generator().manual_seed(0)
        x = torch.randn((_PROBE_BATCH, *info.input_shape), generator=g)
        y = torch.arange(_PROBE_BATCH) % info.num_classes
        return _Probe(info.input_shape, info.num_classes, info.n_train, x, y)
    try:
        data = load_dataset(
            d.name, data_dir=d.data_dir, download=d.download, val_fraction=d.val_fraction,
            seed=DATA_SPLIT_SEED, num_samples=d.num_samples, augment=d.augment,
        )
    except ConfigError:
        raise
    except Exception as exc:  # a bug in the user's data code
        raise ConfigError(f"data.name={d.name!r}: loading failed ({_first_line(exc)})") from exc
    n = min(_PROBE_BATCH, len(data.train))
    return _Probe(
        tuple(data.input_shape), data.num_classes, len(data.train), data.train.x[:n],
        data.train.y[:n],
    )


def _build(cfg: Config, probe: _Probe) -> nn.Module:
    m = cfg.model
    try:
        return build_model(
            m.name, num_classes=probe.num_classes, input_shape=probe.input_shape,
            kwargs=m.kwargs,
        )
    except ValueError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if msg.startswith(("model.", "data.")):
            raise ConfigError(msg) from exc
        field = "model.kwargs" if m.kwargs else "model.name"
        value = m.kwargs if m.kwargs else m.name
        raise ConfigError(
            f"{field}={value!r}: building model.name={m.name!r} failed ({_first_line(exc)})"
        ) from exc
    except TypeError as exc:
        if m.kwargs:
            raise ConfigError(
                f"model.kwargs={m.kwargs!r}: model.name={m.name!r} cannot be built with them "
                f"({_first_line(exc)})"
            ) from exc
        raise ConfigError(
            f"model.name={m.name!r}: building the model failed ({_first_line(exc)})"
        ) from exc
    except Exception as exc:
        raise ConfigError(
            f"model.name={m.name!r}: building the model failed ({_first_line(exc)})"
        ) from exc


def _run_batch(cfg: Config, model: nn.Module, probe: _Probe) -> None:
    name, where = cfg.model.name, f"a data.name={cfg.data.name!r} batch"
    shape = f"{tuple(probe.x.shape)} {str(probe.x.dtype).replace('torch.', '')}"
    model.train()
    try:
        out = model(probe.x)
    except Exception as exc:
        raise ConfigError(
            f"model.name={name!r}: the forward pass fails on {where} of shape {shape} "
            f"({_first_line(exc)})"
        ) from exc
    want = (len(probe.x), probe.num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"model.name={name!r}: returns {got} for {where} of shape {shape}; must return "
            f"logits of shape {want} (batch, num_classes={probe.num_classes})"
        )
    try:
        F.cross_entropy(out.float(), probe.y).backward()
    except Exception as exc:
        raise ConfigError(
            f"model.name={name!r}: the backward pass fails on {where} ({_first_line(exc)})"
        ) from exc
    model.zero_grad(set_to_none=True)


def _engine(cfg: Config, model: nn.Module, probe: _Probe, optimizer: Any) -> SparseEngine:
    bs = cfg.data.batch_size
    if probe.n_train < bs:
        raise ConfigError(
            f"data.batch_size={bs}: larger than the training set ({probe.n_train} samples)"
        )
    try:
        return SparseEngine(
            model, optimizer, cfg.sparsity, steps_per_epoch=probe.n_train // bs,
            epochs=cfg.run.epochs, seed=cfg.run.seed, batch_size=bs, example_input=probe.x,
        )
    except ConfigError:
        raise
    except ValueError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if msg.startswith("sparsity."):
            raise ConfigError(msg) from exc
        raise ConfigError(
            f"model.name={cfg.model.name!r}: the sparse engine cannot use it ({msg})"
        ) from exc


def _prepare(cfg: Config) -> tuple[nn.Module, SparseEngine]:
    from granet.trainer import build_optimizer

    probe = _probe_data(cfg)
    torch.manual_seed(cfg.run.seed)
    model = _build(cfg, probe)
    if not isinstance(model, nn.Module):  # build_model checks user builders; belt and braces
        raise ConfigError(f"model.name={cfg.model.name!r}: did not build an nn.Module")
    _run_batch(cfg, model, probe)
    optimizer = build_optimizer(cfg, model)
    return model, _engine(cfg, model, probe, optimizer)


def check_user_code(cfg: Config) -> None:
    """Build the data (or its description), the model and the sparse engine once, and run one
    batch forward and backward; raise :class:`ConfigError` naming the field on any failure.

    Runs on the CPU with the global RNG state restored afterwards; writes nothing.
    """
    with torch.random.fork_rng(devices=[]):
        _prepare(cfg)


@dataclass
class LayerRow:
    """One parameter in ``granet layers``."""

    name: str  # parameter name (tied: every name, joined by " = ")
    shape: tuple[int, ...]
    numel: int
    masked: bool
    density: float | None  # initial density (None: not masked, dense)
    macs: float | None  # forward MACs per sample of the ops it is an operand of
    why: str


def layer_table(cfg: Config) -> tuple[list[LayerRow], dict[str, float]]:
    """The engine's view of the model: a row per parameter, and totals."""
    with torch.random.fork_rng(devices=[]):
        _, engine = _prepare(cfg)
    density = dict(zip(
        (layer.param_name for layer in engine.layers), engine.layer_densities().values(),
        strict=True,
    ))
    count = engine.flop_count
    rows = []
    for info in engine.param_infos:
        macs = count.by_param.get(id(info.param)) if count is not None else None
        rows.append(LayerRow(
            " = ".join(info.aliases), tuple(info.param.shape), info.param.numel(),
            info.prunable, density.get(info.name), macs, info.reason,
        ))
    total = sum(r.numel for r in rows)
    summary = {
        "params": float(total),
        "masked_params": float(engine.total),
        "density": engine.density(),
        "density_all": engine.density_all(),
        "dense_macs": engine.dense_flops,
        "inference_macs": engine.inference_flops,
        "unattributed_macs": count.unattributed if count is not None else math.nan,
    }
    return rows, summary


def _num(v: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.4g}"


def format_layer_table(rows: list[LayerRow], summary: dict[str, float], cfg: Config) -> str:
    """``granet layers`` output: the table, then totals."""
    head = ("parameter", "shape", "numel", "masked", "init density", "MACs/sample", "why")
    body = [
        (
            r.name, "x".join(str(d) for d in r.shape) or "scalar", str(r.numel),
            "yes" if r.masked else "no", f"{r.density:.4f}" if r.density is not None else "-",
            _num(r.macs) if r.macs else "-", r.why,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head) - 1)]

    def line(cells: tuple[str, ...]) -> str:
        parts = [c.ljust(w) if i in (0, 1, 3) else c.rjust(w)
                 for i, (c, w) in enumerate(zip(cells, widths, strict=False))]
        return "  ".join([*parts, cells[-1]]).rstrip()

    s = cfg.sparsity
    out = [line(head), line(tuple("-" * w for w in widths) + ("---",))]
    out += [line(row) for row in body]
    n_masked = sum(r.masked for r in rows)
    out += [
        "",
        f"model.name={cfg.model.name!r} on data.name={cfg.data.name!r}; sparsity.method="
        f"{s.method!r}, distribution={s.distribution!r}, final_density={s.final_density}",
        f"masked: {n_masked} of {len(rows)} parameters, {int(summary['masked_params'])} of "
        f"{int(summary['params'])} weights ({summary['masked_params'] / summary['params']:.1%})",
        f"initial density: {summary['density']:.4f} of the masked weights, "
        f"{summary['density_all']:.4f} of all",
        f"forward MACs/sample: {_num(summary['dense_macs'])} dense, "
        f"{_num(summary['inference_macs'])} at the initial masks; "
        f"{_num(summary['unattributed_macs'])} in ops without a weight (e.g. attention scores), "
        f"always dense",
    ]
    return "\n".join(out)
