"""Adaptive gradient clipping, unit-wise (AGC).

Brock, De, Smith, Simonyan 2021, "High-Performance Large-Scale Image Recognition Without
Normalization" (NFNets, arXiv 2102.06171), section 4.1. For each unit i of a weight W (a row:
the output unit of a PyTorch (out, in, ...) weight; the whole tensor for 0-d and 1-d
parameters), with ``lambda = clipping``:

    G_i <- G_i * lambda * max(||W_i||, eps) / ||G_i||     where ||G_i|| > lambda * max(||W_i||, eps)
    G_i unchanged                                         otherwise

(the divisor is ``max(||G_i||, 1e-6)``, as in timm's ``adaptive_clip_grad``).

Norms are taken **max-normalised** (``unit_norm``): ``||x|| = m * ||x / m||``, ``m = max |x|``,
so a unit whose squares overflow (float32 gradients of 1e20, float64 ones of 1e160) still has
its finite norm and is clipped; the coefficient is formed as ``(max_norm / m) / ||x / m||``,
finite and exact even when ``||G_i||`` itself lies beyond the dtype's range.

Non-finite policy: where any gradient element of the step is NaN or Inf (``nonfinite``), the
coefficients are 1 unless ``propagate``; a unit whose own norm is not finite is never scaled.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import _core

#: floor of the gradient norm in the divisor (timm's value)
DIV_EPS = 1e-6


class Config(NamedTuple):
    clipping: float = 0.01
    eps: float = 1e-3


class State(NamedTuple):
    """AGC keeps no statistics."""


class UnitNorm(NamedTuple):
    """A max-normalised norm: ``norm = scale * root``."""

    scale: Any   # max |x| per unit (1 where that is 0 or not finite)
    root: Any    # || x / scale || per unit (inf or NaN when x holds Inf or NaN)

    @property
    def norm(self) -> Any:
        return self.scale * self.root


def config(clipping: Any = 0.01, eps: Any = 1e-3) -> Config:
    return Config(_core.nonneg(clipping, "clipping", positive=True), _core.nonneg(eps, "eps"))


def init(cfg: Config, xp: Any, like: Any = None) -> State:
    return State()


def unit_norm(x: Any, axis: Any, xp: Any) -> UnitNorm:
    """L2 norm over ``axis`` (None: all), kept dims, from max-normalised squares."""
    m = xp.amax(xp.abs(x), axis=axis, keepdims=True)
    scale = xp.where((m > 0) & xp.isfinite(m), m, 1.0)
    root = xp.sqrt(xp.sum((x / scale) ** 2, axis=axis, keepdims=True))
    return UnitNorm(scale, root)


def coefficient(cfg: Config, g: UnitNorm, w: UnitNorm, xp: Any, *, nonfinite: Any = None,
                propagate: bool = False) -> Any:
    """Per-unit coefficients (the dtype of the norms): 1 where a unit is not clipped."""
    max_norm = cfg.clipping * xp.clamp(w.norm, lo=cfg.eps)
    g_norm = g.norm
    clip = (g_norm > max_norm) & xp.isfinite(g.root)
    if nonfinite is not None and not propagate:
        clip = clip & ~nonfinite
    # max_norm / max(g_norm, 1e-6), formed without g_norm when that overflows
    big = g_norm >= DIV_EPS
    ratio = xp.where(big, (max_norm / g.scale) / xp.where(g.root > 0, g.root, 1.0),
                     max_norm / DIV_EPS)
    return xp.where(clip, ratio, 1.0)
