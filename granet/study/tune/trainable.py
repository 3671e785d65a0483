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
process (and, for generated built-in sets, read from ``<study_dir>/cache/`` instead of being
generated again), and MLflow gets few, batched calls.

A :class:`~granet.study.base.PackedTrial` (``{"trial": {"members": [...]}}``) trains its members
together (:class:`granet.pack.ProbePack`): the trunk checkpoint is read once, each member
branches from it, one ``tune.report`` per epoch for the pack, one Tune checkpoint holding every
member's state. Each member ends as a trial of its own (its rows, its MLflow run, its status);
a member that diverges leaves the pack at once; an unusable trunk checkpoint fails every member
without retries.
"""

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

__all__ = ["build_trainer", "data_cache_file", "granet_trainable", "shared_dataset",
           "trial_from_tune_config"]

log = logging.getLogger("granet")

_STATE_FILE = "state.pt"
_PACK_FILE = "pack.pt"
_CONFIG_GROUPS = ("data", "model", "optim", "sparsity", "run")

# ---------------------------------------------------------------------------------- data sets

# Data sets built in this worker process (Tune reuses actors: every trial of a worker after the
# first gets its data for free). Keyed by everything load_dataset depends on.
_DATA: dict[Any, Any] = {}
# Built-in sets that are generated (not read from files): cached on disk in the study directory,
# so a new worker reads them instead of generating them again (mnist1d: ~1.2 s).
_GENERATED = ("mnist1d", "fake")


def _data_ident(cfg) -> str | None:
    from granet.data import is_user_data
    from granet.trainer import DATA_SPLIT_SEED

    d = cfg.data
    if is_user_data(d.name):
        return None  # user code: called as the trainer calls it (it may not be deterministic)
    return json.dumps([d.name.lower(), d.data_dir, d.num_samples, d.val_fraction,
                       DATA_SPLIT_SEED, bool(d.augment)])


def data_cache_file(cfg, study_dir: str | Path) -> Path | None:
    """Where a generated built-in data set of ``cfg`` is cached in the study directory (None:
    not cached on disk). The name hashes every input of its generation and the versions of
    torch and the generator package."""
    import hashlib

    ident = _data_ident(cfg)
    if ident is None or cfg.data.name.lower() not in _GENERATED:
        return None
    try:
        from importlib.metadata import version

        gen = version("mnist1d") if cfg.data.name.lower() == "mnist1d" else ""
    except Exception:  # noqa: BLE001 - the version only keys the cache
        gen = "?"
    import torch

    digest = hashlib.sha256(f"{ident}|{gen}|{torch.__version__}".encode()).hexdigest()[:16]
    # a URI study_dir: the cache is in this node's local state directory (paths.py)
    return StudyPaths(study_dir).cache / f"data-{cfg.data.name.lower()}-{digest}.pt"


def _load_data(cfg):
    from granet.data import load_dataset
    from granet.trainer import DATA_SPLIT_SEED

    d = cfg.data
    return load_dataset(d.name, data_dir=d.data_dir, download=d.download,
                        val_fraction=d.val_fraction, seed=DATA_SPLIT_SEED,
                        num_samples=d.num_samples, augment=d.augment)


def _read_cache(path: Path):
    from granet.data import Dataset, Split
    from granet.io import CheckpointError, load_checkpoint

    try:
        s = load_checkpoint(path)
        return Dataset(name=s["name"], train=Split(s["train_x"], s["train_y"]),
                       val=Split(s["val_x"], s["val_y"]), test=Split(s["test_x"], s["test_y"]),
                       num_classes=int(s["num_classes"]), input_shape=tuple(s["input_shape"]),
                       augment=s["augment"] or None)
    except (CheckpointError, KeyError, TypeError):
        return None


def _write_cache(path: Path, ds) -> None:
    from granet.io import save_checkpoint

    try:
        save_checkpoint({"name": ds.name, "train_x": ds.train.x, "train_y": ds.train.y,
                         "val_x": ds.val.x, "val_y": ds.val.y, "test_x": ds.test.x,
                         "test_y": ds.test.y, "num_classes": int(ds.num_classes),
                         "input_shape": list(ds.input_shape), "augment": ds.augment or ""},
                        path)
    except OSError as exc:  # a cache: never a reason to fail a trial
        log.warning("granet: warning: data cache %s not written (%s)", path, exc)


def shared_dataset(cfg, study_dir: str | Path | None = None, device: Any = None):
    """The data set of ``cfg`` for this worker's trials: built once per process (and moved to
    ``device`` once, so packed trainers share one copy), read from the study directory's cache
    when it is a generated built-in set. None for user data sets (the trainer loads those)."""
    ident = _data_ident(cfg)
    if ident is None:
        return None
    ds = _DATA.get(ident)
    if ds is None:
        path = data_cache_file(cfg, study_dir) if study_dir else None
        ds = _read_cache(path) if path is not None and path.is_file() else None
        if ds is None:
            ds = _load_data(cfg)
            if path is not None:
                _write_cache(path, ds)
        _DATA[ident] = ds
    if device is not None and str(device) != "cpu":
        key = (ident, str(device))
        if key not in _DATA:
            _DATA[key] = ds.to(device)
        ds = _DATA[key]
    return ds


def prepare_data_cache(cfg, study_dir: str | Path) -> None:
    """Write the data cache of ``cfg`` if it is a generated built-in set and absent (the
    driver does this while Ray starts, so no worker generates it)."""
    path = data_cache_file(cfg, study_dir)
    if path is None or path.is_file():
        return
    ds = _load_data(cfg)
    _write_cache(path, ds)


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


class _EpochHook:
    """Trainer callback: MLflow first, then stable trunk checkpoints, then ``tune.report``."""

    def __init__(self, trial: _Trial) -> None:
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
            save_checkpoint(state, Path(tmp) / _STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _checkpoint_due(cfg, epoch: int) -> bool:
    """A Tune checkpoint every ``run.checkpoint_every`` epochs, not after the last one (the
    trial writes its results next; a retry would only redo that)."""
    return epoch % cfg.run.checkpoint_every == 0 and epoch < cfg.run.epochs


class _Trial:
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
        self.hook = hook or _EpochHook
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
                    state = load_checkpoint(Path(d) / _STATE_FILE,
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


def granet_trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one granet training run (trunk, probe, search trial, ...)."""
    t0 = time.time()  # the trial's wall time counts its imports (a new worker's first trial)
    import torch

    from granet.study.base import is_packed
    from granet.trainer import Diverged

    if is_packed(config.get("trial")):
        return _packed_trainable(config, t0)
    spec, ctx = trial_from_tune_config(config)
    if results.trial_status(ctx.study_dir, spec.stage, spec.key) in results.FINISHED:
        return  # a restored experiment relaunched a trial that had finished: nothing to do
    torch.set_num_threads(ctx.num_threads)
    cfg = spec.config()
    from granet.trainer import resolve_device

    data = shared_dataset(cfg, ctx.study_dir, resolve_device(cfg.run.device))
    trial = _Trial(spec, ctx, t0=t0, dataset=data)
    problem = trial.start()
    trial.open_run()
    if problem is not None:
        trial.fail(problem)
        return
    try:
        trial.trainer.fit(resume=False)
    except Diverged as exc:
        _end_diverged(trial, f"diverged at epoch {exc.epoch + 1} ({exc.reason})")
        return
    except SystemExit:
        # tune.report raised: a scheduler (ASHA) or a stop criterion ended the trial. Keep
        # what it trained, as "stopped" (its MLflow run already holds every reported epoch).
        _end_stopped(trial)
        raise
    except BaseException:
        trial.finish_run("FAILED")
        raise
    trial.end("done", "FINISHED", {"granet.status": "done"})


