"""gradguard.optax fixed clippers and the skip wrapper: against optax's own transforms on
finite input, a float64 numpy reference, and the measured bad cases of optax."""

from __future__ import annotations

import functools
import pickle

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import gradguard.optax as ggo  # noqa: E402

SETTINGS = settings(max_examples=25, deadline=None)


def train_steps(step, p, s, grads):
    """Apply ``step(g, s, p) -> (updates, s)`` for each gradient; the final (params, state)."""
    for g in grads:
        u, s = step(g, s, p)
        p = optax.apply_updates(p, u)
    return p, s


def _ref_norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.abs(np.asarray(x, np.float64)) ** 2)
                             for x in jax.tree.leaves(tree))))


def _as_f32(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


# Pytrees of two fixed structures (so that JAX compiles each operation once, not per
# example) with float32 elements in [-1e3, 1e3], zeros and tiny values included.
def _arr(shape):
    return hnp.arrays(np.float32, shape, elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False))


trees = st.one_of(st.fixed_dictionaries({"w": _arr((2, 3)), "b": _arr((3,))}),
                  st.fixed_dictionaries({"k": _arr((4,))}))
# thresholds: 0 or normal float32 numbers (XLA on the CPU flushes subnormals to zero)
max_norms = st.one_of(st.just(0.0), st.floats(1e-3, 3e3))


def _close(a, b, rtol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-30)


# -- norms ---------------------------------------------------------------------------------
@SETTINGS
@given(trees)
def test_tree_norms_match_float64_reference(tree):
    n = ggo.tree_norms(tree)
    assert np.isclose(float(n.total), _ref_norm(tree), rtol=2e-6, atol=1e-30)
    for i, x in enumerate(jax.tree.leaves(tree)):
        assert np.isclose(float(n.per_leaf[i]), _ref_norm(x), rtol=2e-6, atol=1e-30)
        assert float(n.max_abs[i]) == float(np.max(np.abs(x), initial=0))
    assert not bool(n.nonfinite)


def test_float16_leaf_of_300_has_its_exact_norm_where_optax_gives_inf():
    g = {"a": jnp.full((4,), 300.0, jnp.float16), "b": jnp.ones((3,), jnp.float32)}
    assert not np.isfinite(float(optax.tree.norm(g)))  # the bug being fixed
    n = ggo.tree_norms(g)
    assert float(n.total) == pytest.approx(np.sqrt(4 * 300.0**2 + 3), rel=1e-6)
    assert float(n.per_leaf[0]) == 600.0


def test_bfloat16_and_float32_squares_beyond_float32_range_are_rescaled():
    gb = {"a": jnp.full((1024,), 3.0e19, jnp.bfloat16)}
    true = float(np.float32(jnp.asarray(3.0e19, jnp.bfloat16))) * 32.0
    assert float(ggo.tree_norms(gb).total) == pytest.approx(true, rel=1e-6)
    g = {"x": jnp.array([3e20, 4e20], jnp.float32), "y": jnp.array([1.0])}
    n = ggo.tree_norms(g)
    assert float(n.total) == pytest.approx(5e20, rel=1e-6)
    assert float(n.per_leaf[1]) == pytest.approx(1.0, rel=1e-6)
    assert not bool(n.nonfinite)


def test_nonfinite_flag_and_norm():
    n = ggo.tree_norms({"a": jnp.array([1.0, jnp.nan]), "b": jnp.ones(2)})
    assert bool(n.nonfinite) and np.isnan(float(n.total))
    n = ggo.tree_norms({"a": jnp.array([1.0, -jnp.inf])})
    assert bool(n.nonfinite) and np.isinf(float(n.total))
    n = ggo.tree_norms({})
    assert float(n.total) == 0.0 and n.per_leaf.shape == (0,)


def test_leaf_names_are_paths():
    tree = {"dense": {"kernel": 1, "bias": 2}, "out": [3, 4]}
    assert ggo.leaf_names(tree) == ["dense/bias", "dense/kernel", "out/0", "out/1"]


