"""Batching in a seeded per-epoch order and batched CIFAR augmentation (see :mod:`granet.data`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from granet.data.splits import Split, StreamedSplit

__all__ = ["AUGMENTATIONS", "augment_cifar", "iterate_batches"]

AUGMENTATIONS = ("cifar",)


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
