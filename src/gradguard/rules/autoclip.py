"""AutoClip: clip the global norm to the p-th percentile of the norms seen so far.

Seetharaman, Wichern, Pardo, Le Roux 2020, "AutoClip: Adaptive Gradient Clipping for Source
Separation Networks" (arXiv 2007.14469), Algorithm 1: at step t append ``||g_t||`` to the
history H, then clip to

    eta_t = percentile(H + [||g_t||], p)          g <- min(1, eta_t / ||g_t||) g

The current norm takes part in its own percentile (as in the paper's code), so the first step
is never clipped and ``p = 100`` never clips; only accepted (finite, not skipped) norms stay
in the history. Percentiles are numpy's default ("linear") definition.

Two ways to keep H (``Config.window``):

* ``window`` = an int >= 2: the last ``window`` accepted norms, exactly (a ring buffer).
* ``window`` = None (default): the full history. The first ``exact`` (1024) accepted norms
  are kept exactly and, while the whole history is in that buffer, the percentile is exact.
  Every norm is also counted in a histogram of ``bins`` log-spaced bins over ``[lo, hi]``
  that records, per bin, the count and the smallest and largest value it holds; past
  ``exact`` norms the percentile comes from it. Bin b covers ``[lo r^b, lo r^(b+1))``,
  ``r = (hi / lo) ** (1 / bins)`` (``r - 1`` = 0.68 % with the defaults 8192, 1e-12, 1e12).

  Estimate: the order statistic ``x_(k)`` lies in some bin b with c values, j of them
  before it; its estimate is the bin's smallest value for j = 0, its largest for j = c - 1,
  and between them linearly by rank otherwise; ``x_(k+1)`` likewise, and the percentile is
  ``x^_(k) + f (x^_(k+1) - x^_(k))``. **Bound**: each estimate lies between the smallest
  and the largest value of the true order statistic's bin, within a factor r of it, so for
  values inside ``[lo, hi]``

      q / r  <=  estimate  <=  q * r             (relative error below r - 1 = 0.68 %)

  and it is exact whenever the neighbouring order statistics are the smallest or largest
  value of their bins (a bin holding one or two values, the maximum for p = 100, ...).
  Values outside ``[lo, hi]`` are counted in the first or last bin; their estimate lies
  between that bin's actual smallest and largest value. Memory: O(exact + bins).

State is float32 values, int64 counts; non-finite norms never enter it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from . import _core, _ring

#: norms kept exactly before the histogram takes over
EXACT = 1024


class Config(NamedTuple):
    """``percentile`` in (0, 100]; ``window`` None (full history) or an int >= 2; the
    histogram layout ``bins``, ``lo``, ``hi``; ``exact`` norms kept exactly (full history)."""

    percentile: float = 10.0
    window: int | None = None
    bins: int = 8192
    lo: float = 1e-12
    hi: float = 1e12
    exact: int = EXACT


class WindowState(NamedTuple):
    """``window`` mode: the last accepted norms (NaN in unused slots) and how many were
    written (not capped)."""

    values: Any   # f32 [window]
    count: Any    # i64


class HistoryState(NamedTuple):
    """Full-history mode."""

    exact: Any     # f32 [exact], the first accepted norms (NaN in unused slots)
    n_exact: Any   # i64, values in ``exact``
    counts: Any    # i64 [bins]
    bin_min: Any   # f32 [bins], smallest value per bin (+inf when empty)
    bin_max: Any   # f32 [bins], largest value per bin (-inf when empty)
    n: Any         # i64, accepted norms in the history


def config(percentile: Any = 10.0, window: Any = None, *, bins: Any = 8192, lo: Any = 1e-12,
           hi: Any = 1e12, exact: Any = EXACT) -> Config:
    """Checked configuration; errors name the argument."""
    p = _core.number(percentile, "percentile")
    if not 0.0 < p <= 100.0:
        raise ValueError(f"percentile must lie in (0, 100], got {percentile!r}")
    w = None if window is None else _core.int_at_least(window, "window", 2)
    b = _core.int_at_least(bins, "bins", 2)
    lo_f, hi_f = _core.number(lo, "lo"), _core.number(hi, "hi")
    if not 0 < lo_f < hi_f < math.inf:
        raise ValueError(f"lo and hi must satisfy 0 < lo < hi < inf, got lo={lo!r}, hi={hi!r}")
    return Config(p, w, b, lo_f, hi_f, _core.int_at_least(exact, "exact", 0))


def ratio(cfg: Config) -> float:
    """``r``, the ratio of neighbouring bin edges; ``r - 1`` bounds the relative error."""
    return math.exp((math.log(cfg.hi) - math.log(cfg.lo)) / cfg.bins)


def init(cfg: Config, xp: Any, like: Any = None) -> WindowState | HistoryState:
    if cfg.window is not None:
        return WindowState(xp.full((cfg.window,), math.nan, "f32", like),
                           xp.full((), 0, "i64", like))
    return HistoryState(xp.full((max(cfg.exact, 1),), math.nan, "f32", like),
                        xp.full((), 0, "i64", like), xp.full((cfg.bins,), 0, "i64", like),
                        xp.full((cfg.bins,), math.inf, "f32", like),
                        xp.full((cfg.bins,), -math.inf, "f32", like), xp.full((), 0, "i64", like))


def bin_of(cfg: Config, value: Any, xp: Any) -> Any:
    """int64 bin index of ``value`` (clamped into ``[0, bins - 1]``; NaN goes to 0)."""
    log_lo = math.log(cfg.lo)
    step = (math.log(cfg.hi) - log_lo) / cfg.bins
    v = xp.astype(value, "f64")
    idx = xp.floor((xp.log(xp.clamp(v, lo=cfg.lo * 0.5)) - log_lo) / step)
    idx = xp.where(xp.isnan(idx), 0.0, idx)
    return xp.astype(xp.clamp(idx, lo=0.0, hi=float(cfg.bins - 1)), "i64")


def count_value(cfg: Config, counts: Any, bin_min: Any, bin_max: Any, value: Any, ok: Any,
                xp: Any) -> tuple[Any, Any, Any]:
    """The histogram with ``value`` counted where ``ok`` and finite."""
    return _count(cfg, counts, bin_min, bin_max, value, ok & xp.isfinite(value), xp)


def _count(cfg: Config, counts: Any, bin_min: Any, bin_max: Any, value: Any, keep: Any,
           xp: Any) -> tuple[Any, Any, Any]:
    # ``keep`` already implies a finite ``value``
    hit = (xp.arange(cfg.bins, "i64", counts) == bin_of(cfg, value, xp)) & keep
    v = xp.astype(value, "f32")
    return (counts + xp.astype(hit, "i64"), xp.where(hit, xp.minimum(bin_min, v), bin_min),
            xp.where(hit, xp.maximum(bin_max, v), bin_max))


# -- queries ------------------------------------------------------------------------------
# A query needs two order statistics, of 0-based ranks k and k + 1 (capped at n - 1), and
# interpolates between them. Both ranks travel together as one int64 [2] index, so each
# lookup (the sorted buffer, the histogram's counts, cumulative counts, smallest and largest
# values) is one gather for the pair, and the exact and histogram answers share the ranks and
# the final interpolation: a handful of array operations per step in all.


def _ranks(n: Any, p: float, xp: Any) -> tuple[Any, Any]:
    """``(kk, f)`` for ``n`` values: the int64 [2] ranks ``[k, min(k + 1, n - 1)]`` and the
    float64 fraction ``f`` (numpy's "linear" definition; ``k <= n - 1`` already)."""
    pos = _ring.rank_position(n, p, xp)
    k = xp.floor(pos)
    kk = xp.minimum(xp.astype(k, "i64") + xp.arange(2, "i64", n), xp.clamp(n - 1, lo=0))
    return kk, pos - k


def _interpolate(pair: Any, f: Any, n: Any, xp: Any) -> Any:
    """``x_(k) + f (x_(k+1) - x_(k))`` (float32) from the float64 pair; NaN when ``n`` is 0."""
    lo_v = xp.take(pair, 0)
    est = lo_v + f * (xp.take(pair, 1) - lo_v)
    return xp.astype(xp.where(n > 0, est, math.nan), "f32")


def _sorted_pair(values: Any, extra_q: Any, kk: Any, xp: Any, capped: bool = False) -> Any:
    """The order statistics of ranks ``kk`` (float64 [2]) of ``values`` (finite or NaN) and
    ``extra_q`` (finite or NaN): one sort (NaN last in every backend), one gather. ``capped``:
    ``kk`` is known to lie inside (else it is clamped into) the sorted array."""
    srt = xp.sort(xp.concat([values, extra_q]))
    return xp.astype(xp.take(srt, kk if capped else xp.clamp(kk, hi=values.shape[0])), "f64")


def _hist_pair(cfg: Config, counts: Any, cum: Any, bin_min: Any, bin_max: Any, kk: Any,
               extra: Any, extra_bin: Any, xp: Any) -> Any:
    """Estimates (float64 [2]) of the order statistics of ranks ``kk`` of the histogram plus
    ``extra`` in bin ``extra_bin`` (-1: none); ``cum`` counts it."""
    b = xp.clamp(xp.concat([xp.searchsorted(cum, xp.take(kk, 0), right=True),
                            xp.searchsorted(cum, xp.take(kk, 1), right=True)]), hi=cfg.bins - 1)
    here = b == extra_bin
    c = xp.take(counts, b) + xp.astype(here, "i64")
    j = kk - (xp.take(cum, b) - c)
    lo_v = xp.take(bin_min, b)
    hi_v = xp.take(bin_max, b)
    lo_v = xp.astype(xp.where(here, xp.minimum(lo_v, extra), lo_v), "f64")
    hi_v = xp.astype(xp.where(here, xp.maximum(hi_v, extra), hi_v), "f64")
    frac = xp.astype(j, "f64") / xp.astype(xp.clamp(c - 1, lo=1), "f64")
    return lo_v + xp.clamp(frac, lo=0.0, hi=1.0) * (hi_v - lo_v)


def _with_extra(cfg: Config, counts: Any, extra: Any, xp: Any) -> tuple[Any, Any, Any, Any]:
    """``(ok, e32, extra_bin, cum)``: whether ``extra`` is finite, it as float32, its bin (-1
    when not finite) and the cumulative counts with it."""
    ok = xp.isfinite(extra)
    extra_bin = xp.where(ok, bin_of(cfg, extra, xp), -1)
    hit = xp.arange(cfg.bins, "i64", counts) == extra_bin
    return ok, xp.astype(extra, "f32"), extra_bin, xp.cumsum(counts + xp.astype(hit, "i64"))


def histogram_percentile(cfg: Config, counts: Any, bin_min: Any, bin_max: Any, xp: Any,
                         extra: Any = None) -> Any:
    """The p-th percentile (0-d float32) of a histogram plus ``extra`` (a 0-d value counted
    for this query only, when finite; None: none); NaN when there is no value. See the
    module docstring for the estimate and its bound."""
    if extra is None:
        extra = xp.full((), math.nan, "f32", counts)
    _, e32, extra_bin, cum = _with_extra(cfg, counts, extra, xp)
    n = xp.take(cum, cfg.bins - 1)
    kk, f = _ranks(n, cfg.percentile, xp)
    pair = _hist_pair(cfg, counts, cum, bin_min, bin_max, kk, e32, extra_bin, xp)
    return _interpolate(pair, f, n, xp)


def percentile(cfg: Config, state: WindowState | HistoryState, extra: Any, xp: Any) -> Any:
    """The p-th percentile (0-d float32) of the history plus ``extra`` (a 0-d norm counted
    for this query only, when finite); NaN when there is no value.

    Exact (numpy's "linear" percentile) over the window, or over the full history while the
    exact buffer holds all of it; the histogram's estimate otherwise. Uses the state's
    counters (``count``; ``n``, ``n_exact``) as the number of values they hold."""
    if cfg.window is not None:
        ok = xp.isfinite(extra)
        n = xp.clamp(state.count, hi=cfg.window) + xp.astype(ok, "i64")
        kk, f = _ranks(n, cfg.percentile, xp)
        extra_q = xp.where(ok, xp.astype(extra, "f32"), math.nan)
        # n <= window + 1: the ranks lie inside the sorted window and extra
        return _interpolate(_sorted_pair(state.values, extra_q, kk, xp, capped=True), f, n, xp)
    ok, e32, extra_bin, cum = _with_extra(cfg, state.counts, extra, xp)
    n = state.n + xp.astype(ok, "i64")  # equals the last cumulative count
    kk, f = _ranks(n, cfg.percentile, xp)
    pair = _hist_pair(cfg, state.counts, cum, state.bin_min, state.bin_max, kk, e32, extra_bin,
                      xp)
    if cfg.exact > 0:
        # while the exact buffer holds the whole history its n values are the same n: the
        # same ranks, the sorted buffer's pair instead of the histogram's
        exact = _sorted_pair(state.exact, xp.where(ok, e32, math.nan), kk, xp)
        pair = xp.where(state.n_exact == state.n, exact, pair)
    return _interpolate(pair, f, n, xp)


def threshold(cfg: Config, state: WindowState | HistoryState, total: Any, xp: Any) -> Any:
    """The threshold for a step whose norm is ``total``: its percentile with the history
    (inf when there is no finite value at all). With ``total`` NaN: the history's own."""
    thr = percentile(cfg, state, total, xp)
    return xp.where(xp.isnan(thr), math.inf, thr)


def propose(cfg: Config, state: WindowState | HistoryState, total: Any, xp: Any,
            accept: Any = None) -> WindowState | HistoryState:
    """The state with ``total`` added to the history (unchanged when it is not finite).

    With ``accept`` (0-d bool) the result is already committed: it equals ``commit(accept,
    propose(cfg, state, total, xp), state, xp)``, without a pass over the bins for the commit.
    """
    ok = xp.isfinite(total) if accept is None else accept & xp.isfinite(total)
    if cfg.window is not None:
        values, count = _ring.append(state.values, state.count, total, ok, xp)
        return WindowState(values, count)
    # the first ``exact`` accepted norms (``_ring.fill`` with the finiteness known)
    fill = ok & (state.n_exact < state.exact.shape[0])
    exact = _ring._slot_write(state.exact, state.n_exact, total, fill, xp)
    counts, bmin, bmax = _count(cfg, state.counts, state.bin_min, state.bin_max, total, ok, xp)
    return HistoryState(exact, state.n_exact + xp.astype(fill, "i64"), counts, bmin, bmax,
                        state.n + xp.astype(ok, "i64"))


def update(cfg: Config, state: WindowState | HistoryState, total: Any,
           xp: Any) -> tuple[Any, WindowState | HistoryState]:
    """``(threshold, proposed)``: this step's threshold, and ``propose``'s state."""
    return threshold(cfg, state, total, xp), propose(cfg, state, total, xp)


def bin_edges(cfg: Config, xp: Any, like: Any = None) -> tuple[Any, Any]:
    """(lower, upper) edge of every bin, float32 [bins] (for states saved without the
    per-bin smallest and largest values: the edges stand in for them)."""
    b = xp.astype(xp.arange(cfg.bins, "i64", like), "f64")
    step = (math.log(cfg.hi) - math.log(cfg.lo)) / cfg.bins
    lower = xp.exp(math.log(cfg.lo) + b * step)
    upper = xp.exp(math.log(cfg.lo) + (b + 1.0) * step)
    return xp.astype(lower, "f32"), xp.astype(upper, "f32")
