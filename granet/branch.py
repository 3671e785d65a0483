"""Branching a run from another run's checkpoint: the plasticity probe's one-shot step.

A probe starts from its trunk's full checkpoint at epoch t (weights, masks, optimizer state),
prunes a share of the remaining weights in one shot (global or layer-wise, unstructured or
filters), optionally regrows as many connections per layer by gradient magnitude (the gradient
of one training minibatch; new weights start at 0), and then trains with its masks fixed. This
module does the branch itself on a :class:`granet.trainer.Trainer`; it knows nothing of Ray or
MLflow, so tests and benchmarks run it in-process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from granet.data import iterate_batches

__all__ = ["BranchResult", "branch", "state_digest"]


@dataclass(frozen=True)
class BranchResult:
    """What the probe's row needs from its branch."""

    branch_digest: str  # SHA-256 of the weights and masks loaded from the trunk (before pruning)
    density_before: float
    density_branch: float
    pruned: int
    regrown: int
    acc_pruned: float  # test accuracy right after pruning (and regrowth), before training


def state_digest(model_state: dict[str, Any], masks: list[Any]) -> str:
    """SHA-256 over the model's state tensors (sorted by name) and the masks, bit-exact."""
    h = hashlib.sha256()
    for name in sorted(model_state):
        v = model_state[name]
        h.update(name.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for m in masks:
        h.update(m.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _regrow_gradient(trainer: Any, counts: list[int], mode: str, seed: int, t: int) -> int:
    """Dense gradient of one training minibatch, then regrow ``counts`` per layer."""
    model = trainer.model
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 999_983 + t)
    x, y = next(iter(iterate_batches(
        trainer.data.train, trainer.cfg.data.batch_size, shuffle=True, generator=gen,
        augment=trainer.data.augment, drop_last=True,
    )))
    model.train()
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(trainer._forward(x).float(), y)
    loss.backward()
    grown = trainer.engine.regrow(counts, mode)
    trainer.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # one forward in train mode must not move BN running statistics
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return grown


def branch(trainer: Any, checkpoint: str | Path | dict[str, Any], *, epoch_t: int, ratio: float,
           scope: str, structure: str, regen: bool, regrow_mode: str = "gradient",
           digest: str | None = None) -> BranchResult:
    """Load ``checkpoint`` (weights, masks, optimizer state, BN statistics) into ``trainer``,
    prune ``ratio`` of the remaining weights, and regrow as many if ``regen``.

    ``checkpoint`` is a path or a checkpoint already read with :func:`granet.io.load_checkpoint`
    (probes of one trunk share one read; nothing of it is modified). ``digest``: its
    :func:`state_digest`, when the caller has it already (the same for every probe of a trunk
    epoch); computed from the loaded state otherwise.

    Raises :class:`granet.io.CheckpointError` when the checkpoint cannot be read.
    """
    eng = trainer.engine
    trainer.load_weights_and_masks(checkpoint, optimizer=True)
    if digest is None:
        digest = state_digest(trainer.model.state_dict(), eng.masks)
    density_before = eng.density()
    pruned = eng.prune_fraction(float(ratio), scope=scope, structure=structure)
    regrown = 0
    if regen:
        regrown = _regrow_gradient(trainer, pruned, regrow_mode, trainer.cfg.run.seed,
                                   int(epoch_t))
    _, acc_pruned = trainer.evaluate(trainer.data.test)
    return BranchResult(
        branch_digest=digest, density_before=density_before, density_branch=eng.density(),
        pruned=int(sum(pruned)), regrown=int(regrown), acc_pruned=acc_pruned,
    )
