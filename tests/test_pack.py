"""Packed probes (granet/pack.py): K probes of one trunk checkpoint trained together give the
results of the K probes trained one by one - bit for bit in loop mode, within a stated tolerance
in vmap mode - and a member that diverges leaves the pack as Trainer.fit would end it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from granet.branch import branch
from granet.config import Config
from granet.data import load_dataset
from granet.io import load_checkpoint, save_checkpoint
from granet.pack import ProbePack, check_packable
from granet.trainer import DATA_SPLIT_SEED, Callback, Diverged, Trainer

from .test_trainer import assert_same


def _data(name: str = "mnist1d", n: int = 600):
    return load_dataset(name, num_samples=n, val_fraction=0.1, seed=DATA_SPLIT_SEED)


def _trunk_cfg(model: str = "cnn1d", kwargs: dict | None = None, data: str = "mnist1d",
               n: int = 600) -> Config:
    cfg = Config()
    cfg.data.name, cfg.data.num_samples, cfg.data.batch_size = data, n, 64
    cfg.data.eval_batch_size = 256
    cfg.model.name, cfg.model.kwargs = model, dict(kwargs or {"width": 0.25})
    cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov = "sgd", 0.2, 0.9, True
    cfg.optim.weight_decay, cfg.optim.schedule, cfg.optim.milestones = 5e-4, "multistep", [2]
    cfg.optim.warmup_epochs = 0
    s = cfg.sparsity
    s.method, s.final_density, s.init_density = "gmp", 0.5, 1.0
    s.prune_start_epoch, s.prune_end_epoch, s.update_interval = 0.0, 1.0, 2
    cfg.run.epochs, cfg.run.device, cfg.run.dead_unit_eval = 3, "cpu", False
    return cfg


def _probe_cfg(trunk: Config, lr: float | None = None, epochs: int = 2) -> Config:
    cfg = copy.deepcopy(trunk)
    s = cfg.sparsity
    s.method, s.init_density = "static", 1.0
    cfg.optim.schedule, cfg.optim.milestones = "constant", []
    cfg.optim.lr = trunk.optim.lr * 0.1 if lr is None else lr
    cfg.run.epochs = epochs
    return cfg


@pytest.fixture(scope="module")
def trunk(tmp_path_factory) -> dict[str, Any]:
    """A gmp trunk trained 2 of 3 epochs; its checkpoint at t=2."""
    cfg = _trunk_cfg()
    ds = _data()
    t = Trainer(cfg, write=False, dataset=ds)
    t.cfg.run.epochs = 2
    t.fit(resume=False)
    path = tmp_path_factory.mktemp("trunk") / "epoch-2.pt"
    save_checkpoint(t.state_dict(), path)
    return {"cfg": cfg, "data": ds, "ckpt": path}


PROBES = [  # (ratio, regen)
    (0.5, False), (0.5, True), (0.8, False), (0.8, True),
]


class _Count(Callback):
    def __init__(self) -> None:
        self.epochs: list[int] = []
        self.ended = 0

    def on_epoch_end(self, trainer, record) -> None:
        self.epochs.append(trainer.epoch)

    def on_train_end(self, trainer, summary) -> None:
        self.ended += 1


def _branch(t: Trainer, ckpt: Any, ratio: float, regen: bool) -> dict[str, Any]:
    return dict(branch(t, ckpt, epoch_t=2, ratio=ratio, scope="global",
                       structure="unstructured", regen=regen).__dict__)


def _alone(cfg: Config, data, ckpt: Path, ratio: float, regen: bool):
    """One probe as the study trains it one by one: build, branch, fit."""
    t = Trainer(cfg, write=False, dataset=data)
    br = _branch(t, ckpt, ratio, regen)
    try:
        result: Any = t.fit(resume=False)
    except Diverged as exc:
        result = exc
    return t, br, result, t.state_dict()


def _history(t: Trainer) -> list[dict[str, Any]]:
    return [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in t.history]


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Checkpoints equal bit for bit, but for the wall-clock epoch_seconds in the history."""
    import json

    def strip(s: dict[str, Any]) -> dict[str, Any]:
        hist = [{k: v for k, v in h.items() if k != "epoch_seconds"}
                for h in json.loads(s["history"])]
        return {**s, "history": hist}

    assert_same(strip(a), strip(b))


def _packed(cfgs: list[Config], data, ckpt: Path, probes, mode: str = "loop"):
    trainers = [Trainer(c, write=False, dataset=data, callbacks=[_Count()]) for c in cfgs]
    pack = ProbePack(trainers, mode=mode)
    state = load_checkpoint(ckpt, keys=("model", "engine"))  # one read for the whole pack
    brs = [pack.call(i, lambda t, p=p: _branch(t, state, *p)) for i, p in enumerate(probes)]
    seen: list[int] = []
    results = pack.fit(after_epoch=seen.append)
    return pack, brs, results, seen


