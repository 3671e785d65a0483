"""Training K probes together: one data pass per batch for K models that share everything but
their masks (plasticity probes branched from one trunk checkpoint).

:class:`ProbePack` takes K :class:`granet.trainer.Trainer` s built from the same data set (the
same tensors), with the same seed, batch size and starting epoch, and trains them in lockstep:
every minibatch is drawn once and fed to each member. Two modes:

* ``"loop"`` (default): each member does exactly what :meth:`Trainer.train_epoch` does on the
  batch (forward, loss, backward, optimizer step, engine step), in turn. Each member keeps its
  own global-RNG state (dropout), swapped in around its work, so every member's history, weights
  and optimizer state are **bit-identical** to the member trained alone with
  :meth:`Trainer.fit` (tested). Any sparse method works.
* ``"vmap"``: the K members run as one batched model (``torch.func.functional_call`` +
  ``vmap`` over stacked weights, buffers and masks; one optimizer over the stacked parameters,
  which for SGD and AdamW is exactly K independent optimizers since their updates are
  elementwise). K small kernels become one K-times larger one, which is what fills a GPU.
  Batched matmuls and convolutions sum in another order than single ones, so results agree
  with one-by-one training within floating-point tolerance only (tested on the CPU: weights
  within 1e-4 after 2 epochs, metrics within 1e-3). Masks must be fixed (method ``static`` or
  ``dense``: plasticity probes), and there is no per-member timing: an epoch's time is shared
  equally.

Each member's callbacks (``Trainer.callbacks``) are called as :meth:`Trainer.fit` calls them
(``on_train_start``, ``on_epoch_end``, ``on_train_end``); ``after_epoch(epoch)`` is called once
per epoch after every member's ``on_epoch_end`` (one report and one checkpoint per pack). A member
whose loss or weights turn non-finite ends as :meth:`Trainer.fit` ends it (``status``
"diverged", ``history`` the finite epochs, ``on_train_end`` with its summary) and leaves the
pack; the others go on. ``epoch_seconds`` of a member is its share of the pack's epoch wall time
(by its measured compute time in loop mode, equal shares in vmap mode) plus its own evaluation,
so the members' seconds add up to the pack's wall time.

Pure torch: no Ray, MLflow or files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from granet.data import iterate_batches
from granet.sparse.engine import NonFiniteError
from granet.trainer import Diverged, Trainer, _epoch_generator, lr_at_epoch

__all__ = ["PACK_MODES", "ProbePack", "check_packable"]

PACK_MODES = ("loop", "vmap")


def check_packable(trainers: Sequence[Trainer]) -> None:
    """Raise ValueError naming what differs when ``trainers`` cannot share their data passes."""
    if not trainers:
        raise ValueError("a pack needs at least one trainer")
    lead = trainers[0]
    for i, t in enumerate(trainers):
        if t.write:
            raise ValueError(f"pack member {i}: built with write=True; packed members write "
                             "nothing themselves (build them with write=False)")
        for what, a, b in (
            ("data.batch_size", t.cfg.data.batch_size, lead.cfg.data.batch_size),
            ("data.drop_last", t.cfg.data.drop_last, lead.cfg.data.drop_last),
            ("run.seed", t.cfg.run.seed, lead.cfg.run.seed),
            ("epoch", t.epoch, lead.epoch),
            ("device", t.device, lead.device),
            ("data augmentation", t.data.augment, lead.data.augment),
        ):
            if a != b:
                raise ValueError(f"pack member {i}: {what}={a!r} differs from member 0's {b!r}; "
                                 "members must draw the very same batches")
        x, y = t.data.train.x, t.data.train.y
        lx, ly = lead.data.train.x, lead.data.train.y
        same = (x is lx and y is ly) or (
            x.shape == lx.shape and y.shape == ly.shape and torch.equal(x, lx)
            and torch.equal(y, ly))
        if not same:
            raise ValueError(f"pack member {i}: its training data differ from member 0's")


class _Member:
    """One trainer of the pack and what its epoch accumulates."""

    def __init__(self, index: int, trainer: Trainer, rng: torch.Tensor) -> None:
        self.index = index
        self.trainer = trainer
        self.rng = rng
        self.cuda_rng: torch.Tensor | None = None
        self.active = True
        self.result: dict[str, Any] | Diverged | None = None
        self.begin_epoch()

    def begin_epoch(self) -> None:
        dev = self.trainer.device
        self.loss_sum = torch.zeros((), device=dev)
        self.correct = torch.zeros((), device=dev, dtype=torch.long)
        self.bad_loss = torch.zeros((), device=dev, dtype=torch.bool)
        self.seen = 0
        self.events = self.pruned = self.regrown = 0
        self.compute = 0.0
        self.failed: Diverged | None = None


class ProbePack:
    """K trainers trained together (see the module docstring).

    Args:
        trainers: built with ``write=False`` on the same data tensors (pass one
            :class:`granet.data.Dataset` to every ``Trainer(dataset=...)``), same seed, batch size
            and epoch.
        mode: ``"loop"`` (bit-exact) or ``"vmap"`` (one batched model; fixed masks only).

    Each member gets its own copy of the global RNG state as it is now (right after building
    identically seeded trainers, that is each one's own state); run per-member preparation
    (branching, loading a checkpoint) through :meth:`call` so it uses and advances the member's
    RNG, and take checkpoints with :meth:`state_dict`.
    """

    def __init__(self, trainers: Sequence[Trainer], *, mode: str = "loop") -> None:
        if mode not in PACK_MODES:
            raise ValueError(f"mode={mode!r}: must be one of {', '.join(PACK_MODES)}")
        check_packable(trainers)
        self.mode = mode
        rng = torch.get_rng_state()
        self.members = [_Member(i, t, rng.clone()) for i, t in enumerate(trainers)]
        self.device = trainers[0].device
        if self.device.type == "cuda":
            cuda = torch.cuda.get_rng_state(self.device)
            for m in self.members:
                m.cuda_rng = cuda.clone()
        if mode == "vmap":
            for m in self.members:
                _check_vmappable(m.trainer)

    # ------------------------------------------------------------------ per-member RNG
    def _enter(self, m: _Member) -> None:
        torch.set_rng_state(m.rng)
        if m.cuda_rng is not None:
            torch.cuda.set_rng_state(m.cuda_rng, self.device)

    def _leave(self, m: _Member) -> None:
        m.rng = torch.get_rng_state()
        if m.cuda_rng is not None:
            m.cuda_rng = torch.cuda.get_rng_state(self.device)

    def call(self, index: int, fn: Callable[[Trainer], Any]) -> Any:
        """``fn(trainer)`` of member ``index`` under that member's RNG state."""
        m = self.members[index]
        self._enter(m)
        try:
            return fn(m.trainer)
        finally:
            self._leave(m)

    def state_dict(self, index: int) -> dict[str, Any]:
        """Member ``index``'s :meth:`Trainer.state_dict` (with its own RNG state)."""
        return self.call(index, lambda t: t.state_dict())

    @property
    def trainers(self) -> list[Trainer]:
        return [m.trainer for m in self.members]

    # ------------------------------------------------------------------ fit
    def fit(self, after_epoch: Callable[[int], None] | None = None
            ) -> list[dict[str, Any] | Diverged]:
        """Train every member to its ``run.epochs``; per member its summary (as
        :meth:`Trainer.fit` returns it) or the :class:`Diverged` it ended with."""
        for m in self.members:
            self.call(m.index, lambda t: [cb.on_train_start(t) for cb in t.callbacks])
        vm = _VmapState(self) if self.mode == "vmap" else None
        while True:
            live = [m for m in self.members if m.active and not m.trainer.stop
                    and m.trainer.epoch < m.trainer.cfg.run.epochs]
            for m in self.members:
                if m.active and m not in live:
                    self._finish(m)
            if not live:
                break
            epoch = live[0].trainer.epoch
            if any(m.trainer.epoch != epoch for m in live):  # cannot happen: same start, lockstep
                raise RuntimeError("pack members out of step")
            t0 = time.perf_counter()
            if vm is not None:
                vm.train_epoch(live, epoch)
            else:
                self._train_epoch_loop(live, epoch)
            wall = time.perf_counter() - t0
            total = sum(m.compute for m in live)
            for m in live:
                share = wall * (m.compute / total if total > 0 else 1.0 / len(live))
                if m.failed is not None:
                    self._diverge(m, m.failed)
                else:
                    self.call(m.index, lambda t, m=m, share=share: self._end_epoch(m, t, share))
            if after_epoch is not None:
                after_epoch(epoch + 1)
        return [m.result for m in self.members]  # type: ignore[misc]

    def _finish(self, m: _Member) -> None:
        t = m.trainer
        t.status = "done"
        summary = t.summary()
        m.result, m.active = summary, False
        self.call(m.index, lambda t: [cb.on_train_end(t, summary) for cb in t.callbacks])

    def _diverge(self, m: _Member, exc: Diverged) -> None:
        t = m.trainer
        t.status, t.diverged = "diverged", exc
        exc.summary = summary = t.summary()
        m.result, m.active = exc, False
        self.call(m.index, lambda t: [cb.on_train_end(t, summary) for cb in t.callbacks])

    def _begin(self, m: _Member, epoch: int) -> None:
        t = m.trainer
        lr = lr_at_epoch(t.cfg, epoch)
        for group in t.optimizer.param_groups:
            group["lr"] = lr
        t.model.train()
        m.begin_epoch()
        m.lr = lr

    def _train_epoch_loop(self, live: list[_Member], epoch: int) -> None:
        lead = live[0].trainer
        for m in live:
            self._begin(m, epoch)
        gen = _epoch_generator(lead.cfg.run.seed, epoch)
        # The same batches Trainer.train_epoch draws (same generator, same call).
        for x, y in iterate_batches(
            lead.data.train, lead.cfg.data.batch_size, shuffle=True, generator=gen,
            augment=lead.data.augment, drop_last=lead.cfg.data.drop_last,
        ):
            for m in live:
                if m.failed is not None:
                    continue
                c0 = time.perf_counter()
                self._enter(m)
                try:
                    _step(m, x, y)
                except Diverged as exc:
                    m.failed = exc
                finally:
                    self._leave(m)
                m.compute += time.perf_counter() - c0

    def _end_epoch(self, m: _Member, t: Trainer, seconds: float) -> None:
        """What Trainer.train_epoch does after its loop and Trainer._fit after the epoch."""
        try:
            if bool(m.bad_loss):
                raise Diverged(t.epoch, t.engine.step_count, "non-finite loss")
            bad = t.first_non_finite()
            if bad is not None:
                raise Diverged(t.epoch, t.engine.step_count, f"non-finite weights in {bad}")
        except Diverged as exc:
            m.failed = exc
            self._diverge(m, exc)
            return
        seen = max(m.seen, 1)
        train = {
            "lr": m.lr,
            "train_loss": float(m.loss_sum) / seen,
            "train_acc": float(m.correct) / seen,
            "mask_events": float(m.events),
            "pruned": float(m.pruned),
            "regrown": float(m.regrown),
        }
        t.epoch += 1
        rec = t._record(train, seconds)
        t.history.append(rec)
        t.layer_history.extend(
            {"epoch": t.epoch, "layer": name, "density": d, "numel": n}
            for (name, d), n in zip(t.engine.layer_densities().items(), t.engine.sizes,
                                    strict=True)
        )
        for cb in t.callbacks:
            cb.on_epoch_end(t, rec)
        t.request_checkpoint = False


def _step(m: _Member, x: torch.Tensor, y: torch.Tensor) -> None:
    """One optimizer step of one member: the body of Trainer.train_epoch's loop."""
    t = m.trainer
    out = t._forward(x)
    loss = F.cross_entropy(out.float(), y, label_smoothing=t.cfg.optim.label_smoothing)
    if t.check_every_step:
        if not math.isfinite(float(loss.detach())):  # before the step: weights stay finite
            raise Diverged(t.epoch, t.engine.step_count, "non-finite loss")
    else:
        m.bad_loss |= ~torch.isfinite(loss.detach())
    t.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t.optimizer.step()
    try:
        event = t.engine.step(len(y))
    except NonFiniteError as exc:
        reason = "non-finite loss" if bool(m.bad_loss) else exc.reason
        raise Diverged(t.epoch, t.engine.step_count, reason) from exc
    if event is not None:
        if bool(m.bad_loss):
            raise Diverged(t.epoch, t.engine.step_count, "non-finite loss")
        m.events += 1
        m.pruned += event["pruned"]
        m.regrown += event["regrown"]
    m.loss_sum += loss.detach() * len(y)
    m.correct += (out.argmax(1) == y).sum()
    m.seen += len(y)


# ---------------------------------------------------------------------------------- vmap mode


def _check_vmappable(t: Trainer) -> None:
    eng = t.engine
    if eng.preset.gradual_prune or eng.preset.regenerate or eng.grad_momentum is not None:
        raise ValueError(
            f"pack mode 'vmap': sparsity.method={t.cfg.sparsity.method!r} updates its masks; "
            "vmap packs train fixed masks only (static or dense: plasticity probes); use "
            "mode 'loop'")
    if not isinstance(t.optimizer, (torch.optim.SGD, torch.optim.AdamW)):
        raise ValueError(f"pack mode 'vmap': optimizer {type(t.optimizer).__name__} is not "
                         "SGD or AdamW")


class _VmapState:
    """The live members as one stacked model; copied back into the members at epoch ends."""

    def __init__(self, pack: ProbePack) -> None:
        self.pack = pack
        self.members: list[_Member] = []

    # -- stacking
    def _stack(self, live: list[_Member]) -> None:
        lead = live[0].trainer
        self.members = list(live)
        self.names = [n for n, _ in lead.model.named_parameters()]
        self.buffer_names = [n for n, _ in lead.model.named_buffers()]
        models = [m.trainer.model for m in live]
        with torch.no_grad():
            self.params = {
                n: torch.stack([dict(mod.named_parameters())[n].detach() for mod in models])
                .requires_grad_(True) for n in self.names}
            self.buffers = {
                n: torch.stack([dict(mod.named_buffers())[n] for mod in models])
                for n in self.buffer_names}
        by_id = {id(p): n for n, p in lead.model.named_parameters()}
        groups = []
        for g in lead.optimizer.param_groups:
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": [self.params[by_id[id(p)]] for p in g["params"]]})
        self.opt = type(lead.optimizer)(groups)
        for n in self.names:
            states = [m.trainer.optimizer.state.get(dict(m.trainer.model.named_parameters())[n])
                      for m in live]
            if not states[0]:
                continue
            st: dict[str, Any] = {}
            for k, v in states[0].items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    st[k] = torch.stack([s[k] for s in states]).clone()
                else:
                    st[k] = v.clone() if isinstance(v, torch.Tensor) else v
            self.opt.state[self.params[n]] = st
        # masks of the masked weights (the engines' layers), stacked, in the weights' dtype
        eng = lead.engine
        self.masked = [lp.param_name for lp in eng.layers]
        self.masks = {
            n: torch.stack([m.trainer.engine.masks[i] for m in live]).to(self.params[n].dtype)
            for i, n in enumerate(self.masked)}

    def _unstack(self) -> None:
        for k in range(len(self.members)):
            if k not in self.frozen:
                self._unstack_one(k)

    @torch.no_grad()
    def _unstack_one(self, k: int) -> None:
        """Copy slice ``k`` (weights, buffers, optimizer state) into member ``k``."""
        m = self.members[k]
        named = dict(m.trainer.model.named_parameters())
        for n in self.names:
            named[n].copy_(self.params[n][k])
        bufs = dict(m.trainer.model.named_buffers())
        for n in self.buffer_names:
            bufs[n].copy_(self.buffers[n][k])
        opt = m.trainer.optimizer
        for n in self.names:
            st = self.opt.state.get(self.params[n])
            if not st:
                continue
            own = opt.state[named[n]]
            for key, v in st.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    if key in own:
                        own[key].copy_(v[k])
                    else:
                        own[key] = v[k].clone()
                else:
                    own[key] = v.clone() if isinstance(v, torch.Tensor) else v

    # -- one epoch
    def train_epoch(self, live: list[_Member], epoch: int) -> None:
        from torch.func import functional_call, vmap

        pack = self.pack
        for m in live:
            pack._begin(m, epoch)
        self._stack(live)
        self.frozen: set[int] = set()
        lead = live[0].trainer
        lr = live[0].lr
        for g in self.opt.param_groups:
            g["lr"] = lr
        ls = lead.cfg.optim.label_smoothing
        model = lead.model
        names, bnames = self.names, self.buffer_names

        def loss_fn(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                    x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = functional_call(model, ({**params, **buffers}), (x,))
            return F.cross_entropy(out.float(), y, label_smoothing=ls), out

        batched = vmap(loss_fn, in_dims=(0, 0, None, None), randomness="different")
        k = len(live)
        dev = lead.device
        loss_sum = torch.zeros(k, device=dev)
        correct = torch.zeros(k, device=dev, dtype=torch.long)
        bad = torch.zeros(k, device=dev, dtype=torch.bool)
        seen = 0
        steps = 0
        masked = self.masked
        gen = _epoch_generator(lead.cfg.run.seed, epoch)
        for x, y in iterate_batches(
            lead.data.train, lead.cfg.data.batch_size, shuffle=True, generator=gen,
            augment=lead.data.augment, drop_last=lead.cfg.data.drop_last,
        ):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=lead.use_bf16):
                losses, out = batched({n: self.params[n] for n in names},
                                      {n: self.buffers[n] for n in bnames}, x, y)
            if lead.check_every_step:
                finite = torch.isfinite(losses.detach())
                if not bool(finite.all()):
                    # A member's loss is non-finite before its step: it leaves the pack with its
                    # weights as they are now (as Trainer.train_epoch stops). Its slice keeps
                    # being computed (the slices are independent) but is never copied back.
                    for i, m in enumerate(self.members):
                        if not bool(finite[i]) and i not in self.frozen:
                            self._unstack_one(i)
                            self.frozen.add(i)
                            m.failed = Diverged(m.trainer.epoch, m.trainer.engine.step_count,
                                                "non-finite loss")
            else:
                bad |= ~torch.isfinite(losses.detach())
            self.opt.zero_grad(set_to_none=True)
            losses.sum().backward()
            self.opt.step()
            with torch.no_grad():
                ws = [self.params[n].data for n in masked]
                ms = [self.masks[n] for n in masked]
                extra_t, extra_m = [], []
                for n in masked:
                    for v in self.opt.state.get(self.params[n], {}).values():
                        if isinstance(v, torch.Tensor) and v.shape == self.params[n].shape:
                            extra_t.append(v)
                            extra_m.append(self.masks[n])
                torch._foreach_mul_(ws + extra_t, ms + extra_m)
                loss_sum += losses.detach() * len(y)
                correct += (out.argmax(-1) == y).sum(-1)
            seen += len(y)
            steps += 1
            for i, m in enumerate(self.members):
                if i in self.frozen:
                    continue
                eng = m.trainer.engine
                eng.step_count += 1
                if eng._dense_flops is not None:
                    eng.train_flops += 3.0 * len(y) * eng._sparse_flops
        self._unstack()
        for i, m in enumerate(self.members):
            m.loss_sum, m.correct, m.bad_loss = loss_sum[i], correct[i], bad[i]
            m.seen = seen
            m.compute = 1.0
