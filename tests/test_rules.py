"""The pure rules on numpy and torch: same decisions, float64-close to the references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import rule_vectors as rv
import torch

from gradguard import rules
from gradguard.rules import xp_torch

XP = {"numpy": (rules.NUMPY, None, float), "torch": (xp_torch.TORCH, torch.zeros(()), float)}


@pytest.mark.parametrize("case", rv.CASES, ids=rv.case_id)
@pytest.mark.parametrize("backend", sorted(XP))
def test_rule_matches_float64_reference(case, backend):
    xp, like, to_float = XP[backend]
    rv.assert_matches(rv.drive(case, xp, like, to_float=to_float), rv.expected(case))


@pytest.mark.parametrize("case", rv.CASES, ids=rv.case_id)
def test_numpy_and_torch_agree(case):
    a = rv.drive(case, rules.NUMPY)
    b = rv.drive(case, xp_torch.TORCH, torch.zeros(()))
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if k == "skip":
                assert x[k] == y[k]
            else:
                assert (x[k] == y[k]) or math.isclose(x[k], y[k], rel_tol=1e-6), (k, x, y)
        if "coef" in x:
            assert (x["coef"] < 1.0) == (y["coef"] < 1.0)


def test_namespace_registry():
    assert rules.namespace(np.zeros(3)) is rules.NUMPY
    assert rules.namespace(np.float32(1.0)) is rules.NUMPY
    assert rules.namespace(torch.zeros(())) is xp_torch.TORCH
    with pytest.raises(TypeError, match="no array namespace"):
        rules.namespace([1.0])


def test_commit_keeps_old_state_where_not_accepted():
    cfg = rules.zclip.config(warmup_steps=2)
    s0 = rules.zclip.init(cfg, rules.NUMPY)
    _, prop = rules.zclip.update(cfg, s0, np.float32(3.0), rules.NUMPY)
    kept = rules.commit(np.bool_(False), prop, s0, rules.NUMPY)
    taken = rules.commit(np.bool_(True), prop, s0, rules.NUMPY)
    for a, b in zip(kept, s0):
        np.testing.assert_array_equal(a, b)
    assert int(taken.count) == 1 and float(taken.buffer[0]) == 3.0


def test_nonfinite_norm_never_enters_a_rule():
    for mod, cfg, obs in [
        (rules.zclip, rules.zclip.config(warmup_steps=2), lambda g: g),
        (rules.autoclip, rules.autoclip.config(), lambda g: g),
        (rules.autoclip, rules.autoclip.config(window=4), lambda g: g),
        (rules.overshoot, rules.overshoot.config("momentum"),
         lambda g: rules.overshoot.Observation(g, np.float32(0.5))),
        (rules.spike_skip, rules.spike_skip.config(window=4),
         lambda g: rules.spike_skip.Observation(g, None)),
    ]:
        s0 = mod.init(cfg, rules.NUMPY)
        for bad in (math.nan, math.inf):
            _, prop = mod.update(cfg, s0, obs(np.float32(bad)), rules.NUMPY)
            for a, b in zip(prop, s0):
                np.testing.assert_array_equal(a, b)


def test_coefficient_policy():
    xp = rules.NUMPY
    c = rules.norm_clip.coefficient
    assert float(c(np.float32(2.0), 1.0, xp)) == pytest.approx(1.0 / (2.0 + 1e-6))
    assert float(c(np.float32(1.0), 1.0, xp)) < 1.0               # torch's formula
    assert float(c(np.float32(1.0), 1.0, xp, strict=True)) == 1.0  # adaptive: at threshold
    assert float(c(np.float32(math.inf), 1.0, xp, nonfinite=np.bool_(True))) == 1.0
    assert float(c(np.float32(math.inf), 1.0, xp, nonfinite=np.bool_(True),
                   propagate=True)) == 0.0


def test_thresholds_beyond_float32_and_config_errors():
    for xp, like in [(rules.NUMPY, None), (xp_torch.TORCH, torch.zeros(()))]:
        assert math.isinf(float(xp.full((), 1e39, "f32", like)))  # what float32(1e39) means
        assert float(xp.full((), 1e39, "f64", like)) == 1e39
    with pytest.raises(ValueError, match="max_norm=1e.39 is beyond float32"):
        rules.norm_clip.config(1e39)
    assert math.isinf(rules.norm_clip.config(math.inf).max_norm)
    assert rules.norm_clip.config(np.float32(1.0)).max_norm == 1.0
    with pytest.raises(TypeError, match="max_norm"):
        rules.norm_clip.config(torch.tensor(1.0))
    with pytest.raises(TypeError, match="max_norm"):
        rules.norm_clip.config("1.0")
    with pytest.raises(ValueError, match="max_norm"):
        rules.norm_clip.config(math.nan)
    with pytest.raises(ValueError, match="percentile"):
        rules.autoclip.config(0.0)
    with pytest.raises(ValueError, match="mode"):
        rules.overshoot.config("fast")


@pytest.mark.parametrize("p", [10.0, 50.0, 90.0])
def test_autoclip_history_bound_against_np_percentile_2000_lognormal(p):
    """Exact for the first 1024 norms, then within the documented factor r of np.percentile
    at every step (history plus the current norm, as the rule defines it)."""
    xp = rules.NUMPY
    cfg = rules.autoclip.config(p)
    r = rules.autoclip.ratio(cfg)
    norms = np.float32(np.random.default_rng(7).lognormal(0.0, 1.0, 2000))
    state = rules.autoclip.init(cfg, xp)
    worst_exact = worst = 0.0
    with np.errstate(all="ignore"):
        for i, g in enumerate(norms):
            thr, prop = rules.autoclip.update(cfg, state, g, xp)
            state = rules.commit(np.bool_(True), prop, state, xp)
            q = float(np.percentile(norms[:i + 1].astype(np.float64), p))
            err = abs(float(thr) / q - 1.0)
            if i < 1024:
                worst_exact = max(worst_exact, err)
            else:
                assert q / r * (1 - 1e-6) <= float(thr) <= q * r * (1 + 1e-6), (i, thr, q)
                worst = max(worst, err)
    assert worst_exact <= 1e-6
    assert worst <= r - 1


def test_zclip_max_norm_follows_the_paper():
    """max_norm=0.5, warm-up 3 on [1.0, 1.1, 0.9]: the statistics hold the raw norms (mean
    1.0, population std 0.0816), not the capped 0.5 (which would give std 0)."""
    xp = rules.NUMPY
    cfg = rules.zclip.config(warmup_steps=3, max_norm=0.5)
    state = rules.zclip.init(cfg, xp)
    for g in (1.0, 1.1, 0.9):
        thr, prop = rules.zclip.update(cfg, state, np.float32(g), xp)
        assert float(thr) == 0.5
        state = rules.commit(np.bool_(True), prop, state, xp)
    raw = np.float32([1.0, 1.1, 0.9]).astype(np.float64)
    assert float(state.mean) == pytest.approx(raw.mean(), rel=1e-6)
    assert math.sqrt(float(state.var)) == pytest.approx(raw.std(), rel=1e-5)
    # 1.1 is no spike for the paper's rule: the threshold is the cap, the EMA is fed 1.1
    thr, prop = rules.zclip.update(cfg, state, np.float32(1.1), xp)
    assert float(thr) == 0.5
    assert math.isinf(float(rules.zclip.adaptive_threshold(cfg, state, np.float32(1.1), xp)))
    new = rules.commit(np.bool_(True), prop, state, xp)
    assert float(new.mean) == pytest.approx(0.97 * raw.mean() + 0.03 * float(np.float32(1.1)),
                                            rel=1e-6)


@pytest.mark.parametrize("rule", ["zclip", "overshoot", "autoclip", "autoclip-window",
                                  "spike_skip"])
def test_folded_accept_equals_commit(rule):
    """``update(..., accept=a)`` / ``propose(..., accept=a)`` give exactly
    ``commit(a, proposal, state)``: the façades' one-``where`` path is the API's."""
    xp, like = xp_torch.TORCH, torch.zeros(())
    seq = rv.SEQUENCES["spiky"]
    name = rule.split("-")[0]
    mod = getattr(rules, name)
    cfg = {"zclip": lambda: mod.config(warmup_steps=4),
           "overshoot": lambda: mod.config("momentum"),
           "autoclip": lambda: mod.config(10.0),
           "autoclip-window": lambda: mod.config(10.0, window=6),
           "spike_skip": lambda: mod.config(window=8, min_history=3)}[rule]()
    a = b = mod.init(cfg, xp, like)
    for i, (g, ok) in enumerate(zip(seq["norms"], seq["accepted"])):
        total = xp.full((), g, "f32", like)
        acc = xp.full((), ok, "bool", like)
        if name == "zclip":
            a = rules.commit(acc, mod.update(cfg, a, total, xp)[1], a, xp)
            b = mod.update(cfg, b, total, xp, accept=acc)[1]
        elif name == "overshoot":
            obs = mod.Observation(total, xp.full((), seq["cos"][i], "f32", like))
            a = rules.commit(acc, mod.update(cfg, a, obs, xp)[1], a, xp)
            b = mod.update(cfg, b, obs, xp, accept=acc)[1]
        elif name == "autoclip":
            a = rules.commit(acc, mod.propose(cfg, a, total, xp), a, xp)
            b = mod.propose(cfg, b, total, xp, accept=acc)
        else:
            obs = mod.Observation(total, xp.full((), seq["losses"][i], "f32", like))
            a = rules.commit(acc, mod.propose(cfg, a, obs, xp), a, xp)
            b = mod.propose(cfg, b, obs, xp, accept=acc)
        for x, y in zip(a, b):
            assert torch.equal(torch.nan_to_num(x.double(), nan=-7.0),
                               torch.nan_to_num(y.double(), nan=-7.0)), (rule, i)
