"""gradguard.tensorflow against TensorFlow's own functions and a float64 numpy reference."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = pytest.importorskip("tensorflow")
hyp = pytest.importorskip("hypothesis")
import reference as ref  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import gradguard.tensorflow as ggtf  # noqa: E402

FAST = settings(max_examples=30, deadline=None)

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
floats = st.floats(-1e3, 1e3, width=32)
arrays = hnp.arrays(np.float32, shapes, elements=floats)
lists = st.lists(arrays, min_size=1, max_size=4)
thresholds = st.floats(1e-3, 1e3)


def ref_norm(arrs) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrs))


def modes():
    """The same function eagerly, under tf.function and under XLA."""
    return [lambda f: f, tf.function, lambda f: tf.function(f, jit_compile=True)]


MODES = pytest.mark.parametrize("mode", range(3), ids=["eager", "function", "xla"])


# -- global_norm ------------------------------------------------------------------------------
@FAST
@given(lists)
def test_global_norm_matches_tf_and_float64(arrs):
    ts = [tf.constant(a) for a in arrs]
    ours = float(ggtf.global_norm(ts))
    theirs = float(tf.linalg.global_norm(ts))
    ref = ref_norm(arrs)
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-30)
    if ref > 1e-15:  # below, TF's flushed squares (|x| < ~1e-19) may be a visible part of it
        assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-30)


@pytest.mark.parametrize("vals", [[9.660487e-20], [1e-19, 5e-19], [1e-30, 0.0], [2e-38]])
@MODES
def test_global_norm_exact_where_tf_underflows(vals, mode):
    """TensorFlow flushes float32 squares below 1.2e-38 to zero (found by hypothesis:
    ``tf.linalg.global_norm([9.66e-20]) == 0``); gradguard's norms are exact there too."""
    ts = [tf.constant(vals, tf.float32), tf.zeros([3])]
    exact = ref_norm([np.asarray(vals, np.float32)])
    f = modes()[mode](lambda xs: ggtf.norms(xs))
    per, total = f(ts)
    assert float(total) == pytest.approx(exact, rel=1e-6)
    assert float(per[0]) == pytest.approx(exact, rel=1e-6) and float(per[1]) == 0.0
    row = modes()[mode](lambda x: ggtf.clip_by_norm(x, 1.0, axes=[1]))
    x = tf.constant([vals, [0.0] * len(vals)], tf.float32)
    assert np.array_equal(row(x).numpy(), x.numpy())  # below the threshold: unchanged
    tiny = tf.constant([vals], tf.float32)
    clipped = modes()[mode](lambda x: ggtf.clip_by_norm(x, exact / 2))(tiny)
    assert float(tf.norm(tf.cast(clipped, tf.float64))) == pytest.approx(exact / 2, rel=1e-5)


def test_global_norm_float16_is_exact_where_tf_overflows():
    h = [tf.constant([300.0] * 4, tf.float16)]
    assert math.isinf(float(tf.linalg.global_norm(h)))  # the measured TF bug
    n = ggtf.global_norm(h)
    assert n.dtype == tf.float32 and float(n) == 600.0


def test_global_norm_mixed_dtypes():
    ts = [tf.constant([3.0], tf.float16), tf.constant([4.0], tf.float32), tf.constant([12.0], tf.bfloat16)]
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError, ValueError)):
        tf.linalg.global_norm(ts[:2])  # TF refuses the mix
    assert float(ggtf.global_norm(ts)) == 13.0
    n64 = ggtf.global_norm([tf.constant([3.0], tf.float64), tf.constant([4.0], tf.float16)])
    assert n64.dtype == tf.float64 and float(n64) == 5.0


@pytest.mark.parametrize("vals,dtype", [([1e30, 1e30], tf.float32), ([3e38, 3e38], tf.float32),
                                        ([1e30] * 3, tf.bfloat16)])
