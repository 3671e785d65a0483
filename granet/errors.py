"""The error a user can fix by changing input (:class:`ConfigError`), and how a granet command
ends: one line for the errors a user can act on, and an exit status."""

from __future__ import annotations

import re
import sys
from typing import Any

__all__ = ["ConfigError", "RedactFilter", "redact", "run_command"]

# the password of a URI's user info: s3://KEY:SECRET@bucket, postgresql://user:pw@host
_SECRET = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s'\"]+):[^@/\s'\"]+@")


def redact(text: Any) -> str:
    """``text`` with the password of every URI in it replaced by ``***`` (what granet prints;
    the URI itself still carries it to the code that needs it)."""
    return _SECRET.sub(r"\1:***@", str(text))


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field, the value and what is
    allowed."""


class RedactFilter:
    """A logging filter: the passwords of URIs in a record's message become ``***``."""

    def filter(self, record: Any) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def _error(msg: Any, code: int) -> int:
    print(f"granet: error: {redact(msg)}", file=sys.stderr, flush=True)
    return code


def run_command(fn: Any) -> int:
    """Run a command; map the errors a user can act on to one line and an exit status:
    2 bad input or an unusable environment (nothing done), 1 failed mid-way, 130 interrupted."""
    import errno

    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        return _error("interrupted", 130)
    except (ValueError, FileNotFoundError) as exc:  # ConfigError, CheckpointError, ...
        return _error(exc, 2)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
            return _error(f"{exc.strerror}: {exc.filename or ''}; free space or choose a "
                          "writable location (what finished is kept)", 1)
        raise
    except RuntimeError as exc:
        kind = type(exc).__name__
        if kind == "StudyInterrupted":
            return _error(exc, 130)
        if kind in ("ServiceError", "StudyLocked", "StudyEnvironmentError"):
            return _error(exc, getattr(exc, "exit_code", 2))
        raise
