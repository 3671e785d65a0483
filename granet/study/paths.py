"""Every file of a study directory, in one place (as :class:`granet.io.RunPaths` is for runs).

Layout::

    <study_dir>/
      study.json                  the resolved study config (written at each start)
      summary.json                the driver's summary of the last pass
      .lock                       held while a driver runs (host, pid, start time)
      mlflow.db, mlartifacts/     default MLflow store (sqlite) when no tracking URI is given
      mlflow-spool/<key>/         what did not reach MLflow, per run (mlflow_spool.py; _parent)
      optuna.db                   search: default Optuna storage
      ray/<experiment>/           Tune experiments (storage_path = <study_dir>/ray)
      ray/<stage>-experiments.json  which Tune experiment ran which trial keys (for restore)
      checkpoints/<trunk>/epoch-<t>.pt   plasticity: stable trunk checkpoints
      results/<table>/stage=<stage>/trial-<key>.parquet   Parquet tables (results.py)
      failures/<key>.txt          the error of each failed trial (a copy of Ray's error file)
      figures/                    report figures
      <study-specific outputs>    plasticity_summary.csv, compare_table.md, best_config.yaml...
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["StudyPaths"]


class StudyPaths:
    """Paths of one study directory (nothing is created here)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.study_json = self.root / "study.json"
        self.summary = self.root / "summary.json"
        self.lock = self.root / ".lock"
        self.mlflow_db = self.root / "mlflow.db"
        self.mlflow_artifacts = self.root / "mlartifacts"
        self.mlflow_spool = self.root / "mlflow-spool"
        self.optuna_db = self.root / "optuna.db"
        self.ray = self.root / "ray"
        self.results = self.root / "results"
        self.checkpoints = self.root / "checkpoints"
        self.failures = self.root / "failures"
        self.figures = self.root / "figures"
        # study-specific outputs
        self.plasticity_summary = self.root / "plasticity_summary.csv"
        self.compare_md = self.root / "compare_table.md"
        self.compare_parquet = self.root / "compare_table.parquet"
        self.best_config = self.root / "best_config.yaml"
        self.search_table = self.results / "search" / "stage=search" / "optuna.parquet"

    def experiment(self, name: str) -> Path:
        """A Tune experiment directory under the storage path."""
        return self.ray / name

    def experiments_manifest(self, stage: str) -> Path:
        return self.ray / f"{stage}-experiments.json"

    def table_dir(self, table: str, stage: str | None = None) -> Path:
        d = self.results / table
        return d / f"stage={stage}" if stage is not None else d

    def table_file(self, table: str, stage: str, key: str) -> Path:
        return self.table_dir(table, stage) / f"trial-{key}.parquet"

    def trunk_checkpoint(self, trunk_key: str, epoch: int) -> Path:
        return self.checkpoints / trunk_key / f"epoch-{epoch:04d}.pt"

    def failure(self, key: str) -> Path:
        return self.failures / f"{key}.txt"

    def figure(self, name: str) -> Path:
        return self.figures / name

    def mlflow_spool_run(self, key: str) -> Path:
        """The spool of one run (a trial key, or ``_parent``): ops.jsonl and artifacts/."""
        return self.mlflow_spool / key

    def default_tracking_uri(self) -> str:
        return "sqlite:///" + str(self.mlflow_db.resolve())

    def default_optuna_url(self) -> str:
        return "sqlite:///" + str(self.optuna_db.resolve())
