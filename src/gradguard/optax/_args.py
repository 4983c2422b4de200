"""Argument checks for the optax adapter (no torch import): errors name the argument."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def threshold(value: Any, name: str, *, positive: bool = False, allow_inf: bool = False) -> Any:
    """A clip threshold: a finite non-negative Python number (checked), or an array (a traced
    hyperparameter, e.g. under ``optax.inject_hyperparams``: used as given)."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)) and not isinstance(value, np.bool_):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN, got {value!r}")
    if math.isinf(v) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {value!r}")
    if v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'}, got {value!r}")
    return v


def number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    return v


def int_at_least(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def transformation(value: Any, name: str) -> Any:
    if not (hasattr(value, "init") and hasattr(value, "update")):
        raise TypeError(f"{name} must be an optax GradientTransformation, got "
                        f"{type(value).__name__} {value!r}")
    return value
