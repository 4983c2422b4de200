"""The Guard: skip leaves training state bit-for-bit unchanged, policies, AMP, no host sync."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import reference as ref
import torch

import gradguard as gg

OPTIMIZERS = {
    "sgd": lambda ps, **kw: torch.optim.SGD(ps, lr=0.1, momentum=0.9, **kw),
    "adam": lambda ps, **kw: torch.optim.Adam(ps, lr=1e-2, **kw),
    "adamw": lambda ps, **kw: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw),
}
MODES = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def backward(model, seed, bad=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 4, generator=g)
    y = torch.randn(16, 2, generator=g)
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x), y) * 50
    loss.backward()
    if bad is not None:
        model[2].weight.grad[0, 1] = bad
    return loss.detach()


def snapshot(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    state = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
             for i, s in enumerate(opt.state.values())}
    return params, state


def assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        assert a[1][i].keys() == b[1][i].keys()
        for k in a[1][i]:
            x, y = a[1][i][k], b[1][i][k]
            assert torch.equal(x, y) if torch.is_tensor(x) else x == y


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_skip_leaves_params_and_optimizer_state_bit_for_bit(opt_name, mode, bad):
    model = make_model()
    opt = OPTIMIZERS[opt_name](model.parameters(), **MODES[mode])
    guard = gg.Guard(model, gg.NormClip(1.0))
    for s in range(2):
        backward(model, s)
        assert not bool(guard.step(opt).skipped)
    before = snapshot(model, opt)
    backward(model, 99, bad=bad)
    stats = guard.step(opt)
    assert bool(stats.skipped) and bool(stats.nonfinite)
    assert_same(before, snapshot(model, opt))
    backward(model, 3)
    assert not bool(guard.step(opt).skipped)
    assert any(not torch.equal(a, b) for a, b in zip(before[0], model.parameters()))


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize("mode", MODES)
def test_run_with_a_skipped_bad_step_equals_run_without_it(opt_name, mode):
    def run(with_bad):
        model = make_model()
        opt = OPTIMIZERS[opt_name](model.parameters(), **MODES[mode])
        guard = gg.Guard(model, gg.NormClip(0.5))
        for s in range(5):
            if with_bad and s in (0, 3):  # a bad step first (no optimizer state yet) and later
                backward(model, 100 + s, bad=float("nan"))
                guard.step(opt)
            backward(model, s)
            guard.step(opt)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_fused_fold_matches_clip_then_step(opt_name):
    """The coefficient handed to a fused optimizer as grad_scale clips like torch's clip."""
    m1, m2 = make_model(), make_model()
    o1 = OPTIMIZERS[opt_name](m1.parameters(), fused=True)
    o2 = OPTIMIZERS[opt_name](m2.parameters(), fused=True)
    guard = gg.Guard(m1, gg.NormClip(0.3))
    for s in range(4):
        backward(m1, s)
        stats = guard.step(o1)
        backward(m2, s)
        want = torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.3)
        o2.step()
        torch.testing.assert_close(stats.total_norm, want, rtol=1e-5, atol=1e-6)
        assert float(stats.clip_coef) < 1
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_nonfused_guard_step_matches_torch_clip():
    m1, m2 = make_model(), make_model()
    o1 = torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    guard = gg.Guard(m1, gg.NormClip(0.3))
    for s in range(4):
        backward(m1, s)
        guard.step(o1)
        backward(m2, s)
        torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.3)
        o2.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_raise_names_first_nonfinite_parameter_by_module_path():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, gg.NormClip(1.0), on_nonfinite="raise")
    backward(model, 0, bad=float("inf"))
    with pytest.raises(gg.NonFiniteGradientError, match=r"'2\.weight'") as info:
        guard.step(opt)
    assert info.value.parameter == "2.weight"


def test_zero_policy_zeroes_nonfinite_elements_then_clips():
    model = make_model()
    guard = gg.Guard(model, gg.NormClip(0.2), on_nonfinite="zero")
    backward(model, 0, bad=float("nan"))
    grads = [ref.to_np(p.grad) for p in model.parameters()]
    grads[2][0, 1] = 0.0
    want, want_total = ref.clip_norm(grads, 0.2, 2.0)
    stats = guard.clip()
    assert not bool(stats.skipped) and not bool(stats.nonfinite)
    assert math.isclose(float(stats.total_norm), want_total, rel_tol=1e-5)
    for p, w in zip(model.parameters(), want):
        np.testing.assert_allclose(p.grad.numpy(), w, rtol=1e-5, atol=1e-7)


def test_propagate_policy_is_torch_behaviour():
    m1, m2 = make_model(), make_model()
    backward(m1, 0, bad=float("inf"))
    backward(m2, 0, bad=float("inf"))
    gg.Guard(m1, gg.NormClip(1.0), on_nonfinite="propagate").clip()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.nn.utils.clip_grad_norm_(m2.parameters(), 1.0)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a.grad, b.grad, equal_nan=True)


@pytest.mark.parametrize("mode", ["for-loop", "fused"])
def test_consecutive_skips_raise_gradient_explosion(mode):
    model = make_model()
    opt = OPTIMIZERS["adam"](model.parameters(), **MODES[mode])
    guard = gg.Guard(model, gg.NormClip(1.0), max_consecutive_skips=3)
    backward(model, 0)
    guard.step(opt)
    for _ in range(2):
        backward(model, 1, bad=float("nan"))
        guard.step(opt)
    backward(model, 2)  # a good step resets the count
    guard.step(opt)
    for _ in range(2):
        backward(model, 1, bad=float("nan"))
        guard.step(opt)
    backward(model, 1, bad=float("nan"))
    with pytest.raises(gg.GradientExplosionError, match="max_consecutive_skips=3"):
        guard.step(opt)


