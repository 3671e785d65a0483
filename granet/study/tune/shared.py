"""Storage every node of a Ray cluster sees: checked before any trial runs.

On a cluster of more than one node (or one with an autoscaler), Tune trials run on nodes other
than the driver's, and each writes its checkpoints, Parquet rows and MLflow metrics itself. So:

* a local ``study_dir`` (and the directory of a ``sqlite:`` tracking URI) must be visible from
  every node: the driver writes a marker file with a random token and runs one tiny task pinned
  to each alive node (``NodeAffinitySchedulingStrategy(soft=False)``) that reads it back; a node
  that cannot is named in the refusal, with the fix;
* a URI ``study_dir`` (``s3://``) must be readable from every node (credentials, endpoint): the
  same marker, written as an object;
* on an autoscaling cluster, nodes not started yet cannot answer: a local path whose mount is a
  local file system type (ext4, xfs, tmpfs, overlay...) is refused too.

A local (single-node) Ray is never checked.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

__all__ = ["check_shared_storage", "mount_of", "LOCAL_FS_TYPES"]

# file system types that only the machine holding them sees
LOCAL_FS_TYPES = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "overlayfs", "zfs", "f2fs",
    "vfat", "exfat", "ntfs", "ntfs3", "ramfs", "devtmpfs", "squashfs", "aufs", "reiserfs", "jfs",
})

_FIX = ("use a study_dir every node sees: s3://BUCKET/prefix, gs://BUCKET/prefix or a path on "
        "a shared file system (NFS) mounted at the same place on every node")
_TRACKING_FIX = ("give an MLflow server every node reaches (--tracking-uri http://HEAD-IP:5000,"
                 " see scripts/mlflow_server.sh) or a Postgres/MySQL URI")


def mount_of(path: str | Path, mounts: str = "/proc/mounts") -> tuple[str, str] | None:
    """(mount point, file system type) holding ``path`` (its nearest existing ancestor), from
    ``/proc/mounts``; None when that cannot be read."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    real = os.path.realpath(p)
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return None
    best: tuple[str, str] | None = None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if real == point or real.startswith(point.rstrip("/") + "/") or point == "/":
            if best is None or len(point) >= len(best[0]):
                best = (point, parts[2])
    return best


def _look(markers: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """On one node: [(label, what is wrong)] for the markers it cannot read back."""
    import socket

    bad = []
    for label, where, token in markers:
        try:
            if "://" in where:
                from granet.study.storage import study_path

                got = study_path(where).read_bytes().decode()
            else:
                got = Path(where).read_text()
            if got != token:
                bad.append((label, f"{where} holds another file (not this driver's marker)"))
        except FileNotFoundError:
            bad.append((label, f"{where} does not exist there"))
        except Exception as exc:  # noqa: BLE001 - reported to the driver
            why = " ".join(str(exc).split())[:200]
            bad.append((label, f"{where}: {type(exc).__name__}: {why}"))
    return [(label, f"{msg} (host {socket.gethostname()})") for label, msg in bad]


def check_shared_storage(paths: Any, tracking_uri: str | None, *, say: Any = print,
                         timeout: float = 60.0, bootstrap: str | None = None) -> str | None:
    """Why a study directory or sqlite tracking store cannot be used by some node of a
    multi-node (or autoscaling) cluster (the driver refuses with it, exit 2); None when every
    node sees them. Needs ``ray.init`` done; None at once on a single-node Ray without an
    autoscaler."""
    import ray

    from granet.study.tune.tuner import BOOTSTRAP_CONFIG, autoscaler_node_types

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    autoscaling = autoscaler_node_types(bootstrap or BOOTSTRAP_CONFIG) is not None
    if len(nodes) <= 1 and not autoscaling:
        return None
    # (label, local directory or URI, fix)
    places: list[tuple[str, Any, str]] = []
    if not paths.is_uri:
        places.append((f"study_dir={str(paths.root)!r}", paths.root, _FIX))
    else:
        places.append((f"study_dir={str(paths.root)!r}", paths.root,
                       "give every node the same storage credentials and endpoint (an "
                       "instance role, or AWS_* variables in the cluster's env)"))
    if tracking_uri and tracking_uri.startswith("sqlite:"):
        db = Path(tracking_uri[len("sqlite:///"):])
        places.append((f"tracking URI {tracking_uri!r} (workers log to it)", db.parent,
                       _TRACKING_FIX))
    if autoscaling:
        for label, where, fix in places:
            if isinstance(where, Path):
                m = mount_of(where)
                if m is not None and m[1] in LOCAL_FS_TYPES:
                    return (f"{label}: on {m[0]} ({m[1]}), a file system only this node sees; "
                            f"the nodes this autoscaling cluster starts could not use it: {fix}")
    token = secrets.token_hex(16)
    markers: list[tuple[str, str, str]] = []
    written: list[Any] = []
    from granet.study.storage import write_bytes

    try:
        for label, where, _ in places:
            m = where / f".granet-visible-{token[:12]}"
            write_bytes(m, token.encode())
            written.append(m)
            markers.append((label, str(m), token))
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        look = ray.remote(num_cpus=0, max_retries=0)(_look)
        refs = {look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(markers): n for n in nodes}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        problems: list[str] = []
        for ref in ready:
            n = refs[ref]
            try:
                bad = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - the node died or the task failed
                say(f"[cluster] warning: node {n.get('NodeManagerAddress')} could not check "
                    f"the study's storage ({type(exc).__name__})")
                continue
            for label, msg in bad:
                fix = next(f for lab, _, f in places if lab == label)
                problems.append(f"node {n.get('NodeManagerAddress')} (id {n['NodeID'][:12]}) "
                                f"cannot see {label}: {msg}; {fix}")
        for ref in pending:
            ray.cancel(ref, force=True)
            say(f"[cluster] warning: node {refs[ref].get('NodeManagerAddress')} did not answer "
                f"the storage check in {timeout:g} s; not checked")
        if problems:
            return "a multi-node Ray cluster needs storage every node sees: " + "; ".join(problems)
        return None
    finally:
        for m in written:
            try:
                m.unlink(missing_ok=True)
            except OSError:
                pass
