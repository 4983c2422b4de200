"""The default's modes for plain SGD ("trust") and Adam & co. ("level") against float64
references of their formulas, with learning-rate schedules, resume and older checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_adaptive import _batch, _model  # the same model and batches (spikes at 40x)

import gradguard as gg


def _run(model, opt, guard, steps, sched=None, start=0):
    out = []
    for i in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        x, y = _batch(i)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        lr = max(g["lr"] for g in opt.param_groups)
        before = [p.detach().clone() for p in model.parameters()]
        st = guard.step(opt, loss=loss.detach())
        moved = math.sqrt(sum(float((p.detach() - b).double().pow(2).sum())
                              for p, b in zip(model.parameters(), before)))
        out.append((float(st.total_norm), float(st.threshold), lr, moved))
        if sched is not None:
            sched.step()
    return out


def test_trust_mode_bounds_every_step_and_follows_the_schedule():
    model = _model()
    theta0 = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))  # warmup
    guard = gg.Guard(model)
    rows = _run(model, opt, guard, 30, sched)
    assert guard.clipper.mode == "trust"
    # the trust region alone (no spike cap while the parameter norm is known)
    ref = [0.03 * theta0 / r[2] for r in rows]
    for t, ((_, thr, _lr, moved), want) in enumerate(zip(rows, ref)):
        assert thr == pytest.approx(want, rel=1e-5), t
        # the promise: no step moves the parameters by more than 3 % of their initial norm
        assert moved <= 0.03 * theta0 * (1 + 1e-4), (t, moved, 0.03 * theta0)
    assert any(r[3] > 0.02 * theta0 for r in rows)  # the bound is reached, not just respected


def test_trust_mode_with_use_last_gradient_keeps_the_old_controller():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    c = gg.OvershootClip(use_last_gradient=True)
    c.bind_optimizer(opt)
    assert c.mode == "sgd"


def test_level_mode_matches_its_formula_with_adam():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = gg.Guard(model)
    rows = _run(model, opt, guard, 40)
    assert guard.clipper.mode == "level"
    level, n = 0.0, 0
    for t, (g, thr, _, _) in enumerate(rows):
        want = 2.0 * math.exp(level) if n else math.inf
        assert thr == pytest.approx(want, rel=1e-5), t
        c = math.log(g)  # raw norms, not clipped ones
        level = c if n == 0 else 0.95 * level + 0.05 * c
        n += 1
    clipped = [g > thr for g, thr, _, _ in rows]
    assert any(clipped[7::11])  # the batches at 40x are held to the level


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.SGD(p, lr=0.5),
                                      lambda p: torch.optim.Adam(p, lr=1e-2)],
                         ids=["trust", "level"])
def test_resume_matches_an_uninterrupted_run(make_opt):
    m1 = _model()
    o1 = make_opt(m1.parameters())
    g1 = gg.Guard(m1)
    full = _run(m1, o1, g1, 24)

    m2 = _model()
    o2 = make_opt(m2.parameters())
    g2 = gg.Guard(m2)
    first = _run(m2, o2, g2, 12)
    ck = copy.deepcopy({"m": m2.state_dict(), "o": o2.state_dict(), "g": g2.state_dict()})
    m3 = _model(seed=5)
    m3.load_state_dict(ck["m"])
    o3 = make_opt(m3.parameters())
    o3.load_state_dict(ck["o"])
    g3 = gg.Guard(m3)
    g3.load_state_dict(ck["g"])
    rest = _run(m3, o3, g3, 12, start=12)
    assert [r[:2] for r in first + rest] == [r[:2] for r in full]  # bit-exact thresholds
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m3.parameters()))


def test_a_state_saved_before_the_trust_mode_loads():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    guard = gg.Guard(model)
    _run(model, opt, guard, 5)
    sd = guard.clipper.state_dict()
    del sd["param_norm"]  # what an older gradguard saved
    c = gg.OvershootClip()
    c.load_state_dict(sd)
    c.bind_optimizer(opt)
    # no parameter norm known: the trust region is off, the spike cap still acts
    assert math.isfinite(float(c.threshold(torch.zeros(()))))


def test_bad_trust_and_level_factor_are_refused_by_name():
    with pytest.raises(ValueError, match="trust"):
        gg.OvershootClip(trust=0.0)
    with pytest.raises(ValueError, match="level_factor"):
        gg.OvershootClip(level_factor=0.5)
