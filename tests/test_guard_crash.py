"""The divergence is never lost: when the Guard ends the loop with an exception, the steps
that explain it are on disk first; ``with Guard(...)`` closes the monitor on any exception."""

from __future__ import annotations

import warnings

import pytest
import torch

import gradguard as gg


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def backward(model, seed, bad=None):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    if bad is not None:
        model[2].weight.grad[0, 1] = bad
    return loss.detach()


def monitor(path):
    # flush_every far above the run's length: only the Guard's flush can put rows on disk
    return gg.Monitor(path, flush_every=100, layer_every=2, warn_interval=1e9)


@pytest.mark.parametrize("mode", [{"foreach": True}, {"fused": True}])
def test_gradient_explosion_leaves_every_step_on_disk_without_close(tmp_path, mode):
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **mode)
    guard = gg.Guard(model, gg.NormClip(1.0), monitor=monitor(tmp_path / "run"),
                     max_consecutive_skips=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the detectors' warnings
        with pytest.raises(gg.GradientExplosionError):
            for s in range(1, 50):
                loss = backward(model, s, bad=float("nan") if s > 3 else None)
                guard.step(opt, loss=loss)
    # no guard.close(): the user's script died here
    run = gg.load_run(tmp_path / "run")
    steps = run.steps.set_index("step")
    assert list(steps.index) == list(range(1, 9))       # the step that raised included
    assert [s for s in steps.index if steps.skipped[s]] == [4, 5, 6, 7, 8]
    assert 4 in set(run.events.step)                      # the first non-finite step's event
    guard.close()


def test_nonfinite_error_leaves_the_failing_step_on_disk(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, gg.NormClip(1.0), monitor=monitor(tmp_path / "run"),
                     on_nonfinite="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(gg.NonFiniteGradientError, match="'2.weight'"):
            for s in range(1, 10):
                guard.step(opt, loss=backward(model, s, bad=float("inf") if s == 4 else None))
    steps = gg.load_run(tmp_path / "run").steps.set_index("step")
    assert list(steps.index) == [1, 2, 3, 4]
    assert bool(steps.nonfinite[4]) and bool(steps.skipped[4]) and not steps.skipped[3]
    guard.close()


def test_with_guard_closes_the_monitor_on_any_exception(tmp_path):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = monitor(tmp_path / "run")
    with pytest.raises(KeyError, match="user bug"):
        with gg.Guard(model, gg.NormClip(1.0), monitor=mon) as guard:
            for s in range(1, 8):
                guard.step(opt, loss=backward(model, s))
            raise KeyError("user bug")
    assert mon.closed
    assert list(gg.load_run(tmp_path / "run").steps.step) == list(range(1, 8))


class FlushFails:
    def __init__(self):
        self.flushes = 0

    def record(self, stats, **fields):
        pass

    def flush(self, wait=False):
        self.flushes += 1
        raise OSError("disk full")


def test_a_failing_flush_never_hides_the_guards_error():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = FlushFails()
    guard = gg.Guard(model, gg.NormClip(1.0), monitor=rec, max_consecutive_skips=2)
    with pytest.warns(RuntimeWarning, match="disk full"):
        with pytest.raises(gg.GradientExplosionError):
            for s in range(5):
                guard.step(opt, loss=backward(model, s, bad=float("nan")))
    assert rec.flushes == 1