# ---------------------------------------------------------------------------------- packs


class _MemberHook:
    """Trainer callback of a packed member: buffer its epochs for MLflow, keep stable trunk
    checkpoints, and end the member at once when it diverges (its rows, its run)."""

    def __init__(self, trial: _Trial) -> None:
        self.trial = trial

    def on_train_start(self, trainer) -> None: ...

    def on_checkpoint(self, trainer, path, record) -> None: ...

    def on_epoch_end(self, trainer, record: dict[str, Any]) -> None:
        from granet.study.storage import save_checkpoint

        t = self.trial
        if t.run is not None:
            t.run.add_epochs([record])
        if trainer.epoch in t.spec.save_epochs:
            save_checkpoint(trainer.state_dict(),
                            t.paths.trunk_checkpoint(t.spec.key, trainer.epoch))

    def on_train_end(self, trainer, summary) -> None:
        if trainer.status == "diverged":
            exc = trainer.diverged
            _end_diverged(self.trial, f"diverged at epoch {exc.epoch + 1} ({exc.reason})")


def _end_diverged(trial: _Trial, msg: str) -> None:
    log.warning("granet: warning: trial %s %s", trial.spec.key, msg)
    trial.end("diverged", "FAILED", {"granet.status": "diverged", "granet.error": msg}, msg)


def _end_stopped(trial: _Trial) -> None:
    try:
        trial.end("stopped", "KILLED", {"granet.status": "stopped", "granet.pruned": "true"})
    except Exception:  # noqa: BLE001 - at least close the run; SystemExit follows
        trial.finish_run("KILLED", tags={"granet.status": "stopped", "granet.pruned": "true"})


def _open_runs(trials: list[_Trial]) -> None:
    """Open the members' lazy MLflow runs with one search (members of one trunk)."""
    from granet.study.tracking import TrialRun

    runs = [t.run for t in trials if t.run is not None and t.run.run_id is None]
    if runs:
        try:
            TrialRun.open_all(runs)
        except Exception as exc:  # noqa: BLE001 - each run retries on its own flush
            log.warning("granet: warning: MLflow runs of a pack not opened together (%s: %s)",
                        type(exc).__name__, exc)


