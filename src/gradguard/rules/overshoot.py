"""OvershootClip, the threshold-free default: clip the global norm to a threshold that no
user sets, chosen by the kind of optimizer (``docs/adaptive.md`` has the reasoning and the
measurements). All state is O(1) scalars; the mode is picked by the adapter from the
optimizer:

**"momentum": step-size control S** (SGD with momentum, where the clip threshold sets the
step length ``lr * min(||g||, S)``). The observation ``cos`` is ``cos(g_t, u_{t-1})``, the new
gradient against the direction of the last update (SGD's momentum buffer; in the opt-in mode
"sgd" the last gradient); ``-g_t . u_{t-1}`` is the derivative of the loss with respect to
the last step's length (the "hypergradient", Baydin et al. 2018, "Online Learning Rate
Adaptation with Hypergradient Descent", arXiv 1703.04782). So

    cos < -c0 (the step overshot):       S <- S * exp(beta * cos)
    cos >= -c0, the last step clipped:   S <- S * exp(beta * (cos + c0))
    otherwise                            S unchanged
    always                               S >= floor * exp(log_raw)   (after the first step)

S shrinks from itself, not from ``min(S, ||g_{t-1}||)``: an unclipped step that
overshoots lowers S towards the norms geometrically, one band-exceeding cosine at a time, so a
single noisy cosine cannot drop the limit below the typical norm (measured on the digits MLP
with bad batches and momentum SGD: 1.27x the best fixed threshold with the jump to
``||g_{t-1}||``, 1.07x without it; the seed MLP, always clipped, is unchanged).

``c0`` (``deadband``, 0.3) treats a weakly negative cosine as noise, not overshoot: in the
noise-dominated phase of training successive gradients are slightly anti-aligned at any step
length (the short-horizon bias of greedy step-size rules), and without the band S ratchets
down to its floor (measured: 1.39x the best fixed threshold on the digits MLP with momentum
SGD; 1.23x with it).

S starts at ``init_limit = init_step * ||theta_0|| / lr`` (``initial_limit``), a first step
that moves the parameters by ``init_step`` of their norm. The S in force at step t is the one
made from the evidence of step t - 1, so this step's threshold does not depend on ``cos``.

**"trust": a relative trust region** (plain SGD, no momentum). Without momentum the cosine
of successive minibatch gradients is noise around a negative mean (the short-horizon bias of
greedy step-size rules: it says "shorter" at every step size), so S is not learned; instead
no step may move the parameters by more than ``trust`` of their initial norm:

    S_t = trust * ||theta_0|| / lr_t      (lr_t: the learning rate of this step)

so ``lr_t * min(||g||, S_t) <= trust * ||theta_0||`` whatever the lr schedule does. No spike
cap on top (it acts only when the parameter norm is unknown): at a small lr the region is far
above the norms, and a cap at 3x the clipped level clipped the gradient burst with which a
recurrent net finds a long dependency (temporal order T=20 at lr 0.01: 40x the best fixed
threshold on one seed with the cap, 1.15x without; every other plain-SGD task unchanged).

**"level": a cap at the recent raw level** (Adam, AdamW, RMSprop, ...: the update does not
scale with the gradient, what hurts is one batch far above the others, which dominates the
first moment and inflates the second). ``threshold = level_factor * exp(log_raw)``, the
geometric mean of the recent raw norms (EMA ``ema`` of their log) times ``level_factor``:
it follows a rise of the norms as fast as the EMA does, and holds a spike to twice the level.

**Spike cap** (modes "momentum", "sgd", "cap"; "trust" without a parameter norm): ``cap = spike_factor *
exp(log_level)``, ``log_level`` the EMA (``ema``) of the log of accepted, *clipped* norms,
``log_raw`` the same of raw norms. Fed clipped values, the cap grows at most
``spike_factor ** (1 - ema)`` per step and cannot follow an explosion. In mode "adaptive"
(opt-in ``optimizer_scale`` with Adam & co.) the cap is ``spike_factor * sqrt(v)`` instead,
v the bias-corrected EMA (decay ``beta2``) of the squared accepted, clipped norm, updated as
``v <- v + w (x^2 - v)``, ``w = (1 - beta2) / (1 - beta2^n)``. In mode "cap" (no optimizer
known) only the cap acts.

Threshold: ``min(S, cap)`` ("trust": ``S_t``, "level": ``level_factor *
exp(log_raw)``, "adaptive": ``spike_factor * sqrt(v)``); inf before the first accepted step
unless S is known from the parameter norm. A step is fed only when its norm is finite and > 0
(``log`` of it), and only if accepted (``commit``). Units: norms and S in the gradients'
units, ``lr`` in parameter units per gradient unit; state float32, ``count`` int64,
``started`` bool.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from . import _core

MODES = ("momentum", "sgd", "trust", "level", "adaptive", "cap")
STEP_CONTROL = ("momentum", "sgd")


class Config(NamedTuple):
    mode: str = "cap"
    beta: float = 0.1
    init_step: float = 1e-2
    floor: float = 0.02
    spike_factor: float = 3.0
    ema: float = 0.95
    beta2: float = 0.999
    trust: float = 0.03
    level_factor: float = 2.0
    deadband: float = 0.3


class State(NamedTuple):
    step_limit: Any   # f32, S (inf until started)
    log_level: Any    # f32, EMA of log clipped norm
    log_raw: Any      # f32, EMA of log raw norm
    sq_level: Any     # f32, "adaptive": v (0: never updated)
    prev_norm: Any    # f32, ||g_{t-1}||
    count: Any        # i64, accepted steps
    started: Any      # bool, S has been updated once
    init_limit: Any   # f32, S_0 (a constant of the run; inf when unknown)
    param_norm: Any   # f32, ||theta_0|| for mode "trust" (0: unknown)


class Observation(NamedTuple):
    total: Any        # 0-d f32 global norm
    cos: Any = None   # 0-d f32 cos(g_t, u_{t-1}) in [-1, 1] (step-control modes; else None)
    lr: Any = None    # this step's learning rate (mode "trust"; else unused)


def config(mode: str = "cap", *, beta: Any = 0.1, init_step: Any = 1e-2, floor: Any = 0.02,
           spike_factor: Any = 3.0, ema: Any = 0.95, beta2: Any = 0.999, trust: Any = 0.03,
           level_factor: Any = 2.0, deadband: Any = 0.3) -> Config:
    """Checked configuration; errors name the argument."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    k = _core.nonneg(spike_factor, "spike_factor", positive=True)
    if k < 1.0:
        raise ValueError(f"spike_factor must be >= 1, got {spike_factor!r}")
    lf = _core.nonneg(level_factor, "level_factor", positive=True)
    if lf < 1.0:
        raise ValueError(f"level_factor must be >= 1, got {level_factor!r}")
    return Config(mode, _core.nonneg(beta, "beta", positive=True),
                  _core.nonneg(init_step, "init_step", positive=True),
                  _core.nonneg(floor, "floor"), k, _core.open_unit(ema, "ema"),
                  _core.open_unit(beta2, "beta2"), _core.nonneg(trust, "trust", positive=True), lf,
                  _deadband(deadband))


