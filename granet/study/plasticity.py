"""Pruning plasticity study (SPEC §6) by checkpoint branching.

Stage 1, trunks: one trial per (trunk density, seed) - dense for density 1.0, else
``trunk_method`` (default "static", uniform layer densities) - trained to the end; full checkpoints
at the probe epochs are kept as stable files (``<study_dir>/checkpoints/<trunk>/epoch-<t>.pt``).

Stage 2, probes: one trial per (trunk, t, ratio p, regeneration on/off, scope, structure[, kind]).
A probe loads the trunk checkpoint at t (weights, masks, optimizer state:
``Trainer.load_weights_and_masks``), prunes p of the remaining weights in one shot
(``engine.prune_fraction``), optionally regrows the same number per layer by gradient magnitude
(gradient of one training minibatch; new weights 0), then trains with the mask fixed
(``sparsity.method=static``; the loaded masks replace static's random ones):

* kind "plasticity": k epochs at the trunk's LR at t (``optim.schedule=constant``,
  ``optim.lr=lr_at_epoch(trunk, t)``); pruning plasticity = test acc after k - test acc at t;
* kind "gap" (``final_gap: true``): to the end with the rest of the trunk's schedule (milestones
  shifted by -t, ``run.epochs = total - t``); gap = its final test acc - the trunk's final one.

Every trial has a key (hash of its config and its parent's key). A re-run reads the ``trials``
table and launches only what is missing (an identical re-run launches zero trials); an interrupted
stage is restored from its Tune experiment (named after the hash of its missing keys), so
unfinished trials resume from their own checkpoints.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from granet.config import (
    GROWTH,
    METHODS,
    PRUNE_SCOPES,
    STRUCTURES,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
)
from granet.study import results
from granet.study.common import (
    StudyCommon,
    load_study_config,
    study_to_dict,
    trial_key,
    validate_train,
)
from granet.study.trainable import trunk_checkpoint_path

__all__ = [
    "PlasticityStudy",
    "plan",
    "branch",
    "probe_row",
    "state_digest",
    "probe_config",
    "trunk_config",
    "run_plasticity_study",
]


@dataclass
class PlasticityStudy(StudyCommon):
    """A plasticity study (YAML fields; see studies/configs/plasticity_*.yaml)."""

    trunk_method: str = "static"
    trunk_densities: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.1, 0.02])
    trunk_distribution: str = "uniform"
    models: list[str] = field(default_factory=list)  # trunk models (empty: train.model.name)
    probe_epochs: list[int] = field(default_factory=list)
    probe_every: int = 0  # also probe every E epochs (0: off)
    probe_around_decay: bool = True  # also the epochs before and after each LR milestone
    ratios: list[float] = field(default_factory=lambda: [0.2, 0.5, 0.9, 0.98])
    regen: list[bool] = field(default_factory=lambda: [False, True])
    scopes: list[str] = field(default_factory=lambda: ["global"])
    structures: list[str] = field(default_factory=lambda: ["unstructured"])
    k: int = 30
    final_gap: bool = False
    regrow_mode: str = "gradient"
    log_model: bool = False

    def smoke(self) -> PlasticityStudy:
        out = super().smoke()
        t = out.train
        t.data.name = "mnist1d"
        t.data.num_samples = 1000
        t.data.batch_size = 64
        t.model.name, t.model.kwargs = "mlp", {"hidden": [32, 32]}
        t.run.epochs = 4
        t.run.checkpoint_every = 1
        t.sparsity.prune_start_epoch, t.sparsity.prune_end_epoch = 0.0, 2.0
        t.sparsity.update_interval = 5
        t.optim.schedule = "multistep"
        t.optim.milestones = [2, 3]
        t.optim.warmup_epochs = 0
        out.trunk_densities = [1.0, 0.1]
        out.probe_epochs, out.probe_every, out.probe_around_decay = [1, 3], 0, False
        out.ratios = [0.5, 0.9]
        out.regen = [False, True]
        out.scopes, out.structures = out.scopes[:1], out.structures[:1]
        out.k = 2
        out.final_gap = False
        out.name = f"{self.name}-smoke" if not self.name.endswith("-smoke") else self.name
        return out

    def epochs_t(self) -> list[int]:
        """The probe epochs t (epochs completed by the trunk), sorted."""
        total = self.train.run.epochs
        ts = set(self.probe_epochs)
        if self.probe_every > 0:
            ts.update(range(self.probe_every, total, self.probe_every))
        if self.probe_around_decay and self.train.optim.schedule == "multistep":
            for m in self.train.optim.milestones:
                ts.update((m - 1, m + 1))
        return sorted(t for t in ts if 1 <= t < total)

    def check(self) -> None:
        # train.sparsity is replaced per trunk: validate the derived trunk/probe configs instead.
        self.check_common()
        _in("trunk_method", self.trunk_method, METHODS)
        _in("trunk_distribution", self.trunk_distribution, ("uniform", "er", "erk"))
        if not self.trunk_densities:
            raise ConfigError("trunk_densities=[]: needs at least one density in (0, 1]")
        for d in self.trunk_densities:
            if not 0.0 < d <= 1.0:
                raise ConfigError(f"trunk_densities={self.trunk_densities!r}: each in (0, 1]")
        if not self.ratios:
            raise ConfigError("ratios=[]: needs at least one pruning ratio in (0, 1)")
        for r in self.ratios:
            if not 0.0 < r < 1.0:
                raise ConfigError(f"ratios={self.ratios!r}: each must be in (0, 1)")
        if not self.regen:
            raise ConfigError("regen=[]: needs false and/or true")
        for s in self.scopes:
            _in("scopes", s, PRUNE_SCOPES)
        for s in self.structures:
            _in("structures", s, STRUCTURES)
        if not self.scopes or not self.structures:
            raise ConfigError("scopes/structures: need at least one value each")
        _in("regrow_mode", self.regrow_mode, GROWTH)
        if self.k < 1:
            raise ConfigError(f"k={self.k!r}: must be >= 1 epoch")
        if self.probe_every < 0:
            raise ConfigError(f"probe_every={self.probe_every!r}: must be >= 0 (0: off)")
        total = self.train.run.epochs
        for t in self.probe_epochs:
            if not 1 <= t < total:
                raise ConfigError(
                    f"probe_epochs={self.probe_epochs!r}: each must be in [1, train.run.epochs-1"
                    f"={total - 1}]"
                )
        ts = self.epochs_t()
        if not ts:
            raise ConfigError(
                "probe_epochs/probe_every/probe_around_decay: select no epoch t in "
                f"[1, {total - 1}]; give probe_epochs"
            )
        w = self.train.optim.warmup_epochs
        if w and ts[0] < w:
            raise ConfigError(
                f"probe_epochs: t={ts[0]} lies in the warm-up (train.optim.warmup_epochs={w}); "
                "probes must branch after it"
            )
        if self.final_gap and self.train.optim.schedule == "cosine":
            raise ConfigError(
                "final_gap=true: needs train.optim.schedule multistep or constant (a cosine "
                "schedule cannot be continued by shifting it); allowed: multistep, constant"
            )
        from granet.models import validate_model_name

        for m in self.models:
            try:
                validate_model_name(m)
            except ValueError as exc:
                raise ConfigError(f"models: {exc}") from None
        for d, m in itertools.product(self.trunk_densities, self.models or [None]):
            tc = trunk_config(self, d, self.seeds[0], m)  # every trunk/probe config must validate
            validate_train(tc)
            for t in ts[:1]:
                validate_train(probe_config(tc, t, "plasticity", self.k))


def _in(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}: {value!r} is not allowed; allowed: {', '.join(allowed)}")


# ---------------------------------------------------------------------------------- configs


def trunk_config(
    study: PlasticityStudy, density: float, seed: int, model: str | None = None
) -> Config:
    cfg = copy.deepcopy(study.train)
    if model and model != cfg.model.name:
        cfg.model.name, cfg.model.kwargs = model, {}
    s = cfg.sparsity
    if density >= 1.0:
        s.method, s.final_density, s.init_density = "dense", 1.0, 1.0
    else:
        s.method = study.trunk_method
        s.final_density = density
        s.distribution = study.trunk_distribution
        if s.method in ("gmp", "granet"):
            s.init_density = max(s.init_density, density)
    cfg.run.seed = seed
    cfg.run.keep_epochs = []
    return cfg


def probe_config(trunk: Config, t: int, kind: str, k: int) -> Config:
    """The probe's training config: static masks (loaded), the trunk's LR at t."""
    from granet.trainer import lr_at_epoch

    cfg = copy.deepcopy(trunk)
    lr_t = lr_at_epoch(trunk, t)
    s = cfg.sparsity
    density = trunk.sparsity.final_density if trunk.sparsity.method != "dense" else 1.0
    s.method, s.final_density, s.init_density = "static", density, 1.0
    cfg.optim.lr = lr_t
    cfg.optim.warmup_epochs = 0
    cfg.run.keep_epochs = []
    if kind == "plasticity":
        cfg.optim.schedule = "constant"
        cfg.optim.milestones = []
        cfg.run.epochs = k
    elif kind == "gap":
        total = trunk.run.epochs
        cfg.run.epochs = total - t
        rest = [m - t for m in trunk.optim.milestones if m > t]
        if trunk.optim.schedule == "multistep" and rest:
            cfg.optim.milestones = rest
        else:
            cfg.optim.schedule, cfg.optim.milestones = "constant", []
    else:
        raise ValueError(f"kind={kind!r}: must be plasticity or gap")
    return cfg


def _trunk_density(cfg: Config) -> float:
    return 1.0 if cfg.sparsity.method == "dense" else cfg.sparsity.final_density


def plan(study: PlasticityStudy) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(trunk trial entries, probe trial entries) of the whole grid, with their keys."""
    ts = study.epochs_t()
    trunks, probes = [], []
    kinds = ["plasticity"] + (["gap"] if study.final_gap else [])
    for model, density, seed in itertools.product(
        study.models or [None], study.trunk_densities, study.seeds
    ):
        tcfg = trunk_config(study, density, seed, model)
        tdict = config_to_dict(tcfg)
        tkey = trial_key({"stage": "trunk", "train": tdict, "save_epochs": ts})
        spec = {"trunk_method": tcfg.sparsity.method, "trunk_density": density,
                "seed": seed, "save_epochs": ts}
        trunks.append({
            "trial_key": tkey, "stage": "trunk", "train": tdict, "save_epochs": ts,
            "spec": spec, "parent_key": None,
            "run_name": f"trunk-{tcfg.model.name}-d{density:g}-s{seed}",
        })
        for t in ts:
            for kind in kinds:
                pcfg = probe_config(tcfg, t, kind, study.k)
                pdict = config_to_dict(pcfg)
                for ratio in study.ratios:
                    for regen in study.regen:
                        for scope in study.scopes:
                            for structure in study.structures:
                                pspec = {
                                    "kind": kind, "epoch_t": t, "ratio": ratio,
                                    "regen": bool(regen), "scope": scope,
                                    "structure": structure, "k": pcfg.run.epochs,
                                    "regrow_mode": study.regrow_mode,
                                }
                                pkey = trial_key({"stage": "probe", "train": pdict,
                                                  "probe": pspec}, parent=tkey)
                                probes.append({
                                    "trial_key": pkey, "stage": "probe", "train": pdict,
                                    "parent_key": tkey, "probe_spec": pspec,
                                    "trunk": {"density": density, "seed": seed,
                                              "method": tcfg.sparsity.method,
                                              "model": tcfg.model.name,
                                              "train": tdict},
                                    "run_name": (
                                        f"probe-{tcfg.model.name}-d{density:g}-s{seed}-t{t}-p{ratio:g}"
                                        f"-{'regen' if regen else 'noregen'}-{scope[:5]}"
                                        f"-{structure[:6]}-{kind}"
                                    ),
                                    "log_model": study.log_model,
                                })
    return trunks, probes


