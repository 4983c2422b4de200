"""The update-ratio sample: which elements, and the per-parameter sums against float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradguard.monitor import update_sample as U


def _ref_indices(n: int, sample: int | None) -> np.ndarray:
    if sample is None or n <= sample:
        return np.arange(n)
    runs = n // U.RUN
    k = max(1, -(-runs // max(1, sample // U.RUN)))
    return np.concatenate([np.arange(r * U.RUN, (r + 1) * U.RUN) for r in range(0, runs, k)])


def _params():
    torch.manual_seed(0)
    return [torch.randn(300, 7), torch.randn(5), torch.randn(0), torch.randn(40, 30).t(),
            torch.randn(1000, dtype=torch.float64), torch.randn(77).bfloat16(), torch.randn(4097)]


@pytest.mark.parametrize("sample", [None, 64, 100, 4096])
@pytest.mark.parametrize("owner_max", [U._OWNER_INDEX_MAX, 10])
def test_sums_match_float64_reference(sample, owner_max, monkeypatch):
    monkeypatch.setattr(U, "_OWNER_INDEX_MAX", owner_max)
    params = _params()
    us = U.UpdateSample(params, sample)
    before = us.take()
    ref_before = [p.detach().reshape(-1).double().numpy()[_ref_indices(p.numel(), sample)]
                  for p in params]
    for p in params:
        p.add_(0.01 * torch.randn_like(p) if p.is_contiguous() else 0.0)
    got_w = us.sumsq(before).numpy()
    got_d = us.change_sumsq(before).numpy()
    for j, p in enumerate(params):
        now = p.detach().reshape(-1).double().numpy()[_ref_indices(p.numel(), sample)]
        np.testing.assert_allclose(got_w[j], np.sum(ref_before[j] ** 2), rtol=1e-6)
        np.testing.assert_allclose(got_d[j], np.sum((now - ref_before[j]) ** 2), rtol=1e-5, atol=1e-12)


def test_views_follow_new_parameter_memory():
    w = torch.ones(64)
    us = U.UpdateSample([w], 16)
    a = us.take()
    w.data = torch.full((64,), 3.0)  # replaced: the sample must read the new memory
    assert float(us.change_sumsq(a)[0]) == pytest.approx(16 * 4.0)
