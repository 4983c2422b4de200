"""Adaptive clipping and spike skipping on the shared pure rules (``gradguard.rules``).

``autoclip``, ``zclip`` and ``auto`` are global-norm clippers whose threshold comes from a
rule's state; the step is always::

    n          = float32 norms of the updates (``_tree.tree_norms``)
    thr, prop  = rule.update(cfg, state.rule, obs(n.total), JAX)    # the one implementation
    coef       = rules.norm_clip.coefficient(n.total, thr, JAX, nonfinite=~isfinite(n.total),
                                             strict=True)          # torch's formula, 1e-6
    state.rule = rules.commit(isfinite(n.total), prop, state.rule, JAX)
    updates   *= coef

so a non-finite norm never enters the statistics, and (inside ``skip_nonfinite`` /
``spike_skip``) a refused step leaves the whole state as it was. The thresholds,
coefficients and skip flags are those of ``gg.AutoClip``, ``gg.ZClip``, ``gg.OvershootClip``
and ``gg.SpikeSkip`` for the same norms (``tests/test_optax_rules.py``, ``tests/rule_vectors.py``).
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .. import rules
from ..rules import autoclip as autoclip_rule
from ..rules import norm_clip, overshoot
from ..rules import spike_skip as spike_rule
from ..rules import zclip as zclip_rule
from ..rules.xp_jax import JAX
from . import _args
from ._clip import ClipState, apply_coefficient, empty_clip_state
from ._skip import guarded
from ._tree import F32, tree_norms


def _threshold_clipper(init_rule: Any, step_rule: Any, axis_name: Any
                       ) -> optax.GradientTransformation:
    """A global-norm clipper: ``init_rule(params) -> rule state``; ``step_rule(rule_state,
    norms, updates) -> (threshold, proposed rule state)``."""

    def init_fn(params: Any) -> ClipState:
        return empty_clip_state(params, init_rule(params))

    def update_fn(updates: Any, state: ClipState, params: Any = None) -> tuple[Any, ClipState]:
        del params
        n = tree_norms(updates, axis_name)
        thr, proposed = step_rule(state.rule, n, updates)
        finite = jnp.isfinite(n.total)
        coef = norm_clip.coefficient(n.total, thr, JAX, nonfinite=~finite, strict=True)
        new_rule = rules.commit(finite, proposed, state.rule, JAX)
        new = ClipState(n.total, coef, jnp.asarray(thr, F32), coef < 1.0, ~finite, n.per_leaf,
                        n.max_abs, new_rule)
        return apply_coefficient(updates, coef), new

    return optax.GradientTransformation(init_fn, update_fn)


def _wide(enabled: bool) -> Any:
    """A context in which the rule's ``"f64"`` / ``"i64"`` arrays are 64-bit (``jax.enable_x64``
    for the ops traced inside it only), or a no-op."""
    return jax.enable_x64(True) if enabled else contextlib.nullcontext()


def _like(new: Any, old: Any) -> Any:
    """``new`` with ``old``'s dtypes (a rule run under ``_wide`` hands back int64 counts)."""
    return jax.tree.map(lambda n, o: jnp.asarray(n).astype(jnp.asarray(o).dtype), new, old)


def autoclip(percentile: float = 10.0, window: int | None = None, *, bins: int = 8192,
             lo: float = 1e-12, hi: float = 1e12, float64: bool | None = None,
             axis_name: Any = None) -> optax.GradientTransformation:
    """AutoClip (Seetharaman et al. 2020): clip the global norm to the ``percentile``-th
    percentile of the accepted norms so far, this step's included (``rules.autoclip``: the
    full history in a bounded histogram, exact for the first 1024 norms; or the last
    ``window`` norms exactly). ``state.rule`` holds the history (fixed shapes).

    The rule interpolates the percentile and bins the norms in float64, as on torch. JAX
    without ``jax_enable_x64`` has no float64, so by default (``float64=None``) the rule's
    scalar arithmetic is traced under ``jax.enable_x64`` (the state stays float32 / int32;
    the thresholds then equal torch's to 1e-6). Off on TPU, which has no float64, or with
    ``float64=False``: the percentile is then float32 (about 1e-5 relative from torch's).
    """
    cfg = autoclip_rule.config(percentile, window, bins=bins, lo=lo, hi=hi)
    if float64 is not None and not isinstance(float64, bool):
        raise TypeError(f"float64 must be None, True or False, got {float64!r}")

    def step(st: Any, n: Any, u: Any) -> tuple[jax.Array, Any]:
        wide = float64 if float64 is not None else jax.default_backend() != "tpu"
        with _wide(wide):
            thr, prop = autoclip_rule.update(cfg, st, n.total, JAX)
        return jnp.asarray(thr).astype(F32), _like(prop, st)

    return _threshold_clipper(lambda p: autoclip_rule.init(cfg, JAX), step, axis_name)


