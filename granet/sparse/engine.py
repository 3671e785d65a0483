"""The sparse-training engine: masks, the per-step masking contract, and mask-update events.

Use it from any training loop, shaped like an optimizer wrapper::

    engine = SparseEngine(model, optimizer, SparsityConfig(method="granet", final_density=0.1),
                          steps_per_epoch=len(loader), epochs=epochs)
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        engine.step()          # mask weights + optimizer state, maybe prune / regenerate

``engine.step()`` must run after ``optimizer.step()`` and before the next ``zero_grad``: the
regeneration scores use the dense gradient of the current minibatch, already in ``.grad``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from granet.config import SparsityConfig
from granet.sparse.flops import count_forward_flops
from granet.sparse.grow import growth_scores
from granet.sparse.init import layer_densities, random_mask
from granet.sparse.methods import preset_for
from granet.sparse.prune import (
    _active_scores,
    count_true,
    filter_prune,
    global_magnitude,
    layerwise_magnitude,
    topk_mask,
)
from granet.sparse.schedules import PruneWindow, gmp_sparsity, is_update_step, regen_rate
from granet.sparse.select import classify_parameters


def engine_seed(seed: int) -> int:
    """The seed of the engine's generator for run seed ``seed``: a mix, never ``seed`` itself.

    A run seeds ``torch.manual_seed(seed)`` before building its model; a fresh generator seeded
    with the same number replays that uniform stream, and random masks are the top-k of uniform
    scores drawn layer by layer in the order the weights were initialised, so they kept exactly
    the largest initial weights of each layer (a sign-biased mask, not a random one).
    """
    return (int(seed) * 0x9E3779B97F4A7C15 + 0x2545F4914F6CDD1D) % (2**63 - 1)

__all__ = [
    "SparseEngine",
    "MaskedLayer",
    "NonFiniteError",
    "LayerCollapseWarning",
    "UnmaskedWeightWarning",
    "prunable_layers",
]


class NonFiniteError(RuntimeError):
    """A mask update would read a NaN or inf (weights or growth scores); the masks were left
    unchanged. ``reason`` says what, e.g. ``"non-finite weights in conv1.weight"``; ``step`` is
    the engine's step count."""

    def __init__(self, reason: str, step: int) -> None:
        self.reason = reason
        self.step = int(step)
        super().__init__(f"step {self.step}: {reason}; masks not updated")


@dataclass
class MaskedLayer:
    """A masked weight: ``name`` is the layer name (the parameter name without a trailing
    ``.weight``), ``param_name`` the full parameter name, ``module`` the module owning it."""

    name: str
    module: nn.Module
    param: nn.Parameter
    param_name: str = ""


def prunable_layers(
    model: nn.Module,
    dense_layers: list[str] | tuple[str, ...] = (),
    *,
    include: list[str] | tuple[str, ...] = (),
    exclude: list[str] | tuple[str, ...] = (),
) -> list[MaskedLayer]:
    """The weights the engine masks, by the rule of :mod:`granet.sparse.select`.

    By default every matmul/conv weight (Conv*/ConvTranspose*, Linear, Bilinear, attention
    ``in_proj_weight``, recurrent ``weight_ih``/``weight_hh``); ``include`` / ``exclude`` add or
    remove parameters by name pattern; ``dense_layers`` holds exact layer (or parameter) names or
    the keywords ``first`` / ``last`` (the first and last prunable weight in
    ``named_parameters`` order), never a substring match. A tied parameter is one layer.
    Raises :class:`~granet.config.ConfigError` (a ``ValueError``) on a bad entry.
    """
    infos = classify_parameters(
        model, include=include, exclude=exclude, dense_layers=dense_layers
    )
    return [
        MaskedLayer(info.layer_name, info.module, info.param, info.name)
        for info in infos
        if info.prunable
    ]


class LayerCollapseWarning(UserWarning):
    """A masked layer fell to (or below) ``sparsity.collapse_density``."""


class UnmaskedWeightWarning(UserWarning):
    """A parameter is a matmul/conv operand, but no rule masks it and the config does not
    exclude it (a custom module multiplying by a raw ``nn.Parameter``)."""


