"""From a run's tables to the small, display-ready numbers each report view draws.

Size: one small function per report view, all over the same tables; each is independent and
short.

Everything here is numpy over whole columns, so 1e5 steps x 500 layers take well under a second
or two. The HTML report, the static figures and ``gradguard inspect`` all read these structures.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from .data import RunData
from .downsample import select_indices

#: Points per chart before min/max-per-bucket downsampling starts (two points per bucket).
DEFAULT_BUCKETS = 2000
#: Step columns of the layer x step heatmap.
HEATMAP_COLUMNS = 600
#: Events shown in full; flight-recorder windows embedded.
MAX_EVENTS = 1000
MAX_WINDOWS = 60
#: Reference update-to-weight ratio (Karpathy: log10 ratio about -3 is healthy).
RATIO_REFERENCE = 1e-3

NONFINITE_CODE = 254
MISSING_CODE = 255


def num(x: Any, digits: int = 6) -> float | str | None:
    """A JSON-safe number: finite floats rounded to ``digits`` significant digits, non-finite
    values as the strings ``"inf"``, ``"-inf"`` or ``"NaN"``, None stays None."""
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    return float(f"{f:.{digits}g}")


def floats(a: np.ndarray, digits: int = 6) -> list[float | None]:
    """A numeric array as a JSON list, non-finite values as null (a gap in a chart)."""
    a = np.asarray(a, dtype=np.float64)
    out: list[float | None] = []
    fmt = f"{{:.{digits}g}}"
    for v in a.tolist():
        out.append(float(fmt.format(v)) if math.isfinite(v) else None)
    return out


@dataclass
class Heatmap:
    """A layer x column matrix of log10 values quantised to bytes (254 non-finite, 255 none)."""

    layers: list[str]
    x0: list[int]
    x1: list[int]
    lo: float
    hi: float
    codes: np.ndarray  # uint8, shape (len(layers), len(x0))
    label: str
    log_values: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((0, 0)))

    def to_json(self) -> dict[str, Any]:
        """The form the page's script draws."""
        return {
            "layers": self.layers,
            "x0": self.x0,
            "x1": self.x1,
            "lo": num(self.lo),
            "hi": num(self.hi),
            "rows": int(self.codes.shape[0]),
            "cols": int(self.codes.shape[1]),
            "cells": base64.b64encode(np.ascontiguousarray(self.codes).tobytes()).decode("ascii"),
            "label": self.label,
        }


