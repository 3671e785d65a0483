"""Fault injectors for the study tests, as Ray's ``FailureInjectorCallback`` does it: from the
outside. Each is a wrapping trainable passed to ``run_study(..., trainable=...)``; nothing in
granet/ knows about them. They act inside real Ray workers (raise, SIGKILL their own worker
process, corrupt a file the trial is about to read) and leave a marker file so a test can tell
that the fault happened and when.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import ray.cloudpickle

from granet.study.tune.trainable import granet_trainable

# Pickle this module's callables by value: Ray workers need not import the tests package.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _trial(config: dict[str, Any]) -> dict[str, Any]:
    t = dict(config.get("trial") or {})
    if "trial_key" in config:
        t["key"] = config["trial_key"]
    return t


class FailAtEpoch:
    """The first trial (of ``stage``, or any) reaching ``epoch`` fails once: ``how="raise"``
    raises, ``how="sigkill"`` kills its own Ray worker process. The marker file records the
    trial's key and the time of the fault; each start of a trial appends to ``<marker>.starts``.
    ``times`` > 1 fails that many starts of the same trial (to exhaust retries)."""

    def __init__(self, marker: Path, epoch: int = 2, how: str = "raise",
                 stage: str | None = None, times: int = 1) -> None:
        self.marker, self.epoch, self.how = str(marker), epoch, how
        self.stage, self.times = stage, times

    def __call__(self, config: dict[str, Any]) -> None:
        from ray import tune

        trial = _trial(config)
        with open(self.marker + ".starts", "a") as f:
            f.write(f"{trial.get('key')} {time.time():.3f}\n")
        original = tune.report
        marker = Path(self.marker)

        def report(metrics: dict[str, Any], **kw: Any) -> None:
            original(metrics, **kw)
            mine = self.stage is None or trial.get("stage") == self.stage
            done = marker.read_text().count("\n") if marker.exists() else 0
            first = not marker.exists() or marker.read_text().split(" ")[0] == trial.get("key")
            if mine and first and metrics.get("epoch") == self.epoch and done < self.times:
                with open(marker, "a") as f:
                    f.write(f"{trial.get('key')} {time.time():.3f}\n")
                if self.how == "sigkill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected failure of {trial.get('key')} at epoch {self.epoch}")

        tune.report = report
        try:
            granet_trainable(config)
        finally:
            tune.report = original


class CorruptBeforeProbe:
    """Before the first probe starts, truncate its trunk checkpoint (what a full disk or a
    crashed copy leaves); the marker records the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __call__(self, config: dict[str, Any]) -> None:
        trial = _trial(config)
        probe = trial.get("probe")
        if probe and not Path(self.marker).exists():
            path = Path(probe["trunk_ckpt"])
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 3])
            Path(self.marker).write_text(str(path))
        granet_trainable(config)


class Slow:
    """Sleeps ``seconds`` after each epoch report (gives a test time to act mid-study)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, config: dict[str, Any]) -> None:
        from ray import tune

        original = tune.report

        def report(metrics: dict[str, Any], **kw: Any) -> None:
            original(metrics, **kw)
            time.sleep(self.seconds)

        tune.report = report
        try:
            granet_trainable(config)
        finally:
            tune.report = original