# -- clip_by_global_norm ---------------------------------------------------------------------
@SETTINGS
@given(trees, max_norms)
def test_global_norm_clip_matches_optax_on_finite_input(tree, max_norm):
    ours, s = ggo.clip_by_global_norm(max_norm).update(tree, ggo.clip_by_global_norm(max_norm).init(tree))
    ref, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
    if np.float32(max_norm) == 0.0 and float(optax.tree.norm(tree)) == 0.0:
        ref = tree  # optax gives 0/0 = NaN here (optax PR #1752); unchanged is the answer
    _close(ours, ref)
    assert float(s.total_norm) == pytest.approx(_ref_norm(tree), rel=2e-6, abs=1e-30)
    assert bool(s.clipped) == (float(s.total_norm) > max_norm)
    if not bool(s.clipped):  # bit-for-bit unchanged
        for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(tree)):
            assert np.array_equal(np.asarray(x), y)


def test_global_norm_clip_float16_clips_correctly_and_keeps_float32_leaves():
    g = {"a": jnp.full((4,), 300.0, jnp.float16), "b": jnp.ones((3,), jnp.float32)}
    bad, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    assert float(jnp.abs(bad["b"]).max()) == 0.0  # optax zeroes the float32 leaf too
    out, s = ggo.clip_by_global_norm(1.0).update(g, ggo.clip_by_global_norm(1.0).init(g))
    total = np.sqrt(4 * 300.0**2 + 3)
    assert out["a"].dtype == jnp.float16 and out["b"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out["a"], np.float64), 300.0 / total, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(out["b"]), 1.0 / total, rtol=1e-6)
    assert float(ggo.tree_norms(out).total) == pytest.approx(1.0, rel=1e-3)
    assert float(s.clip_coef) == pytest.approx(1.0 / total, rel=1e-6)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_global_norm_clip_passes_nonfinite_through_never_zeroing(bad):
    g = {"a": jnp.array([1.0, bad]), "b": jnp.full((3,), 5.0)}
    tx = ggo.clip_by_global_norm(1.0)
    out, s = tx.update(g, tx.init(g))
    assert bool(s.nonfinite) and not bool(s.clipped) and float(s.clip_coef) == 1.0
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
        assert np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
    ref, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
    assert not np.all(np.isfinite(np.asarray(ref["b"]))) or float(jnp.abs(ref["b"]).max()) == 0.0


def test_global_norm_clip_zero_max_norm_zero_gradients_no_nan():
    z = {"a": jnp.zeros(3)}
    ref, _ = optax.clip_by_global_norm(0.0).update(z, optax.EmptyState())
    assert np.isnan(np.asarray(ref["a"])).all()  # optax PR #1752
    tx = ggo.clip_by_global_norm(0.0)
    out, s = tx.update(z, tx.init(z))
    assert np.array_equal(np.asarray(out["a"]), np.zeros(3)) and float(s.clip_coef) == 1.0
    out, _ = tx.update({"a": jnp.ones(3)}, tx.init(z))
    assert np.array_equal(np.asarray(out["a"]), np.zeros(3))


def test_global_norm_state_readable_under_jit_with_tree_get():
    p = {"w": jnp.zeros(2)}
    tx = optax.chain(ggo.clip_by_global_norm(1.0), optax.sgd(0.1))
    s = tx.init(p)
    _, s = jax.jit(tx.update)({"w": jnp.array([3.0, 4.0])}, s, p)
    assert float(optax.tree.get(s, "total_norm")) == 5.0
    assert float(optax.tree.get(s, "clip_coef")) == pytest.approx(0.2)
    assert bool(optax.tree.get(s, "clipped"))
    np.testing.assert_allclose(np.asarray(optax.tree.get(s, "leaf_norms")), [5.0])


@pytest.mark.parametrize("value", ["1", None, -1.0, float("nan"), True])
def test_bad_max_norm_is_refused_naming_the_argument(value):
    with pytest.raises((TypeError, ValueError), match="max_norm"):
        ggo.clip_by_global_norm(value)
    with pytest.raises((TypeError, ValueError), match="max_norm"):
        ggo.clip_by_norm_per_leaf(value)


def test_traced_max_norm_works_with_inject_hyperparams():
    p = {"w": jnp.zeros(2)}
    tx = optax.inject_hyperparams(ggo.clip_by_global_norm)(max_norm=1.0)
    s = tx.init(p)
    out, s = jax.jit(tx.update)({"w": jnp.array([3.0, 4.0])}, s, p)
    np.testing.assert_allclose(np.asarray(out["w"]), [0.6, 0.8], rtol=1e-6)


