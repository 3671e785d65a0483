"""Pruning plasticity study (SPEC §6) by checkpoint branching.

Stage ``trunk``: one trial per (model, trunk density, seed) - dense for density 1.0, else
``trunk_method`` (default "static", uniform layer densities) - trained to the end; full
checkpoints at the probe epochs are kept as stable files (``checkpoints/<trunk>/epoch-<t>.pt``).

Stage ``probe``: one trial per (trunk, t, ratio p, regeneration on/off, scope, structure[, kind]).
A probe loads the trunk checkpoint at t (weights, masks, optimizer state, BN statistics), prunes p
of the remaining weights in one shot, optionally regrows as many per layer by gradient magnitude,
then trains with its masks fixed (:mod:`granet.branch`):

* kind "plasticity": k epochs at the trunk's LR at t; pruning plasticity = test acc after k -
  test acc at t;
* kind "gap" (``final_gap: true``): to the end with the rest of the trunk's schedule; gap = its
  final test acc - the trunk's final one. These cost up to T - t epochs each, so ``gap_epochs``,
  ``gap_ratios`` and ``gap_densities`` may restrict them to a subset of the plasticity grid
  (empty: all of it).

Keys follow the study layer's rule (granet/study/base.py); a re-run launches only what is
missing. A finished trunk whose checkpoint file is missing or unreadable is trained again; a
probe whose trunk diverged is skipped (and counted).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from granet.config import (
    GROWTH,
    METHODS,
    PRUNE_SCOPES,
    STRUCTURES,
    Config,
    ConfigError,
    config_to_dict,
)
from granet.study import results
from granet.study.base import (
    PACK_MODES,
    PackedTrial,
    ProbeSpec,
    StudyConfig,
    TrialSpec,
    trial_key,
    validate_train,
)
from granet.study.stages import GridStage

__all__ = ["PlasticityStudy", "probe_config", "trunk_config"]


@dataclass
class PlasticityStudy(StudyConfig):
    """A plasticity study (YAML fields; see studies/configs/plasticity_*.yaml)."""

    kind = "plasticity"

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
    # The final-gap grid, a subset of the plasticity grid (empty: all of it; ignored with
    # final_gap: false): gap probes train to the end, so a full grid costs several times the
    # plasticity probes. Every regen/scope/structure value is kept.
    gap_epochs: list[int] = field(default_factory=list)
    gap_ratios: list[float] = field(default_factory=list)
    gap_densities: list[float] = field(default_factory=list)
    regrow_mode: str = "gradient"
    log_model: bool = False
    # Probes of one trunk checkpoint train together, up to this many per Tune trial (one data
    # pass per batch, granet/pack.py); 1: each probe is its own Tune trial. Keys, rows and MLflow
    # runs stay per probe. pack_mode "loop" is bit-identical to probes trained one by one;
    # "vmap" (one batched model, for GPUs) agrees within floating-point tolerance.
    pack_probes: int = 8
    pack_mode: str = "loop"

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
        # a study with final-gap probes keeps them, on the whole smoke grid (--set overrides of
        # the smoke grid's lists then never contradict a gap subset)
        out.gap_epochs, out.gap_ratios, out.gap_densities = [], [], []
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

    def gap_grid(self) -> tuple[list[int], list[float], list[float]]:
        """The final-gap probes' (epochs t, ratios, trunk densities); empty lists when
        ``final_gap`` is off."""
        if not self.final_gap:
            return [], [], []

        def pick(grid: list[Any], chosen: list[Any]) -> list[Any]:  # in the grid's order
            return [v for v in grid if v in chosen] if chosen else list(grid)

        return (pick(self.epochs_t(), self.gap_epochs), pick(self.ratios, self.gap_ratios),
                pick(self.trunk_densities, self.gap_densities))

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
        if isinstance(self.pack_probes, bool) or self.pack_probes < 1:
            raise ConfigError(f"pack_probes={self.pack_probes!r}: must be >= 1 (1: no packing)")
        _in("pack_mode", self.pack_mode, PACK_MODES)
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
        self._check_gap_grid(ts)
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
            for t in self.gap_grid()[0][:1]:
                validate_train(probe_config(tc, t, "gap", self.k))

    def _check_gap_grid(self, ts: list[int]) -> None:
        """gap_epochs/gap_ratios/gap_densities: each a subset of the plasticity grid's values,
        without repeats. Not checked (and unused) with final_gap: false, so that
        ``--set final_gap=false`` turns the gap probes of a config off whatever its grid."""
        if not self.final_gap:
            return
        for name, values, allowed, what in (
                ("gap_epochs", self.gap_epochs, ts, "the probe epochs t"),
                ("gap_ratios", self.gap_ratios, self.ratios, "ratios"),
                ("gap_densities", self.gap_densities, self.trunk_densities, "trunk_densities")):
            if not values:
                continue
            if len(set(values)) != len(values):
                raise ConfigError(f"{name}={values!r}: must not repeat a value")
            for v in values:
                if v not in allowed:
                    raise ConfigError(f"{name}={values!r}: each must be one of {what} "
                                      f"({', '.join(f'{a:g}' for a in allowed)}); {v!r} is not")

    # ------------------------------------------------------------------ the grid
    def trial_configs(self) -> list[Config]:
        out = []
        for d, m in itertools.product(self.trunk_densities, self.models or [None]):
            tc = trunk_config(self, d, self.seeds[0], m)
            out += [tc, probe_config(tc, self.epochs_t()[0], "plasticity", self.k)]
        return out

    def trunks(self) -> list[TrialSpec]:
        """Every trunk trial of the grid."""
        ts = tuple(self.epochs_t())
        out = []
        for model, density, seed in itertools.product(
            self.models or [None], self.trunk_densities, self.seeds
        ):
            cfg = trunk_config(self, density, seed, model)
            labels = {"trunk_method": cfg.sparsity.method, "trunk_density": density,
                      "seed": seed, "model": cfg.model.name}
            out.append(TrialSpec(
                key=trial_key(cfg, {"stage": "trunk", "save_epochs": list(ts)}),
                stage="trunk", study=self.name, train=config_to_dict(cfg),
                run_name=f"trunk d{density:g} {cfg.sparsity.method} | {cfg.model.name} s{seed}",
                labels=labels, save_epochs=ts,
            ))
        return out

    def probes(self, trunk: TrialSpec) -> list[tuple[TrialSpec, dict[str, Any]]]:
        """The probes of one trunk: (spec without trunk results, the probe's own fields)."""
        from granet.config import config_from_dict

        tcfg = config_from_dict(trunk.train)
        out = []
        kinds = ["plasticity"] + (["gap"] if self.final_gap else [])
        gap_ts, gap_ratios, gap_dens = self.gap_grid()
        for t, kind in itertools.product(trunk.save_epochs, kinds):
            if kind == "gap" and (t not in gap_ts
                                  or trunk.labels["trunk_density"] not in gap_dens):
                continue
            pcfg = probe_config(tcfg, t, kind, self.k)
            ratios = gap_ratios if kind == "gap" else self.ratios
            for ratio, regen, scope, structure in itertools.product(
                ratios, self.regen, self.scopes, self.structures
            ):
                own = {"kind": kind, "epoch_t": t, "ratio": ratio, "regen": bool(regen),
                       "scope": scope, "structure": structure, "k": pcfg.run.epochs,
                       "regrow_mode": self.regrow_mode}
                extra = "" if (scope, structure) == ("global", "unstructured") else \
                    f" {scope} {structure}"
                lab = trunk.labels
                name = (f"p{ratio:g} t{t} {'regen' if regen else 'noregen'}"
                        f"{' gap' if kind == 'gap' else ''}{extra} | d{lab['trunk_density']:g} "
                        f"{lab['model']} s{lab['seed']}")
                spec = TrialSpec(
                    key=trial_key(pcfg, {"stage": "probe", **own}, parent=trunk.key),
                    stage="probe", study=self.name, train=config_to_dict(pcfg),
                    parent_key=trunk.key, run_name=name,
                    labels={**own, **trunk.labels}, log_model=self.log_model,
                )
                out.append((spec, own))
        return out

    def pack_trials(self, stage: str, trials: list[TrialSpec]) -> list[TrialSpec | PackedTrial]:
        """Probes of one trunk checkpoint (same trunk, t and kind: the same training config)
        in packs of at most ``pack_probes``, split evenly (20 probes, 8 per pack: 7 + 7 + 6);
        everything else alone."""
        if stage != "probe" or self.pack_probes <= 1:
            return list(trials)
        groups: dict[tuple[Any, ...], list[TrialSpec]] = {}
        for t in trials:
            ident = (t.parent_key, t.probe.trunk_ckpt if t.probe else None,
                     json.dumps(t.train, sort_keys=True, default=str))
            groups.setdefault(ident, []).append(t)
        out: list[TrialSpec | PackedTrial] = []
        for members in groups.values():
            n = len(members)
            parts = -(-n // self.pack_probes)
            start = 0
            for i in range(parts):
                size = n // parts + (1 if i < n % parts else 0)
                chunk = members[start:start + size]
                start += size
                if len(chunk) == 1:
                    out.append(chunk[0])
                    continue
                lab = chunk[0].labels
                name = (f"{len(chunk)} probes t{lab.get('epoch_t')}"
                        f"{' gap' if lab.get('kind') == 'gap' else ''} | "
                        f"d{lab.get('trunk_density', 0):g} {lab.get('model')} s{lab.get('seed')}")
                out.append(PackedTrial.of(chunk, mode=self.pack_mode, run_name=name))
        return out

    def plan(self, run: Any):
        paths = run.paths
        trunks = self.trunks()
        finished = run.finished_keys("trunk")
        todo = []
        for t in trunks:
            if t.key in finished and not _checkpoints_ok(paths, t, run):
                results.forget_trial(paths.root, "trunk", t.key)
                finished.discard(t.key)
            if t.key not in finished:
                todo.append(t)
        kinds = [own["kind"] for t in trunks for _, own in self.probes(t)]
        planned_probes, n_gap = len(kinds), kinds.count("gap")
        run.say(f"plasticity study '{self.name}': {len(trunks)} trunks ({len(todo)} to run), "
                f"{planned_probes} probes{f' ({n_gap} final-gap)' if n_gap else ''}, "
                f"epochs t={self.epochs_t()} -> {paths.root}")
        yield GridStage("trunk", todo, planned=len(trunks))

        statuses = results.trial_statuses(paths.root, "trunk")
        curves = _curves(paths.root)
        done = run.finished_keys("probe")
        todo_p: list[TrialSpec] = []
        skipped = 0
        for trunk in trunks:
            ready = statuses.get(trunk.key) == "done" and trunk.key in curves
            for spec, own in self.probes(trunk):
                if spec.key in done:
                    continue
                if not ready:
                    skipped += 1
                    continue
                todo_p.append(_with_trunk_results(spec, own, trunk, curves[trunk.key],
                                                  str(paths.trunk_checkpoint(trunk.key,
                                                                             own["epoch_t"]))))
        if skipped:
            run.say(f"[probe] {skipped} probes skipped: their trunk did not finish "
                    "(failed or diverged)")
        yield GridStage("probe", todo_p, planned=planned_probes)

    def summarize(self, run: Any) -> dict[str, Any]:
        from granet.study.report.tables import write_plasticity_summary

        path, means = write_plasticity_summary(run.paths.root, run.paths.plasticity_summary)
        return {"files": [path] if path else [], "metrics": means}


def _in(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r}: must be one of {', '.join(allowed)}")


def _checkpoints_ok(paths: Any, trunk: TrialSpec, run: Any) -> bool:
    """Every probe-epoch checkpoint of a finished trunk exists and reads back."""
    from granet.io import CheckpointError
    from granet.study.storage import load_checkpoint  # a local path or a URI

    for t in trunk.save_epochs:
        p = paths.trunk_checkpoint(trunk.key, t)
        try:
            load_checkpoint(p)
        except CheckpointError as exc:
            run.say(f"[trunk] {exc}: training trunk {trunk.run_name!r} again")
            return False
    return True


def _curves(study_dir: Any) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for r in results.read_table(study_dir, "epochs", "trunk").to_pylist():
        out.setdefault(r["key"], {})[int(r["epoch"])] = r
    return out


def _with_trunk_results(spec: TrialSpec, own: dict[str, Any], trunk: TrialSpec,
                        curve: dict[int, dict[str, Any]], ckpt: str) -> TrialSpec:
    import dataclasses

    from granet.config import config_from_dict
    from granet.trainer import lr_at_epoch

    t = own["epoch_t"]
    final = curve[max(curve)]
    probe = ProbeSpec(
        trunk_key=trunk.key, trunk_ckpt=ckpt, lr_t=lr_at_epoch(config_from_dict(trunk.train), t),
        acc_before=float(curve[t]["test_acc"]) if t in curve else math.nan,
        trunk_final_acc=float(final["test_acc"]), trunk_method=trunk.labels["trunk_method"],
        trunk_density=float(trunk.labels["trunk_density"]), seed=int(trunk.labels["seed"]),
        model=trunk.labels["model"], **own,
    )
    return dataclasses.replace(spec, probe=probe)


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


