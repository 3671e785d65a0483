"""The Ray Tune function trainable around :class:`granet.trainer.Trainer` (no second loop).

``granet_trainable(config)`` builds the trainer from ``config["train"]`` (+ ``"set:<dotted>"``
overrides), resumes from ``tune.get_checkpoint()`` when Tune retries or restores the trial, or -
for a plasticity probe on its first start - branches from its trunk's checkpoint. Then every epoch
(a trainer callback):

* ``tune.report(metrics, checkpoint=...)``; the complete trainer state is attached every
  ``run.checkpoint_every`` epochs and at the last epoch (Tune keeps the latest, see runner.py);
* trunk checkpoints at the ``save_epochs`` go to stable files outside Tune's rotation:
  ``<study_dir>/checkpoints/<trial_key>/epoch-<t:04d>.pt`` (probes branch from those);
* per-epoch metrics go to the trial's MLflow child run in one batched call (step = epoch).

At the end it writes its Parquet rows (results.py: trials, epochs, layers, + probes) and closes
its MLflow run. Config keys are listed in API.md; a ``"trial"`` dict (what a grid search varies)
is merged into the top level first.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from granet.study import results

__all__ = ["granet_trainable", "build_trainer", "trunk_checkpoint_path", "TEST_FAIL_ENV"]

TEST_FAIL_ENV = "GRANET_TEST_FAIL_ONCE"  # test-only: marker file path; fail once at epoch 2
_STATE_FILE = "state.pt"


def trunk_checkpoint_path(study_dir: str | Path, trunk_key: str, epoch: int) -> Path:
    return Path(study_dir) / "checkpoints" / trunk_key / f"epoch-{epoch:04d}.pt"


def _merge(config: dict[str, Any]) -> dict[str, Any]:
    config = dict(config)
    trial = config.pop("trial", None)
    if isinstance(trial, dict):
        config.update(trial)
    return config


def build_trainer(config: dict[str, Any], callbacks=()):
    """The trainer of a trial config (also used in-process by tests and benches)."""
    from granet.study.common import train_config
    from granet.trainer import Trainer

    config = _merge(config)
    sets = {k[4:]: v for k, v in config.items() if k.startswith("set:")}
    cfg = train_config(config["train"], sets)
    return Trainer(cfg, write=False, callbacks=list(callbacks))


class _TuneCallback:
    """Report to Tune, save probe-epoch files, log MLflow metrics, test-only failure hook."""

    def __init__(self, config: dict[str, Any], run, extra: dict[str, Any]) -> None:
        self.config = config
        self.run = run
        self.extra = extra
        self.key = config["trial_key"]
        self.stage = config.get("stage", "trial")
        self.study_dir = config["study_dir"]
        self.save_epochs = set(int(e) for e in config.get("save_epochs") or ())
        self.fail_marker = config.get("test_fail_once") or os.environ.get(TEST_FAIL_ENV)

    def on_train_start(self, trainer) -> None: ...

    def on_checkpoint(self, trainer, path, record) -> None: ...

    def on_train_end(self, trainer, summary) -> None: ...

    def on_epoch_end(self, trainer, record: dict[str, Any]) -> None:
        from ray import tune

        from granet.io import save_checkpoint

        epoch = trainer.epoch
        if epoch in self.save_epochs:
            save_checkpoint(trainer.state_dict(),
                            trunk_checkpoint_path(self.study_dir, self.key, epoch))
        metrics = {**record, "trial_key": self.key, "stage": self.stage}
        due = epoch % trainer.cfg.run.checkpoint_every == 0 or epoch >= trainer.cfg.run.epochs
        if due:
            results.write_rows(self.study_dir, "epochs", self.stage, self.key,
                               _epoch_rows(trainer.history, self.key, self.config))
            with tempfile.TemporaryDirectory(prefix="granet-ckpt-") as tmp:
                state = trainer.state_dict()
                state["granet_extra"] = json.dumps(self.extra)
                save_checkpoint(state, Path(tmp) / _STATE_FILE)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        else:
            tune.report(metrics)
        if self.run is not None:
            self.run.log_epoch(record)
        if self.fail_marker and epoch == 2 and not Path(self.fail_marker).exists():
            Path(self.fail_marker).parent.mkdir(parents=True, exist_ok=True)
            Path(self.fail_marker).write_text(self.key)
            raise RuntimeError(f"{TEST_FAIL_ENV}: test-only failure of {self.key} at epoch 2")


def _epoch_rows(history: list[dict[str, Any]], key: str, config: dict[str, Any]) -> list[dict]:
    base = {"key": key, "study": config.get("study"), "stage": config.get("stage")}
    return [{**base, **h} for h in history]


def granet_trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one granet training run (trunk, probe, search trial, ...)."""
    import torch
    from ray import tune

    from granet.io import load_checkpoint

    t0 = time.time()
    config = _merge(config)
    torch.set_num_threads(max(1, int(config.get("num_threads") or 1)))
    key = config["trial_key"]
    stage = config.get("stage", "trial")
    study = config.get("study", "")
    probe = config.get("probe")

    extra: dict[str, Any] = {}
    cb = _TuneCallback(config, None, extra)
    trainer = build_trainer(config, callbacks=[cb])

    own = tune.get_checkpoint()
    resumed_from = 0
    if own is not None:
        with own.as_directory() as d:
            state = load_checkpoint(Path(d) / _STATE_FILE, map_location=trainer.device)
        trainer.load_state_dict(state)
        resumed_from = trainer.epoch
        extra.update(json.loads(state.get("granet_extra") or "{}"))
    elif probe:
        from granet.study.plasticity import branch

        extra.update(branch(trainer, probe))

    run = None
    tracking = config.get("tracking")
    if tracking:
        from granet.study.tracking import TrialRun

        params = {"train": _train_dict(trainer.cfg), "stage": stage, "trial_key": key}
        if probe:
            params["probe"] = {k: v for k, v in probe.items() if k != "trunk_ckpt"}
        if config.get("spec"):
            params["spec"] = config["spec"]
        run = TrialRun(
            tracking, trial_key=key, stage=stage, study=study,
            parent_key=config.get("parent_key"),
            run_name=config.get("run_name") or f"{stage}-{key[:8]}", params=params,
        )
        if run.reopened and trainer.history:
            last = run.last_logged_step()
            for rec in trainer.history:
                if int(rec["epoch"]) > last:
                    run.log_epoch(rec)
        cb.run = run

    try:
        summary = trainer.fit(resume=False)
    except Exception:
        _finish(run, "FAILED")
        raise
    except BaseException:
        # SystemExit from tune.report: Tune stopped the trial (a scheduler such as ASHA, or a
        # stop criterion). Keep what it trained: rows with status "stopped" (not "done").
        try:
            _write_results(config, trainer, trainer.summary(), extra, time.time() - t0,
                           resumed_from, status="stopped")
        finally:
            _finish(run, "KILLED")
        raise

    _write_results(config, trainer, summary, extra, time.time() - t0, resumed_from)
    if run is not None:
        _log_final_artifacts(run, trainer, config)
        run.finish("FINISHED")


