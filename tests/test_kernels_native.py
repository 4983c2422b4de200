"""The native CPU kernel (``gradguard.kernels._native``, issue 15): bfloat16 and float16
widened in the pass that squares them, against the float64 reference value by value; max |g|
with NaN propagated; the scale bit for bit what torch's CPU multiply writes; and the
numpy/BLAS fallback (no compiler, ``GRADGUARD_NATIVE=0``) giving the same norms.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import reference as ref
import torch

import gradguard as gg
from gradguard import _pool
from gradguard.kernels import _native, cpu

HALVES = [torch.bfloat16, torch.float16]
KIND = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                              reason="no C compiler: the numpy path runs (tested below)")


@pytest.fixture
def native():
    lib = _native.lib()
    if lib is None:
        pytest.skip(f"native kernel unavailable: {_native.error()}")
    return lib


@pytest.fixture
def no_native(monkeypatch):
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_error", "disabled by the test")


def _all_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 2-byte dtype whose square float32 holds exactly."""
    v = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    a = v.double().abs()
    keep = torch.isfinite(a) & (a < 1e18) & ((a > 1e-18) | (a == 0))
    return v[keep].contiguous()


@needs_cc
def test_native_kernel_builds_where_a_compiler_is():
    assert _native.lib() is not None, _native.error()
    assert "native C kernel" in _native.describe()


@pytest.mark.parametrize("dtype", HALVES)
def test_every_half_value_squared_exactly(native, dtype):
    vals = _all_values(dtype)
    kind = KIND[dtype]
    size = vals.element_size()
    exact = vals.double() ** 2
    # each value alone (the scalar tail) ...
    for i in range(0, vals.numel(), 7):
        assert native.sumsq(kind, vals.data_ptr() + i * size, 1) == float(exact[i])
    # ... and repeated over a vector block (1024 copies: the vector loop and the float64 add)
    rep = vals[::29].repeat_interleave(1024).contiguous()
    for j in range(rep.numel() // 1024):
        s, m = native.sumsq_max(kind, rep.data_ptr() + j * 1024 * size, 1024)
        x = float(rep[j * 1024].double())
        assert math.isclose(s, 1024 * x * x, rel_tol=1e-6, abs_tol=0.0)
        assert m == abs(x)
    # all of them at once, against float64
    s, m = native.sumsq_max(kind, vals.data_ptr(), vals.numel())
    assert math.isclose(s, float(exact.sum()), rel_tol=1e-6)
    assert m == float(vals.double().abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, *HALVES])
@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("at", [5, 2047, 3001])  # in a vector block, at its end, in the tail
def test_nan_and_inf_propagate_to_sum_and_max(native, dtype, special, at):
    x = torch.randn(3003).to(dtype)
    x[at] = special
    s, m = native.sumsq_max(KIND[dtype], x.data_ptr(), x.numel())
    if math.isnan(special):
        assert math.isnan(s) and math.isnan(m)
    else:
        assert s == math.inf and m == math.inf


@pytest.mark.parametrize("dtype", [torch.float32, *HALVES])
@pytest.mark.parametrize("threads", [1, 2])
def test_l2_norms_native_and_fallback_match_the_reference(request, monkeypatch, dtype, threads):
    monkeypatch.setattr(_pool, "threads", lambda: threads)
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 0)
    g = torch.Generator().manual_seed(3)
    big = cpu.CHUNK * 2 + 4099  # several chunks and a tail that is not a multiple of 8
    grads = [(torch.randn(s, generator=g) * 0.02).to(dtype) for s in [(big,), (513, 33), (cpu.SMALL + 1,)]]
    grads.append(torch.zeros(cpu.CHUNK + 5, dtype=dtype))  # an exact zero needs no recompute
    want = [ref.norm(ref.to_np(t), 2) for t in grads]
    want_max = [float(t.double().abs().max()) for t in grads]
    results = []
    for path in ("native", "fallback"):
        if path == "native" and _native.lib() is None:
            continue
        if path == "fallback":
            request.getfixturevalue("no_native")
        per, mx = cpu.l2_norms(grads, with_max_abs=True)
        per2, _ = cpu.l2_norms(grads)
        assert torch.equal(per, per2)  # the norms do not depend on with_max_abs
        # native: float32 within 1024-element blocks (~1e-9 here, then float32's rounding);
        # the BLAS fallback sums a 256K-element chunk in float32 lanes (2.8e-6 seen)
        rtol = 2e-7 if path == "native" else 5e-6
        np.testing.assert_allclose(per.double().numpy(), want, rtol=rtol, atol=0)
        assert mx.tolist() == want_max
        results.append(per)
    assert len(results) >= 1


