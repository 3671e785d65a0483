#!/usr/bin/env python
"""The job path's overhead: the same smoke plasticity study (2 trunks + 8 probes, the user
model of tests/cluster) run side by side, interleaved,

* through the README's `ray job submit` on the local two-node cluster of tests/cluster
  (token auth, 1 CPU per node, the MLflow server of the head's start command), and
* locally: `granet study plasticity` in this process's environment with its own local Ray
  (this machine's CPUs: 2, the same two trial slots), logging to the same MLflow server.

Prints, per run, the wall time from the command's start to its exit and to the first trial
running (the first trial-side build of the user's model), then the medians and their ratio.
Cluster start-up (`ray up` equivalent) is reported apart: it is paid once per cluster.

    python bench/cluster_overhead.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.cluster.localcluster import LocalCluster  # noqa: E402
from tests.cluster.test_two_nodes import (  # noqa: E402
    _check_complete,
    _markers,
    _study_args,
    _workdir,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M')}")
    c = LocalCluster(Path(sys.executable).parent)
    rows = []
    try:
        t0 = time.time()
        c.bring_up()
        print(f"cluster up (token, MLflow server, head, worker): {time.time() - t0:.1f} s "
              f"{ {k: round(v, 1) for k, v in c.timings.items()} }")
        for r in range(args.rounds):
            for path in ("job", "local"):
                name = f"bench-{path}-{r}"
                wd = _workdir(c.root, name)
                log_dir = c.root / f"models-{name}"
                study_dir = c.shared / "studies" / name
                if path == "job":
                    cmd = c.job_argv(_study_args(log_dir), study_dir)
                    env = c.client_env()
                else:
                    cmd = ["granet", "study", "plasticity", "my_study.yaml",
                           "--set", f"study_dir={study_dir}", *_study_args(log_dir)]
                    env = c.client_env(
                        PYTHONPATH=os.pathsep.join(
                            [str(wd / "src"), os.environ.get("PYTHONPATH", "")]),
                        MLFLOW_TRACKING_URI=c.node_env["head"]["MLFLOW_TRACKING_URI"],
                    )
                t = time.time()
                proc = subprocess.run(cmd, cwd=wd, env=env, capture_output=True, text=True,
                                      timeout=900)
                wall = time.time() - t
                if proc.returncode != 0:
                    raise SystemExit(c.diagnostics(proc.stdout + proc.stderr))
                _check_complete(study_dir)
                first = min(m["time"] for m in _markers(log_dir)) - t
                rows.append((path, wall, first))
                print(f"round {r} {path:5s}: end to end {wall:6.1f} s, first trial running "
                      f"after {first:5.1f} s", flush=True)
    finally:
        c.stop()
    for path in ("job", "local"):
        walls = [w for p, w, _ in rows if p == path]
        firsts = [f for p, _, f in rows if p == path]
        print(f"median {path:5s}: end to end {statistics.median(walls):6.1f} s, first trial "
              f"running after {statistics.median(firsts):5.1f} s")
    job = statistics.median([w for p, w, _ in rows if p == "job"])
    local = statistics.median([w for p, w, _ in rows if p == "local"])
    print(f"job path / local: {job / local:.2f}x ({job - local:+.1f} s)")


if __name__ == "__main__":
    main()
