"""Data sets of a Tune worker process: built once per process (Tune reuses actors, so every
trial of a worker after the first gets its data for free) and, for generated built-in sets, read
from the study's data cache instead of being generated again."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from granet.study.paths import StudyPaths

__all__ = ["data_cache_file", "prepare_data_cache", "shared_dataset"]

log = logging.getLogger("granet")

# Data sets built in this worker process (Tune reuses actors: every trial of a worker after the
# first gets its data for free). Keyed by everything load_dataset depends on.
_DATA: dict[Any, Any] = {}
# Built-in sets that are generated (not read from files): cached on disk in the study directory,
# so a new worker reads them instead of generating them again (mnist1d: ~1.2 s).
_GENERATED = ("mnist1d", "fake")


def _data_ident(cfg) -> str | None:
    from granet.data import is_user_data
    from granet.trainer import DATA_SPLIT_SEED

    d = cfg.data
    if is_user_data(d.name):
        return None  # user code: called as the trainer calls it (it may not be deterministic)
    return json.dumps([d.name.lower(), d.data_dir, d.num_samples, d.val_fraction,
                       DATA_SPLIT_SEED, bool(d.augment)])


def data_cache_file(cfg, study_dir: str | Path) -> Path | None:
    """Where a generated built-in data set of ``cfg`` is cached in the study directory (None:
    not cached on disk). The name hashes every input of its generation and the versions of
    torch and the generator package."""
    import hashlib

    ident = _data_ident(cfg)
    if ident is None or cfg.data.name.lower() not in _GENERATED:
        return None
    try:
        from importlib.metadata import version

        gen = version("mnist1d") if cfg.data.name.lower() == "mnist1d" else ""
    except Exception:  # noqa: BLE001 - the version only keys the cache
        gen = "?"
    import torch

    digest = hashlib.sha256(f"{ident}|{gen}|{torch.__version__}".encode()).hexdigest()[:16]
    # a URI study_dir: the cache is in this node's local state directory (paths.py)
    return StudyPaths(study_dir).cache / f"data-{cfg.data.name.lower()}-{digest}.pt"


def _load_data(cfg):
    from granet.data import load_dataset
    from granet.trainer import DATA_SPLIT_SEED

    d = cfg.data
    return load_dataset(d.name, data_dir=d.data_dir, download=d.download,
                        val_fraction=d.val_fraction, seed=DATA_SPLIT_SEED,
                        num_samples=d.num_samples, augment=d.augment)


def _read_cache(path: Path):
    from granet.data import Dataset, Split
    from granet.io import CheckpointError, load_checkpoint

    try:
        s = load_checkpoint(path)
        return Dataset(name=s["name"], train=Split(s["train_x"], s["train_y"]),
                       val=Split(s["val_x"], s["val_y"]), test=Split(s["test_x"], s["test_y"]),
                       num_classes=int(s["num_classes"]), input_shape=tuple(s["input_shape"]),
                       augment=s["augment"] or None)
    except (CheckpointError, KeyError, TypeError):
        return None


def _write_cache(path: Path, ds) -> None:
    from granet.io import save_checkpoint

    try:
        save_checkpoint({"name": ds.name, "train_x": ds.train.x, "train_y": ds.train.y,
                         "val_x": ds.val.x, "val_y": ds.val.y, "test_x": ds.test.x,
                         "test_y": ds.test.y, "num_classes": int(ds.num_classes),
                         "input_shape": list(ds.input_shape), "augment": ds.augment or ""},
                        path)
    except OSError as exc:  # a cache: never a reason to fail a trial
        log.warning("granet: warning: data cache %s not written (%s)", path, exc)


def shared_dataset(cfg, study_dir: str | Path | None = None, device: Any = None):
    """The data set of ``cfg`` for this worker's trials: built once per process (and moved to
    ``device`` once, so packed trainers share one copy), read from the study directory's cache
    when it is a generated built-in set. None for user data sets (the trainer loads those)."""
    ident = _data_ident(cfg)
    if ident is None:
        return None
    ds = _DATA.get(ident)
    if ds is None:
        path = data_cache_file(cfg, study_dir) if study_dir else None
        ds = _read_cache(path) if path is not None and path.is_file() else None
        if ds is None:
            ds = _load_data(cfg)
            if path is not None:
                _write_cache(path, ds)
        _DATA[ident] = ds
    if device is not None and str(device) != "cpu":
        key = (ident, str(device))
        if key not in _DATA:
            _DATA[key] = ds.to(device)
        ds = _DATA[key]
    return ds


def prepare_data_cache(cfg, study_dir: str | Path) -> None:
    """Write the data cache of ``cfg`` if it is a generated built-in set and absent (the
    driver does this while Ray starts, so no worker generates it)."""
    path = data_cache_file(cfg, study_dir)
    if path is None or path.is_file():
        return
    ds = _load_data(cfg)
    _write_cache(path, ds)