def test_global_norm_overflow_safe(vals, dtype):
    t = tf.constant(vals, dtype)
    exact = math.sqrt(sum(float(v) ** 2 for v in tf.cast(t, tf.float64).numpy()))
    n = float(ggtf.global_norm([t]))
    if exact > float(np.finfo(np.float32).max):
        assert math.isinf(n)
    else:
        assert n == pytest.approx(exact, rel=1e-6)
    per, _ = ggtf.norms([t, None])
    assert per[1] is None


def test_global_norm_nonfinite_and_empty():
    assert math.isinf(float(ggtf.global_norm([tf.constant([1.0, math.inf]), tf.constant([2.0])])))
    assert math.isnan(float(ggtf.global_norm([tf.constant([1.0, math.nan]), tf.constant([math.inf])])))
    assert float(ggtf.global_norm([])) == 0.0
    assert float(ggtf.global_norm([None, tf.zeros([0])])) == 0.0


# -- clip_by_global_norm ------------------------------------------------------------------------
@FAST
@given(lists, thresholds)
def test_clip_by_global_norm_matches_tf(arrs, c):
    ts = [tf.constant(a) for a in arrs]
    ours, n = ggtf.clip_by_global_norm(ts, c)
    theirs, tn = tf.clip_by_global_norm(ts, c)
    assert float(n) == pytest.approx(float(tn), rel=1e-6, abs=1e-30)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=2e-6, atol=1e-30)
    # the clipped list has norm min(n, c) (float64 reference)
    after = ref_norm([a.numpy() for a in ours])
    assert after == pytest.approx(min(ref_norm(arrs), c), rel=1e-5, abs=1e-12)


@MODES
def test_clip_by_global_norm_modes_and_nonfinite_policies(mode):
    fn = modes()[mode]

    @fn
    def run(a, b):
        k = ggtf.clip_by_global_norm([a, b], 1.0)
        z = ggtf.clip_by_global_norm([a, b], 1.0, on_nonfinite="zero")
        p = ggtf.clip_by_global_norm([a, b], 1.0, on_nonfinite="propagate")
        return k, z, p

    a = tf.constant([1.0, math.inf])
    b = tf.constant([3.0, 4.0])
    (k, kn), (z, zn), (p, _pn) = run(a, b)
    assert math.isinf(float(kn)) and math.isinf(float(zn))
    np.testing.assert_array_equal(k[0].numpy(), a.numpy())  # "keep": returned untouched
    np.testing.assert_array_equal(k[1].numpy(), b.numpy())
    # "zero": inf -> 0, then [1, 0, 3, 4] clipped by its own norm sqrt(26)
    got = np.concatenate([z[0].numpy(), z[1].numpy()])
    np.testing.assert_allclose(got, np.array([1, 0, 3, 4]) / math.sqrt(26), rtol=1e-6)
    assert all(np.isnan(x.numpy()).all() for x in p)  # "propagate": TF's all-NaN, on request
    # finite input: all three policies agree with TF
    (k, kn), (z, _), (p, _) = run(tf.constant([0.5, 2.0]), b)
    theirs, tn = tf.clip_by_global_norm([tf.constant([0.5, 2.0]), b], 1.0)
    for out in (k, z, p):
        for x, y in zip(out, theirs):
            np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=2e-6)


