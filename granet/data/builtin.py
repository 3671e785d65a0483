"""The built-in data sets (mnist1d, digits, cifar10/100, fake): loaders, availability checks,
shapes known without loading (see :mod:`granet.data`)."""

from __future__ import annotations

import functools
import os
import random
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DIGITS_SPLIT_SEED",
    "MNIST1D_SEED",
    "BuiltinInfo",
    "available_datasets",
    "builtin_info",
    "check_available",
]

MNIST1D_SEED = 42  # the mnist1d package default: all runs share one generated data set
DIGITS_SPLIT_SEED = 0  # fixed train/test split of sklearn digits
FAKE_SEED = 0  # fixed content of the fake data set
SUBSET_SEED = 0  # fixed subset when num_samples shrinks digits/cifar training sets
# How long data.download=true waits to reach the download host before saying it cannot.
DOWNLOAD_PROBE_TIMEOUT_S = 10.0

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


# Loaders: each returns (train_x, train_y, test_x, test_y, num_classes, augment_kind)
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
