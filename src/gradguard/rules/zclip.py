"""ZClip: clip the global norm where its EMA z-score marks a spike.

Kumar, Owen, Roy Chowdhury, Güra 2025, "ZClip: Adaptive Spike Mitigation for LLM
Pre-Training" (arXiv 2504.02507), and the authors' code (bluorion-com/ZClip, ``zclip.py``,
mode "zscore", clip_option "adaptive_scaling", clip_factor 1).

State: EMA mean ``mu`` and variance ``var`` of the norm, ``sigma = sqrt(var)``, a count of
accepted norms and a warm-up buffer. The first ``warmup_steps`` accepted norms ``g`` go into
the buffer **raw**; on the last one, ``mu`` and ``var`` become the buffer's mean and
population variance. During warm-up the threshold is ``max_norm`` (no clipping when None).
After warm-up, for a norm ``g``:

    z        = (g - mu) / (sigma + eps)
    adaptive = mu + z_threshold**2 * sigma / z      if z > z_threshold   (the reciprocal rule:
             = inf                                   otherwise            bigger spikes are
    thr      = min(adaptive, max_norm)               (max_norm None: adaptive)  clipped harder)

and the gradient is clipped to ``thr`` (``norm_clip.coefficient``). The statistics are fed the
**adaptive** clip value ``x = min(g, adaptive)`` (the norm itself when it is no spike), not
the value capped by ``max_norm``, as the paper's code does: ``mu <- alpha mu + (1 - alpha) x``,
then ``var <- alpha var + (1 - alpha) (x - mu)**2`` with the *updated* mean. So ``max_norm``
only bounds what is applied; it never drags the statistics down to itself (with a cap below
the typical norm, a capped history would have mean ``max_norm`` and std 0 and clip every
later step the paper leaves alone). Example: mu 1.0, sigma 0.1, g 2.0 give z 10 and
adaptive 1.0625.

Differences from the reference code: ``max_norm`` defaults to None (no fixed cap), and a
non-finite or skipped norm never enters the statistics (the reference would average a NaN in).
Units: norms and thresholds in the gradients' units; state float32, count int64.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from . import _core


class Config(NamedTuple):
    alpha: float = 0.97
    z_threshold: float = 2.5
    warmup_steps: int = 25
    max_norm: float | None = None
    eps: float = 1e-6


class State(NamedTuple):
    mean: Any     # f32, EMA mean of the fed norms
    var: Any      # f32, EMA variance
    count: Any    # i64, accepted norms
    buffer: Any   # f32 [warmup_steps], the raw warm-up norms


def config(alpha: Any = 0.97, z_threshold: Any = 2.5, warmup_steps: Any = 25,
           max_norm: Any = None, eps: Any = 1e-6) -> Config:
    """Checked configuration; errors name the argument."""
    return Config(_core.open_unit(alpha, "alpha"), _core.nonneg(z_threshold, "z_threshold"),
                  _core.int_at_least(warmup_steps, "warmup_steps", 1),
                  None if max_norm is None else _core.nonneg(max_norm, "max_norm",
                                                             positive=True),
                  _core.nonneg(eps, "eps"))


def init(cfg: Config, xp: Any, like: Any = None) -> State:
    return State(xp.full((), 0.0, "f32", like), xp.full((), 0.0, "f32", like),
                 xp.full((), 0, "i64", like), xp.full((cfg.warmup_steps,), 0.0, "f32", like))


def _cap(cfg: Config, thr: Any, xp: Any) -> Any:
    return thr if cfg.max_norm is None else xp.clamp(thr, hi=cfg.max_norm)


def adaptive_threshold(cfg: Config, state: State, total: Any, xp: Any) -> Any:
    """The reciprocal-rule clip value for a norm ``total`` before the ``max_norm`` cap (inf
    when it is no spike or during warm-up)."""
    sigma = xp.sqrt(state.var)
    z = (total - state.mean) / (sigma + cfg.eps)
    zt = cfg.z_threshold
    spike = z > zt
    safe_z = xp.where(spike, z, 1.0)
    adaptive = xp.where(spike, state.mean + (zt * zt) * sigma / safe_z, math.inf)
    return xp.where(state.count >= cfg.warmup_steps, adaptive, math.inf)


def threshold(cfg: Config, state: State, total: Any, xp: Any) -> Any:
    """The threshold applied to a step whose norm is ``total``."""
    return _cap(cfg, adaptive_threshold(cfg, state, total, xp), xp)


def onset(cfg: Config, state: State, xp: Any) -> Any:
    """Where clipping starts for the next step: ``mu + z_threshold * sigma`` (capped by
    ``max_norm``); ``max_norm`` or inf during warm-up."""
    on = state.mean + cfg.z_threshold * xp.sqrt(state.var)
    return _cap(cfg, xp.where(state.count >= cfg.warmup_steps, on, math.inf), xp)


def update(cfg: Config, state: State, total: Any, xp: Any,
           accept: Any = None) -> tuple[Any, State]:
    """``(threshold, proposed)``; the proposal is the state itself for a non-finite norm.
    With ``accept`` (0-d bool) the proposal is already committed (``commit(accept, ...)``
    folded into the rule's own choice, one ``where`` per field instead of two)."""
    adaptive = adaptive_threshold(cfg, state, total, xp)
    thr = _cap(cfg, adaptive, xp)
    ok = xp.isfinite(total) if accept is None else accept & xp.isfinite(total)
    x = xp.minimum(total, adaptive)  # the raw norm in warm-up (adaptive is inf there)
    count = state.count
    w = cfg.warmup_steps
    in_warmup = count < w
    slot = xp.clamp(count, hi=w - 1)
    hit = (xp.arange(w, "i64", count) == slot) & in_warmup & ok
    buf = xp.where(hit, xp.astype(x, "f32"), state.buffer)
    buf_mean = xp.sum(buf) / w
    buf_var = xp.sum((buf - buf_mean) ** 2) / w
    a = cfg.alpha
    # mean + (1 - a)(x - mean), not a*mean + (1 - a)*x: the same in exact arithmetic, and in
    # float32 it stays exactly the mean when x equals it (a zero-variance run is not a spike)
    ema_mean = state.mean + (1.0 - a) * (x - state.mean)
    ema_var = a * state.var + (1.0 - a) * (x - ema_mean) ** 2
    finishing = count == w - 1
    new_mean = xp.where(in_warmup, xp.where(finishing, buf_mean, state.mean), ema_mean)
    new_var = xp.where(in_warmup, xp.where(finishing, buf_var, state.var), ema_var)
    proposed = State(new_mean, new_var, count + xp.astype(ok, "i64"), buf)
    return thr, _core.commit(ok, proposed, state, xp)
