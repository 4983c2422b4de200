"""gradguard for TensorFlow: drop-in replacements for ``tf.clip_by_*`` and ``tf.linalg.global_norm``.

The seed article's ``tf.GradientTape`` loop clips with ``tf.clip_by_value`` or
``tf.clip_by_norm``; these functions take the same arguments and give the same results on
finite input, and differ where TensorFlow's own are wrong or silent:

* norms accumulate in float32 whatever the gradient dtype (float64 stays float64), so a float16
  list ``[300] * 4`` has norm 600, not ``inf``; a list may mix float16, bfloat16, float32 and
  float64 tensors (``tf.linalg.global_norm`` raises); a sum of squares that overflows its
  accumulator (bfloat16 or float32 values near 1e20 and above) or underflows it (squares below
  float32's normal range, which TensorFlow flushes to zero: values below ~1e-19) is recomputed
  scaled by the largest element, so the norm is ``inf`` only when it really exceeds the float
  range and 0 only when the tensors are zero;
* a non-finite norm gets an explicit policy, ``on_nonfinite``: ``"keep"`` (default: return the
  tensors unscaled and the non-finite norm, so the caller can skip the update), ``"zero"``
  (NaN/Inf elements set to 0, the rest clipped by their own norm) or ``"propagate"``
  (TensorFlow's behaviour: every element NaN);
* ``None`` entries pass through and ``tf.IndexedSlices`` are clipped on their ``values`` (as
  TensorFlow does: a row repeated in ``indices`` counts once per repetition).

Everything is graph ops: the functions run eagerly, inside ``tf.function`` and with
``jit_compile=True`` (XLA), with no host read. Units: norms are Euclidean (L2) norms in the
gradients' units; ``clip_norm`` is in the same units.

The global clip coefficient ``min(1, clip_norm / norm)`` (TensorFlow's formula: the shared rule
``gradguard.rules.norm_clip.coefficient`` with ``eps=0``) and the per-tensor one ``clip_norm /
max(norm, clip_norm)`` (``norm_clip.per_tensor_coefficients``) come from the shared rule through
the TensorFlow array namespace ``gradguard.rules.xp_tf``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import tensorflow as tf

from .rules import _core, norm_clip
from .rules.xp_tf import TF

__all__ = ["clip_by_agc", "clip_by_global_norm", "clip_by_norm", "clip_by_value", "global_norm", "norms"]

_POLICIES = ("keep", "zero", "propagate")


# -- helpers --------------------------------------------------------------------------------
def _values(t: Any) -> tf.Tensor:
    return t.values if isinstance(t, tf.IndexedSlices) else t


def _rewrap(t: Any, values: tf.Tensor) -> Any:
    if isinstance(t, tf.IndexedSlices):
        return tf.IndexedSlices(values, t.indices, t.dense_shape)
    return values


def _as_list(tensors: Any, name: str) -> tuple[list[Any], bool]:
    """(list, was_single): a single tensor is accepted and handed back as a single tensor."""
    if tensors is None:
        raise TypeError(f"{name} must be a tensor or a list of tensors, got None")
    if isinstance(tensors, (tf.Tensor, tf.Variable, tf.IndexedSlices)) or hasattr(tensors, "dtype"):
        return [tensors], True
    if isinstance(tensors, (str, bytes, dict)) or not hasattr(tensors, "__iter__"):
        raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(tensors).__name__}")
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        if isinstance(t, tf.IndexedSlices):
            out.append(t)
            continue
        out.append(tf.convert_to_tensor(t))
    return out, False


def _check_float(values: tf.Tensor, name: str) -> None:
    if not values.dtype.is_floating:
        raise TypeError(f"{name}: gradients must be floating point, got a {values.dtype.name} tensor")


def _acc_dtype(dtype: tf.DType) -> tf.DType:
    """float64 stays float64; float16, bfloat16 and float32 accumulate in float32."""
    return tf.float64 if dtype == tf.float64 else tf.float32


def _threshold(value: Any, name: str) -> Any:
    """A number >= 0 (inf allowed; numpy scalars too) or a tensor (taken as it is, on the
    device)."""
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return value
    return _core.nonneg(value, name, allow_inf=True)


def _policy(on_nonfinite: str) -> str:
    if on_nonfinite not in _POLICIES:
        raise ValueError(f"on_nonfinite must be one of {_POLICIES}, got {on_nonfinite!r}")
    return on_nonfinite


def _sum_squares(x: tf.Tensor, axes: Any = None, keepdims: bool = False) -> tf.Tensor:
    x = tf.cast(x, _acc_dtype(x.dtype))
    return tf.reduce_sum(tf.square(x), axes, keepdims=keepdims)


def _scaled_norm(x: tf.Tensor, axes: Any = None, keepdims: bool = False) -> tf.Tensor:
    """``m * sqrt(sum((x / m)^2))`` with ``m = max |x|``: no overflow while the norm fits.

    Only called when the plain sum of squares overflowed (rare), so its second read of the
    tensor costs nothing in the common case. NaN elements give NaN, Inf elements give inf.
    """
    x = tf.cast(x, _acc_dtype(x.dtype))
    m = tf.reduce_max(tf.abs(x), axes, keepdims=True)
    ok = tf.math.is_finite(m) & (m > 0)
    safe = tf.where(ok, m, tf.ones_like(m))
    s = tf.reduce_sum(tf.square(x / safe), axes, keepdims=True)
    n = tf.where(ok, safe * tf.sqrt(s), m)  # m is inf (an Inf element) or 0 (all zeros)
    n = tf.where(tf.reduce_any(tf.math.is_nan(x), axes, keepdims=True), tf.fill(tf.shape(n), tf.constant(math.nan, n.dtype)), n)
    if not keepdims:
        n = tf.squeeze(n, axes) if axes is not None else tf.reshape(n, [])
    return n


def _suspect(s: tf.Tensor, count: Any) -> tf.Tensor:
    """A sum of squares ``s`` of ``count`` elements that may have lost the norm: it overflowed
    (inf) or is below ``count * tiny``, where squares under the accumulator's normal range
    (flushed to zero on TensorFlow's CPU and GPU kernels) could matter: |x| below ~1e-19 in
    float32. Exact zeros are suspects too; the scaled recomputation gives them 0."""
    tiny = np.finfo(s.dtype.as_numpy_dtype).tiny
    return tf.math.is_inf(s) | (s < tf.cast(count, s.dtype) * tiny)


def _norm(x: tf.Tensor, axes: Any = None, keepdims: bool = False) -> tf.Tensor:
    """L2 norm of ``x`` (over ``axes``) in float32 (float64 for float64), over- and
    underflow-safe: only a suspect sum (``_suspect``) is recomputed scaled."""
    s = _sum_squares(x, axes, keepdims)
    count = tf.size(x) // tf.maximum(tf.size(s), 1)
    bad = _suspect(s, count)
    n = tf.sqrt(s)
    return tf.cond(tf.reduce_any(bad),
                   lambda: tf.where(bad, _scaled_norm(x, axes, keepdims), n),
                   lambda: n)


def norms(tensors: Any) -> tuple[list[tf.Tensor | None], tf.Tensor]:
    """``(per_tensor, total)``: the L2 norm of each tensor (None for None entries) and of all.

    One read of every tensor; per-tensor norms are float32 (float64 for float64 tensors), the
    total is float32 unless the list holds a float64 tensor (then float64). Over- and
    underflow-safe: a sum of squares beyond the accumulator's range, or below its normal range
    times the element count, is recomputed scaled (only then is a tensor
    read twice). An empty list (or only None) has total 0.
    """
    items, _ = _as_list(tensors, "tensors")
    vals = []
    for t in items:
        if t is not None:
            v = _values(t)
            _check_float(v, "tensors")
            vals.append(v)
    if not vals:
        return [None] * len(items), tf.zeros((), tf.float32)
    # total = sqrt(sum_i ss_i), as tf.linalg.global_norm, in the widest accumulator dtype
    sumsq = [_sum_squares(v) for v in vals]
    wide = tf.float64 if any(s.dtype == tf.float64 for s in sumsq) else tf.float32
    per = [tf.sqrt(s) for s in sumsq]
    total = tf.sqrt(tf.add_n([tf.cast(s, wide) for s in sumsq]))

    bad = [_suspect(ss, tf.size(v)) for ss, v in zip(sumsq, vals)]

    def fixed() -> tuple[list[tf.Tensor], tf.Tensor]:
        # a sum overflowed or underflowed: those tensors' norms scaled by their max (each in
        # its own branch, so the others are not read again), the total as
        # M * sqrt(sum_i (n_i / M)^2) with M = max_i n_i
        fixed_per = [tf.cond(b, lambda v=v: _scaled_norm(v), lambda n=n: n)
                     for b, n, v in zip(bad, per, vals)]
        stacked = tf.stack([tf.cast(n, wide) for n in fixed_per])
        m = tf.reduce_max(stacked)
        ok = tf.math.is_finite(m) & (m > 0)
        safe = tf.where(ok, m, tf.ones_like(m))
        scaled = safe * tf.sqrt(tf.reduce_sum(tf.square(stacked / safe)))
        tot = tf.where(ok, scaled, m)
        tot = tf.where(tf.reduce_any(tf.math.is_nan(stacked)), tf.constant(math.nan, wide), tot)
        return fixed_per, tot

    per, total = tf.cond(tf.math.is_inf(total) | tf.reduce_any(tf.stack(bad)), fixed,
                         lambda: (per, total))
    out: list[tf.Tensor | None] = []
    it = iter(per)
    for t in items:
        out.append(None if t is None else next(it))
    return out, total


def global_norm(tensors: Any) -> tf.Tensor:
    """``sqrt(sum_i ||t_i||^2)`` over a list of tensors (None entries ignored).

    Same value as ``tf.linalg.global_norm`` on finite float32 input; float32 accumulation for
    float16/bfloat16, mixed dtypes allowed, overflow-safe (see ``norms``). Returns a 0-d float32
    tensor (float64 when the list holds float64). NaN if any element is NaN, else inf if any
    element is Inf.
    """
    return norms(tensors)[1]


# -- clipping -------------------------------------------------------------------------------
def clip_by_value(tensors: Any, clip_value_min: Any = None, clip_value_max: Any = None, *,
                  clip_value: Any = None) -> Any:
    """Clamp every element into ``[clip_value_min, clip_value_max]`` (``tf.clip_by_value``).

    Either bound may be None (one-sided); ``clip_value=v`` is the symmetric ``[-v, v]``.
    Takes a list (returns a list, None entries kept) or one tensor (returns a tensor);
    ``IndexedSlices`` are clamped on their values. NaN elements stay NaN; +-Inf become the
    bounds (as TensorFlow does). Bounds are in the gradients' units.
    """
    if clip_value is not None:
        if clip_value_min is not None or clip_value_max is not None:
            raise ValueError("give clip_value, or clip_value_min/clip_value_max, not both")
        v = _threshold(clip_value, "clip_value")
        lo, hi = -v, v
    else:
        if clip_value_min is None and clip_value_max is None:
            raise ValueError("give clip_value, or at least one of clip_value_min and clip_value_max")
        lo = None if clip_value_min is None else _bound(clip_value_min, "clip_value_min")
        hi = None if clip_value_max is None else _bound(clip_value_max, "clip_value_max")
        if isinstance(lo, float) and isinstance(hi, float) and lo > hi:
            raise ValueError(f"clip_value_min ({lo}) must not exceed clip_value_max ({hi})")
    items, single = _as_list(tensors, "tensors")
    out = []
    for t in items:
        if t is None:
            out.append(None)
            continue
        x = _values(t)
        if hi is not None:
            x = tf.minimum(x, tf.cast(hi, x.dtype))
        if lo is not None:
            x = tf.maximum(x, tf.cast(lo, x.dtype))
        out.append(_rewrap(t, x))
    return out[0] if single else out


def _bound(value: Any, name: str) -> Any:
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return value
    return _core.number(value, name)


def _zero_nonfinite(x: tf.Tensor) -> tf.Tensor:
    return tf.where(tf.math.is_finite(x), x, tf.zeros_like(x))


def clip_by_norm(tensor: Any, clip_norm: Any, axes: Any = None, *,
                 on_nonfinite: str = "keep") -> Any:
    """Scale ``tensor`` so that its L2 norm (over ``axes``) is at most ``clip_norm``.

    ``t * clip_norm / max(||t||, clip_norm)``, ``tf.clip_by_norm``'s result on finite input
    (a tensor under the threshold comes back exactly as it was). The norm is taken in float32
    for float16/bfloat16 (TensorFlow squares in the tensor's dtype: float16 overflows at norm
    256). A list of tensors clips each one to its own norm (Keras ``clipnorm``).
    ``on_nonfinite`` for a tensor (slice, with ``axes``) whose norm is NaN or Inf: ``"keep"``
    leaves it as it is, ``"zero"`` zeroes its NaN/Inf elements and clips the rest,
    ``"propagate"`` gives TensorFlow's NaN.
    """
    _policy(on_nonfinite)
    c = _threshold(clip_norm, "clip_norm")
    items, single = _as_list(tensor, "tensor")
    out = []
    for t in items:
        if t is None:
            out.append(None)
            continue
        x = _values(t)
        _check_float(x, "tensor")
        if on_nonfinite == "zero":
            x = _zero_nonfinite(x)
        n = _norm(x, axes, keepdims=True)
        bad = ~tf.math.is_finite(n)
        coef = _per_tensor_coef(n, c, nonfinite=bad, propagate=on_nonfinite == "propagate")
        if on_nonfinite == "propagate":  # TensorFlow's result for a NaN/Inf norm: NaN
            coef = tf.where(bad, tf.constant(math.nan, coef.dtype), coef)
            out.append(_rewrap(t, _scale(x, coef)))
        else:
            # an unclipped tensor comes back as it was: x * 1 is not x where TensorFlow
            # flushes denormals to zero (on some of its threads; hypothesis found 1e-45 -> 0)
            out.append(_rewrap(t, tf.where(coef < 1, _scale(x, coef), x)))
    return out[0] if single else out


def _scale(x: tf.Tensor, coef: tf.Tensor) -> tf.Tensor:
    """``x * coef``; the product is taken in the wider of the two dtypes, then cast back, so a
    float16 tensor is scaled by the float32 coefficient without first rounding it."""
    if x.dtype in (tf.float16, tf.bfloat16):
        return tf.cast(tf.cast(x, coef.dtype) * coef, x.dtype)
    return x * tf.cast(coef, x.dtype)


def clip_by_global_norm(tensors: Any, clip_norm: Any, use_norm: Any = None, *,
                        on_nonfinite: str = "keep") -> tuple[list[Any], tf.Tensor]:
    """Scale every tensor by ``min(1, clip_norm / global_norm)``; returns ``(tensors, norm)``.

    ``tf.clip_by_global_norm``'s results on finite input; the norm (returned before clipping,
    float32 or float64, see ``global_norm``) is exact for float16 and mixed-dtype lists.
    ``use_norm`` gives the norm instead of computing it. When the norm is NaN or Inf,
    ``on_nonfinite`` decides: ``"keep"`` returns the tensors unscaled (check the returned norm
    with ``tf.math.is_finite`` and skip the update), ``"zero"`` sets NaN/Inf elements to 0 and
    clips by the norm of what is left (the returned norm is still the input's), ``"propagate"``
    makes every element NaN as TensorFlow does.
    """
    _policy(on_nonfinite)
    c = _threshold(clip_norm, "clip_norm")
    items, single = _as_list(tensors, "tensors")
    if single:
        raise TypeError("clip_by_global_norm: tensors must be a list of tensors, got a single tensor")
    norm = global_norm(items) if use_norm is None else tf.convert_to_tensor(use_norm)
    if on_nonfinite == "zero":
        cleaned = [None if t is None else _rewrap(t, _zero_nonfinite(_values(t))) for t in items]
        used = global_norm(cleaned) if use_norm is None else norm
        coef = _global_coef(used, c, nonfinite=None, propagate=False)
        items = cleaned
    else:
        bad = ~tf.math.is_finite(norm)
        coef = _global_coef(norm, c, nonfinite=bad, propagate=on_nonfinite == "propagate")
        if on_nonfinite == "propagate":  # TensorFlow's all-NaN, also for a NaN norm
            coef = tf.where(bad, tf.constant(math.nan, coef.dtype), coef)
    out = [None if t is None else _rewrap(t, _scale(_values(t), coef)) for t in items]
    return out, norm


def clip_by_agc(tensors: Any, params: Any, clipping: Any = 0.01, eps: Any = 1e-3, *,
                on_nonfinite: str = "keep") -> list[Any]:
    """Unit-wise adaptive gradient clipping (NFNets AGC, Brock et al. 2021): each unit's
    gradient ``G_i`` scaled to at most ``clipping * max(||W_i||, eps)``.

    ``tensors`` are the gradients, ``params`` the variables they belong to (same order and
    shapes). TensorFlow and Keras kernels are ``(..., in, out)``, so a unit is one slice of the
    **last** axis (the norm is taken over all other axes: a Dense kernel's column, a Conv2D
    kernel's output filter); 0-d and 1-d tensors are one unit each. (torch weights are
    ``(out, in, ...)``: ``gg.clip_grad_agc_`` takes rows, the same units.) The coefficients are
    ``gradguard.rules.agc.coefficient``'s, norms max-normalised in float32 (float64 for
    float64), so a unit whose squares overflow is still clipped. ``None`` gradients pass
    through; ``IndexedSlices`` are clipped on their values against the whole variable's unit
    norm. ``on_nonfinite``: where any gradient element is NaN or Inf, ``"keep"`` returns the
    gradients unscaled, ``"zero"`` sets NaN/Inf elements to 0 and clips the rest,
    ``"propagate"`` clips the finite units and leaves the rest as they are. Returns a list.
    """
    from .rules import agc

    _policy(on_nonfinite)
    cfg = agc.config(clipping, eps)
    items, single = _as_list(tensors, "tensors")
    if single:
        raise TypeError("clip_by_agc: tensors must be a list of gradients, got a single tensor")
    ps, _ = _as_list(params, "params")
    if len(ps) != len(items):
        raise ValueError(f"clip_by_agc: {len(items)} gradients for {len(ps)} params")
    if on_nonfinite == "zero":
        items = [None if t is None else _rewrap(t, _zero_nonfinite(_values(t))) for t in items]
    present = [(t, p) for t, p in zip(items, ps) if t is not None]
    units = agc_units(cfg, [t for t, _ in present], [p for _, p in present],
                      propagate=on_nonfinite != "keep")
    it = iter(units)
    out = []
    for t in items:
        if t is None:
            out.append(None)
            continue
        k, _ = next(it)
        out.append(_rewrap(t, _scale(_values(t), k)))
    return out


def agc_units(cfg: Any, grads: list[Any], params: list[Any], *, propagate: bool,
              nonfinite: Any = None) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """``[(coefficient, norm after clipping)]`` per (gradient, parameter) pair: the units'
    kept-dims coefficients (``rules.agc``; the unit is a slice of the last axis) and the 0-d
    L2 norm of the clipped tensor, max-normalised (``rules.agc.clipped_norm``: finite where
    the clipped norm is, also when a unit's squares overflow). ``nonfinite``: the step's flag
    (computed from the units' norms when None). Shared by ``clip_by_agc`` and the Keras
    wrapper's ``gg.AGC``."""
    from .rules import agc

    norms = []
    for g, p in zip(grads, params):
        x = tf.convert_to_tensor(_values(g))
        _check_float(x, "tensors")
        acc = _acc_dtype(x.dtype)
        w = tf.cast(tf.convert_to_tensor(p), acc)
        x = tf.cast(x, acc)
        rank = x.shape.rank or 0
        axis = tuple(range(rank - 1)) if rank > 1 else None
        norms.append((agc.unit_norm(x, axis, TF), agc.unit_norm(w, axis, TF)))
    if nonfinite is None and norms:
        nonfinite = tf.reduce_any(tf.stack([tf.reduce_any(~tf.math.is_finite(gn.root))
                                            for gn, _ in norms]))
    out = []
    for gn, wn in norms:
        k = agc.coefficient(cfg, gn, wn, TF, nonfinite=nonfinite, propagate=propagate)
        out.append((k, agc.clipped_norm(gn, k, TF)))
    return out


def _global_coef(norm: tf.Tensor, clip_norm: Any, *, nonfinite: Any, propagate: bool) -> tf.Tensor:
    """The shared rule's global coefficient with TensorFlow's formula (no epsilon)."""
    return norm_clip.coefficient(norm, tf.cast(clip_norm, norm.dtype), TF, nonfinite=nonfinite,
                                 propagate=propagate, eps=0.0)


def _per_tensor_coef(n: tf.Tensor, clip_norm: Any, *, nonfinite: Any, propagate: bool) -> tf.Tensor:
    """The shared rule's per-tensor coefficient ``c / max(n, c)`` (exactly 1 when unclipped)."""
    return norm_clip.per_tensor_coefficients(n, tf.cast(clip_norm, n.dtype), TF,
                                             nonfinite=nonfinite, propagate=propagate)
