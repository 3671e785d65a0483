"""What did not reach MLflow: a local spool in the study directory, and its replay.

A trial's MLflow run (or the study's parent run) whose call fails after MLflow's bounded
retries (:func:`bound_http_retries`) stops calling the server and writes the rest here; the
study goes on. ``granet study sync-mlflow STUDY_DIR`` replays it once the server is back
(:func:`granet.study.mlflow_sync.sync`), idempotently: runs are found by their tags, only the
metric steps, params and statuses a run lacks are sent, and a run's spool is removed only once
all of it is uploaded.

Layout (``StudyPaths.mlflow_spool``)::

    <study_dir>/mlflow-spool/<trial key>/ops.jsonl      one JSON operation per line
    <study_dir>/mlflow-spool/<trial key>/artifacts/<n>/<file>   copies of artifacts not uploaded
    <study_dir>/mlflow-spool/_parent/...                the study's parent run

Operations: ``{"op": "run", ...}`` (what re-creates the run: tracking URI, experiment, study,
run name, tags, trial key, run id when it was created), ``params``, ``metrics`` (``[key, value,
timestamp_ms, step]`` rows), ``tags``, ``artifact`` (a copied file and its artifact path),
``status`` (the final status) and ``failure`` (what failed, for the summary).

All file IO of the spool goes through the ``_io_*`` functions below (one place to port to
another file system).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from granet.study.storage import StoragePath, UriPath, rmtree, study_path, write_bytes

__all__ = ["HTTP_RETRY_ENV", "PARENT", "STALL_BOUND_S", "RunSpool", "SpooledRun",
           "bound_http_retries", "pending_summary", "short_error", "spools"]

log = logging.getLogger("granet")

PARENT = "_parent"  # spool name of the study's parent run (trial keys never start with "_")

# MLflow's HTTP client retries (mlflow.environment_variables, read at each request): 2 retries
# after the first attempt, sleeps of 0 s then 2 x 2 s (+ up to 1 s jitter each), 20 s per
# attempt, no Retry-After waits. Defaults of MLflow 3.17: 7 retries, factor 2, 120 s (~4 min).
HTTP_RETRY_ENV: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
    "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
}


def _stall_bound(env: dict[str, str]) -> float:
    """Worst-case seconds one failing MLflow request stalls its caller: every attempt times out,
    plus urllib3's backoff sleeps (0, then factor * 2**(n-1) for the n-th consecutive error)."""
    retries = int(env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    factor = float(env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    jitter = float(env["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"])
    sleeps = sum(factor * 2 ** (n - 1) + jitter for n in range(2, retries + 1))
    return (retries + 1) * float(env["MLFLOW_HTTP_REQUEST_TIMEOUT"]) + sleeps


STALL_BOUND_S = _stall_bound(HTTP_RETRY_ENV)  # 65 s (a server that accepts but never answers)


def bound_http_retries(given: dict[str, str] | None = None) -> dict[str, str]:
    """Set MLflow's HTTP retry/timeout environment in this process unless it is set already (a
    user's value wins); ``given`` (the driver's values, sent to the workers) comes before
    granet's defaults. Returns the values in force."""
    out = {}
    for k, default in HTTP_RETRY_ENV.items():
        out[k] = os.environ.setdefault(k, (given or {}).get(k, default))
    return out


def short_error(exc: BaseException) -> str:
    """One short line for a warning: the OS reason or HTTP status when there is one."""
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if m:
        return f"{type(exc).__name__}: {m.group(1).strip()}"
    m = re.search(r"(too many \d+ error responses|status code \d+|response code \d+)", text)
    if m:
        return f"{type(exc).__name__}: {m.group(1)}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:160]}" if first else type(exc).__name__


# ---------------------------------------------------------------------------------- file IO


def _io_append(path: StoragePath, line: str) -> None:
    if isinstance(path, UriPath):
        # an object store cannot append: one run's spool has one writer (its trial), so a
        # read-modify-write PUT of the (small) file is safe
        old = path.read_bytes() if path.exists() else b""
        path.write_bytes(old + (line + "\n").encode("utf-8"))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())  # the spool is the only copy of what MLflow did not get


def _io_read_lines(path: StoragePath) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []


def _io_copy(src: Path, dst: StoragePath) -> None:
    write_bytes(dst, src.read_bytes())  # a local path: temporary file + rename; a URI: one PUT


def _io_remove_tree(path: StoragePath) -> None:
    rmtree(path)


def _io_list_dirs(root: StoragePath) -> list[StoragePath]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------------- spool


@dataclass
class SpooledRun:
    """A run's spool, merged: what re-creates it and what it still lacks."""

    name: str
    header: dict[str, Any] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: list[list[Any]] = field(default_factory=list)  # [key, value, ts_ms, step]
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[tuple[str, str | None]] = field(default_factory=list)  # (file, art. path)
    status: str | None = None
    failures: list[dict[str, str]] = field(default_factory=list)

    def kinds(self) -> list[str]:
        """What this run did not fully get (for the summary)."""
        out = []
        if not self.header.get("run_id"):
            out.append("run")
        for name, have in (("metrics", self.metrics), ("params", self.params),
                           ("tags", self.tags), ("artifacts", self.artifacts),
                           ("status", self.status)):
            if have:
                out.append(name)
        return out


class RunSpool:
    """The spool of one run: ``<root>/<name>/ops.jsonl`` and copied artifacts."""

    def __init__(self, root: str | Path | UriPath, name: str) -> None:
        self.root = study_path(root)
        self.name = name
        self.dir = self.root / name
        self.ops = self.dir / "ops.jsonl"

    def write(self, op: str, **data: Any) -> None:
        _io_append(self.ops, json.dumps({"op": op, "t": round(time.time(), 3), **data},
                                        default=str))

    def add_artifact(self, path: str | Path, artifact_path: str | None) -> None:
        """Copy ``path`` into the spool (the original is often a temporary file)."""
        n = len([x for x in _io_read_lines(self.ops) if '"op": "artifact"' in x])
        rel = f"artifacts/{n}/{Path(path).name}"
        _io_copy(Path(path), self.dir / rel)
        self.write("artifact", file=rel, artifact_path=artifact_path)

    def exists(self) -> bool:
        return bool(_io_read_lines(self.ops))

    def read(self) -> SpooledRun:
        run = SpooledRun(self.name)
        for line in _io_read_lines(self.ops):
            try:
                op = json.loads(line)
            except ValueError:  # a line cut by a crash mid-write
                continue
            kind = op.get("op")
            if kind == "run":
                # later headers (a retried trial) fill in what earlier ones lacked (the run id)
                run.header.update({k: v for k, v in op.items() if v not in (None, "")})
            elif kind == "params":
                for k, v in op["params"].items():
                    run.params.setdefault(k, v)  # MLflow keeps a param's first value
            elif kind == "metrics":
                run.metrics.extend(op["metrics"])
            elif kind == "tags":
                run.tags.update(op["tags"])
            elif kind == "artifact":
                run.artifacts.append((op["file"], op.get("artifact_path")))
            elif kind == "status":
                run.status = op["status"]
            elif kind == "failure":
                run.failures.append({"what": op.get("what", ""), "error": op.get("error", "")})
        return run

    def remove(self) -> None:
        _io_remove_tree(self.dir)


def spools(root: str | Path) -> list[RunSpool]:
    """Every run spool under ``root`` (the parent's first)."""
    out = [RunSpool(root, d.name) for d in _io_list_dirs(study_path(root))]
    return sorted(out, key=lambda s: (s.name != PARENT, s.name))


def pending_summary(root: str | Path, uri: str, study_dir: str | Path,
                    trial_runs: int) -> dict[str, Any] | None:
    """What is still spooled (None: nothing): counts, kinds, the command that uploads it."""
    left = [s for s in spools(root) if s.exists()]
    if not left:
        return None
    kinds: set[str] = set()
    for s in left:
        kinds.update(s.read().kinds())
    trials = [s.name for s in left if s.name != PARENT]
    order = ["run", "metrics", "params", "tags", "artifacts", "status"]
    what = [k for k in order if k in kinds]
    command = f"granet study sync-mlflow {study_dir} --tracking-uri {uri}"
    parent = any(s.name == PARENT for s in left)
    message = (f"MLflow: {len(trials)} of {trial_runs} trial runs"
               f"{' (and the parent)' if parent else ''} did not fully reach {uri} "
               f"({'/'.join(what)}); kept in {root}; upload them once the server is back "
               f"with: {command}")
    return {"trial_runs": len(trials), "of": trial_runs, "parent": parent, "what": what,
            "spool": str(root), "keys": trials, "command": command, "message": message}
