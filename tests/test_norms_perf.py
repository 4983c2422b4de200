"""The CPU fast paths of the norms and the scale: same results as the float64 reference and
torch, overflow and underflow rescue, half precision, non-contiguous gradients, no host read
that the sync counter sees, the skipped multiply, torch.compile, and the benchmark's plumbing.

Small ``kernels.cpu.CHUNK``/``SMALL`` values make every path run on small tensors: many
chunks per tensor, the packed small-tensor path and the chunked one side by side.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import reference as ref
import torch

import gradguard as gg
from gradguard import kernels, norms
from gradguard.kernels import cpu

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(cpu, "CHUNK", 64)
    monkeypatch.setattr(cpu, "SMALL", 32)


def _grads(dtype, seed=0, scale=1.0, shapes=((1000,), (7, 5), (0,), (), (3, 300), (16,), (513,))):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * scale).to(dtype) for s in shapes]


def _params(grads):
    ps = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g
        ps.append(p)
    return ps


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunked", [False, True])
def test_cpu_norms_match_float64_reference(request, dtype, chunked):
    if chunked:
        request.getfixturevalue("small_chunks")
    gs = _grads(dtype, seed=1, scale=3.0)
    got = norms.compute_norms(gs, 2.0)
    arrays = [ref.to_np(g) for g in gs]
    np.testing.assert_allclose(got.per_tensor.double().numpy(), [ref.norm(a, 2) for a in arrays],
                               rtol=2e-6, atol=0)
    assert math.isclose(float(got.total), ref.total_norm(arrays, 2), rel_tol=2e-6)
    want = torch.float64 if dtype == torch.float64 else torch.float32  # float64 kept (issue 15)
    assert got.per_tensor.dtype == want and got.total.dtype == want


def test_cpu_norm_of_a_long_tensor_is_more_accurate_than_torch():
    # 3M positive-mean values: a single float32 accumulation stream drifts; chunks don't.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3_000_000, generator=g) + 0.5
    want = math.sqrt(float(torch.dot(x.double(), x.double())))
    ours = float(gg.grad_norm(_params([x])).total)
    theirs = float(torch.linalg.vector_norm(x))
    assert abs(ours / want - 1) < 1e-6
    assert abs(ours / want - 1) <= abs(theirs / want - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clip_matches_torch_on_the_fast_path(small_chunks, dtype):
    gs = _grads(dtype, seed=2, scale=10.0)
    ours, theirs = _params(gs), _params([g.clone() for g in gs])
    n1 = gg.clip_grad_norm_(ours, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n2 = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    torch.testing.assert_close(n1, n2, rtol=1e-6, atol=0)  # float64 in, float64 out (as torch)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_clip_matches_reference_and_torch_rounding(small_chunks, dtype):
    gs = _grads(dtype, seed=3, scale=2.0)
    arrays = [ref.to_np(g) for g in gs]
    total_ref = ref.total_norm(arrays, 2)
    ps = _params(gs)
    before = [g.clone() for g in gs]
    total = gg.clip_grad_norm_(ps, 1.0)
    assert math.isclose(float(total), total_ref, rel_tol=2e-6)
    # the scale is torch's: float32 x * coef rounded to the dtype, coef from our norm
    coef = torch.clamp(1.0 / (total + 1e-6), max=1.0)
    for p, b in zip(ps, before):
        assert torch.equal(p.grad, (b.float() * coef).to(dtype))


def test_float32_overflow_rescued_in_a_long_tensor(small_chunks):
    x = torch.ones(1000)
    x[100], x[900] = 3e20, -4e20  # squares overflow float32; the norm does not
    want = math.sqrt(9e40 + 16e40 + 998)
    ps = _params([x, torch.ones(3)])
    total = gg.clip_grad_norm_(ps, 1.0)
    assert math.isclose(float(total), want, rel_tol=1e-6)
    assert math.isclose(ref.total_norm([ref.to_np(p.grad) for p in ps], 2), 1.0, rel_tol=1e-5)


def test_bfloat16_and_float64_overflow(small_chunks):
    b = torch.full((300,), 1e30, dtype=torch.bfloat16)
    assert math.isclose(float(gg.grad_norm(_params([b])).total),
                        float(b[0].double()) * math.sqrt(300), rel_tol=1e-6)
    d = torch.full((300,), 1e200, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy "overflow encountered in cast" either
        per = gg.grad_norm(_params([d, torch.full((4,), 3e38)])).per_tensor
    # float64 gradients get a float64 norm (issue 15): 1.7e201 fits, though its square does not
    assert per.dtype == torch.float64
    assert math.isclose(float(per[0]), 1e200 * math.sqrt(300), rel_tol=1e-12)
    assert math.isinf(float(per[1]))  # a float32 norm of 6e38 does not fit float32: inf
    d = torch.full((300,), 1e30, dtype=torch.float64)
    assert math.isclose(float(gg.grad_norm(_params([d])).total), 1e30 * math.sqrt(300), rel_tol=1e-6)
    # float64 chunks are rescaled by their largest magnitude m when recomputed: m**2 * 4
    assert math.isclose(cpu._exact_sumsq(np.full((4,), 1e150)), 4e300, rel_tol=1e-12)
    assert cpu._exact_sumsq(np.zeros(3)) == 0.0


def test_underflow_rescued(small_chunks):
    tiny = torch.full((1000,), 1e-30)  # squares 1e-60 are 0 in float32; torch says 0
    assert float(torch.linalg.vector_norm(tiny)) == 0.0
    got = gg.grad_norm(_params([tiny, torch.zeros(10)]))
    assert math.isclose(float(got.per_tensor[0]), 1e-30 * math.sqrt(1000), rel_tol=1e-6)
    assert float(got.per_tensor[1]) == 0.0
    den = torch.full((10,), 1e-40)  # float32 denormals; the norm 3e-40 is one too, so it
    # carries only ~17 significant bits: the nearest float32 is what can be asked for
    want = torch.tensor(float(den[0].double()) * math.sqrt(10), dtype=torch.float32)
    assert torch.equal(gg.grad_norm(_params([den])).total, want)


def test_nonfinite_propagates(small_chunks):
    a = torch.ones(500)
    a[321] = float("nan")
    b = torch.ones(500)
    b[3] = float("inf")
    got = gg.grad_norm(_params([a, b, torch.ones(2)]))
    assert math.isnan(float(got.per_tensor[0]))
    assert math.isinf(float(got.per_tensor[1]))
    assert math.isclose(float(got.per_tensor[2]), math.sqrt(2), rel_tol=1e-7)
    assert not bool(torch.isfinite(got.total))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_grads(small_chunks, dtype):
    base = torch.randn(40, 30).to(dtype)
    gs = [base.t(), base[::2, 1:], torch.randn(200).to(dtype)[::3]]
    assert not any(g.is_contiguous() for g in gs)
    got = gg.grad_norm(_params(gs))
    arrays = [ref.to_np(g) for g in gs]
    np.testing.assert_allclose(got.per_tensor.double().numpy(), [ref.norm(a, 2) for a in arrays],
                               rtol=2e-6)


def test_mixed_dtypes_keep_parameter_order(small_chunks):
    gs = [torch.randn(100), torch.randn(50).double(), torch.randn(70).to(torch.bfloat16),
          torch.randn(30)]
    got = gg.grad_norm(_params(gs))
    np.testing.assert_allclose(got.per_tensor.double().numpy(),
                               [ref.norm(ref.to_np(g), 2) for g in gs], rtol=2e-6)


def test_no_multiply_when_nothing_to_clip(monkeypatch):
    from gradguard import kernels

    calls = []
    real = kernels._cpu_scale_

    def spy(tensors, coef, c):
        calls.append(len(tensors))
        return real(tensors, coef, c)

    monkeypatch.setattr(kernels, "_cpu_scale_", spy)
    gs = _grads(torch.float32, seed=4)
    ps = _params(gs)
    before = [g.clone() for g in gs]
    gg.clip_grad_norm_(ps, 1e6)
    assert calls == []
    for p, b in zip(ps, before):
        assert torch.equal(p.grad, b)
    gg.clip_grad_norm_(ps, 1.0)
    assert calls == [len(gs)]


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_scale_is_bit_identical_to_torch_foreach_mul(threads, monkeypatch):
    """numpy's multiply on the thread pool writes exactly what torch's would."""
    from gradguard import _pool, kernels

    monkeypatch.setattr(_pool, "threads", lambda: threads)
    torch.manual_seed(0)
    big = torch.randn(3 * cpu.CHUNK + 11)
    tensors = [big, torch.randn(0), torch.randn(7, 5).t(), torch.randn(100, dtype=torch.float64),
               torch.randn(50).half(), torch.randn(50).bfloat16(), torch.tensor([1e-40, -3e38, 7.0]),
               torch.randn(2 * cpu.CHUNK) * 1e-3]
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 0)  # the pool even for small inputs
    for coef_value in (0.3, 1e-30, 7.5, float("nan")):
        coef = torch.tensor(coef_value, dtype=torch.float32)
        want = [t.clone() for t in tensors]
        torch._foreach_mul_(want, coef)
        got = [t.clone() for t in tensors]
        versions = [t._version for t in got]
        kernels._cpu_scale_(got, coef, float(coef))
        for w, g, v in zip(want, got, versions):
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
            assert g.stride() == w.stride()
            assert g._version > v  # autograd sees the in-place change, as with torch's mul_


def test_cpu_clip_makes_no_host_read_the_counter_sees(sync_counter, small_chunks):
    ps = _params(_grads(torch.float32, seed=5, scale=5.0))
    sync_counter.calls.clear()
    gg.clip_grad_norm_(ps, 1.0)
    gg.clip_grad_norm_(ps, 1e9)
    assert sync_counter.calls == []


def test_scale_reverse_order_same_result():
    gs = _grads(torch.float32, seed=6)
    want = [g * 0.37 for g in gs]
    kernels.multi_tensor_scale_(gs, torch.tensor(0.37))
    for g, w in zip(gs, want):
        assert torch.equal(g, w)


def test_torch_compile_fullgraph():
    """``torch.compile`` traces clip_grad_norm_ without a graph break (the fast path's host
    reads step aside while dynamo traces); aot_eager keeps the test fast."""
    gs = _grads(torch.float32, seed=7, scale=4.0)
    ps = _params(gs)
    want = _params([g.clone() for g in gs])

    def step(params):
        return gg.clip_grad_norm_(params, 1.0)

    got = torch.compile(step, backend="aot_eager", fullgraph=True)(ps)
    exp = gg.clip_grad_norm_(want, 1.0)
    torch.testing.assert_close(got, exp, rtol=1e-6, atol=0)
    for a, b in zip(ps, want):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-12)


def test_backend_names():
    assert kernels.backend("cpu") in ("torch", "triton")
    assert kernels.multi_tensor_norms([torch.ones(3)], 2.0) is None  # CPU: not the kernel


def test_bench_plumbing(monkeypatch, capsys):
    from gradguard.cli import main
    bench = kernels.load_bench()  # benchmarks/clip_bench.py

    monkeypatch.setitem(bench.SETS, "tiny", lambda: bench.gpt2_shapes(d=16, layers=2, vocab=50, ctx=8))
    rows = bench.run("cpu", [("tiny", "float32"), ("tiny", "bfloat16")], repeats=2, warmup=1)
    out = capsys.readouterr().out
    assert "| tiny | float32 | 28 |" in out and "| tiny | bfloat16 |" in out
    for r in rows:
        assert r.tensors == 28 and r.gg_norm_err < 1e-5 and r.floor_clip_ms > 0
        assert r.clip_max_abs_diff < 1e-2
    assert main(["bench", "--device", "cpu", "--sets", "tiny:float16", "--repeats", "1"]) == 0
    assert "| tiny | float16 |" in capsys.readouterr().out
    assert len(bench.gpt2_shapes()) == 148 and sum(math.prod(s) for s in bench.gpt2_shapes()) == 124_439_808
    assert len(bench.SETS["gpt-1.3B"]()) == 292
