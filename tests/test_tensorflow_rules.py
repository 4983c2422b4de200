"""The pure rules on the TensorFlow namespace: the reference vectors, parity with torch (1e-6
relative), and the same decisions under tf.function and XLA (jit_compile=True)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import rule_vectors as rv

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")

from gradguard import rules  # noqa: E402
from gradguard.rules import xp_tf  # noqa: E402

TF = xp_tf.TF


def _close(a: float, b: float, rel: float = 1e-6) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel)


@pytest.mark.parametrize("case", rv.CASES, ids=rv.case_id)
def test_tf_rule_matches_reference_and_torch(case):
    """Float64 reference (float32 round-off) and torch (1e-6 relative, same decisions)."""
    got = rv.drive(case, TF, None, to_float=lambda t: float(t.numpy()))
    rv.assert_matches(got, rv.expected(case))
    torch = pytest.importorskip("torch")
    from gradguard.rules import xp_torch

    want = rv.drive(case, xp_torch.TORCH, torch.zeros(()))
    for x, y in zip(got, want):
        assert x.keys() == y.keys()
        for k in x:
            assert (x[k] == y[k]) if k == "skip" else _close(x[k], y[k]), (k, x, y)


def _compiled_cases() -> list[dict]:
    """The first case of each rule, plus the windowed AutoClip and a step-control Overshoot
    (every code path, with little XLA compile time)."""
    seen, out = set(), []
    for c in rv.CASES:
        key = (c["rule"], bool(c["config"].get("window")) if c["rule"] == "autoclip"
               else c["config"].get("mode") == "momentum")
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


COMPILED = _compiled_cases()


def _compiled_drive(case, jit: bool) -> list[dict]:
    """``rv.drive`` with each step (update, coefficient, commit) one compiled tf.function."""
    seq = rv.SEQUENCES[case["seq"]]
    mod = getattr(rules, case["rule"])
    cfg = mod.config(**case["config"])
    state = mod.init(cfg, TF, None)
    if case["rule"] == "overshoot" and "init_limit" in case:
        state = state._replace(init_limit=TF.full((), case["init_limit"], "f32"))

    @tf.function(jit_compile=jit)
    def step(state, total, ok, aux):
        if case["rule"] == "spike_skip":
            loss = None if seq["losses"] is None else aux
            skip, prop = mod.update(cfg, state, mod.Observation(total, loss), TF)
            accept = ~skip & tf.math.is_finite(total) & ok
            return rules.commit(accept, prop, state, TF), skip, skip
        if case["rule"] == "overshoot":
            thr, prop = mod.update(cfg, state, mod.Observation(total, aux), TF)
        else:
            thr, prop = mod.update(cfg, state, total, TF)
        nonfinite = ~tf.math.is_finite(total)
        coef = rules.norm_clip.coefficient(total, thr, TF, nonfinite=nonfinite,
                                           strict=case["rule"] != "norm_clip")
        return rules.commit(~nonfinite & ok, prop, state, TF), thr, coef

    out = []
    for i, (g, ok) in enumerate(zip(seq["norms"], seq["accepted"])):
        aux_src = seq["losses"] if case["rule"] == "spike_skip" else seq["cos"]
        aux = tf.constant(0.0 if aux_src is None else aux_src[i], tf.float32)
        state, a, b = step(state, tf.constant(g, tf.float32), tf.constant(ok), aux)
        if case["rule"] == "spike_skip":
            out.append({"skip": bool(a.numpy())})
        else:
            out.append({"threshold": float(a.numpy()), "coef": float(b.numpy())})
    return out


@pytest.mark.parametrize("jit", [False, True], ids=["function", "xla"])
@pytest.mark.parametrize("case", COMPILED, ids=rv.case_id)
def test_tf_rules_compiled_match_reference(case, jit):
    rv.assert_matches(_compiled_drive(case, jit), rv.expected(case))


def test_namespace_ops_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    x[1, 2] = np.nan
    t = tf.constant(x)
    NP = rules.NUMPY
    assert rules.namespace(t) is TF
    np.testing.assert_array_equal(TF.amax(t, axis=1).numpy(), NP.amax(x, axis=1))
    np.testing.assert_array_equal(TF.amax(t, axis=(0, 1), keepdims=True).numpy(),
                                  NP.amax(x, axis=(0, 1), keepdims=True))
    v = np.array([3.0, np.nan, 1.0, np.inf, -2.0], np.float32)
    np.testing.assert_array_equal(TF.sort(tf.constant(v)).numpy(), NP.sort(v))  # NaN last
    s = np.array([1.0, 2.0, 2.0, 5.0])
    for val in (0.0, 2.0, 3.0, 9.0):
        for right in (False, True):
            assert int(TF.searchsorted(tf.constant(s), tf.constant(val, tf.float64), right)) == \
                int(NP.searchsorted(s, np.float64(val), right))
    assert TF.full((), 1e39, "f32").numpy() == np.inf
    np.testing.assert_array_equal(TF.clamp(tf.constant(v), lo=0.0, hi=2.0).numpy(), NP.clamp(v, 0.0, 2.0))
    np.testing.assert_array_equal(TF.where(tf.constant(v) > 0, 1.0, tf.constant(v)).numpy(),
                                  NP.where(v > 0, 1.0, v))
    assert int(TF.sum(tf.constant([True, False, True]))) == 2
    assert TF.sum(tf.constant([True])).dtype == tf.int64
    np.testing.assert_array_equal(TF.astype(tf.constant([1.7, -1.7]), "i64").numpy(), [1, -1])
    np.testing.assert_array_equal(TF.concat([tf.constant(1.0), tf.constant([2.0, 3.0])]).numpy(), [1, 2, 3])
    np.testing.assert_array_equal(TF.cumsum(tf.constant([1, 2, 3], tf.int64)).numpy(), [1, 3, 6])
    np.testing.assert_array_equal(TF.take(tf.constant([5.0, 6.0]), tf.constant(1, tf.int64)).numpy(), 6.0)
