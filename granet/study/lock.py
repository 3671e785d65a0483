"""One driver per study directory: an exclusive lock file with host, PID and start time.

The lock is an ``fcntl.flock`` on ``<study_dir>/.lock``: the kernel releases it when the holder
dies, so a lock left by a killed driver on this host is stale by construction and is taken over.
The file's JSON names the holder, so a second driver refuses with a message that says who holds
it. On a shared file system where ``flock`` is not coherent across hosts, a lock file written by
another host is honoured until the user deletes it (the message says so).

A study directory on object storage (``s3://...``) cannot be ``flock``-ed: the lock file is in
the study's local state directory, and a best-effort ``.lock`` object in the bucket carries the
same JSON, so a driver on another host is told who holds the study (object stores have no
compare-and-swap: two drivers starting in the same second may both pass).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["StudyLock", "StudyLocked"]


class StudyLocked(RuntimeError):
    """Another driver runs on this study directory."""


def _read_holder(lock: Any) -> dict[str, Any]:
    """The JSON a lock file (a Path) or lock object (a UriPath) holds; {} when none."""
    try:
        return json.loads(lock.read_bytes() or b"{}")
    except (OSError, ValueError):
        return {}


def _locked_by(held: dict[str, Any], lock: Any) -> StudyLocked:
    """The refusal naming a holder this host cannot check (another host) and the way out."""
    return StudyLocked(
        f"study directory {str(lock.parent)!r} is locked by a driver on host "
        f"{held.get('host')!r} (pid {held.get('pid')}, started {held.get('started')}); if "
        f"that run is no longer alive, delete {str(lock)!r} and start again"
    )


class StudyLock:
    """Context manager holding the study directory's lock."""

    def __init__(self, path: str | Path, remote: Any = None) -> None:
        self.path = Path(path)
        self.remote = remote  # a granet.study.storage.UriPath, or None
        self._fd: int | None = None


    def _check_remote(self, host: str) -> None:
        """Refuse when the bucket's lock object names a live driver other than this one."""
        held = _read_holder(self.remote)
        if not held:
            return
        other_host = held.get("host") and held.get("host") != host
        alive = False
        if not other_host and isinstance(held.get("pid"), int) and held["pid"] != os.getpid():
            try:
                os.kill(held["pid"], 0)
                alive = True
            except (ProcessLookupError, PermissionError):
                alive = False
        if other_host or alive:
            raise _locked_by(held, self.remote)


    def acquire(self) -> None:
        host = socket.gethostname()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            h = _read_holder(self.path)
            raise StudyLocked(
                f"study directory {str(self.path.parent)!r} is in use by another granet driver "
                f"(pid {h.get('pid', '?')} on {h.get('host', '?')}, started "
                f"{h.get('started', '?')}): wait for it to finish, or stop it first"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (unlinked) it between our open and flock: retry
            os.close(fd)
            return self.acquire()
        held = _read_holder(self.path)
        if held.get("host") and held.get("host") != host:
            os.close(fd)
            raise _locked_by(held, self.path)
        if self.remote is not None:
            try:
                self._check_remote(host)
            except BaseException:
                os.close(fd)
                raise
        info = {"host": host, "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join(sys.argv)[:500]}
        if self.remote is not None:
            try:
                self.remote.write_bytes(json.dumps(info).encode())
            except BaseException:
                os.close(fd)
                raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
            if self.remote is not None:
                try:
                    if _read_holder(self.remote).get("pid") == os.getpid():
                        self.remote.unlink(missing_ok=True)
                except OSError:  # best effort: the next driver on this host takes it over
                    pass
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
