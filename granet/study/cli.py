"""``granet study {plasticity,search,compare} CONFIG`` and ``granet report STUDY_DIR``."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

__all__ = ["add_study_commands", "run_study_command"]

_STUDIES = {
    "plasticity": ("granet.study.plasticity", "run_plasticity_study"),
    "search": ("granet.study.search", "run_search_study"),
    "compare": ("granet.study.compare", "run_compare_study"),
}


def add_study_arguments(p: argparse.ArgumentParser, with_config: bool = True) -> None:
    if with_config:
        p.add_argument("config", nargs="?", default=None, help="study YAML (defaults if omitted)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set ratios=[0.2,0.5] --set train.optim.lr=0.05")
    p.add_argument("--smoke-test", action="store_true", help="a tiny grid, well under a minute")
    p.add_argument("--resume", action="store_true",
                   help="resume an interrupted study (the default behaviour: finished trials "
                        "are reused, unfinished ones resume from their checkpoints)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (sets RAY_ADDRESS; 'auto' = the cluster running on "
                        "this node, e.g. under `ray submit`); default: RAY_ADDRESS, else a local "
                        "Ray with this machine's CPUs")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                        "sqlite:////<study_dir>/mlflow.db)")


def run_study_command(kind: str, args: argparse.Namespace) -> int:
    module, fn = _STUDIES[kind]
    if getattr(args, "ray_address", None):
        import os

        os.environ["RAY_ADDRESS"] = args.ray_address
    try:
        run = getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"study {kind}: not available ({exc})") from None
    started = _maybe_start_ray()
    try:
        out: dict[str, Any] = run(args.config, args.set, args.smoke_test, True, args.tracking_uri)
    finally:
        if started:
            import ray

            ray.shutdown()
    failed = out.get("failed") or {}
    n_failed = sum(failed.values()) if isinstance(failed, dict) else int(failed or 0)
    return 1 if n_failed else 0


def _maybe_start_ray() -> bool:
    """True if this process will own the Ray session it starts (shut down at the end)."""
    try:
        import ray
    except ImportError:
        return False
    return not ray.is_initialized()


def cmd_study(args: argparse.Namespace) -> int:
    return run_study_command(args.study, args)


def cmd_report(args: argparse.Namespace) -> int:
    try:
        from granet.study.report import make_report
    except ImportError as exc:
        raise ValueError(f"report: not available ({exc})") from None
    paths = make_report(args.study_dir)
    for p in paths:
        print(p)
    return 0


def add_study_commands(sub: Any) -> None:
    """Register ``study`` and ``report`` on granet's sub-parsers."""
    s = sub.add_parser("study", help="run a study on Ray Tune (MLflow + Parquet results)")
    ssub = s.add_subparsers(dest="study", required=True)
    for kind, text in (
        ("plasticity", "pruning plasticity by checkpoint branching (SPEC §6)"),
        ("search", "hyper-parameter search (Optuna + ASHA)"),
        ("compare", "methods x densities x seeds comparison"),
    ):
        p = ssub.add_parser(kind, help=text)
        add_study_arguments(p)
        p.set_defaults(func=cmd_study)
    r = sub.add_parser("report", help="figures and tables of a finished study")
    r.add_argument("study_dir")
    r.set_defaults(func=cmd_report)
