"""Issue 15's adaptive-rule numerics on the torch façades, each against a float64 reference:
AutoClip's exact early history and honest bound, ZClip's max_norm as in the paper, and
OvershootClip's coefficient() agreeing with clip_(apply=False)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.norms import compute_norms


def _drive(clipper, norms, accepted=None):
    """Feed global norms (one-element gradients); per step (threshold, coef, clipped)."""
    p = torch.nn.Parameter(torch.zeros(1))
    out = []
    accepted = accepted if accepted is not None else [True] * len(norms)
    for g, ok in zip(norms, accepted):
        p.grad = torch.tensor([g], dtype=torch.float32)
        n = compute_norms([p.grad])
        stats = clipper.clip_([p], [p.grad], n, apply=False)
        clipper.observe(n, torch.tensor(bool(ok)) & ~n.nonfinite)
        out.append((float(stats.threshold), float(stats.clip_coef), bool(stats.clipped)))
    return out


def test_autoclip_tracks_np_percentile_over_2000_lognormal_steps():
    """Exact (float32) for the first 1024 accepted norms, then within the documented factor
    r = (hi/lo)^(1/bins) of np.percentile over the same history plus the current norm."""
    norms = np.float32(np.random.default_rng(3).lognormal(0.0, 1.0, 2000))
    for p in (10.0, 90.0):
        a = gg.AutoClip(p)
        r = math.exp(math.log(1e24) / 8192)
        got = _drive(a, [float(g) for g in norms])
        for i, (thr, _, _) in enumerate(got):
            q = float(np.percentile(norms[:i + 1].astype(np.float64), p))
            if i < 1024:
                assert thr == pytest.approx(q, rel=1e-6), (p, i)
            else:
                assert q / r * (1 - 1e-6) <= thr <= q * r * (1 + 1e-6), (p, i, thr, q)
        assert int(a.count()) == 2000


def test_autoclip_two_norms_give_the_exact_percentile():
    got = _drive(gg.AutoClip(10.0), [1.0, 10.0])
    assert got[1][0] == pytest.approx(1.9, rel=1e-6)  # np.percentile([1, 10], 10)


@pytest.mark.parametrize("window", [None, 8])
def test_autoclip_never_clips_the_first_step(window):
    rng = np.random.default_rng(11)
    for g in rng.lognormal(0.0, 3.0, 200):
        (thr, coef, clipped), = _drive(gg.AutoClip(10.0, window=window), [float(g)])
        assert coef == 1.0 and not clipped and thr == float(np.float32(g))


def test_autoclip_percentile_100_never_clips_past_the_exact_buffer():
    """Past the exact buffer the histogram answers; its maximum is the actual largest norm."""
    a = gg.AutoClip(100.0)
    norms = [float(x) for x in np.random.default_rng(5).lognormal(0.0, 1.0, 1100)]
    got = _drive(a, norms)
    assert not any(c for _, _, c in got)  # p = 100 never clips, in both regimes


@pytest.mark.parametrize("window", [None, 16])
def test_autoclip_percentile_100_never_clips(window):
    norms = [float(x) for x in np.random.default_rng(2).lognormal(0.0, 2.0, 500)]
    got = _drive(gg.AutoClip(100.0, window=window), norms)
    assert all(coef == 1.0 and not clipped for _, coef, clipped in got)


def test_autoclip_loads_a_state_saved_before_the_exact_buffer():
    """An old checkpoint (histogram counts only) loads; the histogram answers from then on,
    bin edges standing in for the unknown per-bin extremes."""
    a = gg.AutoClip(50.0)
    _drive(a, [1.0, 2.0, 3.0, 4.0])
    sd = a.state_dict()
    old = {"percentile": sd["percentile"], "window": None, "store": dict(sd["store"])}
    b = gg.AutoClip(50.0)
    b.load_state_dict(old)
    assert int(b.count()) == 4
    r = math.exp(math.log(1e24) / 8192)
    thr = float(b.threshold(torch.zeros(())))
    assert 2.5 / r <= thr <= 2.5 * r  # the median of 1..4, within the bound


def test_zclip_max_norm_warmup_statistics_are_raw():
    """max_norm=0.5, warmup_steps=3, norms [1.0, 1.1, 0.9]: mean 1.0 and std 0.0816 (the
    raw norms, as the paper's code), not mean 0.5 and std 0 (the capped ones)."""
    z = gg.ZClip(warmup_steps=3, max_norm=0.5)
    got = _drive(z, [1.0, 1.1, 0.9])
    assert [t for t, _, _ in got] == [0.5, 0.5, 0.5]
    raw = np.float32([1.0, 1.1, 0.9]).astype(np.float64)
    assert float(z.mean) == pytest.approx(raw.mean(), rel=1e-6)
    assert float(z.std) == pytest.approx(raw.std(), rel=1e-5)
    # then norms the paper's rule sees as normal are fed raw; a spike is fed its adaptive value
    mu, var = raw.mean(), raw.var()
    for g in (1.05, 0.95, 3.0):
        g32 = float(np.float32(g))
        sigma = math.sqrt(var)
        zs = (g32 - mu) / (sigma + 1e-6)
        x = mu + 6.25 * sigma / zs if zs > 2.5 else g32
        (thr, _, clipped), = _drive(z, [g])
        assert thr == 0.5 and clipped
        mu = 0.97 * mu + 0.03 * x
        var = 0.97 * var + 0.03 * (x - mu) ** 2
        assert float(z.mean) == pytest.approx(mu, rel=1e-5)
        assert float(z.std) ** 2 == pytest.approx(var, rel=1e-4)


def test_overshoot_coefficient_agrees_with_clip_before_the_first_step():
    """The threshold of a step depends on the committed state only: coefficient() and
    clip_(apply=False) give the same factor, also before the first accepted step (S_0 from
    the parameter norm is in force from the start)."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    c = gg.OvershootClip()
    for step in range(4):
        p.grad = torch.full((4,), 10.0 * (-1) ** step)
        c.bind_optimizer(opt)
        n = compute_norms([p.grad])
        coef = c.coefficient(n)
        stats = c.clip_([p], [p.grad], n, apply=False)
        assert torch.equal(coef, stats.clip_coef), step
        if step == 0:
            s0 = 1e-2 * 2.0 / 0.1  # init_step * ||theta|| / lr
            assert float(stats.threshold) == pytest.approx(s0, rel=1e-6)
            assert float(coef) == pytest.approx(s0 / (20.0 + 1e-6), rel=1e-6)
        c.observe(n, torch.tensor(True))
        opt.step()


def test_overshoot_direction_is_measured_before_the_gradients_are_scaled():
    """Applying the clip in place (the non-fused Guard) or not (the fused fold) gives the same
    next state bit for bit: the cosine comes from the gradients as clip_ found them."""
    def run(apply):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5000))
        opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
        c = gg.OvershootClip()
        out = []
        for step in range(40):
            g = torch.randn(5000, generator=torch.Generator().manual_seed(step))
            p.grad = g * 7.3 + 0.3 * p.detach()  # (measured on the scaled gradients, 4 of
            # these 40 S values differ in their last bits)
            c.bind_optimizer(opt)
            n = compute_norms([p.grad])
            stats = c.clip_([p], [p.grad], n, apply=apply)
            c.observe(n, torch.tensor(True))
            out.append(c.state_dict()["step_limit"].clone())
            if not apply:
                p.grad.mul_(stats.clip_coef)
            opt.step()
        return out

    a, b = run(True), run(False)
    assert all(torch.equal(x, y) for x, y in zip(a, b)), (a, b)
    assert len({float(x) for x in a}) > 2  # S moved