def test_clip_by_global_norm_float16_and_none_and_indexed_slices():
    h = tf.constant([300.0] * 4, tf.float16)
    out, n = ggtf.clip_by_global_norm([h, None], 60.0)
    assert float(n) == 600.0 and out[1] is None
    np.testing.assert_array_equal(out[0].numpy(), np.full(4, 30.0, np.float16))
    tf_out, tf_n = tf.clip_by_global_norm([h], 60.0)
    assert math.isinf(float(tf_n)) and np.isnan(tf_out[0].numpy()).all()  # TF: inf, all NaN
    s = tf.IndexedSlices(tf.constant([[3.0, 4.0]]), tf.constant([1]), tf.constant([3, 2]))
    (o,), n = ggtf.clip_by_global_norm([s], 1.0)
    (to,), tn = tf.clip_by_global_norm([s], 1.0)
    assert isinstance(o, tf.IndexedSlices) and float(n) == float(tn) == 5.0
    np.testing.assert_allclose(o.values.numpy(), to.values.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(o.indices.numpy(), [1])


def test_use_norm_and_bad_arguments():
    ts = [tf.constant([3.0, 4.0])]
    out, n = ggtf.clip_by_global_norm(ts, 1.0, use_norm=10.0)
    np.testing.assert_allclose(out[0].numpy(), [0.3, 0.4], rtol=1e-6)
    with pytest.raises(ValueError, match="clip_norm"):
        ggtf.clip_by_global_norm(ts, -1.0)
    with pytest.raises(TypeError, match="clip_norm"):
        ggtf.clip_by_global_norm(ts, "1")
    with pytest.raises(ValueError, match="on_nonfinite"):
        ggtf.clip_by_global_norm(ts, 1.0, on_nonfinite="skip")
    with pytest.raises(TypeError, match="list"):
        ggtf.clip_by_global_norm(ts[0], 1.0)
    with pytest.raises(TypeError, match="floating"):
        ggtf.global_norm([tf.constant([1, 2])])


# -- clip_by_norm --------------------------------------------------------------------------------
@FAST
@given(arrays, thresholds)
def test_clip_by_norm_matches_tf(a, c):
    ours = ggtf.clip_by_norm(tf.constant(a), c)
    theirs = tf.clip_by_norm(tf.constant(a), c)
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=2e-6, atol=1e-30)
    if ref_norm([a]) <= c:
        np.testing.assert_array_equal(ours.numpy(), a)  # unclipped: exactly as it was


@FAST
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=4),
                  elements=floats), thresholds)
def test_clip_by_norm_axes_matches_tf(a, c):
    for axes in ([0], [1], [0, 1]):
        np.testing.assert_allclose(ggtf.clip_by_norm(tf.constant(a), c, axes=axes).numpy(),
                                   tf.clip_by_norm(tf.constant(a), c, axes=axes).numpy(),
                                   rtol=2e-6, atol=1e-30)


@MODES
def test_clip_by_norm_modes_float16_nonfinite_list(mode):
    fn = modes()[mode]

    @fn
    def run(h, bad, good):
        return (ggtf.clip_by_norm(h, 60.0), ggtf.clip_by_norm([bad, good, None], 1.0),
                ggtf.clip_by_norm(bad, 1.0, on_nonfinite="zero"),
                ggtf.clip_by_norm(bad, 1.0, on_nonfinite="propagate"))

    h = tf.constant([300.0] * 4, tf.float16)
    bad, good = tf.constant([3.0, math.inf]), tf.constant([3.0, 4.0])
    h_out, (b_out, g_out, none), z, p = run(h, bad, good)
    np.testing.assert_array_equal(h_out.numpy(), np.full(4, 30.0, np.float16))
    # TF squares in float16: the norm overflows to inf and the tensor is zeroed
    np.testing.assert_array_equal(tf.clip_by_norm(h, 60.0).numpy(), np.zeros(4, np.float16))
    np.testing.assert_array_equal(b_out.numpy(), bad.numpy())   # "keep"
    np.testing.assert_allclose(g_out.numpy(), [0.6, 0.8], rtol=1e-6)  # each to its own norm
    assert none is None
    np.testing.assert_allclose(z.numpy(), [1.0, 0.0], rtol=1e-6)
    assert np.isnan(p.numpy()).all()


# -- clip_by_agc ---------------------------------------------------------------------------------
def _torch_layout(a: np.ndarray) -> np.ndarray:
    """A TF kernel (..., in, out) with its units (the last axis) first, as torch's rows."""
    return np.moveaxis(a, -1, 0) if a.ndim > 1 else a


