"""``python -m tests.study.drive KIND [--slow S] [--fail-at-epoch E] -- <granet study args>``:
a study driver process exactly like ``granet study KIND ...`` (same flags, exit codes and
output), with a fault injector from :mod:`tests.study.faults` around the trainable. Tests start
it as a subprocess to interrupt, kill or race real drivers."""

from __future__ import annotations

import argparse
import sys

from granet.errors import run_command
from granet.study.cli import add_study_arguments, print_end, study_class
from granet.study.driver import run_study
from tests.study import faults


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind")
    p.add_argument("--slow", type=float, default=0.0)
    own, rest = argv[: argv.index("--")], argv[argv.index("--") + 1:]
    args = p.parse_args(own)
    q = argparse.ArgumentParser()
    add_study_arguments(q)
    sargs = q.parse_args(rest)
    trainable = faults.Slow(args.slow) if args.slow else None

    def go() -> int:
        out = run_study(study_class(args.kind), sargs.config, sargs.set,
                        smoke_test=sargs.smoke_test, fresh=sargs.fresh,
                        tracking_uri=sargs.tracking_uri, ray_address=sargs.ray_address,
                        quiet=sargs.quiet, trainable=trainable)
        print_end(out)
        return 1 if sum(out["failed"].values()) else 0

    return run_command(go)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
