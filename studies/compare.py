#!/usr/bin/env python
"""The compare study, runnable directly, via ``ray job submit`` or ``ray submit``.

    python studies/compare.py [CONFIG] [--set KEY=VALUE ...] [--smoke-test] [--fresh]
                         [--tracking-uri URI] [--ray-address ADDR]

Same flags as ``granet study compare``. CONFIG defaults to studies/configs/compare_mnist1d.yaml.
Re-running the same command resumes: finished trials are reused, only the missing ones run.
"""

from __future__ import annotations

import sys
from pathlib import Path

from granet.study.cli import script_main

if __name__ == "__main__":
    default = Path(__file__).resolve().parent / "configs" / "compare_mnist1d.yaml"
    sys.exit(script_main("compare", default))
