"""Where a study directory lives: a local (or NFS) path, or a URI on object storage.

``study_dir`` may be a path or any URI that ``pyarrow.fs.FileSystem.from_uri`` resolves
(``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...``; ``file:///abs/path`` is a local
path). pyarrow.fs is the one file system abstraction of the study layer:

* a local path stays a :class:`pathlib.Path` and every write goes through :mod:`granet.io`
  exactly as before (temporary file + rename);
* a URI becomes a :class:`UriPath`, a small pathlib-like object over a pyarrow file system; an
  object is written in one PUT of bytes prepared in full beforehand (torch checkpoints through a
  buffer, Parquet and figures through a local temporary file), so readers never see half a file.

S3 credentials, region and endpoint come from the standard AWS settings (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` for an
S3-compatible server, instance roles) or from the URI's query (``?endpoint_override=host:port
&scheme=http&region=...``); GCS from ``GOOGLE_APPLICATION_CREDENTIALS`` or the metadata server.
Workers rebuild the file system from the URI string their trial config carries, so they need the
same settings (an instance role or the cluster's ``env_vars``).

What object storage cannot hold (the driver's ``flock``, sqlite stores, the per-node data cache)
lives in a local *state directory* (:func:`state_dir_for`).
"""

from __future__ import annotations

import fnmatch
import io
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from granet.errors import ConfigError

__all__ = ["UriPath", "StoragePath", "is_uri", "study_path", "state_dir_for", "check_writable",
           "atomic_write", "atomic_write_text", "write_bytes", "read_bytes", "save_checkpoint",
           "load_checkpoint", "write_parquet", "read_parquet", "rmtree", "local_copy",
           "tune_storage"]

_FS_CACHE: dict[str, tuple[Any, str]] = {}


def is_uri(location: Any) -> bool:
    """Whether ``location`` names object storage (a ``scheme://`` URI other than ``file://``)."""
    if isinstance(location, UriPath):
        return True
    if not isinstance(location, str) or "://" not in location:
        return False
    scheme = location.split("://", 1)[0].lower()
    return scheme not in ("file", "local") and len(scheme) > 1


def _split_query(uri: str) -> tuple[str, str]:
    """(URI without its query, ``?query`` or "")."""
    base, sep, query = uri.partition("?")
    return base.rstrip("/"), (sep + query) if sep else ""


def _filesystem(uri: str) -> tuple[Any, str]:
    """(pyarrow file system, path inside it) of a URI; cached per process (workers build one
    per URI, not per file). Raises ValueError naming the URI and the fix."""
    base, query = _split_query(uri)
    hit = _FS_CACHE.get(base + query)
    if hit is not None:
        return hit
    parts = urlsplit(base)
    if not parts.netloc:
        raise ConfigError(f"study_dir={uri!r}: must name a bucket ({parts.scheme}://BUCKET/prefix)")
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - ArrowInvalid, ArrowNotImplementedError, OSError
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"study_dir={uri!r}: not a usable storage URI ({msg}); use a local or NFS path, "
            "s3://BUCKET/prefix, gs://BUCKET/prefix or another URI pyarrow.fs resolves"
        ) from None
    _FS_CACHE[base + query] = (fs, path.rstrip("/"))
    return fs, path.rstrip("/")