def _load_pack_checkpoint(pack_spec, trials: list[_Trial], pack) -> bool:
    """Resume every member from the pack's own Tune checkpoint; False when there is none (or
    it does not hold every member: start the pack over, as a single trial would)."""
    from ray import tune

    from granet.io import CheckpointError, load_checkpoint

    own = tune.get_checkpoint()
    if own is None:
        return False
    try:
        with own.as_directory() as d:
            states = load_checkpoint(Path(d) / _PACK_FILE, map_location=pack.device,
                                     keys=("members",))["members"]
    except CheckpointError as exc:
        log.warning("granet: warning: pack %s: %s; starting it over", pack_spec.key, exc)
        return False
    if not all(t.spec.key in states for t in trials):
        log.warning("granet: warning: pack %s: its checkpoint lacks members; starting it over",
                    pack_spec.key)
        return False
    for i, t in enumerate(trials):
        state = states[t.spec.key]
        pack.call(i, lambda tr, state=state: tr.load_state_dict(state))
        t.resumed_from = t.trainer.epoch
        t.branch = json.loads(state.get("granet_branch") or "{}")
    return True


def _packed_trainable(config: dict[str, Any], t0: float) -> None:
    """A :class:`~granet.study.base.PackedTrial`: its unfinished members trained together."""
    import torch
    from ray import tune

    from granet.branch import branch, state_digest
    from granet.io import CheckpointError, save_checkpoint
    from granet.pack import ProbePack
    from granet.study.base import PackedTrial
    from granet.study.storage import load_checkpoint
    from granet.trainer import resolve_device

    pack_spec = PackedTrial.from_dict(config.get("trial"))
    ctx = TrialContext.from_dict(config.get("context"))
    todo = [m for m in pack_spec.members
            if results.trial_status(ctx.study_dir, m.stage, m.key) not in results.FINISHED]
    if not todo:
        return  # a restored experiment relaunched a pack whose members had all finished
    torch.set_num_threads(ctx.num_threads)
    cfg = todo[0].config()
    device = resolve_device(cfg.run.device)
    data = shared_dataset(cfg, ctx.study_dir, device)
    trials = [_Trial(spec, ctx, t0=t0, dataset=data, hook=_MemberHook) for spec in todo]
    pack = ProbePack([t.trainer for t in trials], mode=pack_spec.mode)
    for t in trials:
        t.open_run(lazy=True)
    if not _load_pack_checkpoint(pack_spec, trials, pack):
        p0 = todo[0].probe
        problem = None
        if p0 is not None:
            try:  # one read of the trunk checkpoint for every member
                state = load_checkpoint(p0.trunk_ckpt, map_location=device,
                                        keys=("model", "engine"))
                digest = state_digest(state["model"], state["engine"]["masks"])
            except CheckpointError as exc:
                problem = f"trunk checkpoint unusable: {exc}"
        if problem is not None:
            _open_runs(trials)
            for t in trials:
                t.fail(problem)
            return
        for i, t in enumerate(trials):
            p = t.spec.probe
            if p is None:
                continue
            res = pack.call(i, lambda tr, p=p: branch(
                tr, state, epoch_t=p.epoch_t, ratio=p.ratio, scope=p.scope,
                structure=p.structure, regen=p.regen, regrow_mode=p.regrow_mode, digest=digest))
            t.branch = dict(res.__dict__)

    every, total = cfg.run.checkpoint_every, cfg.run.epochs

    def after_epoch(epoch: int) -> None:
        live = [(i, t) for i, t in enumerate(trials) if t.trainer.status == "running"]
        accs = [t.trainer.history[-1]["test_acc"] for _, t in live if t.trainer.history]
        metrics = {"epoch": epoch, "trial_key": pack_spec.key, "stage": pack_spec.stage,
                   "members": len(live), "test_acc": max(accs) if accs else math.nan}
        if not (epoch % every == 0 and epoch < total) or not live:
            tune.report(metrics)
            return
        _open_runs([t for _, t in live])
        for _, t in live:
            if t.run is not None:
                t.run.flush()  # MLflow holds every epoch a retry would resume after
            t.write_epochs()
        with tempfile.TemporaryDirectory(prefix="granet-ckpt-") as tmp:
            members = {}
            for i, t in live:
                st = pack.state_dict(i)
                st["granet_branch"] = json.dumps(t.branch)
                members[t.spec.key] = st
            save_checkpoint({"members": members}, Path(tmp) / _PACK_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    try:
        outcome = pack.fit(after_epoch=after_epoch)
    except SystemExit:
        # a scheduler or stop criterion ended the pack: keep what its members trained
        running = [t for t in trials if t.trainer.status == "running"]
        _open_runs(running)
        for t in running:
            _end_stopped(t)
        raise
    except BaseException:
        for t in trials:
            if t.trainer.status == "running" and t.run is not None and t.run.run_id is not None:
                t.finish_run("FAILED")
        raise
    done = [t for t, r in zip(trials, outcome, strict=True) if isinstance(r, dict)]
    _open_runs(done)
    for t in done:
        t.end("done", "FINISHED", {"granet.status": "done"})