def test_no_host_sync_per_step_with_fused_adamw(sync_counter):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    guard = gg.Guard(model, gg.NormClip(1.0))
    backward(model, 0)
    guard.step(opt)  # the first step creates optimizer state (one documented host read)
    sync_counter.calls.clear()
    for s in range(3):
        backward(model, s, bad=float("nan") if s == 1 else None)
        guard.step(opt)
    assert sync_counter.calls == []


@pytest.mark.parametrize("clipper", [None, gg.NormClip(0.1), gg.NormClip(0.1, per_tensor=True),
                                     gg.ValueClip(0.01), gg.AGC(0.01)])
def test_no_host_sync_any_clipper_fused(sync_counter, clipper):
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), fused=True)
    guard = gg.Guard(model, clipper)
    backward(model, 0)
    guard.step(opt)
    backward(model, 1)
    sync_counter.calls.clear()
    guard.step(opt)
    assert sync_counter.calls == []


def test_nonfused_skip_costs_exactly_one_host_read(sync_counter):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, gg.NormClip(1.0))
    backward(model, 0)
    sync_counter.calls.clear()
    guard.step(opt)
    assert sync_counter.calls == ["__bool__"]
    guard2 = gg.Guard(model, gg.NormClip(1.0), on_nonfinite="propagate")
    sync_counter.calls.clear()
    guard2.step(opt)
    assert sync_counter.calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_guard_step_never_synchronises():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    guard = gg.Guard(model, gg.NormClip(1.0))
    x = torch.randn(32, 64, device="cuda")
    for _ in range(2):  # warm-up: lazy state init may allocate
        model(x).square().mean().backward()
        guard.step(opt)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            model(x).square().mean().backward()
            guard.step(opt)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def scaled_backward(model, scaler, seed, bad=None):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x), y) * 50
    scaler.scale(loss).backward()
    if bad is not None:
        model[2].weight.grad[0, 1] = bad
    return loss.detach()


def test_grad_scaler_unscales_once_clips_true_grads_and_skips_inf():
    m1, m2 = make_model(), make_model()
    o1 = torch.optim.SGD(m1.parameters(), lr=0.1)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    guard = gg.Guard(m1, gg.NormClip(0.3))
    for s in range(3):
        loss = scaled_backward(m1, scaler, s)
        if s == 2:
            scaler.unscale_(o1)  # the caller unscaled already: must not be done twice
        stats = guard.step(o1, loss=loss, scaler=scaler)
        scaler.update()
        backward(m2, s)
        want = torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.3)
        o2.step()
        torch.testing.assert_close(stats.total_norm, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # an overflow: the scaler's own skip still works and the scale backs off
    before = [p.detach().clone() for p in m1.parameters()]
    scale = scaler.get_scale()
    scaled_backward(m1, scaler, 9, bad=float("inf"))
    guard.step(o1, scaler=scaler)
    scaler.update()
    assert scaler.get_scale() < scale
    for a, b in zip(before, m1.parameters()):
        assert torch.equal(a, b)


def test_guard_clip_reports_skip_without_stepping():
    model = make_model()
    guard = gg.Guard(model, gg.NormClip(1.0))
    backward(model, 0, bad=float("nan"))
    stats = guard.clip()
    assert bool(stats.skipped)
    backward(model, 0)
    assert not bool(guard.clip().skipped)


def test_guard_accepts_parameter_lists_and_named_pairs():
    model = make_model()
    g1 = gg.Guard(list(model.parameters()))
    assert g1.names[0] == "param0"
    g2 = gg.Guard(model.named_parameters())
    assert g2.names[0] == "0.weight"
    with pytest.raises(ValueError, match="no parameters"):
        gg.Guard([])
    with pytest.raises(ValueError, match="on_nonfinite"):
        gg.Guard(model, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        gg.Guard(model, max_consecutive_skips=0)


def test_state_dict_round_trip():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, gg.NormClip(1.0))
    for s in range(3):
        backward(model, s, bad=float("nan") if s == 2 else None)
        guard.step(opt)
    sd = guard.state_dict()
    other = gg.Guard(model, gg.NormClip(1.0))
    other.load_state_dict(sd)
    assert other.state_dict() == sd == {"step_count": 3, "skipped_steps": 1, "consecutive_skips": 1,
                                        "clipper": {}}


class BrokenMonitor:
    def attach(self, names, params):
        raise OSError("disk full")

    def record(self, stats, **fields):
        raise OSError("disk full")


def test_a_broken_monitor_never_raises_into_training():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="disk full"):
        guard = gg.Guard(model, gg.NormClip(1.0), monitor=BrokenMonitor())
    backward(model, 0)
    guard.step(opt)  # no exception
    assert guard.step_count == 1


def test_grad_scaler_with_fused_optimizer():
    m1, m2 = make_model(), make_model()
    o1 = torch.optim.AdamW(m1.parameters(), lr=1e-2, fused=True)
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    guard = gg.Guard(m1, gg.NormClip(0.3))
    for s in range(3):
        scaled_backward(m1, scaler, s)
        guard.step(o1, scaler=scaler)
        scaler.update()
        backward(m2, s)
        torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.3)
        o2.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    before = snapshot(m1, o1)
    scaled_backward(m1, scaler, 9, bad=float("nan"))
    guard.step(o1, scaler=scaler)
    scaler.update()
    assert_same(before, snapshot(m1, o1))
