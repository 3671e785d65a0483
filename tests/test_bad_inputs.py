"""Bad input through the command line: each case exits 2 with one `granet: error:` line naming
the field (or file), the value and what is allowed or what to do, and writes nothing.

Cases cover config files, --set overrides, model names and kwargs (including builders that are
not model code), data sets and directories, checkpoints and run directories for train and
export. The README's "Bad input" section lists them.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

import granet.data.builtin
from granet.cli import main
from granet.config import config_hash, dump_yaml, load_config

# A tiny valid run: sklearn digits, a one-hidden-layer MLP, 1 epoch (10 steps).
BASE = ["data.name=digits", "model.name=mlp", "model.kwargs={hidden: [16]}", "run.epochs=1",
        "optim.milestones=[1]", "sparsity.update_interval=4", "sparsity.prune_end_epoch=1"]


def _argv(out: Path, sets: list[str], *, quiet: bool = True) -> list[str]:
    argv = ["train"] + (["--quiet"] if quiet else [])
    for s in [*BASE, f"run.output_dir={out}", *sets]:
        argv += ["--set", s]
    return argv


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for directories)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def expect_error(capsys, argv: list[str], needles: list[str], *, watch: Path) -> str:
    """Run the CLI; exit 2, one error line holding every needle, nothing written under
    ``watch`` (compared file by file with before the run)."""
    before = _tree(watch)
    existed = watch.exists()
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert captured.out == ""
    assert captured.err.startswith("granet: error: "), captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    for needle in needles:
        assert needle in captured.err, f"{needle!r} not in {captured.err!r}"
    assert watch.exists() == existed
    assert _tree(watch) == before
    return captured.err


# ------------------------------------------------------------------ config files

CONFIG_FILES: list[tuple[str, bytes, list[str]]] = [
    ("empty", b"", ["is empty (or holds only comments); to train the defaults, omit the "
                    "config file"]),
    ("only_comments", b"# a config, one day\n\n   # nothing here\n", ["is empty"]),
    ("yaml_null", b"~\n", ["is empty"]),
    ("top_level_scalar", b"3\n", ["top level must be a mapping"]),
    ("not_utf8", b"model: {name: \xff\xfe mlp}\n", ["not UTF-8 text", "invalid start byte"]),
    ("int_field_float", b"run: {seed: 1.5}\n", ["run.seed=1.5: must be an integer"]),
    ("kwargs_not_mapping", b"model: {kwargs: [1, 2]}\n",
     ["model.kwargs=[1, 2]: must be a mapping"]),
    ("list_field_scalar", b"sparsity: {dense_layers: first}\n",
     ["sparsity.dense_layers='first': must be a list"]),
    ("nested_unknown", b"run: {epochs: 1, epoch: 2}\n",
     ["run.epoch=2: unknown field; allowed:", "epochs"]),
]


@pytest.mark.parametrize(("text", "needles"), [c[1:] for c in CONFIG_FILES],
                         ids=[c[0] for c in CONFIG_FILES])
def test_bad_config_file(text, needles, tmp_path, capsys) -> None:
    path = tmp_path / "run.yaml"
    path.write_bytes(text)
    out = tmp_path / "runs"
    if not needles[0].startswith(("run.", "model.", "sparsity.")):  # file-level: names it
        needles = [f"config file '{path}': ", *needles]
    expect_error(capsys, ["train", str(path), "--set", f"run.output_dir={out}"], needles,
                 watch=out)
    assert not out.exists()


def test_config_file_that_is_a_directory(tmp_path, capsys) -> None:
    (tmp_path / "cfg.yaml").mkdir()
    out = tmp_path / "runs"
    expect_error(capsys, ["train", str(tmp_path / "cfg.yaml"), "--set", f"run.output_dir={out}"],
                 [f"config file '{tmp_path / 'cfg.yaml'}': is a directory, not a YAML file"],
                 watch=out)


# ------------------------------------------------------------------ --set overrides

SETS: list[tuple[str, list[str], list[str]]] = [
    ("keep_epoch_beyond_run", ["run.keep_epochs=[99]"],
     ["run.keep_epochs=[99]: each must be in [0, 1]"]),
    ("optimizer_name", ["optim.name=adam"], ["optim.name='adam': must be one of sgd, adamw"]),
    ("lr_schedule", ["optim.schedule=step"],
     ["optim.schedule='step': must be one of multistep, cosine, constant"]),
    ("num_samples_negative", ["data.num_samples=-5"], ["data.num_samples=-5: must be > 0"]),
    ("regen_decay", ["sparsity.regen_decay=exp"],
     ["sparsity.regen_decay='exp': must be one of cosine, linear, constant"]),
    ("checkpoint_every_zero", ["run.checkpoint_every=0"],
     ["run.checkpoint_every=0: must be >= 1"]),
    ("warmup_not_below_epochs", ["optim.warmup_epochs=1"],
     ["optim.warmup_epochs=1: must be in [0, run.epochs=1)"]),
    ("prune_scope", ["sparsity.prune_scope=local"],
     ["sparsity.prune_scope='local': must be one of global, layerwise"]),
    ("nesterov_without_momentum", ["optim.momentum=0"],
     ["optim.nesterov=True: needs optim.momentum > 0"]),
    ("momentum_growth_without_momentum",
     ["optim.momentum=0", "optim.nesterov=false", "sparsity.growth=momentum"],
     ["sparsity.growth='momentum': needs optim.momentum > 0"]),
    ("data_dir_empty", ["data.data_dir="], ["data.data_dir='': must be a directory path"]),
    ("label_smoothing_one", ["optim.label_smoothing=1"],
     ["optim.label_smoothing=1.0: must be in [0.0, 1.0)"]),
    ("betas_one_value", ["optim.betas=[0.9]"], ["optim.betas=[0.9]: must be two numbers"]),
    ("val_fraction_leaves_nothing", ["data.num_samples=10", "data.val_fraction=0.95"],
     ["data.val_fraction=0.95: leaves no training samples out of 10"]),
]


@pytest.mark.parametrize(("sets", "needles"), [c[1:] for c in SETS], ids=[c[0] for c in SETS])
def test_bad_override(sets, needles, tmp_path, capsys) -> None:
    out = tmp_path / "runs"
    expect_error(capsys, _argv(out, sets), needles, watch=out)


# ------------------------------------------------------------------ models: code is refused


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """Importable modules written for the test (a fresh directory on sys.path)."""
    root = tmp_path / "user_code"
    root.mkdir()
    (root / "granet_test_builders.py").write_text(textwrap.dedent('''
        import functools
        import subprocess
        from os import system
        from torch import nn

        def tiny(num_classes, input_shape):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

        def explodes(num_classes, input_shape, depth=3):
            raise RuntimeError(f"no kernel for depth {depth}")

        class NotAModel:
            def __init__(self, num_classes):
                self.num_classes = num_classes

        AN_INSTANCE = nn.Linear(64, 10)
        A_PARTIAL = functools.partial(tiny)
        Popen = subprocess.Popen
    '''))
    (root / "granet_test_import_error.py").write_text("import no_such_package_for_granet\n")
    (root / "granet_test_syntax_error.py").write_text("def build(:\n    pass\n")
    monkeypatch.syspath_prepend(str(root))
    return root


MODELS: list[tuple[str, list[str], list[str]]] = [
    ("os_system", ["model.name=os:system", "model.kwargs={command: 'touch {pwned}'}"],
     ["model.name='os:system'", "'system' is a built-in, not a Python function or nn.Module "
      "class defined in a module", "allowed:"]),
    ("builtins_eval", ["model.name=builtins:eval", "model.kwargs={source: 'open(\"{pwned}\", "
                                                     "\"w\")'}"],
     ["model.name='builtins:eval'", "is a built-in"]),
    ("reexported_builtin", ["model.name=granet_test_builders:system",
                            "model.kwargs={command: 'touch {pwned}'}"],
     ["model.name='granet_test_builders:system'", "is a built-in"]),
    ("class_not_a_module", ["model.name=subprocess:Popen",
                            "model.kwargs={args: [touch, '{pwned}']}"],
     ["model.name='subprocess:Popen'", "is a class but not a torch.nn.Module subclass"]),
    ("reexported_class", ["model.name=granet_test_builders:Popen",
                          "model.kwargs={args: [touch, '{pwned}']}"],
     ["is a class but not a torch.nn.Module subclass"]),
    ("user_class_not_a_module", ["model.name=granet_test_builders:NotAModel"],
     ["'NotAModel' is a class but not a torch.nn.Module subclass"]),
    ("callable_instance", ["model.name=granet_test_builders:AN_INSTANCE"],
     ["'AN_INSTANCE' is a Linear object, not a Python function or nn.Module class"]),
    ("partial_object", ["model.name=granet_test_builders:A_PARTIAL"],
     ["'A_PARTIAL' is a partial object"]),
    ("builder_raises", ["model.name=granet_test_builders:explodes", "model.kwargs={depth: 7}"],
     ["model.name='granet_test_builders:explodes': the user builder raised RuntimeError: no "
      "kernel for depth 7 (model.kwargs={'depth': 7})"]),
    ("module_import_error", ["model.name=granet_test_import_error:build"],
     ["model.name='granet_test_import_error:build'",
      "cannot import module 'granet_test_import_error'", "no_such_package_for_granet"]),
    ("module_syntax_error", ["model.name=granet_test_syntax_error:build"],
     ["importing module 'granet_test_syntax_error' failed (SyntaxError:"]),
    ("registry_kwarg_wrong_type", ["model.kwargs={hidden: abc}"],
     ["model.name='mlp' with model.kwargs={'hidden': 'abc'}: building the model failed "
      "(ValueError: invalid literal for int()"]),
    ("torchvision_unknown_kwarg", ["model.name=torchvision:resnet18", "model.kwargs={bogus: 1}"],
     ["model.name='torchvision:resnet18' with model.kwargs={'bogus': 1}: building the model "
      "failed (TypeError:", "bogus"]),
    ("input_rank", ["model.name=cnn1d", "model.kwargs={}"],
     ["model.name='cnn1d' needs a 2-d per-sample input shape, got (1, 8, 8)"]),
]


@pytest.mark.parametrize(("sets", "needles"), [c[1:] for c in MODELS], ids=[c[0] for c in MODELS])
def test_bad_model(sets, needles, user_modules, tmp_path, capsys) -> None:
    pwned = tmp_path / "pwned"
    out = tmp_path / "runs"
    sets = [s.replace("{pwned}", str(pwned)) for s in sets]
    # Without --quiet: no progress bar is drawn before the error line.
    expect_error(capsys, _argv(out, sets, quiet=False), needles, watch=out)
    assert not pwned.exists()  # nothing was called


def test_a_good_user_builder_from_the_same_module_trains(user_modules, tmp_path, capsys) -> None:
    # The control for the cases above: the module imports and a real builder in it is accepted.
    out = tmp_path / "runs"
    assert main(_argv(out, ["model.name=granet_test_builders:tiny", "model.kwargs={}"])) == 0


# ------------------------------------------------------------------ data


@pytest.fixture
def unreachable_cifar(monkeypatch):
    """CIFAR-10's download URL on a host that cannot be resolved (RFC 2606 '.invalid'), so the
    test is offline wherever it runs and never downloads 170 MB."""
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url",
                        "https://cifar.invalid/cifar-10-python.tar.gz")
    monkeypatch.setattr(granet.data.builtin, "DOWNLOAD_PROBE_TIMEOUT_S", 3.0)


def test_download_offline_names_the_data_dir_and_the_fix(unreachable_cifar, tmp_path,
                                                         capsys) -> None:
    data, out = tmp_path / "data", tmp_path / "runs"
    err = expect_error(
        capsys,
        _argv(out, ["data.name=cifar10", "data.download=true", f"data.data_dir={data}",
                    "data.num_samples=64"]),
        ["cifar10 not found under data.data_dir=", str(data),
         "data.download=true cannot reach https://cifar.invalid/cifar-10-python.tar.gz",
         "the download needs a network", "place the extracted torchvision files "
         "('cifar-10-batches-py/') under data.data_dir"],
        watch=out,
    )
    assert not data.exists(), err  # not even the empty directory


@pytest.mark.parametrize("download", [True, False])
def test_data_dir_under_a_regular_file(download, unreachable_cifar, tmp_path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    data, out = tmp_path / "afile" / "data", tmp_path / "runs"
    needles = ([f"data.data_dir='{data}': '{tmp_path / 'afile'}' is a file, not a directory"]
               if download else [f"cifar10 not found under data.data_dir='{data}'",
                                 "set data.download=true"])
    expect_error(capsys, _argv(out, ["data.name=cifar10", f"data.data_dir={data}",
                                     f"data.download={str(download).lower()}"]),
                 needles, watch=tmp_path)


def test_output_dir_under_a_regular_file(tmp_path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "runs"
    expect_error(capsys, _argv(out, []),
                 [f"'{tmp_path / 'afile'}' is a file, not a directory",
                  "set run.output_dir (or --run-dir) to a writable directory"],
                 watch=tmp_path)


# ------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One finished 1-epoch run; tests copy its directory."""
    out = tmp_path_factory.mktemp("trained") / "runs"
    assert main(_argv(out, [])) == 0
    cfg = load_config(None, [*BASE, f"run.output_dir={out}"])
    run = out / f"granet-{config_hash(cfg)}"
    return {"out": out, "run": run, "files": _tree(run)}


