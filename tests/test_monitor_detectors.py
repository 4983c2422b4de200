"""Detectors against plain float64 references; actions through the Guard."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradguard as gg
from gradguard.monitor import (
    AnomalyError,
    Growth,
    LossSpike,
    Monitor,
    NonFinite,
    Spike,
    Vanishing,
    load_run,
)


def ref_ema_z(xs, accepts, *, log, z_thr, alpha, warmup, floor, hard=None, rel_floor=None):
    """Plain-Python float64 reference of Spike / LossSpike (module docstring's math)."""
    m = v = 0.0
    n = 0
    mx = 0.0
    fired = []
    for x, acc in zip(xs, accepts):
        finite = math.isfinite(x)
        y = math.log(max(x, 1e-30)) if (log and finite) else x
        if rel_floor is not None:
            scale = max(math.sqrt(v), rel_floor * abs(m), 1e-12)
        else:
            scale = max(math.sqrt(v), floor)
        f = finite and n >= warmup and (y - m) / scale > z_thr
        if hard is not None:
            f = f or (finite and n >= 1 and x > hard * mx)
        fired.append(f)
        if acc and not f and finite:
            a = min(alpha, n / (n + 1))
            d = y - m
            m = m + (1 - a) * d
            v = a * (v + (1 - a) * d * d)
            mx = max(mx, x)
            n += 1
    return fired, m, v, n


KINDS = ["torch", "numpy"]  # tensors (the device path) or numpy scalars (the Monitor's CPU path)


def val(x, kind, dtype=np.float32):
    """``x`` as a detector input of ``kind``: a tensor, or a numpy scalar / array."""
    if kind == "torch":
        return torch.tensor(x) if not isinstance(x, float) else torch.tensor(x, dtype=torch.float32)
    a = np.asarray(x, dtype=dtype)
    return a[()] if a.ndim == 0 else a


def run_step_detector(det, xs, accepts, as_loss=False, kind="torch"):
    out = []
    with np.errstate(all="ignore"):
        for x, acc in zip(xs, accepts):
            t = val(float(x), kind)
            norm, loss = (val(1.0, kind), t) if as_loss else (t, None)
            fired, value, base = det.evaluate(norm, loss)
            det.update(norm, loss, val(acc, kind, bool), fired)
            out.append(bool(fired))
    return out


norm_series = st.lists(st.one_of(st.floats(1e-3, 1e3), st.sampled_from([1e5, math.inf, math.nan])),
                       min_size=1, max_size=80)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=60, deadline=None)
@given(norm_series, st.data())
def test_spike_matches_reference(kind, xs, data):
    accepts = data.draw(st.lists(st.booleans(), min_size=len(xs), max_size=len(xs)))
    det = Spike(z_threshold=3.0, alpha=0.9, warmup=5, min_std=0.05)
    got = run_step_detector(det, xs, accepts, kind=kind)
    xs32 = [float(np.float32(x)) for x in xs]
    ref, m, v, n = ref_ema_z(xs32, accepts, log=True, z_thr=3.0, alpha=0.9, warmup=5, floor=0.05, hard=10.0)
    assert got == ref
    assert int(det.count) == n
    assert float(det.mean) == pytest.approx(m, abs=1e-4)
    assert float(det.var) == pytest.approx(v, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=1, max_size=60), st.data())
def test_loss_spike_matches_reference(kind, xs, data):
    accepts = data.draw(st.lists(st.booleans(), min_size=len(xs), max_size=len(xs)))
    det = LossSpike(z_threshold=4.0, alpha=0.95, warmup=4, rel_floor=0.01)
    got = run_step_detector(det, xs, accepts, as_loss=True, kind=kind)
    xs32 = [float(np.float32(x)) for x in xs]
    ref, *_ = ref_ema_z(xs32, accepts, log=False, z_thr=4.0, alpha=0.95, warmup=4, floor=0,
                        rel_floor=0.01)
    assert got == ref


