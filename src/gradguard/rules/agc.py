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
its finite norm and is clipped; the coefficient is formed from the scales and roots of both
norms (``coefficient``), finite and exact even when ``||G_i||`` or ``||W_i||`` itself lies
beyond the dtype's range, and ``clipped_norm`` gives the norm after clipping the same way.

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


#: max |x| from which the values are first multiplied by 2**-100 (exact): XLA on the CPU
#: divides by a broadcast scalar as a multiply by its reciprocal and flushes subnormals to 0,
#: so ``x / m`` would be 0 for ``m`` above 2**126 (float32 weights of 3e38); 1 / (m 2**-100)
#: is a normal number in every dtype
BIG = 2.0 ** 100
TINY = 2.0 ** -100


def _max_normalised(x: Any, axis: Any, xp: Any) -> UnitNorm:
    m = xp.amax(xp.abs(x), axis=axis, keepdims=True)
    big = m >= BIG
    one = 0.0 * xp.clamp(m, hi=1.0) + 1.0          # 1 in m's dtype (NaN where m is NaN)
    t = xp.where(big, one * TINY, one)
    ms = m * t
    finite = (m > 0) & xp.isfinite(m)
    root = xp.sqrt(xp.sum((x * t / xp.where(finite, ms, 1.0)) ** 2, axis=axis, keepdims=True))
    return UnitNorm(xp.where(finite, m, 1.0), root)


def unit_norm(x: Any, axis: Any, xp: Any) -> UnitNorm:
    """L2 norm over ``axis`` (None: all), kept dims, from max-normalised squares."""
    return _max_normalised(x, axis, xp)


def coefficient(cfg: Config, g: UnitNorm, w: UnitNorm, xp: Any, *, nonfinite: Any = None,
                propagate: bool = False) -> Any:
    """Per-unit coefficients (the dtype of the norms): 1 where a unit is not clipped.

    ``max_norm / ||G_i||`` is formed from the scales and roots,
    ``(clipping * scale_W / scale_G) * (root_W / root_G)`` (the roots lie in ``[1, sqrt(n)]``),
    so neither norm is ever needed as a number: a weight norm beyond the dtype's range (float32
    weights of 3e38) clips as exactly as a gradient norm beyond it."""
    # an overflowing weight norm is inf (still >= eps); a NaN one stays NaN (never clips)
    w_big = ~(w.norm < cfg.eps)
    num_scale = xp.where(w_big, cfg.clipping * w.scale, cfg.clipping * cfg.eps)
    num_root = xp.where(w_big, w.root, 1.0)
    g_pos = g.root > 0
    # max_norm / ||G_i||, finite or +inf; both scales by 2**-100 where g's is huge (BIG)
    c = xp.where(g.scale >= BIG, TINY, 0.0 * xp.clamp(g.scale, hi=1.0) + 1.0)
    rel = ((num_scale * c) / (g.scale * c)) * (num_root / xp.where(g_pos, g.root, 1.0))
    clip = (rel < 1.0) & g_pos & xp.isfinite(g.root)
    if nonfinite is not None and not propagate:
        clip = clip & ~nonfinite
    # the divisor is max(||G_i||, 1e-6): below 1e-6 (no overflow there) max_norm / 1e-6
    small = g.norm < DIV_EPS
    ratio = xp.where(small, (num_scale * num_root) / DIV_EPS, rel)
    return xp.where(clip, ratio, 1.0)


def clipped_norm(g: UnitNorm, coef: Any, xp: Any) -> Any:
    """The L2 norm over all units of ``coef * G`` (0-d, the norms' dtype), max-normalised:
    finite whenever that norm is, also where ``||G_i||`` itself overflows (the clipped
    units' ``(scale * coef) * root`` are finite; their sum of squares may not be)."""
    # (a sum over the one kept-dims element: the 0-d norm)
    return xp.sum(_max_normalised((g.scale * coef) * g.root, None, xp).norm)
