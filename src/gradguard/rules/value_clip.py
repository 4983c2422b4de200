"""Clipping by value: every gradient element into ``[min_value, max_value]``.

The seed article's classic rule (``tf.clip_by_value``, Keras ``clipvalue``,
``torch.nn.utils.clip_grad_value_``):

    g <- min(max(g, min_value), max_value)            element-wise; NaN stays NaN

``clip_value`` c gives the symmetric bounds ``[-c, c]``; either bound may be left out (None).
No state. ``config`` holds the argument rules every framework shares.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import _core


class Config(NamedTuple):
    """``min_value``, ``max_value``: Python floats or None (no bound on that side)."""

    min_value: float | None
    max_value: float | None


class State(NamedTuple):
    """Value clipping keeps no statistics."""


def config(clip_value: Any = None, *, min_value: Any = None, max_value: Any = None) -> Config:
    """Checked bounds: either ``clip_value`` (>= 0, finite) or at least one of ``min_value``
    and ``max_value`` (finite, ``min_value <= max_value``); errors name the argument."""
    if clip_value is not None:
        if min_value is not None or max_value is not None:
            raise ValueError("give either clip_value or min_value/max_value, not both")
        v = _core.nonneg(clip_value, "clip_value")
        return Config(-v, v)
    if min_value is None and max_value is None:
        raise ValueError("give clip_value, or at least one of min_value and max_value")
    lo = None if min_value is None else _core.finite(min_value, "min_value")
    hi = None if max_value is None else _core.finite(max_value, "max_value")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"min_value ({lo}) must not exceed max_value ({hi})")
    return Config(lo, hi)


def init(cfg: Config, xp: Any, like: Any = None) -> State:
    return State()


def clip(cfg: Config, x: Any, xp: Any) -> Any:
    """``x`` clamped into the bounds (one array; a framework applies it to every gradient)."""
    return xp.clamp(x, lo=cfg.min_value, hi=cfg.max_value)
