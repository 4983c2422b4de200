"""Fixed-threshold clipping transformations: global norm, value, per leaf, unit-wise (AGC).

All are ``optax.GradientTransformation`` s whose state is a NamedTuple of fixed-shape arrays
(the step's statistics, readable with ``optax.tree.get`` under ``jit``). Norms are float32 L2
norms (``_tree.tree_norms``: float32 accumulation, overflow-safe), in the units of the updates.

Non-finite updates (a NaN or Inf element anywhere) are passed through **unchanged** by every
norm-based clipper here, and flagged in the state (``nonfinite``): a NaN norm never scales the
finite leaves to NaN or 0 (optax's ``clip_by_global_norm`` turns ``[1, inf]`` into ``[0, nan]``
and zeroes every other leaf). Refusing such a step is the job of ``skip_nonfinite``, which
sees the untouched values.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..rules import agc as agc_rule
from ..rules import norm_clip, value_clip
from ..rules.xp_jax import JAX
from . import _args
from ._tree import F32, mag_wide, scale_leaf, tree_norms


class ClipState(NamedTuple):
    """Statistics of the last step of a global-norm clipper (fixed or adaptive), float32.

    ``total_norm``  global L2 norm of the incoming updates (NaN/Inf when non-finite)
    ``clip_coef``   the factor every leaf was multiplied by (1.0: unchanged)
    ``threshold``   the max norm in force for this step (inf: no clipping)
    ``clipped``     ``clip_coef < 1``
    ``nonfinite``   some element was NaN or Inf (updates passed through unchanged)
    ``leaf_norms``  [k] L2 norm of each leaf, ``jax.tree.leaves`` order
    ``leaf_max_abs`` [k] max |u| of each leaf
    ``rule``        the adaptive rule's state (``()`` for a fixed threshold)
    """

    total_norm: jax.Array
    clip_coef: jax.Array
    threshold: jax.Array
    clipped: jax.Array
    nonfinite: jax.Array
    leaf_norms: jax.Array
    leaf_max_abs: jax.Array
    rule: Any = ()


def empty_clip_state(params: Any, rule: Any = ()) -> ClipState:
    k = len(jax.tree.leaves(params))
    return ClipState(total_norm=jnp.zeros((), F32), clip_coef=jnp.ones((), F32),
                     threshold=jnp.full((), jnp.inf, F32), clipped=jnp.zeros((), bool),
                     nonfinite=jnp.zeros((), bool), leaf_norms=jnp.zeros((k,), F32),
                     leaf_max_abs=jnp.zeros((k,), F32), rule=rule)


def norm_coefficient(total: jax.Array, threshold: Any, *, eps: float = 0.0,
                     strict: bool = True) -> jax.Array:
    """The shared rule's coefficient (``gradguard.rules.norm_clip.coefficient``) with the
    non-finite policy: 1 exactly when ``total`` is not finite or ``total <= threshold``; else
    ``threshold / (total + eps)``. ``eps=0`` is optax's ``max_norm / ||u||`` (no 0/0 at
    ``total == max_norm == 0``: optax gives NaN there); ``eps=1e-6`` torch's formula."""
    return norm_clip.coefficient(total, jnp.asarray(threshold, F32), JAX,
                                 nonfinite=~jnp.isfinite(total), strict=strict, eps=eps)


def apply_coefficient(updates: Any, coef: jax.Array) -> Any:
    return jax.tree.map(lambda u: scale_leaf(u, coef), updates)


