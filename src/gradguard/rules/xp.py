"""The array namespace the pure rules are written against, and its registry.

A rule (``gradguard.rules.*``) never imports torch, numpy, jax or TensorFlow: it receives an
``xp`` object and uses only Python's arithmetic operators on arrays (``+ - * / ** %``, the
comparisons ``< <= > >= ==``, and ``& | ~`` on bool arrays) plus the operations listed here.
Backends: ``NUMPY`` (this module), ``gradguard.rules.xp_torch`` (torch tensors on any device),
``gradguard.rules.xp_jax`` and ``gradguard.rules.xp_tf`` (written by the adapters). Each
backend is a class with exactly these static methods; ``namespace(x)`` picks one by the type
of ``x``.

Dtypes are named by strings: ``"f32"``, ``"f64"``, ``"i64"``, ``"bool"``. (A backend whose
framework runs without 64-bit types, e.g. jax without ``jax_enable_x64``, may map ``"f64"`` to
float32 and ``"i64"`` to int32; the rules stay correct, float64 only buys precision.)
Shapes are fixed by the configuration; no operation returns a shape that depends on values.

Operation list (every backend implements all of them, with these semantics):

construction
    ``full(shape, value, dtype, like)``  array of ``shape`` (a tuple; ``()`` for 0-d) filled
        with the Python number ``value``, on ``like``'s device (``like`` may be None: the
        default device). A finite ``value`` beyond the dtype's range becomes +-inf (what the
        dtype's conversion of that number means; torch would raise instead).
    ``arange(n, dtype, like)``           ``[0, 1, ..., n-1]``, 1-d, on ``like``'s device.
    ``astype(x, dtype)``                 ``x`` converted (bool -> 0/1, float -> int truncates).
    ``concat(xs)``                       1-d arrays (or 0-d, taken as length 1) joined.
elementwise (``a``/``b`` arrays or Python numbers; the result has the array's dtype)
    ``where(c, a, b)``                   ``a`` where ``c`` else ``b``; a/b may be Python numbers.
    ``minimum(a, b)``, ``maximum(a, b)`` NaN-propagating, like numpy's.
    ``clamp(x, lo=None, hi=None)``       ``min(max(x, lo), hi)``, Python-number bounds; NaN stays.
    ``log``, ``exp``, ``sqrt``, ``abs``, ``floor``, ``isfinite``, ``isnan``.
reductions (``axis``: None for all, an int or a tuple of ints)
    ``sum(x, axis=None, keepdims=False)``   (bool arrays sum as integers)
    ``amax(x, axis=None, keepdims=False)``  (NaN-propagating)
1-d arrays
    ``cumsum(x)``                        inclusive cumulative sum.
    ``sort(x)``                          ascending (+inf last).
    ``take(x, i)``                       ``x[i]`` for an integer array ``i`` (0-d or 1-d).
    ``searchsorted(s, v, right)``        for ascending 1-d ``s`` and 0-d ``v``: the 0-d int
        index of numpy's ``searchsorted(s, v, side="right" if right else "left")``.

Rules compute NaN or inf in intermediate values that a ``where`` then discards (the z-score
of a non-finite norm, the estimate of an empty histogram); numpy reports those as
``RuntimeWarning``s, so host code that runs rules on numpy wraps them in
``np.errstate(invalid="ignore", divide="ignore", over="ignore")``.

Registry: ``register(types, backend)`` makes ``namespace(x)`` return ``backend`` for instances
of ``types``. A backend module in this package is imported on first use, by the top-level
module name of the array's type: ``torch`` -> ``xp_torch``, ``jax``/``jaxlib`` -> ``xp_jax``,
``tensorflow`` -> ``xp_tf`` (each module calls ``register`` when imported).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

__all__ = ["NUMPY", "NumpyOps", "namespace", "register"]

_NP_DTYPES = {"f32": np.float32, "f64": np.float64, "i64": np.int64, "bool": np.bool_}


def _fill_value(value: float, dtype: Any) -> Any:
    """``value`` as the dtype understands it: beyond a float dtype's range, +-inf."""
    if np.issubdtype(dtype, np.floating) and np.isfinite(value):
        if abs(value) > float(np.finfo(dtype).max):
            return np.inf if value > 0 else -np.inf
    return value


