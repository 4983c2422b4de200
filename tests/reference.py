"""Plain float64 numpy references for every clipping algorithm (the tests' ground truth).

Each function takes and returns numpy arrays; nothing here shares code with gradguard.
"""

from __future__ import annotations

import math

import numpy as np

EPS = 1e-6


def to_np(t) -> np.ndarray:
    return t.detach().double().cpu().numpy().copy()


def norm(a: np.ndarray, p: float) -> float:
    a = np.abs(np.asarray(a, dtype=np.float64)).ravel()
    if a.size == 0:
        return 0.0
    if math.isinf(p):
        return float(a.max())
    m = a.max()
    if m == 0 or not np.isfinite(m):
        return float(m)
    return float(m * np.sum((a / m) ** p) ** (1.0 / p))


def total_norm(arrays: list[np.ndarray], p: float) -> float:
    return norm(np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.zeros(0), p)


def clip_norm(arrays: list[np.ndarray], max_norm: float, p: float) -> tuple[list[np.ndarray], float]:
    total = total_norm(arrays, p)
    coef = min(1.0, max_norm / (total + EPS))
    return [a * coef for a in arrays], total


def clip_value(arrays: list[np.ndarray], lo: float | None, hi: float | None) -> list[np.ndarray]:
    return [np.clip(a, -np.inf if lo is None else lo, np.inf if hi is None else hi) for a in arrays]


def clip_per_tensor(arrays: list[np.ndarray], max_norm: float, p: float) -> list[np.ndarray]:
    """tf.clip_by_norm per tensor: t * max_norm / max(||t||, max_norm)."""
    out = []
    for a in arrays:
        n = norm(a, p)
        out.append(a * (max_norm / max(n, max_norm)) if max(n, max_norm) > 0 else a.copy())
    return out


def agc(params: list[np.ndarray], grads: list[np.ndarray], clipping: float, eps: float) -> list[np.ndarray]:
    """NFNets unit-wise clipping; units are rows (dim 0) of weights with ndim > 1."""
    out = []
    for w, g in zip(params, grads):
        g = np.array(g, dtype=np.float64)
        if g.ndim > 1:
            axes = tuple(range(1, g.ndim))
            wn = np.sqrt(np.sum(w.astype(np.float64) ** 2, axis=axes, keepdims=True))
            gn = np.sqrt(np.sum(g ** 2, axis=axes, keepdims=True))
        else:
            wn = np.sqrt(np.sum(w.astype(np.float64) ** 2))
            gn = np.sqrt(np.sum(g ** 2))
        max_n = clipping * np.maximum(wn, eps)
        scale = np.where(gn > max_n, max_n / np.maximum(gn, 1e-6), 1.0)
        out.append(g * scale)
    return out


# -- adaptive clippers (issue 3): float64 re-implementations over sequences of norms --------


def np_percentile_linear(values, p: float) -> float:
    """numpy's default ("linear") percentile; NaN for no values."""
    v = np.asarray(values, dtype=np.float64)
    return float(np.percentile(v, p)) if v.size else math.nan


def autoclip_thresholds(norms, accepted, p: float, window: int | None = None) -> list[float]:
    """AutoClip thresholds per step: percentile of the accepted history plus the current norm
    (when finite). ``window``: keep only the last ``window`` accepted norms."""
    hist: list[float] = []
    out = []
    for g, ok in zip(norms, accepted):
        cur = hist + ([g] if math.isfinite(g) else [])
        t = np_percentile_linear(cur, p)
        out.append(math.inf if math.isnan(t) else t)
        if ok and math.isfinite(g):
            hist.append(g)
            if window is not None and len(hist) > window:
                hist.pop(0)
    return out


def zclip_thresholds(norms, accepted, alpha: float, z_thr: float, warmup: int,
                     max_norm: float | None = None, eps: float = 1e-6) -> list[float]:
    """ZClip per-step thresholds (inf: no clip); the statistics are fed the accepted norms,
    raw in warm-up and clipped to the adaptive value after (as the paper's code)."""
    buf: list[float] = []
    mean = var = 0.0
    out = []
    for g, ok in zip(norms, accepted):
        if len(buf) < warmup:
            adaptive = math.inf
        else:
            sigma = math.sqrt(var)
            z = (g - mean) / (sigma + eps)
            adaptive = mean + z_thr * z_thr * sigma / z if z > z_thr else math.inf
        thr = adaptive if max_norm is None else min(adaptive, max_norm)
        out.append(thr)
        if not (ok and math.isfinite(g)):
            continue
        x = min(g, adaptive)  # raw in warm-up, the adaptive clip value after (not max_norm)
        if len(buf) < warmup:
            buf.append(x)
            if len(buf) == warmup:
                mean = float(np.mean(buf))
                var = float(np.mean((np.array(buf) - mean) ** 2))
        else:
            mean = alpha * mean + (1 - alpha) * x
            var = alpha * var + (1 - alpha) * (x - mean) ** 2
    return out


def spike_decisions(norms, threshold: float, window: int, min_history: int) -> list[bool]:
    """SpikeSkip on the norm alone: skip when g > mean + k * std (sample std, floored at
    1e-3 |mean|) of the last ``window`` accepted finite norms, once ``min_history`` are in."""
    hist: list[float] = []
    out = []
    for g in norms:
        skip = False
        if len(hist) >= min_history:
            h = np.array(hist, dtype=np.float64)
            std = max(float(np.std(h, ddof=1)), 1e-3 * abs(float(h.mean())))
            skip = bool(g > h.mean() + threshold * std)
        out.append(skip)
        if not skip and math.isfinite(g):
            hist.append(g)
            if len(hist) > window:
                hist.pop(0)
    return out


def overshoot_plain_sgd(grads, s0: float, beta: float, floor: float, k: float,
                        ema: float, deadband: float = 0.3) -> list[float]:
    """OvershootClip thresholds per step for plain SGD (update direction = last gradient),
    every step accepted; ``grads`` is a list of 1-d float64 arrays (the whole gradient). A
    cosine in [-deadband, 0) counts as agreement shifted by the band."""
    S = s0
    log_level = log_raw = 0.0
    prev = None
    prev_n = 0.0
    count = 0
    out = []
    for g in grads:
        g = np.asarray(g, dtype=np.float64)
        n = float(np.linalg.norm(g))
        cap = k * math.exp(log_level) if count else math.inf
        thr = min(S, cap)
        out.append(thr)
        if prev is None or np.linalg.norm(prev) == 0 or n == 0:
            c = 0.0
        else:
            c = float(np.clip(g @ prev / (n * np.linalg.norm(prev)), -1, 1))
        if c < -deadband:
            new_s = S * math.exp(beta * c)
        elif count and prev_n > S:
            new_s = S * math.exp(beta * (c + deadband))
        else:
            new_s = S
        if count:
            new_s = max(new_s, floor * math.exp(log_raw))
        clipped = min(n, thr)
        if count == 0:
            log_level, log_raw = math.log(clipped), math.log(n)
        else:
            log_level = ema * log_level + (1 - ema) * math.log(clipped)
            log_raw = ema * log_raw + (1 - ema) * math.log(n)
        S = new_s
        prev, prev_n = g, n
        count += 1
    return out
