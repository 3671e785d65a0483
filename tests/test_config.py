"""Config: YAML round trip, a hash stable across processes, YAML-typed dotted overrides."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from granet.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_hash,
    config_to_dict,
    dump_yaml,
    load_config,
    parse_override,
    read_yaml_mapping,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "mnist1d_granet.yaml"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def _sha(obj: dict) -> str:
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:12]


# ------------------------------------------------------------------ YAML round trip


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_round_trip(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)
    text = dump_yaml(cfg)
    again = config_from_dict(yaml.safe_load(text))
    assert again == cfg
    assert dump_yaml(again) == text
    # Through a file and the validating loader as well.
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml") == cfg
    assert config_hash(load_config(tmp_path / "c.yaml")) == config_hash(cfg)


def test_round_trip_of_every_field_type(tmp_path: Path) -> None:
    overrides = [
        "data.num_samples=1234",
        "data.augment=false",
        "model.name=mlp",
        "model.kwargs={hidden: [64, 32]}",
        "optim.betas=[0.8, 0.99]",
        "optim.milestones=[3, 7]",
        "optim.nesterov=false",
        "optim.momentum=0.5",
        "sparsity.growth=random",
        "sparsity.dense_layers=[first, last]",
        "sparsity.prune_end_epoch=8.5",
        "run.epochs=10",
        "run.keep_epochs=[2, 4]",
    ]
    cfg = load_config(None, overrides)
    (tmp_path / "c.yaml").write_text(dump_yaml(cfg))
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert again.model.kwargs == {"hidden": [64, 32]}
    assert again.optim.betas == [0.8, 0.99]
    assert again.sparsity.dense_layers == ["first", "last"]
    assert again.sparsity.prune_end_epoch == 8.5
    assert again.data.num_samples == 1234
    assert again.data.augment is False
    assert config_to_dict(again) == config_to_dict(cfg)


def test_defaults_without_a_file_and_empty_files_refused(tmp_path: Path) -> None:
    assert load_config(None) == Config()
    for name, text in (("empty.yaml", ""), ("comments.yaml", "# nothing yet\n\n  # at all\n"),
                       ("null.yaml", "~\n")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert str(info.value) == (
            f"config file '{path}': is empty (or holds only comments); to train the defaults, "
            f"omit the config file"
        )
        # The shared reader: empty is {} unless the caller refuses it (studies reuse the rule).
        assert read_yaml_mapping(path) == {}
        with pytest.raises(ConfigError, match="is empty"):
            read_yaml_mapping(path, allow_empty=False)
    assert read_yaml_mapping(None, allow_empty=False) == {}


# ------------------------------------------------------------------ hash


def test_hash_of_defaults_is_hash_of_empty_mapping() -> None:
    assert config_hash(Config()) == _sha({}) == "44136fa355b3"


def test_hash_is_sha256_of_non_default_values() -> None:
    cfg = load_config(None, ["sparsity.final_density=0.05", "run.seed=3"])
    assert config_hash(cfg) == _sha({"sparsity": {"final_density": 0.05}, "run": {"seed": 3}})
    assert len(config_hash(cfg)) == 12
    assert len(config_hash(cfg, length=64)) == 64


def test_hash_same_in_a_fresh_process() -> None:
    cfg = load_config(EXAMPLE, ["sparsity.final_density=0.05"])
    code = (
        "from granet.config import load_config, config_hash; "
        f"print(config_hash(load_config({str(EXAMPLE)!r}, ['sparsity.final_density=0.05'])))"
    )
    # A different PYTHONHASHSEED: nothing may depend on dict/set iteration order of str hashes.
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
        check=True, timeout=120,
    )
    assert out.stdout.strip() == config_hash(cfg)


def test_hash_equal_when_defaults_are_spelled_out(tmp_path: Path) -> None:
    short = load_config(EXAMPLE)
    # Every field written out, defaults included, and ints where the field is a float.
    full = config_to_dict(short)
    full["sparsity"]["prune_start_epoch"] = 0
    full["sparsity"]["prune_end_epoch"] = int(full["sparsity"]["prune_end_epoch"])
    full["sparsity"]["init_density"] = 1
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(full))
    spelled = load_config(tmp_path / "full.yaml")
    assert spelled == short
    assert config_hash(spelled) == config_hash(short)
    # Setting a field to its default value is no change either.
    same = load_config(EXAMPLE, ["optim.momentum=0.9", "sparsity.regen_min=0.005"])
    assert config_hash(same) == config_hash(short)
    assert config_hash(load_config(None, ["optim.lr=0.1"])) == config_hash(Config())


def test_hash_differs_when_a_value_differs() -> None:
    base = load_config(EXAMPLE)
    changed = [
        "sparsity.final_density=0.05",
        "optim.lr=0.051",
        "run.seed=1",
        "sparsity.method=gmp",
        "optim.milestones=[20, 29]",
        "model.kwargs={width: 2.0}",
        "sparsity.growth=random",
    ]
    hashes = {config_hash(load_config(EXAMPLE, [c])) for c in changed}
    assert len(hashes) == len(changed)
    assert config_hash(base) not in hashes


@pytest.mark.parametrize(
    "override",
    [
        "optim.nesterov=false",
        "optim.weight_decay=0",
        "optim.milestones=[]",
        "run.dead_unit_eval=false",
        "data.augment=false",
        "sparsity.regen_min=0",
        "sparsity.min_layer_density=0.0",
        "optim.momentum=0",
        "sparsity.compat_floored_schedule=false",
    ],
)
def test_hash_sees_a_falsy_non_default_value(override: str) -> None:
    # Falsy values (false, 0, []) that differ from the default are part of the run: a hash
    # that skipped them would put two different runs into one directory.
    base = Config()
    cfg = load_config(None, [override, "optim.nesterov=false"]
                      if override == "optim.momentum=0" else [override])
    key, raw = override.split("=", 1)
    group, name = key.split(".")
    value = getattr(getattr(cfg, group), name)
    assert not value
    if value == getattr(getattr(base, group), name):  # a falsy default: no change, same hash
        assert config_hash(cfg) == config_hash(base)
        return
    assert config_hash(cfg) != config_hash(base)
    expected = {group: {name: value}}
    if override == "optim.momentum=0":
        expected["optim"]["nesterov"] = False
    assert config_hash(cfg) == _sha(expected)


def test_hash_ignores_locations() -> None:
    a = load_config(EXAMPLE, ["run.output_dir=/tmp/a", "data.data_dir=/data/x"])
    b = load_config(EXAMPLE, ["run.output_dir=elsewhere"])
    assert config_hash(a) == config_hash(b) == config_hash(load_config(EXAMPLE))


# ------------------------------------------------------------------ overrides


def test_overrides_are_yaml_typed() -> None:
    cfg = load_config(
        EXAMPLE,
        [
            "sparsity.final_density=0.05",
            "optim.milestones=[5, 8]",
            "run.epochs=10",
            "sparsity.prune_end_epoch=4",
            "optim.nesterov=false",
            "data.augment=no",
            "run.keep_epochs=[]",
            "sparsity.growth=null",
            "model.kwargs={width: 0.5}",
            "optim.weight_decay=1e-4",
            "optim.lr=2.5e-2",
            "sparsity.dense_layers=[features.0]",
        ],
    )
    assert cfg.sparsity.final_density == 0.05 and isinstance(cfg.sparsity.final_density, float)
    assert cfg.optim.milestones == [5, 8] and all(type(m) is int for m in cfg.optim.milestones)
    assert cfg.run.epochs == 10 and type(cfg.run.epochs) is int
    assert cfg.sparsity.prune_end_epoch == 4.0 and type(cfg.sparsity.prune_end_epoch) is float
    assert cfg.optim.nesterov is False
    assert cfg.data.augment is False
    assert cfg.run.keep_epochs == []
    assert cfg.sparsity.growth is None
    assert cfg.model.kwargs == {"width": 0.5}
    # YAML 1.1 reads "1e-4" as a string; a float field still takes it.
    assert cfg.optim.weight_decay == 1e-4
    assert cfg.optim.lr == 0.025
    assert cfg.sparsity.dense_layers == ["features.0"]
    # Untouched values come from the file.
    assert cfg.optim.momentum == 0.9 and cfg.sparsity.update_interval == 50


def test_later_override_wins_and_input_is_not_mutated() -> None:
    data = {"optim": {"lr": 0.3}}
    out = apply_overrides(data, ["optim.lr=0.2", "optim.lr=0.01", "run.seed=7"])
    assert out == {"optim": {"lr": 0.01}, "run": {"seed": 7}}
    assert data == {"optim": {"lr": 0.3}}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a.b=1", ("a.b", 1)),
        ("a.b=1.5", ("a.b", 1.5)),
        ("a.b=true", ("a.b", True)),
        ("a.b=[1, 2]", ("a.b", [1, 2])),
        ("a.b=x=y", ("a.b", "x=y")),
        ("a.b=", ("a.b", "")),
        ("a.b=null", ("a.b", None)),
        (" a.b =3", ("a.b", 3)),
    ],
)
def test_parse_override(text: str, expected: tuple) -> None:
    assert parse_override(text) == expected


def test_int_field_accepts_integral_float_only() -> None:
    assert load_config(None, ["run.epochs=200.0"]).run.epochs == 200
    with pytest.raises(ConfigError, match=r"run\.epochs=200\.5: must be an integer"):
        load_config(None, ["run.epochs=200.5"])
    with pytest.raises(ConfigError, match=r"run\.seed=True: must be an integer"):
        load_config(None, ["run.seed=true"])


def test_config_is_a_plain_dataclass() -> None:
    cfg = load_config(EXAMPLE)
    assert dataclasses.replace(cfg) == cfg
    assert cfg.sparsity.method == "granet" and cfg.sparsity.final_density == 0.1