agc_shapes = st.sampled_from([(), (3,), (4, 3), (2, 2, 3, 5)])


@FAST
@given(st.lists(agc_shapes, min_size=1, max_size=3), st.integers(0, 2 ** 31 - 1),
       st.sampled_from([0.01, 0.1, 1.0]), st.floats(-3, 3))
def test_clip_by_agc_matches_float64_nfnets(shapes_, seed, clipping, log_scale):
    """Units are slices of the last axis (Dense columns, Conv2D output filters): the float64
    NFNets reference on the torch layout (rows) gives the same gradients."""
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=s).astype(np.float32) for s in shapes_]
    gs = [(rng.normal(size=s) * 10.0 ** log_scale).astype(np.float32) for s in shapes_]
    ours = ggtf.clip_by_agc([tf.constant(g) for g in gs], [tf.constant(w) for w in ws], clipping)
    want = ref.agc([_torch_layout(w) for w in ws], [_torch_layout(g) for g in gs], clipping, 1e-3)
    for o, r in zip(ours, want):
        np.testing.assert_allclose(_torch_layout(o.numpy()), r, rtol=2e-6, atol=1e-30)


@MODES
def test_clip_by_agc_modes_torch_parity_and_nonfinite(mode):
    """The same numbers as ``gg.clip_grad_agc_`` on the transposed torch weight, eagerly, in
    tf.function and under XLA; the non-finite policies; float16 and None entries."""
    torch = pytest.importorskip("torch")
    import gradguard as gg

    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    gw, gb = (rng.normal(size=(4, 3)) * 5).astype(np.float32), rng.normal(size=3).astype(np.float32)
    fn = modes()[mode]

    @fn
    def run(gw, gb, w, b, bad):
        return (ggtf.clip_by_agc([gw, None, gb], [w, w, b], 0.05),
                ggtf.clip_by_agc([bad, gb], [w, b], 0.05),
                ggtf.clip_by_agc([bad, gb], [w, b], 0.05, on_nonfinite="zero"),
                ggtf.clip_by_agc([bad, gb], [w, b], 0.05, on_nonfinite="propagate"))

    bad = gw.copy()
    bad[0, 0] = np.nan
    (cw, none, cb), keep, zero, prop = run(*map(tf.constant, (gw, gb, w, b, bad)))
    pw, pb = torch.nn.Parameter(torch.tensor(w.T.copy())), torch.nn.Parameter(torch.tensor(b))
    pw.grad, pb.grad = torch.tensor(gw.T.copy()), torch.tensor(gb)
    gg.clip_grad_agc_([pw, pb], clipping=0.05)
    np.testing.assert_allclose(cw.numpy(), pw.grad.numpy().T, rtol=2e-6)
    np.testing.assert_allclose(cb.numpy(), pb.grad.numpy(), rtol=2e-6)
    assert none is None and not np.allclose(cw.numpy(), gw)  # it did clip
    np.testing.assert_array_equal(keep[0].numpy(), bad)  # "keep": a NaN step comes back unscaled
    np.testing.assert_array_equal(keep[1].numpy(), gb)
    cleaned = np.where(np.isnan(bad), 0.0, bad).astype(np.float32)
    want = ref.agc([w.T, b], [cleaned.T, gb], 0.05, 1e-3)
    np.testing.assert_allclose(zero[0].numpy(), want[0].T, rtol=2e-6)
    np.testing.assert_allclose(zero[1].numpy(), want[1], rtol=2e-6)
    # "propagate": the finite units are clipped, the NaN unit (column 0) is left as it is
    np.testing.assert_array_equal(prop[0].numpy()[:, 0], bad[:, 0])
    np.testing.assert_allclose(prop[0].numpy()[:, 1:], want[0].T[:, 1:], rtol=2e-6)


