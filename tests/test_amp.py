"""AMP: a step the GradScaler refuses is a skipped step (stats, counters, the run store, the
consecutive-skip limit), read from the scaler's device state without a new host read."""

from __future__ import annotations

import pytest
import torch

import gradguard as gg

MODES = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
}


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def amp_backward(model, scaler, seed, *, overflow=False, nan_in=None):
    """One scaled backward. ``overflow``: the loss is finite but the scaled gradients overflow
    float32 (what a too-large loss scale does); ``nan_in``: a NaN in that layer's weight grad."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x), y)
    if overflow:
        loss = loss * 1e36  # still finite (< 3.4e38); times the scale 2**16 it is not
        assert torch.isfinite(loss)
    scaler.scale(loss).backward()
    if nan_in is not None:
        model[nan_in].weight.grad[0, 0] = float("nan")
    return loss.detach()


def snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for s in opt.state.values()])


def same(a, b):
    return (all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
            and all(x.keys() == y.keys() and all(
                torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
                for x, y in zip(a[1], b[1])))


@pytest.mark.parametrize("mode", MODES)
def test_a_step_the_scaler_refuses_is_reported_as_skipped(mode):
    model = make_model()
    opt = MODES[mode](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    guard = gg.Guard(model, gg.NormClip(1.0), max_consecutive_skips=None)
    for s in range(2):
        loss = amp_backward(model, scaler, s)
        stats = guard.step(opt, loss=loss, scaler=scaler)
        scaler.update()
        assert not bool(stats.skipped)
    assert guard.skipped_steps == 0
    before, scale = snapshot(model, opt), scaler.get_scale()
    loss = amp_backward(model, scaler, 7, overflow=True)
    stats = guard.step(opt, loss=loss, scaler=scaler)
    scaler.update()
    assert bool(stats.skipped)
    assert guard.skipped_steps == 1
    assert same(before, snapshot(model, opt))   # the scaler did skip it
    assert scaler.get_scale() == scale / 2      # and backed off once
    loss = amp_backward(model, scaler, 3)
    assert not bool(guard.step(opt, loss=loss, scaler=scaler).skipped)
    scaler.update()
    assert guard.skipped_steps == 1
    assert guard.state_dict()["skipped_steps"] == 1
    assert guard.state_dict()["consecutive_skips"] == 0


@pytest.mark.parametrize("mode", MODES)
def test_twenty_nan_steps_in_a_row_raise_with_a_scaler(mode):
    model = make_model()
    opt = MODES[mode](model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    guard = gg.Guard(model, gg.NormClip(1.0))  # default max_consecutive_skips=10
    loss = amp_backward(model, scaler, 0)
    guard.step(opt, loss=loss, scaler=scaler)
    scaler.update()
    with pytest.raises(gg.GradientExplosionError, match="max_consecutive_skips=10"):
        for s in range(20):
            loss = amp_backward(model, scaler, s, nan_in=2)
            guard.step(opt, loss=loss, scaler=scaler)
            scaler.update()
    assert guard.step_count == 11        # raised at the 10th refused step in a row (CPU: no lag)
    assert guard.skipped_steps == 10
    assert scaler.get_scale() == 2.0 ** 16 / 2 ** 9  # the 10th update() was never reached


def test_the_scaler_verdict_counts_even_when_the_guarded_norms_are_finite():
    """The skip comes from the scaler's found_inf, not from a second look at the gradients:
    an inf in a parameter the optimizer holds but the Guard does not guard still refuses the
    step, and the clipper's statistics must not absorb it."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    clipper = gg.AutoClip(percentile=50.0)
    guard = gg.Guard(model[0].parameters(), clipper, max_consecutive_skips=None)
    amp_backward(model, scaler, 0)
    guard.step(opt, scaler=scaler)
    scaler.update()
    state = clipper.state_dict()
    before = snapshot(model, opt)
    amp_backward(model, scaler, 1, nan_in=2)  # only the unguarded layer is bad
    stats = guard.step(opt, scaler=scaler)
    scaler.update()
    assert not bool(stats.nonfinite) and bool(stats.skipped)
    assert guard.skipped_steps == 1
    assert same(before, snapshot(model, opt))
    assert _state_equal(clipper.state_dict(), state)  # the refused step stayed out of the stats
    amp_backward(model, scaler, 2)
    guard.step(opt, scaler=scaler)
    assert not _state_equal(clipper.state_dict(), state)  # an accepted step goes in