def clip_by_global_norm(max_norm: Any, *, formula: str = "optax", axis_name: Any = None
                        ) -> optax.GradientTransformation:
    """Scale all updates by ``min(1, max_norm / ||u||)`` (optax's ``clip_by_global_norm``).

    ``formula="torch"`` gives ``gg.NormClip`` / torch's ``min(1, max_norm / (||u|| + 1e-6))``
    instead (a norm within 1e-6 below ``max_norm`` is then shrunk by a hair, as in torch).

    ``||u||`` is the float32 global L2 norm (a float16 leaf of 300s has its true norm). A
    norm equal to or below ``max_norm`` leaves the updates bit-for-bit unchanged; non-finite
    updates pass unchanged (see the module docstring). ``axis_name``: inside ``shard_map`` /
    ``pmap``, the mesh axis over which the leaves are *sharded* (their squared norms are summed
    over it); not needed for replicated (already ``pmean``-ed) updates.
    """
    max_norm = _args.threshold(max_norm, "max_norm", allow_inf=True)
    if formula not in ("optax", "torch"):
        raise ValueError(f"formula must be 'optax' or 'torch', got {formula!r}")
    eps = 0.0 if formula == "optax" else norm_clip.EPS

    def init_fn(params: Any) -> ClipState:
        return empty_clip_state(params)

    def update_fn(updates: Any, state: ClipState, params: Any = None) -> tuple[Any, ClipState]:
        del params
        n = tree_norms(updates, axis_name)
        # strict (exactly 1 at or below max_norm) with eps=0: optax's trigger; eps>0: torch's
        coef = norm_coefficient(n.total, max_norm, eps=eps, strict=eps == 0.0)
        new = ClipState(n.total, coef, jnp.asarray(max_norm, F32), coef < 1.0,
                        ~jnp.isfinite(n.total), n.per_leaf, n.max_abs, state.rule)
        return apply_coefficient(updates, coef), new

    return optax.GradientTransformation(init_fn, update_fn)


class PerLeafClipState(NamedTuple):
    """``per_leaf_norms`` [k] float32 norm of each leaf before clipping; ``per_leaf_coefs`` [k]
    the factor each leaf was multiplied by; ``per_leaf_nonfinite``: some element non-finite."""

    per_leaf_norms: jax.Array
    per_leaf_coefs: jax.Array
    per_leaf_nonfinite: jax.Array


def clip_by_norm_per_leaf(max_norm: Any, *, axis_name: Any = None) -> optax.GradientTransformation:
    """Clip each leaf to its own L2 norm: ``u_i <- u_i * max_norm / max(||u_i||, max_norm)``
    (``tf.clip_by_norm`` per variable, Keras ``clipnorm``, gradguard's ``NormClip(per_tensor=True)``).

    float32 norms; a leaf at or below ``max_norm`` is unchanged bit-for-bit; when any element
    is non-finite nothing is clipped (as ``gg.NormClip(per_tensor=True)``).
    """
    max_norm = _args.threshold(max_norm, "max_norm", allow_inf=True)

    def init_fn(params: Any) -> PerLeafClipState:
        k = len(jax.tree.leaves(params))
        return PerLeafClipState(jnp.zeros((k,), F32), jnp.ones((k,), F32), jnp.zeros((), bool))

    def update_fn(updates: Any, state: PerLeafClipState, params: Any = None):
        del params, state
        n = tree_norms(updates, axis_name)
        coefs = norm_clip.per_tensor_coefficients(n.per_leaf, jnp.asarray(max_norm, F32), JAX,
                                                  nonfinite=~jnp.isfinite(n.total))
        leaves, treedef = jax.tree.flatten(updates)
        out = [scale_leaf(u, coefs[i]) for i, u in enumerate(leaves)]
        return jax.tree.unflatten(treedef, out), PerLeafClipState(n.per_leaf, coefs, n.nonfinite)

    return optax.GradientTransformation(init_fn, update_fn)


class ValueClipState(NamedTuple):
    """``clipped_elements``: int32 number of elements moved onto a bound in the last step."""

    clipped_elements: jax.Array


