"""Several optimizers in one Guard step: one global norm, one clip, one decision, one record."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradguard as gg

MODES = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def backward(model, seed, bad=None):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.mse_loss(model(x), y) * 50
    loss.backward()
    if bad is not None:
        model[2].weight.grad[0, 1] = bad
    return loss.detach()


def two_optimizers(model, mode):
    o1 = torch.optim.SGD([{"params": [model[0].weight], "lr": 0.05},
                          {"params": [model[0].bias], "lr": 0.01}], momentum=0.9, **MODES[mode])
    o2 = torch.optim.AdamW(model[2].parameters(), lr=1e-2, **MODES[mode])
    return o1, o2


class Rows:
    def __init__(self):
        self.rows = []

    def record(self, stats, **fields):
        self.rows.append(fields)


@pytest.mark.parametrize("mode", MODES)
def test_several_optimizers_step_on_one_global_clip(mode):
    m1, m2 = make_model(), make_model()
    a1, b1 = two_optimizers(m1, mode)
    a2, b2 = two_optimizers(m2, mode)
    rows = Rows()
    guard = gg.Guard(m1, gg.NormClip(0.3), monitor=rows)
    for s in range(5):
        backward(m1, s)
        stats = guard.step([a1, b1])
        backward(m2, s)
        want = torch.nn.utils.clip_grad_norm_(m2.parameters(), 0.3)  # one norm over all
        a2.step()
        b2.step()
        torch.testing.assert_close(stats.total_norm, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert guard.step_count == 5 and [r["step"] for r in rows.rows] == [1, 2, 3, 4, 5]
    # every param group's learning rate, in order; lr stays group 0's
    assert rows.rows[-1]["lrs"] == (0.05, 0.01, 1e-2)
    assert rows.rows[-1]["lr"] == 0.05


@pytest.mark.parametrize("mode", MODES)
def test_one_skip_decision_for_all_optimizers(mode):
    model = make_model()
    o1, o2 = two_optimizers(model, mode)
    guard = gg.Guard(model, gg.NormClip(1.0), max_consecutive_skips=2)
    for s in range(2):
        backward(model, s)
        assert not bool(guard.step((o1, o2)).skipped)
    before = [p.detach().clone() for p in model.parameters()]
    states = [{k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
              for o in (o1, o2) for st in o.state.values()]
    backward(model, 9, bad=float("nan"))  # only o2's parameters are bad
    assert bool(guard.step((o1, o2)).skipped)
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    after = [{k: v for k, v in st.items() if torch.is_tensor(v)}
             for o in (o1, o2) for st in o.state.values()]
    for x, y in zip(states, after):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert guard.skipped_steps == 1
    backward(model, 9, bad=float("nan"))
    with pytest.raises(gg.GradientExplosionError):
        guard.step([o1, o2])


def test_one_optimizer_per_call_would_count_twice():
    """What the list form replaces: two calls are two Guard steps (two clips, two records)."""
    model = make_model()
    o1, o2 = two_optimizers(model, "foreach")
    twice, once = gg.Guard(model, gg.NormClip(1.0)), gg.Guard(model, gg.NormClip(1.0))
    for s in range(5):
        backward(model, s)
        once.step([o1, o2])
    assert once.step_count == 5
    for s in range(5):
        backward(model, s)
        twice.step(o1)
        twice.step(o2)
    assert twice.step_count == 10


@settings(max_examples=30, deadline=None)
@given(scale=st.floats(min_value=1e-3, max_value=1e3), max_norm=st.floats(min_value=1e-2, max_value=10.0),
       split=st.integers(min_value=1, max_value=3), bad=st.sampled_from([None, 0, 1, 2, 3]))
def test_several_optimizers_match_torch_on_all_parameters(scale, max_norm, split, bad):
    """Property: stepping k optimizers over a split of the parameters is torch's global clip over
    all of them then each step; a non-finite gradient in any part refuses every part."""
    m1, m2 = make_model(), make_model()
    p1, p2 = list(m1.parameters()), list(m2.parameters())
    opts1 = [torch.optim.SGD(p1[:split], lr=0.1), torch.optim.SGD(p1[split:], lr=0.1)]
    opts2 = [torch.optim.SGD(p2[:split], lr=0.1), torch.optim.SGD(p2[split:], lr=0.1)]
    guard = gg.Guard(m1, gg.NormClip(max_norm))
    for m in (m1, m2):
        backward(m, 0)
        for p in m.parameters():
            p.grad.mul_(scale)
    if bad is not None:
        p1[bad].grad.view(-1)[0] = float("nan")
    stats = guard.step(opts1)
    if bad is not None:
        assert bool(stats.skipped)
        for a, b in zip(p1, p2):  # m2 never stepped: same initial parameters
            assert torch.equal(a, b)
        return
    want = torch.nn.utils.clip_grad_norm_(p2, max_norm)
    for o in opts2:
        o.step()
    assert not bool(stats.skipped)
    torch.testing.assert_close(stats.total_norm, want, rtol=1e-5, atol=0)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
