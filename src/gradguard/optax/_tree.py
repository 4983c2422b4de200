"""Norms of a pytree of updates: float32 accumulation, overflow-safe, one read in the usual case.

For leaves ``g_1 .. g_k`` (any float dtype, complex allowed)::

    a_i = max |g_i|                 (exact in the leaf dtype, then float32; NaN if g_i holds NaN)
    s_i = sum |g_i|^2               (each element cast to float32 *before* squaring)
    n_i = sqrt(s_i),  ||g|| = sqrt(sum_i s_i)

A float16 leaf of 300s therefore has its exact norm (optax's ``tree.norm`` squares in float16:
inf). When the float32 squares overflow (a float32 or bfloat16 element beyond ~1.8e19) or
underflow (a leaf whose largest element is below 2**-60) while every element is finite, the norms are recomputed with each leaf's max-abs factored out,
``n_i = a_i sqrt(sum |g_i / a_i|^2)`` and ``||g|| = N sqrt(sum (n_i / N)^2)``, ``N = max n_i``; that branch (``lax.cond``) only runs in that case. So every
norm is finite whenever it is below float32's maximum (3.4e38), and a norm of 1e-30 is
1e-30, not 0. A NaN or Inf element makes
``nonfinite`` true and the total NaN or Inf (it is never clipped into something finite).

``a_i`` and ``s_i`` read the same leaf and XLA fuses them into one pass. With ``axis_name``
(inside ``shard_map`` / ``pmap``, leaves *sharded* over that axis) ``s_i`` is summed and ``a_i``
maxed over the axis before anything else, so every device sees the global norms and takes
the same decision. Replicated leaves (gradients already ``pmean``-ed) need no axis name.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

F32 = jnp.float32
_TINY = 2.0 ** -60


class TreeNorms(NamedTuple):
    """float32 norms of a pytree (leaf order: ``jax.tree.leaves``)."""

    total: jax.Array      # 0-d: global L2 norm
    per_leaf: jax.Array   # [k]: L2 norm of each leaf
    max_abs: jax.Array    # [k]: max |g| of each leaf (0 for an empty leaf)
    nonfinite: jax.Array  # 0-d bool: some element is NaN or Inf


def mag32(x: jax.Array) -> jax.Array:
    """|x| as float32 (real leaves: x itself, the square does the rest)."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return jnp.abs(x).astype(F32)
    return x.astype(F32)


def mag_wide(x: jax.Array) -> jax.Array:
    """|x| in at least float32: float64 leaves (with x64 on) keep float64, whose range a
    float32 norm would not hold (gradients of 1e160)."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.abs(x)
    return x if x.dtype == jnp.float64 else x.astype(F32)


def _abs_max(x: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(x), initial=0).astype(F32) if x.size else jnp.zeros((), F32)


def _sum_sq(x: jax.Array, scale: jax.Array | None = None) -> jax.Array:
    m = mag32(x)
    if scale is not None:
        m = m / scale
    return jnp.sum(m * m, dtype=F32)


def _psum(x: jax.Array, axis_name: Any) -> jax.Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _pmax(x: jax.Array, axis_name: Any) -> jax.Array:
    return x if axis_name is None else jax.lax.pmax(x, axis_name)


def _cond(pred: jax.Array, true_fn: Any, false_fn: Any) -> Any:
    """``lax.cond`` under a trace; a plain Python branch on concrete (eager) values, where
    ``lax.cond`` would compile its freshly made branch functions on every call."""
    if isinstance(pred, jax.core.Tracer):
        return jax.lax.cond(pred, true_fn, false_fn, None)
    return true_fn(None) if bool(pred) else false_fn(None)


def tree_norms(tree: Any, axis_name: Any = None) -> TreeNorms:
    """float32 L2 norms of ``tree``: total, per leaf, max |g| per leaf, non-finite flag."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        z = jnp.zeros((0,), F32)
        return TreeNorms(jnp.zeros((), F32), z, z, jnp.zeros((), bool))
    amax = _pmax(jnp.stack([_abs_max(x) for x in leaves]), axis_name)
    ss = _psum(jnp.stack([_sum_sq(x) for x in leaves]), axis_name)
    nonfinite = ~jnp.all(jnp.isfinite(amax))
    total_ss = jnp.sum(ss)
    # squares beyond float32 (an element above ~1.8e19) or below its normal range (every
    # element of a leaf under 2**-60 ~ 8.7e-19: squares subnormal or 0) lose the norm
    tiny = (amax > 0) & (amax < _TINY)
    overflow = ~nonfinite & (~jnp.isfinite(total_ss) | jnp.any(tiny))

    def fast(_: None) -> tuple[jax.Array, jax.Array]:
        return jnp.sqrt(ss), jnp.sqrt(total_ss)

    def rescaled(_: None) -> tuple[jax.Array, jax.Array]:
        # each leaf by its own max-abs (a global one would underflow the small leaves), then
        # the total from the per-leaf norms with their max factored out
        scale = jnp.where(amax > 0, amax, 1.0)
        t = _psum(jnp.stack([_sum_sq(x, scale[i]) for i, x in enumerate(leaves)]), axis_name)
        per = jnp.where(jnp.isfinite(ss) & ~tiny, jnp.sqrt(ss), scale * jnp.sqrt(t))
        big = jnp.max(per)
        return per, big * jnp.sqrt(jnp.sum(jnp.square(per / big)))

    per_leaf, total = _cond(overflow, rescaled, fast)
    return TreeNorms(total, per_leaf, amax, nonfinite)


def scale_leaf(x: jax.Array, coef: jax.Array) -> jax.Array:
    """``x * coef`` computed in float32 (complex64 for complex leaves), back in x's dtype."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return (x * coef.astype(x.real.dtype)).astype(x.dtype)
    return (x.astype(jnp.promote_types(x.dtype, F32)) * coef).astype(x.dtype)


def leaf_names(tree: Any) -> list[str]:
    """Leaf paths of ``tree`` as ``a/b/0`` strings, in ``jax.tree.leaves`` order."""
    paths = jax.tree_util.tree_leaves_with_path(tree)
    return [jax.tree_util.keystr(p, simple=True, separator="/") or "leaf" for p, _ in paths]


def all_finite(tree: Any, axis_name: Any = None) -> jax.Array:
    """0-d bool: every element of every leaf is finite (on every device of ``axis_name``)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.ones((), bool)
    bad = jnp.stack([~jnp.all(jnp.isfinite(x)) for x in leaves]).any()
    return ~_pmax(bad, axis_name)
