"""``granet study {plasticity,search,compare} CONFIG`` and ``granet report STUDY_DIR``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_study_commands", "run_study_command", "script_main"]

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
    p.add_argument("--fresh", action="store_true",
                   help="search: delete the Optuna study and start over; compare: re-run every "
                        "trial (plasticity: no effect; delete the study directory instead)")


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
    resume = not getattr(args, "fresh", False)
    try:
        out: dict[str, Any] = run(args.config, args.set, args.smoke_test, resume, args.tracking_uri)
    finally:
        if started:
            import ray

            ray.shutdown()
    if kind != "plasticity":  # the plasticity study draws its report and prints its own end
        _finish(out)
    failed = out.get("failed") or {}
    n_failed = sum(failed.values()) if isinstance(failed, dict) else int(failed or 0)
    return 1 if n_failed else 0


def _finish(out: dict[str, Any]) -> None:
    """Draw the report (figures also go to the parent MLflow run) and print where things are."""
    from granet.study.report import make_report

    try:
        figures = make_report(out["study_dir"], tracking_uri=out.get("tracking_uri"))
        out["figures"] = [str(p) for p in figures]
    except Exception as exc:  # the report must not lose a finished study
        print(f"report: failed ({type(exc).__name__}: {exc})", file=sys.stderr)
    print(json.dumps(out, indent=2, default=str))
    if out.get("mlflow_ui"):
        print(f"MLflow UI: {out['mlflow_ui']}")


def script_main(kind: str, default_config: Path, argv: list[str] | None = None) -> int:
    """Entry point of ``studies/<kind>.py``: the same flags as ``granet study <kind>``."""
    from granet.config import ConfigError

    p = argparse.ArgumentParser(description=f"granet {kind} study (see granet study {kind} -h)")
    add_study_arguments(p)
    args = p.parse_args(argv)
    if args.config is None:
        args.config = str(default_config)
    try:
        return run_study_command(kind, args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"{kind}: error: {exc}", file=sys.stderr)
        return 2


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
