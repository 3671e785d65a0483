#!/usr/bin/env python
"""Pruning plasticity study (SPEC §6) - runnable directly, via ``ray job submit`` or ``ray submit``.

    python studies/plasticity.py [CONFIG] [--set KEY=VALUE ...] [--smoke-test] [--resume]
                                 [--tracking-uri URI] [--ray-address ADDR]
    ray job submit --working-dir . -- python studies/plasticity.py studies/configs/...yaml
    ray submit cluster.yaml studies/plasticity.py -- --ray-address auto --set study_dir=/shared/x

On a multi-node cluster study_dir must be on shared storage (every trial writes its Parquet rows
and trunk checkpoints there) and the tracking URI must be a server (--tracking-uri http://...).

Connects to the cluster in RAY_ADDRESS when set (export RAY_AUTH_MODE=token for token-auth
clusters), else starts a local Ray with this machine's CPUs. CONFIG defaults to
studies/configs/plasticity_mnist1d.yaml.
"""

from __future__ import annotations

import sys
from pathlib import Path

from granet.study.cli import script_main

if __name__ == "__main__":
    default = Path(__file__).resolve().parent / "configs" / "plasticity_mnist1d.yaml"
    sys.exit(script_main("plasticity", default))
