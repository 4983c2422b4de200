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
