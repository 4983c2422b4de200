"""The Guard's collaborators are typed protocols: objects with the right shape work without
subclassing gradguard's classes; objects without it are refused by name."""

from __future__ import annotations

import pytest
import torch

import gradguard as gg
from gradguard import protocols as P


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


class HalvingClip:
    """A user's clipper, no gradguard base class: scale every gradient by 1/2 when the global
    norm exceeds ``limit``; remembers how many steps it was shown as accepted."""

    norm_type = 2.0
    scalar = True

    def __init__(self, limit):
        self.limit = limit
        self.accepted = 0

    def clip_(self, params, grads, norms, *, apply=True, propagate_nonfinite=False):
        coef = torch.where(norms.total > self.limit, 0.5, 1.0)
        if not propagate_nonfinite:
            coef = torch.where(norms.nonfinite, 1.0, coef)
        if apply:
            torch._foreach_mul_(grads, coef)
        return gg.ClipStats(norms.total, coef, coef < 1, norms.nonfinite, norms.per_tensor)

    def observe(self, norms, accept):
        self.accepted += int(accept)  # a test clipper may read the host; gradguard's never do

    def state_dict(self):
        return {"accepted": self.accepted}

    def load_state_dict(self, sd):
        self.accepted = sd["accepted"]


def reference_run(mode, steps):
    """The same training by hand: torch's norm, the halving rule, optimizer.step()."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **mode)
    for s in range(steps):
        backward(model, s)
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        if total > 3.0:
            for p in model.parameters():
                p.grad.mul_(0.5)
        opt.step()
    return model


@pytest.mark.parametrize("mode", [{"foreach": True}, {"fused": True}])
def test_a_user_clipper_that_follows_the_protocol_works_in_the_guard(mode):
    clipper = HalvingClip(3.0)
    assert isinstance(clipper, P.Clipper) and not isinstance(clipper, gg.Clipper)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, **mode)
    guard = gg.Guard(model, clipper)
    clipped = 0
    for s in range(6):
        backward(model, s)
        clipped += int(guard.step(opt).clipped)
    backward(model, 99, bad=float("nan"))
    assert bool(guard.step(opt).skipped)  # the NaN step is refused and not observed
    assert clipped > 0 and clipper.accepted == 6
    want = reference_run(mode, 6)
    for a, b in zip(model.parameters(), want.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert guard.state_dict()["clipper"] == {"accepted": 6}


class EveryThirdStep:
    """A user's skip rule: refuse every third step."""

    def __init__(self):
        self.n = 0

    def check(self, total_norm, loss=None):
        return torch.tensor((self.n + 1) % 3 == 0)

    def observe(self, total_norm, loss, accept):
        self.n += 1

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, sd):
        self.n = sd["n"]


def test_a_user_skip_rule_works_and_round_trips():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gg.Guard(model, gg.NormClip(1.0), skip=EveryThirdStep())
    got = []
    for s in range(6):
        backward(model, s)
        got.append(bool(guard.step(opt).skipped))
    assert got == [False, False, True, False, False, True]
    assert guard.skipped_steps == 2
    other = gg.Guard(model, gg.NormClip(1.0), skip=EveryThirdStep())
    other.load_state_dict(guard.state_dict())
    assert other.skip_rule.n == 6 and other.skipped_steps == 2


class RecordOnly:
    """The smallest recorder: only ``record``."""

    def __init__(self):
        self.rows = []

    def record(self, stats, **fields):
        self.rows.append(fields)


def test_a_minimal_recorder_gets_every_step():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = RecordOnly()
    assert not isinstance(rec, P.Recorder)
    with gg.Guard(model, gg.NormClip(1.0), monitor=rec) as guard:
        for s in range(3):
            backward(model, s)
            guard.step(opt)
        assert guard.monitor is rec
        guard.load_state_dict(guard.state_dict())
    assert [r["step"] for r in rec.rows] == [1, 2, 3]


def test_gradguards_own_objects_follow_the_protocols():
    assert isinstance(gg.NormClip(1.0), P.ScalarClipper)
    for c in (gg.ValueClip(1.0), gg.AGC(), gg.AutoClip(), gg.ZClip(), gg.default_clipper()):
        assert isinstance(c, P.Clipper), c
    assert isinstance(gg.default_clipper(), P.OptimizerAware)
    assert isinstance(gg.SpikeSkip(), P.SkipRule)
    assert isinstance(gg.Monitor(None), P.Recorder)
    assert isinstance(torch.amp.GradScaler("cpu"), P.LossScaler)


def test_objects_of_the_wrong_shape_are_refused_by_name():
    model = make_model()
    with pytest.raises(TypeError, match=r"skip must be a skip rule.*NormClip.*lacks check.*clipper="):
        gg.Guard(model, skip=gg.NormClip(1.0))
    with pytest.raises(TypeError, match=r"clipper must be.*SpikeSkip.*lacks.*clip_.*skip="):
        gg.Guard(model, clipper=gg.SpikeSkip())
    with pytest.raises(TypeError, match=r"monitor must be.*record"):
        gg.Guard(model, monitor="runs/x")
    with pytest.raises(ValueError, match="clipper must be a clipper, 'auto' or None, got 'none'"):
        gg.Guard(model, clipper="none")

    class NotABool(HalvingClip):
        scalar = "yes"

    with pytest.raises(TypeError, match="clipper.scalar must be True or False"):
        gg.Guard(model, clipper=NotABool(1.0))
    for arg, cls in (("clipper", gg.NormClip), ("skip", gg.SpikeSkip), ("monitor", gg.Monitor)):
        with pytest.raises(TypeError, match=rf"{arg} is the class {cls.__name__}, not an object"):
            gg.Guard(model, **{arg: cls})
    assert P.missing(object(), P.SkipRule) == ["check", "load_state_dict", "observe", "state_dict"]