# -- per leaf, value, AGC ------------------------------------------------------------------
@SETTINGS
@given(trees, max_norms)
def test_per_leaf_clip_matches_optax_global_clip_applied_per_leaf(tree, max_norm):
    tx = ggo.clip_by_norm_per_leaf(max_norm)
    ours, s = tx.update(tree, tx.init(tree))
    for k, x in tree.items():
        ref, _ = optax.clip_by_global_norm(max_norm).update(x, optax.EmptyState())
        if np.float32(max_norm) == 0.0 and float(optax.tree.norm(x)) == 0.0:
            ref = x
        np.testing.assert_allclose(np.asarray(ours[k]), np.asarray(ref), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(np.asarray(s.per_leaf_norms),
                               [_ref_norm(x) for x in jax.tree.leaves(tree)], rtol=2e-6, atol=1e-30)


def test_per_leaf_clip_nonfinite_clips_nothing():
    g = {"a": jnp.array([jnp.nan, 1.0]), "b": jnp.full(4, 10.0)}
    tx = ggo.clip_by_norm_per_leaf(1.0)
    out, s = tx.update(g, tx.init(g))
    assert bool(s.per_leaf_nonfinite)
    assert np.array_equal(np.asarray(out["b"]), np.full(4, 10.0))


@SETTINGS
@given(trees, max_norms)
def test_value_clip_matches_optax_clip(tree, v):
    tx = ggo.clip_by_value(v)
    ours, s = tx.update(tree, tx.init(tree))
    ref, _ = optax.clip(v).update(tree, optax.EmptyState())
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    moved = sum(int(np.sum(np.abs(x) > np.float32(v))) for x in jax.tree.leaves(tree))
    assert int(s.clipped_elements) == moved


def test_value_clip_asymmetric_and_nan():
    g = {"a": jnp.array([-5.0, 0.5, 7.0, jnp.nan, jnp.inf])}
    tx = ggo.clip_by_value(min_value=-1.0, max_value=2.0)
    out, s = tx.update(g, tx.init(g))
    np.testing.assert_array_equal(np.asarray(out["a"]), [-1.0, 0.5, 2.0, np.nan, 2.0])
    assert int(s.clipped_elements) == 3
    with pytest.raises(ValueError, match="min_value"):
        ggo.clip_by_value(min_value=2.0, max_value=1.0)
    with pytest.raises(ValueError, match="clip_value"):
        ggo.clip_by_value()
    with pytest.raises(ValueError, match="clip_value"):
        ggo.clip_by_value(-1.0)


agc_params = st.sampled_from([(7,), (4, 3), (2, 3, 4), (3, 3, 2, 4), (1, 5)])


@settings(max_examples=10, deadline=None)
@given(agc_params, st.integers(0, 2**31 - 1), st.sampled_from([0.01, 0.1, 1.0]))
def test_agc_matches_optax_adaptive_grad_clip(shape, seed, clipping):
    rng = np.random.default_rng(seed)
    p = {"w": rng.normal(size=shape).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
    g = {"w": (rng.normal(size=shape) * rng.choice([0.001, 1.0, 100.0])).astype(np.float32),
         "b": rng.normal(size=(3,)).astype(np.float32)}
    tx = ggo.agc(clipping)
    ours, _ = tx.update(g, tx.init(p), p)
    ref, _ = optax.adaptive_grad_clip(clipping).update(g, optax.EmptyState(), p)
    _close(ours, ref, rtol=2e-6)


def test_agc_needs_params_and_passes_nonfinite():
    g = {"w": jnp.array([[1.0, jnp.nan], [100.0, 100.0]])}
    p = {"w": jnp.ones((2, 2))}
    tx = ggo.agc(0.01)
    with pytest.raises(ValueError, match="params"):
        tx.update(g, tx.init(p))
    out, s = tx.update(g, tx.init(p), p)
    assert bool(s.agc_nonfinite)
    assert np.array_equal(np.asarray(out["w"]), np.asarray(g["w"]), equal_nan=True)
    with pytest.raises(ValueError, match="axis"):
        tx.update({"w": jnp.ones((2,) * 6)}, tx.init(p), {"w": jnp.ones((2,) * 6)})


# -- skip_nonfinite ------------------------------------------------------------------------
def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_nan_streak_never_applied_and_inner_state_held_bit_for_bit():
    params = {"w": jnp.array([1.0, -0.0, 2.0]), "b": jnp.array([0.5])}
    good = {"w": jnp.array([0.1, 0.2, -0.3]), "b": jnp.array([1.0])}
    bad = {"w": jnp.array([1.0, jnp.nan, 1.0]), "b": jnp.array([1.0])}
    ours = ggo.skip_nonfinite(optax.adam(0.1))
    s = ours.init(params)
    step = jax.jit(ours.update)
    upd, s = step(good, s, params)
    params = optax.apply_updates(params, upd)
    p_before, s_before = _bits(params), _bits(s.inner_state)
    for i in range(6):  # a longer streak than apply_if_finite tolerates
        upd, s = step(bad, s, params)
        params = optax.apply_updates(params, upd)
        assert _bits(params) == p_before and _bits(s.inner_state) == s_before
        assert bool(s.skipped) and int(s.consecutive_skips) == i + 1
    assert int(s.skip_count) == 6 and int(s.guard_steps) == 7
    upd, s = step(good, s, params)
    assert not bool(s.skipped) and int(s.consecutive_skips) == 0 and int(s.skip_count) == 6
    assert int(optax.tree.get(s.inner_state, "count")) == 2

    # optax.apply_if_finite gives up and applies the NaN (the measured bug)
    ref = optax.apply_if_finite(optax.adam(0.1), max_consecutive_errors=2)
    p, rs = {"w": jnp.ones(3)}, ref.init({"w": jnp.ones(3)})
    for _ in range(3):
        u, rs = ref.update({"w": bad["w"]}, rs, p)
        p = optax.apply_updates(p, u)
    assert np.isnan(np.asarray(p["w"])).any()


def test_negative_zero_params_survive_a_refused_step():
    params = {"w": jnp.array([-0.0, 0.0, -1.0])}
    tx = ggo.skip_nonfinite(optax.sgd(1.0))
    upd, _ = tx.update({"w": jnp.array([jnp.inf, 0.0, 0.0])}, tx.init(params), params)
    out = optax.apply_updates(params, upd)
    assert np.asarray(out["w"]).tobytes() == np.asarray(params["w"]).tobytes()


def test_skip_matches_plain_optimizer_on_finite_steps():
    rng = np.random.default_rng(0)
    p1 = p2 = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
    ours = ggo.skip_nonfinite(optax.chain(ggo.clip_by_global_norm(1.0), optax.adam(1e-2)))
    ref = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    s1, s2 = ours.init(p1), ref.init(p2)
    for _ in range(5):
        g = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = ref.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    _close(p1, p2, rtol=1e-6)


def test_check_skips_raises_on_the_host():
    from gradguard.errors import GradientExplosionError

    params = {"w": jnp.ones(2)}
    tx = ggo.skip_nonfinite(optax.sgd(1.0))
    s = tx.init(params)
    for _ in range(3):
        _, s = tx.update({"w": jnp.array([jnp.nan, 1.0])}, s, params)
    ggo.check_skips(s, 3)
    with pytest.raises(GradientExplosionError, match="3 updates in a row"):
        ggo.check_skips(s, 2)
    with pytest.raises(TypeError, match="inner"):
        ggo.skip_nonfinite(lambda g: g)


def test_vmap_over_independent_problems():
    tx = ggo.skip_nonfinite(optax.chain(ggo.clip_by_global_norm(1.0), optax.sgd(1.0)))
    params = {"w": jnp.zeros((3, 2))}
    grads = {"w": jnp.array([[3.0, 4.0], [jnp.nan, 1.0], [0.3, 0.4]])}
    state = jax.vmap(tx.init)(params)
    upd, state = jax.jit(jax.vmap(tx.update))(grads, state, params)
    np.testing.assert_allclose(np.asarray(upd["w"]), [[-0.6, -0.8], [-0.0, -0.0], [-0.3, -0.4]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.skipped), [False, True, False])


def test_vmap_adaptive_transforms_match_each_problem_run_alone():
    """vmap over independent problems (e.g. an ensemble): every stateful transform's state
    batches, and each problem's updates and statistics are those of running it alone."""
    rng = np.random.default_rng(5)
    seq = [{"w": jnp.asarray(rng.normal(size=(3, 2)) * rng.choice([1.0, 1.0, 30.0], size=(3, 1)),
                             jnp.float32)} for _ in range(8)]
    seq[5] = {"w": seq[5]["w"].at[1, 0].set(jnp.nan)}  # problem 1 only
    params = {"w": jnp.zeros((3, 2))}
    tx = ggo.spike_skip(optax.chain(ggo.zclip(warmup_steps=2), ggo.autoclip(window=4),
                                    optax.adam(1e-2)), threshold=3.0, window=4, min_history=2)
    vstep = jax.jit(jax.vmap(tx.update))
    one = jax.jit(tx.update)
    vs = jax.vmap(tx.init)(params)
    alone = [tx.init({"w": params["w"][i]}) for i in range(3)]
    skipped = np.zeros(3, bool)
    for g in seq:
        vu, vs = vstep(g, vs, params)
        for i in range(3):
            u, alone[i] = one({"w": g["w"][i]}, alone[i], {"w": params["w"][i]})
            np.testing.assert_allclose(np.asarray(vu["w"][i]), np.asarray(u["w"]), rtol=1e-6)
        skipped |= np.asarray(vs.skipped)
    for i in range(3):
        _close(jax.tree.map(lambda x, i=i: x[i], vs), alone[i])
    assert skipped[1]  # the NaN step refused in problem 1, whatever the others did
    assert np.asarray(vs.skip_count).tolist() == [int(a.skip_count) for a in alone]


def _every_transform():
    inner = optax.chain(ggo.clip_by_global_norm(1.0), ggo.clip_by_norm_per_leaf(2.0),
                        ggo.clip_by_value(5.0), ggo.agc(0.01), ggo.autoclip(), ggo.autoclip(window=4),
                        ggo.zclip(), ggo.auto(), ggo.auto(adaptive=True),
                        ggo.auto(optimizer_scale=True), optax.adam(1e-3))
    return [
        ggo.skip_nonfinite(inner),
        ggo.history(ggo.spike_skip(inner, window=8), length=4),
        ggo.skip_nonfinite(optax.chain(ggo.auto(learning_rate=0.1), optax.sgd(0.1))),
        ggo.skip_nonfinite(optax.chain(ggo.auto(learning_rate=0.1, momentum=0.9),
                                       optax.sgd(0.1, momentum=0.9))),
        optax.MultiSteps(ggo.skip_nonfinite(inner), every_k_schedule=2,
                         should_skip_update_fn=ggo.skip_microstep()),
    ]


@pytest.mark.parametrize("i", range(5), ids=["clippers", "history-spike", "auto-trust",
                                             "auto-momentum", "multisteps"])
def test_no_host_callbacks_in_the_jaxpr(i):
    tx = _every_transform()[i]
    p = {"w": jnp.ones((2, 2)), "b": jnp.ones(2, jnp.float16)}
    s = tx.init(p)
    if isinstance(tx, optax.GradientTransformationExtraArgs) and not isinstance(tx, optax.MultiSteps):
        jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, value=jnp.float32(1.0)))(p, s, p)
    else:
        jaxpr = jax.make_jaxpr(tx.update)(p, s, p)
    text = str(jaxpr)
    assert "callback" not in text and "debug" not in text and "infeed" not in text
    assert "pure_callback" not in text and "io_callback" not in text


