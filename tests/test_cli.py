"""The command line: bad configs and arguments fail cleanly (exit 2, a message naming the field,
the value and what is allowed, nothing written), and `granet train` writes a complete, resumable
run directory.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from granet.cli import main
from granet.config import config_hash, load_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "configs" / "mnist1d_granet.yaml"

# A small GraNet run: 2000 MNIST-1D samples (1440 train -> 12 steps/epoch, the last of 32), 4
# epochs.
SMALL = {
    "data": {"name": "mnist1d", "num_samples": 2000, "batch_size": 128},
    "model": {"name": "cnn1d"},
    "optim": {"lr": 0.05, "milestones": [3]},
    "sparsity": {
        "method": "granet",
        "final_density": 0.1,
        "update_interval": 4,
        "prune_end_epoch": 3,
    },
    "run": {"epochs": 4, "seed": 0},
}

METRIC_COLUMNS = {
    "epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss",
    "test_acc", "best_val_acc", "test_at_best_val", "density", "density_all", "sparsity",
    "regen_rate", "itop_rate", "units_without_input", "pruned", "regrown", "pruned_total",
    "regrown_total", "mask_events", "inference_flops", "inference_flops_ratio", "train_flops",
    "dead_relu", "epoch_seconds",
}



def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------------ bad input

# (id, --set overrides on top of the example config, substrings the message must contain)
BAD_SETS: list[tuple[str, list[str], list[str]]] = [
    ("density_above_1", ["sparsity.final_density=1.3"],
     ["sparsity.final_density=1.3", "must be in (0.0, 1.0]"]),
    ("density_zero", ["sparsity.final_density=0"],
     ["sparsity.final_density=0.0", "must be in (0.0, 1.0]"]),
    ("method", ["sparsity.method=foo"],
     ["sparsity.method='foo'", "must be one of dense, static, set, rigl, gmp, granet"]),
    ("distribution", ["sparsity.distribution=gaussian"],
     ["sparsity.distribution='gaussian'", "must be one of uniform, er, erk"]),
    ("unknown_field", ["sparsity.densty=0.1"],
     ["sparsity.densty=0.1", "unknown field", "allowed:", "final_density"]),
    ("unknown_group", ["training.lr=0.1"],
     ["training.lr=0.1", "training: unknown field", "allowed: data, model, optim, run, sparsity"]),
    ("group_as_value", ["optim=3"], ["optim=3", "is a group", "optim.x=1"]),
    ("subfield_of_scalar", ["optim.lr.x=1"], ["optim.lr.x", "optim.lr has no sub-fields"]),
    ("lr_not_a_number", ["optim.lr=abc"], ["optim.lr='abc'", "must be a number"]),
    ("lr_negative", ["optim.lr=-0.1"], ["optim.lr=-0.1", "must be > 0"]),
    ("lr_inf", ["optim.lr=.inf"], ["optim.lr=inf", "must be a finite number"]),
    ("bool_wrong", ["optim.nesterov=maybe"], ["optim.nesterov='maybe'", "must be a boolean"]),
    ("list_wrong", ["optim.milestones=5"], ["optim.milestones=5", "must be a list"]),
    ("milestone_beyond_epochs", ["optim.schedule=multistep", "optim.milestones=[20, 50]"],
     ["optim.milestones=[20, 50]", "must lie in [1, run.epochs=30]"]),
    ("milestones_not_increasing", ["optim.milestones=[30, 20]"],
     ["optim.milestones=[30, 20]", "must be strictly increasing"]),
    ("gamma_zero", ["optim.gamma=0"], ["optim.gamma=0.0", "must be in (0.0, 1.0]"]),
    ("growth", ["sparsity.growth=x"],
     ["sparsity.growth='x'", "must be one of gradient, random, momentum"]),
    ("prune_end_beyond_epochs", ["sparsity.prune_end_epoch=50"],
     ["sparsity.prune_end_epoch=50.0", "(sparsity.prune_start_epoch=0.0, run.epochs=30]"]),
    ("prune_end_not_after_start", ["sparsity.prune_start_epoch=10", "sparsity.prune_end_epoch=10"],
     ["sparsity.prune_end_epoch=10.0", "(sparsity.prune_start_epoch=10.0, run.epochs=30]"]),
    ("update_interval_zero", ["sparsity.update_interval=0"],
     ["sparsity.update_interval=0", "must be >= 1"]),
    ("val_fraction_one", ["data.val_fraction=1.0"],
     ["data.val_fraction=1.0", "must be in [0.0, 1.0)"]),
    ("batch_size_zero", ["data.batch_size=0"], ["data.batch_size=0", "must be > 0"]),
    ("epochs_zero", ["run.epochs=0"], ["run.epochs=0", "must be >= 1"]),
    ("epochs_fraction", ["run.epochs=2.5"], ["run.epochs=2.5", "must be an integer"]),
    ("model_unknown", ["model.name=nope"],
     ["model.name='nope'", "unknown model", "allowed:", "cnn1d", "'torchvision:<name>'"]),
    ("torchvision_unknown", ["model.name=torchvision:nonexistent"],
     ["model.name='torchvision:nonexistent'", "'nonexistent'", "allowed:", "resnet18"]),
    ("import_path_no_module", ["model.name=tests.fixtures.nomodule:fn"],
     ["model.name='tests.fixtures.nomodule:fn'", "cannot import module 'tests.fixtures.nomodule'",
      "allowed:"]),
    ("import_path_no_attr", ["model.name=tests.fixtures.user_model:missing"],
     ["model.name='tests.fixtures.user_model:missing'", "has no attribute 'missing'"]),
    ("import_path_not_callable", ["model.name=tests.fixtures.user_model:NOT_CALLABLE"],
     ["model.name='tests.fixtures.user_model:NOT_CALLABLE'", "is not callable"]),
    ("import_path_not_a_module", ["model.name=tests.fixtures.user_model:not_a_module"],
     ["model.name='tests.fixtures.user_model:not_a_module'", "returned int",
      "not a torch.nn.Module"]),
    ("os_getcwd", ["model.name=os:getcwd"],
     ["model.name='os:getcwd'", "is a built-in, not a Python function or nn.Module class",
      "allowed:"]),
    ("model_kwargs", ["model.kwargs={bogus: 1}"],
     ["model.kwargs={'bogus': 1}", "not accepted by model.name='cnn1d'"]),
    ("dataset", ["data.name=imagenet"],
     ["data.name='imagenet'", "must be one of mnist1d, digits, cifar10, cifar100, fake"]),
    ("device", ["run.device=tpu"], ["run.device='tpu'", "must be one of auto, cpu, cuda"]),
    ("update_interval_longer_than_window", ["sparsity.update_interval=100000"],
     ["sparsity.update_interval=100000", "longer than the pruning window", "lower it"]),
    ("gmp_final_above_init",
     ["sparsity.method=gmp", "sparsity.init_density=0.5", "sparsity.final_density=0.6"],
     ["sparsity.final_density=0.6", "<= sparsity.init_density=0.5", "gmp"]),
    ("dense_layers_bad_name", ["sparsity.dense_layers=[features.99]"],
     ["sparsity.dense_layers", "'features.99'", "allowed: first, last", "features.0"]),
    ("min_layer_density_above_final", ["sparsity.min_layer_density=0.5"],
     ["sparsity.min_layer_density=0.5", "<= sparsity.final_density=0.1"]),
    ("regen_min_above_ratio", ["sparsity.regen_min=0.6"],
     ["sparsity.regen_min=0.6", "<= sparsity.regen_ratio=0.5"]),
    ("batch_larger_than_train_set", ["data.batch_size=100000"],
     ["data.batch_size=100000", "larger than the training set (3600 samples)"]),
    ("malformed_set", ["sparsity.final_density"],
     ["--set 'sparsity.final_density'", "expected key=value"]),
    ("set_value_bad_yaml", ["optim.milestones=[1, "], ["optim.milestones=[1, ", "not valid YAML"]),
]


def _expect_error(capsys, out: Path, argv: list[str], needles: list[str]) -> str:
    out.mkdir(exist_ok=True)
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured
    assert captured.err.startswith("granet: error: "), captured.err
    for needle in needles:
        assert needle in captured.err, f"{needle!r} not in {captured.err!r}"
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert _files(out) == []  # nothing written
    return captured.err


@pytest.mark.parametrize(("sets", "needles"), [c[1:] for c in BAD_SETS],
                         ids=[c[0] for c in BAD_SETS])
def test_bad_override_fails_cleanly(sets, needles, tmp_path, capsys) -> None:
    out = tmp_path / "runs"
    argv = ["train", str(EXAMPLE), "--quiet", "--set", f"run.output_dir={out}"]
    for s in sets:
        argv += ["--set", s]
    _expect_error(capsys, out, argv, needles)
    # The same with an explicit --run-dir: it is not created either.
    _expect_error(capsys, out, [*argv, "--run-dir", str(out / "explicit")], needles)
    assert _files(tmp_path) == ["runs"]


def test_cifar_without_files_points_at_download(tmp_path, capsys) -> None:
    out, data = tmp_path / "runs", tmp_path / "no-data"
    argv = ["train", str(EXAMPLE), "--quiet", "--set", f"run.output_dir={out}",
            "--set", "data.name=cifar10", "--set", f"data.data_dir={data}",
            "--set", "model.name=resnet20"]
    _expect_error(capsys, out, argv,
                  ["cifar10 not found", f"data.data_dir='{data}'", "data.download=true"])
    assert not data.exists()


def test_missing_config_file(tmp_path, capsys) -> None:
    out = tmp_path / "runs"
    missing = tmp_path / "nope.yaml"
    _expect_error(capsys, out, ["train", str(missing), "--set", f"run.output_dir={out}"],
                  [f"config file '{missing}'", "not found"])


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("optim: {learning_rate: 0.1}\n",
         ["optim.learning_rate=0.1", "unknown field", "allowed: betas", "lr"]),
        ("optim: [1, 2]\n", ["optim=[1, 2]", "must be a mapping"]),
        ("- 1\n- 2\n", ["top level must be a mapping"]),
        ("optim: {lr: [0.1\n", ["invalid YAML"]),
        ("sparsity: {final_density: '0.1x'}\n", ["sparsity.final_density='0.1x'", "number"]),
    ],
    ids=["unknown_field", "group_not_mapping", "top_level_list", "bad_yaml", "bad_number"],
)
def test_bad_config_file(text, needles, tmp_path, capsys) -> None:
    out = tmp_path / "runs"
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    _expect_error(capsys, out, ["train", str(path), "--set", f"run.output_dir={out}"], needles)


def test_export_without_checkpoint(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    _expect_error(capsys, run, ["export", str(run)], [f"RUN_DIR='{run}'", "no checkpoint.pt"])


def test_bad_cli_arguments_exit_2(tmp_path, capsys) -> None:
    for argv in (["train", str(EXAMPLE), "--bogus"], ["nosuchcommand"], []):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


# ------------------------------------------------------------------ a real run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`granet train` of SMALL once (4 epochs); the run dir and the captured outputs."""
    tmp = tmp_path_factory.mktemp("cli")
    cfg_path = tmp / "small.yaml"
    cfg_path.write_text(yaml.safe_dump(SMALL))
    out = tmp / "runs"
    argv = ["train", str(cfg_path), "--quiet", "--set", f"run.output_dir={out}"]
    return {"argv": argv, "out": out, "cfg_path": cfg_path, "rc": main(argv)}


