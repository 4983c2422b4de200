"""The Monitor's two ways of running the detectors on the CPU: numpy scalars on the host
(the default, ``host_math=True``) and torch tensors (``host_math=False``, the code a
GPU runs). Same events, same flags, values equal to float32 rounding; states interchange."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import gradguard as gg
from gradguard.monitor import LossSpike, Monitor, NonFinite, Spike, Vanishing, load_run
from gradguard.monitor.detectors import default_detectors


def _detectors():
    # the skip rule refuses only the 1e4 spike (its 10x guard); the warn rules see the rest
    return default_detectors() + [Spike(z_threshold=50.0, warmup=10, action="skip")]


def _run(path, host_math, steps=130, start=1, state=None, stop=None, gpu_path=False,
         async_flush=False):
    """Training with a spike (30), a NaN (40), steady growth (45-) and one layer fading
    away (105-); returns the Monitor's state at step ``stop`` if asked."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    mon = Monitor(path, layer_every=5, flush_every=10, recorder_steps=8, detectors=_detectors(),
                  host_math=host_math, async_flush=async_flush, warn_interval=1e9,
                  _device_path=gpu_path)  # per step as on a GPU: tensors; rest at the flush
    guard = gg.Guard(net, clipper=gg.NormClip(1e9), monitor=mon, max_consecutive_skips=None)
    if state is not None:
        mon.load_state_dict(state["monitor"])
        guard.load_state_dict(state["guard"])
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)
    saved = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the detectors' own "warn" action
        for s in range(1, steps + 1):
            opt.zero_grad()
            loss = ((net(x) - y) ** 2).mean()
            loss.backward()
            if s < start:
                continue
            if s == 30:
                net[0].weight.grad.mul_(1e4)
            if s == 40:
                net[2].bias.grad[0] = math.nan
            if s >= 45:
                for p in net.parameters():
                    p.grad.mul_(1.06 ** (s - 44))
            if s >= 105:
                net[0].weight.grad.mul_(1e-6)
                net[0].bias.grad.mul_(1e-6)
            guard.step(opt, loss=loss)
            if s == stop:
                saved = {"monitor": mon.state_dict(), "guard": guard.state_dict(),
                         "net": {k: v.clone() for k, v in net.state_dict().items()},
                         "opt": opt.state_dict()}
    guard.close()
    assert not mon.notes, mon.notes
    return saved


def _compare(a, b, min_step=0):
    """Same events (step, rule, action, top layers), values and baselines to float32."""
    ea, eb = (r.events[r.events.step >= min_step].reset_index(drop=True) for r in (a, b))
    keys = ["step", "rule", "action", "first_nonfinite_layer"]
    assert ea[keys].fillna("").astype(str).equals(eb[keys].fillna("").astype(str))
    for c in ("value", "baseline"):
        np.testing.assert_allclose(ea[c].to_numpy(np.float64), eb[c].to_numpy(np.float64),
                                   rtol=2e-5, equal_nan=True, err_msg=c)
    return list(zip(ea.step, ea.rule))


@pytest.mark.parametrize("other", ["per-step torch", "gpu path"])
def test_host_math_matches_device_math(tmp_path, other):
    """Rules at the flush on numpy (the default) against every rule in the step as torch
    tensors (``host_math=False``), and against the GPU's mix (skip rules as tensors in the
    step, the rest at the flush; forced on the CPU)."""
    _run(tmp_path / "host", True)
    if other == "gpu path":
        _run(tmp_path / "torch", True, gpu_path=True)
    else:
        _run(tmp_path / "torch", False)
    host, dev = load_run(tmp_path / "host"), load_run(tmp_path / "torch")
    events = _compare(host, dev)
    rules = {r for _, r in events}
    assert {"spike", "nonfinite", "growth", "vanishing"} <= rules, events
    assert host.steps["skipped"].tolist() == dev.steps["skipped"].tolist()
    assert host.steps["skipped"].any()
    for c in ("total_norm", "loss", "clip_coef"):
        assert host.steps[c].equals(dev.steps[c])
    np.testing.assert_array_equal(host.layers["grad_norm"], dev.layers["grad_norm"])


@pytest.mark.parametrize("first, second", [(True, False), (False, True)])
def test_state_moves_between_host_and_device_math(tmp_path, first, second):
    """A checkpoint written with one kind of arithmetic resumes with the other."""
    state = _run(tmp_path / "a", first, steps=55, stop=55)
    _run(tmp_path / "b", second, start=56, state=state)
    _run(tmp_path / "full", first)
    full, part = load_run(tmp_path / "full"), load_run(tmp_path / "b")
    events = _compare(full, part, min_step=56)
    assert {"growth", "vanishing"} <= {r for _, r in events}, events


def test_host_state_dict_dtypes_and_roundtrip():
    dets = [Spike(), LossSpike(), Vanishing()]
    for d in dets[:2]:
        d.evaluate(np.float32(2.0), np.float32(1.0))
        d.update(np.float32(2.0), np.float32(1.0), np.bool_(True), np.bool_(False))
    dets[2].evaluate_layers(np.array([1.0, 2.0], np.float32), np.bool_(True))
    for d in dets:
        sd = d.state_dict()
        assert all(isinstance(v, torch.Tensor) for v in sd.values())
        assert {k: v.dtype for k, v in sd.items()} == {
            "mean": torch.float32, "var": torch.float32, "count": torch.int64, "max": torch.float32,
        } if not isinstance(d, Vanishing) else {
            "log_sum": torch.float32, "count": torch.int64, "low": torch.int64}
        fresh = type(d)()
        fresh.load_state_dict(sd)
        assert all(torch.equal(sd[k], v) for k, v in fresh.state_dict().items())


def test_host_math_quiet_on_nonfinite_input(tmp_path):
    """inf - inf and log(NaN) in the host arithmetic give NaN silently, as torch does."""
    mon = Monitor(tmp_path / "run", flush_every=4, async_flush=False,
                  detectors=[NonFinite(action="callback", callback=lambda e: None),
                             Spike(warmup=1, action="callback", callback=lambda e: None),
                             LossSpike(warmup=1, action="callback", callback=lambda e: None)]
                  + [d for d in default_detectors() if d.rule in ("growth", "vanishing")])
    p = torch.nn.Parameter(torch.zeros(3))
    clip = gg.NormClip(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for s, g in enumerate([1.0, 2.0, math.inf, math.nan, 1.0, -math.inf, 3.0, 0.0], 1):
            p.grad = torch.full((3,), g)
            mon.record(clip([p]), step=s, loss=g)
        mon.close()
    assert not mon.notes
    ev = load_run(tmp_path / "run").events
    assert ev[ev.rule == "nonfinite"].step.tolist() == [3, 4, 6]


def test_host_math_argument_is_checked(tmp_path):
    with pytest.raises(ValueError, match="host_math"):
        Monitor(tmp_path / "run", host_math="yes")


def test_rules_at_the_flush_on_the_writer_thread(tmp_path):
    """With the default background writer the batched rules run on its thread: same events,
    and a checkpoint taken mid-interval (state_dict flushes first) resumes exactly."""
    _run(tmp_path / "sync", True)
    state = _run(tmp_path / "async", True, async_flush=True, steps=55, stop=55)
    _run(tmp_path / "async", True, async_flush=True, start=56, state=state)
    events = _compare(load_run(tmp_path / "sync"), load_run(tmp_path / "async"))
    assert {"spike", "nonfinite", "growth", "vanishing"} <= {r for _, r in events}
