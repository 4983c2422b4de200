"""Events: the rows where a detector fired, explained by the flight recorder.

For every fired ``(step, rule)`` of a flush an event dict (``store.EVENT_FIELDS``) is made:
the rule's ``value`` and ``baseline``, the action taken, and from the flight recorder

* ``top_layers``: the ``top_k`` layers whose gradient norm at the step moved most against
  their own baseline, the geometric mean of their finite positive norms over the
  ``recorder_steps`` steps before it: ``ratio = ||g_l(t)|| / exp(mean log ||g_l||)``;
  largest first (smallest first for ``vanishing``); a NaN/Inf norm ranks first;
* ``first_nonfinite_layer``: the first layer (model order) whose norm is NaN or Inf;
* ``window``: the file name of the flight-recorder dump of the ``recorder_steps`` steps up
  to and including the event's (one per step that has an event).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np


def localise(step: int, ring: np.ndarray, ring_steps: np.ndarray, names: list[str],
             top_k: int, recorder_steps: int, low: bool) -> tuple[list[dict[str, Any]], str | None]:
    """``(top_layers, first_nonfinite_layer)`` of ``step`` from the flight recorder."""
    hit = np.flatnonzero(ring_steps == step)
    if hit.size == 0:
        return [], None
    x = ring[hit[0]].astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(x))
    first_bad = names[int(bad[0])] if bad.size else None
    prior = (ring_steps >= step - recorder_steps) & (ring_steps < step) & (ring_steps >= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        if prior.any():
            h = ring[prior].astype(np.float64)
            ok = np.isfinite(h) & (h > 0)
            logs = np.where(ok, np.log(np.where(ok, h, 1.0)), 0.0)
            cnt = ok.sum(axis=0)
            base = np.where(cnt > 0, np.exp(logs.sum(axis=0) / np.maximum(cnt, 1)), np.nan)
        else:
            base = np.full_like(x, np.nan)
        ratio = x / base
    key = np.where(np.isnan(ratio), -np.inf if not low else np.inf, ratio)
    key = np.where(np.isnan(x) | np.isposinf(x), np.inf if not low else -np.inf, key)
    order = np.argsort(key if low else -key, kind="stable")[:top_k]
    top = [{"layer": names[int(j)], "norm": float(x[j]), "baseline": float(base[j]),
            "ratio": float(ratio[j])} for j in order]
    return top, first_bad


def describe_layer(t: dict[str, Any]) -> str:
    """``enc.0 (1.2e+04x)``; without a usable ratio (no baseline yet, a NaN norm) the norm
    itself: ``enc.0 (norm nan)`` -- never ``nanx``."""
    r = t["ratio"]
    if isinstance(r, float) and math.isfinite(r):
        return f"{t['layer']} ({r:.3g}x)"
    return f"{t['layer']} (norm {t['norm']:.3g})"


def build_events(detectors: list[Any], steps: dict[str, np.ndarray], col: dict[str, np.ndarray],
                 ring: np.ndarray, ring_steps: np.ndarray, names: list[str], *, rank: int,
                 top_k: int, recorder_steps: int,
                 dump_window: Callable[[int], str | None]) -> list[tuple[Any, dict[str, Any]]]:
    """``(detector, event)`` for every fired cell of a flush, sorted by step."""
    events: list[tuple[Any, dict[str, Any]]] = []
    windows: dict[int, str | None] = {}
    for i, d in enumerate(detectors):
        key = f"{d.rule}#{i}"
        for r in np.flatnonzero(col[f"{key}:fired"] > 0.5):
            step = int(steps["step"][r])
            value, base = float(col[f"{key}:value"][r]), float(col[f"{key}:baseline"][r])
            top, first_bad = localise(step, ring, ring_steps, names, top_k, recorder_steps,
                                      d.rule == "vanishing")
            if step not in windows:
                windows[step] = dump_window(step)
            msg = f"step {step}: {d.rule} (value {value:.4g}, baseline {base:.4g})"
            if top:
                msg += "; top layers " + ", ".join(describe_layer(t) for t in top[:3])
            if first_bad is not None:
                msg += f"; first non-finite layer {first_bad}"
            if d.action == "skip":
                msg += ("; update skipped" if bool(steps["skipped"][r])
                        else "; skip requested but no Guard applied it")
            events.append((d, {
                "step": step, "rule": d.rule, "value": value, "baseline": base,
                "action": d.action, "top_layers": top, "first_nonfinite_layer": first_bad,
                "window": windows[step], "message": msg, "time": float(steps["time"][r]),
                "rank": rank,
            }))
    events.sort(key=lambda e: e[1]["step"])
    return events


def window_columns(step: int, ring: np.ndarray, ring_steps: np.ndarray, names: list[str],
                   recorder_steps: int) -> dict[str, np.ndarray]:
    """The flight-recorder dump of ``step``: the ``recorder_steps`` steps up to it, per layer."""
    sel = np.flatnonzero((ring_steps > step - recorder_steps) & (ring_steps <= step)
                         & (ring_steps >= 0))
    sel = sel[np.argsort(ring_steps[sel])]
    L = len(names)
    return {"step": np.repeat(ring_steps[sel], L).astype(np.int64),
            "layer": np.tile(np.asarray(names, dtype=object), len(sel)),
            "grad_norm": ring[sel].astype(np.float64).reshape(-1)}
