"""Spike-keeping downsampling: per bucket, keep the steps where a series reaches its min and max.

A plain stride or mean hides the one step where the norm exploded; this keeps it. Every series of
a chart is evaluated at the union of the selected indices, so the charts stay aligned and exact at
the points they show (no value is invented, only steps are left out).
"""

from __future__ import annotations

import numpy as np


def bucket_edges(n: int, buckets: int) -> np.ndarray:
    """Edges (length ``min(buckets, n) + 1``) splitting ``range(n)`` into near-equal buckets."""
    b = max(1, min(int(buckets), n))
    return np.linspace(0, n, b + 1).round().astype(np.int64)


def _bucket_ids(edges: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(edges) - 1), np.diff(edges))


def bucket_extreme_indices(
    values: np.ndarray, edges: np.ndarray, *, mode: str, mask: np.ndarray | None = None
) -> np.ndarray:
    """Index of each bucket's minimum (``mode="min"``) or maximum (``"max"``) finite value.

    Only entries where ``mask`` is true count; buckets with no such finite entry give nothing.
    Returns the selected indices in increasing order.
    """
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    if mask is not None:
        ok &= np.asarray(mask, dtype=bool)
    if len(v) == 0 or not ok.any():
        return np.zeros(0, dtype=np.int64)
    fill = np.inf if mode == "min" else -np.inf
    w = np.where(ok, v, fill)
    starts = edges[:-1]
    nonempty = np.diff(edges) > 0
    red = np.minimum.reduceat if mode == "min" else np.maximum.reduceat
    ext = np.full(len(starts), fill)
    ext[nonempty] = red(w, starts[nonempty])
    ids = _bucket_ids(edges)
    hit = ok & (w == ext[ids])
    pos = np.flatnonzero(hit)
    _, first = np.unique(ids[pos], return_index=True)
    return pos[first]


def bucket_first_indices(mask: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Index of the first true entry of ``mask`` in each bucket that has one."""
    pos = np.flatnonzero(np.asarray(mask, dtype=bool))
    if len(pos) == 0:
        return pos.astype(np.int64)
    ids = _bucket_ids(edges)
    _, first = np.unique(ids[pos], return_index=True)
    return pos[first]


def select_indices(
    n: int,
    series: list[np.ndarray],
    *,
    buckets: int,
    marks: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> np.ndarray:
    """Indices to draw for ``n`` points: every index when ``n <= 2 * buckets``, else per bucket
    the argmin and argmax of each series plus, for each ``(mask, values)`` in ``marks``, the
    masked step with the largest value (so a clipped or skipped step stays marked)."""
    if n <= 2 * buckets:
        return np.arange(n, dtype=np.int64)
    edges = bucket_edges(n, buckets)
    parts = [edges[:-1], edges[1:] - 1]  # bucket ends keep the line's extent honest
    for s in series:
        parts.append(bucket_extreme_indices(s, edges, mode="min"))
        parts.append(bucket_extreme_indices(s, edges, mode="max"))
    for mask, vals in marks or []:
        top = bucket_extreme_indices(vals, edges, mode="max", mask=mask)
        parts.append(top)
        parts.append(bucket_first_indices(mask, edges))  # non-finite values have no max
    return np.unique(np.concatenate(parts).astype(np.int64))


def grouped_reduce(
    row: np.ndarray, col: np.ndarray, values: np.ndarray, shape: tuple[int, int], how: str
) -> np.ndarray:
    """Reduce ``values`` into a ``shape`` matrix by (row, col): ``max``, ``min``, ``sum``,
    ``count`` or ``mean``; cells with no finite value are NaN (``count``/``sum``: 0)."""
    flat = row.astype(np.int64) * shape[1] + col.astype(np.int64)
    size = shape[0] * shape[1]
    v = np.asarray(values, dtype=np.float64)
    if how in ("sum", "count", "mean"):
        ok = np.isfinite(v)
        cnt = np.bincount(flat[ok], minlength=size).astype(np.float64)
        if how == "count":
            return cnt.reshape(shape)
        tot = np.bincount(flat[ok], weights=v[ok], minlength=size)
        if how == "sum":
            return tot.reshape(shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (tot / cnt).reshape(shape)
    ok = ~np.isnan(v)
    if how not in ("max", "min"):
        raise ValueError(f"unknown reduction {how!r}")
    fill = -np.inf if how == "max" else np.inf
    out = np.full(size, fill)
    (np.maximum if how == "max" else np.minimum).at(out, flat[ok], v[ok])
    out[np.bincount(flat[ok], minlength=size) == 0] = np.nan
    return out.reshape(shape)
