"""The Triton kernels on the CPU, in Triton's interpreter (``TRITON_INTERPRET=1``).

The interpreter must be chosen before the kernels are decorated, so ``test_interpreter_run``
runs this same file again in a subprocess with the variable set; there the other tests run
(in this process they are skipped). Everything is skipped when Triton is not installed.
Small ``CHUNK``/``BLOCK`` values make every path run: several chunks per tensor, several
tiles per chunk, more chunks than programs, the float64 rescue.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import reference as ref
import torch

triton = pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_interp = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 subprocess")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NORMS = [2.0, 1.0, math.inf]


def test_interpreter_run():
    if INTERPRET:
        pytest.skip("already in the interpreter subprocess")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "-W", "ignore::RuntimeWarning", __file__],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    m = re.search(r"(\d+) passed", proc.stdout)
    assert m and int(m.group(1)) >= 20 and "failed" not in proc.stdout, proc.stdout[-3000:]


@pytest.fixture
def kern(monkeypatch):
    from gradguard import kernels
    monkeypatch.setattr(kernels, "CHUNK", 256)
    monkeypatch.setattr(kernels, "BLOCK", 64)
    kernels._LAYOUTS.clear()
    assert kernels.backend("cpu") == "triton"
    return kernels


def _tensors(dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(1000,), (7, 5), (0,), (), (3, 300), (16,), (4096,)]
    return [(torch.randn(s, generator=g) * scale).to(dtype) for s in shapes]


def _ref_norms(ts, p):
    arrays = [ref.to_np(t) for t in ts]
    return [ref.norm(a, p) for a in arrays], ref.total_norm(arrays, p)


@needs_interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", NORMS)
def test_norms_match_float64_reference(kern, dtype, p):
    ts = _tensors(dtype)
    per, total = kern.multi_tensor_norms(ts, p, allow_cpu=True)
    want_per, want_total = _ref_norms(ts, p)
    assert per.dtype == torch.float32 and total.dtype == torch.float32
    np.testing.assert_allclose(per.double().numpy(), want_per, rtol=2e-6, atol=0)
    assert math.isclose(float(total), want_total, rel_tol=2e-6)


@needs_interp
def test_norms_deterministic(kern):
    ts = _tensors(torch.float32, seed=3)
    a = kern.multi_tensor_norms(ts, 2.0, allow_cpu=True)
    b = kern.multi_tensor_norms(ts, 2.0, allow_cpu=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_interp
def test_overflowing_squares_are_rescued(kern):
    big = torch.zeros(1000)
    big[10], big[700] = 3e20, -4e20  # squares overflow float32; the norm 5e20 does not
    bf = torch.tensor([1e30, 1e30, 0.0], dtype=torch.bfloat16)
    per, total = kern.multi_tensor_norms([big, torch.ones(4)], 2.0, allow_cpu=True)
    assert math.isclose(float(per[0]), 5e20, rel_tol=1e-6)
    assert math.isclose(float(total), 5e20, rel_tol=1e-6)
    per, _ = kern.multi_tensor_norms([bf], 2.0, allow_cpu=True)
    assert math.isclose(float(per[0]), float(bf[0].double()) * math.sqrt(2), rel_tol=1e-6)
    # p = 1: the sum of magnitudes overflows float32
    per, _ = kern.multi_tensor_norms([torch.full((300,), 3e37)], 1.0, allow_cpu=True)
    assert math.isinf(float(per[0]))  # 9e39 > float32 max: inf is the right float32 answer
    per, _ = kern.multi_tensor_norms([torch.full((3,), 3e37)], 1.0, allow_cpu=True)
    assert math.isclose(float(per[0]), 9e37, rel_tol=1e-6)


@needs_interp
def test_underflowing_squares_are_rescued(kern):
    tiny = torch.full((1000,), 1e-30)  # squares 1e-60 are 0 in float32
    per, total = kern.multi_tensor_norms([tiny, torch.zeros(5)], 2.0, allow_cpu=True)
    assert math.isclose(float(per[0]), 1e-30 * math.sqrt(1000), rel_tol=1e-6)
    assert float(per[1]) == 0.0
    assert math.isclose(float(total), 1e-30 * math.sqrt(1000), rel_tol=1e-6)


@needs_interp
@pytest.mark.parametrize("p", NORMS)
def test_nonfinite_propagates(kern, p):
    a = torch.ones(600)
    a[400] = float("nan")
    b = torch.ones(300)
    b[5] = float("inf")
    per, total = kern.multi_tensor_norms([a, b, torch.ones(3)], p, allow_cpu=True)
    assert math.isnan(float(per[0]))
    assert math.isinf(float(per[1])) and float(per[1]) > 0
    assert float(per[2]) == pytest.approx(ref.norm(np.ones(3), p))
    assert math.isnan(float(total))


@needs_interp
def test_odd_offsets_and_views(kern):
    base = torch.randn(2000).to(torch.bfloat16)
    ts = [base[1:700], base[703:1999]]  # element offsets not multiples of a 16-byte vector
    per, total = kern.multi_tensor_norms(ts, 2.0, allow_cpu=True)
    want_per, want_total = _ref_norms(ts, 2.0)
    np.testing.assert_allclose(per.double().numpy(), want_per, rtol=2e-6)
    assert kern.multi_tensor_norms([torch.randn(4, 6).t()], 2.0, allow_cpu=True) is None


@needs_interp
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coef", [0.3712345, 0.0, 1.0])
def test_scale_bit_equal_to_foreach_mul(kern, dtype, coef):
    ts = _tensors(dtype, seed=5)
    want = [t.clone() for t in ts]
    c = torch.tensor(coef, dtype=torch.float32)
    torch._foreach_mul_(want, c)
    ptrs = [t.data_ptr() for t in ts]
    kern.multi_tensor_scale_(ts, c, allow_cpu=True)
    for t, w, p in zip(ts, want, ptrs):
        assert t.data_ptr() == p
        if dtype == torch.bfloat16 and coef not in (0.0, 1.0):
            # Triton's interpreter truncates float32 -> bfloat16 (the GPU rounds to nearest
            # even, bit-equal to torch: tests/test_kernels_cuda.py): within one bf16 ulp here.
            torch.testing.assert_close(t.float(), w.float(), rtol=2.0 ** -7, atol=0)
        else:
            assert torch.equal(t, w)


@needs_interp
def test_scale_mixed_dtypes(kern):
    ts = _tensors(torch.float32, seed=1)[:2] + _tensors(torch.bfloat16, seed=2)[:2]
    want = [t.clone() for t in ts]
    c = torch.tensor(0.25)
    for w in want:
        w.mul_(c)
    kern.multi_tensor_scale_(ts, c, allow_cpu=True)
    for t, w in zip(ts, want):
        assert torch.equal(t, w)


@needs_interp
def test_one_grouping_for_the_norm_and_the_scale(kern, monkeypatch):
    """``Groups`` built once: the norm pass and the scale look each group's chunk table up
    once between them, and the results are the per-group kernels' own."""
    ts = _tensors(torch.float32, seed=7)[:3] + _tensors(torch.bfloat16, seed=8)[:3]
    ts = [ts[0], ts[3], ts[1], ts[4], ts[2], ts[5]]  # dtypes interleaved
    groups = kern.Groups(ts)
    assert groups.dtypes == [torch.float32, torch.bfloat16] and not groups.single
    assert groups.index == [[0, 2, 4], [1, 3, 5]]
    calls = []
    real = kern._layout
    monkeypatch.setattr(kern, "_layout", lambda t: calls.append(len(t)) or real(t))
    per, total, _ = kern.group_norms(groups, 2.0, allow_cpu=True)
    assert total is None  # several groups: the caller forms the total from per_tensor
    want_per, _ = _ref_norms(ts, 2.0)
    np.testing.assert_allclose(per.double().numpy(), want_per, rtol=2e-6, atol=0)
    want = [t * 0.5 for t in ts]  # exact in every dtype
    kern.multi_tensor_scale_(ts, torch.tensor(0.5), allow_cpu=True, groups=groups)
    assert calls == [3, 3]  # one lookup per group for both passes
    for t, w in zip(ts, want):
        assert torch.equal(t, w)
    kern.multi_tensor_scale_(ts, torch.tensor(0.5), allow_cpu=True, groups=kern.Groups(ts[:2]))
    assert calls == [3, 3, 3, 3]  # the Groups of another list: grouped again (all scaled)
    ts[0] = ts[0].clone()  # a tensor replaced in the same list: its old table is not used
    assert not groups.of(ts)
    kern.multi_tensor_scale_(ts, torch.tensor(2.0), allow_cpu=True, groups=groups)
    assert calls == [3, 3, 3, 3, 3, 3]
    for t, w in zip(ts, want):  # x 0.5 x 2: the clone scaled too
        assert torch.equal(t, w)


@needs_interp
def test_one_group_gives_the_kernels_total(kern):
    ts = _tensors(torch.float32, seed=9)
    per, total, mx = kern.group_norms(kern.Groups(ts), 2.0, with_max_abs=True, allow_cpu=True)
    want_per, want_total = _ref_norms(ts, 2.0)
    np.testing.assert_allclose(per.double().numpy(), want_per, rtol=2e-6, atol=0)
    assert math.isclose(float(total), want_total, rel_tol=2e-6)
    assert torch.equal(mx, torch.stack([t.abs().max() if t.numel() else torch.zeros(())
                                        for t in ts]))
