"""What every rule shares: the commit step and the checks of configuration numbers.

``commit(accept, proposed, old, xp)`` is the only way a rule's statistics change: field by
field (recursively through nested NamedTuples) it keeps ``proposed`` where ``accept`` (a 0-d
bool array) is True and ``old`` elsewhere, so a skipped or non-finite step never enters the
statistics, in every framework, without a host read.

The checks turn a hyperparameter into a Python float or int or raise ``TypeError`` /
``ValueError`` naming the argument and the value; numpy scalars (``np.float32(1.0)``) are
numbers, bools and arrays/tensors are not.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

#: largest finite float32; thresholds beyond it cannot be held by a float32 norm's array
FLOAT32_MAX = 3.4028234663852886e38


def commit(accept: Any, proposed: Any, old: Any, xp: Any) -> Any:
    """``proposed`` where ``accept`` else ``old``, for every array of a (nested) NamedTuple.

    Fields that are not arrays (None, Python numbers) are taken from ``proposed``. Arrays of
    any fixed shape are kept whole: ``accept`` is 0-d and broadcasts.
    """
    if proposed is old:  # unchanged: nothing to choose (and no operation spent on it)
        return old
    if isinstance(proposed, tuple):
        return type(proposed)(*(commit(accept, p, o, xp) for p, o in zip(proposed, old)))
    if not hasattr(proposed, "dtype"):  # None or a Python number: configuration, not state
        return proposed
    return xp.where(accept, proposed, old)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def number(value: Any, name: str) -> float:
    """``value`` as a float: TypeError for a non-number (bool, str, array, tensor), ValueError
    for NaN."""
    if not _is_number(value):
        if isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            raise TypeError(f"{name} must be a Python number, got an array/tensor {value!r}; "
                            f"for a threshold that changes on the device use an adaptive "
                            f"clipper")
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN, got {value!r}")
    return v


def nonneg(value: Any, name: str, *, allow_inf: bool = False, positive: bool = False) -> float:
    """``value`` as a float >= 0 (> 0 with ``positive``; inf only with ``allow_inf``)."""
    v = number(value, name)
    if math.isinf(v) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {value!r}")
    if v < 0 or (positive and v == 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return v


def threshold(value: Any, name: str) -> float:
    """A norm threshold: a number in [0, inf]. A finite value beyond float32's range (3.4e38)
    is refused: thresholds live in float32 arrays, where it would silently become inf; pass
    ``math.inf`` for no limit."""
    v = nonneg(value, name, allow_inf=True)
    if math.isfinite(v) and v > FLOAT32_MAX:
        raise ValueError(f"{name}={value!r} is beyond float32's largest value "
                         f"({FLOAT32_MAX:.4g}), the precision thresholds are kept in; use "
                         f"math.inf for no limit")
    return v


def open_unit(value: Any, name: str) -> float:
    """``value`` as a float in the open interval (0, 1)."""
    v = number(value, name)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{name} must lie in the open interval (0, 1), got {value!r}")
    return v


def int_at_least(value: Any, name: str, low: int) -> int:
    """``value`` as an int >= ``low`` (numpy integers accepted, bools not)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def flag(value: Any, name: str) -> bool:
    """A yes/no argument: True/False (or numpy bool); anything else, e.g. the string "no",
    is a TypeError (``bool("no")`` is True, so it is never guessed)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def finite(value: Any, name: str) -> float:
    """``value`` as a finite float of either sign."""
    v = number(value, name)
    if math.isinf(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v
