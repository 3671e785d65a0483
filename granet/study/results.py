"""Study results as Parquet tables: explicit schemas, one file per trial, atomic writes.

Layout (hive-partitioned by stage)::

    <study_dir>/results/<table>/stage=<stage>/trial-<key>.parquet

Each file is written to a ``.tmp-*`` name and renamed, so a reader (``pyarrow.dataset`` ignores
``.``/``_``-prefixed files) never sees half a file, and re-writing a trial's file replaces it.
:func:`read_table` returns the union of all files of a table (an empty table with the schema when
there are none); the ``stage`` column comes from the file contents, not the directory name.

Tables and their columns (types are the pyarrow types; every float may be null / NaN):

``trials`` - one row per trial that ended (a re-run skips "done" and "diverged" ones):
    key: string            the trial key (hash of its config and its parent's key)
    study: string          study name
    stage: string          "trunk" | "probe" | "search" | "compare" | ...
    parent_key: string     key of the trial it branched from (probes: the trunk); null otherwise
    status: string         "done" | "stopped" (by a scheduler) | "diverged" (non-finite loss or
                           weights; last finite metrics) | "failed" (could not run; re-run next)
    config_json: string    the full resolved granet Config as JSON
    spec_json: string      the study-level description of the trial (probe spec, ...) as JSON
    method: string         sparsity.method
    seed: int64            run.seed
    epochs: int64          epochs trained (run.epochs)
    test_acc, val_acc, best_val_acc, test_at_best_val, density, density_all,
    inference_flops, inference_flops_ratio, train_flops: float64   final-epoch metrics
    wall_seconds: float64  wall time of the trial's last (re)start to its end
    resumed_from: int64    epoch of the own checkpoint the last start resumed from (0: fresh)
    finished_at: timestamp[ms, UTC]
    message: string        why a trial diverged or failed (null when done)

``epochs`` - one row per trial and epoch (the trainer's epoch record):
    key, study, stage: string; epoch: int64 (1-based, epochs completed); step: int64;
    then float64 columns EPOCH_METRICS (lr, train_loss, train_acc, val_loss, val_acc, test_loss,
    test_acc, best_val_acc, test_at_best_val, density, density_all, sparsity, regen_rate,
    itop_rate, units_without_input, dead_relu, mask_events, pruned, regrown, pruned_total,
    regrown_total, inference_flops, inference_flops_ratio, train_flops, epoch_seconds,
    collapsed_layers).
    Metrics a trainer does not produce are null.

``probes`` - one row per finished plasticity probe (stage "probe"):
    key, study, trunk_key: string
    kind: string           "plasticity" (k epochs at the trunk's LR at t) | "gap" (to the end)
    trunk_method: string; trunk_density: float64; seed: int64; model: string
    epoch_t: int64         the trunk epoch branched from (epochs completed)
    ratio: float64         share of the remaining weights pruned at t
    regen: bool            regrew as many connections by gradient magnitude
    scope: string          "global" | "layerwise"
    structure: string      "unstructured" | "filter"
    k: int64               epochs trained after the branch
    lr_t: float64          the trunk's learning rate during epoch t (0-based: lr_at_epoch(trunk, t))
    acc_before: float64    trunk test accuracy at t (before pruning)
    acc_pruned: float64    test accuracy right after pruning (+ regrowth), before training
    acc_after: float64     test accuracy after the k epochs (the probe's final test accuracy)
    plasticity: float64    acc_after - acc_before (kind "plasticity"; null for "gap")
    trunk_final_acc: float64  final test accuracy of the unpruned trunk
    final_gap: float64     acc_after - trunk_final_acc (kind "gap"; null for "plasticity")
    density_before, density_after: float64  density over masked weights at t / after the branch
    pruned, regrown: int64 connections removed / regrown at the branch
    branch_digest: string  SHA-256 of the weights and masks loaded from the trunk (before pruning)

``layers`` - per-layer densities, one row per trial, epoch and layer:
    key, study, stage: string; epoch: int64; layer: string; density: float64; numel: int64
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from granet.study.paths import StudyPaths
from granet.study.storage import StoragePath, UriPath, write_parquet

__all__ = [
    "EPOCH_METRICS",
    "SCHEMAS",
    "TABLES",
    "read_table",
    "table_path",
    "write_rows",
    "done_keys",
    "finished_keys",
    "scan_table",
    "forget_trial",
    "forget_unreadable",
    "trial_status",
    "trial_statuses",
]

log = logging.getLogger("granet")

# trials.status values: done (trained to the end), stopped (a scheduler such as ASHA stopped it),
# diverged (non-finite loss or weights: last finite metrics kept), failed (could not run, e.g.
# its trunk checkpoint is unreadable: re-run next time).
STATUSES = ("done", "stopped", "diverged", "failed")
FINISHED = ("done", "diverged")

EPOCH_METRICS = (
    "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
    "best_val_acc", "test_at_best_val", "density", "density_all", "sparsity", "regen_rate",
    "itop_rate", "units_without_input", "dead_relu", "mask_events", "pruned", "regrown",
    "pruned_total", "regrown_total", "inference_flops", "inference_flops_ratio", "train_flops",
    "epoch_seconds", "collapsed_layers",
)
FINAL_METRICS = (
    "test_acc", "val_acc", "best_val_acc", "test_at_best_val", "density", "density_all",
    "inference_flops", "inference_flops_ratio", "train_flops",
)

_S, _F, _I, _B = pa.string(), pa.float64(), pa.int64(), pa.bool_()

SCHEMAS: dict[str, pa.Schema] = {
    "trials": pa.schema(
        [("key", _S), ("study", _S), ("stage", _S), ("parent_key", _S), ("status", _S),
         ("config_json", _S), ("spec_json", _S), ("method", _S), ("seed", _I), ("epochs", _I)]
        + [(m, _F) for m in FINAL_METRICS]
        + [("wall_seconds", _F), ("resumed_from", _I),
           ("finished_at", pa.timestamp("ms", tz="UTC")), ("message", _S)]
    ),
    "epochs": pa.schema(
        [("key", _S), ("study", _S), ("stage", _S), ("epoch", _I), ("step", _I)]
        + [(m, _F) for m in EPOCH_METRICS]
    ),
    "probes": pa.schema(
        [("key", _S), ("study", _S), ("trunk_key", _S), ("kind", _S), ("trunk_method", _S),
         ("trunk_density", _F), ("seed", _I), ("model", _S), ("epoch_t", _I), ("ratio", _F),
         ("regen", _B), ("scope", _S), ("structure", _S), ("k", _I), ("lr_t", _F),
         ("acc_before", _F), ("acc_pruned", _F), ("acc_after", _F), ("plasticity", _F),
         ("trunk_final_acc", _F), ("final_gap", _F), ("density_before", _F),
         ("density_after", _F), ("pruned", _I), ("regrown", _I), ("branch_digest", _S)]
    ),
    "layers": pa.schema(
        [("key", _S), ("study", _S), ("stage", _S), ("epoch", _I), ("layer", _S),
         ("density", _F), ("numel", _I)]
    ),
}
TABLES = tuple(SCHEMAS)


def table_path(study_dir: str | Path, table: str, stage: str, key: str) -> StoragePath:
    if table not in SCHEMAS:
        raise ValueError(f"table={table!r}: must be one of {', '.join(TABLES)}")
    return StudyPaths(study_dir).table_file(table, stage, key)


def _clean(value: Any, typ: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_floating(typ):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    if pa.types.is_integer(typ):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return int(value)
    if pa.types.is_boolean(typ):
        return bool(value)
    if pa.types.is_timestamp(typ):
        return value
    return str(value)


def write_rows(
    study_dir: str | Path, table: str, stage: str, key: str, rows: list[dict[str, Any]]
) -> StoragePath:
    """Write one trial's rows of ``table`` (replacing its previous file) with the table's schema.

    Keys absent from a row become null; keys the schema does not know are dropped.
    """
    schema = SCHEMAS[table]
    clean = [{f.name: _clean(r.get(f.name), f.type) for f in schema} for r in rows]
    path = table_path(study_dir, table, stage, key)
    write_parquet(pa.Table.from_pylist(clean, schema=schema), path)
    return path


def _key_of(path: StoragePath) -> str:
    return path.stem[len("trial-"):]


def scan_table(study_dir: str | Path, table: str,
               stage: str | None = None) -> tuple[pa.Table, dict[str, str]]:
    """All readable rows of ``table`` and ``{trial key: reason}`` for the files that are not
    readable (truncated or corrupt: their trials count as not finished, so a re-run redoes
    them and replaces the files)."""
    schema = SCHEMAS[table]
    root = StudyPaths(study_dir).table_dir(table, stage)
    remote = isinstance(root, UriPath)
    if remote:  # one listing (no is_dir round trip); sorted by path as below
        files = list(root.rglob("trial-*.parquet"))
    else:
        files = sorted(root.rglob("trial-*.parquet")) if root.is_dir() else []
    if not files:
        return schema.empty_table(), {}
    fs = root.fs if remote else None
    try:
        return ds.dataset([f.path if remote else str(f) for f in files], schema=schema,
                          format="parquet", filesystem=fs).to_table(), {}
    except (pa.ArrowException, OSError):
        log.debug("granet: an unreadable file under %s: reading its files one by one", root)
    parts, bad = [], {}
    for f in files:  # find the unreadable ones
        try:
            parts.append(pq.read_table(f.path if remote else f, schema=schema,
                                       filesystem=fs))
        except (pa.ArrowException, OSError) as exc:
            bad[_key_of(f)] = f"{f}: unreadable ({str(exc).splitlines()[0][:200]})"
    table_ = pa.concat_tables(parts) if parts else schema.empty_table()
    return table_, bad


def read_table(study_dir: str | Path, table: str, stage: str | None = None) -> pa.Table:
    """All readable rows of ``table`` (optionally one stage); an empty table with the schema if
    none. Unreadable files are left out with a warning (see :func:`scan_table`)."""
    t, bad = scan_table(study_dir, table, stage)
    for reason in bad.values():
        log.warning("granet: warning: results file %s; its trial will re-run", reason)
    return t


def finished_keys(study_dir: str | Path, stage: str | None = None) -> set[str]:
    """Keys of the trials that need no re-run: status "done" or "diverged" (a diverged trial
    diverges again on a re-run) whose every results file is readable."""
    bad: set[str] = set()
    for name in TABLES:
        bad |= set(scan_table(study_dir, name, stage)[1])
    t = read_table(study_dir, "trials", stage)
    return {k for k, s in zip(t.column("key").to_pylist(), t.column("status").to_pylist(),
                              strict=True)
            if s in FINISHED and k not in bad}


def done_keys(study_dir: str | Path, stage: str | None = None) -> set[str]:
    """Keys of the trials that finished with status "done"."""
    t = read_table(study_dir, "trials", stage)
    return {k for k, s in zip(t.column("key").to_pylist(), t.column("status").to_pylist(),
                              strict=True)
            if s == "done"}


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def trial_statuses(study_dir: str | Path, stage: str | None = None) -> dict[str, str]:
    """``{key: status}`` of the trials rows (readable files only)."""
    t = read_table(study_dir, "trials", stage)
    return dict(zip(t.column("key").to_pylist(), t.column("status").to_pylist(), strict=True))


def trial_status(study_dir: str | Path, stage: str, key: str) -> str | None:
    """The status of one trial from its own file (None when absent or unreadable)."""
    path = table_path(study_dir, "trials", stage, key)
    try:
        if not path.is_file():
            return None
        if isinstance(path, UriPath):
            rows = pq.read_table(path.path, columns=["status"],
                                 filesystem=path.fs).column("status").to_pylist()
        else:
            rows = pq.read_table(path, columns=["status"]).column("status").to_pylist()
    except (pa.ArrowException, OSError):
        return None
    return rows[0] if rows else None


def forget_unreadable(study_dir: str | Path) -> dict[str, str]:
    """Forget (see :func:`forget_trial`) every trial one of whose results files is unreadable;
    ``{key: reason}`` of those trials. Their next run rewrites every file."""
    bad: dict[str, str] = {}
    for name in TABLES:
        root = StudyPaths(study_dir).table_dir(name)
        for stage_dir in sorted(root.glob("stage=*")) if root.is_dir() else []:
            stage = stage_dir.name[len("stage="):]
            for key, reason in scan_table(study_dir, name, stage)[1].items():
                bad.setdefault(key, reason)
                forget_trial(study_dir, stage, key)
    return bad


def forget_trial(study_dir: str | Path, stage: str, key: str) -> None:
    """Remove a trial's rows from every table (its trials row first: it is no longer finished),
    so the trial runs again."""
    for name in ("trials", *[t for t in TABLES if t != "trials"]):
        table_path(study_dir, name, stage, key).unlink(missing_ok=True)
