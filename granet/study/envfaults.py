"""Environment faults a user can fix (a file in the way, no permission, a full disk, object
storage that stopped answering), turned into one clear :class:`StudyEnvironmentError` that names
the path or URI and the fix (``granet: error:``, no traceback)."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

from granet.study.paths import StudyPaths

__all__ = ["StudyEnvironmentError", "disk_full", "environment_error", "storage_lost"]

log = logging.getLogger("granet")


class StudyEnvironmentError(RuntimeError):
    """The study directory cannot be used (a file in the way, no permission, disk full).
    ``exit_code`` is 2 when found before any work, 1 mid-study."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def disk_full(root: Path) -> bool:
    """Whether the study directory's file system has (almost) no space left: Ray reports a full
    disk in many shapes (a truncated pickle, an I/O error in its own files), so ask the disk."""
    import shutil

    if not isinstance(root, Path):  # object storage
        return False
    try:
        return shutil.disk_usage(root).free < 1 << 20
    except OSError:
        return False


_ENV_FIXES = {
    errno.ENOSPC: "free some space (or choose a study_dir on a larger disk); finished trials "
                  "are kept and a re-run continues",
    errno.EDQUOT: "free some space under your quota; finished trials are kept",
    errno.EROFS: "the file system is read-only: choose a writable study_dir",
    errno.EACCES: "no permission: choose a study_dir you can write to",
    errno.EPERM: "no permission: choose a study_dir you can write to",
    errno.ENOTDIR: "a regular file stands where a directory must be: choose another study_dir",
    errno.EEXIST: "a file stands where a directory must be: choose another study_dir",
}


def environment_error(exc: OSError, what: str) -> StudyEnvironmentError | None:
    """A clear error for the OS faults a user can fix (None for others)."""
    fix = _ENV_FIXES.get(exc.errno or 0)
    if fix is None:
        return None
    where = exc.filename or what
    return StudyEnvironmentError(f"{what}: {exc.strerror} ({where}); {fix}")


def storage_lost(paths: StudyPaths, exc: BaseException) -> StudyEnvironmentError | None:
    """A study on object storage whose bucket stopped answering mid-study: one clear error
    (exit 1: the study did not finish) instead of the traceback of whichever write failed first.
    Asks the storage itself, as :func:`disk_full` asks the disk."""
    if not paths.is_uri:
        return None
    from granet.study.storage import storage_problem

    problem = storage_problem(paths.root, limit=15.0)
    if problem is None:
        return None
    log.debug("the storage failure surfaced as %s: %s", type(exc).__name__, exc)
    return StudyEnvironmentError(
        f"the study's storage {paths.root} stopped working while the study ran ({problem}); "
        "check the endpoint, the credentials and the network, then run the same command "
        "again: trials that finished are kept there and the study continues from them",
        exit_code=1)
