"""``granet study {plasticity,search,compare} CONFIG``, ``granet study sync-mlflow STUDY_DIR``
and ``granet report STUDY_DIR``.

Exit status: 0 the study finished (diverged trials are results, counted in the summary; so is
what MLflow did not get: it is kept in the study's spool, named in the last lines); 1 some
trials failed; 2 bad input or an unusable environment, found before any work; 130 interrupted
(Ctrl-C: run the same command again to resume).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["STUDIES", "add_study_commands", "run_study_command", "script_main"]

# kind -> (module, class): imported on use, so `granet train` never imports the study layer
STUDIES: dict[str, tuple[str, str, str]] = {
    "plasticity": ("granet.study.plasticity", "PlasticityStudy",
                   "pruning plasticity by checkpoint branching (SPEC §6)"),
    "search": ("granet.study.search", "SearchStudy", "hyper-parameter search (Optuna + ASHA)"),
    "compare": ("granet.study.compare", "CompareStudy", "methods x densities x seeds comparison"),
}


def study_class(kind: str) -> type:
    import importlib

    module, cls, _ = STUDIES[kind]
    return getattr(importlib.import_module(module), cls)


def add_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="study YAML (defaults if omitted)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set ratios=[0.2,0.5] --set train.optim.lr=0.05")
    p.add_argument("--smoke-test", action="store_true",
                   help="a tiny version in seconds, under its own name (<name>-smoke) and "
                        "directory")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (host:port, ray://host:port, or 'auto' for the "
                        "cluster running on this node); default: RAY_ADDRESS, else a local Ray "
                        "with this machine's CPUs")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else "
                        "sqlite:////<study_dir>/mlflow.db)")
    p.add_argument("--fresh", action="store_true",
                   help="search: delete the Optuna study and start over; compare: re-run every "
                        "trial (plasticity: delete the study directory instead)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run_study_command(kind: str, args: argparse.Namespace) -> int:
    from granet.study.driver import run_study

    out = run_study(study_class(kind), args.config, args.set, smoke_test=args.smoke_test,
                    fresh=args.fresh, tracking_uri=args.tracking_uri,
                    ray_address=args.ray_address, quiet=args.quiet)
    print_end(out)
    return 1 if sum(out["failed"].values()) else 0


def print_end(out: dict[str, Any]) -> None:
    """Where to look: a few lines a person reads, then the JSON summary's path."""
    from granet.errors import redact
    from granet.study.storage import study_path

    def _print(text: str, **kw: Any) -> None:
        print(redact(text), **kw)

    launched = ", ".join(f"{n} {s}" for s, n in out["launched"].items()) or "nothing"
    failed = sum(out["failed"].values())
    st = out["statuses"]
    pending = out.get("mlflow_pending")
    _print(f"{out['kind']} study '{out['study']}' {out['status']} in {out['seconds']:.0f} s: "
           f"launched {launched}; {failed} failed, {st.get('diverged', 0)} diverged "
           f"({st.get('done', 0)} trials done in all)"
           f"{'; MLflow incomplete (see below)' if pending else ''}", flush=True)
    for p in out["outputs"]:
        _print(f"  {p}")
    if out["figures"]:
        _print(f"  figures: {study_path(out['figures'][0]).parent}")
    root = study_path(out["study_dir"])  # a local path or a URI (s3://…): never Path(uri)
    _print(f"  tables (Parquet): {root / 'results'}")
    _print(f"  summary: {root / 'summary.json'}")
    _print(f"MLflow UI: {out['mlflow_ui']}", flush=True)
    if pending:
        _print(pending["message"], flush=True)


def cmd_study(args: argparse.Namespace) -> int:
    return run_study_command(args.study, args)


