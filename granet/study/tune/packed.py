"""A :class:`~granet.study.base.PackedTrial` in a Tune worker: its members trained together
(:class:`granet.pack.ProbePack`), each ending as a trial of its own."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from granet.study import results
from granet.study.base import TrialContext
from granet.study.tune.trial import Trial, end_diverged, end_stopped
from granet.study.tune.workerdata import shared_dataset

__all__ = ["packed_trainable"]

log = logging.getLogger("granet")

PACK_FILE = "pack.pt"


class _MemberHook:
    """Trainer callback of a packed member: buffer its epochs for MLflow, keep stable trunk
    checkpoints, and end the member at once when it diverges (its rows, its run)."""

    def __init__(self, trial: Trial) -> None:
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
            end_diverged(self.trial, f"diverged at epoch {exc.epoch + 1} ({exc.reason})")


def _open_runs(trials: list[Trial]) -> None:
    """Open the members' lazy MLflow runs with one search (members of one trunk)."""
    from granet.study.tracking import TrialRun

    runs = [t.run for t in trials if t.run is not None and t.run.run_id is None]
    if runs:
        try:
            TrialRun.open_all(runs)
        except Exception as exc:  # noqa: BLE001 - each run retries on its own flush
            log.warning("granet: warning: MLflow runs of a pack not opened together (%s: %s)",
                        type(exc).__name__, exc)


def _load_pack_checkpoint(pack_spec, trials: list[Trial], pack) -> bool:
    """Resume every member from the pack's own Tune checkpoint; False when there is none (or
    it does not hold every member: start the pack over, as a single trial would)."""
    from ray import tune

    from granet.io import CheckpointError, load_checkpoint

    own = tune.get_checkpoint()
    if own is None:
        return False
    try:
        with own.as_directory() as d:
            states = load_checkpoint(Path(d) / PACK_FILE, map_location=pack.device,
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


def packed_trainable(config: dict[str, Any], t0: float) -> None:
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
    trials = [Trial(spec, ctx, t0=t0, dataset=data, hook=_MemberHook) for spec in todo]
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
            save_checkpoint({"members": members}, Path(tmp) / PACK_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    try:
        outcome = pack.fit(after_epoch=after_epoch)
    except SystemExit:
        # a scheduler or stop criterion ended the pack: keep what its members trained
        running = [t for t in trials if t.trainer.status == "running"]
        _open_runs(running)
        for t in running:
            end_stopped(t)
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