def test_loop_pack_is_bit_identical_to_probes_trained_one_by_one(trunk):
    cfg = _probe_cfg(trunk["cfg"])
    alone = [_alone(cfg, trunk["data"], trunk["ckpt"], *p) for p in PROBES]
    pack, brs, results, seen = _packed([cfg] * len(PROBES), trunk["data"], trunk["ckpt"], PROBES)
    assert seen == [1, 2]  # one pack callback per epoch
    for i, (t1, br1, res1, state1) in enumerate(alone):
        t2 = pack.trainers[i]
        assert brs[i] == br1  # same digest, densities, counts, accuracy after pruning
        assert _history(t2) == _history(t1)
        assert t2.layer_history == t1.layer_history
        assert {k: v for k, v in results[i].items()} == res1
        _same_state(pack.state_dict(i), state1)  # weights, optimizer, masks, RNG: bit for bit
        assert t2.callbacks[0].epochs == [1, 2] and t2.callbacks[0].ended == 1
    # the probes really differ from each other (not one model trained K times)
    assert len({h[-1]["test_loss"] for h in (_history(t) for t in pack.trainers)}) == len(PROBES)
    # epoch_seconds: training share + own evaluation, positive, adding up to the pack's time
    assert all(h["epoch_seconds"] > 0 for t in pack.trainers for h in t.history)


def test_loop_pack_keeps_each_members_dropout_rng(tmp_path):
    """Dropout draws from the global RNG: each member keeps its own stream, so packing changes
    nothing even for a model with dropout (a transformer with dropout 0.2)."""
    cfg = _trunk_cfg("transformer1d", {"dim": 16, "depth": 1, "heads": 2, "dropout": 0.2})
    cfg.run.epochs = 1
    data = _data(n=400)
    t = Trainer(cfg, write=False, dataset=data)
    t.fit(resume=False)
    ckpt = tmp_path / "t.pt"
    save_checkpoint(t.state_dict(), ckpt)
    pcfg = _probe_cfg(cfg)
    probes = [(0.5, False), (0.5, True), (0.8, True)]
    alone = [_alone(pcfg, data, ckpt, *p) for p in probes]
    pack, _, _, _ = _packed([pcfg] * 3, data, ckpt, probes)
    for i, (t1, _, _, state1) in enumerate(alone):
        assert _history(pack.trainers[i]) == _history(t1)
        _same_state(pack.state_dict(i), state1)


def test_diverging_member_leaves_the_pack_as_fit_ends_it(trunk):
    good, bad = _probe_cfg(trunk["cfg"]), _probe_cfg(trunk["cfg"], lr=1.0e6)
    cfgs, probes = [good, bad, good], [(0.5, False), (0.5, False), (0.8, True)]
    alone = [_alone(c, trunk["data"], trunk["ckpt"], *p) for c, p in zip(cfgs, probes,
                                                                          strict=True)]
    assert isinstance(alone[1][2], Diverged)
    pack, _, results, _ = _packed(cfgs, trunk["data"], trunk["ckpt"], probes)
    exc = results[1]
    assert isinstance(exc, Diverged)
    assert (exc.epoch, exc.step, exc.reason) == (alone[1][2].epoch, alone[1][2].step,
                                                 alone[1][2].reason)
    assert exc.summary == alone[1][2].summary and pack.trainers[1].status == "diverged"
    assert _history(pack.trainers[1]) == _history(alone[1][0])  # its finite epochs only
    for i in (0, 2):  # the others are untouched by their neighbour's divergence
        assert results[i]["status"] == "done"
        assert _history(pack.trainers[i]) == _history(alone[i][0])
        _same_state(pack.state_dict(i), alone[i][3])


def test_pack_resumes_exactly_from_its_members_checkpoints(trunk):
    """What a study's packed trial does on a retry: every member's state from the pack's
    checkpoint after epoch 1, a new pack, train on: identical to the uninterrupted pack."""
    cfg = _probe_cfg(trunk["cfg"], epochs=3)
    full, _, _, _ = _packed([cfg] * 2, trunk["data"], trunk["ckpt"], PROBES[:2])
    saved: list[dict[str, Any]] = []

    class Crash(Exception):
        pass

    trainers = [Trainer(cfg, write=False, dataset=trunk["data"]) for _ in range(2)]
    pack = ProbePack(trainers)
    for i, p in enumerate(PROBES[:2]):
        pack.call(i, lambda t, p=p: _branch(t, trunk["ckpt"], *p))

    def crash(epoch: int) -> None:
        saved.extend(copy.deepcopy(pack.state_dict(i)) for i in range(2))
        raise Crash

    with pytest.raises(Crash):
        pack.fit(after_epoch=crash)
    fresh = [Trainer(cfg, write=False, dataset=trunk["data"]) for _ in range(2)]
    again = ProbePack(fresh)
    for i in range(2):
        again.call(i, lambda t, i=i: t.load_state_dict(saved[i]))
    again.fit()
    for i in range(2):
        assert _history(again.trainers[i]) == _history(full.trainers[i])
        _same_state(again.state_dict(i), full.state_dict(i))


