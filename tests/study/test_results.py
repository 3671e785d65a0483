"""Parquet tables: explicit schemas, atomic one-file-per-trial writes, read back."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq

from granet.study import results


def test_write_read_roundtrip_with_schema(tmp_path):
    rows = [{"key": "k1", "study": "s", "stage": "trunk", "epoch": e, "step": 10 * e,
             "lr": 0.1, "test_acc": 0.5 + e / 10, "unknown_metric": 3.0} for e in (1, 2)]
    path = results.write_rows(tmp_path, "epochs", "trunk", "k1", rows)
    assert path == tmp_path / "results/epochs/stage=trunk/trial-k1.parquet"
    assert pq.read_schema(path).equals(results.SCHEMAS["epochs"])
    t = results.read_table(tmp_path, "epochs")
    assert t.schema.equals(results.SCHEMAS["epochs"])
    assert t.column("test_acc").to_pylist() == [0.6, 0.7]
    assert t.column("train_loss").null_count == 2  # absent metric -> null
    assert "unknown_metric" not in t.column_names
    # rewriting a trial's file replaces it; no temporary files are left behind
    results.write_rows(tmp_path, "epochs", "trunk", "k1", rows[:1])
    assert results.read_table(tmp_path, "epochs").num_rows == 1
    assert [p.name for p in path.parent.iterdir()] == ["trial-k1.parquet"]


def test_empty_tables_have_the_schema(tmp_path):
    for name in results.TABLES:
        t = results.read_table(tmp_path, name)
        assert t.num_rows == 0 and t.schema.equals(results.SCHEMAS[name])
    assert results.done_keys(tmp_path) == set()


def test_documented_columns_match_schemas():
    doc = results.__doc__
    for name, schema in results.SCHEMAS.items():
        assert f"``{name}``" in doc
        for field in schema:
            if name == "epochs" and field.name in results.EPOCH_METRICS:
                continue  # documented as the EPOCH_METRICS list
            if name == "trials" and field.name in results.FINAL_METRICS:
                continue
            assert field.name in doc, (name, field.name)


def test_study_tables_read_back_with_schema(tiny_plasticity):
    sd = tiny_plasticity["dir"]
    for name in results.TABLES:
        t = results.read_table(sd, name)
        assert t.schema.equals(results.SCHEMAS[name]), name
        assert t.num_rows > 0, name
    trials = results.read_table(sd, "trials")
    assert set(trials.column("status").to_pylist()) == {"done"}
    assert pa.types.is_timestamp(trials.schema.field("finished_at").type)
    probes = results.read_table(sd, "probes").to_pylist()
    assert {p["kind"] for p in probes} == {"plasticity"}
    assert all(p["final_gap"] is None and not math.isnan(p["plasticity"]) for p in probes)
    # every trial has exactly one epochs row per epoch
    epochs = results.read_table(sd, "epochs").to_pylist()
    for t in trials.to_pylist():
        eps = sorted(e["epoch"] for e in epochs if e["key"] == t["key"])
        assert eps == list(range(1, t["epochs"] + 1))
    layers = results.read_table(sd, "layers").to_pylist()
    assert {r["stage"] for r in layers} == {"trunk", "probe"}


def test_truncated_results_file_is_named_and_its_trial_reruns(tmp_path, caplog):
    """A truncated Parquet file (a crash of the disk, not of our atomic writer) is named in a
    warning, the other rows still read, and its trial no longer counts as finished."""
    for key in ("a", "b"):
        results.write_rows(tmp_path, "trials", "compare", key,
                           [{"key": key, "stage": "compare", "status": "done"}])
        results.write_rows(tmp_path, "epochs", "compare", key,
                           [{"key": key, "stage": "compare", "epoch": 1}])
    assert results.finished_keys(tmp_path) == {"a", "b"}
    bad = results.table_path(tmp_path, "epochs", "compare", "b")
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    table, problems = results.scan_table(tmp_path, "epochs")
    assert table.column("key").to_pylist() == ["a"]
    assert list(problems) == ["b"] and str(bad) in problems["b"]
    with caplog.at_level("WARNING", logger="granet"):
        assert results.read_table(tmp_path, "epochs").num_rows == 1
    assert f"results file {bad}: unreadable" in caplog.text
    assert results.finished_keys(tmp_path) == {"a"}  # b will re-run and rewrite its files
    results.forget_trial(tmp_path, "compare", "b")
    assert not bad.exists() and results.trial_status(tmp_path, "compare", "b") is None
    assert results.trial_status(tmp_path, "compare", "a") == "done"


def test_diverged_trials_count_as_finished_failed_ones_do_not(tmp_path):
    for key, status in (("d", "diverged"), ("f", "failed"), ("s", "stopped"), ("ok", "done")):
        results.write_rows(tmp_path, "trials", "compare", key,
                           [{"key": key, "stage": "compare", "status": status,
                             "message": None if status == "done" else "why"}])
    assert results.finished_keys(tmp_path) == {"d", "ok"}
    assert results.done_keys(tmp_path) == {"ok"}
    assert results.trial_statuses(tmp_path) == {"d": "diverged", "f": "failed",
                                                "s": "stopped", "ok": "done"}
