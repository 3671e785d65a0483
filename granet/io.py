"""Atomic file writes, checkpoints and Parquet tables: the one place that writes run artifacts."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

__all__ = ["CheckpointError", "RunPaths", "atomic_write", "atomic_write_text", "load_checkpoint",
           "save_checkpoint", "write_parquet"]


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file beside ``path``, then rename: readers never see half a file."""
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)
    _atomic(Path(path), write)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` atomically (temporary file + rename)."""
    _atomic(Path(path), lambda tmp: torch.save(state, tmp))


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read; the message names the file and what to do."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary unpickling)."""
    p = Path(path)
    try:
        state = torch.load(p, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(p)!r}: not found") from None
    except Exception as exc:  # truncated zip, garbage, a pickle that is not a state dict
        raise CheckpointError(
            f"checkpoint {str(p)!r}: unreadable ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); delete it and run again to "
            "retrain"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(p)!r}: not a granet checkpoint (no state dict)")
    return state


def write_parquet(
    rows: Sequence[dict[str, Any]] | pa.Table, path: str | Path, schema: pa.Schema | None = None
) -> None:
    """Write rows (or a table) as Parquet atomically, with an explicit schema when given."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows), schema=schema)
    _atomic(Path(path), lambda tmp: pq.write_table(table, tmp))


class RunPaths:
    """Every artifact path of one training run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = self.root / "config.yaml"
        self.checkpoint = self.root / "checkpoint.pt"
        self.metrics = self.root / "metrics.parquet"
        self.layers = self.root / "layers.parquet"
        self.summary = self.root / "summary.json"
        self.export_dir = self.root / "export"

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.root / f"ckpt-epoch{epoch:04d}.pt"


atomic_write = _atomic  # atomic_write(path, write(tmp_path)): the one atomic writer of granet
