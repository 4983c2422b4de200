"""The CUDA paths: Triton norm and scale kernels against float64 references and torch, no host
synchronisation (``torch.cuda.set_sync_debug_mode("error")``), CUDA-graph capture. Skipped
without a GPU; ``benchmarks/gpu_check.sh`` runs them on one.
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

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
needs_triton = pytest.mark.skipif(kernels.triton_kernels() is None, reason="needs triton")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(50257 // 7, 768 // 4), (1000,), (7, 5), (0,), (), (3, 3001), (16,), (513, 2)]


def _grads(dtype, seed=0, scale=1.0, shapes=SHAPES):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randn(s, device="cuda", generator=g) * scale).to(dtype) for s in shapes]


def _params(grads):
    ps = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype, device=g.device))
        p.grad = g
        ps.append(p)
    return ps


@needs_triton
def test_cuda_backend_is_triton():
    assert kernels.backend("cuda") == "triton"
    assert kernels.multi_tensor_norms(_grads(torch.float32), 2.0) is not None


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
def test_norms_match_float64_reference(dtype, p):
    gs = _grads(dtype, seed=1, scale=3.0)
    got = norms.compute_norms(gs, p)
    arrays = [ref.to_np(g) for g in gs]
    np.testing.assert_allclose(got.per_tensor.double().cpu().numpy(), [ref.norm(a, p) for a in arrays],
                               rtol=2e-6, atol=0)
    assert math.isclose(float(got.total), ref.total_norm(arrays, p), rel_tol=2e-6)


@needs_triton
def test_norms_deterministic_and_more_chunks_than_programs(monkeypatch):
    monkeypatch.setattr(kernels, "CHUNK", 1024)
    kernels._LAYOUTS.clear()
    gs = _grads(torch.float32, seed=2, shapes=[(4_000_000,), (3, 5), (777_777,)])
    a = kernels.multi_tensor_norms(gs, 2.0)
    b = kernels.multi_tensor_norms(gs, 2.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    want = [ref.norm(ref.to_np(g), 2) for g in gs]
    np.testing.assert_allclose(a[0].double().cpu().numpy(), want, rtol=2e-6)


@needs_triton
def test_overflow_underflow_nonfinite():
    big = torch.ones(100_000, device="cuda")
    big[10], big[70_000] = 3e20, -4e20
    tiny = torch.full((5000,), 1e-30, device="cuda")
    bf = torch.full((300,), 1e30, device="cuda", dtype=torch.bfloat16)
    per, total = kernels.multi_tensor_norms([big, tiny, torch.zeros(7, device="cuda")], 2.0)
    assert math.isclose(float(per[0]), 5e20, rel_tol=1e-6)
    assert math.isclose(float(per[1]), 1e-30 * math.sqrt(5000), rel_tol=1e-6)
    assert float(per[2]) == 0.0 and math.isclose(float(total), 5e20, rel_tol=1e-6)
    per, _ = kernels.multi_tensor_norms([bf], 2.0)
    assert math.isclose(float(per[0]), float(bf[0].double()) * math.sqrt(300), rel_tol=1e-6)
    nan, inf = torch.ones(9000, device="cuda"), torch.ones(9000, device="cuda")
    nan[4000], inf[1] = float("nan"), float("inf")
    for p in (2.0, 1.0, math.inf):
        per, total = kernels.multi_tensor_norms([nan, inf], p)
        assert math.isnan(float(per[0])) and math.isinf(float(per[1])) and math.isnan(float(total))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("coef", [0.3712345, 0.0, 1.0])
def test_scale_is_one_float32_multiply_rounded_once(dtype, coef):
    """``x * coef`` in float32, rounded once to the dtype: torch's ``_foreach_mul_`` bit for
    bit in float32 (and on the CPU in every dtype). torch's CUDA multiply of float16/bfloat16
    by a float32 0-d tensor rounds the coefficient to the gradient dtype first, so there the
    reference is the float32 product itself, and torch is within two units in the last place."""
    gs = _grads(dtype, seed=3)
    x = [g.clone() for g in gs]
    want = [g.clone() for g in gs]
    c = torch.tensor(coef, device="cuda")
    torch._foreach_mul_(want, c)
    kernels.multi_tensor_scale_(gs, c)
    for g, w, x0 in zip(gs, want, x):
        assert torch.equal(g, (x0.float() * c).to(dtype))
        if dtype == torch.float32:
            assert torch.equal(g, w)
        else:
            fi = torch.finfo(dtype)
            bound = 2 * fi.eps * x0.float().abs() * abs(coef) + fi.tiny
            assert ((g.float() - w.float()).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_grad_norm_matches_torch(dtype):
    gs = _grads(dtype, seed=4, scale=10.0)
    ours, theirs = _params(gs), _params([g.clone() for g in gs])
    n1 = gg.clip_grad_norm_(ours, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n2 = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # torch's bf16 norm is rounded to bf16
    torch.testing.assert_close(n1, n2.float(), rtol=tol, atol=0)
    assert n1.dtype == torch.float32
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=tol, atol=1e-7)


@needs_triton
def test_no_host_sync_clip_and_guard_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 64)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    guard = gg.Guard(model, gg.NormClip(0.5))
    x = torch.randn(64, 256, device="cuda")
    for _ in range(3):  # warm-up: Triton compiles, layouts and optimizer state are created
        model(x).square().mean().backward()
        gg.clip_grad_norm_(model.parameters(), 0.5)
        guard.step(opt)
        opt.zero_grad(set_to_none=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            model(x).square().mean().backward()
            gg.clip_grad_norm_(model.parameters(), 0.5)
            guard.step(opt)
            opt.zero_grad(set_to_none=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@needs_triton
def test_clip_grad_norm_captured_in_a_cuda_graph():
    gs = _grads(torch.float32, seed=5, scale=5.0)
    ps = _params(gs)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            gg.clip_grad_norm_(ps, 1.0)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total = gg.clip_grad_norm_(ps, 1.0)
    fresh = _grads(torch.float32, seed=6, scale=7.0)
    for g, f in zip(gs, fresh):
        g.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    want = _params([f.clone() for f in fresh])
    want_total = gg.clip_grad_norm_(want, 1.0)
    torch.testing.assert_close(total, want_total, rtol=0, atol=0)
    for a, b in zip(ps, want):
        assert torch.equal(a.grad, b.grad)


@needs_triton
def test_folded_fused_adamw_step_captured_in_a_cuda_graph():
    """The device part of ``Guard.step`` on a fused optimizer (norms, coefficient, skip flag,
    ``grad_scale``/``found_inf`` into a capturable fused AdamW) captures and replays."""
    torch.manual_seed(1)
    w = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(300, 200), (200,), (7,)]]
    w_ref = [torch.nn.Parameter(p.detach().clone()) for p in w]
    clip = gg.NormClip(1.0)

    def device_step(params, opt):
        grads = [p.grad for p in params]
        n = norms.compute_norms(grads, 2.0)
        opt.grad_scale = 1.0 / clip.coefficient(n)
        opt.found_inf = n.nonfinite.float()
        opt.step()
        opt.grad_scale = None
        opt.found_inf = None

    def set_grads(params, seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        for p in params:
            if p.grad is None:
                p.grad = torch.empty_like(p)
            p.grad.copy_(torch.randn(p.shape, device="cuda", generator=g) * 3)

    opt = torch.optim.AdamW(w, lr=1e-2, fused=True, capturable=True)
    opt_ref = torch.optim.AdamW(w_ref, lr=1e-2, fused=True, capturable=True)
    set_grads(w, 0)
    set_grads(w_ref, 0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        device_step(w, opt)
        device_step(w_ref, opt_ref)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        device_step(w, opt)
    for seed in (1, 2):
        set_grads(w, seed)
        set_grads(w_ref, seed)
        graph.replay()
        device_step(w_ref, opt_ref)
    torch.cuda.synchronize()
    for a, b in zip(w, w_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_abs_with_the_norms_on_cuda(dtype):
    """compute_norms(with_max_abs=True) on the GPU: exact max |g|, norms unchanged, no sync."""
    grads = _grads(dtype, seed=11, scale=3.0)
    grads[1][17] = -1e4  # a negative peak
    plain = norms.compute_norms(grads)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = norms.compute_norms(grads, with_max_abs=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(got.per_tensor, plain.per_tensor) and torch.equal(got.total, plain.total)
    want = [float(g.double().abs().max()) if g.numel() else 0.0 for g in grads]
    assert got.max_abs.device.type == "cuda"
    assert got.max_abs.cpu().tolist() == [float(np.float32(w)) for w in want]


@needs_triton
def test_monitored_guard_no_host_sync_on_cuda(tmp_path):
    """A Guard with a Monitor (ordinary steps, layer steps, flushes copied to pinned memory and
    written by the Monitor's thread) runs under ``set_sync_debug_mode("error")``; the run store
    then holds every step with the norms the Guard computed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 8)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    mon = gg.Monitor(tmp_path / "run", layer_every=2, flush_every=4)
    guard = gg.Guard(model, gg.NormClip(0.5), monitor=mon)
    x = torch.randn(32, 64, device="cuda")
    want = []

    def step():
        loss = model(x).square().mean()
        loss.backward()
        want.append(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad.double()) for p in model.parameters()])))
        guard.step(opt, loss=loss)
        opt.zero_grad(set_to_none=False)

    for _ in range(4):  # warm-up: Triton compiles, optimizer state, the first flush
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(8):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    mon.close()
    assert not mon.notes, mon.notes
    run = gg.load_run(tmp_path / "run")
    assert len(run.steps) == 12 and (np.diff(run.steps["step"].to_numpy()) == 1).all()
    got = run.steps["total_norm"].to_numpy()
    np.testing.assert_allclose(got, [float(w) for w in want], rtol=1e-5)
    assert len(run.layers) > 0 and np.isfinite(run.layers["grad_norm"]).all()


@needs_triton
def test_clip_groups_once_and_looks_each_chunk_table_up_once(monkeypatch):
    """The norm pass's ``Groups`` goes to the scale (``GradNorms.groups``): one chunk-table
    lookup per dtype group for both passes, mixed dtypes included, results as torch's."""
    gs = _grads(torch.float32, seed=11, scale=4.0) + _grads(torch.bfloat16, seed=12, scale=4.0)
    ps = _params(gs)
    want = [g.float().clone() for g in gs]
    calls = []
    real = kernels._layout
    monkeypatch.setattr(kernels, "_layout", lambda t: calls.append(len(t)) or real(t))
    total = gg.clip_grad_norm_(ps, 1.0)
    assert calls == [len(SHAPES), len(SHAPES)]  # one per group, not one per group and pass
    coef = torch.clamp(1.0 / (total.float() + 1e-6), max=1.0)
    for p, w in zip(ps, want):
        torch.testing.assert_close(p.grad.float(), (w * coef).to(p.grad.dtype).float(),
                                   rtol=2.0 ** -7, atol=0)
