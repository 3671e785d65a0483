"""granet.io: atomic writes that survive a killed writer, file modes that follow the umask, and
checkpoints that fail with a named file and a fix instead of an unpickling traceback."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from granet.io import (
    CheckpointError,
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
    write_parquet,
)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ file modes


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"),
                         [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775), (0o077, 0o600, 0o700)],
                         ids=["umask022", "umask002", "umask077"])
def test_written_files_follow_the_umask(umask, tmp_path, mask, file_mode, dir_mode) -> None:
    umask(mask)
    run = tmp_path / "runs" / "a-run"
    atomic_write_text(run / "summary.json", "{}")
    save_checkpoint({"w": torch.ones(2)}, run / "checkpoint.pt")
    write_parquet([{"epoch": 1, "acc": 0.5}], run / "metrics.parquet")
    for name in ("summary.json", "checkpoint.pt", "metrics.parquet"):
        assert _mode(run / name) == file_mode, name
    assert _mode(run) == dir_mode and _mode(tmp_path / "runs") == dir_mode
    # Overwriting keeps following the umask (a new temporary file each time).
    umask(0o022)
    save_checkpoint({"w": torch.zeros(2)}, run / "checkpoint.pt")
    assert _mode(run / "checkpoint.pt") == 0o644
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "metrics.parquet",
                                                     "summary.json"]  # no temporary left


# ------------------------------------------------------------------ a writer killed mid-write

# The child writes a Parquet table and a checkpoint through granet.io, each in its own thread,
# with the real serialisers slowed down: each writes the first half of its bytes to the file it
# was given, then waits. When both are half-written the child says so and is SIGKILLed.
CHILD = textwrap.dedent('''
    import io, sys, threading, time
    import pyarrow as pa, pyarrow.parquet as pq, torch
    import granet.io as gio

    parquet_path, ckpt_path = sys.argv[1], sys.argv[2]
    real_write_table, real_save = pq.write_table, torch.save
    halfway = threading.Barrier(3)

    def half_then_hang(serialise, target):
        buf = io.BytesIO()
        serialise(buf)
        data = buf.getvalue()
        with open(target, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
        halfway.wait()
        time.sleep(600)

    pq.write_table = lambda table, where, **kw: half_then_hang(
        lambda b: real_write_table(table, b, **kw), where)
    torch.save = lambda obj, where, **kw: half_then_hang(lambda b: real_save(obj, b, **kw), where)

    rows = [{"epoch": i, "acc": float(i) / 7, "note": "new" * 50} for i in range(20000)]
    threading.Thread(target=gio.write_parquet, args=(rows, parquet_path), daemon=True).start()
    state = {"w": torch.arange(200000, dtype=torch.float32), "epoch": 9}
    threading.Thread(target=gio.save_checkpoint, args=(state, ckpt_path), daemon=True).start()
    halfway.wait()
    print("HALFWAY", flush=True)
    time.sleep(600)
''')


def test_a_writer_killed_mid_write_leaves_the_previous_files_intact(tmp_path) -> None:
    run = tmp_path / "run"
    old_rows = [{"epoch": i, "acc": 0.1 * i, "note": "old"} for i in range(5)]
    write_parquet(old_rows, run / "metrics.parquet")
    save_checkpoint({"w": torch.ones(3), "epoch": 4}, run / "checkpoint.pt")
    before = {n: (run / n).read_bytes() for n in ("metrics.parquet", "checkpoint.pt")}
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(run / "metrics.parquet"), str(run / "checkpoint.pt")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = proc.stdout.readline()  # blocks until both writes are half done
        assert line.strip() == "HALFWAY", proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # The previous files: byte for byte, and readable.
    for name, data in before.items():
        assert (run / name).read_bytes() == data, name
    assert pq.read_table(run / "metrics.parquet").to_pylist() == old_rows
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 4
    # The half-written bytes went to temporary files beside them (what the kill interrupted).
    temps = sorted(p.name.split("-")[1] for p in run.iterdir() if p.name.startswith(".tmp-"))
    assert temps == ["checkpoint.pt", "metrics.parquet"]
    for p in run.glob(".tmp-*"):
        assert p.stat().st_size > 1000
        with pytest.raises(Exception):  # noqa: B017 - any reader error: the file is half
            if "parquet" in p.name:
                pq.read_table(p)
            else:
                torch.load(p, weights_only=True)


# ------------------------------------------------------------------ unreadable checkpoints


def _good_bytes(tmp_path: Path) -> bytes:
    save_checkpoint({"model": {"w": torch.arange(5000.0)}, "engine": {}}, tmp_path / "good.pt")
    return (tmp_path / "good.pt").read_bytes()


CORRUPTIONS = {
    "truncated": lambda b: b[: len(b) // 2],
    "truncated_tail": lambda b: b[:-40],
    "empty": lambda b: b"",
    "text": lambda b: b"model: mlp\nepochs: 3\n",
    "garbled_header": lambda b: b[:20] + bytes(range(256)) * 2 + b[532:],
    "zeros": lambda b: bytes(len(b)),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_damaged_checkpoint_names_the_file_and_the_fix(kind, tmp_path) -> None:
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(CORRUPTIONS[kind](_good_bytes(tmp_path)))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert msg.startswith(f"checkpoint '{path}': ")
    assert info.value.path == str(path)
    if kind == "empty":
        assert info.value.reason == "is empty (0 bytes)"
    else:
        assert "cannot be read: truncated, corrupt or not a torch checkpoint (" in msg
    assert msg.endswith("delete it and re-run to retrain (granet train: --fresh)")
    assert "\n" not in msg


def test_missing_directory_and_foreign_checkpoints(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="does not exist; check the path"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "adir.pt").mkdir()
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        load_checkpoint(tmp_path / "adir.pt")
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor, not a granet checkpoint"):
        load_checkpoint(tmp_path / "tensor.pt")
    torch.save({"model": {}}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"is not a granet checkpoint \(no 'engine'\)"):
        load_checkpoint(tmp_path / "partial.pt", keys=("model", "engine"))
    assert load_checkpoint(tmp_path / "partial.pt", keys=("model",)) == {"model": {}}