def test_train_writes_the_run_directory(trained, capsys) -> None:
    assert trained["rc"] == 0
    cfg = load_config(trained["cfg_path"], [f"run.output_dir={trained['out']}"])
    run = trained["out"] / f"granet-{config_hash(cfg)}"
    assert [p.name for p in trained["out"].iterdir()] == [run.name]
    names = {p.name for p in run.iterdir()}
    assert names == {"config.yaml", "metrics.parquet", "layers.parquet", "checkpoint.pt",
                     "summary.json"}

    # config.yaml loads back to the same config.
    assert load_config(run / "config.yaml") == cfg

    # metrics: one row per epoch, the documented columns, consistent values.
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert METRIC_COLUMNS <= set(rows[0])
    assert [r["step"] for r in rows] == [12, 24, 36, 48]
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.05, 0.05, 0.005])
    for r in rows:
        for key in ("train_loss", "train_acc", "val_acc", "test_acc", "train_flops"):
            assert math.isfinite(r[key]), (key, r)
        assert 0.0 <= r["val_acc"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0
        assert r["sparsity"] == pytest.approx(1.0 - r["density"])
    dens = [r["density"] for r in rows]
    assert dens[0] < 1.0 and all(a >= b for a, b in zip(dens, dens[1:], strict=False))
    assert dens[2] == dens[3] == pytest.approx(0.1, abs=1e-4)  # d_f reached at prune_end_epoch 3
    flops = [r["train_flops"] for r in rows]
    assert all(b > a for a, b in zip(flops, flops[1:], strict=False))
    assert rows[-1]["inference_flops_ratio"] < 0.5
    assert rows[-1]["itop_rate"] > rows[-1]["density"]
    assert sum(r["mask_events"] for r in rows) == 12  # 48 / 4 update events
    assert rows[-1]["pruned_total"] > 0 and rows[-1]["regrown_total"] > 0
    best = max(rows, key=lambda r: r["val_acc"])
    assert rows[-1]["best_val_acc"] == best["val_acc"]

    # layers: one row per (epoch, layer); its densities add up to the global one.
    layers = pq.read_table(run / "layers.parquet").to_pylist()
    names_l = ["features.0", "features.3", "features.7", "classifier.1", "classifier.3"]
    assert len(layers) == 4 * len(names_l)
    assert [r["layer"] for r in layers[:5]] == names_l
    last = [r for r in layers if r["epoch"] == 4]
    nnz = sum(r["density"] * r["numel"] for r in last)
    assert nnz / sum(r["numel"] for r in last) == pytest.approx(rows[-1]["density"], rel=1e-9)

    # checkpoint: loadable without unpickling arbitrary objects; epoch, step and masks agree.
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 4 and ckpt["step"] == 48
    assert ckpt["meta"]["config_hash"] == config_hash(cfg)
    masks = ckpt["engine"]["masks"]
    assert sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks) == dens[-1]
    for name, m in zip(ckpt["engine"]["layer_names"], masks, strict=True):
        assert torch.equal(ckpt["model"][f"{name}.weight"] * ~m,
                           torch.zeros_like(ckpt["model"][f"{name}.weight"]))

    # summary: the last epoch's numbers.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config_hash"] == config_hash(cfg)
    assert summary["method"] == "granet" and summary["run_dir"] == str(run)
    for key in ("epoch", "test_acc", "val_acc", "test_at_best_val", "density", "itop_rate",
                "train_flops", "inference_flops"):
        assert summary[key] == rows[-1][key], key


