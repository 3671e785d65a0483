"""Data registry: whole data sets as in-memory tensors, batching and batched CIFAR augmentation.

``load_dataset(name, ...)`` returns a :class:`Dataset` with train/val/test :class:`Split` s
(float32 inputs ``(N, *input_shape)``, int64 labels ``(N,)``). The validation split is always
carved from the *training* data with a permutation seeded by ``seed``; the test split never
depends on ``seed``.

Data sets (:func:`available_datasets`):

* ``mnist1d``: generated offline by the ``mnist1d`` package with its default arguments and its
  default generator seed ``MNIST1D_SEED`` (42), so every run sees the same data; 5000 samples,
  80/20 train/test (4000/1000), input (1, 40), values as produced (standardized by the package).
  ``num_samples`` overrides the total number generated. Nothing is downloaded or cached on disk.
* ``digits``: scikit-learn's bundled 8x8 digits, pixel/16, input (1, 8, 8), fixed seeded 80/20
  train/test split (seed ``DIGITS_SPLIT_SEED``).
* ``cifar10`` / ``cifar100``: torchvision files under ``data_dir``; normalized with the data set's
  channel mean/std; ``augment="cifar"`` (random crop, 4-pixel zero padding, horizontal flip).
* ``fake``: seeded Gaussian inputs (3, 32, 32) with random labels over 10 classes; ``num_samples``
  training samples (default 256) and ``num_samples // 4`` test samples (default 64).

For ``digits``/``cifar*``, ``num_samples`` (when given) keeps a fixed seeded subset of that many
training samples before the validation split, for quick runs.

User data sets: ``data.name: package.module:function``. The function is called with
``data_dir=`` and ``num_samples=`` if its signature takes them, and returns a dict::

    {"train": (x, y), "test": (x, y),   # required
     "val": (x, y),                     # optional: else data.val_fraction of train, seeded
     "num_classes": 10,                 # optional for tensors (max label + 1), required if streamed
     "stream": None,                    # Datasets: None = by size, True = stream, False = memory
     "num_workers": 0}                  # DataLoader workers for streamed splits

Each split is an ``(x, y)`` pair of tensors or numpy arrays, or a ``torch.utils.data.Dataset``
whose items are ``(x, y)`` pairs. ``x``: one shape per sample across all splits; floating
(converted to float32) or integer (kept as int64: token ids for an ``nn.Embedding``); ``y``:
integer class labels in ``[0, num_classes)``. Everything is checked when loading and a problem
raises :class:`~granet.config.ConfigError` naming ``data.name``. Tensors, and Datasets up to
:data:`IN_MEMORY_MAX_BYTES`, are held in memory (moved to the GPU with the rest); larger Datasets
are streamed through a ``DataLoader`` (:class:`StreamedSplit`) in the same seeded per-epoch order
:func:`iterate_batches` gives in memory, so a run resumes identically either way. A streamed
Dataset's labels are checked on a sample of items, and randomness inside its ``__getitem__`` is
not seeded by granet. If the function does not take ``num_samples``, a fixed seeded subset of
``num_samples`` training samples is kept, as for digits.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import os
import random
import re
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from granet.errors import ConfigError

__all__ = [
    "DIGITS_SPLIT_SEED",
    "IN_MEMORY_MAX_BYTES",
    "MNIST1D_SEED",
    "BuiltinInfo",
    "Dataset",
    "Split",
    "StreamedSplit",
    "augment_cifar",
    "available_datasets",
    "builtin_info",
    "is_user_data",
    "iterate_batches",
    "load_dataset",
    "validate_data_name",
]

MNIST1D_SEED = 42  # the mnist1d package default: all runs share one generated data set
DIGITS_SPLIT_SEED = 0  # fixed train/test split of sklearn digits
FAKE_SEED = 0  # fixed content of the fake data set
SUBSET_SEED = 0  # fixed subset when num_samples shrinks digits/cifar training sets
AUGMENTATIONS = ("cifar",)
# How long data.download=true waits to reach the download host before saying it cannot.
DOWNLOAD_PROBE_TIMEOUT_S = 10.0
IN_MEMORY_MAX_BYTES = 1 << 30  # user Datasets up to this size (estimated) are held in memory

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class Split:
    """One split: inputs ``x`` (float32, ``(N, *input_shape)``), labels ``y`` (int64, ``(N,)``)."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def to(self, device: torch.device | str) -> Split:
        """Return a copy of this split on ``device``."""
        return Split(self.x.to(device), self.y.to(device))


