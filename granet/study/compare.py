"""Comparison study: methods x final sparsities x seeds, summarised like the paper's Table 2.

Each entry of ``methods`` is ``{label, method, set}``: a label for the table, a
``sparsity.method`` and optional dotted overrides of the base ``train`` config (e.g. GraNet with
``s_i = 0.5`` is ``{label: "granet (s_i=0.5)", method: granet, set: {sparsity.init_density:
0.5}}``). ``dense`` runs once per seed (no sparsity axis); every other method runs at every
sparsity in ``sparsities`` (``sparsity.final_density = 1 - s``) and every seed. All trial configs
are built and validated before any Ray/MLflow work.

Outputs: ``compare_table.md`` and ``compare_table.parquet`` (see
:mod:`granet.study.report.tables`), derived from the Parquet ``trials`` table alone.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from granet.config import METHODS, Config, ConfigError, config_to_dict
from granet.study.base import StudyConfig, TrialSpec, build_train_config, trial_key
from granet.study.stages import GridStage

__all__ = ["CompareStudy"]

STAGE = "compare"


def _default_methods() -> list[dict[str, Any]]:
    return [
        {"label": "Dense", "method": "dense"},
        {"label": "Static", "method": "static"},
        {"label": "SET", "method": "set"},
        {"label": "RigL", "method": "rigl"},
        {"label": "GMP", "method": "gmp", "set": {"sparsity.init_density": 1.0}},
        {"label": "GraNet (s_i=0)", "method": "granet", "set": {"sparsity.init_density": 1.0}},
        {"label": "GraNet (s_i=0.5)", "method": "granet", "set": {"sparsity.init_density": 0.5}},
    ]


@dataclass
class CompareStudy(StudyConfig):
    """A comparison study: ``StudyConfig`` plus methods and sparsities."""

    kind = "compare"

    methods: list[dict[str, Any]] = field(default_factory=_default_methods)
    sparsities: list[float] = field(default_factory=lambda: [0.9, 0.95, 0.98])

    def smoke(self) -> CompareStudy:
        """Tiny: MNIST-1D 1000 samples, mlp, 3 epochs, one sparsity, two seeds (for the std)."""
        new = super().smoke()
        new.seeds = list(self.seeds[:2]) if len(self.seeds) >= 2 else [self.seeds[0],
                                                                         self.seeds[0] + 1]
        tr = new.train
        tr.data.name, tr.data.num_samples, tr.data.batch_size = "mnist1d", 1000, 32
        tr.optim.name, tr.optim.lr = "sgd", 0.1
        tr.model.name, tr.model.kwargs = "mlp", {"hidden": [64, 64]}
        tr.run.epochs, tr.run.device, tr.run.dead_unit_eval = 3, "cpu", False
        tr.optim.schedule, tr.optim.milestones = "multistep", [2]
        tr.sparsity.update_interval = 8
        tr.sparsity.prune_start_epoch, tr.sparsity.prune_end_epoch = 0.0, 2.0
        new.sparsities = [self.sparsities[0]] if self.sparsities else [0.9]
        return new

    def check(self) -> None:
        """StudyConfig's checks, then every planned trial config is built and validated."""
        super().check()
        self.trials()

    def trial_configs(self) -> list[Config]:
        return [t.config() for t in self.trials()]

    def trials(self) -> list[TrialSpec]:
        """Every trial of the study (validated configs)."""
        if not self.methods:
            raise ConfigError("methods=[]: must hold at least one method")
        if not self.sparsities:
            raise ConfigError("sparsities=[]: must hold at least one sparsity")
        for s in self.sparsities:
            if not 0.0 < s < 1.0:
                raise ConfigError(f"sparsities={self.sparsities!r}: each must be in (0, 1)")
        if len(set(self.sparsities)) != len(self.sparsities):
            raise ConfigError(f"sparsities={self.sparsities!r}: must not repeat")
        labels: set[str] = set()
        base = config_to_dict(self.train)
        out: list[TrialSpec] = []
        for i, entry in enumerate(self.methods):
            label, method, sets = _check_entry(i, entry)
            if label in labels:
                raise ConfigError(f"methods[{i}].label={label!r}: must be unique")
            labels.add(label)
            for s in [0.0] if method == "dense" else list(self.sparsities):
                for seed in self.seeds:
                    over: dict[str, Any] = {"sparsity.method": method, "run.seed": seed}
                    if method != "dense":
                        over["sparsity.final_density"] = round(1.0 - s, 10)
                    over.update(sets)
                    try:
                        cfg = build_train_config(base, over)
                    except ConfigError as exc:
                        raise ConfigError(
                            f"methods[{i}] ({label}) at sparsity {s} seed {seed}: {exc}"
                        ) from None
                    own = {"stage": STAGE, "label": label, "sparsity": s}
                    out.append(TrialSpec(
                        key=f"{_slug(label)}-{trial_key(cfg, own)[:12]}",
                        stage=STAGE, study=self.name, train=config_to_dict(cfg),
                        run_name=f"{label} s{round(s * 100, 2):g}% seed{seed} | {cfg.model.name}",
                        labels={"label": label, "method": method, "sparsity": s, "seed": seed,
                                "order": i},
                    ))
        return out

    def plan(self, run: Any):
        trials = self.trials()
        done = set() if run.fresh else run.finished_keys(STAGE)
        todo = [t for t in trials if t.key not in done]
        run.say(f"compare study '{self.name}': {len(trials)} trials ({len(todo)} to run) -> "
                f"{run.paths.root}")
        yield GridStage(STAGE, todo, planned=len(trials), metric="test_at_best_val")

    def summarize(self, run: Any) -> dict[str, Any]:
        from granet.study.report.tables import write_compare_table

        md, pq_path, table = write_compare_table(run.paths, f"Comparison study {self.name}")
        metrics = {}
        for r in table.to_pylist():
            if r["test_at_best_val_mean"] is not None:
                metrics[f"test_at_best_val.{_slug(r['label'])}.s{r['sparsity']:g}"] = \
                    r["test_at_best_val_mean"]
        return {"files": [md, pq_path], "metrics": metrics, "table_md": str(md)}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "m"


def _check_entry(i: int, entry: Any) -> tuple[str, str, dict[str, Any]]:
    where = f"methods[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}={entry!r}: must be a mapping {{label, method, set}}")
    unknown = sorted(set(entry) - {"label", "method", "set"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; allowed: label, method, set")
    method = entry.get("method")
    if method not in METHODS:
        raise ConfigError(f"{where}.method={method!r}: must be one of {', '.join(METHODS)}")
    label = entry.get("label", method)
    if not isinstance(label, str) or not label.strip():
        raise ConfigError(f"{where}.label={label!r}: must be a non-empty string")
    sets = entry.get("set") or {}
    if not isinstance(sets, dict):
        raise ConfigError(f"{where}.set={sets!r}: must be a mapping of dotted key -> value")
    return label, method, copy.deepcopy(sets)
