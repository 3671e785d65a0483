"""Pure schedule functions: cubic gradual sparsity (GMP, paper Eq. 1) and the regeneration rate.

All steps are optimizer steps counted from 1 (the counter is advanced after each
``optimizer.step``), so an event at step t happens right after the t-th optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["PruneWindow", "gmp_sparsity", "regen_rate", "is_update_step"]


@dataclass(frozen=True)
class PruneWindow:
    """The gradual-pruning window in optimizer steps.

    ``start`` is t_0 and ``end`` the configured t_f; ``interval`` is Δt. The number of prune
    intervals is n = floor((end - start) / interval), so the last event is at t_0 + nΔt <= t_f and
    it sets s_f exactly (the window end is rounded down to a whole number of intervals).
    """

    start: int
    end: int
    interval: int

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"interval={self.interval}: must be >= 1 step")
        if self.end <= self.start:
            raise ValueError(f"prune window end={self.end} must be after start={self.start}")

    @property
    def n(self) -> int:
        return (self.end - self.start) // self.interval

    @property
    def last_event(self) -> int:
        """Step of the last gradual-prune event (t_0 + nΔt); s_f holds from here on."""
        return self.start + self.n * self.interval


def gmp_sparsity(
    step: int, s_i: float, s_f: float, window: PruneWindow, *, compat: bool = False
) -> float | None:
    """Target sparsity if ``step`` is a gradual-prune event, else ``None``.

    Exact mode (default): events at t = t_0 + jΔt for j = 1..n with
    s_t = s_f + (s_i - s_f)(1 - j/n)^3, so s_f is set exactly at j = n.
    (j = 0 is s_i, the starting sparsity, so it is no event.)

    ``compat=True`` reproduces the reference code's floored grid: k = floor(t/Δt),
    k_0 = floor(t_0/Δt), k_1 = floor(t_f/Δt), n = k_1 - k_0, events at multiples of Δt with
    t >= t_0 and k_0 <= k <= k_1 - 1 and progress (k - k_0)/n: s_f is approached, never set.
    """
    dt = window.interval
    if compat:
        if step % dt != 0 or step < window.start:
            return None
        k, k0, k1 = step // dt, window.start // dt, window.end // dt
        n = k1 - k0
        if n <= 0 or not k0 <= k <= k1 - 1:
            return None
        return s_f + (s_i - s_f) * (1.0 - (k - k0) / n) ** 3
    n = window.n
    if n < 1:
        return None
    offset = step - window.start
    if offset <= 0 or offset % dt != 0 or offset > n * dt:
        return None
    j = offset // dt
    if j == n:
        return s_f  # exactly, with no floating-point residue
    return s_f + (s_i - s_f) * (1.0 - j / n) ** 3


def is_update_step(step: int, start: int, interval: int, end: int | None) -> bool:
    """True if ``step`` is a mask-update event: a multiple of Δt after ``start``, up to ``end``."""
    offset = step - start
    if offset <= 0 or offset % interval != 0:
        return False
    return end is None or step <= end


def regen_rate(step: int, total: int, r0: float, r_min: float, decay: str = "cosine") -> float:
    """Regeneration ratio r_t after ``step`` of ``total`` optimizer steps.

    cosine: r_min + (r_0 - r_min)(1 + cos(π t / T)) / 2 (the reference code's CosineDecay, stepped
    per optimizer step over the whole run); linear: r_0 - (r_0 - r_min) t / T; constant: r_0.
    """
    frac = min(max(step / max(total, 1), 0.0), 1.0)
    if decay == "cosine":
        return r_min + (r0 - r_min) * (1.0 + math.cos(math.pi * frac)) / 2.0
    if decay == "linear":
        return r0 - (r0 - r_min) * frac
    if decay == "constant":
        return r0
    raise ValueError(f"sparsity.regen_decay={decay!r}: must be one of cosine, linear, constant")