def _finish(run, status: str) -> None:
    if run is not None:
        try:
            run.finish(status)
        except Exception:
            pass


def _train_dict(cfg) -> dict[str, Any]:
    from granet.config import config_to_dict

    return config_to_dict(cfg)


def _write_results(config, trainer, summary, extra, seconds: float, resumed_from: int,
                   status: str = "done") -> None:
    key, stage = config["trial_key"], config.get("stage", "trial")
    study_dir, study = config["study_dir"], config.get("study", "")
    cfg = trainer.cfg
    results.write_rows(study_dir, "epochs", stage, key, _epoch_rows(trainer.history, key, config))
    results.write_rows(
        study_dir, "layers", stage, key,
        [{"key": key, "study": study, "stage": stage, **r} for r in trainer.layer_history],
    )
    probe = config.get("probe")
    if probe and status == "done":
        from granet.study.plasticity import probe_row

        row = probe_row(config, extra, trainer)
        results.write_rows(study_dir, "probes", stage, key, [row])
    row = {
        "key": key, "study": study, "stage": stage, "parent_key": config.get("parent_key"),
        "status": status, "config_json": json.dumps(_train_dict(cfg), sort_keys=True),
        "spec_json": json.dumps(config.get("spec") or probe or {}, sort_keys=True, default=str),
        "method": cfg.sparsity.method, "seed": cfg.run.seed, "epochs": trainer.epoch,
        **{m: summary.get(m) for m in results.FINAL_METRICS},
        "wall_seconds": seconds, "resumed_from": resumed_from,
        "finished_at": results.now_utc(),
    }
    # The trials row goes last: its presence marks the trial done.
    results.write_rows(study_dir, "trials", stage, key, [row])


def _log_final_artifacts(run, trainer, config) -> None:
    with tempfile.TemporaryDirectory(prefix="granet-art-") as tmp:
        p = Path(tmp) / "layer_densities.csv"
        lines = ["layer,density,numel"]
        for (name, d), n in zip(
            trainer.engine.layer_densities().items(), trainer.engine.sizes, strict=True
        ):
            lines.append(f"{name},{d:.6f},{n}")
        p.write_text("\n".join(lines) + "\n")
        run.log_artifact(p)
        if config.get("log_model"):
            from granet.io import save_checkpoint

            m = Path(tmp) / "model.pt"
            save_checkpoint({"model": trainer.model.state_dict(),
                             "masks": trainer.engine.state_dict()["masks"]}, m)
            run.log_artifact(m, "model")
