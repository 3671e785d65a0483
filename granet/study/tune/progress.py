"""Console progress of a stage: one line per failure and at most one every few seconds.

``[probe] 12/160 done, 2 running, 0 failed | best test_acc 0.8120 (p0.5 t14 regen | d0.1)``;
when the stage's trials run packed, ``[probe] 12/26 packs (184 probes) done, ...``.
Counts are of distinct trials (a retried or restored trial counts once), so they never exceed
the stage's total. A failed trial's error is copied into the study directory
(``failures/<key>.txt``) and that copy is what the line points at.

A study on object storage is also watched here: when a trial fails (before Tune retries it),
the storage is probed; if the bucket stopped answering, :class:`StorageLost` ends the stage at
once instead of letting every trial spend its retries against it.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

__all__ = ["ProgressLine", "StorageLost"]


class StorageLost(RuntimeError):
    """The study's object storage stopped answering mid-stage (the message says how)."""


def _trial_field(trial: Any, name: str) -> Any:
    cfg = trial.config or {}
    if name == "key" and cfg.get("trial_key"):
        return cfg["trial_key"]
    if name == "run_name" and cfg.get("run_name"):
        return cfg["run_name"]
    return (cfg.get("trial") or {}).get(name)


class ProgressLine(Callback):
    """Concise progress lines for one stage (a Tune callback)."""

    def __init__(self, stage: str, total: int, *, metric: str = "test_acc", mode: str = "max",
                 every: float = 15.0, failures_dir: str | None = None,
                 storage: Any = None, members: int | None = None) -> None:
        self.stage, self.total = stage, total
        # Tune trials that are packs: the line counts packs and says how many trials they hold
        self.members = members if members is not None and members != total else None
        self.storage = storage  # the study root when it is a URI (UriPath), else None
        self.metric, self.mode, self.every = metric, mode, every
        self.failures_dir = failures_dir
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.running: set[str] = set()
        self.best: tuple[float, str] | None = None
        self.last_print = 0.0

    def _name(self, trial: Any) -> str:
        return str(_trial_field(trial, "run_name") or _trial_field(trial, "key")
                   or trial.trial_id)

    def _line(self) -> None:
        best = ""
        if self.best is not None:
            best = f" | best {self.metric} {self.best[0]:.4f} ({self.best[1]})"
        total = max(self.total, len(self.done | self.failed | self.running))
        packs = "" if self.members is None else f" packs ({self.members} {self.stage}s)"
        print(f"[{self.stage}] {len(self.done)}/{total}{packs} done, {len(self.running)} "
              f"running, {len(self.failed)} failed{best}", file=sys.stdout, flush=True)
        self.last_print = time.time()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.running.add(trial.trial_id)
        v = result.get(self.metric)
        if isinstance(v, (int, float)) and v == v:
            if self.best is None or (v > self.best[0] if self.mode == "max" else v < self.best[0]):
                self.best = (float(v), self._name(trial))
        if time.time() - self.last_print >= self.every:
            self._line()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.done.add(trial.trial_id)
        if len(self.done) >= self.total or time.time() - self.last_print >= self.every:
            self._line()

    def _check_storage(self) -> None:
        if self.storage is None:
            return
        from granet.study.storage import storage_problem

        problem = storage_problem(self.storage, limit=15.0)
        if problem is not None:
            raise StorageLost(f"{self.storage}: {problem}")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._check_storage()  # a failure Tune is about to retry: is the bucket gone?

    def on_trial_error(self, iteration, trials, trial, **info):
        self._check_storage()
        self.running.discard(trial.trial_id)
        self.failed.add(trial.trial_id)
        where = self._copy_error(trial)
        print(f"[{self.stage}] trial {self._name(trial)} failed (no retries left): {where}",
              file=sys.stdout, flush=True)
        self._line()

    def on_experiment_end(self, trials, **info):
        if self.last_print == 0.0 or len(self.done) < self.total:
            self._line()

    def _copy_error(self, trial: Any) -> str:
        """Copy Ray's error file into ``failures/<key>.txt``; return where to read it."""
        src = None
        for attr in ("error_file", "pickled_error_file"):
            p = getattr(trial, attr, None)
            if p and Path(p).is_file():
                src = Path(p)
                break
        if src is None and getattr(trial, "local_path", None):
            cand = Path(trial.local_path) / "error.txt"
            src = cand if cand.is_file() else None
        key = _trial_field(trial, "key") or trial.trial_id
        if src is None or self.failures_dir is None:
            return str(src or trial.trial_id)
        from granet.study.storage import study_path, write_bytes

        dst = study_path(self.failures_dir) / f"{key}.txt"  # a local path or a URI
        try:
            if isinstance(dst, Path):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
            else:
                write_bytes(dst, src.read_bytes())
        except OSError as exc:
            return f"{src} (copy to {dst} failed: {exc})"
        return str(dst)
