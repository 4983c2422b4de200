"""Clippers: torch objects that turn gradient norms into a clip and apply it.

Every clipper follows one protocol (``gradguard.protocols.Clipper``), ``clipper(parameters)
-> ClipStats``, split into the steps the Guard needs to do a training step in one read of
the gradients:

1. norms are computed once (``gradguard.norms``) and shared by clipper, skip rule and monitor;
2. ``clip_(params, grads, norms)`` scales the gradients and returns ``ClipStats``;
   a *scalar* clipper (one global factor) also offers ``coefficient(norms)``, the same factor
   ``clip_`` would apply, so the Guard can fold it into a fused optimizer's ``grad_scale``;
3. ``observe(norms, accept)`` lets an adaptive clipper update its statistics, only with the
   steps that were accepted (never with a non-finite or skipped one).

The math lives in ``gradguard.rules`` (one implementation for every framework); the classes
here hold the state on the gradients' device and apply the decision. Every scalar clipper,
fixed or adaptive, applies through one path, ``ScalarClipper.clip_``: a threshold
(``step_threshold``), the coefficient from ``rules.norm_clip.coefficient`` (the one place it
is computed) and ``kernels.multi_tensor_scale_`` (Triton on CUDA, threaded numpy on the CPU,
no pass at all when the coefficient is 1).

A clipper never acts on non-finite gradients: when any gradient element is NaN or Inf it
leaves every gradient as it is and reports ``nonfinite``; what happens next is the Guard's
``on_nonfinite`` policy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _validate
from .kernels import multi_tensor_scale_
from .norms import GradNorms, collect_grads, compute_norms, total_from_per_tensor
from .rules import agc as _agc
from .rules import norm_clip as _norm_clip
from .rules import value_clip as _value_clip
from .rules.xp_torch import TORCH

__all__ = ["AGC", "ClipStats", "Clipper", "NormClip", "PerTensorNormClip", "ScalarClipper",
           "ValueClip", "norm_clip_coef"]

#: Added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does.
EPS = _norm_clip.EPS


def norm_clip_coef(total_norm: Tensor, max_norm: float | Tensor) -> Tensor:
    """``min(1, max_norm / (total_norm + 1e-6))`` (torch's formula; ``rules.norm_clip``)."""
    return _norm_clip.coefficient(total_norm, max_norm, TORCH)


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
    norm_after       0-d, the norm after clipping where the clipper computed it itself (AGC:
                     finite even when ``total_norm`` overflowed its dtype), else None
    """

    total_norm: Tensor
    clip_coef: Tensor
    clipped: Tensor
    nonfinite: Tensor
    per_tensor_norms: Tensor
    threshold: Tensor | None = None
    skipped: Tensor | None = None
    per_tensor_max_abs: Tensor | None = None
    norm_after: Tensor | None = None

    @property
    def total_norm_after(self) -> Tensor:
        """Norm of all gradients after clipping: ``norm_after`` where set, else
        ``total_norm * clip_coef``."""
        if self.norm_after is not None:
            return self.norm_after
        return self.total_norm * self.clip_coef


def _ratio(after: Tensor, before: Tensor) -> Tensor:
    return torch.where(before > 0, after / torch.where(before > 0, before, 1.0), 1.0)


def _unclipped(norms: GradNorms) -> ClipStats:
    one = torch.ones((), dtype=torch.float32, device=norms.total.device)
    return ClipStats(norms.total, one, one < 0, norms.nonfinite, norms.per_tensor)


class Clipper:
    """Base class of the clippers; see the module docstring for the protocol.

    A subclass implements ``clip_`` (and, when it learns, ``observe``, ``state_dict`` and
    ``load_state_dict``); a global-norm clipper subclasses ``ScalarClipper`` instead and only
    says which threshold is in force (``step_threshold``).
    """

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
        raise NotImplementedError(f"{type(self).__name__} must implement clip_")

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


class ScalarClipper(Clipper):
    """A global-norm clipper: ``g <- coef * g`` with ``coef = min(1, thr / (||g|| + 1e-6))``.

    Subclasses give ``step_threshold(total)``, the threshold (0-d float32 device tensor) for
    a step whose norm is ``total``, computed from the committed state alone (pure).
    ``strict`` (the adaptive clippers): a norm at or below the threshold gets exactly 1.0.
    """

    scalar = True
    norm_type = 2.0
    strict = False

    def step_threshold(self, total: Tensor) -> Tensor:
        raise NotImplementedError

    def _coef(self, total: Tensor, thr: Tensor, nonfinite: Tensor, propagate: bool) -> Tensor:
        return _norm_clip.coefficient(total, thr, TORCH, nonfinite=nonfinite,
                                      propagate=propagate, strict=self.strict)

    def coefficient(self, norms: GradNorms) -> Tensor:
        """The factor ``clip_`` applies (non-finite norm: 1.0); pure."""
        total = norms.total.detach()
        return self._coef(total, self.step_threshold(total), norms.nonfinite, False)

    def clip_(self, params, grads, norms, *, apply=True, propagate_nonfinite=False):
        total = norms.total.detach()
        nonfinite = norms.nonfinite
        thr = self.step_threshold(total)
        coef = self._coef(total, thr, nonfinite, propagate_nonfinite)
        if apply and grads:
            # no host read on CUDA; skips coef == 1 on CPU; the norm pass's grouping reused
            multi_tensor_scale_(grads, coef, groups=norms.groups)
        return ClipStats(norms.total, coef, coef < 1.0, nonfinite, norms.per_tensor, thr)


class NormClip(ScalarClipper):
    """Clip by the global norm (torch ``clip_grad_norm_``):

        g <- g * min(1, max_norm / (||g||_p + 1e-6))

    ``max_norm`` is a number in [0, inf] (numpy scalars too; a finite value beyond float32's
    range is refused, use ``math.inf``). ``per_tensor=True`` returns a
    :class:`PerTensorNormClip` (each tensor to its own norm), kept for compatibility.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        per_tensor = kwargs.get("per_tensor", args[2] if len(args) > 2 else False)
        if cls is NormClip and _validate.flag(per_tensor, "per_tensor"):
            kwargs.pop("per_tensor", None)
            return PerTensorNormClip(*args[:2], **kwargs)
        return super().__new__(cls)

    def __init__(self, max_norm: float, norm_type: float = 2.0, per_tensor: bool = False):
        self.cfg = _norm_clip.config(max_norm)
        self.max_norm = self.cfg.max_norm
        self.norm_type = _validate.norm_type(norm_type)
        self.per_tensor = False

    def __repr__(self) -> str:
        return f"NormClip(max_norm={self.max_norm}, norm_type={self.norm_type})"

    def step_threshold(self, total: Tensor) -> Tensor:
        return _norm_clip.threshold(self.cfg, TORCH, total)

    def threshold(self, like: Tensor) -> Tensor:
        return _norm_clip.threshold(self.cfg, TORCH, like)


class PerTensorNormClip(Clipper):
    """Clip each tensor to its own norm (``tf.clip_by_norm`` per variable, Keras ``clipnorm``):

        g_i <- g_i * max_norm / max(||g_i||_p, max_norm)

    ``ClipStats.clip_coef`` is the ratio of the total norm after clipping to before.
    """

    per_tensor = True
    scalar = False

    def __init__(self, max_norm: float, norm_type: float = 2.0):
        self.cfg = _norm_clip.config(max_norm)
        self.max_norm = self.cfg.max_norm
        self.norm_type = _validate.norm_type(norm_type)

    def __repr__(self) -> str:
        return f"PerTensorNormClip(max_norm={self.max_norm}, norm_type={self.norm_type})"

    def threshold(self, like: Tensor) -> Tensor:
        return _norm_clip.threshold(self.cfg, TORCH, like)

    def clip_(self, params, grads, norms, *, apply=True, propagate_nonfinite=False):
        per = norms.per_tensor
        nonfinite = norms.nonfinite
        thr = self.threshold(norms.total)
        coefs = _norm_clip.per_tensor_coefficients(per, thr, TORCH, nonfinite=nonfinite,
                                                   propagate=propagate_nonfinite)
        if apply and grads:
            torch._foreach_mul_(grads, list(coefs.unbind()))
        after = total_from_per_tensor(per * coefs, self.norm_type)
        coef = _ratio(after, norms.total)
        clipped = (coefs < 1.0).any() if grads else torch.zeros((), dtype=torch.bool)
        return ClipStats(norms.total, coef, clipped, nonfinite, per, thr)


class ValueClip(Clipper):
    """Clip every gradient element into ``[-clip_value, clip_value]`` or ``[min_value, max_value]``
    (``rules.value_clip``).

    The asymmetric form is the seed article's min/max thresholds; either bound may be left
    out. NaN elements stay NaN. ``ClipStats.clip_coef`` is the ratio of the total norm after
    clipping to before (this costs one extra read of the gradients).
    """

    def __init__(self, clip_value: float | None = None, *, min_value: float | None = None,
                 max_value: float | None = None):
        self.cfg = _value_clip.config(clip_value, min_value=min_value, max_value=max_value)
        self.min_value, self.max_value = self.cfg

    def __repr__(self) -> str:
        return f"ValueClip(min_value={self.min_value}, max_value={self.max_value})"

    def clip_(self, params, grads, norms, *, apply=True, propagate_nonfinite=False):
        if not apply or not grads:
            return _unclipped(norms)
        _clamp_(grads, self.min_value, self.max_value)
        after = compute_norms(grads, norms.norm_type)
        coef = _ratio(after.total, norms.total)
        clipped = (after.per_tensor != norms.per_tensor).any()
        return ClipStats(norms.total, coef, clipped, norms.nonfinite, norms.per_tensor)


class AGC(Clipper):
    """Adaptive gradient clipping, unit-wise (Brock et al. 2021, NFNets; ``rules.agc``).

    For each unit i of a weight W (a row: dims 1..n of a PyTorch (out, in, ...) weight; the
    whole tensor for 0-d and 1-d parameters):

        G_i <- G_i * (clipping * max(||W_i||, eps) / max(||G_i||, 1e-6))
               where ||G_i|| > clipping * max(||W_i||, eps), else unchanged.

    Unit norms are max-normalised, so rows whose squares overflow (float32 gradients of
    1e20, float64 ones of 1e160, weights of 1e20) are still clipped correctly. ``clipping``
    is the paper's lambda (0.01 default, as in the paper for large batches). Flax/JAX
    kernels are (in, out): their unit axis differs, see the JAX adapter.
    """

    norm_type = 2.0

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3):
        self.cfg = _agc.config(clipping, eps)
        self.clipping, self.eps = self.cfg

    def __repr__(self) -> str:
        return f"AGC(clipping={self.clipping}, eps={self.eps})"

    def clip_(self, params, grads, norms, *, apply=True, propagate_nonfinite=False):
        if len(params) != len(grads):
            raise ValueError("AGC needs the parameters, not only their gradients")
        if not grads:
            return _unclipped(norms)
        unit = []
        for p, g in zip(params, grads):
            axis = tuple(range(1, g.dim())) if g.dim() > 1 else None
            acc = torch.float64 if g.dtype == torch.float64 else torch.float32
            unit.append((_agc.unit_norm(g.detach().to(acc), axis, TORCH),
                         _agc.unit_norm(p.detach().to(acc), axis, TORCH)))
        # some element NaN/Inf: a max-normalised root is then not finite (it is <= sqrt(n)
        # otherwise), so an overflowing norm is not mistaken for a non-finite gradient
        nonfinite = torch.stack([~torch.isfinite(g_n.root).all() for g_n, _ in unit]).any()
        after_per = []
        any_clipped = []
        for g, (g_n, w_n) in zip(grads, unit):
            coef = _agc.coefficient(self.cfg, g_n, w_n, TORCH, nonfinite=nonfinite,
                                    propagate=propagate_nonfinite)
            if apply:
                g.mul_(coef.to(g.dtype))
            # the tensor's norm after clipping, max-normalised (its units' squares may overflow)
            after_per.append(_agc.clipped_norm(g_n, coef, TORCH))
            any_clipped.append((coef < 1).any())
        # in the total norm's dtype (float64 where a gradient is): a float64 norm of 1e159
        # is not squeezed into float32
        after = total_from_per_tensor(torch.stack([a.to(norms.total.dtype) for a in after_per]),
                                      2.0)
        coef = _ratio(after, norms.total)
        return ClipStats(norms.total, coef, torch.stack(any_clipped).any(), nonfinite,
                         norms.per_tensor, norm_after=after)


def _clamp_(grads: list[Tensor], lo: float | None, hi: float | None) -> None:
    """``rules.value_clip.clip`` over many tensors at once (torch's multi-tensor clamp)."""
    if lo is not None:
        torch._foreach_clamp_min_(grads, lo)
    if hi is not None:
        torch._foreach_clamp_max_(grads, hi)

