"""User data sets: ``data.name = 'package.module:function'`` - resolving the function, checking
what it returns and building the :class:`~granet.data.Dataset` (see :mod:`granet.data`)."""

from __future__ import annotations

import importlib
import inspect
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from granet.data.builtin import SUBSET_SEED
from granet.data.splits import Dataset, Split, StreamedSplit, validation_carve
from granet.errors import ConfigError

__all__ = ["IN_MEMORY_MAX_BYTES", "is_user_data"]

IN_MEMORY_MAX_BYTES = 1 << 30  # user Datasets up to this size (estimated) are held in memory

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
_USER_KEYS = ("train", "val", "test", "num_classes", "stream", "num_workers")
_CHECK_ITEMS = 8  # Dataset items inspected per split (the first ones and the last)


def is_user_data(name: str) -> bool:
    """Whether ``name`` names a user data function (``package.module:function``)."""
    return isinstance(name, str) and ":" in name


def _user_error(name: str, what: str) -> Exception:
    return ConfigError(f"data.name={name!r}: {what}")


def _resolve_data_fn(name: str) -> Any:
    if not _IMPORT_PATH.match(name):
        raise _user_error(name, "malformed import path; must be 'package.module:function'")
    module_name, attr = name.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise _user_error(name, f"cannot import module {module_name!r} ({exc})") from exc
    fn = getattr(module, attr, None)
    if fn is None:
        raise _user_error(name, f"module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise _user_error(name, f"{attr!r} in module {module_name!r} is not callable")
    return fn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _x_dtype(name: str, where: str, dtype: torch.dtype) -> torch.dtype:
    if dtype.is_floating_point:
        return torch.float32
    if dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        return torch.int64
    raise _user_error(
        name, f"{where} has dtype {dtype}; must be floating (inputs) or integer (token ids)"
    )


def _label(name: str, where: str, y: Any) -> int:
    if isinstance(y, Tensor):
        if y.numel() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or (
            y.dtype == torch.bool
        ):
            raise _user_error(
                name, f"{where} label is a {y.dtype} tensor of shape {tuple(y.shape)}; "
                f"must be one integer class label"
            )
        return int(y)
    if isinstance(y, (bool, np.bool_)) or not isinstance(y, (int, np.integer)):
        raise _user_error(
            name, f"{where} label is {type(y).__name__} {y!r}; must be an integer class label"
        )
    return int(y)


def _tensor_split(name: str, key: str, pair: Any) -> Split:
    try:
        x, y = (torch.as_tensor(v) for v in pair)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise _user_error(
            name, f"split {key!r}: x and y must be tensors or numpy arrays ({_first_line(exc)})"
        ) from exc
    if x.dim() < 1 or y.dim() != 1:
        raise _user_error(
            name, f"split {key!r}: x has shape {tuple(x.shape)} and y {tuple(y.shape)}; must be "
            f"x (N, ...) and y (N,)"
        )
    if len(x) != len(y):
        raise _user_error(name, f"split {key!r}: x has {len(x)} samples but y has {len(y)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise _user_error(name, f"split {key!r}: y has dtype {y.dtype}; must be integer labels")
    x = x.to(_x_dtype(name, f"split {key!r}: x", x.dtype))
    return Split(x.contiguous(), y.to(torch.int64).contiguous())


def _dataset_split(
    name: str, key: str, ds: Any, stream: bool | None, num_workers: int
) -> Split | StreamedSplit:
    n = len(ds)
    picks = sorted({*range(min(n, _CHECK_ITEMS)), n - 1}) if n else []
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    labels = []
    for i in picks:
        try:
            item = ds[i]
        except Exception as exc:
            raise _user_error(
                name, f"split {key!r}: item {i} raised {_first_line(exc)}"
            ) from exc
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise _user_error(
                name, f"split {key!r}: item {i} is {type(item).__name__}; must be an (x, y) pair"
            )
        x = torch.as_tensor(item[0])
        where = f"split {key!r}: item {i}"
        if shape is None:
            shape, dtype = tuple(x.shape), _x_dtype(name, f"{where} x", x.dtype)
        elif tuple(x.shape) != shape:
            raise _user_error(
                name, f"{where} x has shape {tuple(x.shape)}, item {picks[0]} {shape}; "
                f"every sample must have one shape"
            )
        labels.append(_label(name, where, item[1]))
    if shape is None:  # empty split
        return StreamedSplit(ds, (), torch.float32, num_workers=num_workers)
    assert dtype is not None
    bytes_per = math.prod(shape) * (4 if dtype == torch.float32 else 8)
    if stream or (stream is None and bytes_per * n > IN_MEMORY_MAX_BYTES):
        split = StreamedSplit(ds, shape, dtype, num_workers=num_workers)
        split.checked_labels = labels  # type: ignore[attr-defined]
        return split
    streamed = StreamedSplit(ds, shape, dtype, num_workers=num_workers)
    xs, ys = [], []
    batch = 512
    try:
        for xb, yb in streamed.loader(
            [list(range(a, min(a + batch, n))) for a in range(0, n, batch)]
        ):
            xs.append(xb)
            ys.append(yb)
    except Exception as exc:
        raise _user_error(
            name, f"split {key!r}: reading the Dataset failed ({_first_line(exc)}); every item "
            f"must be an (x, y) pair with x of shape {shape} and an integer y"
        ) from exc
    return Split(torch.cat(xs), torch.cat(ys))


def _user_split(
    name: str, key: str, obj: Any, stream: bool | None, num_workers: int
) -> Split | StreamedSplit:
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return _tensor_split(name, key, obj)
    if hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        return _dataset_split(name, key, obj, stream, num_workers)
    raise _user_error(
        name, f"split {key!r} is {type(obj).__name__}; must be an (x, y) pair of tensors or "
        f"arrays, or a torch.utils.data.Dataset of (x, y) items"
    )


def _sample_shape(split: Split | StreamedSplit) -> tuple[int, ...]:
    return split.sample_shape if isinstance(split, StreamedSplit) else tuple(split.x.shape[1:])


def _x_kind(split: Split | StreamedSplit) -> torch.dtype:
    return split.x_dtype if isinstance(split, StreamedSplit) else split.x.dtype


def _select(split: Split | StreamedSplit, idx: Tensor) -> Split | StreamedSplit:
    if isinstance(split, StreamedSplit):
        from torch.utils.data import Subset

        return StreamedSplit(
            Subset(split.dataset, idx.tolist()), split.sample_shape, split.x_dtype,
            num_workers=split.num_workers,
        )
    return Split(split.x[idx], split.y[idx])


def _load_user(
    name: str, *, data_dir: str, val_fraction: float, seed: int, num_samples: int | None
) -> Dataset:
    fn = _resolve_data_fn(name)
    try:
        params = inspect.signature(fn).parameters
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        accepts = {k for k in ("data_dir", "num_samples") if var_kw or k in params}
    except (TypeError, ValueError):
        accepts = set()
    kw: dict[str, Any] = {}
    if "data_dir" in accepts:
        kw["data_dir"] = data_dir
    if "num_samples" in accepts and num_samples is not None:
        kw["num_samples"] = int(num_samples)
    try:
        out = fn(**kw)
    except Exception as exc:
        raise _user_error(name, f"the data function raised {_first_line(exc)}") from exc
    if not isinstance(out, Mapping):
        raise _user_error(
            name, f"the data function returned {type(out).__name__}; must return a dict with "
            f"'train' and 'test' (optional: {', '.join(_USER_KEYS[2:])}, 'val')"
        )
    unknown = sorted(set(out) - set(_USER_KEYS))
    missing = [k for k in ("train", "test") if k not in out]
    if unknown or missing:
        what = f"unknown keys {unknown}" if unknown else f"missing {missing}"
        raise _user_error(
            name, f"the returned dict has {what}; allowed keys: {', '.join(_USER_KEYS)}"
        )
    stream = out.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _user_error(name, f"'stream'={stream!r}: must be true, false or None")
    num_workers = out.get("num_workers", 0)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise _user_error(name, f"'num_workers'={num_workers!r}: must be an integer >= 0")
    splits = {
        k: _user_split(name, k, out[k], stream, num_workers)
        for k in ("train", "val", "test") if k in out
    }
    for k in ("train", "test"):
        if len(splits[k]) == 0:
            raise _user_error(name, f"split {k!r} is empty; must hold at least one sample")
    nonempty = {k: v for k, v in splits.items() if len(v)}
    shapes = {k: _sample_shape(v) for k, v in nonempty.items()}
    kinds = {k: _x_kind(v) for k, v in nonempty.items()}
    if len(set(shapes.values())) > 1 or len(set(kinds.values())) > 1:
        desc = ", ".join(f"{k}: {shapes[k]} {kinds[k]}" for k in nonempty)
        raise _user_error(name, f"splits differ in sample shape or dtype ({desc}); must agree")

    labels: dict[str, list[int] | Tensor] = {}
    for k, v in nonempty.items():
        labels[k] = getattr(v, "checked_labels", []) if isinstance(v, StreamedSplit) else v.y
    num_classes = out.get("num_classes")
    if num_classes is None:
        if any(isinstance(v, StreamedSplit) for v in nonempty.values()):
            raise _user_error(
                name, "a split is streamed; the returned dict must give 'num_classes'"
            )
        num_classes = 1 + max(int(torch.as_tensor(y).max()) for y in labels.values())
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise _user_error(name, f"'num_classes'={num_classes!r}: must be an integer >= 2")
    for k, y in labels.items():
        y = torch.as_tensor(y, dtype=torch.int64)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise _user_error(
                name, f"split {k!r} has labels in [{int(y.min())}, {int(y.max())}]; must lie in "
                f"[0, num_classes={num_classes})"
            )

    train = splits["train"]
    if num_samples is not None and "num_samples" not in kw and num_samples < len(train):
        g = torch.Generator().manual_seed(SUBSET_SEED)
        keep = torch.randperm(len(train), generator=g)[: int(num_samples)].sort().values
        train = _select(train, keep)
    if "val" in splits:
        val = splits["val"]
    else:
        val_idx, train_idx = validation_carve(len(train), val_fraction, seed)
        val = _select(train, val_idx)
        train = _select(train, train_idx)
    if isinstance(val, StreamedSplit) and not val.sample_shape:  # an empty user Dataset
        val = Split(
            torch.zeros((0, *shapes["train"]), dtype=kinds["train"]),
            torch.zeros(0, dtype=torch.int64),
        )
    return Dataset(
        name=name,
        train=train,
        val=val,
        test=splits["test"],
        num_classes=int(num_classes),
        input_shape=shapes["train"],
        augment=None,
    )
