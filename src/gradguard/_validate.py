"""Argument checks shared by the public functions: clear errors that name the argument.

Numbers are accepted as Python or numpy scalars (``np.float32(1.0)``, ``np.int64(3)``: any
``numbers.Real`` / ``numbers.Integral``) and returned as Python ``float`` / ``int``; booleans
are never numbers here, and flags are ``True`` / ``False`` (or ``np.bool_``) only, so that
``per_tensor="no"`` is refused instead of read as True.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: The largest finite float32: thresholds live in float32 device tensors.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_real(value: Any) -> bool:
    """A real number that is not a bool (Python's or numpy's)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def flag(value: Any, name: str) -> bool:
    """``value`` as a bool; TypeError for anything but True / False (or ``np.bool_``)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def norm_type(value: float | int | str, name: str = "norm_type") -> float:
    """Return ``value`` as a float p in (0, inf]; raise ValueError otherwise."""
    if isinstance(value, str):
        if value.lower() in ("inf", "infinity"):
            return math.inf
        raise ValueError(f"{name} must be a positive number or inf, got {value!r}")
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    p = float(value)
    if math.isnan(p) or p <= 0:
        raise ValueError(f"{name} must be a positive number or inf, got {value!r}")
    return p


def number(value: Any, name: str) -> float:
    """``value`` as a float; TypeError for non-numbers, ValueError for NaN."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    return v


def open_unit(value: Any, name: str) -> float:
    """``value`` as a float in the open interval (0, 1)."""
    v = number(value, name)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must lie in the open interval (0, 1), got {value!r}")
    return v


def int_at_least(value: Any, name: str, low: int) -> int:
    """``value`` as an int >= ``low``."""
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def nonneg_finite(value: float, name: str, *, allow_inf: bool = False, positive: bool = False) -> float:
    """Return ``value`` as a float after checking it is a usable threshold: not NaN,
    non-negative (positive with ``positive``), finite (or inf with ``allow_inf``) and within
    float32's range (a finite value beyond it would turn into inf on the device)."""
    if isinstance(value, Tensor):
        raise TypeError(
            f"{name} must be a Python number; for a threshold that changes on the device "
            f"use an adaptive clipper (got a tensor)"
        )
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    if math.isinf(v) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {value!r}")
    if math.isfinite(v) and abs(v) > FLOAT32_MAX:
        hint = "; use math.inf for no limit" if allow_inf else ""
        raise ValueError(f"{name}={value!r} is beyond float32's largest value ({FLOAT32_MAX:.4g}), "
                         f"the precision gradguard computes thresholds in{hint}")
    if v < 0 or (positive and v == 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return v


def as_param_list(parameters: Tensor | Iterable[Tensor], name: str = "parameters") -> list[Tensor]:
    """Materialise ``parameters`` (a tensor, a list or a one-shot generator) as a list."""
    if isinstance(parameters, Tensor):
        return [parameters]
    if isinstance(parameters, torch.nn.Module):
        return list(parameters.parameters())
    try:
        params = list(parameters)
    except TypeError:
        raise TypeError(
            f"{name} must be a tensor or an iterable of tensors, got {type(parameters).__name__}"
        ) from None
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(p).__name__}")
    return params


def check_grads(grads: list[Tensor], names: list[str] | None = None) -> None:
    """Refuse gradients gradguard cannot clip correctly: sparse, integer, mixed devices."""
    device = None
    for i, g in enumerate(grads):
        label = names[i] if names is not None else f"parameter {i}"
        if g.is_sparse or g.layout != torch.strided:
            raise ValueError(
                f"gradient of {label} has layout {g.layout}; gradguard clips dense (strided) "
                f"gradients only: call .to_dense() on it or exclude the parameter"
            )
        if not g.is_floating_point():
            raise ValueError(
                f"gradient of {label} has dtype {g.dtype}; gradients must be floating point"
            )
        if device is None:
            device = g.device
        elif g.device != device:
            raise ValueError(
                f"gradients live on more than one device ({device} and {g.device} for {label}); "
                f"call gradguard once per device group, or reduce the norms yourself"
            )
