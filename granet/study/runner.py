"""Build and fit a Ray Tune ``Tuner`` with the study layer's shared policy.

Policy (every stage of every study):

* resources per trial from the study config (``cpus_per_trial``, fractional ``gpus_per_trial``);
  torch threads per trial = max(1, int(cpus_per_trial)) (passed as ``num_threads``);
* ``reuse_actors=True`` (a fresh actor costs ~2 s on a small box; trials of a stage share the
  trainable, so reusing pays);
* ``FailureConfig(max_failures=common.max_failures)``: a crashed trial restarts from its last
  reported checkpoint;
* ``CheckpointConfig(num_to_keep=2)``: Tune keeps each trial's two latest checkpoints (the
  trainable attaches one every ``run.checkpoint_every`` epochs and at the end). num_to_keep=N
  forces a full experiment-state snapshot whenever a trial has checkpointed N times since the
  last one (8.7 MB per snapshot for 160 trials): 2 means short trials that checkpoint once never
  force one. Checkpoints that must survive (plasticity trunk epochs) are written by the
  trainable as stable files outside Tune's rotation;
* storage under ``<study_dir>/ray/<name>`` (``name`` defaults to the stage); with ``resume`` an
  existing restorable experiment of that name is restored (unfinished and errored trials resume
  from their own checkpoints) instead of starting a new one;
* short trial directory names (``<stage>-<key>``), no giant progress tables: one progress line per
  finished/failed trial and at most one every ``progress_every`` seconds otherwise.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from granet.study.common import StudyCommon

__all__ = ["ensure_ray", "run_tuner", "ProgressLine"]


def ensure_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """ray.init once: connect to RAY_ADDRESS if set, else start a local Ray with the machine's
    CPUs (or ``num_cpus``). No dashboard for local clusters."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": True,
                              "logging_level": "ERROR"}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
        return
    ray.init(
        num_cpus=num_cpus or os.cpu_count() or 1,
        num_gpus=num_gpus,
        include_dashboard=False,
        **kwargs,
    )


def _callback_base():
    from ray.tune import Callback

    return Callback


class ProgressLine(_callback_base()):  # type: ignore[misc]
    """Concise progress: ``[stage] done 3/12 running 2 failed 0 | best test_acc 0.812 (key)``,
    at most one line every ``progress_every`` seconds, plus one per failure and one at the end."""

    def __init__(self, stage: str, total: int, metric: str | None = None, mode: str | None = None,
                 progress_every: float = 15.0, stream=None) -> None:
        self.stage, self.total = stage, total
        self.metric = metric or "test_acc"
        self.mode = mode or "max"
        self.every = progress_every
        self.stream = stream  # None: sys.stdout at print time (keeps the callback picklable)
        self.done = self.failed = 0
        self.running: set[str] = set()
        self.best: tuple[float, str] | None = None
        self.last_print = 0.0

    def _line(self) -> None:
        best = ""
        if self.best is not None:
            best = f" | best {self.metric} {self.best[0]:.4f} ({self.best[1]})"
        print(
            f"[{self.stage}] done {self.done}/{self.total} running {len(self.running)} "
            f"failed {self.failed}{best}",
            file=self.stream or sys.stdout, flush=True,
        )
        self.last_print = time.time()

    def _name(self, trial) -> str:
        key = trial.config.get("trial_key") or (trial.config.get("trial") or {}).get("trial_key")
        return str(key or trial.trial_id)[:10]

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running.add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.running.add(trial.trial_id)
        v = result.get(self.metric)
        if isinstance(v, (int, float)) and v == v:
            better = self.best is None or (
                v > self.best[0] if self.mode == "max" else v < self.best[0]
            )
            if better:
                self.best = (float(v), self._name(trial))
        if time.time() - self.last_print >= self.every:
            self._line()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.done += 1
        if self.done == self.total or time.time() - self.last_print >= self.every:
            self._line()

    def on_experiment_end(self, trials, **info):
        if self.last_print == 0.0 or self.done != self.total:
            self._line()

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.discard(trial.trial_id)
        self.failed += 1
        where = getattr(trial, "error_file", None) or getattr(trial, "path", None) or ""
        print(f"[{self.stage}] trial {self._name(trial)} failed (no retries left): {where}",
              file=self.stream or sys.stdout, flush=True)
        self._line()


