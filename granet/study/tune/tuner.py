"""Ray start-up and the one Tune policy every stage of every study uses.

Policy:

* resources per trial from the study config (``cpus_per_trial``, fractional ``gpus_per_trial``);
  torch threads per trial = max(1, int(cpus_per_trial));
* ``reuse_actors=True`` (a fresh actor costs ~2 s on a small box);
* ``FailureConfig(max_failures)``: a crashed trial restarts from its last reported checkpoint;
* ``CheckpointConfig(num_to_keep=2)``: checkpoints that must survive (plasticity trunk epochs)
  are stable files outside Tune's rotation;
* storage under ``<study_dir>/ray/<experiment>``; a stage restores an unfinished experiment of
  that name (``Tuner.restore``) instead of starting a new one;
* short trial directory names, no progress tables: :class:`ProgressLine` prints our lines.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from granet.config import ConfigError
from granet.study.base import StudyConfig
from granet.study.tracking import ServiceError

__all__ = ["can_restore", "check_cluster_resources", "check_local_resources",
           "check_ray_address", "ensure_ray", "errored_trial_keys", "grid_of", "run_tuner",
           "shutdown_ray", "tune_outcome"]


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds (not Ray's endless retries) when a ``host:port`` address does not
    answer. ``auto`` and ``ray://`` addresses are checked by ray.init itself."""
    if address == "auto" or address.startswith("local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address={address!r}: must be host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ServiceError(
            f"Ray cluster at {address}: not reachable ({exc.strerror or exc}); start it "
            "(ray start --head ...) or drop --ray-address/RAY_ADDRESS to run a local Ray"
        ) from None


def check_local_resources(study: StudyConfig) -> None:
    """For a local Ray (this machine): the resources a trial asks for must exist."""
    if study.gpus_per_trial:
        import torch

        n = torch.cuda.device_count()
        if n < study.gpus_per_trial:
            raise ConfigError(
                f"gpus_per_trial={study.gpus_per_trial!r}: this machine has {n} GPUs; use 0 "
                "on a CPU-only machine (or run on a cluster with --ray-address)"
            )
    cpus = os.cpu_count() or 1
    if study.cpus_per_trial > cpus:
        raise ConfigError(
            f"cpus_per_trial={study.cpus_per_trial!r}: this machine has {cpus} CPUs; must be "
            f"<= {cpus}"
        )


def ensure_ray(address: str | None = None) -> bool:
    """``ray.init`` once: join ``address`` (or RAY_ADDRESS) when given, else start a local Ray
    with this machine's CPUs. Returns True when this call started or joined Ray (the caller
    shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": True,
                              "logging_level": "ERROR"}
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "a local Ray"
        raise ServiceError(f"Ray at {where}: could not start or join ({exc})") from None
    return True


def shutdown_ray() -> None:
    import ray

    ray.shutdown()


def can_restore(path: Any) -> bool:
    """Whether ``path`` (a local path or a :class:`~granet.study.storage.UriPath`) holds a Tune
    experiment that can be restored."""
    from ray import tune

    from granet.study.storage import tune_storage

    if not path.is_dir():
        return False
    where, fs = tune_storage(path)
    return tune.Tuner.can_restore(where, storage_filesystem=fs)


def grid_of(values: list[Any]) -> Any:
    """A Tune grid over ``values`` (one trial each)."""
    from ray import tune

    return tune.grid_search(values)


BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the cluster config


def autoscaler_node_types(
    path: str | Path = BOOTSTRAP_CONFIG,
) -> dict[str, dict[str, float]] | None:
    """The resources of each node type an autoscaler may start, from the cluster config
    ``ray up`` writes on the head; None when this is not an autoscaling cluster."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        return None
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    types = cfg.get("available_node_types") or {}
    return {name: {k: float(v) for k, v in (t.get("resources") or {}).items()}
            for name, t in types.items() if isinstance(t, dict)}


def check_cluster_resources(study: StudyConfig, *, say: Any = print,
                            bootstrap: str | Path = BOOTSTRAP_CONFIG) -> None:
    """On a running Ray cluster: one trial's resources must fit on a node that exists now, or
    on a node type the cluster's autoscaler can start - then the autoscaler is asked for them
    (``request_resources``) and the trials wait for it. Refused only when no node, now or ever,
    can hold a trial."""
    import ray

    want = {"CPU": float(study.cpus_per_trial)}
    if study.gpus_per_trial:
        want["GPU"] = float(study.gpus_per_trial)

    def fits(res: dict[str, float]) -> bool:
        return all(res.get(k, 0.0) >= v for k, v in want.items())

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(fits(r) for r in nodes):
        return
    shape = ", ".join(f"{k}: {v:g}" for k, v in want.items())
    types = autoscaler_node_types(bootstrap)
    largest = {k: max((r.get(k, 0.0) for r in nodes), default=0.0) for k in want}
    if types is None:
        field = "gpus_per_trial" if "GPU" in want and largest["GPU"] < want["GPU"] else \
            "cpus_per_trial"
        value = study.gpus_per_trial if field == "gpus_per_trial" else study.cpus_per_trial
        raise ConfigError(
            f"{field}={value!r}: no node of the Ray cluster has {{{shape}}} (the largest has "
            f"{', '.join(f'{k}: {v:g}' for k, v in largest.items())}) and it has no autoscaler "
            f"({bootstrap} not found); lower it or add such a node"
        )
    if not any(fits(r) for r in types.values()):
        offered = "; ".join(f"{n}: {{{', '.join(f'{k}: {v:g}' for k, v in r.items())}}}"
                            for n, r in types.items())
        raise ConfigError(
            f"gpus_per_trial={study.gpus_per_trial!r}, cpus_per_trial={study.cpus_per_trial!r}:"
            f" no node type of this cluster can hold {{{shape}}} ({offered}); lower them or add "
            "a larger node type to the cluster config"
        )
    from ray.autoscaler.sdk import request_resources

    n = max(1, study.max_concurrent or 1)
    request_resources(bundles=[dict(want)] * n)
    say(f"[cluster] no node holds {{{shape}}} yet: asked the autoscaler for {n}; trials wait "
        "until it brings them (ray status shows the pending nodes)")


