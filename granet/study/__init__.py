"""Studies on Ray Tune + MLflow + Parquet: plasticity (A), search / compare / report (B).

See ``granet/study/API.md`` for the contract between the modules. Importing this package does not
import Ray or MLflow; the modules that need them import them themselves.
"""
