"""Fixed-size buffers of accepted values, shared by AutoClip and SpikeSkip.

A buffer is a float32 array of ``size`` slots, NaN where no value was written, and an int64
count of values written (not capped). ``append`` writes at slot ``count % size`` (a ring) and
``fill`` writes at slot ``count`` only while ``count < size`` (the first ``size`` values).
Both write only finite values where ``ok``; no scatter, no value-dependent shape (a one-hot
``where``), so they run under jit and tf.function.

``percentile(values, extra, p)`` is numpy's default ("linear") percentile of the finite
values plus ``extra`` (when finite): for n values sorted as ``x_(0) <= ... <= x_(n-1)``,
``x_(k) + f (x_(k+1) - x_(k))`` with ``k + f = p / 100 (n - 1)``; NaN when there is none.
"""

from __future__ import annotations

from typing import Any


def _slot_write(values: Any, slot: Any, value: Any, write: Any, xp: Any) -> Any:
    hit = (xp.arange(values.shape[0], "i64", values) == slot) & write
    return xp.where(hit, xp.astype(value, "f32"), values)


def append(values: Any, count: Any, value: Any, ok: Any, xp: Any) -> tuple[Any, Any]:
    """Ring write: ``(values, count)`` after appending ``value`` where ``ok`` and finite."""
    keep = ok & xp.isfinite(value)
    slot = count % values.shape[0]
    return _slot_write(values, slot, value, keep, xp), count + xp.astype(keep, "i64")


def fill(values: Any, count: Any, value: Any, ok: Any, xp: Any) -> tuple[Any, Any]:
    """First-``size`` write: ``value`` goes to slot ``count`` while ``count < size``; ``count``
    counts the values written (so it stops at ``size``)."""
    keep = ok & xp.isfinite(value) & (count < values.shape[0])
    return _slot_write(values, count, value, keep, xp), count + xp.astype(keep, "i64")


def rank_position(n: Any, p: float, xp: Any) -> Any:
    """0-based fractional rank ``p / 100 * (n - 1)`` (float64; 0 when n <= 1)."""
    return xp.clamp(xp.astype(n, "f64") - 1.0, lo=0.0) * (p / 100.0)


def percentile(values: Any, extra: Any, p: float, xp: Any) -> Any:
    """Exact p-th percentile (float32) of the finite ``values`` and ``extra``; NaN if none."""
    vals = xp.astype(xp.concat([values, extra]), "f64")
    ok = xp.isfinite(vals)
    n = xp.sum(ok)
    srt = xp.sort(xp.where(ok, vals, float("inf")))
    pos = rank_position(n, p, xp)
    k = xp.floor(pos)
    f = pos - k
    ki = xp.astype(k, "i64")
    k1 = xp.minimum(ki + 1, xp.clamp(n - 1, lo=0))
    lo_v = xp.take(srt, ki)
    hi_v = xp.take(srt, k1)
    est = lo_v + f * (hi_v - lo_v)
    return xp.astype(xp.where(n > 0, est, float("nan")), "f32")
