"""The TensorFlow backend of ``gradguard.rules.xp``: tf tensors, eager, ``tf.function`` and XLA.

Implements exactly the operation list of ``gradguard.rules.xp`` with graph ops only (no
``.numpy()``, no Python branch on a tensor's value), so the pure rules run inside a Keras
``train_step`` compiled with ``jit_compile=True``. Devices: TensorFlow places the ops; ``like``
is accepted and not needed.

Where TensorFlow's own op differs from the namespace's semantics it is wrapped:

* ``where`` / ``minimum`` / ``maximum`` / ``clamp`` take Python numbers and give them the array
  operand's dtype (TensorFlow refuses mixed dtypes; numpy's weak scalars do the same);
* ``sort`` puts NaN last (``tf.sort`` puts NaN before +inf);
* ``amax`` propagates NaN explicitly (whatever the kernel does under XLA);
* ``searchsorted`` takes a 0-d value and returns a 0-d int64 index.
"""

from __future__ import annotations

import math
from typing import Any

import tensorflow as tf

from .xp import register

__all__ = ["TF", "TFOps"]

_DTYPES = {"f32": tf.float32, "f64": tf.float64, "i64": tf.int64, "bool": tf.bool}


def _fill_value(value: Any, dt: tf.DType) -> Any:
    if dt.is_floating and isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value) and abs(value) > float(dt.max):
        return math.inf if value > 0 else -math.inf
    return value


def _like(v: Any, other: Any) -> Any:
    """``v`` as a tensor of ``other``'s dtype when it is a Python number."""
    if isinstance(v, (tf.Tensor, tf.Variable)):
        return v
    if isinstance(other, (tf.Tensor, tf.Variable)):
        return tf.constant(_fill_value(v, other.dtype), other.dtype)
    return tf.convert_to_tensor(v)


def _axis(axis: Any) -> Any:
    return list(axis) if isinstance(axis, tuple) else axis


class TFOps:
    """TensorFlow tensors (eager or symbolic)."""

    name = "tensorflow"

    @staticmethod
    def full(shape: tuple, value: Any, dtype: str, like: Any = None) -> tf.Tensor:
        dt = _DTYPES[dtype]
        return tf.fill(list(shape), tf.constant(_fill_value(value, dt), dt))

    @staticmethod
    def arange(n: int, dtype: str, like: Any = None) -> tf.Tensor:
        return tf.range(n, dtype=_DTYPES[dtype])

    @staticmethod
    def astype(x: Any, dtype: str) -> tf.Tensor:
        dt = _DTYPES[dtype]
        x = tf.convert_to_tensor(x)
        return x if x.dtype == dt else tf.cast(x, dt)

    @staticmethod
    def concat(xs: Any) -> tf.Tensor:
        return tf.concat([tf.reshape(x, [-1]) for x in xs], 0)

    @staticmethod
    def where(c: Any, a: Any, b: Any) -> tf.Tensor:
        a2, b2 = _like(a, b), _like(b, a)
        if a2.dtype != b2.dtype:  # two arrays of different float widths: the wider wins
            wide = tf.float64 if tf.float64 in (a2.dtype, b2.dtype) else a2.dtype
            a2, b2 = tf.cast(a2, wide), tf.cast(b2, wide)
        return tf.where(c, a2, b2)

    @staticmethod
    def minimum(a: Any, b: Any) -> tf.Tensor:
        return tf.minimum(_like(a, b), _like(b, a))

    @staticmethod
    def maximum(a: Any, b: Any) -> tf.Tensor:
        return tf.maximum(_like(a, b), _like(b, a))

    @staticmethod
    def clamp(x: Any, lo: float | None = None, hi: float | None = None) -> tf.Tensor:
        x = tf.convert_to_tensor(x)
        if lo is not None:
            x = tf.maximum(x, tf.cast(lo, x.dtype))
        if hi is not None:
            x = tf.minimum(x, tf.cast(hi, x.dtype))
        return x

    log = staticmethod(tf.math.log)
    exp = staticmethod(tf.math.exp)
    sqrt = staticmethod(tf.math.sqrt)
    abs = staticmethod(tf.math.abs)
    floor = staticmethod(tf.math.floor)
    isfinite = staticmethod(tf.math.is_finite)
    isnan = staticmethod(tf.math.is_nan)

    @staticmethod
    def sum(x: Any, axis: Any = None, keepdims: bool = False) -> tf.Tensor:
        x = tf.convert_to_tensor(x)
        if x.dtype == tf.bool:
            x = tf.cast(x, tf.int64)
        return tf.reduce_sum(x, _axis(axis), keepdims=keepdims)

    @staticmethod
    def amax(x: Any, axis: Any = None, keepdims: bool = False) -> tf.Tensor:
        x = tf.convert_to_tensor(x)
        m = tf.reduce_max(x, _axis(axis), keepdims=keepdims)
        if not x.dtype.is_floating:
            return m
        bad = tf.reduce_any(tf.math.is_nan(x), _axis(axis), keepdims=keepdims)
        return tf.where(bad, tf.constant(math.nan, x.dtype), m)

    @staticmethod
    def cumsum(x: Any) -> tf.Tensor:
        return tf.cumsum(x, 0)

    @staticmethod
    def sort(x: Any) -> tf.Tensor:
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            return tf.sort(x)
        nan = tf.math.is_nan(x)
        srt = tf.sort(tf.where(nan, tf.constant(math.inf, x.dtype), x))
        n = tf.size(x, out_type=tf.int64)
        n_nan = tf.reduce_sum(tf.cast(nan, tf.int64))
        tail = tf.range(n, dtype=tf.int64) >= n - n_nan
        return tf.where(tail, tf.constant(math.nan, x.dtype), srt)

    @staticmethod
    def take(x: Any, i: Any) -> tf.Tensor:
        return tf.gather(x, i)

    @staticmethod
    def searchsorted(s: Any, v: Any, right: bool = False) -> tf.Tensor:
        s = tf.convert_to_tensor(s)
        v = tf.reshape(tf.cast(v, s.dtype), [1])
        idx = tf.searchsorted(s, v, side="right" if right else "left", out_type=tf.int64)
        return tf.reshape(idx, [])


TF = TFOps()
register((tf.Tensor, tf.Variable), TF)