def _deadband(v: Any) -> float:
    d = _core.nonneg(v, "deadband")
    if d >= 1.0:
        raise ValueError(f"deadband must lie in [0, 1), got {v!r}")
    return d


def init(cfg: Config, xp: Any, like: Any = None) -> State:
    inf = math.inf
    return State(xp.full((), inf, "f32", like), xp.full((), 0.0, "f32", like),
                 xp.full((), 0.0, "f32", like), xp.full((), 0.0, "f32", like),
                 xp.full((), 0.0, "f32", like), xp.full((), 0, "i64", like),
                 xp.full((), False, "bool", like), xp.full((), inf, "f32", like),
                 xp.full((), 0.0, "f32", like))


def initial_limit(cfg: Config, param_norm: Any, lr: Any, xp: Any) -> Any:
    """``S_0 = init_step * param_norm / lr`` (0-d f32), inf if that is 0 or not finite or
    ``lr`` is None."""
    if lr is None:
        return xp.full((), math.inf, "f32", param_norm)
    s0 = cfg.init_step * xp.astype(param_norm, "f32") / lr
    return xp.where(xp.isfinite(s0) & (s0 > 0), s0, math.inf)


def trust_limit(cfg: Config, state: State, lr: Any, xp: Any) -> Any:
    """Mode "trust": ``S_t = trust * ||theta_0|| / lr_t`` (0-d f32); inf when the parameter
    norm is unknown (0) or ``lr`` is None or not a positive finite number."""
    pn = state.param_norm
    if lr is None:
        return xp.full((), math.inf, "f32", pn)
    s = cfg.trust * pn / lr
    return xp.where(xp.isfinite(s) & (s > 0), xp.astype(s, "f32"), math.inf)