@pytest.mark.parametrize("dtype", HALVES)
def test_overflow_and_underflow_rescued_on_the_native_path(native, dtype):
    if dtype == torch.float16:
        values = [6e4, 6e-8, 1e-5]  # float16's range: no float32 square overflows
    else:
        values = [1e30, 1e-30, 1e35]  # squares beyond float32, below its smallest normal
    for v in values:
        t = torch.full((cpu.CHUNK + 3,), v).to(dtype)
        per, mx = cpu.l2_norms([t], with_max_abs=True)
        exact = float(t[0].double()) * math.sqrt(t.numel())
        assert math.isclose(float(per[0]), exact, rel_tol=1e-6), (v, float(per[0]), exact)
        assert float(mx[0]) == abs(float(t[0].double()))


@pytest.mark.parametrize("dtype", [torch.float32, *HALVES])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_scale_is_bit_identical_to_torch(native, monkeypatch, dtype, threads):
    if not native.can_scale(KIND[dtype]):
        pytest.skip("no F16C: float16 is scaled by torch")
    monkeypatch.setattr(_pool, "threads", lambda: threads)
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 0)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    values = _all_values(dtype) if dtype != torch.float32 else torch.randn(70001) * 1e30
    base = torch.cat([values, torch.randn(2 * cpu.CHUNK + 13).to(dtype),
                      torch.tensor([math.inf, -math.inf, 0.0, -0.0, math.nan], dtype=dtype)])
    # lengths that leave every tail of the four-stream loop: n mod 64, n mod 16, n < 64
    odd = [torch.randn(n).to(dtype) for n in (cpu.SMALL + 1, cpu.SMALL + 63, 4 * 4096 + 17,
                                               1, 7, 100)]
    for c in (0.3719, 1e-5, 0.999999, 7.5e-8, 1e-30, 3.0):
        coef = torch.tensor(c, dtype=torch.float32)
        want = [t.clone() for t in (base, *odd)]
        torch._foreach_mul_(want, coef)
        got = [t.clone() for t in (base, *odd)]
        version = got[0]._version
        cpu.scale_(got, coef, float(coef))
        for a, b in zip(got, want):
            assert torch.equal(a.view(bits), b.view(bits)), c
        assert got[0]._version > version


def test_clip_grad_norm_bfloat16_matches_the_float64_reference(native):
    g = torch.Generator().manual_seed(11)
    params = []
    for s in [(cpu.CHUNK + 77,), (300, 40), (16,)]:
        p = torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16))
        p.grad = (torch.randn(s, generator=g) * 1e-3).to(torch.bfloat16)
        params.append(p)
    grads = [p.grad.clone() for p in params]
    total = ref.total_norm([ref.to_np(t) for t in grads], 2)
    got = gg.clip_grad_norm_(params, total / 3)
    assert got.dtype == torch.float32 and math.isclose(float(got), total, rel_tol=1e-6)
    coef = np.float32(total / 3) / np.float32(float(got) + 1e-6)
    for p, g0 in zip(params, grads):
        want = (g0.float() * torch.tensor(float(coef))).to(torch.bfloat16)
        assert torch.equal(p.grad.view(torch.int16), want.view(torch.int16))