class UriPath:
    """A file or directory on a pyarrow file system, with the few pathlib methods the study
    layer uses. ``str()`` is the full URI (query included: a worker rebuilds the file system
    from it)."""

    __slots__ = ("fs", "path", "_prefix", "_query")

    def __init__(self, uri: str, *, _fs: Any = None, _path: str | None = None,
                 _prefix: str | None = None, _query: str = "") -> None:
        if _fs is not None:
            self.fs, self.path, self._prefix, self._query = _fs, _path or "", _prefix, _query
            return
        base, query = _split_query(uri)
        fs, path = _filesystem(uri)
        scheme, rest = base.split("://", 1)
        # credentials in the URI (s3://KEY:SECRET@bucket/...) stay in it: workers rebuild the
        # file system from str(path)
        user = rest.split("/", 1)[0].rpartition("@")[0]
        prefix = f"{scheme}://{user}@" if user else f"{scheme}://"
        self.fs, self.path, self._prefix, self._query = fs, path, prefix, query

    # ------------------------------------------------------------------ names
    def _child(self, path: str) -> UriPath:
        return UriPath("", _fs=self.fs, _path=path, _prefix=self._prefix, _query=self._query)

    def __truediv__(self, name: str | os.PathLike) -> UriPath:
        return self._child(posixpath.join(self.path, str(name)).rstrip("/"))

    @property
    def uri(self) -> str:
        return f"{self._prefix}{self.path}{self._query}"

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"UriPath({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UriPath) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __lt__(self, other: UriPath) -> bool:
        return self.path < other.path

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def stem(self) -> str:
        n = self.name
        return n.rsplit(".", 1)[0] if "." in n.lstrip(".") else n

    @property
    def suffix(self) -> str:
        n = self.name
        return "." + n.rsplit(".", 1)[1] if "." in n.lstrip(".") else ""

    @property
    def parent(self) -> UriPath:
        return self._child(posixpath.dirname(self.path))

    def with_name(self, name: str) -> UriPath:
        return self.parent / name

    def resolve(self) -> UriPath:
        return self

    def expanduser(self) -> UriPath:
        return self

    # ------------------------------------------------------------------ queries
    def _info(self) -> Any:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._info().type == pafs.FileType.Directory

    def _list(self, recursive: bool) -> list[Any]:
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive)
        return self.fs.get_file_info(sel)

    def iterdir(self) -> Iterator[UriPath]:
        for info in self._list(False):
            yield self._child(info.path.rstrip("/"))

    def glob(self, pattern: str) -> Iterator[UriPath]:
        """Children whose name matches ``pattern`` (one level, as the study layer uses it)."""
        for p in sorted(self.iterdir(), key=lambda p: p.path):
            if fnmatch.fnmatchcase(p.name, pattern):
                yield p

    def rglob(self, pattern: str) -> Iterator[UriPath]:
        """Files at any depth whose name matches ``pattern``."""
        import pyarrow.fs as pafs

        for info in sorted(self._list(True), key=lambda i: i.path):
            if info.type == pafs.FileType.File and fnmatch.fnmatchcase(info.base_name, pattern):
                yield self._child(info.path)

    def stat_size(self) -> int:
        return int(self._info().size or 0)

    # ------------------------------------------------------------------ I/O
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """One PUT of the whole object (an object store replaces an object atomically)."""
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError:
            if not missing_ok or self.exists():
                raise


StoragePath = Path | UriPath


def study_path(location: str | os.PathLike | UriPath) -> StoragePath:
    """A study directory (or a file in it) as a :class:`Path` or a :class:`UriPath`."""
    if isinstance(location, UriPath):
        return location
    s = os.fspath(location) if not isinstance(location, str) else location
    if is_uri(s):
        return UriPath(s)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return Path(s)


def state_dir_for(root: StoragePath) -> Path:
    """The local directory of what cannot live on object storage (lock, sqlite stores, data
    cache): the study directory itself when it is local, else
    ``$GRANET_STATE_DIR/<scheme>/<bucket>/<prefix>`` (default ``~/.cache/granet/studies``)."""
    if not isinstance(root, UriPath):
        return Path(root)
    base = os.environ.get("GRANET_STATE_DIR") or os.path.join("~", ".cache", "granet", "studies")
    scheme = root._prefix.split(":", 1)[0] if root._prefix else "uri"
    return (Path(base).expanduser() / scheme / root.path.lstrip("/")).resolve()


_STORAGE_FIX = ("check that the bucket exists, the credentials (AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role; "
                "GOOGLE_APPLICATION_CREDENTIALS for gs://) and the endpoint (AWS_ENDPOINT_URL "
                "or ?endpoint_override=host:port&scheme=http)")


def storage_problem(root: UriPath, limit: float | None = None) -> str | None:
    """Write, read back and delete a probe object under ``root``; None when that works, else
    what went wrong (one line). Gives up after ``limit`` seconds (default
    ``GRANET_STORAGE_TIMEOUT_S``, 30): an SDK looking for credentials (gs:// off GCP asks a
    metadata server) or talking to a silent endpoint retries for minutes, so the probe runs in
    a daemon thread the caller stops waiting for."""
    import secrets
    import threading

    probe = root / f".granet-write-test-{secrets.token_hex(4)}"
    got: dict[str, Any] = {}

    def attempt() -> None:
        try:
            probe.write_bytes(b"granet")
            got["ok"] = probe.read_bytes() == b"granet"
            probe.unlink(missing_ok=True)
        except Exception as exc:  # noqa: BLE001 - OSError from the AWS/GCS SDKs
            got["error"] = " ".join(str(exc).split())[:300] or type(exc).__name__

    if limit is None:
        limit = float(os.environ.get("GRANET_STORAGE_TIMEOUT_S", "30"))
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        return f"no answer within {limit:g} s (GRANET_STORAGE_TIMEOUT_S)"
    if "error" in got:
        return got["error"]
    return None if got.get("ok") else "an object written there did not read back"


