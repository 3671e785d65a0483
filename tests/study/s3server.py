"""A real S3-compatible server (moto) on 127.0.0.1 for the storage tests: started as its own
process, stopped by PID."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """``python -m moto.server`` on a free port; :meth:`bucket` creates a bucket and returns
    its URI (credentials and endpoint in the URI, so Ray workers started before the test
    reach it too)."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.log = log_dir / "moto.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> S3Server:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < timeout:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"moto server died: {self.log.read_text()[-2000:]}") \
                        from None
                time.sleep(0.2)
        raise RuntimeError("moto server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def query(self) -> str:
        return f"?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"

    def bucket(self, name: str | None = None) -> str:
        import pyarrow.fs as pafs

        name = name or f"granet-{secrets.token_hex(4)}"
        fs = pafs.S3FileSystem(access_key="test", secret_key="test", scheme="http",
                               endpoint_override=self.endpoint, region="us-east-1",
                               allow_bucket_creation=True)
        fs.create_dir(name)
        return f"s3://test:test@{name}"

    def uri(self, bucket: str, prefix: str) -> str:
        return f"{bucket}/{prefix}{self.query()}"
