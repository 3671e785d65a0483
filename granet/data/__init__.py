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

The package's modules, by concern: :mod:`granet.data.splits` (Split, StreamedSplit, Dataset),
:mod:`granet.data.builtin` (the built-in data sets), :mod:`granet.data.user` (user data
functions), :mod:`granet.data.load` (:func:`load_dataset`), :mod:`granet.data.batches`
(:func:`iterate_batches`, :func:`augment_cifar`). Every public name is importable from
``granet.data``.
"""

from __future__ import annotations

# The constants outside __all__ (``X as X``: re-exported) stay readable here as in the former
# single-file module; set them on their own module (granet.data.builtin.DOWNLOAD_PROBE_TIMEOUT_S),
# where they are read.
from granet.data.batches import AUGMENTATIONS as AUGMENTATIONS
from granet.data.batches import augment_cifar, iterate_batches
from granet.data.builtin import CIFAR_STATS as CIFAR_STATS
from granet.data.builtin import (
    DIGITS_SPLIT_SEED,
    MNIST1D_SEED,
    BuiltinInfo,
    available_datasets,
    builtin_info,
    check_available,
)
from granet.data.builtin import DOWNLOAD_PROBE_TIMEOUT_S as DOWNLOAD_PROBE_TIMEOUT_S
from granet.data.builtin import FAKE_SEED as FAKE_SEED
from granet.data.builtin import SUBSET_SEED as SUBSET_SEED
from granet.data.load import load_dataset, validate_data_name
from granet.data.splits import Dataset, Split, StreamedSplit
from granet.data.user import IN_MEMORY_MAX_BYTES, is_user_data

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
    "check_available",
    "is_user_data",
    "iterate_batches",
    "load_dataset",
    "validate_data_name",
]

