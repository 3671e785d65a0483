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
"""

from __future__ import annotations

import functools
import os
import random
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DIGITS_SPLIT_SEED",
    "MNIST1D_SEED",
    "Dataset",
    "Split",
    "augment_cifar",
    "available_datasets",
    "iterate_batches",
    "load_dataset",
]

MNIST1D_SEED = 42  # the mnist1d package default: all runs share one generated data set
DIGITS_SPLIT_SEED = 0  # fixed train/test split of sklearn digits
FAKE_SEED = 0  # fixed content of the fake data set
SUBSET_SEED = 0  # fixed subset when num_samples shrinks digits/cifar training sets
AUGMENTATIONS = ("cifar",)
# How long data.download=true waits to reach the download host before saying it cannot.
DOWNLOAD_PROBE_TIMEOUT_S = 10.0

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
    train: Split
    val: Split
    test: Split
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
    """Load data set ``name`` into memory and carve a seeded validation split from train."""
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
    split: Split,
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
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be a positive integer")
    if augment is not None and augment not in AUGMENTATIONS:
        raise ValueError(f"augment={augment!r}: allowed: None, {', '.join(AUGMENTATIONS)}")
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
