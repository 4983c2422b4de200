"""Issue 15's numerics, against references that share no code with gradguard:

* AGC on units whose norms (gradient's, weight's, or the clipped tensor's) overflow the dtype:
  per-unit norms from ``math.hypot`` (float64, overflow-safe), on the torch facade, the
  functional form, ``ggtf.clip_by_agc`` and ``ggo.agc`` (one rule, ``rules.agc``);
* p-norms for any p > 0 against a float64 log-sum-exp reference over the dtype's whole range;
* AutoClip's histogram bound from the first step (``exact=0``: no exact buffer to hide behind)
  against ``np.percentile`` over the same history;
* ZClip with ``max_norm`` against a transcription of the authors' ``ZClip.step`` (float64).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradguard as gg
from gradguard.norms import compute_norms
from gradguard.rules import autoclip
from gradguard.rules.xp import NUMPY

# -- references -----------------------------------------------------------------------------


def _hypot(values) -> float:
    return math.hypot(*[float(v) for v in np.asarray(values, np.float64).reshape(-1)])


def _agc_ref(w: np.ndarray, g: np.ndarray, clipping: float = 0.01, eps: float = 1e-3):
    """NFNets/timm AGC on the torch layout (units = rows), float64, norms by math.hypot.
    Returns (clipped gradient, whether any unit was clipped)."""
    rows_w = w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(1, -1)
    rows_g = g.reshape(g.shape[0], -1) if g.ndim > 1 else g.reshape(1, -1)
    out = rows_g.astype(np.float64).copy()
    any_clipped = False
    for i in range(rows_g.shape[0]):
        max_norm = clipping * max(_hypot(rows_w[i]), eps)
        gn = _hypot(rows_g[i])
        if gn > max_norm:
            out[i] = rows_g[i].astype(np.float64) * (max_norm / max(gn, 1e-6))
            any_clipped = True
    return out.reshape(g.shape), any_clipped


def _log_pnorm(xs, p: float) -> float:
    """log ||x||_p in float64 by log-sum-exp of p log|x| (no max-normalisation involved)."""
    a = np.abs(np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in xs]))
    a = a[a > 0]
    if a.size == 0:
        return -math.inf
    t = p * np.log(a)
    m = t.max()
    return (m + math.log(np.exp(t - m).sum())) / p


# -- 1. AGC where norms overflow --------------------------------------------------------------

AGC_CASES = [
    # (w value, g value, dtype, shape): the issue's three, then ones whose clipped tensor's
    # sum of squares overflows (8 rows of 100: after-norm 2.8e19 in float32, 2.8e159 in float64)
    (1.0, 1e20, torch.float32, (3, 4)),
    (1e20, 1e19, torch.float32, (3, 4)),       # the weight norm overflows: scale by 0.1
    (1.0, 1e160, torch.float64, (3, 4)),
    (1e20, 1e20, torch.float32, (8, 100)),
    (1e20, 1e21, torch.float32, (8, 100)),
    (1e160, 1e161, torch.float64, (8, 100)),
    (3e38, 3e37, torch.float32, (3, 4)),       # ||W_row|| = 6e38 is beyond float32 itself
    (1e36, 1e37, torch.float32, (1000,)),
]


def _check_agc_stats(stats, g0: np.ndarray, want: np.ndarray, clipped: bool):
    before, after = _hypot(g0), _hypot(want)
    assert bool(stats.clipped) == clipped
    assert not bool(stats.nonfinite)
    if before > np.finfo(g0.dtype).max * (1 - 1e-7):
        # the norm before clipping is beyond the dtype (a float32 norm of 3.5e38): inf, as
        # torch's; the rows are still clipped (checked by the caller), the ratio is then 0
        assert float(stats.total_norm) == math.inf and float(stats.clip_coef) == 0.0
        assert math.isclose(float(stats.total_norm_after), after, rel_tol=1e-5)
        return
    assert math.isclose(float(stats.total_norm), before, rel_tol=1e-5)
    assert math.isclose(float(stats.total_norm_after), after, rel_tol=1e-5)
    assert math.isclose(float(stats.clip_coef), after / before, rel_tol=1e-5)


@pytest.mark.parametrize("w_val, g_val, dtype, shape", AGC_CASES)
def test_agc_overflow_rows_and_stats_match_float64(w_val, g_val, dtype, shape):
    w = np.full(shape, w_val)
    g0 = np.full(shape, g_val) * np.linspace(0.5, 1.0, int(np.prod(shape))).reshape(shape)
    want, clipped = _agc_ref(w, g0.astype(np.float32) if dtype == torch.float32 else g0)
    assert clipped
    p = torch.nn.Parameter(torch.tensor(w, dtype=dtype))
    p.grad = torch.tensor(g0, dtype=dtype)
    g_in = p.grad.double().numpy().copy()
    stats = gg.AGC()([p])
    np.testing.assert_allclose(p.grad.double().numpy(), want, rtol=2e-6)
    _check_agc_stats(stats, g_in, want, clipped)
    # the functional form gives the same gradients
    q = torch.nn.Parameter(torch.tensor(w, dtype=dtype))
    q.grad = torch.tensor(g0, dtype=dtype)
    gg.clip_grad_agc_([q])
    assert torch.equal(q.grad, p.grad)


_F32_EXP = st.integers(-30, 38)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), _F32_EXP, st.integers(-28, 40),
       st.sampled_from([torch.float32, torch.float64]), st.integers(0, 2**31 - 1),
       st.sampled_from([0.01, 0.1, 1.0]))
def test_agc_property_over_the_dtype_range(rows, cols, e_g, d_w, dtype, seed, clipping):
    """Random rows over (nearly) the dtype's whole range, the weights up to 28 decades below
    or 40 above the gradients (so that the coefficient stays a normal number of the dtype)."""
    if dtype == torch.float64:
        e_g, d_w = e_g * 8, d_w * 7
    e_w = e_g + d_w
    top = 38 if dtype == torch.float32 else 307
    e_w = min(e_w, top)
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.1, 1.0, (rows, cols)) * 10.0 ** e_w * rng.choice([-1, 1], (rows, cols))
    g = rng.uniform(0.1, 1.0, (rows, cols)) * 10.0 ** min(e_g, top)
    g = g * rng.choice([-1, 1], (rows, cols))
    npd = np.float32 if dtype == torch.float32 else np.float64
    w, g = w.astype(npd), g.astype(npd)
    want, clipped = _agc_ref(w, g, clipping)
    p = torch.nn.Parameter(torch.tensor(w))
    p.grad = torch.tensor(g)
    stats = gg.AGC(clipping)([p])
    np.testing.assert_allclose(p.grad.double().numpy(), want, rtol=5e-6, atol=0)
    _check_agc_stats(stats, g, want, clipped)


@pytest.mark.parametrize("w_val, g_val, dtype, shape", [c for c in AGC_CASES if c[3] != (1000,)])
def test_agc_overflow_tensorflow(w_val, g_val, dtype, shape):
    tf = pytest.importorskip("tensorflow")
    import gradguard.tensorflow as ggtf

    npd = np.float32 if dtype == torch.float32 else np.float64
    w = np.full(shape, w_val).astype(npd)
    g = (np.full(shape, g_val) * np.linspace(0.5, 1.0, int(np.prod(shape))).reshape(shape)).astype(npd)
    want, _ = _agc_ref(w, g)
    # TF kernels are (in, out): units are slices of the last axis, the transposed torch rows
    out = ggtf.clip_by_agc([tf.constant(g.T)], [tf.constant(w.T)])[0]
    np.testing.assert_allclose(out.numpy().T.astype(np.float64), want, rtol=2e-6)


@pytest.mark.parametrize("w_val, g_val, dtype, shape",
                         [c for c in AGC_CASES if c[2] == torch.float32 and len(c[3]) == 2])
def test_agc_overflow_keras_clip_coef(w_val, g_val, dtype, shape):
    """The Keras wrapper's AGC reports the clip coefficient ||g after|| / ||g before|| of the
    float64 reference, also where the clipped tensor's squares overflow float32."""
    pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    import gradguard.keras as ggk

    w = np.full(shape, w_val).astype(np.float32)
    g = (np.full(shape, g_val) * np.linspace(0.5, 1.0, int(np.prod(shape))).reshape(shape)).astype(np.float32)
    want, clipped = _agc_ref(w, g)
    assert clipped
    var = keras.Variable(w.T, name="k")
    opt = ggk.GuardedOptimizer(keras.optimizers.SGD(0.0), clipper=gg.AGC(0.01))
    opt.apply([keras.ops.convert_to_tensor(g.T)], [var])
    coef = float(opt.last_clip_coef.numpy())
    assert math.isfinite(coef)
    assert coef == pytest.approx(_hypot(want) / _hypot(g), rel=1e-5)


