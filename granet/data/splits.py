"""The in-memory and streamed splits of a data set (:class:`Split`, :class:`StreamedSplit`) and
the :class:`Dataset` holding them (see :mod:`granet.data`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Dataset", "Split", "StreamedSplit", "validation_carve"]


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


def validation_carve(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation indices, training indices), each sorted: a seeded share ``val_fraction`` of
    ``n`` training samples held out for validation (built-in and user data sets alike)."""
    n_val = round(float(val_fraction) * n)
    if n_val >= n:
        raise ValueError(
            f"data.val_fraction={val_fraction!r}: leaves no training samples out of {n}"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[:n_val].sort().values, perm[n_val:].sort().values
