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