@pytest.mark.parametrize("w_val, g_val, dtype, shape",
                         [c for c in AGC_CASES if c[2] == torch.float32 and len(c[3]) == 2])
def test_agc_overflow_optax(w_val, g_val, dtype, shape):
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    import jax.numpy as jnp

    import gradguard.optax as ggo

    w = np.full(shape, w_val).astype(np.float32)
    g = (np.full(shape, g_val) * np.linspace(0.5, 1.0, int(np.prod(shape))).reshape(shape)).astype(np.float32)
    want, _ = _agc_ref(w, g)
    tx = ggo.agc()
    # Flax kernels are (in, out): a unit reduces over axis 0, the transposed torch rows
    params = {"k": jnp.asarray(w.T)}
    out, state = tx.update({"k": jnp.asarray(g.T)}, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(out["k"]).T.astype(np.float64), want, rtol=2e-6)
    assert int(state.agc_clipped_units) == shape[0]


def test_agc_float64_leaves_keep_float64_norms_in_optax():
    """With x64 on, float64 gradients of 1e160 on unit weights (a float32 norm is inf) are
    clipped as the float64 reference clips them."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    import jax.numpy as jnp

    import gradguard.optax as ggo

    shape = (4, 3)
    w = np.ones(shape)
    g = np.full(shape, 1e160) * np.linspace(0.5, 1.0, 12).reshape(shape)
    want, clipped = _agc_ref(w, g)
    assert clipped
    with jax.enable_x64(True):
        tx = ggo.agc()
        params = {"k": jnp.asarray(w.T, jnp.float64)}
        out, state = tx.update({"k": jnp.asarray(g.T, jnp.float64)}, tx.init(params), params)
        got = np.asarray(out["k"]).T
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert int(state.agc_clipped_units) == shape[0]


# -- 2. p-norms for any p > 0 -----------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.floats(0.25, 40.0), st.sampled_from([torch.float32, torch.float64, torch.float16]),
       st.integers(-40, 38), st.lists(st.integers(0, 700), min_size=1, max_size=4),
       st.integers(0, 2**31 - 1))
def test_pnorm_any_p_over_the_dtype_range(p, dtype, e, sizes, seed):
    if dtype == torch.float64:
        e = e * 8
    elif dtype == torch.float16:
        e = max(min(e, 4), -4)
    rng = np.random.default_rng(seed)
    npd = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}[dtype]
    grads = [(rng.uniform(0.0, 1.0, n) * 10.0 ** e).astype(npd) for n in sizes]
    want = _log_pnorm(grads, p)
    ps = []
    for x in grads:
        q = torch.nn.Parameter(torch.zeros(x.shape, dtype=dtype))
        q.grad = torch.tensor(x)
        ps.append(q)
    got = gg.grad_norm(ps, norm_type=p)
    total = float(got.total)
    if want == -math.inf:
        assert total == 0.0
        return
    top = math.log(np.finfo(np.float64 if dtype == torch.float64 else np.float32).max)
    if want > top - 1e-6:  # the true norm is beyond the norm's dtype (p = 1 on 7 x 1e38)
        assert total == math.inf
        return
    assert math.isfinite(total) and total > 0
    acc = np.float64 if dtype == torch.float64 else np.float32

    def tol(v: float) -> float:  # 3e-6, or the dtype's spacing where the norm is subnormal
        return 3e-6 + float(np.spacing(acc(v))) / v

    assert abs(math.log(total) - want) <= tol(total), (total, math.exp(want))
    for x, n in zip(grads, got.per_tensor):
        w = _log_pnorm([x], p)
        if w == -math.inf:
            assert float(n) == 0.0
        else:
            assert abs(math.log(float(n)) - w) <= tol(float(n))


def test_normclip_norm_type_8_clips_every_finite_step():
    """The issue's case: true norm 1.95e10, p = 8: a finite norm and a clip on each step
    (was inf: every step skipped as non-finite)."""
    rng = np.random.default_rng(0)
    clip = gg.NormClip(1.0, norm_type=8)
    for _ in range(5):
        g = rng.uniform(0.5, 1.0, 4000).astype(np.float32)
        g *= np.float32(1.95e10 / math.exp(_log_pnorm([g], 8)))
        q = torch.nn.Parameter(torch.zeros(4000))
        q.grad = torch.tensor(g)
        stats = clip([q])
        assert not bool(stats.nonfinite) and bool(stats.clipped)
        assert math.isclose(float(stats.total_norm), math.exp(_log_pnorm([g], 8)), rel_tol=1e-5)
        assert math.isclose(math.exp(_log_pnorm([q.grad.numpy()], 8)), 1.0, rel_tol=1e-4)


# -- 3. AutoClip: the histogram's bound from the first step -----------------------------------


def _hist_run(norms, p, exact):
    cfg = autoclip.config(p, exact=exact)
    state = autoclip.init(cfg, NUMPY)
    out = []
    for g in norms:
        thr, state = autoclip.update(cfg, state, np.float32(g), NUMPY)
        out.append(float(thr))
    return cfg, out


@settings(max_examples=40, deadline=None)
@given(st.floats(0.5, 100.0) | st.sampled_from([10.0, 90.0, 100.0]), st.floats(0.05, 4.0),
       st.integers(1, 300), st.integers(0, 2**31 - 1), st.sampled_from([0, 1024]))
def test_autoclip_bound_holds_at_every_step(p, sigma, n, seed, exact):
    """``q / r <= estimate <= q * r`` (r = (hi/lo)^(1/bins)) against np.percentile over the
    history plus the current norm, from the first step on, with or without the exact buffer;
    exact where the buffer holds the history; the first step and p = 100 never clip."""
    norms = np.float32(np.random.default_rng(seed).lognormal(0.0, sigma, n))
    cfg, got = _hist_run(norms, p, exact)
    r = autoclip.ratio(cfg)
    for i, thr in enumerate(got):
        q = float(np.percentile(norms[:i + 1].astype(np.float64), p))
        if exact:
            assert thr == pytest.approx(q, rel=1e-6), (i, thr, q)
        else:
            assert q / r * (1 - 1e-6) <= thr <= q * r * (1 + 1e-6), (i, thr, q)
    assert got[0] == float(norms[0])          # first step: threshold = its own norm
    if p == 100.0:                             # the maximum is an actual value: never clips
        assert all(thr >= float(g) for thr, g in zip(got, norms))


def test_autoclip_histogram_issue_cases():
    """The issue's measurements in pure histogram mode: [1, 10] at p = 10 gives the exact 1.9
    (each is its bin's only value), p = 90 at step 4 within r, lognormal p = 10 median error
    over 100 steps well inside r - 1."""
    cfg, got = _hist_run([1.0, 10.0], 10.0, 0)
    assert got[1] == pytest.approx(1.9, rel=1e-6)
    norms = np.float32(np.random.default_rng(1).lognormal(0.0, 1.0, 2000))
    for p in (10.0, 90.0):
        cfg, got = _hist_run(norms, p, 0)
        r = autoclip.ratio(cfg)
        errs = [abs(t / float(np.percentile(norms[:i + 1].astype(np.float64), p)) - 1)
                for i, t in enumerate(got)]
        assert max(errs) < r - 1
        assert np.median(errs[:100]) < (r - 1) / 2


# -- 4. ZClip against the authors' step -------------------------------------------------------


class _AuthorsZClip:
    """bluorion-com/ZClip ``ZClip.step`` (mode "zscore", clip_option "adaptive_scaling",
    clip_factor 1, skip_update_on_spike False) on a given norm, float64; returns the clip
    coefficient it applies."""

    def __init__(self, alpha, z_thresh, max_grad_norm, warmup_steps, eps=1e-6):
        self.alpha, self.z, self.max, self.warm, self.eps = (alpha, z_thresh, max_grad_norm,
                                                             warmup_steps, eps)
        self.buffer: list[float] = []
        self.mean = self.var = None

    def step(self, g: float) -> float:
        if self.mean is None:
            self.buffer.append(g)
            if len(self.buffer) >= self.warm:
                n = len(self.buffer)
                self.mean = sum(self.buffer) / n
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / n
            # warm-up: torch.nn.utils.clip_grad_norm_(max_grad_norm)
            return 1.0 if self.max is None else min(1.0, self.max / (g + 1e-6))
        std = math.sqrt(self.var)
        zs = (g - self.mean) / (std + self.eps)
        clip_val = self.mean + self.z * std / (zs / self.z) if zs > self.z else None
        eff = clip_val if clip_val is not None else g
        if self.max is not None:
            eff = min(eff, self.max)
        coef = eff / (g + 1e-6) if g > eff else 1.0
        x = clip_val if clip_val is not None else g
        self.mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return coef


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 30), st.sampled_from([None, 0.3, 1.0, 2.5]),
       st.sampled_from([0.9, 0.97]), st.floats(1.5, 3.0))
def test_zclip_matches_the_authors_step(seed, warmup, max_norm, alpha, z_thr):
    rng = np.random.default_rng(seed)
    norms = np.exp(rng.normal(0.0, 0.2, 120))
    spikes = rng.choice(120, 8, replace=False)
    norms[spikes] *= rng.uniform(3.0, 200.0, 8)
    norms = [float(np.float32(x)) for x in norms]
    ref = _AuthorsZClip(alpha, z_thr, max_norm, warmup)
    z = gg.ZClip(alpha=alpha, z_threshold=z_thr, warmup_steps=warmup, max_norm=max_norm)
    q = torch.nn.Parameter(torch.zeros(1))
    for i, g in enumerate(norms):
        q.grad = torch.tensor([g])
        n = compute_norms([q.grad])
        stats = z.clip_([q], [q.grad], n, apply=False)
        z.observe(n, ~n.nonfinite)
        want = ref.step(g)
        assert float(stats.clip_coef) == pytest.approx(want, rel=2e-4, abs=1e-6), (i, g)
    assert float(z.mean) == pytest.approx(ref.mean, rel=1e-4)
    assert float(z.std) == pytest.approx(math.sqrt(ref.var), rel=1e-3, abs=1e-6)


def _percentile_run_backend(backend: str, norms, p: float, exact: int):
    """``rules.autoclip`` through the JAX (jit) or TensorFlow (tf.function) namespace."""
    cfg = autoclip.config(p, exact=exact)
    if backend == "jax":
        jax = pytest.importorskip("jax")
        import jax.numpy as jnp

        from gradguard.rules.xp_jax import JAX

        step = jax.jit(lambda st, g: autoclip.update(cfg, st, g, JAX))
        state, conv = autoclip.init(cfg, JAX), jnp.float32
    else:
        tf = pytest.importorskip("tensorflow")
        from gradguard.rules.xp_tf import TF

        step = tf.function(lambda st, g: autoclip.update(cfg, st, g, TF))
        state, conv = autoclip.init(cfg, TF), (lambda v: tf.constant(v, tf.float32))
    out = []
    for g in norms:
        thr, state = step(state, conv(g))
        out.append(float(thr))
    return cfg, out


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
@pytest.mark.parametrize("p", [10.0, 90.0, 100.0])
def test_autoclip_exact_then_histogram_in_jax_and_tf(backend, p):
    """The adapters' backends across the exact buffer's end (64 here): exact before, within
    the bound after, against np.percentile; p = 100 never below the current norm."""
    norms = np.float32(np.random.default_rng(4).lognormal(0.0, 1.0, 160))
    cfg, got = _percentile_run_backend(backend, norms, p, 64)
    r = autoclip.ratio(cfg)
    for i, thr in enumerate(got):
        q = float(np.percentile(norms[:i + 1].astype(np.float64), p))
        if i < 64:
            assert thr == pytest.approx(q, rel=2e-5), (i, thr, q)  # jax without x64: f32 math
        else:
            assert q / r * (1 - 2e-5) <= thr <= q * r * (1 + 2e-5), (i, thr, q)
        if p == 100.0:
            assert thr >= float(norms[i])