def test_stats_are_read_under_jit_as_optax_monitor_is():
    p = {"w": jnp.zeros(2)}
    tx = ggo.skip_nonfinite(optax.chain(ggo.zclip(warmup_steps=1), optax.adam(0.1)))
    mon = optax.monitor({"norm_before": optax.tree.norm})
    s = tx.init(p)

    @jax.jit
    def step(g, s):
        _, s = tx.update(g, s, p)
        st = ggo.stats(s)
        return s, st, optax.tree.get(s, "grad_norm"), optax.tree.get(s, "threshold")

    s, st, norm, thr = step({"w": jnp.array([3.0, 4.0])}, s)
    _, ms = mon.update({"w": jnp.array([3.0, 4.0])}, mon.init(p))
    assert float(norm) == float(optax.tree.get(ms, "norm_before")) == 5.0  # the same number
    assert float(st["total_norm"]) == 5.0 and float(thr) == float(st["threshold"])
    s, st, norm, _ = step({"w": jnp.array([jnp.nan, 4.0])}, s)
    assert bool(st["skipped"]) and bool(st["nonfinite"]) and int(st["consecutive_skips"]) == 1
    assert float(st["clip_coef"]) == 1.0 and np.isnan(float(norm))


def test_chain_positions_give_optax_numbers_on_finite_input():
    """Before the optimizer (clip the gradient), after its scaling (clip the update), next to
    weight decay, and per parameter group inside optax.multi_transform: on finite input the
    same updates as optax's own clipper in the same place."""
    rng = np.random.default_rng(2)
    p = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3)}
    labels = {"w": "a", "b": "b"}
    pairs = []
    for clip in (ggo.clip_by_global_norm, optax.clip_by_global_norm):
        pairs.append([
            optax.chain(clip(1.0), optax.adam(1e-2)),
            optax.chain(optax.scale_by_adam(), clip(0.5), optax.scale(-1e-2)),
            optax.chain(optax.add_decayed_weights(1e-2), clip(1.0), optax.sgd(0.1, momentum=0.9)),
            optax.multi_transform({"a": optax.chain(clip(0.3), optax.sgd(0.1)),
                                   "b": optax.chain(clip(2.0), optax.adam(1e-2))}, labels),
        ])
    for ours, ref in zip(*pairs):
        s1, s2, p1, p2 = ours.init(p), ref.init(p), p, p
        for _ in range(4):
            g = {k: jnp.asarray(rng.normal(size=v.shape) * 3, jnp.float32) for k, v in p.items()}
            u1, s1 = ours.update(g, s1, p1)
            u2, s2 = ref.update(g, s2, p2)
            p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
        _close(p1, p2, rtol=2e-6)
        assert any(bool(v) for _, v in optax.tree_utils.tree_get_all_with_path(s1, "clipped"))


