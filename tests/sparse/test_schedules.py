"""Cubic gradual sparsity (paper Eq. 1), the reference's floored grid, and r_t's decays."""

from __future__ import annotations

import math

import pytest

from granet.sparse import PruneWindow, gmp_sparsity, is_update_step, regen_rate

from .helpers import build, nnz_of


def eq1(t: int, t0: int, dt: int, n: int, s_i: float, s_f: float) -> float:
    return s_f + (s_i - s_f) * (1.0 - (t - t0) / (n * dt)) ** 3


def events(window: PruneWindow, s_i: float, s_f: float, compat: bool = False) -> dict[int, float]:
    out = {}
    for t in range(1, window.end + 5 * window.interval + 1):  # steps count from 1
        s = gmp_sparsity(t, s_i, s_f, window, compat=compat)
        if s is not None:
            out[t] = s
    return out


WINDOWS = [(0, 95, 10), (15, 100, 10), (7, 50, 1), (0, 30, 30), (3, 1000, 7)]


@pytest.mark.parametrize(("t0", "tf", "dt"), WINDOWS)
@pytest.mark.parametrize(("s_i", "s_f"), [(0.0, 0.9), (0.5, 0.98), (0.0, 0.02)])
def test_exact_schedule_is_eq1_on_t0_plus_j_dt(t0, tf, dt, s_i, s_f):
    w = PruneWindow(t0, tf, dt)
    n = (tf - t0) // dt
    assert w.n == n and w.last_event == t0 + n * dt <= tf
    got = events(w, s_i, s_f)
    # Events exactly at t0 + j*dt, j = 1..n (j = 0 is the starting sparsity s_i: no event).
    assert sorted(got) == [t0 + j * dt for j in range(1, n + 1)]
    for t, s in got.items():
        assert s == pytest.approx(eq1(t, t0, dt, n, s_i, s_f), abs=1e-12)
    assert got[t0 + n * dt] == s_f  # exactly, not approximately
    values = [got[t] for t in sorted(got)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False))
    # Nothing after t_f, however long the run.
    assert all(gmp_sparsity(t, s_i, s_f, w) is None for t in range(w.last_event + 1, tf + 200))


def reference_floored(t: int, t0: int, tf: int, dt: int, s_i: float, s_f: float) -> float | None:
    """GraNet's ``pruning(step)``: called when step >= t0 and step % dt == 0."""
    if t < t0 or t % dt != 0:
        return None
    curr, ini, final = int(t / dt), int(t0 / dt), int(tf / dt)
    total = final - ini
    if not ini <= curr <= final - 1:
        return None
    decay = (1 - (curr - ini) / total) ** 3
    d_i, d_f = 1 - s_i, 1 - s_f
    return 1.0 - (d_f + (d_i - d_f) * decay)


@pytest.mark.parametrize(
    ("t0", "tf", "dt"), [(0, 95, 10), (15, 100, 10), (25, 95, 10), (0, 27000, 1000)]
)
@pytest.mark.parametrize(("s_i", "s_f"), [(0.0, 0.9), (0.5, 0.98)])
def test_compat_reproduces_the_reference_floored_grid(t0, tf, dt, s_i, s_f):
    w = PruneWindow(t0, tf, dt)
    got = events(w, s_i, s_f, compat=True)
    ref = {}
    for t in range(1, tf + 5 * dt + 1):
        s = reference_floored(t, t0, tf, dt, s_i, s_f)
        if s is not None:
            ref[t] = s
    assert sorted(got) == sorted(ref)
    for t in ref:
        assert got[t] == pytest.approx(ref[t], abs=1e-12)
    k0, k1 = t0 // dt, tf // dt
    n = k1 - k0
    for t, s in got.items():
        k = t // dt
        assert t % dt == 0 and k0 <= k <= k1 - 1 and t >= t0
        assert s == pytest.approx(s_f + (s_i - s_f) * (1 - (k - k0) / n) ** 3, abs=1e-12)
    last = max(got)
    assert last == (k1 - 1) * dt
    assert got[last] != s_f
    assert 0 < s_f - got[last] <= (s_f - s_i) / n**3 + 1e-15
    assert got[last] == pytest.approx(s_f + (s_i - s_f) / n**3, abs=1e-15)


