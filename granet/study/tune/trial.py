"""One granet trial inside a Tune worker: its trainer, its MLflow run, its checkpoints and its
Parquet rows, and how it ends (:mod:`granet.study.tune.trainable` tells the whole story). Shared
by the single trainable and the packed one (:mod:`granet.study.tune.packed`)."""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from granet.study import results
from granet.study.base import TrialContext, TrialSpec
from granet.study.paths import StudyPaths

__all__ = ["Trial", "build_trainer", "end_diverged", "end_stopped", "trial_from_tune_config"]

log = logging.getLogger("granet")

STATE_FILE = "state.pt"
_CONFIG_GROUPS = ("data", "model", "optim", "sparsity", "run")


def trial_from_tune_config(config: dict[str, Any]) -> tuple[TrialSpec, TrialContext]:
    """The checked TrialSpec and TrialContext of a Tune config (search samples merged in)."""
    trial = dict(config.get("trial") or {})
    # a search's sampled values arrive as top-level dotted config keys ("sparsity.regen_ratio")
    sets = {k: v for k, v in config.items() if k.split(".", 1)[0] in _CONFIG_GROUPS and "." in k}
    if sets:
        trial["sets"] = {**(trial.get("sets") or {}), **sets}
    for src, dst in (("trial_key", "key"), ("run_name", "run_name")):
        if src in config:
            trial[dst] = config[src]
    return TrialSpec.from_dict(trial), TrialContext.from_dict(config.get("context"))


def build_trainer(spec: TrialSpec, callbacks: list[Any] = (), dataset: Any = None):
    """The trainer of a trial (also used in-process by tests and benches)."""
    from granet.trainer import Trainer

    return Trainer(spec.config(), write=False, callbacks=list(callbacks), dataset=dataset)


