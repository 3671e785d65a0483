"""Atomic file writes, checkpoints and Parquet tables: the one place that writes run artifacts."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

__all__ = [
    "CheckpointError",
    "atomic_write",
    "atomic_write_text",
    "save_checkpoint",
    "load_checkpoint",
    "write_parquet",
    "RunPaths",
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, empty, truncated, corrupt or not a granet
    checkpoint. The message names the file, the reason and what to do; ``path`` and ``reason``
    hold the first two."""

    def __init__(self, path: str | Path, reason: str, hint: str | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        hint = hint or "delete it and re-run to retrain (granet train: --fresh)"
        super().__init__(f"checkpoint {self.path!r}: {reason}; {hint}")


def _temp_beside(path: Path) -> str:
    """Create an empty temporary file beside ``path`` and return its name.

    ``os.open(..., 0o666)`` lets the kernel apply the umask, so the renamed file gets the mode a
    plain ``open()`` would give it (``tempfile.mkstemp`` forces 0600: teammates on shared storage
    could not read results or checkpoints).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = str(path.parent / f".tmp-{path.name}-{secrets.token_hex(6)}")
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:  # a 48-bit name collision: draw another
            continue


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
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


def load_checkpoint(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    keys: Iterable[str] = (),
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary unpickling).

    Raises :class:`CheckpointError` (a ``ValueError``) naming the file, the reason and the fix if
    it is missing, empty, truncated, corrupt, not a mapping, or lacks one of ``keys``.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(p, "does not exist", "check the path, or train the run first")
    if p.is_dir():
        raise CheckpointError(p, "is a directory, not a checkpoint file", "remove it and re-run")
    if p.stat().st_size == 0:
        raise CheckpointError(p, "is empty (0 bytes)")
    return read_checkpoint_from(p, p, map_location, keys=keys)


def read_checkpoint_from(
    source: Any, name: Any, map_location: str | torch.device = "cpu", *, keys: Iterable[str] = ()
) -> dict[str, Any]:
    """Decode a checkpoint from ``source`` (a path or a file object) with ``weights_only=True``;
    :class:`CheckpointError` names ``name`` (the file or URI it came from)."""
    p = name
    try:
        state = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch reports damage as OSError, EOFError, KeyError, RuntimeError...
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        why = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        raise CheckpointError(
            p, f"cannot be read: truncated, corrupt or not a torch checkpoint ({why})"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(p, f"holds a {type(state).__name__}, not a granet checkpoint")
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(
            p, f"is not a granet checkpoint (no {', '.join(repr(k) for k in missing)})"
        )
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
