"""The Ray Tune function trainable around :class:`granet.trainer.Trainer` (no second loop).

Tune hands ``granet_trainable`` a config ``{"trial": TrialSpec dict, "context": TrialContext
dict}``; a search adds its sampled values under their dotted config keys and the ``"trial_key"`` /
``"run_name"`` its space function derives. Both dicts are checked against the contract
(:class:`granet.study.base.TrialSpec`) before any work.

The trial resumes from ``tune.get_checkpoint()`` when Tune retries or restores it, or - for a
plasticity probe on its first start - branches from its trunk's checkpoint
(:func:`granet.branch.branch`). Every epoch: the epoch's metrics go to the trial's MLflow child
run (first, so a trial that a scheduler stops keeps them; in a grid stage, where no scheduler
stops trials, they are batched until the next Tune checkpoint: ``TrialContext.mlflow_every_epoch``),
trunk checkpoints at ``save_epochs`` go to stable files, and ``tune.report`` carries the complete
trainer state every ``run.checkpoint_every`` epochs (not after the last epoch: the trial writes
its results next, nothing would resume from it).

A trial ends in this order: MLflow gets every epoch it lacks, the final metrics and the tags (one
call); then the Parquet rows, the trials row last (the trial is finished); then the run is closed.

How a trial ends (``trials.status``): "done"; "diverged" (non-finite loss or weights: its last
finite metrics are kept, it is not retried - it would diverge again); "stopped" (a scheduler
such as ASHA stopped it: ``tune.report`` raises ``SystemExit``); "failed" without retries when
its input is unusable (its trunk checkpoint is unreadable: the driver retrains the trunk on the
next run); any other exception is left to Tune, which retries from the last checkpoint.

What a trial costs besides its epochs is kept small: the data set is built once per worker
process (and, for generated built-in sets, read from the data cache ``StudyPaths.cache``
instead of being generated again), and MLflow gets few, batched calls.

A :class:`~granet.study.base.PackedTrial` (``{"trial": {"members": [...]}}``) trains its members
together (:class:`granet.pack.ProbePack`): the trunk checkpoint is read once, each member
branches from it, one ``tune.report`` per epoch for the pack, one Tune checkpoint holding every
member's state. Each member ends as a trial of its own (its rows, its MLflow run, its status);
a member that diverges leaves the pack at once; an unusable trunk checkpoint fails every member
without retries.
"""

from __future__ import annotations

import time
from typing import Any

from granet.study import results
from granet.study.tune.packed import packed_trainable
from granet.study.tune.trial import (
    Trial,
    build_trainer,
    end_diverged,
    end_stopped,
    trial_from_tune_config,
)
from granet.study.tune.workerdata import data_cache_file, prepare_data_cache, shared_dataset

__all__ = ["build_trainer", "data_cache_file", "granet_trainable", "prepare_data_cache",
           "shared_dataset", "trial_from_tune_config"]


def granet_trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one granet training run (trunk, probe, search trial, ...)."""
    t0 = time.time()  # the trial's wall time counts its imports (a new worker's first trial)
    import torch

    from granet.study.base import is_packed
    from granet.trainer import Diverged

    if is_packed(config.get("trial")):
        return packed_trainable(config, t0)
    spec, ctx = trial_from_tune_config(config)
    if results.trial_status(ctx.study_dir, spec.stage, spec.key) in results.FINISHED:
        return  # a restored experiment relaunched a trial that had finished: nothing to do
    torch.set_num_threads(ctx.num_threads)
    cfg = spec.config()
    from granet.trainer import resolve_device

    data = shared_dataset(cfg, ctx.study_dir, resolve_device(cfg.run.device))
    trial = Trial(spec, ctx, t0=t0, dataset=data)
    problem = trial.start()
    trial.open_run()
    if problem is not None:
        trial.fail(problem)
        return
    try:
        trial.trainer.fit(resume=False)
    except Diverged as exc:
        end_diverged(trial, f"diverged at epoch {exc.epoch + 1} ({exc.reason})")
        return
    except SystemExit:
        # tune.report raised: a scheduler (ASHA) or a stop criterion ended the trial. Keep
        # what it trained, as "stopped" (its MLflow run already holds every reported epoch).
        end_stopped(trial)
        raise
    except BaseException:
        trial.finish_run("FAILED")
        raise
    trial.end("done", "FINISHED", {"granet.status": "done"})
