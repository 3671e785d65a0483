"""Export a trained run's sparse model: masked weights, and a compact non-zeros-only form."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from granet.config import Config, ConfigError, config_from_dict, config_hash, read_yaml_mapping
from granet.io import RunPaths, load_checkpoint, save_checkpoint

__all__ = ["export_run", "compact_state_dict", "expand_state_dict"]


def compact_state_dict(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict:
    """Store each masked weight as a packed bit mask plus its non-zero values; others as is."""
    out: dict[str, Any] = {"dense": {}, "sparse": {}}
    for name, t in state.items():
        m = masks.get(name)
        if m is None:
            out["dense"][name] = t
            continue
        bits = np.packbits(m.cpu().numpy().reshape(-1).astype(np.uint8))
        out["sparse"][name] = {
            "shape": list(t.shape),
            "bits": torch.from_numpy(bits),
            "values": t.reshape(-1)[m.reshape(-1)].clone(),
        }
    return out


def expand_state_dict(compact: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`compact_state_dict`: a regular dense ``state_dict``."""
    state = dict(compact["dense"])
    for name, entry in compact["sparse"].items():
        shape = tuple(entry["shape"])
        n = int(np.prod(shape))
        mask = np.unpackbits(entry["bits"].numpy())[:n].astype(bool)
        dense = torch.zeros(n, dtype=entry["values"].dtype)
        dense[torch.from_numpy(mask)] = entry["values"]
        state[name] = dense.view(shape)
    return state


def _nbytes(obj: Any) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def export_run(run_dir: str | Path) -> dict[str, Any]:
    """Write ``export/model.pt`` (masks applied) and ``export/model_sparse.pt`` (compact).

    Everything is checked before anything is written: a run directory without a checkpoint or
    a readable ``config.yaml`` raises FileNotFoundError / ConfigError, an unreadable checkpoint
    :class:`~granet.io.CheckpointError`, and a checkpoint of another config (its config hash
    differs from ``config.yaml``'s) ConfigError.
    """
    paths = RunPaths(run_dir)
    if not paths.root.is_dir():
        raise FileNotFoundError(f"RUN_DIR={str(paths.root)!r}: not a directory")
    if not paths.checkpoint.exists():
        raise FileNotFoundError(f"RUN_DIR={str(paths.root)!r}: no checkpoint.pt; train it first")
    if not paths.config.is_file():
        raise FileNotFoundError(
            f"RUN_DIR={str(paths.root)!r}: no config.yaml beside checkpoint.pt; export needs "
            f"the run's config (re-run granet train into this directory to write it)"
        )
    cfg: Config = config_from_dict(read_yaml_mapping(paths.config, allow_empty=False))
    ckpt = load_checkpoint(paths.checkpoint, keys=("model", "engine", "meta"))
    saved, current = ckpt["meta"].get("config_hash"), config_hash(cfg)
    if saved is not None and saved != current:
        raise ConfigError(
            f"RUN_DIR={str(paths.root)!r}: its checkpoint.pt is of another config (hash {saved}; "
            f"config.yaml: {current}); export the run directory that trained it, or retrain "
            f"this one (granet train {str(paths.config)!r} --run-dir {str(paths.root)!r} --fresh)"
        )
    # full parameter names (in_proj_weight, weight_hh_l0, ...); older checkpoints: <layer>.weight
    names = ckpt["engine"].get("param_names") or [
        f"{n}.weight" for n in ckpt["engine"]["layer_names"]]
    masks = dict(zip(names, ckpt["engine"]["masks"], strict=True))
    state = {k: v.clone() for k, v in ckpt["model"].items()}
    for key, m in masks.items():
        state[key].mul_(m)  # already zero; applied again so the export never depends on it
    compact = compact_state_dict(state, masks)
    meta = dict(ckpt["meta"], model=cfg.model.name, model_kwargs=cfg.model.kwargs)
    paths.export_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"meta": meta, "state_dict": state}, paths.export_dir / "model.pt")
    save_checkpoint({"meta": meta, "compact": compact}, paths.export_dir / "model_sparse.pt")
    nnz = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return {
        "dense_bytes": _nbytes(state),
        "sparse_bytes": _nbytes(compact),
        "density": nnz / total,
        "dir": str(paths.export_dir),
    }