def test_small_one_dimensional_tensors_packed_by_cat():
    """The packed path concatenates 1-D tensors (negative views and strided ones included)
    and flattens the others; both against the float64 reference."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, generator=g)
    grads = [torch.randn(16, generator=g) for _ in range(50)]
    grads += [torch._neg_view(x), torch.randn(64, generator=g)[::2]]
    for extra in ([], [torch.randn(3, 5, generator=g), torch.tensor(2.5)]):
        gs = grads + extra
        per, mx = cpu.l2_norms(gs, with_max_abs=True)
        np.testing.assert_allclose(per.double().numpy(), [ref.norm(ref.to_np(t), 2) for t in gs],
                                   rtol=1e-6, atol=0)
        assert mx.tolist() == [float(t.double().abs().max()) for t in gs]


def _run(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_disabled_by_environment_falls_back_to_numpy():
    code = ("import torch, gradguard as gg\n"
            "from gradguard.kernels import _native\n"
            "g = [torch.ones(300000, dtype=torch.bfloat16)]\n"
            "print(float(gg.kernels.cpu.l2_norms(g)[0][0]), _native.describe())\n")
    out = _run(code, GRADGUARD_NATIVE="0")
    value, _, how = out.strip().partition(" ")
    assert float(value) == np.float32(math.sqrt(300000)) and "GRADGUARD_NATIVE=0" in how


def test_missing_compiler_falls_back_to_numpy(tmp_path):
    code = ("from gradguard.kernels import _native\n"
            "print(_native.lib() is None, _native.error())\n")
    out = _run(code, CC=str(tmp_path / "no-such-cc"), GRADGUARD_CACHE_DIR=str(tmp_path))
    assert out.startswith("True") and "no C compiler" in out


@needs_cc
def test_build_goes_to_the_cache_dir(tmp_path):
    code = "from gradguard.kernels import _native\nprint(_native.lib().path)\n"
    path = _run(code, GRADGUARD_CACHE_DIR=str(tmp_path)).strip()
    assert os.path.dirname(path) == str(tmp_path) and os.path.exists(path)
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(path)]  # no leftovers
    assert _run(code, GRADGUARD_CACHE_DIR=str(tmp_path)).strip() == path  # reused


@needs_cc
@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_a_cache_dir_others_can_write_is_not_used(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant a library here
    code = "from gradguard.kernels import _native\nprint(_native.lib().path)\n"
    path = _run(code, GRADGUARD_CACHE_DIR=str(shared)).strip()
    assert os.path.dirname(path) != str(shared) and list(shared.iterdir()) == []
    assert os.path.basename(os.path.dirname(path)).startswith("gradguard-native-")


@needs_cc
@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="x86 flags")
def test_portable_float16_conversion_without_f16c(tmp_path):
    """The kernel's float16 path for CPUs without F16C (an exact bit conversion), built here
    with F16C switched off, squares every value as the F16C one does."""
    src = tmp_path / "k.c"
    src.write_text(_native.SOURCE)
    lib = tmp_path / "k.so"
    cc = shutil.which(os.environ.get("CC", "cc"))
    out = subprocess.run([cc, "-O2", "-mavx2", "-mno-f16c", "-shared", "-fPIC", "-o", str(lib),
                          str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import ctypes

    portable = _native.Native(ctypes.CDLL(str(lib)), str(lib))
    assert not portable.can_scale("f16")  # float16 is then scaled by torch
    vals = _all_values(torch.float16)
    exact = vals.double() ** 2
    for i in range(0, vals.numel(), 5):
        assert portable.sumsq("f16", vals.data_ptr() + 2 * i, 1) == float(exact[i])
    rep = vals[::13].repeat_interleave(1024).contiguous()
    sums = np.empty(rep.numel() // 1024)
    maxes = np.empty(len(sums), dtype=np.float32)
    ptrs = np.arange(len(sums), dtype=np.int64) * 2048 + rep.data_ptr()
    for j, ptr in enumerate(ptrs.tolist()):
        sums[j], maxes[j] = portable.sumsq_max("f16", ptr, 1024)
    x = rep[::1024].double()
    np.testing.assert_allclose(sums, (1024 * x * x).numpy(), rtol=1e-6, atol=0)
    assert maxes.tolist() == x.abs().float().tolist()
    for special in (math.inf, math.nan):
        t = torch.randn(2000).half()
        t[1500] = special
        s, m = portable.sumsq_max("f16", t.data_ptr(), t.numel())
        assert (math.isnan(s) and math.isnan(m)) if math.isnan(special) else (s == m == math.inf)