@pytest.mark.parametrize("kind", KINDS)
def test_spike_hard_guard_and_baseline_exclusion(kind):
    det = Spike(z_threshold=6.0, warmup=100)  # z rule never arms: only the 10x guard
    xs = [1.0, 2.0, 1.5, 25.0, 1.0, 19.0, 200.0]
    got = run_step_detector(det, xs, [True] * len(xs), kind=kind)
    assert got == [False, False, False, True, False, False, True]
    assert float(det.max) == 19.0  # the flagged 25 and 200 never entered the baseline


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None)
@given(st.floats(-0.2, 0.2), st.floats(0.0, 0.05), st.integers(0, 2**16))
def test_growth_slope_matches_polyfit(kind, rate, noise, seed):
    W = 12
    rng = np.random.default_rng(seed)
    ys = np.exp(rate * np.arange(30) + noise * rng.standard_normal(30)).astype(np.float32)
    det = Growth(window=W, factor=1.5, min_r2=0.5)
    fired = []
    values = []
    for t, x in enumerate(ys):
        xin = val(float(x), kind)
        f, v, base = det.evaluate(xin, None)
        det.update(xin, None, val(True, kind, bool), f)
        fired.append(bool(f))
        values.append(float(v))
        if t >= W - 1:
            win = np.log(ys[t - W + 1: t + 1].astype(np.float64))
            slope = np.polyfit(np.arange(W), win, 1)[0]
            assert values[-1] == pytest.approx(math.exp(slope * (W - 1)), rel=1e-3)
            assert float(base) == pytest.approx(math.exp(win.mean()), rel=1e-4)
    # reference rising edge
    cond = []
    for t in range(len(ys)):
        if t < W - 1:
            cond.append(False)
            continue
        win = np.log(ys[t - W + 1: t + 1].astype(np.float64))
        j = np.arange(W) - (W - 1) / 2
        yc = win - win.mean()
        r2 = (j @ yc) ** 2 / ((j @ j) * (yc @ yc)) if (yc @ yc) > 0 else 0.0
        g = math.exp((j @ yc) / (j @ j) * (W - 1))
        cond.append(g >= 1.5 and r2 >= 0.5)
    ref = [c and not (t > 0 and cond[t - 1]) for t, c in enumerate(cond)]
    # float32 device math: a step may differ only where the fit sits on the threshold
    for t in [t for t in range(len(ys)) if fired[t] != ref[t]]:
        assert abs(values[t] - 1.5) < 2e-3 * 1.5 or abs(values[t - 1] - 1.5) < 2e-3 * 1.5


@pytest.mark.parametrize("kind", KINDS)
def test_vanishing_against_own_baseline(kind):
    det = Vanishing(factor=0.01, baseline_steps=5, patience=3)
    acc = val(True, kind, bool)
    # layer 0 is naturally 100x smaller than layer 1: no event for that alone
    seq = [[1e-3, 1e-1]] * 8 + [[1e-6, 1e-1]] * 5 + [[1e-3, 1e-1]] * 2
    fired = []
    for row in seq:
        f, v, b, ratios = det.evaluate_layers(val(row, kind), acc)
        fired.append(bool(f))
    assert fired.index(True) == 8 + 2  # third consecutive low step
    assert sum(fired) == 1
    assert float(det.log_sum[0] / det.count[0]) == pytest.approx(math.log(1e-3), rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_detector(kind):
    det = NonFinite()
    for norm, loss, want in [(1.0, 2.0, False), (math.inf, 2.0, True), (1.0, math.nan, True),
                             (math.nan, None, True), (1.0, None, False)]:
        f, v, b = det.evaluate(val(norm, kind), None if loss is None else val(loss, kind))
        assert bool(f) is want
    with pytest.raises(ValueError):
        Vanishing(action="skip")
    with pytest.raises(ValueError):
        Spike(action="callback")
    with pytest.raises(ValueError):
        Spike(action="explode")


def _loop(tmp_path, detectors, steps=40, bad_step=30, fused=False, flush_every=5):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01) if not fused else torch.optim.AdamW(
        net.parameters(), lr=0.01, fused=True)
    mon = Monitor(tmp_path / "run", flush_every=flush_every, layer_every=5, recorder_steps=6,
                  detectors=detectors, async_flush=False)
    guard = gg.Guard(net, clipper=gg.NormClip(1e6), monitor=mon, on_nonfinite="propagate")
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    snapshot = after = None
    for i in range(steps):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        if i + 1 == bad_step:
            for p in net.parameters():
                p.grad.mul_(1e4)
            snapshot = [p.detach().clone() for p in net.parameters()]
        guard.step(opt, loss=loss)
        if i + 1 == bad_step:
            after = [p.detach().clone() for p in net.parameters()]
    return guard, mon, snapshot, after


