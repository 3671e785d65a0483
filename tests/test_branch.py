"""A probe's branch on a model with BatchNorm: the trunk's running statistics come with the
weights, and neither the regrowth's gradient pass nor the accuracy after pruning moves them."""

from __future__ import annotations

import torch

from granet.branch import branch, state_digest
from granet.config import load_config
from granet.io import load_checkpoint
from granet.trainer import Trainer

TRUNK = ["model.name=cnn1d", "model.kwargs={width: 0.25}", "data.num_samples=600",
         "data.batch_size=64", "run.epochs=2", "optim.schedule=constant",
         "sparsity.method=static", "sparsity.final_density=0.5", "run.dead_unit_eval=false"]


def _bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n}


def test_probe_on_a_batchnorm_model_starts_from_the_trunks_running_statistics(tmp_path):
    trunk = Trainer(load_config(None, TRUNK), write=False)
    trunk.fit(resume=False)
    ckpt = tmp_path / "trunk.pt"
    trunk.save(ckpt)
    stats = _bn_buffers(trunk.model)
    assert stats and all(not torch.allclose(v, torch.zeros_like(v)) and
                         not torch.allclose(v, torch.ones_like(v)) for v in stats.values())

    probe = Trainer(load_config(None, TRUNK), write=False)
    fresh = _bn_buffers(probe.model)  # a new model's statistics (zeros and ones)
    assert any(not torch.equal(fresh[n], stats[n]) for n in stats)
    res = branch(probe, ckpt, epoch_t=2, ratio=0.5, scope="global", structure="unstructured",
                 regen=True)
    after = _bn_buffers(probe.model)
    for name, value in stats.items():  # the trunk's, untouched by the regrowth's forward pass
        assert torch.equal(after[name], value), name
    saved = load_checkpoint(ckpt)
    assert res.branch_digest == state_digest(saved["model"], saved["engine"]["masks"])
    assert res.regrown == res.pruned > 0
    assert 0.0 <= res.acc_pruned <= 1.0
    # the probe trains on from there in train mode: its statistics move only then
    probe.fit(resume=False)
    assert any(not torch.equal(_bn_buffers(probe.model)[n], stats[n]) for n in stats)
