"""Spike skip: refuse the update when the norm (or the loss) jumps far above its recent past.

The skip-step practice of large-model training (OLMo-core's ``SkipStepOptimizer``, PaLM's
batch skipping, Megatron-LM's ``grad_norm_skip_threshold``), as a z-score test over a window:

    skip_t = armed and (g_t > mean(G) + threshold * std(G)  or  L_t > mean(L) + threshold * std(L))
             or L_t is not finite

G and L are the last ``window`` *accepted* norms and losses: a skipped or non-finite value
never enters them, so one NaN cannot poison the statistics and suppress the steps after it
(the OLMo-core bug). std is the sample standard deviation (n - 1), floored at ``1e-3 |mean|``
so that a constant history does not make every change a spike. The rule is armed once
``min_history`` values are in the window. The loss part applies only when a loss is given
and ``watch_loss``. Norms and losses are float32; the windows are rings of fixed size.

``update(cfg, state, Observation(total, loss), xp) -> (skip, proposed)``; the proposal holds
the finite norm (and loss) appended; the caller commits it only for an accepted step.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from . import _core, _ring


class Config(NamedTuple):
    threshold: float = 6.0
    window: int = 128
    min_history: int = 64
    watch_loss: bool = True


class State(NamedTuple):
    norm_values: Any   # f32 [window], NaN in unused slots
    norm_count: Any    # i64, norms written (not capped)
    loss_values: Any   # f32 [window]
    loss_count: Any    # i64


class Observation(NamedTuple):
    total: Any          # 0-d f32 global norm
    loss: Any = None    # 0-d f32 loss, or None (then only the norm is watched)


def config(threshold: Any = 6.0, window: Any = 128, *, min_history: Any = None,
           watch_loss: Any = True) -> Config:
    """Checked configuration; ``min_history`` defaults to ``max(2, window // 2)``."""
    k = _core.nonneg(threshold, "threshold")
    w = _core.int_at_least(window, "window", 2)
    mh = max(2, w // 2) if min_history is None else _core.int_at_least(min_history,
                                                                        "min_history", 2)
    if mh > w:
        raise ValueError(f"min_history must not exceed window ({w}), got {mh}")
    return Config(k, w, mh, bool(watch_loss))


def init(cfg: Config, xp: Any, like: Any = None) -> State:
    return State(xp.full((cfg.window,), math.nan, "f32", like), xp.full((), 0, "i64", like),
                 xp.full((cfg.window,), math.nan, "f32", like), xp.full((), 0, "i64", like))


def limit(cfg: Config, values: Any, xp: Any) -> tuple[Any, Any]:
    """``(armed, mean + threshold * std)`` of one window."""
    valid = xp.isfinite(values)
    n = xp.sum(valid)
    vals = xp.where(valid, values, 0.0)
    nf = xp.clamp(xp.astype(n, "f32"), lo=1.0)
    mean = xp.sum(vals) / nf
    dev2 = xp.where(valid, (vals - mean) ** 2, 0.0)
    std = xp.sqrt(xp.sum(dev2) / xp.clamp(nf - 1.0, lo=1.0))
    std = xp.maximum(std, 1e-3 * xp.abs(mean))
    return n >= cfg.min_history, mean + cfg.threshold * std


def limits(cfg: Config, state: State, xp: Any) -> tuple[Any, Any]:
    """(norm limit, loss limit) for the next step; inf while not armed."""
    out = []
    for values in (state.norm_values, state.loss_values):
        armed, lim = limit(cfg, values, xp)
        out.append(xp.where(armed, lim, math.inf))
    return out[0], out[1]


def _loss(cfg: Config, obs: Observation) -> Any:
    return obs.loss if (cfg.watch_loss and obs.loss is not None) else None


def check(cfg: Config, state: State, obs: Observation, xp: Any) -> Any:
    """0-d bool: True when this step's update should be refused (pure)."""
    armed, lim = limit(cfg, state.norm_values, xp)
    skip = armed & (obs.total > lim)
    loss = _loss(cfg, obs)
    if loss is not None:
        armed_l, lim_l = limit(cfg, state.loss_values, xp)
        skip = skip | (armed_l & (loss > lim_l)) | ~xp.isfinite(loss)
    return skip


def propose(cfg: Config, state: State, obs: Observation, xp: Any, accept: Any = None) -> State:
    """The state with this step's finite norm (and loss) appended. With ``accept`` (0-d bool)
    the result is already committed (equal to ``commit(accept, propose(...), state)``)."""
    yes = xp.full((), True, "bool", obs.total) if accept is None else accept
    nv, nc = _ring.append(state.norm_values, state.norm_count, obs.total, yes, xp)
    loss = _loss(cfg, obs)
    if loss is None:
        return State(nv, nc, state.loss_values, state.loss_count)
    lv, lc = _ring.append(state.loss_values, state.loss_count, loss, yes, xp)
    return State(nv, nc, lv, lc)


def update(cfg: Config, state: State, obs: Observation, xp: Any) -> tuple[Any, State]:
    """``(skip, proposed)``."""
    return check(cfg, state, obs, xp), propose(cfg, state, obs, xp)