def _check_resources(common: StudyCommon) -> None:
    """Fail fast (instead of Tune waiting forever) when no node can hold one trial."""
    import ray

    from granet.config import ConfigError

    total = ray.cluster_resources()
    if common.gpus_per_trial and total.get("GPU", 0) < common.gpus_per_trial:
        raise ConfigError(
            f"gpus_per_trial={common.gpus_per_trial!r}: the Ray cluster has "
            f"{total.get('GPU', 0):g} GPUs; use 0 on a CPU-only machine"
        )
    if total.get("CPU", 0) < common.cpus_per_trial:
        raise ConfigError(
            f"cpus_per_trial={common.cpus_per_trial!r}: the Ray cluster has "
            f"{total.get('CPU', 0):g} CPUs"
        )


def _trial_dirname(trial) -> str:
    cfg = trial.config
    key = cfg.get("trial_key") or (cfg.get("trial") or {}).get("trial_key") or trial.trial_id
    stage = cfg.get("stage") or (cfg.get("trial") or {}).get("stage") or "trial"
    return f"{stage}-{key}"[:60]


def _count(param_space: dict[str, Any], num_samples: int) -> int:
    n = 1
    for v in param_space.values():
        if isinstance(v, dict) and set(v) == {"grid_search"}:
            n *= len(v["grid_search"])
    return n * num_samples


def run_tuner(
    common: StudyCommon,
    *,
    stage: str,
    param_space: dict[str, Any],
    num_samples: int = 1,
    search_alg=None,
    scheduler=None,
    metric: str | None = None,
    mode: str | None = None,
    resume: bool = True,
    progress: bool = True,
    name: str | None = None,
    trainable=None,
    callbacks: list | None = None,
    progress_every: float = 15.0,
    total: int | None = None,
    stop: dict | None = None,
):
    """Fit a Tuner over ``granet_trainable`` (or ``trainable``) for one stage -> ResultGrid.

    ``param_space`` gets ``stage``, ``study``, ``study_dir`` and ``num_threads`` filled in when
    absent. ``metric``/``mode`` go to TuneConfig unless a ``search_alg`` or ``scheduler`` is given
    (then they must carry them themselves - see the notes: setting both raises) and are used for
    the progress line's "best".
    """
    # num_to_keep forces an experiment snapshot per reported checkpoint: cheap here (~10 ms),
    # but Tune warns about it on every short trial.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # The classic reporter with verbose=0 prints nothing; ProgressLine prints our lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from ray import tune

    from granet.study.trainable import TEST_FAIL_ENV, granet_trainable

    ensure_ray()
    _check_resources(common)
    study_dir = Path(common.study_dir).resolve()
    storage = study_dir / "ray"
    storage.mkdir(parents=True, exist_ok=True)
    name = name or stage
    space = dict(param_space)
    space.setdefault("stage", stage)
    space.setdefault("study", common.name)
    space.setdefault("study_dir", str(study_dir))
    space.setdefault("num_threads", max(1, int(common.cpus_per_trial)))
    if os.environ.get(TEST_FAIL_ENV):
        space.setdefault("test_fail_once", os.environ[TEST_FAIL_ENV])

    resources = {"cpu": common.cpus_per_trial}
    if common.gpus_per_trial:
        resources["gpu"] = common.gpus_per_trial
    fn = tune.with_resources(trainable or granet_trainable, resources)

    cbs = list(callbacks or [])
    if progress:
        cbs.append(ProgressLine(stage, total or _count(space, num_samples), metric, mode,
                                progress_every=progress_every))
    run_config = tune.RunConfig(
        name=name,
        storage_path=str(storage),
        failure_config=tune.FailureConfig(max_failures=common.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=cbs,
        verbose=0,
        stop=stop,
    )
    path = storage / name
    if resume and path.exists() and tune.Tuner.can_restore(str(path)):
        tuner = tune.Tuner.restore(
            str(path), fn, resume_unfinished=True, resume_errored=True
        )
        # The restored run config carries the old callbacks: attach this run's (fresh counts).
        local = getattr(tuner, "_local_tuner", None)
        if local is not None:
            local.get_run_config().callbacks = cbs
    else:
        if path.exists():  # never clobber a previous experiment of the same name
            name = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
            run_config.name = name
        use_tc_metric = search_alg is None and scheduler is None
        tune_config = tune.TuneConfig(
            num_samples=num_samples,
            search_alg=search_alg,
            scheduler=scheduler,
            metric=metric if use_tc_metric else None,
            mode=mode if use_tc_metric and metric else None,
            max_concurrent_trials=common.max_concurrent or None,
            reuse_actors=True,
            trial_dirname_creator=_trial_dirname,
            trial_name_creator=_trial_dirname,
        )
        tuner = tune.Tuner(fn, param_space=space, tune_config=tune_config, run_config=run_config)
    return tuner.fit()
