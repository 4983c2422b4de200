"""Norm numerics against float64 references and torch (issue 15): float64 kept on every
path, p-norms other than 2 that neither overflow nor underflow, torch's parity points (the
empty-generator warning, refused p <= 0, the inf-norm of an empty tensor), and the packed
small-tensor path (thousands of small gradients, all-zero gradients, no rescue of zeros).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradguard as gg
from gradguard import kernels, norms
from gradguard.kernels import cpu


def _params(grads):
    ps = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g.clone()
        ps.append(p)
    return ps


def _ref_pnorm(arrays, p):
    """float64 p-norm of the concatenation, max-normalised (no overflow, no underflow)."""
    x = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays] + [np.zeros(0)])
    if x.size == 0:
        return 0.0
    a = np.abs(x)
    if math.isinf(p):
        return float(a.max())
    m = a.max()
    if m == 0 or not np.isfinite(m):
        return float(m)
    return float(m * np.sum((a / m) ** p) ** (1.0 / p))


def _shapes():
    return [(40, 30), (7,), (), (5000,), (3, 300), (16,)]  # no empty one: torch refuses its inf-norm


# -- 1. float64 gradients get a float64 norm -------------------------------------------------

@pytest.mark.parametrize("p", [2.0, 1.0, 3.0, math.inf])
def test_float64_clip_grad_norm_matches_torch_to_1e12(p):
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(s, generator=g, dtype=torch.float64) * 3 for s in _shapes()]
    ours, theirs = _params(grads), _params(grads)
    n_ours = gg.clip_grad_norm_(ours, 1.0, norm_type=p)
    n_torch = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type=p)
    assert n_ours.dtype == torch.float64
    assert abs(float(n_ours) - float(n_torch)) <= 1e-12 * float(n_torch)
    assert abs(float(n_ours) - _ref_pnorm(grads, p)) <= 1e-12 * float(n_torch)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=0)


def test_float64_norm_on_every_path(monkeypatch):
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(s, generator=g, dtype=torch.float64) for s in _shapes()]
    want = np.array([np.sqrt(np.sum(x.numpy() ** 2)) for x in grads])
    fast = norms.per_tensor_norms(grads)  # the CPU kernel
    foreach = torch.stack(norms._foreach_norms(grads, 2.0))  # the torch fallback
    for got in (fast, foreach):
        assert got.dtype == torch.float64
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-13)
    # the Triton kernels take no float64 (None: the caller falls back, keeping float64)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.multi_tensor_norms(grads, 2.0, allow_cpu=True) is None
    # torch.compile traces the fallback
    compiled = torch.compile(lambda gs: norms.compute_norms(gs).total, backend="eager")
    tot = compiled(grads)
    assert tot.dtype == torch.float64
    assert abs(float(tot) - float(np.sqrt(np.sum(want ** 2)))) <= 1e-12 * float(tot)


def test_mixed_float32_float64_total_is_float64():
    a = torch.randn(100, dtype=torch.float64)
    b = torch.randn(50)
    n = gg.grad_norm(_params([a, b]))
    assert n.total.dtype == torch.float64 and n.per_tensor.dtype == torch.float64
    # b's own norm is a float32 value (as torch's): float32 rounding in the total
    assert math.isclose(float(n.total), math.sqrt(float((a ** 2).sum()) + float((b.double() ** 2).sum())),
                        rel_tol=1e-7)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 3000), min_size=1, max_size=6), st.integers(-150, 150),
       st.integers(0, 2**31 - 1))
def test_float64_norm_property(sizes, exp10, seed):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** exp10 for n in sizes]
    got = gg.grad_norm(_params(grads)).total
    assert got.dtype == torch.float64
    want = _ref_pnorm(grads, 2.0)
    assert abs(float(got) - want) <= 1e-12 * want


# -- 2. p-norms other than 2: max-normalised -----------------------------------------------

def test_norm_type_8_true_norm_1_95e10_is_finite_and_clips():
    g = torch.full((300,), 1.95e10 / 300 ** 0.125) * torch.linspace(0.9, 1.1, 300)
    want = _ref_pnorm([g], 8.0)
    assert 1.9e10 < want < 2.0e10  # the case of issue 15
    ps = _params([g])
    stats = gg.NormClip(1.0, norm_type=8)(ps)
    assert math.isfinite(float(stats.total_norm))
    assert math.isclose(float(stats.total_norm), want, rel_tol=1e-5)
    assert bool(stats.clipped)
    assert math.isclose(_ref_pnorm([ps[0].grad], 8.0), 1.0, rel_tol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.5, 1.5, 3.0, 8.0, 20.0])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_pnorm_no_overflow_no_underflow(dtype, p, scale):
    if dtype == torch.float16:
        scale = {1e-30: 1e-4, 1.0: 1.0, 1e30: 6e4}[scale]
    if dtype == torch.float64:
        scale = scale ** 5  # 1e-150 .. 1e150: x**8 leaves float64's range
    g = torch.Generator().manual_seed(7)
    grads = [(torch.rand(s, generator=g, dtype=torch.float64) * scale).to(dtype)
             for s in [(50, 20), (7,), (0,), (9000,)]]
    got = gg.grad_norm(_params(grads), norm_type=p)
    want = _ref_pnorm([x.double() for x in grads], p)
    assert math.isfinite(float(got.total)) and float(got.total) > 0
    assert math.isclose(float(got.total), want, rel_tol=2e-5)
    for x, n in zip(grads, got.per_tensor):
        w = _ref_pnorm([x.double()], p)
        assert math.isclose(float(n), w, rel_tol=2e-5, abs_tol=0)


@pytest.mark.parametrize("p", [1.5, 3.0, 8.0])
def test_pnorm_matches_torch_on_ordinary_values(p):
    g = torch.Generator().manual_seed(8)
    grads = [torch.randn(s, generator=g) for s in _shapes()]
    ours, theirs = _params(grads), _params(grads)
    a = gg.clip_grad_norm_(ours, 0.5, norm_type=p)
    b = torch.nn.utils.clip_grad_norm_(theirs, 0.5, norm_type=p)
    assert math.isclose(float(a), float(b), rel_tol=1e-5)
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-5, atol=1e-7)


def test_pnorm_nonfinite_propagates():
    g = torch.randn(100)
    g[3] = float("nan")
    assert math.isnan(float(gg.grad_norm(_params([g, torch.randn(5)]), norm_type=3).total))
    g[3] = float("inf")
    assert float(gg.grad_norm(_params([g]), norm_type=3).total) == math.inf


# -- 3. torch parity points ----------------------------------------------------------------

def test_exhausted_generator_warns_like_torch():
    msg = "`parameters` is an empty generator, no gradient clipping will occur"
    with pytest.warns(UserWarning, match="empty generator") as ours:
        total = gg.clip_grad_norm_((p for p in []), 1.0)
    with pytest.warns(UserWarning, match="empty generator") as theirs:
        torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)
    assert str(theirs[0].message).startswith(msg) and str(ours[0].message).startswith(msg)
    assert float(total) == 0.0
    ps = _params([torch.ones(3)])
    gen = (p for p in ps)
    list(gen)  # exhausted
    with pytest.warns(UserWarning, match="empty generator"):
        gg.clip_grad_norm_(gen, 1.0)
    with warnings.catch_warnings():  # an empty list, a full generator: no warning (as torch)
        warnings.simplefilter("error")
        gg.clip_grad_norm_([], 1.0)
        gg.clip_grad_norm_((p for p in ps), 1.0)


@pytest.mark.parametrize("p", [0, 0.0, -1, -2.0, -math.inf])
def test_nonpositive_norm_type_is_refused_naming_it(p):
    # torch accepts these (p = 0 counts non-zeros, p < 0 is a harmonic-type mean); gradguard
    # refuses them (the README's deliberate differences): no clipping rule reads such a norm
    with pytest.raises(ValueError, match="norm_type"):
        gg.clip_grad_norm_(_params([torch.ones(2)]), 1.0, norm_type=p)
    torch.nn.utils.clip_grad_norm_(_params([torch.ones(2)]), 1.0, norm_type=p)  # torch: no error


def test_readme_difference_inf_norm_of_empty_tensor_is_true():
    # README: "the inf-norm of an empty tensor is 0 (torch raises)": check both halves
    ps = _params([torch.zeros(0)])
    with pytest.raises(RuntimeError, match="empty tensor"):
        torch.nn.utils.clip_grad_norm_(_params([torch.zeros(0)]), 1.0, norm_type="inf")
    assert float(gg.clip_grad_norm_(ps, 1.0, norm_type="inf")) == 0.0


# -- 4. many small tensors, zeros ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_many_small_tensors_match_reference(dtype):
    g = torch.Generator().manual_seed(9)
    grads = [torch.randn(int(n), generator=g).to(dtype) for n in torch.randint(0, 40, (3000,), generator=g)]
    grads += [torch.randn(5, 7, generator=g).to(dtype).t()]  # non-contiguous
    out, mx = cpu.l2_norms(grads, with_max_abs=True)
    want = np.array([np.sqrt(np.sum(x.double().numpy() ** 2)) for x in grads])
    want_mx = np.array([np.abs(x.double().numpy()).max() if x.numel() else 0.0 for x in grads])
    np.testing.assert_allclose(out.double().numpy(), want, rtol=1e-6 if dtype != torch.float64 else 1e-14)
    np.testing.assert_array_equal(mx.double().numpy(), want_mx)


def test_small_path_packs_across_chunks(monkeypatch):
    monkeypatch.setattr(cpu, "CHUNK", 50)  # several packed buffers, a tensor larger than one
    grads = [torch.randn(n) for n in (30, 30, 7, 60, 1, 49, 50, 51)]
    out, _ = cpu.l2_norms(grads)
    want = [math.sqrt(float((x.double() ** 2).sum())) for x in grads]
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-6)


def test_small_path_extremes_need_no_rescue():
    big = torch.full((16,), 1e30)  # squares overflow float32
    tiny = torch.full((16,), 1e-40)  # float32 denormals: squares underflow float32
    nan = torch.tensor([1.0, float("nan")])
    out, _ = cpu.l2_norms([big, tiny, nan, torch.zeros(16)])
    assert math.isclose(float(out[0]), 4e30, rel_tol=1e-6)
    assert math.isclose(float(out[1]), 4e-40, rel_tol=1e-3)  # denormal input: ~3 digits
    assert math.isnan(float(out[2])) and float(out[3]) == 0.0
    d = [torch.full((8,), 1e200, dtype=torch.float64) / 1e50, torch.full((8,), 1e-170, dtype=torch.float64)]
    out, _ = cpu.l2_norms(d)
    assert math.isclose(float(out[0]), math.sqrt(8) * 1e150, rel_tol=1e-14)
    assert math.isclose(float(out[1]), math.sqrt(8) * 1e-170, rel_tol=1e-14)


@pytest.mark.parametrize("native", [True, False])
def test_exact_zeros_are_not_recomputed(monkeypatch, native):
    if not native:
        from gradguard.kernels import _native
        monkeypatch.setattr(_native, "lib", lambda: None)  # the numpy path
    monkeypatch.setattr(cpu, "SMALL", 16)
    monkeypatch.setattr(cpu, "CHUNK", 64)
    calls = []
    real = cpu._exact_sumsq
    monkeypatch.setattr(cpu, "_exact_sumsq", lambda a: calls.append(a.size) or real(a))
    zeros = [torch.zeros(1000) for _ in range(5)] + [torch.zeros(8) for _ in range(100)]
    out, _ = cpu.l2_norms(zeros)
    assert not out.any() and calls == []
    tiny = torch.zeros(1000)
    tiny[100] = 1e-30  # squares underflow float32: this chunk alone is recomputed
    out, _ = cpu.l2_norms([tiny])
    # (the native kernel recomputes such chunks itself, in float64 inside its pass)
    assert calls == ([] if native else [64]) and math.isclose(float(out[0]), 1e-30, rel_tol=1e-6)


def test_guard_many_layers_matches_torch():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(16)) for _ in range(500)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for a, b in zip(ps, ref):
        a.grad = torch.randn(16)
        b.grad = a.grad.clone()
    opt_a = torch.optim.SGD(ps, lr=0.1)
    opt_b = torch.optim.SGD(ref, lr=0.1)
    gg.Guard(ps, clipper=gg.NormClip(1.0)).step(opt_a)
    torch.nn.utils.clip_grad_norm_(ref, 1.0)
    opt_b.step()
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [True, False])
def test_guard_on_float64_model_matches_torch(fused):
    # a float64 norm gives a float64 coefficient: the fused kernels still get a float32 scale
    torch.manual_seed(0)
    m = torch.nn.Linear(5, 3).double()
    r = torch.nn.Linear(5, 3).double()
    r.load_state_dict(m.state_dict())
    x = torch.randn(4, 5, dtype=torch.float64)
    o1 = torch.optim.Adam(m.parameters(), lr=0.1, fused=fused)
    o2 = torch.optim.Adam(r.parameters(), lr=0.1, fused=fused)
    guard = gg.Guard(m, clipper=gg.NormClip(0.01))
    for _ in range(3):
        o1.zero_grad()
        (m(x) ** 2).sum().backward()
        guard.step(o1)
        o2.zero_grad()
        (r(x) ** 2).sum().backward()
        torch.nn.utils.clip_grad_norm_(r.parameters(), 0.01)
        o2.step()
    for a, b in zip(m.parameters(), r.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-8 if fused else 1e-12)