def quantise_log(
    values: np.ndarray, nonfinite: np.ndarray, missing: np.ndarray
) -> tuple[np.ndarray, float, float, np.ndarray]:
    """log10 of positive values scaled into 0..253; zero maps to 0; returns (codes, lo, hi, logs)."""
    v = np.asarray(values, dtype=np.float64)
    pos = np.isfinite(v) & (v > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(pos, np.log10(np.where(pos, v, 1.0)), np.nan)
    if pos.any():
        lo, hi = float(np.nanmin(logs)), float(np.nanmax(logs))
    else:
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    scaled = np.where(pos, np.rint((logs - lo) / (hi - lo) * 253.0), 0.0)
    codes = np.clip(scaled, 0, 253).astype(np.uint8)
    codes[nonfinite | (~np.isfinite(v) & ~missing)] = NONFINITE_CODE
    codes[missing] = MISSING_CODE
    return codes, lo, hi, logs


class LayerGrid:
    """Long (step, layer) records bucketed once into a layers x columns grid.

    One pass computes the flat cell index; each reduction afterwards is one ``bincount`` or
    ``maximum.at`` over it. Columns hold equal numbers of recorded steps.
    """

    def __init__(self, step: np.ndarray, layer_codes: np.ndarray, n_layers: int, columns: int):
        uniq = np.unique(step)
        self.ncols = max(1, min(columns, len(uniq)))
        self.shape = (n_layers, self.ncols)
        pos = np.searchsorted(uniq, step)
        col = (pos * self.ncols) // max(1, len(uniq))
        self.col = col
        self.flat = layer_codes.astype(np.int64, copy=False) * self.ncols + col
        size = n_layers * self.ncols
        self.records = np.bincount(self.flat, minlength=size).reshape(self.shape)
        cols_of_uniq = (np.arange(len(uniq)) * self.ncols) // max(1, len(uniq))
        starts = np.searchsorted(cols_of_uniq, np.arange(self.ncols), side="left")
        ends = np.searchsorted(cols_of_uniq, np.arange(self.ncols), side="right") - 1
        self.x0 = [int(v) for v in uniq[starts]]
        self.x1 = [int(v) for v in uniq[ends]]

    def _size(self) -> int:
        return self.shape[0] * self.shape[1]

    def max(self, values: np.ndarray) -> np.ndarray:
        """Cell maximum of the non-NaN values (inf counts); NaN where a cell has none."""
        ok = ~np.isnan(values)
        out = np.full(self._size(), -np.inf)
        np.maximum.at(out, self.flat[ok], values[ok])
        out[np.bincount(self.flat[ok], minlength=self._size()) == 0] = np.nan
        return out.reshape(self.shape)

    def sum_count(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cell sum and count of the finite values."""
        ok = np.isfinite(values)
        f = self.flat[ok]
        tot = np.bincount(f, weights=values[ok], minlength=self._size()).reshape(self.shape)
        cnt = np.bincount(f, minlength=self._size()).reshape(self.shape)
        return tot, cnt

    def any(self, mask: np.ndarray) -> np.ndarray:
        """Cells where ``mask`` is true for some record."""
        return np.bincount(self.flat[mask], minlength=self._size()).reshape(self.shape) > 0

    def heatmap(self, names: list[str], mx: np.ndarray, nonfinite: np.ndarray, label: str) -> Heatmap:
        """The quantised heatmap of a cell-maximum matrix."""
        codes, lo, hi, logs = quantise_log(mx, nonfinite, self.records == 0)
        return Heatmap(layers=list(names), x0=self.x0, x1=self.x1, lo=lo, hi=hi, codes=codes, label=label, log_values=logs)


def heatmap_from_long(
    step: np.ndarray,
    layer_codes: np.ndarray,
    values: np.ndarray,
    nonfinite_rows: np.ndarray,
    layer_names: list[str],
    columns: int,
    label: str,
) -> Heatmap | None:
    """Bucket long (step, layer, value) records into at most ``columns`` step columns, keeping each
    cell's maximum (a spike in one step of a bucket stays visible)."""
    if len(step) == 0 or not layer_names:
        return None
    grid = LayerGrid(step, layer_codes, len(layer_names), columns)
    v = np.asarray(values, dtype=np.float64)
    return grid.heatmap(layer_names, grid.max(v), grid.any(np.asarray(nonfinite_rows, bool)), label)


@dataclass
class RunViews:
    """Everything the report shows for one run, already reduced to display size."""

    name: str
    path: str
    summary: dict[str, Any]
    norm: dict[str, Any] | None
    rate: dict[str, Any] | None
    heatmap: Heatmap | None
    flow: dict[str, Any] | None
    ratio: dict[str, Any] | None
    events: list[dict[str, Any]]
    events_total: int
    meta: dict[str, Any]
    notes: list[str]
    #: the experiment the run belongs to (its config's ``experiment``, else the part of its
    #: name before the first ``/``, else ""): the report compares the runs of one experiment
    group: str = ""
    #: index in ``events`` of the first incident (the first event naming layers or holding a
    #: flight-recorder window, else the first event), or None
    incident: int | None = None
    #: full-resolution (step, total_norm, loss) of the primary rank, for the comparison view
    norm_series: tuple[np.ndarray, np.ndarray, np.ndarray] = field(
        repr=False, default=(np.zeros(0), np.zeros(0), np.zeros(0))
    )
    #: the learning rate per step (every param group: ``lr``, or ``lrs`` where stored), or
    #: None when the run recorded none
    lr: dict[str, Any] | None = None


def _primary_rank(steps: pd.DataFrame) -> pd.DataFrame:
    if not len(steps):
        return steps
    r = steps["rank"].to_numpy()
    if (r == r[0]).all():
        return steps
    return steps[r == r.min()]


def _norm_view(s: pd.DataFrame, buckets: int) -> dict[str, Any] | None:
    if not len(s):
        return None
    step = s["step"].to_numpy()
    norm = s["total_norm"].to_numpy(dtype=np.float64)
    loss = s["loss"].to_numpy(dtype=np.float64)
    clipped = s["clipped"].to_numpy(dtype=bool)
    skipped = s["skipped"].to_numpy(dtype=bool)
    nonfinite = s["nonfinite"].to_numpy(dtype=bool) | ~np.isfinite(norm)
    idx = select_indices(
        len(s),
        [norm, loss],
        buckets=buckets,
        marks=[(clipped, norm), (skipped, norm), (nonfinite, np.ones_like(norm)),
               (~np.isfinite(loss), np.ones_like(norm))],
    )
    finite = np.isfinite(norm) & (norm > 0)
    ceiling = float(norm[finite].max()) if finite.any() else 1.0
    n_i = norm[idx]
    ok = np.isfinite(n_i) & (n_i > 0)
    shown_norm = np.where(ok, n_i, np.nan)
    clip_mark = np.where(clipped[idx] & ok, n_i, np.nan)
    skip_mark = np.where(skipped[idx], np.where(ok, n_i, ceiling), np.nan)
    nf_mark = np.where(nonfinite[idx], ceiling, np.nan)
    thr = s["threshold"].to_numpy(dtype=np.float64)[idx]
    after = s["total_norm_after"].to_numpy(dtype=np.float64)[idx]
    return {
        "x": [int(v) for v in step[idx]],
        "norm": floats(shown_norm),
        "after": floats(np.where(after > 0, after, np.nan)),
        "threshold": floats(np.where(thr > 0, thr, np.nan)),
        "loss": floats(loss[idx]),
        "loss_log": spans_decades(loss),
        "loss_nonfinite": floats(np.where(~np.isfinite(loss[idx]), 1.0, np.nan)),
        "clipped": floats(clip_mark),
        "skipped": floats(skip_mark),
        "nonfinite": floats(nf_mark),
        "n": int(len(s)),
        "shown": int(len(idx)),
    }


def _lr_view(s: pd.DataFrame, buckets: int) -> dict[str, Any] | None:
    """The learning rate of every param group per step (min/max per bucket kept), the last
    step's rates and whether a log axis reads better; None when no step recorded one."""
    from ..store.reader import learning_rate_matrix

    if not len(s):
        return None
    m = learning_rate_matrix(s)
    if not np.isfinite(m).any():
        return None
    step = s["step"].to_numpy()
    idx = select_indices(len(s), [m[:, g] for g in range(m.shape[1])], buckets=buckets)
    last = m[-1]
    return {
        "x": [int(v) for v in step[idx]],
        "groups": int(m.shape[1]),
        "labels": ["lr"] if m.shape[1] == 1 else [f"group {g}" for g in range(m.shape[1])],
        "series": [floats(m[idx, g]) for g in range(m.shape[1])],
        "last": [num(v) for v in last],
        "log": spans_decades(m[np.isfinite(m)], 1.0),
        "constant": bool(np.all(_finite_span(m) == 0)),
    }


def _finite_span(m: np.ndarray) -> np.ndarray:
    """Per column, max - min of the finite values (0 for a column with none)."""
    fin = np.isfinite(m)
    hi = np.where(fin, m, -np.inf).max(axis=0)
    lo = np.where(fin, m, np.inf).min(axis=0)
    return np.where(fin.any(axis=0), hi - lo, 0.0)


def _rate_view(s: pd.DataFrame, buckets: int) -> dict[str, Any] | None:
    n = len(s)
    if not n:
        return None
    step = s["step"].to_numpy()
    w = int(min(n, max(100, math.ceil(n / buckets))))
    out: dict[str, Any] = {"window": w, "n": n}
    idx = (
        np.arange(n)
        if n <= 2 * buckets
        else np.unique(np.linspace(0, n - 1, 2 * buckets).round().astype(np.int64))
    )
    out["x"] = [int(v) for v in step[idx]]
    for key, col in (("clip", "clipped"), ("skip", "skipped")):
        cs = np.concatenate([[0], np.cumsum(s[col].to_numpy(dtype=np.int64))])
        hi = idx + 1
        lo = np.maximum(0, hi - w)
        out[key] = floats((cs[hi] - cs[lo]) / (hi - lo), digits=4)
    return out


def _layer_codes(layers: pd.DataFrame, names: list[str]) -> np.ndarray:
    """Index of each row's layer in ``names`` (-1 if absent), without touching the strings row by row."""
    col = layers["layer"]
    if not isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype(str).astype("category")
    cats = [str(c) for c in col.cat.categories]
    where = {n: i for i, n in enumerate(names)}
    remap = np.array([where.get(c, -1) for c in cats] + [-1], dtype=np.int64)
    return remap[np.asarray(col.cat.codes, dtype=np.int64)]


def _layer_views(
    run: RunData, columns: int, names: list[str]
) -> tuple[Heatmap | None, dict[str, Any] | None, dict[str, Any] | None, dict[str, Any]]:
    lay = run.layers
    if not len(lay) or not names:
        return None, None, None, {}
    r = lay["rank"].to_numpy()
    if not (r == r[0]).all():
        lay = lay[r == r.min()]
    codes = _layer_codes(lay, names)
    step = lay["step"].to_numpy()
    gn = lay["grad_norm"].to_numpy(dtype=np.float64)
    nfc = lay["nonfinite_count"].to_numpy()
    ur = lay["update_ratio"].to_numpy(dtype=np.float64)
    if (codes < 0).any():
        keep = codes >= 0
        codes, step, gn, nfc, ur = codes[keep], step[keep], gn[keep], nfc[keep], ur[keep]
    grid = LayerGrid(step, codes, len(names), columns)
    nf_rows = (nfc > 0) | ~np.isfinite(gn)
    mx_cell = grid.max(gn)
    nf_cell = grid.any(nf_rows)
    hm = grid.heatmap(names, mx_cell, nf_cell, "gradient norm")
    tot, cnt = grid.sum_count(gn)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = tot.sum(axis=1) / cnt.sum(axis=1)
    finite_mx = np.where(np.isfinite(mx_cell), mx_cell, -np.inf)
    mx = finite_mx.max(axis=1)
    mx[~np.isfinite(mx)] = np.nan
    nf_count = np.bincount(codes[nf_rows], minlength=len(names)).astype(np.float64)
    flow = {
        "layers": names,
        "mean": floats(np.where(mean > 0, mean, np.nan)),
        "max": floats(np.where(mx > 0, mx, np.nan)),
        "nonfinite": [int(v) for v in nf_count],
    }
    stats: dict[str, Any] = {"mean": mean, "max": mx, "nonfinite": nf_count}
    ratio = None
    pos = np.isfinite(ur) & (ur > 0)
    if pos.any():
        lr = np.full(len(ur), np.nan)
        lr[pos] = np.log10(ur[pos])
        lsum, lcnt = grid.sum_count(lr)
        import warnings

        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            m = (lsum / lcnt).T  # columns x layers, geometric mean per cell
            qmin = np.nanmin(m, axis=1)
            qmed = np.nanmedian(m, axis=1)
            qmax = np.nanmax(m, axis=1)
            per_layer = lsum.sum(axis=1) / lcnt.sum(axis=1)
        ratio = {
            "x": grid.x1,
            "min": floats(10.0**qmin),
            "median": floats(10.0**qmed),
            "max": floats(10.0**qmax),
            "layers": names,
            "per_layer": floats(10.0**per_layer),
            "reference": RATIO_REFERENCE,
        }
        stats["ratio"] = 10.0**per_layer
    return hm, flow, ratio, stats


def _window_heatmap(df: pd.DataFrame, names: list[str]) -> Heatmap | None:
    if df is None or not len(df):
        return None
    layer_names = list(names)
    seen = set(layer_names)
    for n in pd.unique(df["layer"].astype(str)):
        if n not in seen:
            layer_names.append(n)
            seen.add(n)
    present = set(pd.unique(df["layer"].astype(str)))
    layer_names = [n for n in layer_names if n in present]
    codes = _layer_codes(df.assign(layer=df["layer"].astype(str)), layer_names)
    gn = df["grad_norm"].to_numpy(dtype=np.float64)
    return heatmap_from_long(
        df["step"].to_numpy(), codes, gn, ~np.isfinite(gn), layer_names, 10_000, "gradient norm"
    )


def _event_num(x: Any) -> float | str | None:
    """An event's value or baseline: NaN and null both mean "none" (load_run turns null into NaN)."""
    v = num(x)
    return None if v == "NaN" else v


def _event_view(run: RunData, ev: dict[str, Any], names: list[str], embed: bool) -> dict[str, Any]:
    top = []
    for t in ev.get("top_layers") or []:
        if isinstance(t, dict):
            top.append(
                {
                    "layer": str(t.get("layer", "")),
                    "norm": num(t.get("norm")),
                    "baseline": num(t.get("baseline")),
                    "ratio": num(t.get("ratio")),
                }
            )
    out: dict[str, Any] = {
        "step": ev.get("step") if isinstance(ev.get("step"), int) else num(ev.get("step")),
        "rule": str(ev.get("rule", "")),
        "value": _event_num(ev.get("value")),
        "baseline": _event_num(ev.get("baseline")),
        "action": str(ev.get("action", "")),
        "message": str(ev.get("message") or ""),
        "first_nonfinite_layer": None
        if ev.get("first_nonfinite_layer") is None
        else str(ev.get("first_nonfinite_layer")),
        "top_layers": top,
        "window": None if not ev.get("window") else str(ev.get("window")),
        "window_status": "none",
        "window_heatmap": None,
    }
    if out["window"]:
        if not embed:
            out["window_status"] = "not embedded (only the first windows are)"
        else:
            df = run.window(ev)
            hm = _window_heatmap(df, names) if df is not None else None
            if hm is None:
                out["window_status"] = "missing"
            else:
                out["window_status"] = "embedded"
                out["window_heatmap"] = hm.to_json()
    return out


def _summary(s: pd.DataFrame, run: RunData, names: list[str]) -> dict[str, Any]:
    n = len(s)
    norm = s["total_norm"].to_numpy(dtype=np.float64) if n else np.zeros(0)
    fin = norm[np.isfinite(norm)]
    return {
        "steps": n,
        "first_step": int(s["step"].iloc[0]) if n else None,
        "last_step": int(s["step"].iloc[-1]) if n else None,
        "clipped": int(s["clipped"].sum()) if n else 0,
        "skipped": int(s["skipped"].sum()) if n else 0,
        "nonfinite": int((s["nonfinite"].to_numpy(dtype=bool) | ~np.isfinite(norm)).sum())
        if n
        else 0,
        "clip_rate": float(s["clipped"].mean()) if n else None,
        "max_norm": num(fin.max()) if len(fin) else None,
        "median_norm": num(np.median(fin)) if len(fin) else None,
        "final_loss": num(s["loss"].iloc[-1]) if n else None,
        "events": len(run.events),
        "layers": len(names),
        "ranks": sorted(int(r) for r in pd.unique(run.steps["rank"])) if len(run.steps) else [],
    }


def _meta_view(meta: dict[str, Any]) -> dict[str, Any]:
    import json

    def dump(v: Any) -> str:
        try:
            return json.dumps(v, indent=1, sort_keys=True, default=str)
        except (TypeError, ValueError):
            return str(v)

    return {
        "started": str(meta.get("started") or ""),
        "config": dump(meta.get("config") or {}),
        "versions": dump(meta.get("versions") or {}),
        "notes": [str(n) for n in meta.get("notes") or []],
        "ranks": [str(r) for r in meta.get("ranks") or []],
    }


def build_views(
    run: RunData, *, buckets: int = DEFAULT_BUCKETS, heat_columns: int = HEATMAP_COLUMNS
) -> RunViews:
    """Reduce one run to its views (downsampled series, heatmap bytes, per-layer bars, events)."""
    names = run.layer_names
    s = _primary_rank(run.steps)
    heat, flow, ratio, _stats = _layer_views(run, heat_columns, names)
    events = sorted(
        run.events, key=lambda e: e.get("step") if isinstance(e.get("step"), (int, float)) else -1
    )
    shown = []
    embedded = 0
    for ev in events[:MAX_EVENTS]:
        embed = embedded < MAX_WINDOWS
        view = _event_view(run, ev, names, embed)
        if view["window"] and embed:
            embedded += 1
        shown.append(view)
    step = s["step"].to_numpy() if len(s) else np.zeros(0, dtype=np.int64)
    norm = s["total_norm"].to_numpy(dtype=np.float64) if len(s) else np.zeros(0)
    loss = s["loss"].to_numpy(dtype=np.float64) if len(s) else np.zeros(0)
    incident = next((k for k, e in enumerate(shown) if e["top_layers"] or e["window_heatmap"]
                     or e["first_nonfinite_layer"]), 0 if shown else None)
    notes = list(run.notes)
    if heat is None and incident is not None and (shown[incident]["top_layers"] or shown[incident]["window_heatmap"]):
        notes = [n for n in notes if not n.startswith("no per-layer records")]
        notes.append(
            "no per-layer records in the layer shards (the run ended before its first per-layer "
            "record, or records none): the first incident's top layers and flight-recorder "
            "window show which layers"
        )
    return RunViews(
        name=run.name,
        path=str(run.path),
        summary=_summary(s, run, names),
        norm=_norm_view(s, buckets),
        rate=_rate_view(s, buckets),
        heatmap=heat,
        flow=flow,
        ratio=ratio,
        events=shown,
        events_total=len(events),
        meta=_meta_view(run.meta),
        notes=notes,
        group=run_group(run),
        incident=incident,
        norm_series=(step, norm, loss),
        lr=_lr_view(s, buckets),
    )


def run_group(run: RunData) -> str:
    """The experiment a run belongs to: ``meta.config.experiment`` when it is a string, else
    the part of the run's name before the first ``/`` (``mlp/none`` -> ``mlp``), else ""."""
    cfg = run.meta.get("config") if isinstance(run.meta, dict) else None
    exp = cfg.get("experiment") if isinstance(cfg, dict) else None
    if isinstance(exp, str) and exp.strip():
        return exp.strip()
    name = str(run.name)
    return name.split("/", 1)[0] if "/" in name.strip("/") else ""


def spans_decades(values: np.ndarray, decades: float = 2.0) -> bool:
    """Whether the finite values are all positive and span at least ``decades`` powers of ten
    (then a log axis reads better than a linear one)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return bool(len(v) and (v > 0).all() and np.log10(v.max() / v.min()) >= decades)


def layer_table(run: RunData) -> pd.DataFrame:
    """Per-layer statistics (mean/max grad norm, non-finite count, update ratio), worst first."""
    names = run.layer_names
    _h, _f, _r, stats = _layer_views(run, 1, names)
    if not stats:
        return pd.DataFrame(columns=["layer", "mean_norm", "max_norm", "nonfinite", "update_ratio"])
    df = pd.DataFrame(
        {
            "layer": names,
            "mean_norm": stats["mean"],
            "max_norm": stats["max"],
            "nonfinite": stats["nonfinite"].astype(np.int64),
            "update_ratio": stats.get("ratio", np.full(len(names), np.nan)),
        }
    )
    return df.sort_values(
        ["nonfinite", "max_norm"], ascending=False, na_position="last"
    ).reset_index(drop=True)