def _named(trainable: Any) -> Any:
    """Tune restores an experiment only with a trainable of the same name: every granet
    trainable (a wrapped one too) goes by ``granet_trainable``."""
    if getattr(trainable, "__name__", None) == "granet_trainable":
        return trainable

    def granet_trainable(config: dict[str, Any]) -> None:
        return trainable(config)

    return granet_trainable


def _trial_dirname(trial: Any) -> str:
    cfg = trial.config or {}
    t = cfg.get("trial") or {}
    key = cfg.get("trial_key") or t.get("key") or trial.trial_id
    return f"{t.get('stage', 'trial')}-{key}"[:60]


def run_tuner(
    study: StudyConfig,
    *,
    experiment: str,
    storage: Any,
    trainable: Any,
    param_space: dict[str, Any] | None = None,
    restore: bool = False,
    num_samples: int = 1,
    search_alg: Any = None,
    scheduler: Any = None,
    callbacks: list[Any] | None = None,
) -> Any:
    """Fit (or, with ``restore``, resume) one Tune experiment; return its ResultGrid.

    ``metric``/``mode`` are the searcher's and scheduler's business (they carry their own:
    setting them on TuneConfig too raises in Ray 2.60); TuneConfig gets none, so a trial that
    ends without an epoch (it had finished already, or its input is unusable) is no error.
    """
    # num_to_keep forces an experiment snapshot per reported checkpoint: Tune warns on every
    # short trial otherwise. The classic reporter with verbose=0 prints nothing.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from ray import tune

    resources = {"cpu": study.cpus_per_trial}
    if study.gpus_per_trial:
        resources["gpu"] = study.gpus_per_trial
    fn = tune.with_resources(_named(trainable), resources)
    from granet.study.storage import tune_storage

    cbs = list(callbacks or [])
    # a URI study_dir: the path inside the bucket and its pyarrow file system (Ray ships the
    # file system to every trial; workers need the same credentials)
    storage_path, storage_fs = tune_storage(storage)
    path, _ = tune_storage(storage / experiment)
    if restore:
        tuner = tune.Tuner.restore(path, fn, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=storage_fs)
        # A restored run config carries the old callbacks: attach this run's (fresh counts).
        local = getattr(tuner, "_local_tuner", None)
        if local is not None:
            local.get_run_config().callbacks = cbs
        return _fit(tuner)
    tuner = tune.Tuner(
        fn,
        param_space=param_space or {},
        tune_config=tune.TuneConfig(
            num_samples=num_samples, search_alg=search_alg, scheduler=scheduler,
            max_concurrent_trials=study.max_concurrent or None, reuse_actors=True,
            trial_dirname_creator=_trial_dirname, trial_name_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=experiment, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=tune.FailureConfig(max_failures=study.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=cbs, verbose=0,
        ),
    )
    return _fit(tuner)


def _fit(tuner: Any) -> Any:
    """``tuner.fit()``, telling whether Ctrl-C stopped it (``grid.granet_interrupted``).

    Tune catches the first SIGINT itself, stops its trials (marking them TERMINATED) and
    returns normally. Its handler restores the handler it found when it fires, so the handler
    installed here is back in place after ``fit()`` exactly when a SIGINT arrived."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        grid = tuner.fit()
        grid.granet_interrupted = False
        return grid

    def _interrupt(sig: int, frame: Any) -> None:  # a second Ctrl-C after Tune's own
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        grid = tuner.fit()
        grid.granet_interrupted = signal.getsignal(signal.SIGINT) is _interrupt
    finally:
        signal.signal(signal.SIGINT, previous)
    return grid


def tune_outcome(grid: Any, expected: int) -> tuple[int, int, bool]:
    """(trials that ended, trials that errored, interrupted) of a ResultGrid of ``expected``
    trials."""
    errors = grid.num_errors
    ended = grid.num_terminated
    interrupted = bool(getattr(grid, "granet_interrupted", False)) or len(grid) < expected
    return ended, errors, interrupted


def errored_trial_keys(grid: Any) -> set[str]:
    """The trial keys carried by the Tune trials of ``grid`` that errored (a pack: all its
    members')."""
    keys: set[str] = set()
    for i in range(len(grid)):
        r = grid[i]
        if r.error is None:
            continue
        cfg = r.config or {}
        trial = cfg.get("trial") or {}
        members = trial.get("members")
        if members:
            keys |= {m.get("key") for m in members if isinstance(m, dict)}
        else:
            keys.add(cfg.get("trial_key") or trial.get("key"))
    keys.discard(None)
    return keys