class NumpyOps:
    """numpy arrays on the host (0-d results may come back as numpy scalars)."""

    name = "numpy"

    @staticmethod
    def full(shape: tuple, value: Any, dtype: str, like: Any = None) -> Any:
        dt = _NP_DTYPES[dtype]
        return np.full(shape, _fill_value(value, dt), dtype=dt)

    @staticmethod
    def arange(n: int, dtype: str, like: Any = None) -> Any:
        return np.arange(n, dtype=_NP_DTYPES[dtype])

    @staticmethod
    def astype(x: Any, dtype: str) -> Any:
        return np.asarray(x).astype(_NP_DTYPES[dtype])

    @staticmethod
    def concat(xs: Any) -> Any:
        return np.concatenate([np.reshape(x, (-1,)) for x in xs])

    @staticmethod
    def where(c: Any, a: Any, b: Any) -> Any:
        # a Python number takes the array operand's dtype (numpy 2 treats it as "weak")
        if not isinstance(a, np.ndarray | np.generic):
            a = np.asarray(b).dtype.type(a) if isinstance(b, np.ndarray | np.generic) else a
        if not isinstance(b, np.ndarray | np.generic):
            b = np.asarray(a).dtype.type(b) if isinstance(a, np.ndarray | np.generic) else b
        return np.where(c, a, b)

    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)

    @staticmethod
    def clamp(x: Any, lo: float | None = None, hi: float | None = None) -> Any:
        x = np.asarray(x)
        t = x.dtype.type
        if lo is not None:
            x = np.maximum(x, t(lo))
        if hi is not None:
            x = np.minimum(x, t(hi))
        return x

    log = staticmethod(np.log)
    exp = staticmethod(np.exp)
    sqrt = staticmethod(np.sqrt)
    abs = staticmethod(np.abs)
    floor = staticmethod(np.floor)
    isfinite = staticmethod(np.isfinite)
    isnan = staticmethod(np.isnan)

    @staticmethod
    def sum(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        x = np.asarray(x)
        if x.dtype == np.bool_:
            return np.sum(x, axis=axis, keepdims=keepdims, dtype=np.int64)
        return np.sum(x, axis=axis, keepdims=keepdims, dtype=x.dtype)

    @staticmethod
    def amax(x: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return np.amax(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def cumsum(x: Any) -> Any:
        x = np.asarray(x)
        return np.cumsum(x, dtype=x.dtype)

    @staticmethod
    def sort(x: Any) -> Any:
        return np.sort(x)

    @staticmethod
    def take(x: Any, i: Any) -> Any:
        return np.asarray(x)[np.asarray(i)]

    @staticmethod
    def searchsorted(s: Any, v: Any, right: bool = False) -> Any:
        return np.int64(np.searchsorted(s, v, side="right" if right else "left"))


NUMPY = NumpyOps()

_BACKENDS: list[tuple[tuple[type, ...], Any]] = [((np.ndarray, np.generic), NUMPY)]
_LAZY = {"torch": "xp_torch", "jax": "xp_jax", "jaxlib": "xp_jax", "tensorflow": "xp_tf",
         "keras": "xp_tf"}


def register(types: type | tuple[type, ...], backend: Any) -> None:
    """Make ``namespace(x)`` return ``backend`` for instances of ``types`` (first match wins;
    a later registration for the same types replaces the earlier one)."""
    types = types if isinstance(types, tuple) else (types,)
    _BACKENDS[:] = [(t, b) for t, b in _BACKENDS if t != types]
    _BACKENDS.insert(0, (types, backend))


def namespace(x: Any) -> Any:
    """The backend for array ``x``: numpy for numpy arrays and scalars, torch for tensors,
    jax / TensorFlow once their backend module exists. TypeError for anything else."""
    for types, backend in _BACKENDS:
        if isinstance(x, types):
            return backend
    root = type(x).__module__.split(".")[0]
    mod = _LAZY.get(root)
    if mod is not None:
        importlib.import_module(f"{__package__}.{mod}")
        for types, backend in _BACKENDS:
            if isinstance(x, types):
                return backend
    raise TypeError(f"no array namespace for {type(x).__module__}.{type(x).__name__}; "
                    f"gradguard.rules knows numpy, torch, jax and TensorFlow arrays")
