"""ray_cluster.yaml: valid for Ray's own schema, placeholders marked and explained, token auth on
every node, dashboard on 127.0.0.1, MLflow on the head's private IP, and the same commands as the
README."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex

import pytest
import yaml

from tests.cluster.localcluster import (
    CLUSTER_YAML,
    IMAGE_CHECKOUT,
    PRIVATE_IP_EXPR,
    REPO,
    flag_dict,
    parse_start_commands,
    readme_commands,
    yaml_header_commands,
)


def _cfg() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _schema() -> dict:
    import ray.autoscaler

    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        return json.load(f)


def test_valid_for_rays_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _cfg()
    jsonschema.validate(cfg, _schema())
    # what `ray up` does before it talks to the cloud: fill Ray's AWS defaults, validate again
    full = prepare_config(copy.deepcopy(cfg))
    validate_config(full)
    assert full["available_node_types"]["head"]["max_workers"] == 0
    # the schema does catch a misspelt key (the check is not vacuous)
    bad = copy.deepcopy(cfg)
    bad["docker"]["run_option"] = bad["docker"].pop("run_options")
    with pytest.raises(jsonschema.ValidationError, match="run_option"):
        jsonschema.validate(bad, _schema())


def test_every_placeholder_is_marked_and_explained():
    text = CLUSTER_YAML.read_text()
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### On a cluster"):]
    # the first cells of the README's placeholder table
    cells = re.findall(r"^\| (`[^|]+) \|", section, re.M)
    assert cells, "README: no placeholder table in 'On a cluster'"
    lines = text.splitlines()
    body = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    keys = []
    for i, ln in enumerate(lines):
        if i < body or "# FILL:" not in ln:  # the header only tells about the marks
            continue
        if ln.lstrip().startswith("# FILL:"):  # about the command above: its placeholder value
            above = "\n".join(lines[i - 8: i])
            keys.append(re.search(r"[\w.-]*0123456789abcdef0[\w.-]*", above).group(0))
        else:
            keys.append(ln.split(":", 1)[0].strip())
    assert sorted(set(keys)) == ["ImageId", "fs-0123456789abcdef0.efs.us-west-2.amazonaws.com",
                                 "image", "region"]
    for key in keys:
        assert any(key in cell for cell in cells), f"README's table does not explain {key}"
    # every placeholder value sits on a FILL line or right above a FILL comment
    for pattern in (r"123456789012", r"0123456789abcdef0"):
        for i, ln in enumerate(lines):
            if re.search(pattern, ln) and not ln.lstrip().startswith("#"):
                assert any("# FILL:" in n for n in lines[i: i + 3]), f"unmarked: {ln!r}"


def test_token_auth_on_every_node_and_client():
    cfg = _cfg()
    # the token made on your machine goes to every node
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for node in ("head", "worker"):
        cmd = parse_start_commands(node, cfg)
        assert cmd.env.get("RAY_AUTH_MODE") == "token", node
        assert cmd.ray_start()  # exactly one `ray start`, after the exports
    # the image sets it for every process too, and the README's client exports it
    assert "ENV RAY_AUTH_MODE=token" in (REPO / "Dockerfile").read_text()
    assert "export RAY_AUTH_MODE=token" in readme_commands()
    assert readme_commands()[0] == "ray get-auth-token --generate"


def test_dashboard_local_and_mlflow_on_the_private_ip():
    cfg = _cfg()
    head = parse_start_commands("head", cfg)
    worker = parse_start_commands("worker", cfg)
    flags = flag_dict(head.ray_start()[2:])
    assert flags["--dashboard-host"] == "127.0.0.1"
    assert flags["--port"] == "6379" and flags["--dashboard-port"] == "8265"
    assert flag_dict(worker.ray_start()[2:])["--address"] == "$RAY_HEAD_IP:6379"

    # MLflow starts (idempotently) before Ray, bound to the head's private IP, its store and
    # artifacts on the shared storage
    steps = [s[0] for s in head.steps]
    script = f"{IMAGE_CHECKOUT}/scripts/start_mlflow_server.sh"
    assert steps == [script, "ray"]
    assert (REPO / "scripts" / "start_mlflow_server.sh").stat().st_mode & 0o111
    _, host, port, store, artifacts = head.steps[0]
    assert head.env["HEAD_IP"] == PRIVATE_IP_EXPR and host == "$HEAD_IP" and port == "5000"
    assert store == "sqlite:////mnt/shared/mlflow/mlflow.db"
    assert artifacts == "/mnt/shared/mlflow/artifacts"
    # every node (so every job driver and trial) logs to that server
    assert head.env["MLFLOW_TRACKING_URI"] == "http://$HEAD_IP:5000"
    assert worker.env["MLFLOW_TRACKING_URI"] == "http://$RAY_HEAD_IP:5000"
    # the image holds the script where the yaml calls it
    docker = (REPO / "Dockerfile").read_text()
    assert f"WORKDIR {IMAGE_CHECKOUT}" in docker and "COPY --chown=ray:users scripts" in docker
    # the shared storage reaches the containers at the path the commands use
    assert "-v /mnt/shared:/mnt/shared" in cfg["docker"]["run_options"]
    assert any("/mnt/shared" in c for c in cfg["initialization_commands"])


def test_header_commands_are_the_readmes():
    assert yaml_header_commands() == readme_commands()
    (job,) = [c for c in readme_commands() if c.startswith("ray job submit")]
    argv = shlex.split(job)
    sep = argv.index("--")
    flags = flag_dict(argv[3:sep])
    assert flags["--address"] == "http://127.0.0.1:8265"  # through `ray dashboard`'s forward
    assert flags["--working-dir"] == "."
    assert json.loads(flags["--runtime-env-json"]) == {"py_modules": ["src/mypkg"]}
    entry = argv[sep + 1:]
    assert entry[:3] == ["granet", "study", "plasticity"]
    assert "study_dir=/mnt/shared/studies/my_study" in entry  # on the shared storage
