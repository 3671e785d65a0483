"""Resources on a running Ray cluster (the session's real local Ray: 2 CPUs, no GPU): fits now,
fits a node type the autoscaler can start (asked for it, trials wait), or can never fit."""

from __future__ import annotations

import pytest
import yaml

from granet.config import ConfigError
from granet.study.base import StudyConfig
from granet.study.tune.tuner import autoscaler_node_types, check_cluster_resources


def _bootstrap(tmp_path, gpus: float) -> str:
    p = tmp_path / "ray_bootstrap_config.yaml"
    p.write_text(yaml.safe_dump({"available_node_types": {
        "head": {"resources": {"CPU": 0}},
        "gpu_worker": {"resources": {"CPU": 8, "GPU": gpus}, "max_workers": 4},
    }}))
    return str(p)


def test_fits_now_asks_nothing(ray_session, tmp_path):
    said: list[str] = []
    check_cluster_resources(StudyConfig(cpus_per_trial=1), say=said.append,
                            bootstrap=tmp_path / "absent.yaml")
    assert said == []


def test_autoscaling_cluster_gets_a_resource_request(ray_session, tmp_path):
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    said: list[str] = []
    study = StudyConfig(cpus_per_trial=2, gpus_per_trial=0.25, max_concurrent=3)
    check_cluster_resources(study, say=said.append, bootstrap=_bootstrap(tmp_path, 1))
    assert said == ["[cluster] no node holds {CPU: 2, GPU: 0.25} yet: asked the autoscaler for "
                    "3; trials wait until it brings them (ray status shows the pending nodes)"]
    import json

    from ray.autoscaler.v2.utils import is_autoscaler_v2

    assert not is_autoscaler_v2()  # a local Ray: the request goes to the v1 channel in the KV
    request = json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL))
    assert request == [{"CPU": 2.0, "GPU": 0.25}] * 3
    assert autoscaler_node_types(_bootstrap(tmp_path, 1))["gpu_worker"]["GPU"] == 1.0


def test_never_fits_is_refused(ray_session, tmp_path):
    with pytest.raises(ConfigError) as exc:
        check_cluster_resources(StudyConfig(gpus_per_trial=2),
                                bootstrap=_bootstrap(tmp_path, 1))
    assert "no node type of this cluster can hold {CPU: 1, GPU: 2}" in str(exc.value)
    assert "gpu_worker: {CPU: 8, GPU: 1}" in str(exc.value)
    with pytest.raises(ConfigError, match=r"gpus_per_trial=1: no node of the Ray cluster has "
                                          r"\{CPU: 1, GPU: 1\}.*no autoscaler"):
        check_cluster_resources(StudyConfig(gpus_per_trial=1),
                                bootstrap=tmp_path / "absent.yaml")