def test_clip_by_agc_float16_overflow_and_errors():
    w = tf.constant(np.full((2, 2), 1.0, np.float16))
    g = tf.constant(np.full((2, 2), 3e4, np.float16))   # 9e8: its squares overflow float16
    out = ggtf.clip_by_agc([g], [w], 0.1)[0]
    assert out.dtype == tf.float16
    # each column: ||g|| = 4.24e4, limit 0.1 * sqrt(2): every element 0.1 * sqrt(2) / sqrt(2) = 0.1
    np.testing.assert_allclose(out.numpy().astype(np.float64), 0.1, rtol=1e-3)
    with pytest.raises(ValueError, match="2 gradients for 1 params"):
        ggtf.clip_by_agc([g, g], [w])
    with pytest.raises(ValueError, match="clipping"):
        ggtf.clip_by_agc([g], [w], clipping=0.0)
    with pytest.raises(TypeError, match="list"):
        ggtf.clip_by_agc(g, w)
    with pytest.raises(ValueError, match="on_nonfinite"):
        ggtf.clip_by_agc([g], [w], on_nonfinite="raise")


# -- clip_by_value -------------------------------------------------------------------------------
@FAST
@given(lists, st.floats(-10, 0, width=32), st.floats(0, 10, width=32))
def test_clip_by_value_matches_tf(arrs, lo, hi):
    ts = [tf.constant(a) for a in arrs]
    for ours, a in zip(ggtf.clip_by_value(ts, lo, hi), ts):
        np.testing.assert_array_equal(ours.numpy(), tf.clip_by_value(a, lo, hi).numpy())
    for ours, a in zip(ggtf.clip_by_value(ts, clip_value=hi), ts):
        np.testing.assert_array_equal(ours.numpy(), tf.clip_by_value(a, -hi, hi).numpy())


@MODES
def test_clip_by_value_seed_thresholds_one_sided_and_nan(mode):
    fn = modes()[mode]

    @fn
    def run(x):
        return (ggtf.clip_by_value([x, None], clip_value_min=-1.0, clip_value_max=1.0),
                ggtf.clip_by_value(x, clip_value_max=0.5), ggtf.clip_by_value(x, clip_value_min=0.0))

    x = tf.constant([-3.0, 0.25, 2.0, math.nan, math.inf], tf.float32)
    (both, none), hi, lo = run(x)
    np.testing.assert_array_equal(both.numpy(), [-1.0, 0.25, 1.0, math.nan, 1.0])
    assert none is None
    np.testing.assert_array_equal(hi.numpy(), [-3.0, 0.25, 0.5, math.nan, 0.5])
    np.testing.assert_array_equal(lo.numpy(), [0.0, 0.25, 2.0, math.nan, math.inf])
    with pytest.raises(ValueError, match="clip_value_min"):
        ggtf.clip_by_value(x, 2.0, 1.0)
    with pytest.raises(ValueError, match="clip_value"):
        ggtf.clip_by_value(x)
    with pytest.raises(ValueError, match="not both"):
        ggtf.clip_by_value(x, -1.0, clip_value=1.0)


def test_seed_gradient_tape_step_with_ggtf():
    """The seed's run_optimization with tf.clip_by_norm replaced: the same update as TF's."""
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(4, 3)).astype(np.float32)
    x = tf.constant(rng.normal(size=(8, 4)).astype(np.float32))
    y = tf.constant(rng.normal(size=(8, 3)).astype(np.float32))
    results = []
    for clip in (lambda gs: [tf.clip_by_norm(g, 2.0) for g in gs],
                 lambda gs: [ggtf.clip_by_norm(g, 2.0) for g in gs]):
        w = tf.Variable(w0)

        @tf.function
        def step(clip=clip, w=w):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((x @ w - y) ** 2) * 100.0
            grads = clip(tape.gradient(loss, [w]))
            w.assign_sub(0.1 * grads[0])

        step()
        results.append(w.numpy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)
