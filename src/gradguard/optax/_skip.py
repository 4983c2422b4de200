"""Refusing bad updates: ``skip_nonfinite(inner)`` and ``spike_skip(inner, ...)``.

The wrapper decides on the **incoming** updates (before ``inner`` transforms them)::

    accept = isfinite(||u||)  [and not a spike, for spike_skip]
    accepted: (inner's updates, inner's new state)
    refused:  (-0.0 for every element, inner's *old* state, bit for bit)

``||u||`` is the float32 global norm of ``_tree.tree_norms`` (finite whenever every element
is and the norm is below float32's maximum). The choice is a ``jnp.where`` select, never a
multiplication (``0 * NaN`` is NaN). The refused update is negative zero because
``p + (-0.0) == p`` bit for bit for every ``p`` (``-0.0 + 0.0`` would give ``+0.0``), so
``optax.apply_updates`` leaves every parameter exactly as it was.

Policy on streaks: **hold**. However many refusals in a row, nothing non-finite is ever
applied (``optax.apply_if_finite`` applies the NaN after ``max_consecutive_errors``). The
streak is counted in the state (``consecutive_skips``); ``check_skips(state, max_consecutive)``
raises ``GradientExplosionError`` on the host, and ``Recorder(max_consecutive_skips=...)``
does so at its reads: the step itself never syncs with the host.

Consequences of holding the inner state: its step counter does not advance on a refused
step, so learning-rate schedules inside ``inner`` count accepted steps. Wrap the *whole*
update (``skip_nonfinite(optax.chain(clipper, optimizer, weight_decay...))``): a transform
outside the wrapper still acts on a refused step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _args
from ._tree import F32, tree_norms


class SkipState(NamedTuple):
    """State of ``skip_nonfinite`` / ``spike_skip``.

    ``inner_state``       the wrapped transformation's state (held on refused steps)
    ``skipped``           bool: the last update was refused
    ``skip_count``        int32: refused updates in total
    ``consecutive_skips`` int32: refused updates in a row (0 after an accepted one)
    ``grad_norm``         float32 global norm of the last incoming update (NaN/Inf if non-finite)
    ``guard_steps``       int32: updates seen (accepted or not)
    ``grad_leaf_norms``   [k] float32 norm of each incoming leaf (``jax.tree.leaves`` order)
    ``grad_leaf_max_abs`` [k] float32 max |u| of each incoming leaf
    ``grad_leaf_nonfinite`` [k] int32 NaN/Inf elements of each incoming leaf
    ``spike``             the spike rule's state (``()`` for ``skip_nonfinite``)
    """

    inner_state: Any
    skipped: jax.Array
    skip_count: jax.Array
    consecutive_skips: jax.Array
    grad_norm: jax.Array
    guard_steps: jax.Array
    grad_leaf_norms: jax.Array
    grad_leaf_max_abs: jax.Array
    grad_leaf_nonfinite: jax.Array
    spike: Any = ()


def _select_tree(accept: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(accept, n, o).astype(jnp.asarray(o).dtype), new, old)


def _refused(updates: Any) -> Any:
    return jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates)


def _nonfinite_counts(tree: Any, axis_name: Any) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((0,), jnp.int32)
    c = jnp.stack([jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in leaves])
    return c if axis_name is None else jax.lax.psum(c, axis_name)


def guarded(inner: Any, *, axis_name: Any = None, spike: Any = None
            ) -> optax.GradientTransformationExtraArgs:
    """The one implementation behind both wrappers. ``spike``: None, or an object with
    ``init() -> state``, ``decide(state, norm, value) -> (is_spike, proposed)`` and
    ``commit(accept, proposed, old) -> state`` (the shared spike rule, see ``_adaptive``)."""
    inner = optax.with_extra_args_support(_args.transformation(inner, "inner"))

    def init_fn(params: Any) -> SkipState:
        z = jnp.zeros((), jnp.int32)
        k = len(jax.tree.leaves(params))
        return SkipState(inner.init(params), jnp.zeros((), bool), z, z, jnp.zeros((), F32), z,
                         jnp.zeros((k,), F32), jnp.zeros((k,), F32), jnp.zeros((k,), jnp.int32),
                         () if spike is None else spike.init())

    def update_fn(updates: Any, state: SkipState, params: Any = None, **extra_args: Any):
        n = tree_norms(updates, axis_name)
        norm = n.total
        accept = jnp.isfinite(norm)
        spike_state = state.spike
        if spike is not None:
            is_spike, proposed = spike.decide(state.spike, norm, extra_args.get("value"))
            accept = accept & ~is_spike
            spike_state = spike.commit(accept, proposed, state.spike)
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        out = jax.tree.map(lambda n, r: jnp.where(accept, n, r), new_updates, _refused(new_updates))
        held = _select_tree(accept, new_inner, state.inner_state)
        refused = ~accept
        r = refused.astype(jnp.int32)
        new = SkipState(held, refused, state.skip_count + r,
                        jnp.where(refused, state.consecutive_skips + 1, 0).astype(jnp.int32),
                        norm, state.guard_steps + 1, n.per_leaf, n.max_abs,
                        _nonfinite_counts(updates, axis_name), spike_state)
        return out, new

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def skip_nonfinite(inner: Any, *, axis_name: Any = None) -> optax.GradientTransformationExtraArgs:
    """Refuse any update holding a NaN or Inf (or whose float32 norm overflows): the update
    becomes ``-0.0`` everywhere and ``inner``'s state is kept bit for bit, however many times
    in a row (see the module docstring for the policy). ``axis_name``: under ``shard_map`` /
    ``pmap`` with leaves sharded over that axis, a NaN on one device refuses the step on all.
    """
    return guarded(inner, axis_name=axis_name)


def check_skips(state: Any, max_consecutive: int) -> None:
    """Host-side: raise ``GradientExplosionError`` when the state's ``consecutive_skips``
    exceeds ``max_consecutive`` (reads one int from the device; call it every N steps)."""
    from ..errors import GradientExplosionError

    max_consecutive = _args.int_at_least(max_consecutive, "max_consecutive", 1)
    c = optax.tree.get(state, "consecutive_skips")
    if c is None:
        raise ValueError("check_skips: the state holds no skip_nonfinite / spike_skip state")
    n = int(jax.device_get(c))
    if n > max_consecutive:
        raise GradientExplosionError(
            f"gradguard.optax: {n} updates in a row were refused (non-finite or spiking "
            f"gradients; max_consecutive={max_consecutive}): training has diverged")


def skip_microstep(axis_name: Any = None) -> Any:
    """A ``should_skip_update_fn`` for ``optax.MultiSteps``: drop a micro-batch whose update
    holds a NaN/Inf (its float32 norm is not finite) before it reaches the accumulator.

    Needed because ``MultiSteps`` resets its accumulator as ``(1 - emit) * acc``, and
    ``0 * NaN`` is NaN: one NaN micro-batch poisons every later window (measured in
    ``docs/optax.md``). As with ``optax.skip_not_finite``, a dropped micro-batch does not count
    towards the ``k`` of the window. Unlike it, ``axis_name`` reduces the decision over
    the devices of a ``shard_map`` / ``pmap`` axis, so every device drops the same micro-batch
    (``optax.skip_not_finite`` decides per shard). Returns ``(should_skip, {"should_skip",
    "microstep_norm"})``.
    """

    def should_skip(updates: Any, gradient_step: Any, params: Any) -> tuple[Any, Any]:
        del gradient_step, params
        try:
            norm = tree_norms(updates, axis_name).total
        except NameError:  # MultiSteps.init calls it outside shard_map for the state's shape
            norm = tree_norms(updates).total
        skip = ~jnp.isfinite(norm)
        return skip, {"should_skip": skip, "microstep_norm": norm}

    return should_skip
