"""The jax.numpy backend of ``gradguard.rules.xp``: works on concrete arrays and under ``jit``.

Implements exactly the operation list of ``gradguard.rules.xp``, each as ``jax.numpy`` /
``lax`` operations, so a rule traced inside ``jit``, ``vmap``, ``shard_map`` or ``lax.cond``
is pure XLA: no host callback, no Python branch on a value.

Dtypes: ``"f32"`` is float32 and ``"bool"`` bool. Without ``jax_enable_x64`` (JAX's default)
``"f64"`` maps to float32 and ``"i64"`` to int32, as the namespace allows: counts then wrap
after 2^31 steps, and the float64 parts of a rule (AutoClip's percentile interpolation and
histogram bin index) are computed in float32 (a norm within ~1e-4 of a bin edge may fall in
the neighbouring bin, which the histogram's error bound allows). With x64 on they are float64
and int64, as on numpy and torch.

Registered for ``jax.Array`` (which tracers are instances of) when imported.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from .xp import register

__all__ = ["JAX", "JaxOps"]


def _dtype(name: str) -> Any:
    x64 = bool(jax.config.jax_enable_x64)
    return {"f32": jnp.float32, "f64": jnp.float64 if x64 else jnp.float32,
            "i64": jnp.int64 if x64 else jnp.int32, "bool": jnp.bool_}[name]


class JaxOps:
    """jax arrays (concrete or traced)."""

    name = "jax"

    @staticmethod
    def full(shape: tuple, value: Any, dtype: str, like: Any = None) -> jax.Array:
        dt = _dtype(dtype)
        if jnp.issubdtype(dt, jnp.floating) and isinstance(value, (int, float)) \
                and math.isfinite(value) and abs(value) > float(jnp.finfo(dt).max):
            value = math.inf if value > 0 else -math.inf
        return jnp.full(shape, value, dtype=dt)

    @staticmethod
    def arange(n: int, dtype: str, like: Any = None) -> jax.Array:
        return jnp.arange(n, dtype=_dtype(dtype))

    @staticmethod
    def astype(x: Any, dtype: str) -> jax.Array:
        return jnp.asarray(x).astype(_dtype(dtype))

    @staticmethod
    def concat(xs: Any) -> jax.Array:
        return jnp.concatenate([jnp.reshape(x, (-1,)) for x in xs])

    @staticmethod
    def where(c: Any, a: Any, b: Any) -> jax.Array:
        # Python numbers are weakly typed in jnp: they take the array operand's dtype
        return jnp.where(c, a, b)

    minimum = staticmethod(jnp.minimum)
    maximum = staticmethod(jnp.maximum)

    @staticmethod
    def clamp(x: Any, lo: float | None = None, hi: float | None = None) -> jax.Array:
        x = jnp.asarray(x)
        if lo is not None:
            x = jnp.maximum(x, lo)
        if hi is not None:
            x = jnp.minimum(x, hi)
        return x

    log = staticmethod(jnp.log)
    exp = staticmethod(jnp.exp)
    sqrt = staticmethod(jnp.sqrt)
    abs = staticmethod(jnp.abs)
    floor = staticmethod(jnp.floor)
    isfinite = staticmethod(jnp.isfinite)
    isnan = staticmethod(jnp.isnan)

    @staticmethod
    def sum(x: Any, axis: Any = None, keepdims: bool = False) -> jax.Array:
        x = jnp.asarray(x)
        dt = _dtype("i64") if x.dtype == jnp.bool_ else x.dtype
        return jnp.sum(x, axis=axis, keepdims=keepdims, dtype=dt)

    @staticmethod
    def amax(x: Any, axis: Any = None, keepdims: bool = False) -> jax.Array:
        return jnp.max(x, axis=axis, keepdims=keepdims)

    @staticmethod
    def cumsum(x: Any) -> jax.Array:
        x = jnp.asarray(x)
        return jnp.cumsum(x, dtype=x.dtype)

    @staticmethod
    def sort(x: Any) -> jax.Array:
        return jnp.sort(x)

    @staticmethod
    def take(x: Any, i: Any) -> jax.Array:
        return jnp.asarray(x)[i]

    @staticmethod
    def searchsorted(s: Any, v: Any, right: bool = False) -> jax.Array:
        s = jnp.asarray(s)
        idx = jnp.searchsorted(s, jnp.reshape(jnp.asarray(v).astype(s.dtype), ()),
                               side="right" if right else "left")
        return idx.astype(_dtype("i64"))


JAX = JaxOps()
register((jax.Array,), JAX)