def _state_equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    if torch.is_tensor(a):
        return (torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype
                and bool(((a == b) | (a != a) & (b != b)).all()))  # NaN == NaN here
    return a == b


def test_scaler_skips_reach_the_run_store(tmp_path):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    with gg.Guard(model, gg.NormClip(1.0), max_consecutive_skips=None,
                  monitor=gg.Monitor(tmp_path / "run", flush_every=4, detectors=[])) as guard:
        for s in range(1, 9):
            loss = amp_backward(model, scaler, s, overflow=s in (3, 6))
            guard.step(opt, loss=loss, scaler=scaler)
            scaler.update()
    steps = gg.load_run(tmp_path / "run").steps.set_index("step")
    assert list(steps.index) == list(range(1, 9))
    assert [s for s in steps.index if steps.skipped[s]] == [3, 6]
    assert guard.skipped_steps == 2


def test_no_new_host_read_with_a_scaler_and_a_fused_optimizer(sync_counter):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    guard = gg.Guard(model, gg.NormClip(1.0), max_consecutive_skips=5)
    for s in range(2):  # warm-up: optimizer state is created
        guard.step(opt, loss=amp_backward(model, scaler, s), scaler=scaler)
        scaler.update()
    reads = []
    for s in range(4):
        loss = amp_backward(model, scaler, s, overflow=s % 2 == 1)
        sync_counter.calls.clear()
        guard.step(opt, loss=loss, scaler=scaler)
        reads += sync_counter.calls
        scaler.update()
    assert reads == []
    assert guard.skipped_steps == 2


def test_several_optimizers_with_a_scaler_make_one_decision():
    model = make_model()
    o1 = torch.optim.SGD(model[0].parameters(), lr=0.1, momentum=0.9)
    o2 = torch.optim.AdamW(model[2].parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    guard = gg.Guard(model, gg.NormClip(1.0), max_consecutive_skips=None)
    guard.step([o1, o2], loss=amp_backward(model, scaler, 0), scaler=scaler)
    scaler.update()
    b1, b2, scale = snapshot(model, o1), snapshot(model, o2), scaler.get_scale()
    stats = guard.step([o1, o2], loss=amp_backward(model, scaler, 1, nan_in=2), scaler=scaler)
    scaler.update()
    assert bool(stats.skipped) and guard.skipped_steps == 1 and guard.step_count == 2
    # o1's gradients were finite: the scaler alone would have stepped it
    assert same(b1, snapshot(model, o1)) and same(b2, snapshot(model, o2))
    assert scaler.get_scale() == scale / 2  # backed off once, not once per optimizer
    stats = guard.step((o1, o2), loss=amp_backward(model, scaler, 2), scaler=scaler)
    scaler.update()
    assert not bool(stats.skipped)
    assert not same(b1, snapshot(model, o1)) and not same(b2, snapshot(model, o2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_scaler_skips_are_counted_without_a_synchronisation():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 16)
    guard = gg.Guard(model, gg.NormClip(1.0), max_consecutive_skips=None)
    x = torch.randn(32, 64, device="cuda")
    for _ in range(2):  # warm-up: optimizer state, the skip counter's pinned buffer
        model.zero_grad(set_to_none=True)
        scaler.scale(model(x).square().mean()).backward()
        guard.step(opt, scaler=scaler)
        scaler.update()
    torch.cuda.synchronize()
    for s in range(4):
        model.zero_grad(set_to_none=True)
        loss = model(x).square().mean() * (1e36 if s % 2 else 1.0)
        scaler.scale(loss).backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            guard.step(opt, scaler=scaler)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        scaler.update()
    torch.cuda.synchronize()
    assert guard.skipped_steps == 2
