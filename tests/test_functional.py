"""The torch-compatible functions against torch.nn.utils and the float64 references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import reference as ref
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradguard as gg

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
NORM_TYPES = [1.0, 2.0, 3.0, math.inf, 0.5, 1.7]
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-6}

shapes = st.lists(
    st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple), min_size=1, max_size=6)


def make_params(shape_list, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shape_list:
        p = torch.nn.Parameter(torch.randn(s, generator=g).to(dtype))
        p.grad = (torch.randn(s, generator=g) * scale).to(dtype)
        params.append(p)
    return params


def clone(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = None if p.grad is None else p.grad.clone()
        out.append(q)
    return out


settings.register_profile("gg", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("gg")


@given(shapes, st.sampled_from(NORM_TYPES), st.floats(1e-3, 10.0), st.integers(0, 2**16),
       st.sampled_from([0.1, 1.0, 100.0]))
def test_clip_grad_norm_matches_torch_float32(shape_list, p, max_norm, seed, scale):
    ours = make_params(shape_list, torch.float32, seed, scale)
    theirs = clone(ours)
    n_ours = gg.clip_grad_norm_(ours, max_norm, norm_type=p)
    if math.isinf(p) and any(q.numel() == 0 for q in theirs):
        # torch refuses the inf-norm of an empty tensor; gradguard takes it as 0
        with pytest.raises(RuntimeError):
            torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type=p)
        want = ref.total_norm([ref.to_np(q.grad) for q in theirs], p)
        assert math.isclose(float(n_ours), want, rel_tol=1e-6)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n_theirs = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type=p)
    assert n_ours.dtype == torch.float32
    torch.testing.assert_close(n_ours, n_theirs.float(), rtol=2e-5, atol=1e-6)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-5, atol=1e-6)


@given(shapes, st.sampled_from(NORM_TYPES), st.floats(1e-3, 10.0), st.integers(0, 2**16),
       st.sampled_from(DTYPES))
def test_clip_grad_norm_matches_float64_reference(shape_list, p, max_norm, seed, dtype):
    params = make_params(shape_list, dtype, seed)
    arrays = [ref.to_np(q.grad) for q in params]
    want, want_total = ref.clip_norm(arrays, max_norm, p)
    total = gg.clip_grad_norm_(params, max_norm, norm_type=p)
    assert math.isclose(float(total), want_total, rel_tol=1e-5, abs_tol=1e-6)
    for q, w in zip(params, want):
        np.testing.assert_allclose(ref.to_np(q.grad), w, rtol=RTOL[dtype], atol=RTOL[dtype])


@given(shapes, st.floats(0.0, 3.0), st.integers(0, 2**16), st.sampled_from(DTYPES))
def test_clip_grad_value_matches_torch(shape_list, clip, seed, dtype):
    ours = make_params(shape_list, dtype, seed)
    theirs = clone(ours)
    gg.clip_grad_value_(ours, clip)
    torch.nn.utils.clip_grad_value_(theirs, clip)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)


@given(shapes, st.floats(-3, 3), st.floats(0, 3), st.integers(0, 2**16))
def test_clip_grad_value_asymmetric(shape_list, lo, width, seed):
    params = make_params(shape_list, torch.float64, seed)
    want = ref.clip_value([ref.to_np(q.grad) for q in params], lo, lo + width)
    gg.clip_grad_value_(params, min_value=lo, max_value=lo + width)
    for q, w in zip(params, want):
        np.testing.assert_array_equal(ref.to_np(q.grad), w)


@given(shapes, st.sampled_from(NORM_TYPES), st.floats(0.0, 5.0), st.integers(0, 2**16),
       st.sampled_from(DTYPES))
def test_clip_per_tensor_matches_reference(shape_list, p, max_norm, seed, dtype):
    params = make_params(shape_list, dtype, seed)
    arrays = [ref.to_np(q.grad) for q in params]
    want = ref.clip_per_tensor(arrays, max_norm, p)
    norms = gg.clip_grad_norm_per_tensor_(params, max_norm, norm_type=p)
    np.testing.assert_allclose(norms.double().numpy(), [ref.norm(a, p) for a in arrays], rtol=1e-5, atol=1e-6)
    for q, w in zip(params, want):
        np.testing.assert_allclose(ref.to_np(q.grad), w, rtol=RTOL[dtype], atol=RTOL[dtype])
        assert ref.norm(ref.to_np(q.grad), p) <= max_norm * (1 + RTOL[dtype]) + 1e-6


@given(st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=4).map(tuple), min_size=1, max_size=5),
       st.floats(1e-3, 0.5), st.floats(1e-4, 1e-2), st.integers(0, 2**16), st.sampled_from([0.01, 1.0, 100.0]))
def test_agc_matches_reference(shape_list, clipping, eps, seed, scale):
    params = make_params(shape_list, torch.float64, seed, scale)
    want = ref.agc([ref.to_np(q) for q in params], [ref.to_np(q.grad) for q in params], clipping, eps)
    gg.clip_grad_agc_(params, clipping=clipping, eps=eps)
    for q, w in zip(params, want):
        np.testing.assert_allclose(ref.to_np(q.grad), w, rtol=1e-10, atol=1e-12)


def test_agc_units_are_output_rows():
    w = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 100.0]]))
    w.grad = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gg.clip_grad_agc_([w], clipping=0.01)
    # row 0: ||W|| = 1 -> max 0.01, clipped to norm 0.01; row 1: ||W|| = 100 -> max 1, untouched
    torch.testing.assert_close(w.grad, torch.tensor([[0.01, 0.0], [0.0, 1.0]]), rtol=1e-4, atol=1e-7)


def test_float16_norm_beyond_65504_is_finite_and_clips_correctly():
    p = torch.nn.Parameter(torch.zeros(10000, dtype=torch.float16))
    p.grad = torch.full((10000,), 30000.0, dtype=torch.float16)  # true norm 3e6
    q = clone([p])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_norm = torch.nn.utils.clip_grad_norm_([q], 1.0)
    assert not torch.isfinite(torch_norm)          # torch: inf ...
    assert torch.count_nonzero(q.grad) == 0        # ... and every gradient zeroed
    total = gg.clip_grad_norm_([p], 1.0)
    assert math.isclose(float(total), 3e6, rel_tol=1e-3)
    assert math.isclose(ref.norm(ref.to_np(p.grad), 2.0), 1.0, rel_tol=2e-3)


def test_float32_squares_overflow_but_norm_is_finite():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3e20, -4e20, 0.0, 0.0])
    total = gg.clip_grad_norm_([p], 1.0)
    assert math.isclose(float(total), 5e20, rel_tol=1e-6)
    np.testing.assert_allclose(p.grad.numpy(), [0.6, -0.8, 0, 0], rtol=1e-5)


def test_bfloat16_large_values_total_norm_finite():
    a = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    a.grad = torch.tensor([1e30, 1e30, 0.0], dtype=torch.bfloat16)
    total = gg.grad_norm([a]).total
    assert math.isclose(float(total), float(a.grad[0].double()) * math.sqrt(2), rel_tol=1e-5)


def test_none_grads_skipped_and_generators_work():
    params = make_params([(3,), (2, 2)], torch.float32, 0)
    extra = torch.nn.Parameter(torch.ones(5))  # grad None
    want = ref.total_norm([ref.to_np(p.grad) for p in params], 2.0)
    total = gg.clip_grad_norm_((p for p in params + [extra]), 0.5)
    assert math.isclose(float(total), want, rel_tol=1e-6)
    assert extra.grad is None
    assert math.isclose(gg.grad_norm(params).total.item(), 0.5, rel_tol=1e-5)


def test_all_grads_none_and_empty_list():
    p = torch.nn.Parameter(torch.ones(3))
    assert float(gg.clip_grad_norm_([p], 1.0)) == 0.0
    assert float(gg.clip_grad_norm_([], 1.0)) == 0.0
    gg.clip_grad_value_([], 1.0)
    assert gg.grad_norm([]).per_tensor.numel() == 0


def test_grad_norm_is_read_only_and_per_tensor():
    params = make_params([(4, 3), (7,), ()], torch.float32, 1, scale=10)
    before = [p.grad.clone() for p in params]
    norms = gg.grad_norm(params, norm_type=2)
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)
    np.testing.assert_allclose(norms.per_tensor.numpy(), [ref.norm(ref.to_np(b), 2) for b in before], rtol=1e-6)
    assert math.isclose(float(norms.total), ref.total_norm([ref.to_np(b) for b in before], 2), rel_tol=1e-6)


def test_nonfinite_total_leaves_grads_untouched_unless_asked_to_error():
    params = make_params([(3,), (2,)], torch.float32, 0)
    params[0].grad[1] = float("inf")
    before = [p.grad.clone() for p in params]
    total = gg.clip_grad_norm_(params, 1.0)
    assert math.isinf(float(total))
    for p, b in zip(params, before):
        assert torch.equal(p.grad, b)
    with pytest.raises(RuntimeError, match="non-finite"):
        gg.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "x"])
def test_bad_max_norm_named(bad):
    params = make_params([(3,)], torch.float32, 0)
    with pytest.raises((ValueError, TypeError), match="max_norm"):
        gg.clip_grad_norm_(params, bad)


@pytest.mark.parametrize("bad", [0, -2, float("nan"), "fro"])
def test_bad_norm_type_named(bad):
    params = make_params([(3,)], torch.float32, 0)
    with pytest.raises((ValueError, TypeError), match="norm_type"):
        gg.clip_grad_norm_(params, 1.0, norm_type=bad)


def test_bad_value_arguments():
    params = make_params([(3,)], torch.float32, 0)
    with pytest.raises(ValueError, match="clip_value"):
        gg.clip_grad_value_(params, -1.0)
    with pytest.raises(ValueError, match="clip_value"):
        gg.clip_grad_value_(params, float("nan"))
    with pytest.raises(ValueError, match="min_value"):
        gg.clip_grad_value_(params, min_value=2.0, max_value=1.0)
    with pytest.raises(ValueError, match="not both"):
        gg.clip_grad_value_(params, 1.0, min_value=0.0)
    with pytest.raises(ValueError):
        gg.clip_grad_value_(params)
    with pytest.raises(ValueError, match="clipping"):
        gg.clip_grad_agc_(params, clipping=0.0)


def test_sparse_and_integer_grads_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="layout"):
        gg.clip_grad_norm_(emb.parameters(), 1.0)
    p = torch.zeros(3, dtype=torch.int64)
    p.grad = torch.ones(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="dtype"):
        gg.clip_grad_norm_([p], 1.0)


def test_non_contiguous_grads():
    base = torch.randn(6, 4)
    p = torch.nn.Parameter(torch.zeros(4, 6))
    p.grad = base.t()  # non-contiguous view
    want = ref.norm(ref.to_np(base), 2)
    assert math.isclose(float(gg.clip_grad_norm_([p], 0.1)), want, rel_tol=1e-6)
    assert math.isclose(ref.norm(ref.to_np(p.grad), 2), 0.1, rel_tol=1e-4)
