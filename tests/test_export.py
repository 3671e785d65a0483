"""`granet export`: masked dense weights and a compact non-zeros-only file that expands exactly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from granet.cli import main
from granet.config import config_hash, load_config
from granet.export import compact_state_dict, expand_state_dict
from granet.io import load_checkpoint
from granet.models import build_model

SETS = ["data.num_samples=2000", "run.epochs=3", "optim.lr=0.05", "optim.milestones=[2]",
        "sparsity.update_interval=4", "sparsity.prune_end_epoch=1", "sparsity.final_density=0.1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 3-epoch GraNet run of the full-width cnn1d at density 0.1."""
    out = tmp_path_factory.mktemp("export") / "runs"
    sets = [*SETS, f"run.output_dir={out}"]
    argv = ["train", "--quiet"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    return out / f"granet-{config_hash(load_config(None, sets))}"


def test_export_writes_both_files_and_prints_sizes(run_dir: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["export", str(run_dir)]) == 0
    printed = capsys.readouterr().out
    dense_f, sparse_f = run_dir / "export" / "model.pt", run_dir / "export" / "model_sparse.pt"
    assert dense_f.is_file() and sparse_f.is_file()
    m = re.search(r"dense ([\d.]+) MB -> sparse ([\d.]+) MB \(([\d.]+)%; density ([\d.]+)\)",
                  printed)
    assert m, printed
    dense_mb, sparse_mb, pct, density = (float(g) for g in m.groups())
    assert f"in {run_dir / 'export'}" in printed
    assert density == pytest.approx(0.1, abs=1e-4)
    # The printed sizes are the serialised state dicts; the files add only a little metadata.
    assert dense_mb == pytest.approx(dense_f.stat().st_size / 1e6, abs=0.01)
    assert sparse_mb == pytest.approx(sparse_f.stat().st_size / 1e6, abs=0.01)
    assert pct == pytest.approx(100 * sparse_mb / dense_mb, abs=1.0)
    ratio = sparse_f.stat().st_size / dense_f.stat().st_size
    print(f"export: dense {dense_f.stat().st_size} B, sparse {sparse_f.stat().st_size} B, "
          f"ratio {ratio:.3f} at density {density}")
    assert ratio < 0.3


def test_compact_expands_to_the_masked_state_dict_exactly(run_dir: Path) -> None:
    assert main(["export", str(run_dir)]) == 0
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    masks = {f"{n}.weight": m for n, m in
             zip(ckpt["engine"]["layer_names"], ckpt["engine"]["masks"], strict=True)}
    masked = {k: (v * masks[k] if k in masks else v) for k, v in ckpt["model"].items()}

    dense = load_checkpoint(run_dir / "export" / "model.pt")
    sparse = load_checkpoint(run_dir / "export" / "model_sparse.pt")  # weights_only=True
    expanded = expand_state_dict(sparse["compact"])
    assert set(expanded) == set(masked) == set(dense["state_dict"])
    for k, v in masked.items():
        assert expanded[k].dtype == v.dtype and expanded[k].shape == v.shape, k
        assert torch.equal(expanded[k], v), k
        assert torch.equal(dense["state_dict"][k], v), k
    # Only the non-zeros are stored: one value per active weight.
    for k, m in masks.items():
        assert sparse["compact"]["sparse"][k]["values"].numel() == int(m.sum())
    assert set(sparse["compact"]["dense"]) == set(masked) - set(masks)

    # Metadata rebuilds the model; the expanded weights load into it strictly and predict.
    meta = sparse["meta"]
    assert meta["model"] == "cnn1d" and meta["num_classes"] == 10
    model = build_model(meta["model"], num_classes=meta["num_classes"],
                        input_shape=tuple(meta["input_shape"]), kwargs=meta["model_kwargs"])
    model.load_state_dict(expanded, strict=True)
    x = torch.randn(4, *meta["input_shape"])
    ref = build_model("cnn1d", num_classes=10, input_shape=(1, 40))
    ref.load_state_dict(dense["state_dict"])
    assert torch.equal(model(x), ref(x))


def test_compact_round_trip_edge_cases() -> None:
    g = torch.Generator().manual_seed(0)
    state = {
        "a.weight": torch.randn(3, 5, 7, generator=g),  # 105 bits: not a multiple of 8
        "b.weight": torch.randn(4, 4, generator=g),
        "c.weight": torch.randn(2, 9, generator=g, dtype=torch.float64),
        "a.bias": torch.randn(3, generator=g),
    }
    masks = {
        "a.weight": torch.rand(3, 5, 7, generator=g) < 0.2,
        "b.weight": torch.zeros(4, 4, dtype=torch.bool),  # fully pruned
        "c.weight": torch.ones(2, 9, dtype=torch.bool),  # fully dense
    }
    state = {k: (v * masks[k] if k in masks else v) for k, v in state.items()}
    compact = compact_state_dict(state, masks)
    assert compact["sparse"]["a.weight"]["bits"].numel() == 14  # ceil(105 / 8)
    out = expand_state_dict(compact)
    assert set(out) == set(state)
    for k, v in state.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
