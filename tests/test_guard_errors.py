"""Mistakes in using the Guard get a TypeError / ValueError naming the argument and the value,
raised in the call that makes them; warnings point at the user's line."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import gradguard as gg


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def backward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    return loss.detach()


def test_guard_of_an_optimizer_says_what_to_pass():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"model_or_parameters is an optimizer \(SGD\).*Guard\(model\)"):
        gg.Guard(opt)
    with pytest.raises(TypeError, match="model_or_parameters must be an nn.Module.*str 'model'"):
        gg.Guard("model")
    with pytest.raises(TypeError, match="model_or_parameters must be.*NoneType"):
        gg.Guard(None)


def test_mixing_named_pairs_and_bare_tensors_is_refused():
    w, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(TypeError, match=r"mixes \(name, parameter\) pairs and bare parameters.*item 1 a Parameter"):
        gg.Guard([("w", w), b])
    with pytest.raises(TypeError, match=r"mixes.*item 0 is a Parameter, item 1 a tuple"):
        gg.Guard([w, ("b", b)])
    with pytest.raises(TypeError, match=r"model_or_parameters\[1\] must be a \(name, parameter\) pair"):
        gg.Guard([("w", w), (b, "b")])
    g = gg.Guard({"w": w, "b": b})  # a mapping name -> parameter is a set of pairs
    assert g.names == ["w", "b"] and g.params[1] is b


@pytest.mark.parametrize("bad, kind, pattern", [
    (None, TypeError, r"optimizer is None.*guard\.clip\(\)"),
    ("adam", TypeError, r"optimizer must be a torch\.optim\.Optimizer.*str 'adam'"),
    ([], ValueError, r"optimizer: an empty list"),
    (3, TypeError, r"optimizer must be.*int 3"),
])
def test_step_refuses_what_is_not_an_optimizer(bad, kind, pattern):
    model = make_model()
    guard = gg.Guard(model, gg.NormClip(1.0))
    backward(model)
    with pytest.raises(kind, match=pattern):
        guard.step(bad)
    assert guard.step_count == 0  # a refused call changes nothing


def test_step_of_the_model_says_what_goes_where():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, gg.NormClip(1.0))
    backward(model)
    with pytest.raises(TypeError, match=r"optimizer is a model \(Sequential\).*gg\.Guard\(model\)"):
        guard.step(model)
    with pytest.raises(TypeError, match=r"optimizer\[1\] is a model"):
        guard.step([opt, model])
    with pytest.raises(ValueError, match="listed twice"):
        guard.step([opt, opt])
    with pytest.raises(TypeError, match="loss must be a tensor, a number or None, got str"):
        guard.step(opt, loss="0.5")
    assert guard.step_count == 0


def test_scaler_that_is_not_a_scaler():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, gg.NormClip(1.0))
    backward(model)
    with pytest.raises(TypeError, match=r"scaler must be a torch\.amp\.GradScaler or None, got object.*lacks is_enabled"):
        guard.step(opt, scaler=object())
    assert guard.step_count == 0
    guard.step(opt, scaler=torch.amp.GradScaler("cpu", enabled=False))  # disabled: plain step
    assert guard.step_count == 1


@pytest.mark.parametrize("p", [math.nan, 0, -1.0, "two"])
def test_norm_type_without_a_clipper_is_checked(p):
    with pytest.raises((ValueError, TypeError), match="norm_type"):
        gg.Guard(make_model(), clipper=None, norm_type=p)


def test_numpy_scalars_are_numbers_and_strings_are_not_flags():
    model = make_model()
    g = gg.Guard(model, clipper=None, norm_type=np.float32(1.0), max_consecutive_skips=np.int64(4))
    assert g.norm_type == 1.0 and g.max_consecutive_skips == 4 and type(g.max_consecutive_skips) is int
    clip = gg.NormClip(np.float32(1.0), norm_type=np.float64(2.0))
    assert clip.max_norm == 1.0 and type(clip.max_norm) is float
    assert gg.NormClip(1.0, per_tensor=np.bool_(True)).per_tensor is True
    with pytest.raises(TypeError, match="per_tensor must be True or False, got str 'no'"):
        gg.NormClip(1.0, per_tensor="no")
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        gg.Guard(model, max_consecutive_skips=True)
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        gg.Guard(model, max_consecutive_skips=2.5)


def test_a_threshold_beyond_float32_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"max_norm=1e\+39 is beyond float32's largest value.*math\.inf"):
        gg.NormClip(1e39)
    assert gg.NormClip(math.inf).max_norm == math.inf  # no limit stays allowed


def test_mismatched_load_state_dict_names_the_mismatch():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = gg.Guard(model, gg.ZClip(warmup_steps=2), skip=gg.SpikeSkip(window=4))
    for s in range(3):
        backward(model, s)
        g.step(opt)
    sd = g.state_dict()
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        g.load_state_dict([1, 2])
    with pytest.raises(ValueError, match=r"not a Guard state: no 'step_count'.*'norm', 'window'"):
        g.load_state_dict(sd["skip"])
    with pytest.raises(ValueError, match=r"has a skip rule state.*this Guard has no skip rule"):
        gg.Guard(model, gg.ZClip(warmup_steps=2)).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"no clipper state.*Guard without one"):
        gg.Guard(model, gg.ZClip(), skip=gg.SpikeSkip(window=4)).load_state_dict(
            {k: v for k, v in sd.items() if k != "clipper"})
    other = gg.Guard(model, gg.AutoClip(), skip=gg.SpikeSkip(window=4))
    with pytest.raises(ValueError, match=r"state_dict\['clipper'\] does not fit this Guard's clipper AutoClip: KeyError"):
        other.load_state_dict(sd)
    assert other.step_count == 0
    with pytest.raises(ValueError, match=r"state_dict\['step_count'\] must be an int"):
        g.load_state_dict({**sd, "step_count": "3"})


def test_step_before_backward_warns_once_at_the_users_line():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, gg.NormClip(1.0))
    with pytest.warns(RuntimeWarning, match=r"none of the 4 guarded parameters has a gradient.*backward") as rec:
        stats = guard.step(opt)
    assert float(stats.total_norm) == 0.0
    assert [w.filename for w in rec] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guard.step(opt)  # once
        backward(model)
        guard.step(opt)


class BrokenMonitor:
    def record(self, stats, **fields):
        raise OSError("disk full")


def test_the_monitor_failure_warning_points_at_the_users_line():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, gg.NormClip(1.0), monitor=BrokenMonitor())
    backward(model)
    with pytest.warns(RuntimeWarning, match="disk full") as rec:
        guard.step(opt)
    assert [w.filename for w in rec] == [__file__]
    assert rec[0].lineno == _line_of("        guard.step(opt)\n", after="def test_the_monitor_failure")


def _line_of(text, after):
    lines = open(__file__).read().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(after))
    return next(i for i in range(start, len(lines)) if lines[i] == text) + 1