def cosine(dot: Any, g_norm: Any, u_norm: Any, xp: Any) -> Any:
    """The observation ``cos = g . u / (||g|| ||u||)`` in [-1, 1]; 0 when undefined (a zero
    or non-finite vector: no evidence either way)."""
    c = dot / (g_norm * u_norm)
    return xp.clamp(xp.where(xp.isfinite(c), c, 0.0), lo=-1.0, hi=1.0)


def _v(state: State, xp: Any) -> Any:
    """The adaptive mode's v; 0 means never updated (a state from another mode): then the
    square of the geometric level stands in."""
    return xp.where(state.sq_level > 0, state.sq_level, xp.exp(2 * state.log_level))


def threshold(cfg: Config, state: State, xp: Any, lr: Any = None) -> Any:
    """The threshold in force for the next step (0-d f32); ``lr`` is that step's learning
    rate (used by mode "trust" only)."""
    if cfg.mode == "adaptive":
        return xp.where(state.count > 0, cfg.spike_factor * xp.sqrt(_v(state, xp)), math.inf)
    if cfg.mode == "level":
        return xp.where(state.count > 0, cfg.level_factor * xp.exp(state.log_raw), math.inf)
    cap = xp.where(state.count > 0, cfg.spike_factor * xp.exp(state.log_level), math.inf)
    if cfg.mode == "trust":
        # the trust region alone; the spike cap stands in only where it is off (no parameter
        # norm known: a state saved before the mode existed)
        return xp.where(state.param_norm > 0, trust_limit(cfg, state, lr, xp), cap)
    S = xp.where(state.started, state.step_limit, state.init_limit)
    return xp.minimum(S, cap)


def update(cfg: Config, state: State, obs: Observation, xp: Any,
           accept: Any = None) -> tuple[Any, State]:
    """``(threshold, proposed)``: this step's threshold (from the state alone) and the state
    after it; the proposal is the state itself when the norm is not finite or is 0. With
    ``accept`` (0-d bool) the proposal is already committed (``commit`` folded in)."""
    thr = threshold(cfg, state, xp, obs.lr)
    total = obs.total
    st = state
    step_limit, started = st.step_limit, st.started
    if cfg.mode in STEP_CONTROL:
        cos = obs.cos
        S = xp.where(st.started, st.step_limit, st.init_limit)
        prev_n = st.prev_norm
        c0 = cfg.deadband
        grow = xp.where((st.count > 0) & (prev_n > S), S * xp.exp(cfg.beta * (cos + c0)), S)
        shrink = S * xp.exp(cfg.beta * cos)
        new_S = xp.where(cos < -c0, shrink, grow)
        floor = xp.where(st.count > 0, cfg.floor * xp.exp(st.log_raw), 0.0)
        step_limit = xp.maximum(new_S, floor)
        started = xp.full((), True, "bool", st.started)
    clipped = xp.minimum(total, thr)
    first = st.count == 0
    a = cfg.ema
    log_level = xp.where(first, xp.log(clipped), a * st.log_level + (1 - a) * xp.log(clipped))
    log_raw = xp.where(first, xp.log(total), a * st.log_raw + (1 - a) * xp.log(total))
    sq_level = st.sq_level
    if cfg.mode == "adaptive":
        sq_level = xp.where(st.count > 0, _v(st, xp), sq_level)
        b = xp.full((), cfg.beta2, "f32", sq_level)
        n = xp.astype(st.count + 1, "f32")
        w = (1 - b) / (1 - b ** n)
        sq_level = sq_level + w * (clipped * clipped - sq_level)
    ok = xp.isfinite(total) & (total > 0)
    if accept is not None:
        ok = ok & accept
    proposed = State(step_limit, log_level, log_raw, sq_level, total, st.count + 1, started,
                     st.init_limit, st.param_norm)
    return thr, _core.commit(ok, proposed, st, xp)
