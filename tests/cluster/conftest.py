"""Fixtures of the cluster tests: the venv's ``ray`` / ``granet`` / ``mlflow`` commands (the
``[cluster]`` extra) and a real two-node Ray cluster started from the documented commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.cluster.localcluster import LocalCluster


def _missing_cluster_extra() -> str | None:
    bin_dir = Path(sys.executable).parent
    missing = [n for n in ("ray", "granet", "mlflow") if not (bin_dir / n).exists()]
    if missing:
        return f"{', '.join(missing)} not in {bin_dir}"
    try:
        import ray.dashboard.optional_deps  # noqa: F401  (what ray[default] adds)
    except ImportError as exc:
        return f"ray[default] is not installed ({exc}); the job API and the dashboard need it"
    try:
        import psutil  # noqa: F401
    except ImportError:
        return "psutil is not installed"
    return None


@pytest.fixture(scope="session")
def cluster_bin() -> Path:
    """The directory of this Python's console scripts, with the [cluster] extra installed.

    Skipped where it is missing (e.g. a venv without the extra), except in CI (``CI`` set), where
    `pip install -c constraints.txt -e ".[dev]"` installs it and a missing extra is a failure."""
    why = _missing_cluster_extra()
    if why:
        msg = f"the [cluster] extra is needed: {why} (pip install -c constraints.txt -e '.[dev]')"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return Path(sys.executable).parent


@pytest.fixture(scope="module")
def local_cluster(cluster_bin):
    """Token + head (with the MLflow server) + worker, as README/ray_cluster.yaml say; stopped
    by PID and removed at the end, whatever happens."""
    cluster = LocalCluster(cluster_bin)
    try:
        cluster.bring_up()
        yield cluster
    finally:
        stopped = cluster.stop()
        print(f"\nlocal cluster: stopped {len(stopped)} processes by PID")
