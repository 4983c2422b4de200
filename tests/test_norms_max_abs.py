"""max |g| per tensor from the norm pass (``compute_norms(with_max_abs=True)``): exact against
a float64 reference, NaN-propagating, and without any effect on the norms themselves."""

from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradguard as gg
from gradguard import norms as N
from gradguard.kernels import cpu

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _ref_max_abs(g: torch.Tensor) -> float:
    return float(g.double().abs().max()) if g.numel() else 0.0


def _check(got: torch.Tensor, grads: list[torch.Tensor]) -> None:
    # float32, float64 for float64 gradients (issue 15: their norms are float64 too)
    want = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    assert got.dtype == want and got.shape == (len(grads),)
    for g, v in zip(grads, got.tolist()):
        ref = _ref_max_abs(g)
        if math.isnan(ref):
            assert math.isnan(v)
        else:  # max |g| of a float16/bfloat16/float32 tensor is a float32 value: exact
            assert v == np.float32(ref), (g.dtype, v, ref)


def _grads(dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    big = torch.randn(3 * cpu.CHUNK + 5, dtype=dtype)
    peak = big.clone()
    peak[2 * cpu.CHUNK + 1] = -40.0  # the max in the last-but-one chunk, negative
    return [big, torch.zeros(0, dtype=dtype), torch.tensor([1.0, -5.0, 2.0], dtype=dtype), peak,
            torch.randn(20, 30, dtype=dtype).t(), torch.randn(7, dtype=dtype)]


def test_max_abs_matches_reference_for_every_dtype_and_path():
    for dtype in DTYPES:
        grads = _grads(dtype)
        for norm_type in (2.0, 1.0, math.inf):
            n = N.compute_norms(grads, norm_type, with_max_abs=True)
            _check(n.max_abs, grads)
        _check(N._max_abs(grads), grads)


def test_norms_are_bit_identical_with_and_without_max_abs():
    """A monitored layer step must clip exactly like any other step."""
    for dtype in DTYPES:
        grads = _grads(dtype) + [torch.randn(5 * cpu.CHUNK, dtype=dtype) * 1e-3]
        a = N.compute_norms(grads, 2.0)
        b = N.compute_norms(grads, 2.0, with_max_abs=True)
        assert a.max_abs is None
        assert torch.equal(a.per_tensor, b.per_tensor) and torch.equal(a.total, b.total)


def test_nonfinite_elements():
    g = torch.randn(2 * cpu.CHUNK + 3)
    late_nan = g.clone()
    late_nan[-2] = math.nan
    neg_inf = torch.tensor([-math.inf, 1.0])
    half_nan = torch.randn(1000).half()
    half_nan[500] = math.nan
    grads = [g, late_nan, neg_inf, half_nan]
    for with_dtypes in (grads, [x.float() for x in grads]):
        got = N.compute_norms(with_dtypes, with_max_abs=True).max_abs.tolist()
        assert got[0] == float(g.abs().max()) and math.isnan(got[1]) and got[2] == math.inf
        assert math.isnan(got[3])


def test_mixed_dtypes_keep_parameter_order():
    grads = [torch.randn(10), torch.randn(5).half(), torch.randn(3, dtype=torch.float64) * 9,
             torch.randn(4).bfloat16()]
    _check(N.compute_norms(grads, with_max_abs=True).max_abs, grads)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=0, max_size=40),
                min_size=1, max_size=6),
       st.sampled_from(DTYPES[:3]))
def test_max_abs_property(values, dtype):
    grads = [torch.tensor(v, dtype=torch.float32).to(dtype) for v in values]
    if dtype == torch.float16:
        grads = [g.nan_to_num(posinf=65504.0, neginf=-65504.0) for g in grads]
    n = N.compute_norms(grads, with_max_abs=True)
    _check(n.max_abs, grads)
    assert torch.equal(n.per_tensor, N.compute_norms(grads).per_tensor)


def test_guard_hands_max_abs_to_the_monitor_only_on_layer_steps(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    mon = gg.Monitor(tmp_path / "run", layer_every=3, flush_every=6, async_flush=False)
    guard = gg.Guard(net, clipper=gg.NormClip(0.1), monitor=mon)
    seen = []
    for step in range(1, 7):
        opt.zero_grad()
        net(torch.randn(8, 4)).pow(2).mean().backward()
        pre = [p.grad.detach().clone() for p in net.parameters()]
        stats = guard.step(opt)
        seen.append(stats.per_tensor_max_abs is not None)
        if step % 3 == 0:
            _check(stats.per_tensor_max_abs, pre)  # before clipping
    guard.close()
    assert seen == [False, False, True, False, False, True]


def test_threaded_pass_gives_the_same_bits(monkeypatch):
    """Chunks handed to several threads: same norms and max, whatever the scheduling."""
    from gradguard import _pool

    torch.manual_seed(3)
    grads = [torch.randn(5 * 64 + 3), torch.randn(0), torch.randn(40, 9).t(), torch.randn(64),
             torch.randn(300, dtype=torch.float64), torch.tensor([math.nan, 1.0]), torch.randn(2000)]
    monkeypatch.setattr(cpu, "CHUNK", 64)
    monkeypatch.setattr(cpu, "SMALL", 16)
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 0)
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(_pool, "threads", lambda t=threads: t)
        for _ in range(3):
            results.append(N.compute_norms(grads, with_max_abs=True))
    for r in results[1:]:
        torch.testing.assert_close(r.per_tensor, results[0].per_tensor, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(r.max_abs, results[0].max_abs, rtol=0, atol=0, equal_nan=True)
    _check(results[-1].max_abs, grads)


def test_pool_survives_fork():
    """A DataLoader worker forked after the pool started can still use it."""
    import os

    from gradguard import _pool

    _pool.run_indexed(4, lambda j: None, 2)  # the parent's pool exists
    pid = os.fork()
    if pid == 0:  # child: must not hang on the parent's (absent) threads
        out = [0] * 8

        def work(j):
            out[j] = j * j

        try:
            _pool.run_indexed(8, work, 2)
            os._exit(0 if out == [j * j for j in range(8)] else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_pool_waits_for_helpers_and_raises_their_error():
    import threading
    import time

    import pytest

    from gradguard import _pool

    done = []
    lock = threading.Lock()

    def work(j):
        if j == 3:
            raise ValueError("item 3")
        time.sleep(0.002)
        with lock:
            done.append(j)

    with pytest.raises(ValueError, match="item 3"):
        _pool.run_indexed(12, work, 2)
    settled = len(done)
    time.sleep(0.05)
    assert len(done) == settled  # nothing still running after the call returned