def test_compat_first_event_is_already_at_progress_one_over_n():
    w = PruneWindow(0, 100, 10)
    got = events(w, 0.0, 0.9, compat=True)
    assert min(got) == 10
    assert got[10] == pytest.approx(0.9 * (1 - (1 - 1 / 10) ** 3), abs=1e-12)
    # The exact schedule reaches s_f at t = 100; compat never does.
    assert events(w, 0.0, 0.9)[100] == 0.9 and 100 not in got


def test_prune_window_validation():
    with pytest.raises(ValueError, match="interval"):
        PruneWindow(0, 10, 0)
    with pytest.raises(ValueError, match="after start"):
        PruneWindow(10, 10, 1)
    w = PruneWindow(5, 5 + 4 * 6 + 5, 6)
    assert (w.n, w.last_event) == (4, 29)


def test_is_update_step_grid():
    got = [t for t in range(0, 60) if is_update_step(t, 7, 5, 40)]
    assert got == [12, 17, 22, 27, 32, 37]
    got = [t for t in range(0, 60) if is_update_step(t, 0, 10, None)]
    assert got == [10, 20, 30, 40, 50]


@pytest.mark.parametrize("total", [1000, 37])
def test_regen_rate_decays(total):
    r0, rmin = 0.5, 0.005
    for t in [0, 1, total // 4, total // 2, total - 1, total]:
        frac = t / total
        cos = rmin + (r0 - rmin) * (1 + math.cos(math.pi * frac)) / 2
        assert regen_rate(t, total, r0, rmin, "cosine") == pytest.approx(cos, abs=1e-15)
        lin = r0 - (r0 - rmin) * frac
        assert regen_rate(t, total, r0, rmin, "linear") == pytest.approx(lin, abs=1e-15)
        assert regen_rate(t, total, r0, rmin, "constant") == r0
    assert regen_rate(0, total, r0, rmin, "cosine") == r0
    assert regen_rate(total, total, r0, rmin, "cosine") == rmin
    assert regen_rate(total, total, r0, rmin, "linear") == pytest.approx(rmin, abs=1e-15)
    # Past T the rate stays at r_min; at T/2 the cosine is half way.
    assert regen_rate(total + 50, total, r0, rmin, "cosine") == rmin
    if total % 2 == 0:
        assert regen_rate(total // 2, total, r0, rmin) == pytest.approx((r0 + rmin) / 2)
    with pytest.raises(ValueError, match="regen_decay"):
        regen_rate(1, total, r0, rmin, "exp")


def test_engine_runs_eq1_and_hits_exact_counts():
    # 6 steps/epoch, prune epochs 1..4 -> t0 = 6, tf = 24, dt = 4 -> n = 4, events 10, 14, 18, 22.
    model, opt, eng = build(
        "gmp",
        steps_per_epoch=6,
        epochs=6,
        final_density=0.1,
        update_interval=4,
        prune_start_epoch=1,
        prune_end_epoch=4,
    )
    seen = {}
    for _ in range(36):
        ev = eng.step()  # no training needed: pruning reads the current weights
        if ev is not None:
            seen[eng.step_count] = (ev["target_sparsity"], sum(nnz_of(eng)))
    assert sorted(seen) == [10, 14, 18, 22]
    for t, (s, nnz) in seen.items():
        assert s == pytest.approx(eq1(t, 6, 4, 4, 0.0, 0.9), abs=1e-12)
        assert nnz == round(eng.total * (1 - s))
    assert seen[22][0] == 0.9 and seen[22][1] == round(eng.total * 0.1)


def test_engine_compat_prunes_and_regenerates_on_the_same_floored_grid():
    # t0 = 15 is not a multiple of dt = 10: the reference prunes and regrows at 20, 30, ...
    model, opt, eng = build(
        "granet",
        steps_per_epoch=5,
        epochs=20,
        final_density=0.2,
        update_interval=10,
        prune_start_epoch=3,
        prune_end_epoch=10,
        compat_floored_schedule=True,
    )
    prune_steps, regen_steps = [], []
    for _ in range(100):
        ev = eng.step()
        if ev is not None:
            if ev["target_sparsity"] is not None:
                prune_steps.append(eng.step_count)
            if "regen_rate" in ev:
                regen_steps.append(eng.step_count)
    assert prune_steps == [20, 30, 40]
    assert regen_steps == list(range(20, 101, 10))
