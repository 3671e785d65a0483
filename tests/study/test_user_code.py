"""User code in studies: validated once in the driver before Ray starts, and imported by the
Ray workers of a real search (a user model and a user data set from this repository)."""

from __future__ import annotations

import pytest

from .helpers import run_script, summary_of

MODEL = "tests.fixtures.user_model:tiny_net"
DATA = "tests.fixtures.user_data:signals"


def test_search_smoke_with_a_user_model_and_data_set(ray_session, tmp_path):
    sd = tmp_path / "study"
    proc, _ = run_script(["-m", "granet", "study", "search", "--smoke-test", "--quiet",
                          "--set", f"study_dir={sd}", "--set", f"train.model.name={MODEL}",
                          "--set", f"train.data.name={DATA}", "--set", "num_samples=2"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    s = summary_of(sd)
    assert s["statuses"] == {"done": 2} and s["failed"] == {"search": 0}
    import json

    from granet.study import results

    for row in results.read_table(sd, "trials").to_pylist():
        cfg = json.loads(row["config_json"])
        # the smoke preset's MLP kwargs were not carried over to the user's model
        assert cfg["model"] == {"name": MODEL, "kwargs": {}}
        assert cfg["data"]["name"] == DATA


@pytest.mark.parametrize(
    "extra, needle",
    [
        ([f"train.model.name={MODEL}", "train.model.kwargs={width: 3}"], "model."),
        (["train.model.name=tests.fixtures.user_model:not_a_module"], "model.name"),
        (["train.model.name=tests.fixtures.nosuchmodule:net"], "model.name"),
        (["train.data.name=tests.fixtures.user_data:nosuchdata"], "data.name"),
    ],
)
def test_user_code_errors_stop_the_study_before_ray(tmp_path, extra, needle):
    sd = tmp_path / "study"
    args = ["-m", "granet", "study", "compare", "--smoke-test"]
    for e in [f"study_dir={sd}", *extra]:
        args += ["--set", e]
    proc, seconds = run_script(args, join_ray=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("granet: error: ") and needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not sd.exists()