def check_writable(root: UriPath) -> None:
    """:func:`storage_problem` as a ConfigError naming the URI and the fix."""
    problem = storage_problem(root)
    if problem is not None:
        raise ConfigError(f"study_dir={root.uri!r}: cannot write there ({problem}); "
                          + _STORAGE_FIX)


# ---------------------------------------------------------------------------------- writers


def atomic_write(path: StoragePath, write: Callable[[str], Any]) -> None:
    """``write(tmp_path)`` then publish it at ``path`` whole: a local path through
    :func:`granet.io.atomic_write` (temporary file + rename), a URI as one upload of the file."""
    if not isinstance(path, UriPath):
        from granet.io import atomic_write as local_atomic_write

        local_atomic_write(Path(path), write)
        return
    with tempfile.TemporaryDirectory(prefix="granet-up-") as tmp:
        local = os.path.join(tmp, path.name or "object")
        write(local)
        with open(local, "rb") as f:
            path.write_bytes(f.read())


def write_bytes(path: StoragePath, data: bytes) -> None:
    if isinstance(path, UriPath):
        path.write_bytes(data)
    else:
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def read_bytes(path: StoragePath) -> bytes:
    return path.read_bytes()


def atomic_write_text(path: StoragePath, text: str) -> None:
    if isinstance(path, UriPath):
        path.write_text(text)
    else:
        from granet.io import atomic_write_text as local_write

        local_write(path, text)


def save_checkpoint(state: dict[str, Any], path: StoragePath) -> None:
    """``torch.save`` atomically, locally or as one object."""
    if not isinstance(path, UriPath):
        from granet.io import save_checkpoint as local_save

        local_save(state, path)
        return
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    path.write_bytes(buf.getvalue())


def load_checkpoint(path: StoragePath | str, map_location: Any = "cpu", *,
                    keys: Any = ()) -> dict[str, Any]:
    """:func:`granet.io.load_checkpoint` for a local path or a URI (same errors)."""
    from granet.io import CheckpointError, read_checkpoint_from
    from granet.io import load_checkpoint as local_load

    p = study_path(path) if isinstance(path, str) else path
    if not isinstance(p, UriPath):
        return local_load(p, map_location, keys=keys)

    try:
        if not p.exists():
            raise CheckpointError(p, "does not exist", "check the path, or train the run first")
        data = p.read_bytes()
    except OSError as exc:
        raise CheckpointError(p, f"cannot be read ({' '.join(str(exc).split())[:160]})",
                              "check the storage and its credentials") from exc
    if not data:
        raise CheckpointError(p, "is empty (0 bytes)")
    return read_checkpoint_from(io.BytesIO(data), p, map_location, keys=keys)


def write_parquet(rows: Any, path: StoragePath, schema: Any = None) -> None:
    """:func:`granet.io.write_parquet` for a local path or a URI."""
    if not isinstance(path, UriPath):
        from granet.io import write_parquet as local_write

        local_write(rows, path, schema)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows),
                                                                          schema=schema)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    path.write_bytes(buf.getvalue().to_pybytes())


def rmtree(path: StoragePath) -> None:
    """Delete a directory tree (missing: nothing to do)."""
    if isinstance(path, UriPath):
        if path.is_dir():
            path.fs.delete_dir(path.path)
        return
    import shutil

    if path.is_dir():
        shutil.rmtree(path)


class local_copy:
    """Context manager: local paths of ``paths`` (files on a URI are downloaded into a
    temporary directory; local ones are given as they are; missing ones are left out)."""

    def __init__(self, paths: list[Any]) -> None:
        self.paths = [study_path(p) if isinstance(p, str) else p for p in paths]
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> list[Path]:
        out: list[Path] = []
        for p in self.paths:
            if not isinstance(p, UriPath):
                if Path(p).exists():
                    out.append(Path(p))
                continue
            if not p.is_file():
                continue
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="granet-dl-")
            d = Path(self._tmp.name) / str(len(out))
            d.mkdir()
            local = d / p.name
            local.write_bytes(p.read_bytes())
            out.append(local)
        return out

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def tune_storage(path: StoragePath) -> tuple[str, Any]:
    """(``storage_path``, ``storage_filesystem``) for Ray Tune: a local path and None, or the
    path inside the bucket and its pyarrow file system."""
    if isinstance(path, UriPath):
        return path.path, path.fs
    return str(path), None


def read_parquet(path: StoragePath, **kwargs: Any) -> Any:
    """``pyarrow.parquet.read_table`` of a local path or a URI."""
    import pyarrow.parquet as pq

    if isinstance(path, UriPath):
        return pq.read_table(path.path, filesystem=path.fs, **kwargs)
    return pq.read_table(path, **kwargs)