@dataclass
class Dataset:
    """A whole data set in memory, with its metadata."""

    name: str
    train: Split | StreamedSplit
    val: Split | StreamedSplit
    test: Split | StreamedSplit
    num_classes: int
    input_shape: tuple[int, ...]
    augment: str | None  # None or "cifar"

    def to(self, device: torch.device | str) -> Dataset:
        """Return a new Dataset with every tensor moved to ``device``."""
        return Dataset(
            name=self.name,
            train=self.train.to(device),
            val=self.val.to(device),
            test=self.test.to(device),
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            augment=self.augment,
        )


class _Collate:
    """Stack ``(x, y)`` items into a batch: x in the split's dtype, y int64 (picklable, so
    DataLoader workers can use it)."""

    def __init__(self, x_dtype: torch.dtype) -> None:
        self.x_dtype = x_dtype

    def __call__(self, items: list[Any]) -> tuple[Tensor, Tensor]:
        xs = torch.stack([torch.as_tensor(item[0]) for item in items]).to(self.x_dtype)
        ys = torch.tensor([int(item[1]) for item in items], dtype=torch.int64)
        return xs, ys


class StreamedSplit:
    """A split read batch by batch from a ``torch.utils.data.Dataset`` through a DataLoader.

    Stands in for :class:`Split` where the trainer uses one: ``len(split)``, ``len(split.y)``,
    ``split.x[:k]`` (the first k inputs, loaded, on the split's device), ``split.to(device)``
    (batches are moved there as they are read) and :func:`iterate_batches`.
    """

    def __init__(
        self,
        dataset: Any,
        sample_shape: tuple[int, ...],
        x_dtype: torch.dtype,
        *,
        device: torch.device | str = "cpu",
        num_workers: int = 0,
    ) -> None:
        self.dataset = dataset
        self.sample_shape = tuple(sample_shape)
        self.x_dtype = x_dtype
        self.device = torch.device(device)
        self.num_workers = int(num_workers)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def x(self) -> _StreamedColumn:
        return _StreamedColumn(self, 0)

    @property
    def y(self) -> _StreamedColumn:
        return _StreamedColumn(self, 1)

    def to(self, device: torch.device | str) -> StreamedSplit:
        """Return a copy whose batches are moved to ``device``."""
        return StreamedSplit(
            self.dataset, self.sample_shape, self.x_dtype, device=device,
            num_workers=self.num_workers,
        )

    def loader(self, batches: list[list[int]]) -> Any:
        """A DataLoader yielding the given index batches, in order, on the CPU."""
        from torch.utils.data import DataLoader

        return DataLoader(
            self.dataset, batch_sampler=batches, num_workers=self.num_workers,
            collate_fn=_Collate(self.x_dtype), pin_memory=self.device.type == "cuda",
        )

    def take(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """The samples at ``indices`` as one batch on the split's device."""
        if not indices:
            x = torch.zeros((0, *self.sample_shape), dtype=self.x_dtype)
            return x.to(self.device), torch.zeros(0, dtype=torch.int64, device=self.device)
        xb, yb = _Collate(self.x_dtype)([self.dataset[i] for i in indices])
        return xb.to(self.device), yb.to(self.device)


class _StreamedColumn:
    """``split.x`` / ``split.y`` of a :class:`StreamedSplit`: length, shape, and slicing that
    loads the selected samples."""

    def __init__(self, split: StreamedSplit, column: int) -> None:
        self.split, self.column = split, column

    def __len__(self) -> int:
        return len(self.split)

    @property
    def shape(self) -> tuple[int, ...]:
        n = len(self.split)
        return (n, *self.split.sample_shape) if self.column == 0 else (n,)

    @property
    def device(self) -> torch.device:
        return self.split.device

    @property
    def dtype(self) -> torch.dtype:
        return self.split.x_dtype if self.column == 0 else torch.int64

    def __getitem__(self, index: slice) -> Tensor:
        if not isinstance(index, slice):
            raise TypeError("a streamed split's x / y can only be sliced (x[a:b])")
        return self.split.take(list(range(len(self.split))[index]))[self.column]


# --------------------------------------------------------------------------------------------
# Loaders: each returns (train_x, train_y, test_x, test_y, num_classes, augment_kind)
# --------------------------------------------------------------------------------------------

_Raw = tuple[Tensor, Tensor, Tensor, Tensor, int, "str | None"]


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int | None) -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = MNIST1D_SEED
    if num_samples is not None:
        args.num_samples = int(num_samples)
    # make_dataset seeds the global numpy/python RNGs; restore them so callers are unaffected.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


