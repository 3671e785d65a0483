"""The one lifecycle every study shares.

``run_study(StudyClass, config, ...)``:

1. load and validate the study config, every trial config and the user's code (one model built,
   one batch through it) - a :class:`~granet.config.ConfigError` before anything is written;
2. check the services up front, in seconds: the MLflow tracking URI, the Ray address, and (for a
   local Ray) that this machine has the CPUs/GPUs a trial asks for;
3. create the study directory and take its lock (one driver per study directory);
4. start or join Ray; open (or reopen) the study's parent MLflow run;
5. run the study's stages (``study.plan()``): restore the stage's unfinished Tune experiments,
   then launch what is still missing - finished trials (Parquet ``trials`` rows) never re-run;
6. ``study.summarize()`` and the report figures; the parent run gets the summary's metrics, the
   figures and tables, and its status: FINISHED, FAILED (a trial failed) or KILLED (Ctrl-C).

Ctrl-C ends with :class:`StudyInterrupted` (exit 130): no MLflow run is left RUNNING, nothing is
reported as finished, and running the same command again resumes the study.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from granet.errors import redact
from granet.study import results
from granet.study.base import PackedTrial, StudyConfig, TrialContext, load_study_config
from granet.study.envfaults import (
    StudyEnvironmentError,
    disk_full,
    environment_error,
    storage_lost,
)
from granet.study.lock import StudyLock
from granet.study.paths import StudyPaths
from granet.study.stages import GridStage, SearchStage
from granet.study.storage import atomic_write_text, check_writable, local_copy
from granet.study.tracking import StudyTracker, check_tracking_uri

__all__ = ["StudyEnvironmentError", "StudyInterrupted", "StudyRun", "run_study",
           "resolve_tracking_uri"]

log = logging.getLogger("granet")


class StudyInterrupted(RuntimeError):
    """The study was stopped (Ctrl-C); what finished is kept and a re-run resumes."""


def resolve_tracking_uri(study: StudyConfig, paths: StudyPaths) -> tuple[str, str]:
    """(URI, where it came from): the study's ``tracking_uri`` (or --tracking-uri), else
    MLFLOW_TRACKING_URI, else the study directory's sqlite store."""
    if study.tracking_uri:
        return study.tracking_uri, "tracking_uri"
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        if env.startswith("sqlite:///") and not env.startswith("sqlite:////"):
            # relative sqlite path: pin it to the driver's cwd (workers run elsewhere)
            env = "sqlite:///" + str(Path(env[len("sqlite:///"):]).resolve())
        from granet.study.base import check_tracking_uri_form

        check_tracking_uri_form(env, "MLFLOW_TRACKING_URI (environment)")
        return env, "MLFLOW_TRACKING_URI (environment)"
    return paths.default_tracking_uri(), "the default <study_dir>/mlflow.db"


@dataclass
class StudyRun:
    """What a study's ``plan()`` and ``summarize()`` see of the running study."""

    study: StudyConfig
    paths: StudyPaths
    tracker: StudyTracker | None = None
    quiet: bool = False
    fresh: bool = False
    launched: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    planned: Counter = field(default_factory=Counter)

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(redact(msg), flush=True)

    def finished_keys(self, stage: str | None = None) -> set[str]:
        return results.finished_keys(self.paths.root, stage)


