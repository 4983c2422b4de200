"""Clipper objects: one protocol, ClipStats against float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_functional import make_params

import gradguard as gg

shape_lists = st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple),
                       min_size=1, max_size=5)


@given(shape_lists, st.floats(1e-2, 5.0), st.integers(0, 2**16), st.sampled_from([1.0, 2.0, math.inf]))
def test_normclip_stats(shape_list, max_norm, seed, p):
    params = make_params(shape_list, torch.float64, seed)
    arrays = [ref.to_np(q.grad) for q in params]
    want, total = ref.clip_norm(arrays, max_norm, p)
    stats = gg.NormClip(max_norm, norm_type=p)(params)
    assert math.isclose(float(stats.total_norm), total, rel_tol=1e-6)
    assert math.isclose(float(stats.clip_coef), min(1.0, max_norm / (total + 1e-6)), rel_tol=1e-6)
    assert bool(stats.clipped) == (total + 1e-6 > max_norm)
    assert not bool(stats.nonfinite)
    assert float(stats.threshold) == pytest.approx(max_norm)
    after = ref.total_norm([ref.to_np(q.grad) for q in params], p)
    assert math.isclose(float(stats.total_norm_after), after, rel_tol=1e-5, abs_tol=1e-9)
    np.testing.assert_allclose(stats.per_tensor_norms.double().numpy(), [ref.norm(a, p) for a in arrays], rtol=1e-6)
    for q, w in zip(params, want):
        np.testing.assert_allclose(ref.to_np(q.grad), w, rtol=1e-6, atol=1e-9)


@given(shape_lists, st.floats(1e-2, 5.0), st.integers(0, 2**16))
def test_per_tensor_stats_coef_is_norm_ratio(shape_list, max_norm, seed):
    params = make_params(shape_list, torch.float64, seed)
    arrays = [ref.to_np(q.grad) for q in params]
    before = ref.total_norm(arrays, 2)
    stats = gg.NormClip(max_norm, per_tensor=True)(params)
    after = ref.total_norm([ref.to_np(q.grad) for q in params], 2)
    assert math.isclose(float(stats.clip_coef), after / before, rel_tol=1e-5)
    assert bool(stats.clipped) == any(ref.norm(a, 2) > max_norm for a in arrays)


@given(shape_lists, st.floats(1e-3, 2.0), st.integers(0, 2**16))
def test_valueclip_stats(shape_list, clip, seed):
    params = make_params(shape_list, torch.float64, seed)
    arrays = [ref.to_np(q.grad) for q in params]
    want = ref.clip_value(arrays, -clip, clip)
    stats = gg.ValueClip(clip)(params)
    for q, w in zip(params, want):
        np.testing.assert_array_equal(ref.to_np(q.grad), w)
    before, after = ref.total_norm(arrays, 2), ref.total_norm(want, 2)
    assert math.isclose(float(stats.clip_coef), after / before, rel_tol=1e-5)
    assert bool(stats.clipped) == any(np.any(np.abs(a) > clip) for a in arrays)


def test_agc_stats_and_state():
    params = make_params([(3, 4), (3,)], torch.float64, 0, scale=10.0)
    want = ref.agc([ref.to_np(q) for q in params], [ref.to_np(q.grad) for q in params], 0.01, 1e-3)
    before = ref.total_norm([ref.to_np(q.grad) for q in params], 2)
    clipper = gg.AGC()
    stats = clipper(params)
    assert bool(stats.clipped)
    assert math.isclose(float(stats.clip_coef), ref.total_norm(want, 2) / before, rel_tol=1e-5)
    clipper.load_state_dict(clipper.state_dict())


def test_clippers_leave_nonfinite_grads_untouched():
    for clipper in [gg.NormClip(0.1), gg.NormClip(0.1, per_tensor=True), gg.AGC()]:
        params = make_params([(3, 2), (2,)], torch.float32, 0, scale=5)
        params[1].grad[0] = float("nan")
        before = [q.grad.clone() for q in params]
        stats = clipper(params)
        assert bool(stats.nonfinite)
        for q, b in zip(params, before):
            assert torch.equal(q.grad, b) or torch.allclose(q.grad, b, equal_nan=True)


def test_clipper_arguments_named():
    with pytest.raises(ValueError, match="max_norm"):
        gg.NormClip(-1)
    with pytest.raises(ValueError, match="norm_type"):
        gg.NormClip(1.0, norm_type=-2)
    with pytest.raises(ValueError, match="clipping"):
        gg.AGC(clipping=-0.1)
    with pytest.raises(ValueError, match="eps"):
        gg.AGC(eps=float("nan"))
    with pytest.raises(TypeError, match="max_norm"):
        gg.NormClip(torch.tensor(1.0))


def test_stateless_clippers_round_trip_state_dict():
    for clipper in [gg.NormClip(1.0), gg.ValueClip(1.0), gg.AGC()]:
        sd = clipper.state_dict()
        clipper.load_state_dict(sd)
        assert clipper.state_dict() == sd


# -- issue 15: overflow-safe AGC, threshold arguments, one apply path ---------------------


def _agc_case(w_val, g_val, dtype, shape=(3, 4)):
    p = torch.nn.Parameter(torch.full(shape, w_val, dtype=dtype))
    p.grad = torch.full(shape, g_val, dtype=dtype)
    return p


@pytest.mark.parametrize("w_val, g_val, dtype", [
    (1.0, 1e20, torch.float32),      # the squares of the gradient overflow float32
    (1e20, 1e19, torch.float32),     # and those of the weight: scale by 0.1
    (1.0, 1e160, torch.float64),     # float64 squares overflow too
    (1e160, 1e159, torch.float64),
    (1.0, 3e38, torch.float32),      # the row norm itself is beyond float32 (6e38)
])
def test_agc_clips_rows_whose_norms_overflow(w_val, g_val, dtype):
    p = _agc_case(w_val, g_val, dtype)
    # float64 reference with max-normalised norms (the exact values, no overflow)
    w = np.full((3, 4), w_val, dtype=np.float64)
    g = np.full((3, 4), g_val, dtype=np.float64)
    wn = w_val * math.sqrt(4.0)
    gn = g_val * math.sqrt(4.0)
    max_n = 0.01 * max(wn, 1e-3)
    want = g * (max_n / gn) if gn > max_n else g
    stats = gg.AGC()([p])
    assert bool(stats.clipped) and not bool(stats.nonfinite)
    # (for 3e38 the factor, 3.3e-41, is a float32 subnormal: 2e-5 relative precision left)
    rtol = 1e-4 if g_val > 1e38 and dtype == torch.float32 else 1e-5
    np.testing.assert_allclose(p.grad.double().numpy(), want, rtol=rtol)
    assert np.isfinite(w).all()


def test_agc_overflow_scale_is_one_tenth_when_weights_overflow():
    p = _agc_case(1e20, 1e19, torch.float32)
    gg.AGC(clipping=0.01)([p])
    # ||w_row|| = 2e20, max norm 2e18, ||g_row|| = 2e19: factor 0.1
    np.testing.assert_allclose(p.grad.numpy(), np.full((3, 4), 1e18, np.float32), rtol=1e-6)


def test_normclip_threshold_arguments():
    with pytest.raises(ValueError, match=r"max_norm=1e\+39 is beyond float32"):
        gg.NormClip(1e39)
    with pytest.raises(TypeError, match="per_tensor"):
        gg.NormClip(1.0, per_tensor="no")
    clip = gg.NormClip(np.float32(1.0))
    assert clip.max_norm == 1.0 and type(clip.max_norm) is float
    assert math.isinf(gg.NormClip(math.inf).max_norm)
    params = make_params([(3, 2)], torch.float32, 0, scale=5)
    stats = gg.NormClip(np.float32(0.5))(params)
    assert float(stats.total_norm_after) == pytest.approx(0.5, rel=1e-5)


def test_per_tensor_normclip_is_its_own_class():
    old = gg.NormClip(0.5, per_tensor=True)
    from gradguard.clippers import PerTensorNormClip
    assert isinstance(old, PerTensorNormClip) and old.per_tensor and not old.scalar
    new = PerTensorNormClip(0.5)
    a = make_params([(3, 2), (4,)], torch.float64, 1, scale=5)
    b = make_params([(3, 2), (4,)], torch.float64, 1, scale=5)
    want = ref.clip_per_tensor([ref.to_np(q.grad) for q in a], 0.5, 2.0)
    old(a)
    new(b)
    for x, y, w in zip(a, b, want):
        assert torch.equal(x.grad, y.grad)
        np.testing.assert_allclose(ref.to_np(x.grad), w, rtol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: gg.NormClip(0.1), lambda: gg.AutoClip(10.0), lambda: gg.ZClip(warmup_steps=1),
    lambda: gg.OvershootClip(), lambda: gg.AutoClip(50.0, window=4),
])
def test_every_scalar_clipper_applies_through_multi_tensor_scale(monkeypatch, make):
    import gradguard.clippers as clippers_mod

    calls = []
    real = clippers_mod.multi_tensor_scale_

    def spy(tensors, coef, **kw):
        calls.append(float(coef))
        return real(tensors, coef, **kw)

    monkeypatch.setattr(clippers_mod, "multi_tensor_scale_", spy)
    clip = make()
    for scale in (1.0, 1.0, 50.0):
        params = make_params([(3, 2), (2,)], torch.float32, 0, scale=scale)
        n = gg.grad_norm(params)
        coef = clip.coefficient(n)
        stats = clip.clip_(params, [q.grad for q in params], n, apply=True)
        assert torch.equal(coef, stats.clip_coef)  # coefficient() is what clip_ applies
        clip.observe(n, ~stats.nonfinite)
    assert len(calls) == 3


def _readme_clipper():
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- custom-clipper -->\s*```python\n(.*?)```\s*<!-- /custom-clipper -->",
                      text, re.S)
    assert block, "README.md has no custom-clipper block"
    lines = block.group(1).strip().splitlines()
    assert len(lines) <= 11, "the README promises a ten-line clipper"
    ns = {"gg": gg, "torch": torch}
    exec(block.group(1), ns)  # noqa: S102 - the README's own example, run as written
    return ns["HalveAbove"]


@pytest.mark.parametrize("fused", [False, True])
def test_readme_user_clipper_works_in_guard(fused):
    """The README's user-written clipper, run in a Guard: it halves the gradients of a step
    whose norm exceeds the limit (on the fused path through grad_scale), leaves the others,
    and a NaN step is still skipped with parameters unchanged."""
    from gradguard.protocols import Clipper as ClipperProtocol

    HalveAbove = _readme_clipper()
    assert isinstance(HalveAbove(1.0), ClipperProtocol)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, fused=fused)
    guard = gg.Guard(model, clipper=HalveAbove(50.0), max_consecutive_skips=None)
    for scale, halved in [(1.0, False), (100.0, True), (1.0, False), (100.0, True)]:
        opt.zero_grad()
        before = [p.detach().clone() for p in model.parameters()]
        (scale * model(torch.ones(4, 3)).sum()).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        stats = guard.step(opt)
        assert bool(stats.clipped) == halved
        f = 0.5 if halved else 1.0
        for p, b, g in zip(model.parameters(), before, grads):
            torch.testing.assert_close(p.detach(), b - 0.1 * f * g)  # plain SGD: p - lr * g
    opt.zero_grad()
    model(torch.ones(4, 3)).sum().backward()
    model.weight.grad[0, 0] = math.nan
    before = [p.detach().clone() for p in model.parameters()]
    stats = guard.step(opt)
    assert bool(stats.skipped) and bool(stats.nonfinite)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