def test_rerun_resumes_and_trains_nothing(trained, capsys) -> None:
    cfg = load_config(trained["cfg_path"], [f"run.output_dir={trained['out']}"])
    run = trained["out"] / f"granet-{config_hash(cfg)}"
    before = {n: (run / n).read_bytes() for n in ("checkpoint.pt", "config.yaml")}
    metrics_before = pq.read_table(run / "metrics.parquet").to_pylist()
    capsys.readouterr()
    assert main(trained["argv"]) == 0
    captured = capsys.readouterr()
    assert f"resuming {run}" in captured.err
    assert "done: epoch=4 " in captured.out and f"run_dir={run}" in captured.out
    for n, data in before.items():
        assert (run / n).read_bytes() == data, n  # no epoch trained, no checkpoint saved
    assert pq.read_table(run / "metrics.parquet").to_pylist() == metrics_before


def test_resume_with_another_config_is_refused(trained, capsys) -> None:
    cfg = load_config(trained["cfg_path"], [f"run.output_dir={trained['out']}"])
    run = trained["out"] / f"granet-{config_hash(cfg)}"
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    other = load_config(trained["cfg_path"], ["optim.lr=0.02"])
    capsys.readouterr()
    rc = main([*trained["argv"], "--set", "optim.lr=0.02", "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"run directory '{run}'" in err and "checkpoint.pt is of another config" in err
    assert f"hash {config_hash(cfg)}; this config: {config_hash(other)}" in err
    assert "--fresh" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing touched


def test_fresh_retrains_to_the_same_numbers(trained, capsys) -> None:
    cfg = load_config(trained["cfg_path"], [f"run.output_dir={trained['out']}"])
    run = trained["out"] / f"granet-{config_hash(cfg)}"
    old = torch.load(run / "checkpoint.pt", weights_only=True)
    old_rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert main([*trained["argv"], "--fresh"]) == 0
    new = torch.load(run / "checkpoint.pt", weights_only=True)
    new_rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert len(new_rows) == 4
    for k, v in old["model"].items():
        assert torch.equal(v, new["model"][k]), k
    for a, b in zip(old_rows, new_rows, strict=True):
        a.pop("epoch_seconds"), b.pop("epoch_seconds")
        assert a == b


# ------------------------------------------------------------------ divergence


def test_train_that_diverges_exits_1_with_one_line(tmp_path, capsys) -> None:
    """`--set optim.lr=1e6`: stopped at the first non-finite loss, one `granet: error:` line,
    exit 1; summary.json says diverged; no checkpoint of the non-finite state."""
    out = tmp_path / "runs"
    argv = ["train", "--quiet", "--set", f"run.output_dir={out}", "--set", "optim.lr=1e6",
            "--set", "data.name=digits", "--set", "model.name=mlp",
            "--set", "model.kwargs={hidden: [32]}", "--set", "run.epochs=3",
            "--set", "optim.milestones=[2]", "--set", "sparsity.update_interval=4",
            "--set", "sparsity.prune_end_epoch=2"]
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 1
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    cfg = load_config(None, [a for a in argv[3::2]])
    run = out / f"granet-{config_hash(cfg)}"
    assert lines[0] == (
        "granet: error: diverged at epoch 1 (non-finite loss); no finite epoch; lower optim.lr "
        f"(now 1e+06) or add warm-up epochs (optim.warmup_epochs); run_dir={run}"
    )
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "summary.json"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["reason"] == "non-finite loss"
    assert summary["diverged_epoch"] == 1 and "test_acc" not in summary


def test_diverged_message_shows_the_last_finite_epoch() -> None:
    from granet.cli import _diverged_message
    from granet.trainer import Diverged

    exc = Diverged(2, 21, "non-finite weights in net.1.weight")
    exc.summary = {"run_dir": "runs/granet-x", "epoch": 2, "test_acc": 0.91234,
                   "val_acc": 0.9, "test_at_best_val": 0.9, "density": 0.2, "status": "diverged"}
    cfg = load_config(None, ["optim.lr=0.5"])
    assert _diverged_message(exc, cfg) == (
        "diverged at epoch 3 (non-finite weights in net.1.weight); last finite epoch 2: "
        "test_acc=0.9123, val_acc=0.9, test_at_best_val=0.9, density=0.2; lower optim.lr "
        "(now 0.5) or add warm-up epochs (optim.warmup_epochs); run_dir=runs/granet-x"
    )


# ------------------------------------------------------------------ the console


def _screen(text: str) -> list[str]:
    """What a terminal shows of ``text``: per line, ``\\r`` returns to column 0 and later text
    overwrites earlier text; trailing blanks dropped."""
    out = []
    for line in text.split("\n"):
        cells: list[str] = []
        for seg in line.split("\r"):
            cells[: len(seg)] = list(seg)
        out.append("".join(cells).rstrip())
    while out and not out[-1]:
        out.pop()
    return out


def test_train_console_start_line_bar_and_done(tmp_path, capsys) -> None:
    """Without --quiet: one start line (model, parameter counts, device, run directory), a bar
    whose numbers are those of the epoch it counts, cleared at the end; then `done:`. A re-run
    says from which epoch it resumes."""
    from granet.trainer import Trainer

    cfg_path = tmp_path / "small.yaml"
    cfg_path.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "runs"
    argv = ["train", str(cfg_path), "--set", f"run.output_dir={out}"]
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    cfg = load_config(cfg_path, [f"run.output_dir={out}"])
    run = out / f"granet-{config_hash(cfg)}"

    # the numbers of the start line, independently: the model's parameters and the weights of
    # the layers the engine masks (the five conv/linear layers of cnn1d)
    model = Trainer(cfg, run_dir=tmp_path / "unused", write=False).model
    n_params = sum(p.numel() for p in model.parameters())
    n_prunable = sum(m.weight.numel() for m in model.modules()
                     if isinstance(m, (torch.nn.Conv1d, torch.nn.Linear)))
    assert n_prunable < n_params  # biases are not masked
    numel = {r["layer"]: r["numel"] for r in pq.read_table(run / "layers.parquet").to_pylist()}
    assert sum(numel.values()) == n_prunable  # the layers the run masked are those five
    lines = captured.err.split("\n")
    assert lines[0] == (
        f"granet train: model cnn1d on mnist1d, {n_params:,} parameters ({n_prunable:,} "
        f"prunable at density 1.0000, granet to 0.1), 4 epochs, device cpu, "
        f"run directory {run}"
    )
    assert not list(tmp_path.glob("unused*"))

    # every bar draw that counts n epochs shows epoch n's numbers
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    draws = re.findall(r"(\d)/4 \[[^\]]*\]?[^\r\n]*?loss=([0-9.]+), val=([0-9.]+), "
                       r"test=([0-9.]+), density=([0-9.]+)", captured.err)
    assert {int(d[0]) for d in draws} == {1, 2, 3, 4}
    for n, loss, val, test, dens in draws:
        r = rows[int(n) - 1]
        assert (loss, val, test, dens) == (f"{r['train_loss']:.3f}", f"{r['val_acc']:.3f}",
                                           f"{r['test_acc']:.3f}", f"{r['density']:.4f}")
    # the bar is cleared at the end: the screen holds the start line only, no 4/4 bar
    assert _screen(captured.err) == [lines[0]]
    assert captured.out.startswith("done: epoch=4 ") and f"run_dir={run}" in captured.out
    assert len(captured.out.strip().splitlines()) == 1

    # a re-run resumes from its checkpoint and says at which epoch
    assert main(argv) == 0
    again = capsys.readouterr()
    assert _screen(again.err)[0] == (
        f"resuming {run} from its checkpoint at epoch 4 of 4 (nothing left to train)")
    assert _screen(again.err)[1].startswith("granet train: model cnn1d on mnist1d, ")
    assert "at density 0.1000" in _screen(again.err)[1]  # the checkpoint's masks
    assert len(_screen(again.err)) == 2


def test_passwords_in_uris_are_never_printed(caplog):
    """``redact`` masks the password of every URI in a text; granet's log records pass through
    it (the study layer's warnings name storage and tracking URIs)."""
    import logging

    from granet.errors import redact

    assert redact("study_dir='s3://KEY:SECRET@bucket/p?endpoint_override=h:9000' failed") == \
        "study_dir='s3://KEY:***@bucket/p?endpoint_override=h:9000' failed"
    assert redact("postgresql+psycopg://mlflow:pw@10.0.0.1:5432/db") == \
        "postgresql+psycopg://mlflow:***@10.0.0.1:5432/db"
    for same in ("http://127.0.0.1:5000", "s3://bucket/p", "sqlite:////tmp/a:b@c/mlflow.db",
                 "user@host:22"):
        assert redact(same) == same
    with caplog.at_level(logging.WARNING, logger="granet"):
        logging.getLogger("granet").warning("MLflow %s: down", "mysql://u:secret@db:3306/m")
    assert caplog.records[-1].getMessage() == "MLflow mysql://u:***@db:3306/m: down"
