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

import argparse
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "configs" / "plasticity_mnist1d.yaml"


def main(argv: list[str] | None = None) -> int:
    from granet.config import ConfigError
    from granet.study.cli import add_study_arguments, run_study_command

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_study_arguments(p)
    args = p.parse_args(argv)
    if args.config is None:
        args.config = str(DEFAULT)
    try:
        return run_study_command("plasticity", args)
    except ConfigError as exc:
        print(f"plasticity: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