def _load_mnist1d(num_samples: int | None) -> _Raw:
    x, y, xt, yt = _mnist1d_arrays(num_samples)

    def xs(a: np.ndarray) -> Tensor:
        return torch.tensor(a, dtype=torch.float32).unsqueeze(1)

    def ys(a: np.ndarray) -> Tensor:
        return torch.tensor(a, dtype=torch.int64)

    return xs(x), ys(y), xs(xt), ys(yt), 10, None


def _load_digits() -> _Raw:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    n_test = round(0.2 * len(y))
    test_idx, train_idx = perm[:n_test].sort().values, perm[n_test:].sort().values
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx], 10, None


def _unreachable(url: str, timeout: float) -> str | None:
    """Why ``url``'s host cannot be reached within ``timeout`` seconds, or None if it can.

    The probe runs in a daemon thread, so a hanging name lookup (which ignores socket timeouts)
    is bounded too.
    """
    from urllib.parse import urlparse

    u = urlparse(url)
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    why: list[str] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except Exception as exc:  # OSError mostly; nothing may escape the thread unreported
            why.append(str(exc) or type(exc).__name__)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    if t.is_alive():
        return f"no answer within {timeout:g} s"
    return why[0] if why else None


def _check_data_dir_writable(root: Path) -> None:
    """data.data_dir (or its first existing parent) must be a writable directory to download."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise FileNotFoundError(
            f"data.data_dir={str(root)!r}: {str(probe)!r} is a file, not a directory; point "
            f"data.data_dir at a directory"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FileNotFoundError(
            f"data.data_dir={str(root)!r}: {str(probe)!r} is not writable; the download needs a "
            f"writable data.data_dir"
        )


def _download_cifar(cls: type, name: str, root: Path) -> None:
    """Download with torchvision, with every failure named: where, why, and what to do."""
    _check_data_dir_writable(root)
    place = (
        f"place the extracted torchvision files ('{cls.base_folder}/') under data.data_dir, or "
        f"download once where the network is reachable"
    )
    why = _unreachable(cls.url, DOWNLOAD_PROBE_TIMEOUT_S)
    if why is not None:
        raise FileNotFoundError(
            f"{name} not found under data.data_dir={str(root)!r}, and data.download=true cannot "
            f"reach {cls.url} ({why}); the download needs a network: {place}"
        )
    try:
        for train in (True, False):
            cls(root=str(root), train=train, download=True)
    except (OSError, RuntimeError) as exc:  # URLError, a refused write, a checksum mismatch
        raise FileNotFoundError(
            f"{name}: downloading {cls.url} into data.data_dir={str(root)!r} failed "
            f"({type(exc).__name__}: {exc}); {place}"
        ) from exc


def _load_cifar(name: str, data_dir: str, download: bool, augment: bool) -> _Raw:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    num_classes = 10 if name == "cifar10" else 100
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CIFAR_STATS[name])
    root = Path(data_dir)
    out: list[Tensor] = []
    for train in (True, False):
        try:
            ds = cls(root=data_dir, train=train, download=False)
        except RuntimeError as exc:  # absent, or failing its checksum
            if not download:
                raise FileNotFoundError(
                    f"{name} not found under data.data_dir={str(root)!r}; "
                    f"set data.download=true to download it, or place the extracted torchvision "
                    f"files ('{cls.base_folder}/') there"
                ) from exc
            _download_cifar(cls, name, root)
            ds = cls(root=data_dir, train=train, download=False)
        x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).float().div_(255.0)
        out += [((x - mean) / std).contiguous(), torch.tensor(ds.targets, dtype=torch.int64)]
    return out[0], out[1], out[2], out[3], num_classes, "cifar" if augment else None


def check_available(name: str, data_dir: str, download: bool) -> None:
    """Fail fast (before a study starts its trials) when a file-backed data set is neither under
    ``data_dir`` nor downloadable: the same errors :func:`load_dataset` would raise in every
    worker. Data sets generated in memory are always available."""
    if name not in ("cifar10", "cifar100"):
        return
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    root = Path(data_dir)
    probe = cls.__new__(cls)
    probe.root = str(root)
    if probe._check_integrity():
        return
    if not download:
        raise FileNotFoundError(
            f"{name} not found under data.data_dir={str(root)!r}; set data.download=true to "
            f"download it, or place the extracted torchvision files ('{cls.base_folder}/') there"
        )
    _check_data_dir_writable(root)
    why = _unreachable(cls.url, DOWNLOAD_PROBE_TIMEOUT_S)
    if why is not None:
        raise FileNotFoundError(
            f"{name} not found under data.data_dir={str(root)!r}, and data.download=true cannot "
            f"reach {cls.url} ({why}); the download needs a network: place the extracted "
            f"torchvision files ('{cls.base_folder}/') under data.data_dir, or download once "
            "where the network is reachable"
        )


def _load_fake(num_samples: int | None) -> _Raw:
    n_train = 256 if num_samples is None else int(num_samples)
    n_test = 64 if num_samples is None else max(1, n_train // 4)
    g = torch.Generator().manual_seed(FAKE_SEED)
    x = torch.randn(n_train + n_test, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10, None


_DATASETS = ("mnist1d", "digits", "cifar10", "cifar100", "fake")


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return list(_DATASETS)


# --------------------------------------------------------------------------------------------
# User data sets: data.name = 'package.module:function'
# --------------------------------------------------------------------------------------------

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
_USER_KEYS = ("train", "val", "test", "num_classes", "stream", "num_workers")
_CHECK_ITEMS = 8  # Dataset items inspected per split (the first ones and the last)


@dataclass(frozen=True)
class BuiltinInfo:
    """What a built-in data set looks like, known without loading it."""

    input_shape: tuple[int, ...]
    num_classes: int
    n_train: int  # training samples after num_samples and the validation split


def builtin_info(
    name: str, *, num_samples: int | None = None, val_fraction: float = 0.1
) -> BuiltinInfo:
    """Shape, classes and training-set size of a built-in data set, without loading it (as
    :func:`load_dataset` would produce them)."""
    if name == "mnist1d":
        shape, classes, n = (1, 40), 10, int((5000 if num_samples is None else num_samples) * 0.8)
    elif name == "digits":
        shape, classes, n = (1, 8, 8), 10, 1797 - round(0.2 * 1797)
    elif name in ("cifar10", "cifar100"):
        shape, classes, n = (3, 32, 32), (10 if name == "cifar10" else 100), 50_000
    elif name == "fake":
        shape, classes, n = (3, 32, 32), 10, 256 if num_samples is None else int(num_samples)
    else:
        raise ValueError(f"data.name={name!r}: not a built-in data set")
    if name in ("digits", "cifar10", "cifar100") and num_samples is not None:
        n = min(n, int(num_samples))
    return BuiltinInfo(shape, classes, n - round(float(val_fraction) * n))


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


def validate_data_name(name: str) -> None:
    """Check ``data.name`` without loading: a built-in name, or an importable user function.

    Raises ValueError (ConfigError for user functions) naming the value and what is allowed.
    """
    if name in _DATASETS:
        return
    if is_user_data(name):
        _resolve_data_fn(name)
        return
    raise ValueError(
        f"data.name={name!r}: must be one of {', '.join(_DATASETS)}, or a user data function "
        f"'package.module:function'"
    )


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
        n = len(train)
        n_val = round(float(val_fraction) * n)
        if n_val >= n:
            raise ValueError(
                f"data.val_fraction={val_fraction!r}: leaves no training samples out of {n}"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        val = _select(train, perm[:n_val].sort().values)
        train = _select(train, perm[n_val:].sort().values)
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


def load_dataset(
    name: str,
    *,
    data_dir: str = "data",
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    num_samples: int | None = None,
    augment: bool = True,
) -> Dataset:
    """Load data set ``name`` (built-in, or a user function ``package.module:function``) and carve
    a seeded validation split from train (unless a user function returns one)."""
    if is_user_data(name):
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction!r}: must be in [0, 1)")
        return _load_user(
            name, data_dir=data_dir, val_fraction=val_fraction, seed=seed, num_samples=num_samples
        )
    key = name.lower() if isinstance(name, str) else name
    if key not in _DATASETS:
        raise ValueError(f"data.name={name!r}: unknown data set; allowed: {', '.join(_DATASETS)}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"data.val_fraction={val_fraction!r}: must be in [0, 1)")
    if num_samples is not None and int(num_samples) < 1:
        raise ValueError(f"data.num_samples={num_samples!r}: must be a positive integer or None")

    if key == "mnist1d":
        raw = _load_mnist1d(num_samples)
    elif key == "digits":
        raw = _load_digits()
    elif key in ("cifar10", "cifar100"):
        raw = _load_cifar(key, data_dir, download, augment)
    else:
        raw = _load_fake(num_samples)
    x, y, xt, yt, num_classes, aug = raw

    if (
        key in ("digits", "cifar10", "cifar100")
        and num_samples is not None
        and num_samples < len(y)
    ):
        g = torch.Generator().manual_seed(SUBSET_SEED)
        keep = torch.randperm(len(y), generator=g)[: int(num_samples)].sort().values
        x, y = x[keep], y[keep]

    n = len(y)
    n_val = round(float(val_fraction) * n)
    if n_val >= n:
        raise ValueError(
            f"data.val_fraction={val_fraction!r}: leaves no training samples out of {n}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    return Dataset(
        name=key,
        train=Split(x[train_idx], y[train_idx]),
        val=Split(x[val_idx], y[val_idx]),
        test=Split(xt, yt),
        num_classes=num_classes,
        input_shape=tuple(x.shape[1:]),
        augment=aug,
    )


# --------------------------------------------------------------------------------------------
# Batching and augmentation
# --------------------------------------------------------------------------------------------


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def augment_cifar(x: Tensor, generator: torch.Generator | None = None, pad: int = 4) -> Tensor:
    """Random crop (``pad``-pixel zero padding) then random horizontal flip, batched.

    The offsets and flips are drawn on the generator's device (CPU by default) and moved to
    ``x.device``; the crop is one gather over index grids, with no loop over samples.
    """
    b, _, h, w = x.shape
    gdev = _gen_device(generator)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev).to(x.device)
    flip = (torch.rand(b, generator=generator, device=gdev) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = dy[:, None] + ar_h[None, :]  # (B, H)
    cols = dx[:, None] + torch.where(flip[:, None], (w - 1 - ar_w)[None, :], ar_w[None, :])
    bidx = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def iterate_batches(
    split: Split | StreamedSplit,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    augment: str | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` batches of ``split`` by indexing the in-memory tensors.

    With ``shuffle`` the order is ``torch.randperm`` drawn from ``generator`` (on its device,
    CPU by default, then moved to the data's device); ``augment="cifar"`` applies
    :func:`augment_cifar` with the same generator. Deterministic given the generator state.
    A :class:`StreamedSplit` is read through a DataLoader in the very same order (the same
    permutation, drawn the same way), batches moved to the split's device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be a positive integer")
    if augment is not None and augment not in AUGMENTATIONS:
        raise ValueError(f"augment={augment!r}: allowed: None, {', '.join(AUGMENTATIONS)}")
    if isinstance(split, StreamedSplit):
        yield from _iterate_streamed(split, batch_size, shuffle, generator, augment, drop_last)
        return
    n = len(split)
    device = split.x.device
    perm: Tensor | None = None
    if shuffle:
        perm = torch.randperm(n, generator=generator, device=_gen_device(generator)).to(device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        if perm is None:
            xb, yb = split.x[start:end], split.y[start:end]
        else:
            idx = perm[start:end]
            xb, yb = split.x[idx], split.y[idx]
        if augment == "cifar":
            xb = augment_cifar(xb, generator)
        yield xb, yb


def _iterate_streamed(
    split: StreamedSplit,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    augment: str | None,
    drop_last: bool,
) -> Iterator[tuple[Tensor, Tensor]]:
    n = len(split)
    if shuffle:
        order = torch.randperm(n, generator=generator, device=_gen_device(generator)).cpu()
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    batches = [order[a : min(a + batch_size, n)].tolist() for a in range(0, stop, batch_size)]
    if not batches:
        return
    for xb, yb in split.loader(batches):
        xb = xb.to(split.device, non_blocking=True)
        yb = yb.to(split.device, non_blocking=True)
        if augment == "cifar":
            xb = augment_cifar(xb, generator)
        yield xb, yb