def test_vmap_pack_matches_one_by_one_within_tolerance(trunk):
    """One batched model: batched convolutions sum in another order, so equal within 1e-4 on
    weights and 1e-3 on losses/accuracies after 2 epochs (stated tolerance)."""
    cfg = _probe_cfg(trunk["cfg"])
    alone = [_alone(cfg, trunk["data"], trunk["ckpt"], *p) for p in PROBES]
    pack, brs, results, _ = _packed([cfg] * len(PROBES), trunk["data"], trunk["ckpt"], PROBES,
                                    mode="vmap")
    for i, (t1, br1, _, state1) in enumerate(alone):
        t2 = pack.trainers[i]
        assert brs[i] == br1 and results[i]["status"] == "done"
        for h1, h2 in zip(_history(t1), _history(t2), strict=True):
            assert h1.keys() == h2.keys()
            for k in h1:
                assert h2[k] == pytest.approx(h1[k], abs=1e-3), (i, k)
        s2 = pack.state_dict(i)
        for name, w in state1["model"].items():
            torch.testing.assert_close(s2["model"][name], w, atol=1e-4, rtol=1e-4)
        assert_same(s2["engine"]["masks"], state1["engine"]["masks"])  # masks stay fixed
        assert s2["engine"]["step"] == state1["engine"]["step"]
        assert s2["engine"]["train_flops"] == state1["engine"]["train_flops"]
        m1 = state1["optimizer"]["state"]
        m2 = s2["optimizer"]["state"]
        for k in m1:
            torch.testing.assert_close(m2[k]["momentum_buffer"], m1[k]["momentum_buffer"],
                                       atol=1e-4, rtol=1e-3)


def test_vmap_pack_batchnorm_model(tmp_path):
    """ResNet-20 (BatchNorm: running statistics are per member, updated inside vmap). On random
    inputs BN amplifies the reordered sums more: within 1e-3 after 4 steps."""
    cfg = _trunk_cfg("resnet20", {"width": 4}, data="fake", n=128)
    cfg.data.batch_size, cfg.data.eval_batch_size = 32, 64
    cfg.sparsity.method, cfg.sparsity.final_density = "static", 0.5
    cfg.run.epochs = 1
    data = load_dataset("fake", num_samples=128, val_fraction=0.1, seed=DATA_SPLIT_SEED)
    t = Trainer(cfg, write=False, dataset=data)
    t.fit(resume=False)
    ckpt = tmp_path / "t.pt"
    save_checkpoint(t.state_dict(), ckpt)
    pcfg = _probe_cfg(cfg, epochs=1)
    probes = [(0.5, False), (0.8, True)]
    alone = [_alone(pcfg, data, ckpt, *p) for p in probes]
    pack, _, _, _ = _packed([pcfg] * 2, data, ckpt, probes, mode="vmap")
    for i, (_, _, _, state1) in enumerate(alone):
        s2 = pack.state_dict(i)
        for name, w in state1["model"].items():
            if "running" in name:
                assert not torch.equal(w, load_checkpoint(ckpt)["model"][name])  # they moved
            torch.testing.assert_close(s2["model"][name], w, atol=1e-3, rtol=1e-3)


def test_members_that_cannot_share_batches_are_refused(trunk):
    cfg = _probe_cfg(trunk["cfg"])
    other = copy.deepcopy(cfg)
    other.data.batch_size = 32
    a = Trainer(cfg, write=False, dataset=trunk["data"])
    b = Trainer(other, write=False, dataset=trunk["data"])
    with pytest.raises(ValueError, match=r"pack member 1: data.batch_size=32 differs"):
        check_packable([a, b])
    seeded = copy.deepcopy(cfg)
    seeded.run.seed = 7
    with pytest.raises(ValueError, match=r"pack member 1: run.seed=7 differs"):
        ProbePack([a, Trainer(seeded, write=False, dataset=trunk["data"])])
    with pytest.raises(ValueError, match=r"pack mode 'vmap': sparsity.method='gmp'"):
        ProbePack([Trainer(trunk["cfg"], write=False, dataset=trunk["data"])], mode="vmap")