def _copy_run(trained: dict, tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "runs"
    run = out / trained["run"].name
    run.mkdir(parents=True)
    for name, data in trained["files"].items():
        (run / name).write_bytes(data)
    return out, run


def _damage(run: Path, kind: str) -> None:
    ckpt = run / "checkpoint.pt"
    data = ckpt.read_bytes()
    if kind == "truncated":
        ckpt.write_bytes(data[: len(data) // 3])
    elif kind == "empty":
        ckpt.write_bytes(b"")
    elif kind == "text":
        ckpt.write_text("this is not a checkpoint\n")
    elif kind == "directory":
        ckpt.unlink()
        ckpt.mkdir()
    elif kind == "a_tensor":
        torch.save(torch.ones(3), ckpt)
    elif kind == "a_foreign_dict":
        torch.save({"state_dict": {}}, ckpt)


CHECKPOINT_DAMAGE = {
    "truncated": "cannot be read: truncated, corrupt or not a torch checkpoint",
    "empty": "is empty (0 bytes)",
    "text": "cannot be read: truncated, corrupt or not a torch checkpoint",
    "directory": "is a directory, not a checkpoint file",
    "a_tensor": "holds a Tensor, not a granet checkpoint",
    "a_foreign_dict": "is not a granet checkpoint (no 'epoch', 'model'",
}


@pytest.mark.parametrize("kind", list(CHECKPOINT_DAMAGE))
def test_resume_from_a_damaged_checkpoint(kind, trained, tmp_path, capsys) -> None:
    out, run = _copy_run(trained, tmp_path)
    _damage(run, kind)
    expect_error(capsys, _argv(out, []),
                 [f"checkpoint '{run / 'checkpoint.pt'}': {CHECKPOINT_DAMAGE[kind]}"],
                 watch=out)


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "a_tensor"])
def test_export_of_a_damaged_checkpoint(kind, trained, tmp_path, capsys) -> None:
    out, run = _copy_run(trained, tmp_path)
    _damage(run, kind)
    expect_error(capsys, ["export", str(run)],
                 [f"checkpoint '{run / 'checkpoint.pt'}': {CHECKPOINT_DAMAGE[kind]}"],
                 watch=out)
    assert not (run / "export").exists()


def test_export_with_a_checkpoint_of_another_config(trained, tmp_path, capsys) -> None:
    out, run = _copy_run(trained, tmp_path)
    other = load_config(None, [*BASE, "model.kwargs={hidden: [8]}"])
    (run / "config.yaml").write_text(dump_yaml(other))
    saved = config_hash(load_config(None, BASE))
    expect_error(capsys, ["export", str(run)],
                 [f"RUN_DIR='{run}': its checkpoint.pt is of another config (hash {saved}; "
                  f"config.yaml: {config_hash(other)})", "--fresh"],
                 watch=out)
    assert not (run / "export").exists()


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        ("no_config", ["no config.yaml beside checkpoint.pt"]),
        ("empty_config", ["config.yaml': is empty"]),
        ("config_bad_field", ["model.nme='mlp': unknown field"]),
    ],
)
def test_export_without_a_usable_config(change, needles, trained, tmp_path, capsys) -> None:
    out, run = _copy_run(trained, tmp_path)
    if change == "no_config":
        (run / "config.yaml").unlink()
    elif change == "empty_config":
        (run / "config.yaml").write_text("")
    else:
        data = yaml.safe_load((run / "config.yaml").read_text())
        data["model"]["nme"] = data["model"].pop("name")
        (run / "config.yaml").write_text(yaml.safe_dump(data))
    expect_error(capsys, ["export", str(run)], needles, watch=out)


def test_export_of_a_file_instead_of_a_run_directory(tmp_path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    expect_error(capsys, ["export", str(tmp_path / "afile")],
                 [f"RUN_DIR='{tmp_path / 'afile'}': not a directory"], watch=tmp_path)