def zclip(alpha: float = 0.97, z_threshold: float = 2.5, warmup_steps: int = 25,
          max_norm: float | None = None, *, eps: float = 1e-6, axis_name: Any = None
          ) -> optax.GradientTransformation:
    """ZClip (Kumar et al. 2025): EMA z-score of the global norm with the reciprocal threshold
    ``mu + z_threshold^2 sigma / z`` for ``z > z_threshold`` (``rules.zclip``)."""
    cfg = zclip_rule.config(alpha, z_threshold, warmup_steps, max_norm, eps)
    return _threshold_clipper(lambda p: zclip_rule.init(cfg, JAX),
                              lambda st, n, u: zclip_rule.update(cfg, st, n.total, JAX),
                              axis_name)


class AutoState(NamedTuple):
    """``auto()``'s rule state: the overshoot rule's ``State`` and, with step-size control,
    a strided float32 sample of the last update direction (``direction``: SGD's momentum
    buffer, replicated on the sample, or the last gradient)."""

    overshoot: overshoot.State
    direction: jax.Array


def _stride(tree: Any, sample: int) -> int:
    total = sum(int(x.size) for x in jax.tree.leaves(tree))
    return max(1, -(-total // sample))


def _flat_sample(tree: Any, stride: int) -> jax.Array:
    """Every ``stride``-th element of each leaf (flattened), concatenated, float32: the same
    elements ``gg.OvershootClip`` samples from the same tensors."""
    parts = [jnp.reshape(x, (-1,))[::stride].astype(F32) for x in jax.tree.leaves(tree)]
    return jnp.concatenate(parts) if parts else jnp.zeros((0,), F32)


def auto(*, learning_rate: float | None = None, momentum: float | None = None,
         adaptive: bool = False, use_last_gradient: bool = False, optimizer_scale: bool = False,
         b2: float = 0.999, beta: float = 0.1, init_step: float = 1e-2, floor: float = 0.02,
         spike_factor: float = 3.0, ema: float = 0.95, trust: float = 0.03,
         level_factor: float = 2.0, deadband: float = 0.3, sample: int = 65536,
         axis_name: Any = None) -> optax.GradientTransformation:
    """The threshold-free default (``gg.OvershootClip``, ``rules.overshoot``): clip the global
    norm to ``min(S, spike_factor * exp(level))``.

    optax transformations cannot see the optimizer after them, so say what it is:

    * nothing (default): mode "cap", the geometric spike cap only (what the torch Guard uses
      when it knows no optimizer);
    * ``learning_rate=lr`` alone, for plain ``optax.sgd(lr)``: mode "trust", no step longer
      than ``trust * ||params_0||`` (``S = trust * ||params_0|| / lr``, the norm from
      ``init(params)``), and the spike cap;
    * ``momentum=m`` (and ``learning_rate=lr``) for ``optax.sgd(lr, momentum=m)``: mode
      "momentum", step-size control against SGD's momentum buffer, which this transformation
      replicates on its ``sample`` (``u <- m u + clipped g``; exact for ``sgd`` without
      nesterov or weight decay); ``S_0 = init_step * ||params|| / lr`` from ``init(params)``;
    * ``adaptive=True`` for Adam, AdamW, RMSprop & co.: mode "level", the cap at
      ``level_factor * exp(level_raw)`` (twice the recent geometric-mean raw norm): what the
      torch Guard uses with those optimizers;
    * ``use_last_gradient=True`` (plain SGD, opt-in): mode "sgd", the last gradient as the
      direction;
    * ``optimizer_scale=True`` (Adam & co., ``b2`` their second-moment decay): mode
      "adaptive", the cap at ``spike_factor * sqrt(v)``.

    Cost per step: the norms, one dot product over at most ``sample`` elements in the
    step-control modes, O(1) scalars. ``axis_name`` (sharded leaves under ``shard_map`` /
    ``pmap``) works with the cap and adaptive modes.
    """
    if momentum is not None:
        m = _args.number(momentum, "momentum")
        if not 0.0 < m < 1.0:
            raise ValueError(f"momentum must lie in (0, 1) for step-size control, got {momentum!r}")
        mode = "momentum"
    elif use_last_gradient:
        mode, m = "sgd", 0.0
    elif optimizer_scale:
        mode, m = "adaptive", 0.0
    elif _flag(adaptive, "adaptive"):
        mode, m = "level", 0.0
    elif learning_rate is not None:
        mode, m = "trust", 0.0
    else:
        mode, m = "cap", 0.0
    if learning_rate is not None:
        lr = _args.threshold(learning_rate, "learning_rate", positive=True)
    else:
        lr = None
    cfg = overshoot.config(mode, beta=beta, init_step=init_step, floor=floor,
                           spike_factor=spike_factor, ema=ema, beta2=b2, trust=trust,
                           level_factor=level_factor, deadband=deadband)
    sample = _args.int_at_least(sample, "sample", 1)
    control = mode in overshoot.STEP_CONTROL
    if (control or mode == "trust") and axis_name is not None:
        # the direction sample would be per-device state of a sharded shape, and the trust
        # region's parameter norm is taken at init; the cap, level and adaptive modes
        # (scalar state) work over a named axis
        raise ValueError(f"auto(): step-size control (momentum / use_last_gradient) or the "
                         f"trust region (learning_rate alone) with axis_name={axis_name!r} "
                         f"is not supported; give replicated (pmean-ed) gradients without "
                         f"axis_name, or use the cap, level or adaptive mode")

    def init_rule(params: Any) -> AutoState:
        st = overshoot.init(cfg, JAX)
        n = 0
        if control or mode == "trust":
            pnorm = tree_norms(params).total
            st = st._replace(init_limit=overshoot.initial_limit(cfg, pnorm, lr, JAX),
                             param_norm=pnorm)
        if control:
            n = int(_flat_sample(params, _stride(params, sample)).shape[0])
        return AutoState(st, jnp.zeros((n,), F32))

    def step_rule(st: AutoState, n: Any, updates: Any) -> tuple[jax.Array, AutoState]:
        if not control:
            thr, prop = overshoot.update(cfg, st.overshoot,
                                         overshoot.Observation(n.total, None, lr), JAX)
            return thr, AutoState(prop, st.direction)
        g_s = _flat_sample(updates, _stride(updates, sample))
        u_s = st.direction
        dot, gn, un = jnp.dot(g_s, u_s), jnp.linalg.norm(g_s), jnp.linalg.norm(u_s)
        cos = overshoot.cosine(dot, gn, un, JAX)
        thr, prop = overshoot.update(cfg, st.overshoot, overshoot.Observation(n.total, cos), JAX)
        if mode == "momentum":
            coef = norm_clip.coefficient(n.total, thr, JAX, nonfinite=~jnp.isfinite(n.total),
                                         strict=True)
            new_dir = m * u_s + coef * g_s
        else:
            new_dir = g_s
        # the torch facade keeps the last gradient only for a step the rule itself took
        # (finite, > 0); the momentum buffer moves whenever the optimizer steps (finite)
        ok = jnp.isfinite(n.total)
        if mode != "momentum":
            ok = ok & (n.total > 0)
        return thr, AutoState(prop, jnp.where(ok, new_dir, u_s))

    return _threshold_clipper(init_rule, step_rule, axis_name)


class _Spike:
    """The shared spike rule in the shape ``_skip.guarded`` asks for."""

    def __init__(self, cfg: spike_rule.Config):
        self.cfg = cfg

    def init(self) -> spike_rule.State:
        return spike_rule.init(self.cfg, JAX)

    def decide(self, state: spike_rule.State, norm: jax.Array, value: Any):
        loss = None if value is None else jnp.reshape(jnp.asarray(value, F32), ())
        return spike_rule.update(self.cfg, state, spike_rule.Observation(norm, loss), JAX)

    def commit(self, accept: jax.Array, proposed: spike_rule.State, old: spike_rule.State):
        return rules.commit(accept, proposed, old, JAX)


def spike_skip(inner: Any, threshold: float = 6.0, window: int = 128, *,
               min_history: int | None = None, watch_loss: bool = True, axis_name: Any = None
               ) -> optax.GradientTransformationExtraArgs:
    """Refuse non-finite updates (as ``skip_nonfinite``) **and** spikes: an update whose
    float32 global norm, or whose loss (``update(..., value=loss)``, optax's name for the
    objective), exceeds ``mean + threshold * std`` of the last ``window`` accepted values
    (``rules.spike_skip``; armed after ``min_history`` values, default ``window // 2``). A
    refused value never enters the windows. The decision is made on the incoming updates,
    before ``inner``; refused steps leave ``inner``'s state bit for bit (``_skip``)."""
    cfg = spike_rule.config(threshold, window, min_history=min_history,
                            watch_loss=_flag(watch_loss))
    return guarded(inner, axis_name=axis_name, spike=_Spike(cfg))


def _flag(v: Any, name: str = "watch_loss") -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {type(v).__name__} {v!r}")
    return v


