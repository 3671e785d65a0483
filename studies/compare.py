#!/usr/bin/env python
"""Run (or resume) a GraNet comparison study (methods x sparsities x seeds).

    python studies/compare.py [--config studies/configs/compare_mnist1d.yaml] [--set key=value]
                              [--smoke-test] [--fresh] [--tracking-uri URI] [--report]

Re-running the same command resumes: finished trials are skipped, only the missing ones
run. ``--fresh`` re-runs every trial. Exit status 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parent / "configs" / "compare_mnist1d.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT), help="study YAML (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set seeds=[0,1] --set train.run.epochs=5")
    p.add_argument("--smoke-test", action="store_true", help="tiny version (seconds)")
    p.add_argument("--fresh", action="store_true", help="re-run every trial")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    p.add_argument("--report", action="store_true", help="draw the report figures afterwards")
    args = p.parse_args(argv)

    import ray

    from granet.config import ConfigError
    from granet.study.compare import run_compare_study

    t0 = time.time()
    started = not ray.is_initialized()  # a Ray this script starts is shut down at the end
    try:
        summary = run_compare_study(args.config, args.set, args.smoke_test, not args.fresh,
                                    args.tracking_uri)
    except ConfigError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
    if args.report:
        from granet.study.report import make_report

        summary["figures"] = [str(x) for x in make_report(summary["study_dir"])]
    summary["wall_seconds"] = round(time.time() - t0, 1)
    print(json.dumps(summary, indent=2, default=str))
    return 1 if summary.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