def clip_by_value(clip_value: Any = None, *, min_value: float | None = None,
                  max_value: float | None = None) -> optax.GradientTransformation:
    """Clamp every element into ``[-clip_value, clip_value]`` or ``[min_value, max_value]``
    (``optax.clip`` for the symmetric form; either bound may be left out). NaN stays NaN;
    ±Inf is clamped onto the bound, as ``optax.clip`` and ``torch.clamp`` do."""
    cfg = value_clip.config(clip_value, min_value=min_value, max_value=max_value)

    def init_fn(params: Any) -> ValueClipState:
        del params
        return ValueClipState(jnp.zeros((), jnp.int32))

    def clamp(u: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = value_clip.clip(cfg, u, JAX)
        moved = jnp.sum((out != u) & ~jnp.isnan(u), dtype=jnp.int32)
        return out, moved

    def update_fn(updates: Any, state: ValueClipState, params: Any = None):
        del params, state
        leaves, treedef = jax.tree.flatten(updates)
        pairs = [clamp(u) for u in leaves]
        moved = sum((m for _, m in pairs), jnp.zeros((), jnp.int32))
        return jax.tree.unflatten(treedef, [o for o, _ in pairs]), ValueClipState(moved)

    return optax.GradientTransformation(init_fn, update_fn)


def unit_axes(x: Any, axis: Any) -> tuple[int, ...] | None:
    """The reduction axes of a unit (``optax.adaptive_grad_clip``'s conventions, Flax layouts):
    rank <= 1 after squeezing: the whole leaf; rank 2 or 3: axis 0 (``(in, out)`` kernels, one
    unit per output); rank 4: (0, 1, 2) (HWIO); rank 5: (0, 1, 2, 3). PyTorch's ``(out, in)``
    weights reduce over axis 1 instead: pass ``axis=`` for other layouts."""
    if axis is not None:
        return (axis,) if isinstance(axis, int) else tuple(axis)
    shape = jnp.shape(x)
    if len([d for d in shape if d != 1]) <= 1:
        return None
    nd = len(shape)
    if nd in (2, 3):
        return (0,)
    if nd == 4:
        return (0, 1, 2)
    if nd == 5:
        return (0, 1, 2, 3)
    raise ValueError(f"agc: cannot infer the unit axes of a leaf of shape {shape}; pass axis=")


class AGCState(NamedTuple):
    """``agc_clipped_units``: int32 units scaled down in the last step; ``agc_nonfinite``."""

    agc_clipped_units: jax.Array
    agc_nonfinite: jax.Array


def agc(clipping: Any = 0.01, eps: Any = 1e-3, *, axis: Any = None) -> optax.GradientTransformation:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021, NFNets), as
    ``optax.adaptive_grad_clip`` but with float32 norms and a non-finite policy.

    For each unit ``i`` (see ``unit_axes``) of a leaf with parameter ``W`` and update ``G``::

        G_i <- G_i * (clipping * max(||W_i||, eps) / max(||G_i||, 1e-6))
               where ||G_i|| > clipping * max(||W_i||, eps), else unchanged.

    Needs ``params``. When any element of the updates is non-finite nothing is clipped (the
    skip transformation sees the raw values), as ``gg.AGC``.
    """
    cfg = agc_rule.config(clipping, eps)

    def init_fn(params: Any) -> AGCState:
        del params
        return AGCState(jnp.zeros((), jnp.int32), jnp.zeros((), bool))

    def update_fn(updates: Any, state: AGCState, params: Any = None):
        del state
        if params is None:
            raise ValueError("agc needs params: call update(updates, state, params)")
        u_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = treedef.flatten_up_to(params)
        finite = jnp.stack([jnp.all(jnp.isfinite(u)) for u in u_leaves]).all() if u_leaves \
            else jnp.ones((), bool)
        out, count = [], jnp.zeros((), jnp.int32)
        for u, p in zip(u_leaves, p_leaves):
            axes = unit_axes(p, axis)
            coef = agc_rule.coefficient(cfg, agc_rule.unit_norm(mag_wide(u), axes, JAX),
                                        agc_rule.unit_norm(mag_wide(p), axes, JAX), JAX,
                                        nonfinite=~finite)
            out.append(scale_leaf(u, coef))
            count = count + jnp.sum(coef < 1.0, dtype=jnp.int32)
        return jax.tree.unflatten(treedef, out), AGCState(count, ~finite)

    return optax.GradientTransformation(init_fn, update_fn)