class EpochHook:
    """Trainer callback: MLflow first, then stable trunk checkpoints, then ``tune.report``."""

    def __init__(self, trial: Trial) -> None:
        self.trial = trial

    def on_train_start(self, trainer) -> None: ...

    def on_checkpoint(self, trainer, path, record) -> None: ...

    def on_train_end(self, trainer, summary) -> None: ...

    def on_epoch_end(self, trainer, record: dict[str, Any]) -> None:
        from ray import tune

        from granet.io import save_checkpoint
        from granet.study.storage import save_checkpoint as save_stable

        t = self.trial
        epoch = trainer.epoch
        if t.run is not None:
            t.run.add_epochs([record])
            if t.ctx.mlflow_every_epoch:  # else sent before the next checkpoint, or at the end
                t.run.flush()
        if epoch in t.spec.save_epochs:
            save_stable(trainer.state_dict(), t.paths.trunk_checkpoint(t.spec.key, epoch))
        metrics = {**record, "trial_key": t.spec.key, "stage": t.spec.stage}
        if t.run is not None:
            metrics["mlflow_run_id"] = t.run.run_id  # a searcher links its trial to the run
        if not _checkpoint_due(trainer.cfg, epoch):
            tune.report(metrics)
            return
        if t.run is not None:
            t.run.flush()  # MLflow holds every epoch a retry would resume after
        t.write_epochs()
        with tempfile.TemporaryDirectory(prefix="granet-ckpt-") as tmp:
            state = trainer.state_dict()
            state["granet_branch"] = json.dumps(t.branch)
            save_checkpoint(state, Path(tmp) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _checkpoint_due(cfg, epoch: int) -> bool:
    """A Tune checkpoint every ``run.checkpoint_every`` epochs, not after the last one (the
    trial writes its results next; a retry would only redo that)."""
    return epoch % cfg.run.checkpoint_every == 0 and epoch < cfg.run.epochs


class Trial:
    """One start of one trial inside a Tune worker."""

    def __init__(self, spec: TrialSpec, ctx: TrialContext, *, t0: float | None = None,
                 dataset: Any = None, hook: Any = None) -> None:
        self.spec, self.ctx = spec, ctx
        self.paths = StudyPaths(ctx.study_dir)
        self.t0 = time.time() if t0 is None else t0
        self.run = None
        self.branch: dict[str, Any] = {}
        self.resumed_from = 0
        self.dataset = dataset
        self.hook = hook or EpochHook
        self.trainer = build_trainer(spec, [self.hook(self)], dataset)

    # ------------------------------------------------------------------ start
    def start(self) -> str | None:
        """Resume or branch. Returns a failure message when the trial cannot run."""
        from ray import tune

        from granet.io import CheckpointError, load_checkpoint

        own = tune.get_checkpoint()
        if own is not None:
            try:
                with own.as_directory() as d:
                    state = load_checkpoint(Path(d) / STATE_FILE,
                                            map_location=self.trainer.device)
                self.trainer.load_state_dict(state)
                self.resumed_from = self.trainer.epoch
                self.branch = json.loads(state.get("granet_branch") or "{}")
                return None
            except CheckpointError as exc:  # start over rather than fail for good
                log.warning("granet: warning: trial %s: %s; starting it over", self.spec.key, exc)
                self.trainer = build_trainer(self.spec, [self.hook(self)], self.dataset)
        p = self.spec.probe
        if p is not None:
            from granet.branch import branch
            from granet.study.storage import is_uri
            from granet.study.storage import load_checkpoint as load_stable

            try:
                src = load_stable(p.trunk_ckpt, self.trainer.device) if is_uri(p.trunk_ckpt) \
                    else p.trunk_ckpt
                res = branch(self.trainer, src, epoch_t=p.epoch_t, ratio=p.ratio,
                             scope=p.scope, structure=p.structure, regen=p.regen,
                             regrow_mode=p.regrow_mode)
            except CheckpointError as exc:
                return f"trunk checkpoint unusable: {exc}"
            self.branch = dict(res.__dict__)
        return None

    def open_run(self, lazy: bool = False) -> None:
        """The trial's MLflow run (``lazy``: found or created at its first flush)."""
        if self.ctx.tracking is None:
            return
        from granet.study.tracking import TrialRun

        spec = self.spec
        params: dict[str, Any] = {"stage": spec.stage, **spec.labels}
        params["train"] = _changed_train_values(spec)
        self.run = TrialRun(self.ctx.tracking, trial_key=spec.key, stage=spec.stage,
                            study=spec.study, parent_key=spec.parent_key,
                            run_name=spec.run_name or f"{spec.stage} {spec.key[:8]}",
                            params=params, lazy=lazy)
        if self.trainer.history:  # resumed: only the epochs the run does not hold yet
            self.run.add_epochs(self.trainer.history)

    # ------------------------------------------------------------------ end
    def write_epochs(self) -> None:
        s = self.spec
        base = {"key": s.key, "study": s.study, "stage": s.stage}
        results.write_rows(self.ctx.study_dir, "epochs", s.stage, s.key,
                           [{**base, **h} for h in self.trainer.history])

    def end(self, status: str, run_status: str, tags: dict[str, Any],
            message: str | None = None) -> None:
        """End the trial: MLflow gets every epoch it lacks, the final metrics and the tags in one
        call; then the Parquet rows (the trials row last: the trial is finished); then the run is
        closed. A worker killed in between loses nothing: before its trials row the trial runs
        again, and its run skips what it holds."""
        probe = None
        if self.spec.probe is not None and status == "done":
            probe = _probe_row(self.spec, self.branch, self.trainer)
        metrics = {k: probe[k] for k in _PROBE_METRICS if probe and probe.get(k) is not None}
        self._send(tags, metrics)
        self.write_results(status, message, probe)
        self._close(run_status)

    def write_results(self, status: str, message: str | None = None,
                      probe: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Every table row of the trial; the trials row last (its presence ends the trial).
        Returns the probe row (if any)."""
        from granet.config import config_to_dict

        s, tr, sd = self.spec, self.trainer, self.ctx.study_dir
        summary = tr.summary()
        self.write_epochs()
        results.write_rows(sd, "layers", s.stage, s.key,
                           [{"key": s.key, "study": s.study, "stage": s.stage, **r}
                            for r in tr.layer_history])
        if s.probe is not None and status == "done":
            probe = probe or _probe_row(s, self.branch, tr)
            results.write_rows(sd, "probes", s.stage, s.key, [probe])
        row = {
            "key": s.key, "study": s.study, "stage": s.stage, "parent_key": s.parent_key,
            "status": status, "config_json": json.dumps(config_to_dict(tr.cfg), sort_keys=True),
            "spec_json": json.dumps(s.labels, sort_keys=True, default=str),
            "method": tr.cfg.sparsity.method, "seed": tr.cfg.run.seed, "epochs": tr.epoch,
            **{m: summary.get(m) for m in results.FINAL_METRICS},
            "wall_seconds": time.time() - self.t0, "resumed_from": self.resumed_from,
            "finished_at": results.now_utc(), "message": message,
        }
        results.write_rows(sd, "trials", s.stage, s.key, [row])
        return probe

    def _send(self, tags: dict[str, Any] | None, metrics: dict[str, Any] | None) -> None:
        """One call: the epochs not sent yet, the final metrics, the tags (and the params of a
        run created now)."""
        if self.run is None:
            return
        try:
            self.run.flush(metrics, step=self.trainer.epoch, tags=tags)
        except Exception as exc:  # noqa: BLE001 - tracking must not lose a finished trial
            log.warning("granet: warning: trial %s: MLflow metrics not logged (%s: %s)",
                        self.spec.key, type(exc).__name__, exc)

    def _close(self, status: str) -> None:
        if self.run is None:
            return
        try:
            if status == "FINISHED":
                self._log_artifacts()
            self.run.finish(status)
        except Exception as exc:  # noqa: BLE001 - tracking must not lose a finished trial
            log.warning("granet: warning: trial %s: MLflow run not closed (%s: %s)",
                        self.spec.key, type(exc).__name__, exc)

    def finish_run(self, status: str, tags: dict[str, Any] | None = None,
                   metrics: dict[str, Any] | None = None) -> None:
        """Send what is pending and close the run (a trial ending on an error)."""
        self._send(tags, metrics)
        self._close(status)

    def _log_artifacts(self) -> None:
        eng = self.trainer.engine
        with tempfile.TemporaryDirectory(prefix="granet-art-") as tmp:
            p = Path(tmp) / "layer_densities.csv"
            lines = ["layer,density,numel"]
            for (name, d), n in zip(eng.layer_densities().items(), eng.sizes, strict=True):
                lines.append(f"{name},{d:.6f},{n}")
            p.write_text("\n".join(lines) + "\n")
            self.run.log_artifact(p)
            if self.spec.log_model:
                from granet.io import save_checkpoint

                m = Path(tmp) / "model.pt"
                save_checkpoint({"model": self.trainer.model.state_dict(),
                                 "masks": eng.state_dict()["masks"]}, m)
                self.run.log_artifact(m, "model")

    def fail(self, message: str) -> None:
        """End without retries: a trials row with status "failed" and the reason on file."""
        from granet.study.storage import atomic_write_text

        log.warning("granet: warning: trial %s failed: %s", self.spec.key, message)
        atomic_write_text(self.paths.failure(self.spec.key), message + "\n")
        self.end("failed", "FAILED", {"granet.status": "failed", "granet.error": message[:500]},
                 message)


def _changed_train_values(spec: TrialSpec) -> dict[str, Any]:
    from granet.config import non_default_values

    return non_default_values(spec.config())


def _probe_row(spec: TrialSpec, branch: dict[str, Any], trainer) -> dict[str, Any]:
    p = spec.probe
    assert p is not None
    acc_after = trainer.history[-1]["test_acc"] if trainer.history else math.nan
    return {
        "key": spec.key, "study": spec.study, "trunk_key": p.trunk_key, "kind": p.kind,
        "trunk_method": p.trunk_method, "trunk_density": p.trunk_density, "seed": p.seed,
        "model": p.model, "epoch_t": p.epoch_t, "ratio": p.ratio, "regen": p.regen,
        "scope": p.scope, "structure": p.structure, "k": p.k, "lr_t": p.lr_t,
        "acc_before": p.acc_before, "acc_pruned": branch.get("acc_pruned"),
        "acc_after": acc_after,
        "plasticity": acc_after - p.acc_before if p.kind == "plasticity" else None,
        "trunk_final_acc": p.trunk_final_acc,
        "final_gap": acc_after - p.trunk_final_acc if p.kind == "gap" else None,
        "density_before": branch.get("density_before"),
        "density_after": trainer.engine.density(), "pruned": branch.get("pruned"),
        "regrown": branch.get("regrown"), "branch_digest": branch.get("branch_digest"),
    }


_PROBE_METRICS = ("plasticity", "final_gap", "acc_before", "acc_pruned", "acc_after")


def end_diverged(trial: Trial, msg: str) -> None:
    log.warning("granet: warning: trial %s %s", trial.spec.key, msg)
    trial.end("diverged", "FAILED", {"granet.status": "diverged", "granet.error": msg}, msg)


def end_stopped(trial: Trial) -> None:
    try:
        trial.end("stopped", "KILLED", {"granet.status": "stopped", "granet.pruned": "true"})
    except Exception:  # noqa: BLE001 - at least close the run; SystemExit follows
        trial.finish_run("KILLED", tags={"granet.status": "stopped", "granet.pruned": "true"})