def cmd_report(args: argparse.Namespace) -> int:
    from granet.study import results
    from granet.study.report import make_report
    from granet.study.storage import study_path

    d = study_path(args.study_dir)  # a local path or a URI (s3://...)
    if not d.is_dir():
        raise FileNotFoundError(f"study directory {str(d)!r}: not found")
    if not any(results.read_table(d, t).num_rows for t in results.TABLES):
        raise FileNotFoundError(
            f"study directory {str(d)!r}: holds no study results (results/*/ is empty); give "
            "the study_dir of a study that has run"
        )
    for p in make_report(d):
        print(p)
    return 0


def cmd_sync_mlflow(args: argparse.Namespace) -> int:
    """Upload what a study's trials could not send to MLflow (its spool)."""
    import json

    from granet.study import mlflow_spool as ms
    from granet.study import mlflow_sync
    from granet.study.lock import StudyLock
    from granet.study.paths import StudyPaths
    from granet.study.tracking import ServiceError, check_tracking_uri

    paths = StudyPaths(args.study_dir)
    if not paths.root.is_dir():
        raise FileNotFoundError(f"study directory {str(paths.root)!r}: not found")
    left = [s for s in ms.spools(paths.mlflow_spool) if s.exists()]
    if not left:
        print(f"nothing to upload: {paths.mlflow_spool} holds no spooled MLflow runs")
        return 0
    uri = args.tracking_uri or next(
        (s.read().header.get("uri") for s in left if s.read().header.get("uri")), None)
    if not uri:
        raise ValueError("--tracking-uri: must be given (the spool does not name its server)")
    check_tracking_uri(uri, origin="--tracking-uri" if args.tracking_uri else "the spool")
    import os

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # one line per run
    with StudyLock(paths.lock):
        try:
            res = mlflow_sync.sync(paths.mlflow_spool, uri)
        except Exception as exc:  # noqa: BLE001 - one line naming the server; spool kept
            raise ServiceError(
                f"MLflow tracking URI {uri}: upload failed ({ms.short_error(exc)}); what was "
                f"not uploaded is kept in {paths.mlflow_spool}: run the same command again "
                "once the server works") from None
    trials = [n for n in res.uploaded if n != ms.PARENT]
    parent = " and the parent run" if ms.PARENT in res.uploaded else ""
    print(f"uploaded {len(trials)} trial runs{parent} to {uri}: {res.metrics} metric points, "
          f"{res.artifacts} artifacts, {res.created} runs created; spool emptied")
    if paths.summary.is_file():  # the summary no longer names a pending upload
        try:
            summary = json.loads(paths.summary.read_text())
        except ValueError:
            summary = None
        if isinstance(summary, dict) and summary.pop("mlflow_pending", None) is not None:
            from granet.io import atomic_write_text

            atomic_write_text(paths.summary, json.dumps(summary, indent=2, default=str))
    return 0


def add_study_commands(sub: Any) -> None:
    """Register ``study`` and ``report`` on granet's sub-parsers."""
    s = sub.add_parser("study", help="run a study on Ray Tune (MLflow + Parquet results)")
    ssub = s.add_subparsers(dest="study", required=True)
    for kind, (_, _, text) in STUDIES.items():
        p = ssub.add_parser(kind, help=text)
        add_study_arguments(p)
        p.set_defaults(func=cmd_study)
    m = ssub.add_parser("sync-mlflow", help="upload what MLflow did not get during a study "
                                            "(the study's spool) once the server is back")
    m.add_argument("study_dir")
    m.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: the one the study used)")
    m.set_defaults(func=cmd_sync_mlflow)
    r = sub.add_parser("report", help="figures and tables of a finished study")
    r.add_argument("study_dir")
    r.set_defaults(func=cmd_report)


def script_main(kind: str, default_config: Path, argv: list[str] | None = None) -> int:
    """Entry point of ``studies/<kind>.py``: the same flags and exit codes as
    ``granet study <kind>``."""
    from granet.errors import run_command

    p = argparse.ArgumentParser(description=f"granet {kind} study (see granet study {kind} -h)")
    add_study_arguments(p)
    args = p.parse_args(argv)
    if args.config is None:
        args.config = str(default_config)
    return run_command(lambda: run_study_command(kind, args))

