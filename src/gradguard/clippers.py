"""Clippers: objects that turn gradient norms into a clip and apply it.

Every clipper follows one protocol, ``clipper(parameters) -> ClipStats``, and splits it into
the steps the Guard needs to do a training step in one read of the gradients:

1. norms are computed once (``gradguard.norms``) and shared by clipper, skip rule and monitor;
2. ``clip_(params, grads, norms)`` scales the gradients and returns ``ClipStats``;
   a *scalar* clipper (one global factor) also offers ``coefficient(norms)`` so the Guard can
   fold the factor into a fused optimizer's ``grad_scale`` instead of a separate pass;
3. ``observe(norms, accept)`` lets an adaptive clipper update its statistics, only with the
   steps that were accepted (never with a non-finite or skipped one).

The clip coefficient of norm clipping is computed in exactly one place, ``norm_clip_coef``.
A clipper never acts on non-finite gradients: when any gradient element is NaN or Inf it
leaves every gradient as it is and reports ``nonfinite``; what happens next is the Guard's
``on_nonfinite`` policy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _validate
from .kernels import multi_tensor_scale_
from .norms import GradNorms, collect_grads, compute_norms, total_from_per_tensor

#: Added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does.
EPS = 1e-6


def norm_clip_coef(total_norm: Tensor, max_norm: float | Tensor) -> Tensor:
    """The global clip coefficient: ``min(1, max_norm / (total_norm + 1e-6))``.

    Same formula as ``torch.nn.utils.clip_grad_norm_``; float32, on the norm's device. The
    coefficient is always multiplied in (1.0 when no clip is needed) so the decision never
    has to be read on the host.
    """
    return torch.clamp(max_norm / (total_norm + EPS), max=1.0)


@dataclass(frozen=True)
class ClipStats:
    """What one clip did, as device tensors (no host read is made to build it).

    total_norm       0-d float32, norm of all gradients before clipping
    clip_coef        0-d float32, ||g after|| / ||g before|| (1.0 when nothing was clipped;
                     for norm clipping this is the factor every gradient was multiplied by)
    clipped          0-d bool, some gradient was changed
    nonfinite        0-d bool, some gradient element is NaN or Inf (gradients left as they are)
    per_tensor_norms 1-d float32, per-tensor norms before clipping, in parameter order
    threshold        0-d float32 max norm in force for this step (norm clippers), else None
    skipped          0-d bool, the Guard refused this update (None outside a Guard)
    per_tensor_max_abs  1-d float32, max |g| per tensor before clipping, when the Guard's
                     monitor asked for it on this step (its layer steps), else None
    """

    total_norm: Tensor
    clip_coef: Tensor
    clipped: Tensor
    nonfinite: Tensor
    per_tensor_norms: Tensor
    threshold: Tensor | None = None
    skipped: Tensor | None = None
    per_tensor_max_abs: Tensor | None = None

    @property
    def total_norm_after(self) -> Tensor:
        """Norm of all gradients after clipping (``total_norm * clip_coef``)."""
        return self.total_norm * self.clip_coef


def _ratio(after: Tensor, before: Tensor) -> Tensor:
    return torch.where(before > 0, after / torch.where(before > 0, before, 1.0), 1.0)


class Clipper:
    """Base class of the clippers; see the module docstring for the protocol."""

    #: the p of the norms this clipper reads
    norm_type: float = 2.0
    #: True when the clip is one global factor (foldable into a fused optimizer step)
    scalar: bool = False

    def coefficient(self, norms: GradNorms) -> Tensor:
        """0-d float32 factor in [0, 1] for scalar clippers; pure (no state change)."""
        raise NotImplementedError(f"{type(self).__name__} is not a scalar clipper")

    def threshold(self, like: Tensor) -> Tensor | None:
        """0-d float32 max norm in force for the next step (on ``like``'s device), or None."""
        return None

    def clip_(self, params: list[Tensor], grads: list[Tensor], norms: GradNorms,
              *, apply: bool = True, propagate_nonfinite: bool = False) -> ClipStats:
        """Clip ``grads`` in place (unless ``apply`` is False) and describe what was done.

        With ``propagate_nonfinite`` the coefficient is used even when the norm is not
        finite (torch's behaviour: gradients become NaN or 0); otherwise such gradients are
        left untouched.
        """
        if not self.scalar:
            raise NotImplementedError
        nonfinite = norms.nonfinite
        coef = self.coefficient(norms)
        if not propagate_nonfinite:
            coef = torch.where(nonfinite, 1.0, coef)
        if apply and grads:
            multi_tensor_scale_(grads, coef)  # no host read on CUDA; skips coef == 1 on CPU
        return ClipStats(norms.total, coef, coef < 1.0, nonfinite, norms.per_tensor,
                         self.threshold(norms.total))

    def observe(self, norms: GradNorms, accept: Tensor) -> None:
        """Update adaptive statistics with this step's norms when ``accept`` (0-d bool)."""

    def __call__(self, parameters: Tensor | Iterable[Tensor]) -> ClipStats:
        params, grads = collect_grads(parameters)
        norms = compute_norms(grads, self.norm_type)
        stats = self.clip_(params, grads, norms)
        self.observe(norms, ~stats.nonfinite)
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class NormClip(Clipper):
    """Clip by norm: the global norm (torch ``clip_grad_norm_``) or, with ``per_tensor``,
    each tensor to its own norm (``tf.clip_by_norm``, Keras ``clipnorm``).

    Global:      g <- g * min(1, max_norm / (||g||_p + 1e-6))
    Per tensor:  g_i <- g_i * max_norm / max(||g_i||_p, max_norm)
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0, per_tensor: bool = False):
        self.max_norm = _validate.nonneg_finite(max_norm, "max_norm", allow_inf=True)
        self.norm_type = _validate.norm_type(norm_type)
        self.per_tensor = _validate.flag(per_tensor, "per_tensor")
        self.scalar = not self.per_tensor

    def __repr__(self) -> str:
        return f"NormClip(max_norm={self.max_norm}, norm_type={self.norm_type}, per_tensor={self.per_tensor})"

    def threshold(self, like: Tensor) -> Tensor:
        return torch.full_like(like, self.max_norm, dtype=torch.float32)

    def coefficient(self, norms: GradNorms) -> Tensor:
        if self.per_tensor:
            raise NotImplementedError("per-tensor clipping has one factor per tensor")
        return norm_clip_coef(norms.total, self.max_norm)

    def clip_(self, params, grads, norms, *, apply=True, propagate_nonfinite=False):
        if not self.per_tensor:
            return super().clip_(params, grads, norms, apply=apply,
                                 propagate_nonfinite=propagate_nonfinite)
        per = norms.per_tensor
        nonfinite = norms.nonfinite
        # max_norm / max(n_i, max_norm), written so that an unclipped tensor gets exactly 1.0
        coefs = torch.where(per > self.max_norm, self.max_norm / torch.clamp(per, min=1e-30),
                            torch.ones_like(per))
        if not propagate_nonfinite:
            coefs = torch.where(nonfinite, torch.ones_like(coefs), coefs)
        if apply and grads:
            torch._foreach_mul_(grads, list(coefs.unbind()))
        after = total_from_per_tensor(per * coefs, self.norm_type)
        coef = _ratio(after, norms.total)
        clipped = (coefs < 1.0).any() if grads else torch.zeros((), dtype=torch.bool)
        return ClipStats(norms.total, coef, clipped, nonfinite, per, self.threshold(norms.total))


class ValueClip(Clipper):
    """Clip every gradient element into ``[-clip_value, clip_value]`` or ``[min_value, max_value]``.

    The asymmetric form is the seed article's min/max thresholds; either bound may be left
    out. NaN elements stay NaN. ``ClipStats.clip_coef`` is the ratio of the total norm after
    clipping to before (this costs one extra read of the gradients).
    """

    def __init__(self, clip_value: float | None = None, *, min_value: float | None = None,
                 max_value: float | None = None):
        self.min_value, self.max_value = _value_bounds(clip_value, min_value, max_value)

    def __repr__(self) -> str:
        return f"ValueClip(min_value={self.min_value}, max_value={self.max_value})"

    def clip_(self, params, grads, norms, *, apply=True, propagate_nonfinite=False):
        nonfinite = norms.nonfinite
        if not apply or not grads:
            one = torch.ones((), dtype=torch.float32, device=norms.total.device)
            return ClipStats(norms.total, one, one < 0, nonfinite, norms.per_tensor)
        _clamp_(grads, self.min_value, self.max_value)
        after = compute_norms(grads, norms.norm_type)
        coef = _ratio(after.total, norms.total)
        clipped = (after.per_tensor != norms.per_tensor).any()
        return ClipStats(norms.total, coef, clipped, nonfinite, norms.per_tensor)


class AGC(Clipper):
    """Adaptive gradient clipping, unit-wise (Brock et al. 2021, NFNets).

    For each unit i of a weight W (a row: dims 1..n of a PyTorch (out, in, ...) weight; the
    whole tensor for 0-d and 1-d parameters):

        G_i <- G_i * (clipping * max(||W_i||, eps) / max(||G_i||, 1e-6))
               where ||G_i|| > clipping * max(||W_i||, eps), else unchanged.

    ``clipping`` is the paper's lambda (0.01 default, as in the paper for large batches).
    Flax/JAX kernels are (in, out): their unit axis differs, see the JAX adapter.
    """

    norm_type = 2.0

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3):
        self.clipping = _validate.nonneg_finite(clipping, "clipping", positive=True)
        self.eps = _validate.nonneg_finite(eps, "eps")

    def __repr__(self) -> str:
        return f"AGC(clipping={self.clipping}, eps={self.eps})"

    def clip_(self, params, grads, norms, *, apply=True, propagate_nonfinite=False):
        if len(params) != len(grads):
            raise ValueError("AGC needs the parameters, not only their gradients")
        nonfinite = norms.nonfinite
        after_per = []
        any_clipped = []
        for p, g in zip(params, grads):
            dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
            acc = torch.float64 if g.dtype == torch.float64 else torch.float32
            keep = dims is not None
            g_norm = torch.linalg.vector_norm(g, 2, dim=dims, keepdim=keep, dtype=acc)
            w_norm = torch.linalg.vector_norm(p.detach(), 2, dim=dims, keepdim=keep, dtype=acc)
            max_norm = self.clipping * torch.clamp(w_norm, min=self.eps)
            clip = (g_norm > max_norm) & torch.isfinite(g_norm)
            if not propagate_nonfinite:
                clip = clip & ~nonfinite
            coef = torch.where(clip, max_norm / torch.clamp(g_norm, min=EPS), torch.ones_like(g_norm))
            if apply:
                g.mul_(coef.to(g.dtype))
            after_per.append(torch.linalg.vector_norm(g_norm * coef).float())
            any_clipped.append((coef < 1).any())
        dev = norms.total.device
        if not grads:
            one = torch.ones((), dtype=torch.float32, device=dev)
            return ClipStats(norms.total, one, one < 0, nonfinite, norms.per_tensor)
        after = total_from_per_tensor(torch.stack(after_per), 2.0)
        coef = _ratio(after, norms.total)
        return ClipStats(norms.total, coef, torch.stack(any_clipped).any(), nonfinite, norms.per_tensor)


def _value_bounds(clip_value, min_value, max_value) -> tuple[float | None, float | None]:
    if clip_value is not None:
        if min_value is not None or max_value is not None:
            raise ValueError("give either clip_value or min_value/max_value, not both")
        v = _validate.nonneg_finite(clip_value, "clip_value")
        return -v, v
    if min_value is None and max_value is None:
        raise ValueError("give clip_value, or at least one of min_value and max_value")
    lo = None if min_value is None else _finite(min_value, "min_value")
    hi = None if max_value is None else _finite(max_value, "max_value")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"min_value ({lo}) must not exceed max_value ({hi})")
    return lo, hi


def _finite(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def _clamp_(grads: list[Tensor], lo: float | None, hi: float | None) -> None:
    if lo is not None:
        torch._foreach_clamp_min_(grads, lo)
    if hi is not None:
        torch._foreach_clamp_max_(grads, hi)