def test_state_pickles_and_resumes_bit_exactly(tmp_path):
    rng = np.random.default_rng(1)
    grads = [{"w": jnp.asarray(rng.normal(size=4) * 10, jnp.float32)} for _ in range(8)]
    grads[3] = {"w": jnp.array([jnp.nan, 0, 0, 0], jnp.float32)}
    tx = ggo.skip_nonfinite(optax.chain(ggo.clip_by_global_norm(1.0), optax.adam(1e-2)))
    step = jax.jit(tx.update)

    run = functools.partial(train_steps, step)

    p0 = {"w": jnp.zeros(4)}
    full_p, full_s = run(p0, tx.init(p0), grads)
    p, s = run(p0, tx.init(p0), grads[:5])
    f = tmp_path / "ckpt.pkl"
    f.write_bytes(pickle.dumps(jax.device_get((p, s))))
    p, s = jax.tree.map(jnp.asarray, pickle.loads(f.read_bytes()))
    p, s = run(p, s, grads[5:])
    assert _bits(p) == _bits(full_p) and _bits(s) == _bits(full_s)


def test_orbax_checkpoint_resumes_bit_exactly(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    rng = np.random.default_rng(4)
    grads = [{"w": jnp.asarray(rng.normal(size=(3, 2)) * (30 if i == 6 else 1), jnp.float32)}
             for i in range(10)]
    grads[3] = {"w": grads[3]["w"].at[0, 1].set(jnp.nan)}
    tx = ggo.history(ggo.spike_skip(optax.chain(ggo.autoclip(window=4), ggo.zclip(warmup_steps=2),
                                                optax.adam(1e-2)), threshold=3.0, window=4,
                                    min_history=2), length=4)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, value=jnp.sum(g["w"])))

    run = functools.partial(train_steps, step)

    p0 = {"w": jnp.ones((3, 2))}
    full = run(p0, tx.init(p0), grads)
    half = run(p0, tx.init(p0), grads[:6])
    ck = ocp.StandardCheckpointer()
    ck.save(tmp_path / "ckpt", {"params": half[0], "opt_state": half[1]})
    ck.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": p0, "opt_state": tx.init(p0)})
    r = ck.restore(tmp_path / "ckpt", target)
    ck.close()
    assert type(r["opt_state"]) is type(half[1])
    resumed = run(r["params"], r["opt_state"], grads[6:])
    assert _bits(resumed) == _bits(full)


def test_tiny_gradients_keep_their_norm():
    g = {"a": jnp.full((4,), 1e-30, jnp.float32), "b": jnp.full((2,), 1e-3)}
    n = ggo.tree_norms(g)
    assert float(n.per_leaf[0]) == pytest.approx(2e-30, rel=1e-6)
    assert float(n.total) == pytest.approx(np.sqrt(2) * 1e-3, rel=1e-6)
    assert float(jax.jit(ggo.tree_norms)(g).per_leaf[0]) == pytest.approx(2e-30, rel=1e-6)