# ---------------------------------------------------------------------------------- in the trial


def state_digest(model_state: dict[str, Any], masks: list[Any]) -> str:
    """SHA-256 over the model's state tensors (sorted by name) and the masks, bit-exact."""
    h = hashlib.sha256()
    for name in sorted(model_state):
        v = model_state[name]
        h.update(name.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for m in masks:
        h.update(m.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _regrow_gradient(trainer, counts: list[int], mode: str, seed: int, t: int) -> int:
    """Dense gradient of one training minibatch, then regrow ``counts`` per layer."""
    import torch
    import torch.nn.functional as F

    from granet.data import iterate_batches

    model = trainer.model
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 999_983 + t)
    x, y = next(iter(iterate_batches(
        trainer.data.train, trainer.cfg.data.batch_size, shuffle=True, generator=gen,
        augment=trainer.data.augment, drop_last=True,
    )))
    model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(trainer._forward(x).float(), y)
    loss.backward()
    grown = trainer.engine.regrow(counts, mode)
    trainer.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # one forward in train mode must not move BN running statistics
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return grown


def branch(trainer, probe: dict[str, Any]) -> dict[str, Any]:
    """Branch a probe from its trunk: load weights+masks+optimizer at t, prune, maybe regrow.

    Returns what the probe row needs (digest of the loaded state, accuracy after pruning, counts).
    If ``probe["snapshot"]`` names a file, the state right after loading (before pruning) is saved
    there (tests compare it with the trunk checkpoint).
    """
    from granet.io import save_checkpoint

    eng = trainer.engine
    trainer.load_weights_and_masks(probe["trunk_ckpt"], optimizer=True)
    digest = state_digest(trainer.model.state_dict(), eng.masks)
    if probe.get("snapshot"):
        save_checkpoint({"model": trainer.model.state_dict(), "masks": list(eng.masks),
                         "lr": [g["lr"] for g in trainer.optimizer.param_groups]},
                        probe["snapshot"])
    density_before = eng.density()
    pruned = eng.prune_fraction(float(probe["ratio"]), scope=probe["scope"],
                                structure=probe["structure"])
    regrown = 0
    if probe["regen"]:
        regrown = _regrow_gradient(trainer, pruned, probe.get("regrow_mode", "gradient"),
                                   trainer.cfg.run.seed, int(probe["epoch_t"]))
    _, acc_pruned = trainer.evaluate(trainer.data.test)
    return {
        "branch_digest": digest,
        "density_before": density_before,
        "density_branch": eng.density(),
        "pruned": int(sum(pruned)),
        "regrown": int(regrown),
        "acc_pruned": acc_pruned,
    }


def probe_row(config: dict[str, Any], extra: dict[str, Any], trainer) -> dict[str, Any]:
    p = config["probe"]
    acc_after = trainer.history[-1]["test_acc"] if trainer.history else math.nan
    plast = acc_after - p["acc_before"] if p["kind"] == "plasticity" else None
    gap = acc_after - p["trunk_final_acc"] if p["kind"] == "gap" else None
    return {
        "key": config["trial_key"], "study": config.get("study"), "trunk_key": p["trunk_key"],
        "kind": p["kind"], "trunk_method": p["trunk_method"], "trunk_density": p["trunk_density"],
        "seed": p["seed"], "model": p["model"], "epoch_t": p["epoch_t"], "ratio": p["ratio"],
        "regen": p["regen"], "scope": p["scope"], "structure": p["structure"], "k": p["k"],
        "lr_t": p["lr_t"], "acc_before": p["acc_before"], "acc_pruned": extra.get("acc_pruned"),
        "acc_after": acc_after, "plasticity": plast, "trunk_final_acc": p["trunk_final_acc"],
        "final_gap": gap, "density_before": extra.get("density_before"),
        "density_after": trainer.engine.density(), "pruned": extra.get("pruned"),
        "regrown": extra.get("regrown"), "branch_digest": extra.get("branch_digest"),
    }


# ---------------------------------------------------------------------------------- driver


def _todo(study_dir: str, entries: list[dict[str, Any]], done: set[str]) -> list[dict[str, Any]]:
    out = []
    for e in entries:
        if e["trial_key"] not in done:
            out.append(e)
        elif e["stage"] == "trunk" and any(
            not trunk_checkpoint_path(study_dir, e["trial_key"], t).is_file()
            for t in e["save_epochs"]
        ):
            out.append(e)  # finished, but a probe checkpoint file is gone: train it again
    return out


def _exp_name(stage: str, entries: list[dict[str, Any]]) -> str:
    keys = sorted(e["trial_key"] for e in entries)
    return f"{stage}-{hashlib.sha256(','.join(keys).encode()).hexdigest()[:10]}"


def _run_stage(study: PlasticityStudy, stage: str, todo_fn, tracker, resume: bool
               ) -> tuple[int, int]:
    """Restore this stage's unfinished Tune experiments (``resume``), then launch one new
    experiment for whatever is still missing. Returns (trials launched or resumed, errors).

    ``<study_dir>/ray/<stage>-experiments.json`` lists every experiment launched with its keys,
    written before it starts, so an interrupted one is found and restored on the next run.
    """
    from ray import tune

    from granet.io import atomic_write_text
    from granet.study.runner import run_tuner

    ray_dir = Path(study.study_dir) / "ray"
    manifest = ray_dir / f"{stage}-experiments.json"
    exps = json.loads(manifest.read_text()) if manifest.is_file() else []
    launched = failed = 0
    if resume:
        for exp in exps:
            wanted = {e["trial_key"] for e in todo_fn()}
            left = set(exp["keys"]) & wanted
            path = ray_dir / exp["name"]
            if left and path.is_dir() and tune.Tuner.can_restore(str(path)):
                rg = run_tuner(study, stage=stage, name=exp["name"], resume=True,
                               param_space={}, metric="test_acc", mode="max", total=len(left))
                launched += len(left)
                failed += rg.num_errors
    todo = todo_fn()
    if not todo:
        return launched, failed
    name = _exp_name(stage, todo)
    while (ray_dir / name).exists():
        name += "x"
    exps.append({"name": name, "keys": sorted(e["trial_key"] for e in todo)})
    atomic_write_text(manifest, json.dumps(exps, indent=1))
    rg = run_tuner(
        study, stage=stage, name=name, resume=False,
        param_space={"trial": tune.grid_search(todo), "tracking": tracker.tracking_info()},
        metric="test_acc", mode="max",
    )
    return launched + len(todo), failed + rg.num_errors


def _trunk_curves(study_dir: str) -> dict[str, dict[int, dict[str, float]]]:
    t = results.read_table(study_dir, "epochs", "trunk").to_pylist()
    out: dict[str, dict[int, dict[str, float]]] = {}
    for r in t:
        out.setdefault(r["key"], {})[int(r["epoch"])] = r
    return out


def _probe_entry(study: PlasticityStudy, e: dict[str, Any], curves) -> dict[str, Any] | None:
    from granet.trainer import lr_at_epoch

    tkey, spec, tr = e["parent_key"], e["probe_spec"], e["trunk"]
    curve = curves.get(tkey, {})
    t = spec["epoch_t"]
    if t not in curve or not curve:
        return None
    trunk_cfg = config_from_dict(tr["train"])
    final = curve[max(curve)]
    probe = {
        **spec,
        "trunk_key": tkey,
        "trunk_ckpt": str(trunk_checkpoint_path(study.study_dir, tkey, t)),
        "trunk_method": tr["method"], "trunk_density": tr["density"], "seed": tr["seed"],
        "model": tr["model"],
        "lr_t": lr_at_epoch(trunk_cfg, t),
        "acc_before": curve[t]["test_acc"],
        "trunk_final_acc": final["test_acc"],
    }
    out = {k: v for k, v in e.items() if k not in ("probe_spec", "trunk")}
    out["probe"] = probe
    out["spec"] = spec
    return out


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def run_plasticity_study(
    cfg_path: str | Path | None,
    overrides: list[str] | None = None,
    smoke_test: bool = False,
    resume: bool = True,
    tracking_uri: str | None = None,
    *,
    quiet: bool = False,
    report: bool = True,
) -> dict[str, Any]:
    """Run (or complete) a plasticity study; return a summary dict.

    Returns ``{"study_dir", "launched": {"trunk": n, "probe": m}, "failed": {...},
    "tables": {name: path}, "figures": [...], "tracking_uri", "parent_run_id", "mlflow_ui",
    "seconds"}``.
    """
    t0 = time.time()
    study = load_study_config(PlasticityStudy, cfg_path, overrides, smoke_test, tracking_uri)
    trunks, probes = plan(study)
    sd = study.study_dir
    done = results.done_keys(sd)
    trunk_todo = _todo(sd, trunks, done)
    probe_todo = [p for p in probes if p["trial_key"] not in done]
    _say(
        f"plasticity study '{study.name}': {len(trunks)} trunks ({len(trunk_todo)} to run), "
        f"{len(probes)} probes ({len(probe_todo)} to run), epochs t={study.epochs_t()} "
        f"-> {sd}", quiet,
    )

    from granet.study.tracking import StudyTracker

    Path(sd).mkdir(parents=True, exist_ok=True)
    tracker = StudyTracker(study, extra_tags={"granet.kind": "plasticity"})
    if not tracker.reopened:
        tracker.log_params({k: v for k, v in study_to_dict(study).items()})
    (Path(sd) / "study.json").write_text(json.dumps(study_to_dict(study), indent=2, default=str))
    launched = {"trunk": 0, "probe": 0}
    failed = {"trunk": 0, "probe": 0}
    status = "FINISHED"
    try:
        launched["trunk"], failed["trunk"] = _run_stage(
            study, "trunk", lambda: _todo(sd, trunks, results.done_keys(sd)), tracker, resume
        )

        def probe_todo() -> list[dict[str, Any]]:
            done = results.done_keys(sd)
            curves = _trunk_curves(sd)
            # only from finished trunks (a failed one may have written epochs up to its crash)
            ready = [p for p in probes if p["trial_key"] not in done and p["parent_key"] in done]
            return [x for x in (_probe_entry(study, p, curves) for p in ready) if x]

        launched["probe"], failed["probe"] = _run_stage(study, "probe", probe_todo, tracker,
                                                        resume)
        done = results.done_keys(sd)
        n_missing = len([p for p in probes if p["trial_key"] not in done])
        if n_missing:
            _say(f"[probe] {n_missing} probes not done (failed, or their trunk failed)", quiet)
        if failed["trunk"] or failed["probe"]:
            status = "FAILED"
    except BaseException:
        tracker.finish("KILLED")
        raise

    tables = {n: str(Path(sd) / "results" / n) for n in results.TABLES}
    figures: list[str] = []
    summary_path = _write_summary(sd)
    if report:
        try:
            from granet.study.report import make_report
        except ImportError:
            make_report = None
        if make_report is not None:
            try:
                # make_report logs the figures to this study's parent run itself
                figures = [str(p) for p in make_report(sd, tracking_uri=tracker.uri)]
            except Exception as exc:  # the report must not lose a finished study
                _say(f"report: failed ({type(exc).__name__}: {exc})", quiet)
    if summary_path:
        tracker.log_table(summary_path)
    tracker.finish(status)
    out = {
        "study_dir": sd, "launched": launched, "failed": failed, "tables": tables,
        "summary": summary_path, "figures": figures, "tracking_uri": tracker.uri,
        "parent_run_id": tracker.parent_run_id, "mlflow_ui": tracker.ui_command(),
        "seconds": time.time() - t0,
    }
    _print_end(out, quiet)
    return out


def _write_summary(study_dir: str) -> str | None:
    """Mean plasticity per (trunk density, t, ratio, regen) as a small CSV; its path."""
    rows = results.read_table(study_dir, "probes").to_pylist()
    rows = [r for r in rows if r["kind"] == "plasticity"]
    if not rows:
        return None
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        g = (r["trunk_density"], r["epoch_t"], r["lr_t"], r["ratio"], r["regen"], r["scope"],
             r["structure"])
        groups.setdefault(g, []).append(r["plasticity"])
    lines = ["trunk_density,epoch_t,lr_t,ratio,regen,scope,structure,n,plasticity_mean"]
    for g in sorted(groups):
        v = groups[g]
        lines.append(",".join(str(x) for x in g) + f",{len(v)},{sum(v) / len(v):.4f}")
    p = Path(study_dir) / "plasticity_summary.csv"
    from granet.io import atomic_write_text

    atomic_write_text(p, "\n".join(lines) + "\n")
    return str(p)


def _print_end(out: dict[str, Any], quiet: bool) -> None:
    if quiet:
        return
    launched, failed = out["launched"], out["failed"]
    print(
        f"done in {out['seconds']:.0f} s: launched {launched['trunk']} trunks + "
        f"{launched['probe']} probes, failed {failed['trunk'] + failed['probe']}",
        flush=True,
    )
    print(f"tables (Parquet): {Path(out['study_dir']) / 'results'}/<trials|epochs|probes|layers>")
    if out["summary"]:
        print(f"plasticity summary: {out['summary']}")
    if out["figures"]:
        print(f"figures: {Path(out['figures'][0]).parent}")
    else:
        print(f"figures: granet report {out['study_dir']}")
    print(f"MLflow UI: {out['mlflow_ui']}", flush=True)
    sys.stdout.flush()