class SparseEngine:
    """Masks for every prunable weight, applied after each optimizer step, plus GraNet's updates.

    Args:
        model: any ``nn.Module``; the weights to mask follow the rule of
            :mod:`granet.sparse.select` (every matmul/conv weight, ``cfg.include`` /
            ``cfg.exclude`` / ``cfg.dense_layers`` applied).
        optimizer: the optimizer updating ``model``; its same-shaped state (SGD momentum, Adam
            moments) is masked together with the weights.
        cfg: the method and its knobs (:class:`granet.config.SparsityConfig`).
        steps_per_epoch: optimizer steps per epoch (epochs in ``cfg`` are converted with it).
        epochs: length of the run in epochs (T = epochs * steps_per_epoch for r_t's decay).
        seed: seeds the engine's own generator (initial masks, random growth).
        batch_size: samples per step, for the training-FLOPs count.
        input_shape: per-sample input shape; enables the FLOPs metrics, counted on one
            all-zeros float sample (fine for float-input models; token models need
            ``example_input``).
        example_input: a real batch (a tensor, or a tuple of the model's positional inputs) on
            the model's device; enables the FLOPs metrics, counted on it at the dispatcher
            (:mod:`granet.sparse.flops`). Takes precedence over ``input_shape``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        cfg: SparsityConfig | None = None,
        *,
        steps_per_epoch: int,
        epochs: int,
        seed: int = 0,
        batch_size: int = 1,
        input_shape: tuple[int, ...] | None = None,
        example_input: Any = None,
    ) -> None:
        self.cfg = cfg = cfg if cfg is not None else SparsityConfig()
        self.model = model
        self.optimizer = optimizer
        self.preset = preset_for(cfg.method)
        self.growth = cfg.growth or self.preset.default_growth or "gradient"
        # Every parameter with the rule's decision (``granet layers`` prints them).
        self.param_infos = classify_parameters(
            model, include=cfg.include, exclude=cfg.exclude, dense_layers=cfg.dense_layers
        )
        self.layers = [
            MaskedLayer(info.layer_name, info.module, info.param, info.name)
            for info in self.param_infos
            if info.prunable
        ]
        self.sizes = [layer.param.numel() for layer in self.layers]
        self.total = sum(self.sizes)
        self.steps_per_epoch = int(steps_per_epoch)
        self.total_steps = self.steps_per_epoch * int(epochs)
        self.batch_size = int(batch_size)
        self.generator = torch.Generator().manual_seed(engine_seed(seed))
        self.step_count = 0
        self.train_flops = 0.0
        self.pruned_total = 0
        self.regrown_total = 0
        self.last_event: dict[str, Any] = {}
        self._finite_checked = False  # True while an event runs (checked once at its start)
        self._collapse_warned: set[str] = set()

        start = round(cfg.prune_start_epoch * self.steps_per_epoch)
        if self.preset.gradual_prune:
            end = round(cfg.prune_end_epoch * self.steps_per_epoch)
        else:
            end = max(self.total_steps, start + 1)
        self.window = PruneWindow(start, max(end, start + 1), cfg.update_interval)
        if self.preset.gradual_prune and self.window.n < 1 and not cfg.compat_floored_schedule:
            raise ValueError(
                f"sparsity.update_interval={cfg.update_interval}: longer than the pruning window "
                f"({end - start} steps: epochs {cfg.prune_start_epoch}..{cfg.prune_end_epoch} x "
                f"{self.steps_per_epoch} steps/epoch); lower it or widen the window"
            )
        if cfg.regen_stop_at_prune_end:
            self.regen_end: int | None = (
                self.window.last_event if self.preset.gradual_prune else self.window.end
            )
        else:
            self.regen_end = None

        start_density = {"dense": 1.0, "final": cfg.final_density, "init": cfg.init_density}[
            self.preset.start
        ]
        self.s_i = 1.0 - (cfg.init_density if self.preset.start == "init" else start_density)
        self.s_f = 1.0 - cfg.final_density
        device = self.layers[0].param.device
        if start_density < 1.0:
            shapes = [tuple(layer.param.shape) for layer in self.layers]
            dens = layer_densities(shapes, start_density, cfg.distribution)
            self.masks = [
                random_mask(layer.param.shape, round(d * n), self.generator, layer.param.device)
                for layer, d, n in zip(self.layers, dens, self.sizes, strict=True)
            ]
        else:
            self.masks = [torch.ones_like(layer.param, dtype=torch.bool) for layer in self.layers]
        del device
        self.ever_active = [m.clone() for m in self.masks]
        self._refresh_counts()
        # While every mask is all-ones (dense phase of dense-to-sparse), masking is an identity:
        # skip it so the dense phase costs exactly a dense step.
        self.masking_active = start_density < 1.0
        # SNFS-style momentum growth needs the momentum of the *dense* gradient: the optimizer's
        # own buffers are zero at inactive positions by the masking contract, so the engine keeps
        # an exponential average (β = 0.9) of the dense gradient, only when growth is momentum.
        self.grad_momentum: list[torch.Tensor] | None = None
        if self.growth == "momentum":
            self.grad_momentum = [torch.zeros_like(p) for p in self.params]
        self._dense_flops: list[float] | None = None
        self._other_flops = 0.0
        self.flop_count = None
        if example_input is not None:
            self._init_flops(example_input)
        elif input_shape is not None:
            p = self.layers[0].param
            self._init_flops(torch.zeros((1, *input_shape), device=p.device, dtype=p.dtype))
        self.apply_masks()

    # ------------------------------------------------------------------ per step
    @property
    def params(self) -> list[nn.Parameter]:
        return [layer.param for layer in self.layers]

    def _state_tensors(
        self, layer_masks: list[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tensors: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        if self.optimizer is None:
            return tensors, masks
        state = self.optimizer.state
        layer_masks = self.masks if layer_masks is None else layer_masks
        for layer, m in zip(self.layers, layer_masks, strict=True):
            st = state.get(layer.param)
            if not st:
                continue
            for v in st.values():
                if isinstance(v, torch.Tensor) and v.shape == m.shape:
                    tensors.append(v)
                    masks.append(m)
        return tensors, masks

    def _multipliers(self) -> list[torch.Tensor]:
        """The masks as ``apply_masks`` multiplies by them.

        On CPU, ``x *= bool_mask`` runs a scalar casting loop, 2-4x slower than a same-dtype
        multiply, so there the masks are cached as 0/1 tensors of the weight dtype (the products
        are the same: ``w * 1.0 == w * True`` and ``w * 0.0 == w * False``, signed zeros and NaN
        included). The cache follows the masks: rebuilt when a mask is replaced or changed in
        place (tensor identity + version counter); other devices use the bool masks as they are.
        """
        masks = self.masks
        src = getattr(self, "_mult_src", None)
        try:
            versions = [m._version for m in masks]
        except RuntimeError:  # inference tensors keep no version counter: no cache
            return masks
        if (
            src is not None
            and len(src) == len(masks)
            and all(a is b for a, b in zip(src, masks, strict=True))
            and versions == self._mult_versions
        ):
            return self._mult_cache
        self._mult_cache = [
            m.view(torch.uint8).to(p.dtype)  # uint8 -> float converts vectorised, bool doesn't
            if m.device.type == "cpu" and p.is_floating_point() and m.dtype == torch.bool
            else m
            for m, p in zip(masks, self.params, strict=True)
        ]
        self._mult_src = list(masks)  # holds the masks, so their ids cannot be reused
        self._mult_versions = versions
        return self._mult_cache

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero inactive weights and their same-shaped optimizer state (no host sync)."""
        if not self.masking_active:
            return
        mult = self._multipliers()
        tensors, masks = self._state_tensors(mult)
        torch._foreach_mul_([p.data for p in self.params] + tensors, mult + masks)

    @torch.no_grad()
    def step(self, batch_size: int | None = None) -> dict[str, Any] | None:
        """Call after ``optimizer.step()``: mask, advance the schedules, run an update if due.

        Returns the event record (step, target sparsity, counts pruned/regrown, r_t) on update
        steps and ``None`` otherwise.
        """
        self.apply_masks()
        if self.grad_momentum is not None:
            pairs = [
                (m, p.grad) for m, p in zip(self.grad_momentum, self.params, strict=True)
                if p.grad is not None
            ]
            if pairs:
                ema, grads = [m for m, _ in pairs], [g for _, g in pairs]
                torch._foreach_mul_(ema, 0.9)
                torch._foreach_add_(ema, grads, alpha=0.1)
        self.step_count += 1
        batch = self.batch_size if batch_size is None else batch_size
        if self._dense_flops is not None:
            self.train_flops += 3.0 * batch * self._sparse_flops
        return self._maybe_update(self.step_count, batch)

    def _maybe_update(self, t: int, batch: int) -> dict[str, Any] | None:
        cfg = self.cfg
        target = None
        if self.preset.gradual_prune:
            target = gmp_sparsity(
                t, self.s_i, self.s_f, self.window, compat=cfg.compat_floored_schedule
            )
        if cfg.compat_floored_schedule:
            # The reference's grid: every multiple of Δt from t_0 on, where it prunes too.
            dt, end = self.window.interval, self.regen_end
            on_grid = t % dt == 0 and t >= self.window.start and (end is None or t <= end)
        else:
            on_grid = is_update_step(t, self.window.start, self.window.interval, self.regen_end)
        regen = self.preset.regenerate and on_grid
        if target is None and not regen:
            return None
        # Checked once for the whole event, so a non-finite value leaves every mask as it was.
        self.require_finite(growth=self.growth if regen else None)
        event: dict[str, Any] = {"step": t, "target_sparsity": target, "pruned": 0, "regrown": 0}
        self._finite_checked = True
        try:
            if target is not None:
                event["pruned"] = self.prune_to_sparsity(target)
            if regen:
                r = self.regen_rate(t)
                event["regen_rate"] = r
                event["regrown"] = self.regenerate(r)
                if self.growth == "gradient" and self._dense_flops is not None:
                    # The dense gradient used for regrowth costs one dense weight-gradient pass.
                    self.train_flops += batch * (self.dense_flops - self._sparse_flops)
        finally:
            self._finite_checked = False
        self.pruned_total += event["pruned"]
        self.regrown_total += event["regrown"]
        event["density"] = self.density()
        self.last_event = event
        return event

    def regen_rate(self, t: int | None = None) -> float:
        """r_t at step ``t`` (default: now)."""
        t = self.step_count if t is None else t
        return regen_rate(t, self.total_steps, self.cfg.regen_ratio, self.cfg.regen_min,
                          self.cfg.regen_decay)

    # ------------------------------------------------------------------ mask updates
    @torch.no_grad()
    def _set_masks(self, new_masks: list[torch.Tensor]) -> None:
        self.masks = [
            m.to(layer.param.device) for m, layer in zip(new_masks, self.layers, strict=True)
        ]
        for e, m in zip(self.ever_active, self.masks, strict=True):
            e |= m
        self.masking_active = True
        self._refresh_counts()
        self.apply_masks()

    def _weights(self) -> list[torch.Tensor]:
        return [layer.param.detach() for layer in self.layers]

    @torch.no_grad()
    def require_finite(self, *, growth: str | None = None) -> None:
        """Raise :class:`NonFiniteError` if a masked weight, or the growth scores' source for
        ``growth`` (gradients, the momentum average), holds a NaN or inf. One host sync.

        Every mask update calls it first: magnitudes and scores of NaN order arbitrarily, so a
        diverged model would otherwise be pruned to nothing.
        """
        if self._finite_checked:  # inside an event: checked once at its start
            return
        named: list[tuple[str, torch.Tensor]] = [
            (f"weights in {layer.name}.weight", layer.param.detach()) for layer in self.layers
        ]
        if growth == "gradient" or (growth == "momentum" and self.grad_momentum is None):
            named += [
                (f"gradients of {layer.name}.weight", layer.param.grad)
                for layer in self.layers if layer.param.grad is not None
            ]
        elif growth == "momentum" and self.grad_momentum is not None:
            named += [
                (f"gradient momentum of {layer.name}.weight", m)
                for layer, m in zip(self.layers, self.grad_momentum, strict=True)
            ]
        finite = torch.stack([torch.isfinite(t).all().to(self.layers[0].param.device)
                              for _, t in named])
        if not bool(finite.all()):
            what = named[int((~finite).nonzero()[0])][0]
            raise NonFiniteError(f"non-finite {what}", self.step_count)

    @torch.no_grad()
    def prune_to_sparsity(self, sparsity: float, *, scope: str | None = None) -> int:
        """Magnitude-prune to ``sparsity`` over the masked weights; returns the count removed.

        global: keep exactly K = round(N (1 - s)) largest |w| over all layers (per-layer floor
        ``min_layer_density`` if set); layerwise: every layer to round(n_l (1 - s)).
        """
        scope = scope or self.cfg.prune_scope
        self.require_finite()
        before = sum(self.nnz)
        if scope == "global":
            keep = round(self.total * (1.0 - sparsity))
            floor = None
            if self.cfg.min_layer_density > 0:
                floor = [math.ceil(self.cfg.min_layer_density * n) for n in self.sizes]
                if sum(floor) > keep:
                    raise ValueError(
                        f"sparsity.min_layer_density={self.cfg.min_layer_density}: the per-layer "
                        f"floors keep {sum(floor)} weights, more than the {keep} allowed at "
                        f"sparsity {sparsity:.4f}"
                    )
            new = global_magnitude(self._weights(), self.masks, keep, min_keep=floor)
        elif scope == "layerwise":
            keeps = [round(n * (1.0 - sparsity)) for n in self.sizes]
            new = layerwise_magnitude(self._weights(), self.masks, keeps)
        else:
            raise ValueError(f"sparsity.prune_scope={scope!r}: must be global or layerwise")
        self._set_masks([m & k for m, k in zip(self.masks, new, strict=True)])
        return before - sum(self.nnz)

    @torch.no_grad()
    def prune_fraction(
        self, ratio: float, *, scope: str = "global", structure: str = "unstructured"
    ) -> list[int]:
        """One-shot prune of ``ratio`` of the remaining weights (plasticity probes, SPEC §6).

        Returns the number removed per layer. ``structure='filter'`` removes whole output
        filters ranked by L1 norm and leaves the classifier (last layer) untouched.
        """
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio={ratio}: must be in [0, 1)")
        self.require_finite()
        before = list(self.nnz)
        if structure == "filter":
            skip = [i == len(self.layers) - 1 for i in range(len(self.layers))]
            new = filter_prune(self._weights(), self.masks, ratio, scope=scope, skip=skip)
        elif structure != "unstructured":
            raise ValueError(f"structure={structure!r}: must be unstructured or filter")
        elif scope == "global":
            new = global_magnitude(self._weights(), self.masks, round(sum(before) * (1 - ratio)))
        elif scope == "layerwise":
            keeps = [round(n * (1 - ratio)) for n in before]
            new = layerwise_magnitude(self._weights(), self.masks, keeps)
        else:
            raise ValueError(f"scope={scope!r}: must be global or layerwise")
        self._set_masks([m & k for m, k in zip(self.masks, new, strict=True)])
        return [b - a for b, a in zip(before, self.nnz, strict=True)]

    def _momentum_of(self, layer: MaskedLayer) -> torch.Tensor | None:
        if self.grad_momentum is None:
            return None
        return next(m for m, x in zip(self.grad_momentum, self.layers, strict=True) if x is layer)

    @torch.no_grad()
    def regrow(self, counts: list[int], mode: str | None = None) -> int:
        """Activate ``counts[l]`` inactive positions per layer with the highest growth score.

        New weights are 0 (inactive weights are exact zeros) with 0 optimizer state.
        """
        mode = mode or self.growth
        self.require_finite(growth=mode)
        new = []
        for layer, m, c in zip(self.layers, self.masks, counts, strict=True):
            if c <= 0:
                new.append(m)
                continue
            score = growth_scores(mode, layer.param, self.optimizer, self.generator,
                                  self._momentum_of(layer))
            score = torch.where(m, torch.full_like(score, -math.inf), score)
            new.append(m | topk_mask(score, int(c)))
        before = sum(self.nnz)
        self._set_masks(new)
        return sum(self.nnz) - before

    @torch.no_grad()
    def regenerate(self, ratio: float) -> int:
        """Zero-cost neuroregeneration (paper Eqs. 2-3): per layer remove ceil(r · nnz_l)
        smallest-|w| active weights, regrow as many by growth score among all inactive positions
        (just-removed ones included; one picked again keeps its value). Per-layer nnz unchanged.
        Returns the number of newly active positions that were not active before.
        """
        self.require_finite(growth=self.growth)
        new = []
        regrown = 0
        for layer, m, nnz in zip(self.layers, self.masks, self.nnz, strict=True):
            r = math.ceil(ratio * nnz)
            if r <= 0 or nnz == 0:
                new.append(m)
                continue
            w = layer.param.detach()
            keep = topk_mask(_active_scores(w, m), nnz - r)  # |w| where active, else -1
            score = growth_scores(self.growth, layer.param, self.optimizer, self.generator,
                                  self._momentum_of(layer))
            score = torch.where(keep, -math.inf, score)
            grown = topk_mask(score, r)
            new.append(keep | grown)
            regrown += count_true(grown & ~m)
        self._set_masks(new)
        return regrown

    # ------------------------------------------------------------------ metrics
    def _refresh_counts(self) -> None:
        self.nnz = [count_true(m) for m in self.masks]  # host sync only at events
        if self._dense_flops_ready():
            self._sparse_flops = self._compute_sparse_flops()
        self._warn_collapsed()

    def collapsed_layers(self) -> list[str]:
        """Layers at or below ``sparsity.collapse_density`` (0: layers with no active weight)."""
        limit = self.cfg.collapse_density
        return [
            layer.name
            for layer, nnz, n in zip(self.layers, self.nnz, self.sizes, strict=True)
            if nnz == 0 or nnz / n <= limit
        ]

    def _warn_collapsed(self) -> None:
        # Once per layer per engine: a collapsed layer is reported when it first collapses
        # (or on resume), not at every later event.
        for name in self.collapsed_layers():
            if name in self._collapse_warned:
                continue
            self._collapse_warned.add(name)
            i = next(i for i, layer in enumerate(self.layers) if layer.name == name)
            warnings.warn(
                f"granet: layer {name!r} collapsed to density {self.nnz[i] / self.sizes[i]:.6f} "
                f"({self.nnz[i]} of {self.sizes[i]} weights) at step {self.step_count}; "
                f"set sparsity.min_layer_density (a per-layer floor for global pruning) or keep "
                f"it dense with sparsity.dense_layers",
                LayerCollapseWarning,
                stacklevel=2,
            )

    def _dense_flops_ready(self) -> bool:
        return getattr(self, "_dense_flops", None) is not None

    def _init_flops(self, example_input: Any) -> None:
        try:
            count = count_forward_flops(self.model, example_input, prefer=self.params)
        except Exception as exc:
            shape = tuple(getattr(example_input, "shape", ()))
            raise ValueError(
                f"FLOPs count: the model failed on an input of shape {shape} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                f"pass example_input= a real batch of the data set"
            ) from exc
        self.flop_count = count
        for info in self.param_infos:
            if info.kind != "matmul" and not info.prunable and count.by_param.get(id(info.param)):
                if "sparsity.exclude" in info.reason:
                    continue
                info.reason = "matmul/conv operand of an unknown layer type: not masked"
                warnings.warn(
                    f"granet: parameter {info.name!r} ({info.role}) is a matmul/conv operand but "
                    f"no rule masks it; add it to sparsity.include to sparsify it, or to "
                    f"sparsity.exclude to keep it dense knowingly",
                    UnmaskedWeightWarning,
                    stacklevel=3,
                )
        masked = {id(p) for p in self.params}
        self._dense_flops = [count.by_param.get(id(p), 0.0) for p in self.params]
        self._other_flops = count.unattributed + sum(
            v for k, v in count.by_param.items() if k not in masked
        )
        self._sparse_flops = self._compute_sparse_flops()

    def _compute_sparse_flops(self) -> float:
        assert self._dense_flops is not None
        return self._other_flops + sum(
            f * nnz / n for f, nnz, n in zip(self._dense_flops, self.nnz, self.sizes, strict=True)
        )

    @property
    def dense_flops(self) -> float:
        """Dense forward multiply-accumulates per sample (every matmul/conv/attention op)."""
        if self._dense_flops is None:
            raise RuntimeError("FLOPs need example_input= (or input_shape=) at construction")
        return float(self._other_flops + sum(self._dense_flops))

    @property
    def inference_flops(self) -> float:
        """Forward multiply-accumulates per sample of the sparse model."""
        if self._dense_flops is None:
            raise RuntimeError("FLOPs need example_input= (or input_shape=) at construction")
        return float(self._sparse_flops)

    def density(self) -> float:
        """Density over the masked weights."""
        return sum(self.nnz) / self.total

    def density_all(self) -> float:
        """Density over all parameters (biases, BN and dense layers count as dense)."""
        n_all = sum(p.numel() for p in self.model.parameters())
        return (n_all - self.total + sum(self.nnz)) / n_all

    def layer_densities(self) -> dict[str, float]:
        return {
            layer.name: nnz / n
            for layer, nnz, n in zip(self.layers, self.nnz, self.sizes, strict=True)
        }

    def itop_rate(self) -> float:
        """In-time over-parameterisation: share of masked weights ever active."""
        return sum(int(e.sum()) for e in self.ever_active) / self.total

    def units_without_input(self) -> float:
        """Share of output units (filters / neurons) with no active incoming weight."""
        dead = total = 0
        for m in self.masks:
            rows = m.flatten(1).any(1) if m.dim() > 1 else m
            dead += int((~rows).sum())
            total += rows.numel()
        return dead / total

    def sparse_state_bytes(self) -> int:
        """Bytes the engine keeps beside the model: masks, ever-active masks, on CPU the masks
        cached in the weight dtype for ``apply_masks``, and the dense-gradient momentum kept for
        momentum growth."""
        held = self.masks + self.ever_active + list(self.grad_momentum or [])
        held += [c for c in getattr(self, "_mult_cache", []) if not any(c is m for m in held)]
        return sum(m.numel() * m.element_size() for m in held)

    def metrics(self) -> dict[str, float]:
        """Scalar metrics for logging (SPEC §7)."""
        out = {
            "density": self.density(),
            "density_all": self.density_all(),
            "sparsity": 1.0 - self.density(),
            "regen_rate": self.regen_rate(),
            "itop_rate": self.itop_rate(),
            "units_without_input": self.units_without_input(),
            "pruned_total": float(self.pruned_total),
            "regrown_total": float(self.regrown_total),
            "collapsed_layers": float(len(self.collapsed_layers())),
        }
        if self._dense_flops is not None:
            out["inference_flops"] = self.inference_flops
            out["inference_flops_ratio"] = self.inference_flops / self.dense_flops
            out["train_flops"] = self.train_flops
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "method": self.cfg.method,
            "layer_names": [layer.name for layer in self.layers],
            "param_names": [layer.param_name for layer in self.layers],
            "masks": [m.clone() for m in self.masks],
            "ever_active": [e.clone() for e in self.ever_active],
            "step": self.step_count,
            "generator": self.generator.get_state(),
            "train_flops": self.train_flops,
            "pruned_total": self.pruned_total,
            "regrown_total": self.regrown_total,
            "masking_active": self.masking_active,
            "grad_momentum": (
                [m.clone() for m in self.grad_momentum] if self.grad_momentum is not None else []
            ),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = [layer.name for layer in self.layers]
        if list(state["layer_names"]) != names:
            raise ValueError(
                f"engine state is for layers {state['layer_names'][:3]}..., "
                f"model has {names[:3]}..."
            )
        # Copies: the engine updates its masks in place (ever_active |= mask), and must never
        # write into the caller's state dict.
        self.masks = [
            m.to(layer.param.device, dtype=torch.bool, copy=True)
            for m, layer in zip(state["masks"], self.layers, strict=True)
        ]
        self.ever_active = [
            e.to(layer.param.device, dtype=torch.bool, copy=True)
            for e, layer in zip(state["ever_active"], self.layers, strict=True)
        ]
        self.step_count = int(state["step"])
        self.generator.set_state(state["generator"])
        self.train_flops = float(state["train_flops"])
        self.pruned_total = int(state["pruned_total"])
        self.regrown_total = int(state["regrown_total"])
        self.masking_active = bool(state["masking_active"])
        if self.grad_momentum is not None and state.get("grad_momentum"):
            self.grad_momentum = [
                m.to(layer.param.device, copy=True)
                for m, layer in zip(state["grad_momentum"], self.layers, strict=True)
            ]
        self._refresh_counts()
        self.apply_masks()
