"""``load_dataset`` and ``validate_data_name``: built-in and user data sets behind one name
(see :mod:`granet.data`)."""

from __future__ import annotations

import torch

from granet.data.builtin import (
    _DATASETS,
    SUBSET_SEED,
    _load_cifar,
    _load_digits,
    _load_fake,
    _load_mnist1d,
)
from granet.data.splits import Dataset, Split, validation_carve
from granet.data.user import _load_user, _resolve_data_fn, is_user_data

__all__ = ["load_dataset", "validate_data_name"]


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

    val_idx, train_idx = validation_carve(len(y), val_fraction, seed)
    return Dataset(
        name=key,
        train=Split(x[train_idx], y[train_idx]),
        val=Split(x[val_idx], y[val_idx]),
        test=Split(xt, yt),
        num_classes=num_classes,
        input_shape=tuple(x.shape[1:]),
        augment=aug,
    )