def _make_study_dir(paths: StudyPaths) -> None:
    if paths.is_uri:  # the bucket was checked (check_writable); the state dir is local
        try:
            paths.state.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            err = environment_error(exc, f"state directory of study_dir={str(paths.root)!r} "
                                         "(GRANET_STATE_DIR)")
            if err is None:
                raise
            raise err from None
        return
    root = paths.root
    for parent in [root, *root.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise StudyEnvironmentError(
                    f"study_dir={str(root)!r}: {str(parent)!r} is a regular file, not a "
                    "directory; choose another study_dir"
                )
            break
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        err = environment_error(exc, f"study_dir={str(root)!r}")
        if err is None:
            raise
        raise err from None


def _preflight(study: StudyConfig) -> None:
    """Build each distinct model/data pair once and run one batch (user code errors surface
    here, not in every Ray worker)."""
    try:
        from granet.preflight import check_user_code
    except ImportError:  # pragma: no cover - granet.preflight ships with granet
        return
    from granet.data import check_available

    seen: set[str] = set()
    for cfg in study.trial_configs():
        ident = json.dumps([cfg.model.name, cfg.model.kwargs, cfg.data.name,
                            cfg.data.num_samples], sort_keys=True, default=str)
        if ident not in seen:
            seen.add(ident)
            check_user_code(cfg)
            check_available(cfg.data.name, cfg.data.data_dir, cfg.data.download)


def _default_trainable() -> Any:
    from granet.study.tune.trainable import granet_trainable

    return granet_trainable


def _stage_experiments(run: StudyRun, stage: str) -> list[dict[str, Any]]:
    p = run.paths.experiments_manifest(stage)
    if not p.is_file():
        return []
    try:
        return json.loads(p.read_text())
    except ValueError:
        log.warning("granet: warning: %s is unreadable; its experiments are not restored", p)
        return []


def _run_grid(run: StudyRun, stage: GridStage, ctx: TrialContext, trainable: Any,
              callbacks: list[Any]) -> None:
    """Restore this stage's unfinished Tune experiments, then launch one new experiment for
    what is still missing. ``<study_dir>/ray/<stage>-experiments.json`` lists every experiment
    with its keys, written before it starts, so an interrupted one is found and restored."""
    from granet.study.tune.progress import ProgressLine
    from granet.study.tune.tuner import can_restore, grid_of, run_tuner

    run.planned[stage.name] += stage.planned
    run.launched[stage.name] += 0
    run.failed[stage.name] += 0
    wanted = {t.key for t in stage.trials}
    exps = _stage_experiments(run, stage.name)
    manifest = run.paths.experiments_manifest(stage.name)

    def progress(total: int, members: int) -> ProgressLine:
        return ProgressLine(stage.name, total, metric=stage.metric, mode=stage.mode,
                            failures_dir=str(run.paths.failures),
                            storage=run.paths.root if run.paths.is_uri else None,
                            members=members)

    for exp in exps if not run.fresh else []:
        left = set(exp["keys"]) & wanted
        path = run.paths.experiment(exp["name"])
        if not left or not can_restore(path):
            continue
        # Tune trials (a pack is one) with a trial still to finish
        units = [u for u in exp.get("units") or [[k] for k in exp["keys"]] if set(u) & left]
        grid = run_tuner(run.study, experiment=exp["name"], storage=run.paths.ray,
                         trainable=trainable, restore=True,
                         callbacks=[*callbacks, progress(len(units), len(left))])
        finished = run.finished_keys(stage.name)
        # count what the restore ran: trials it finished (errors are counted as failed)
        _account(run, stage.name, grid, len(left), len(units), ran=len(left & finished))
        wanted -= finished
    todo = [t for t in stage.trials if t.key in wanted]
    if not todo:
        return
    import hashlib

    # packs (plasticity probes of one trunk checkpoint) run as one Tune trial each
    units = run.study.pack_trials(stage.name, todo)
    name = f"{stage.name}-" + hashlib.sha256(
        ",".join(sorted(t.key for t in todo)).encode()).hexdigest()[:10]
    while run.paths.experiment(name).exists():
        name += "x"
    exps.append({"name": name, "keys": sorted(t.key for t in todo),
                 "units": [_unit_keys(u) for u in units]})
    atomic_write_text(manifest, json.dumps(exps, indent=1))
    # no scheduler stops a grid trial: its MLflow metrics are sent at its checkpoints and end
    grid_ctx = dataclasses.replace(ctx, mlflow_every_epoch=False)
    grid = run_tuner(
        run.study, experiment=name, storage=run.paths.ray, trainable=trainable,
        param_space={"trial": grid_of([u.to_dict() for u in units]),
                     "context": grid_ctx.to_dict()},
        callbacks=[*callbacks, progress(len(units), len(todo))],
    )
    _account(run, stage.name, grid, len(todo), len(units))


def _unit_keys(unit: Any) -> list[str]:
    """The trial keys a Tune trial carries (a pack: its members')."""
    return [m.key for m in unit.members] if isinstance(unit, PackedTrial) else [unit.key]


def _run_search(run: StudyRun, stage: SearchStage, ctx: TrialContext, trainable: Any,
                callbacks: list[Any]) -> None:
    from granet.study.tune.progress import ProgressLine
    from granet.study.tune.tuner import run_tuner

    run.planned[stage.name] += stage.planned
    run.launched[stage.name] += 0
    run.failed[stage.name] += 0
    if stage.num_samples <= 0:
        return
    import time as _time

    grid = run_tuner(
        run.study, experiment=f"{stage.name}-{_time.strftime('%Y%m%d-%H%M%S')}",
        storage=run.paths.ray, trainable=trainable,
        param_space={"trial": stage.trial, "context": ctx.to_dict()},
        num_samples=stage.num_samples, search_alg=stage.searcher, scheduler=stage.scheduler,
        callbacks=[*callbacks, ProgressLine(stage.name, stage.num_samples, metric=stage.metric,
                                            mode=stage.mode,
                                            failures_dir=str(run.paths.failures),
                                            storage=run.paths.root if run.paths.is_uri
                                            else None)],
    )
    _account(run, stage.name, grid, stage.num_samples)


def _account(run: StudyRun, stage: str, grid: Any, launched: int,
             tune_trials: int | None = None, ran: int | None = None) -> None:
    """Count ``launched`` trials (carried by ``tune_trials`` Tune trials: fewer with packs; a
    restore counts the ``ran`` it finished) and the failed ones: every unfinished trial of a Tune
    trial that errored."""
    from granet.study.tune.tuner import errored_trial_keys, tune_outcome

    ended, errors, interrupted = tune_outcome(grid, launched if tune_trials is None
                                              else tune_trials)
    if errors:
        keys = errored_trial_keys(grid)
        errors = len(keys - run.finished_keys(stage)) if keys else errors
    run.launched[stage] += launched if ran is None else ran + errors
    run.failed[stage] += errors
    if interrupted:
        done = len(run.finished_keys(stage))
        raise StudyInterrupted(f"[{stage}] interrupted ({done} {stage} trials finished so far)")


def _status_counts(paths: StudyPaths) -> dict[str, int]:
    t = results.read_table(paths.root, "trials")
    return dict(Counter(t.column("status").to_pylist()))


def run_study(
    cls: type[StudyConfig],
    config: str | Path | None,
    overrides: list[str] | None = None,
    *,
    smoke_test: bool = False,
    fresh: bool = False,
    tracking_uri: str | None = None,
    ray_address: str | None = None,
    quiet: bool = False,
    trainable: Any = None,
    callbacks: list[Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume, or complete) a study; return its summary (also ``summary.json``).

    ``trainable`` and ``callbacks`` replace or extend the Tune trainable and callbacks (tests
    inject faults this way, as Ray's ``FailureInjectorCallback`` does).
    """
    t0 = time.time()
    study = load_study_config(cls, config, overrides, smoke_test, tracking_uri)
    _preflight(study)
    paths = StudyPaths(study.study_dir)
    if paths.is_uri:  # bucket, credentials, endpoint: before any Ray or MLflow work
        check_writable(paths.root)
        if not quiet:
            print(redact(f"study_dir {paths.root}: lock, sqlite stores and data cache in the "
                         f"local state directory {paths.state}"), flush=True)
    uri, origin = resolve_tracking_uri(study, paths)
    if uri != paths.default_tracking_uri():  # the default store is created with the study dir
        check_tracking_uri(uri, origin=origin)
    address = ray_address or os.environ.get("RAY_ADDRESS")
    from granet.study.tune import tuner as tn

    if address:
        tn.check_ray_address(address)
    else:
        tn.check_local_resources(study)
    local_store = uri == paths.default_tracking_uri()
    _make_study_dir(paths)
    run = StudyRun(study, paths, quiet=quiet, fresh=fresh)
    try:
        with StudyLock(paths.lock, remote=paths.remote_lock):
            return _run_locked(run, uri, local_store, address, t0,
                               trainable or _default_trainable(), list(callbacks or []))
    except OSError as exc:
        err = environment_error(exc, f"study {study.name!r} in {str(paths.root)!r}")
        if err is None:
            err = storage_lost(paths, exc)
        if err is None:
            raise
        raise err from None
    except Exception as exc:  # Ray and pyarrow wrap an object store's failure in many shapes
        err = storage_lost(paths, exc)
        if err is None:
            raise
        raise err from None


def _run_locked(run: StudyRun, uri: str, local_store: bool, address: str | None, t0: float,
                trainable: Any, callbacks: list[Any]) -> dict[str, Any]:
    from granet.study.tune import tuner as tn

    study, paths = run.study, run.paths
    # While a local Ray starts (seconds), open the parent MLflow run (a new sqlite store
    # migrates its schema: seconds too) and write the data set cache the workers read, in two
    # threads. (mnist1d draws from numpy's global RNG, which neither Ray's start nor MLflow
    # touch; a user data set is never generated here.) On a cluster, its resources are checked
    # first: a trial no node can hold is refused before any MLflow run exists.
    tracker_job = None if address else _Background(lambda: _open_tracker(run, uri, local_store))
    data_job = _Background(lambda: _prepare_data(study, paths))
    try:
        started = tn.ensure_ray(address)
        data_job.result()
    except BaseException as exc:
        data_job.result(swallow=True)
        made = tracker_job.result(swallow=True) if tracker_job is not None else None
        if made is not None:
            _close(made, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    try:
        from granet.study.tune.shared import check_shared_storage

        # every node must see the study dir and sqlite stores (a single-node Ray: no check)
        problem = check_shared_storage(paths, uri, say=run.say)
        if problem is not None:
            raise StudyEnvironmentError(problem)
        if address:
            tn.check_cluster_resources(study, say=run.say)
            tracker = _open_tracker(run, uri, local_store)
        else:
            tracker = tracker_job.result()
        run.tracker = tracker
        from granet.study.base import study_to_dict

        atomic_write_text(paths.study_json,
                          json.dumps(study_to_dict(study), indent=2, default=str))
        ctx = TrialContext(study_dir=str(paths.root), tracking=tracker.tracking_info(),
                           num_threads=max(1, int(study.cpus_per_trial)))
        for reason in results.forget_unreadable(paths.root).values():
            run.say(f"results file {reason}: its trial will run again")
        try:
            for stage in study.plan(run):
                if isinstance(stage, GridStage):
                    _run_grid(run, stage, ctx, trainable, callbacks)
                else:
                    _run_search(run, stage, ctx, trainable, callbacks)
            outputs = study.summarize(run)
        except (KeyboardInterrupt, StudyInterrupted) as exc:
            _close(tracker, "KILLED")
            summary = _summary(run, "interrupted", t0, {})
            _write_summary(paths, summary)
            _mlflow_pending(run, summary, upload=False)  # Ctrl-C: say it, upload nothing now
            cmd = " ".join(sys.argv) if sys.argv and sys.argv[0] else "the same command"
            msg = str(exc) if isinstance(exc, StudyInterrupted) else "interrupted"
            raise StudyInterrupted(
                f"{msg}; finished trials are kept in {paths.root}. Resume with: {cmd}"
            ) from None
        except BaseException as exc:
            _close(tracker, "FAILED")
            if isinstance(exc, Exception) and disk_full(paths.root):
                raise StudyEnvironmentError(
                    f"No space left on device ({paths.root}) while the study ran; free some "
                    "space (or choose a study_dir on a larger disk) and run the same command "
                    "again: finished trials are kept", exit_code=1) from None
            raise
        figures = _report(run)
        failed = sum(run.failed.values())
        status = "failed" if failed else "finished"
        summary = _summary(run, status, t0, outputs, figures)
        _write_summary(paths, summary)
        try:
            tracker.log_metrics(outputs.get("metrics") or {})
            with local_copy([*outputs.get("files", []), paths.summary]) as tables:
                tracker.log_artifacts(tables, "tables")  # a URI study_dir: downloaded first
            with local_copy(figures) as figs:
                tracker.log_artifacts(figs, "figures")
        except Exception as exc:  # noqa: BLE001 - a finished study is kept whatever MLflow says
            log.warning("granet: warning: study artifacts not logged to MLflow (%s: %s)",
                        type(exc).__name__, exc)
        _close(tracker, "FAILED" if failed else "FINISHED")
        _mlflow_pending(run, summary)
        return summary
    finally:
        if started:
            tn.shutdown_ray()


class _Background:
    """``fn()`` in a daemon thread; :meth:`result` joins it and returns its value or raises its
    exception (``swallow``: returns None instead, for error paths)."""

    def __init__(self, fn: Any) -> None:
        import threading

        self.value: Any = None
        self.error: BaseException | None = None

        def target() -> None:
            try:
                self.value = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
                self.error = exc

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def result(self, swallow: bool = False) -> Any:
        self.thread.join()
        if self.error is not None:
            if swallow:
                return None
            raise self.error
        return self.value


def _open_tracker(run: StudyRun, uri: str, local_store: bool) -> StudyTracker:
    study, paths = run.study, run.paths
    tracker = StudyTracker(uri, experiment=study.experiment, study=study.name, kind=study.kind,
                           artifact_root=paths.mlflow_artifacts if local_store else None,
                           spool=paths.mlflow_spool)
    tracker.log_params(study.parent_params())
    return tracker


def _prepare_data(study: StudyConfig, paths: StudyPaths) -> None:
    """Generate each generated built-in data set once, into the study's cache (a failure only
    leaves the workers to generate it)."""
    from granet.study.tune.trainable import prepare_data_cache

    seen: set[str] = set()
    for cfg in study.trial_configs():
        ident = json.dumps([cfg.data.name, cfg.data.num_samples, cfg.data.val_fraction])
        if ident in seen:
            continue
        seen.add(ident)
        try:
            prepare_data_cache(cfg, paths.root)
        except Exception as exc:  # noqa: BLE001 - a cache
            log.warning("granet: warning: data cache not prepared (%s: %s)",
                        type(exc).__name__, exc)


def _close(tracker: StudyTracker, status: str) -> None:
    # two steps, each on its own: the children's step reads the spool, which may be on the
    # study's storage that just failed; the parent is closed whatever that step met
    for what, step in (("child runs not closed as KILLED",
                        lambda: tracker.close_running_children("KILLED")),
                       (f"parent run not closed as {status}", lambda: tracker.finish(status))):
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - already on an error path: keep the first error
            log.warning("granet: warning: MLflow %s (%s: %s)", what, type(exc).__name__,
                        " ".join(str(exc).split())[:300])


def _mlflow_pending(run: StudyRun, summary: dict[str, Any], upload: bool = True) -> None:
    """What did not reach MLflow (the spool): uploaded now when the server answers again,
    else one warning with the command that uploads it, and ``summary["mlflow_pending"]``."""
    from granet.study import mlflow_spool as ms
    from granet.study import mlflow_sync

    tracker, paths = run.tracker, run.paths
    if tracker is None or not ms.spools(paths.mlflow_spool):
        return
    try:  # a server that came back during the study: upload at once (seconds)
        if upload:
            check_tracking_uri(tracker.uri, origin="the study", timeout=3.0)
            mlflow_sync.sync(paths.mlflow_spool, tracker.uri)
    except Exception as exc:  # noqa: BLE001 - what is left stays spooled, named below
        log.debug("spool not uploaded at the end of the study: %s", exc)
    pending = ms.pending_summary(paths.mlflow_spool, tracker.uri, paths.root,
                                 sum(summary["statuses"].values()))
    if pending is None:
        return
    summary["mlflow_pending"] = pending
    _write_summary(paths, summary)
    log.warning("granet: warning: %s", pending["message"])


def _report(run: StudyRun) -> list[str]:
    from granet.study.report import make_report

    try:
        return [str(p) for p in make_report(run.paths.root)]
    except Exception as exc:  # noqa: BLE001 - the report must not lose a finished study
        log.warning("granet: warning: report failed (%s: %s); draw it later with "
                    "`granet report %s`", type(exc).__name__, exc, run.paths.root)
        return []


def _summary(run: StudyRun, status: str, t0: float, outputs: dict[str, Any],
             figures: list[str] = ()) -> dict[str, Any]:
    tracker = run.tracker
    extra = {k: v for k, v in outputs.items() if k not in ("files", "metrics")}
    return {
        "study": run.study.name, "kind": run.study.kind, "status": status,
        "study_dir": str(run.paths.root),
        "planned": dict(run.planned), "launched": dict(run.launched),
        "failed": dict(run.failed), "statuses": _status_counts(run.paths),
        "tracking_uri": tracker.uri if tracker else None,
        "parent_run_id": tracker.parent_run_id if tracker else None,
        "mlflow_ui": tracker.ui_command() if tracker else None,
        "outputs": [str(p) for p in outputs.get("files", [])],
        "figures": list(figures), "seconds": round(time.time() - t0, 2),
        **extra,
    }


def _write_summary(paths: StudyPaths, summary: dict[str, Any]) -> None:
    atomic_write_text(paths.summary, json.dumps(summary, indent=2, default=str))

