"""The kernels' one dispatcher on the CPU: ``Groups`` (the tensors of a call grouped once by
dtype), ``group_norms`` over it, and the scale of the same list taking the norm pass's
grouping (``GradNorms.groups``). The Triton side of the same plan runs in
``test_kernels_interpret.py`` (Triton's interpreter) and ``test_kernels_cuda.py``."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref
import torch

import gradguard as gg
from gradguard import clippers, kernels, norms


def _mixed(seed=0):
    g = torch.Generator().manual_seed(seed)
    dts = [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float16,
           torch.float64, torch.float32]
    shapes = [(300,), (5, 7), (0,), (), (40,), (9000,), (5000,)]
    return [torch.randn(s, generator=g).to(dt) for s, dt in zip(shapes, dts)]


def test_groups_by_dtype_in_first_seen_order():
    ts = _mixed()
    g = kernels.Groups(ts)
    assert not g.single and g.device == torch.device("cpu")
    assert g.dtypes == [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    assert g.index == [[0, 3, 6], [1, 5], [2], [4]]
    for idx, members in zip(g.index, g.members):
        assert all(m is ts[i] for i, m in zip(idx, members))
    one = kernels.Groups(ts[:1] + ts[3:4])
    assert one.single and one.members[0] is one.tensors and list(one.index[0]) == [0, 1]
    empty = kernels.Groups([])
    assert empty.members == [] and empty.dtypes == []


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf"), 3.0])
def test_group_norms_match_the_float64_reference_in_parameter_order(norm_type):
    ts = _mixed(1)
    per, total, mx = kernels.group_norms(kernels.Groups(ts), norm_type, with_max_abs=True)
    assert total is None  # several groups: compute_norms forms the total
    assert per.dtype == torch.float64 and mx.dtype == torch.float64  # a float64 gradient
    arrays = [ref.to_np(t) for t in ts]
    np.testing.assert_allclose(per.numpy(), [ref.norm(a, norm_type) for a in arrays], rtol=2e-6)
    np.testing.assert_array_equal(mx.numpy(), [np.abs(a).max() if a.size else 0.0 for a in arrays])


def test_group_norms_of_nothing():
    per, total, mx = kernels.group_norms(kernels.Groups([]), 2.0, with_max_abs=True)
    assert per.shape == (0,) and total is None and mx.shape == (0,)


def test_compute_norms_hands_its_groups_to_the_scale(monkeypatch):
    ts = [t.float() * 10 for t in _mixed(2)]
    params = []
    for t in ts:
        p = torch.nn.Parameter(torch.zeros_like(t))
        p.grad = t
        params.append(p)
    seen = []
    real = kernels.multi_tensor_scale_

    def spy(tensors, coef, **kw):
        seen.append((tensors, kw.get("groups")))
        return real(tensors, coef, **kw)

    monkeypatch.setattr(clippers, "multi_tensor_scale_", spy)
    built = []
    real_groups = kernels.Groups
    monkeypatch.setattr(kernels, "Groups", lambda t: built.append(len(t)) or real_groups(t))
    theirs = [torch.nn.Parameter(torch.zeros_like(t)) for t in ts]
    for q, t in zip(theirs, ts):
        q.grad = t.clone()
    total = gg.clip_grad_norm_(params, 1.0)
    torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    for p, q in zip(params, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)
    assert built == [len(ts)]  # one grouping per call
    (tensors, groups), = seen
    assert groups is not None and groups.tensors is tensors
    assert float(total) > 1.0
    n = norms.compute_norms([p.grad for p in params])
    assert n.groups.tensors[0] is params[0].grad