@pytest.mark.parametrize("fused", [False, True])
def test_skip_action_refuses_the_update(tmp_path, fused):
    guard, mon, before, after = _loop(tmp_path, [Spike(warmup=5, action="skip")], fused=fused)
    assert mon.can_skip
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    guard.close()
    run = load_run(tmp_path / "run")
    assert run.steps.set_index("step").loc[30, "skipped"]
    assert run.steps.skipped.sum() == 1
    ev = run.events.iloc[0]
    assert (ev.step, ev.rule, ev.action) == (30, "spike", "skip")
    assert "update skipped" in ev.message


def test_warn_is_rate_limited_and_recorded(tmp_path):
    mon = Monitor(tmp_path / "run", flush_every=4, detectors=[Spike(warmup=3, hard_factor=None,
                                                                     z_threshold=1.0)])
    p = torch.nn.Parameter(torch.zeros(3))
    clip = gg.NormClip(1e9)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for i in range(40):
            p.grad = torch.full((3,), 1.0 if i % 2 else 3.0)
            mon.record(clip([p]), loss=1.0)
        mon.close()
    spike_warnings = [x for x in w if "spike" in str(x.message)]
    run = load_run(tmp_path / "run")
    assert len(run.events) > 5          # every event recorded ...
    assert len(spike_warnings) == 1     # ... one warning per warn_interval (60 s)
    assert (run.events.action == "warn").all() and (run.events.rule == "spike").all()


def test_callback_action(tmp_path):
    seen = []
    guard, mon, *_ = _loop(tmp_path, [Spike(warmup=5, action="callback", callback=seen.append)])
    guard.close()
    # the 1e4 update went through (callback does not skip): later steps spike too
    assert seen[0]["step"] == 30
    assert [e["step"] for e in seen] == load_run(tmp_path / "run").events.step.tolist()
    assert seen[0]["rule"] == "spike" and seen[0]["top_layers"]


def test_raise_action_reaches_the_training_loop(tmp_path):
    with pytest.raises(AnomalyError) as info:
        _loop(tmp_path, [Spike(warmup=5, action="raise")], steps=40, flush_every=1)
    assert info.value.event["step"] == 30
    ev = load_run(tmp_path / "run").events
    assert ev.action.tolist() == ["raise"]


def test_raising_callback_does_not_stop_training(tmp_path):
    def bad(event):
        raise RuntimeError("user bug")

    with pytest.warns(RuntimeWarning, match="callback"):
        guard, mon, *_ = _loop(tmp_path, [Spike(warmup=5, action="callback", callback=bad)])
        guard.close()
    assert any("callback" in n for n in load_run(tmp_path / "run").meta["notes"])


def test_skip_action_is_deprecated_in_favour_of_spike_skip():
    """One public spike skip: ``gg.SpikeSkip``; ``action="skip"`` still works, and says so."""
    with pytest.warns(DeprecationWarning, match="SpikeSkip") as rec:
        Spike(action="skip")
    assert rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        Spike(action="warn")
