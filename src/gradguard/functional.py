"""torch-style in-place clipping functions.

On finite gradients these give the results of ``torch.nn.utils.clip_grad_norm_`` and
``clip_grad_value_``; they differ where torch is wrong:

* norms accumulate in float32 or wider (float16 gradients with a norm above 65504 get a
  finite, correct norm and a correct clip; torch returns inf and zeroes every gradient;
  float64 gradients get a float64 norm, as in torch), and p-norms other than 2 are
  max-normalised (torch's overflow at ``|g|**p`` beyond float32's range does not happen);
* a non-finite total norm leaves the gradients untouched (torch multiplies them by
  ``max_norm / inf = 0`` or by NaN); the returned norm is NaN/Inf so the caller can see it,
  and ``error_if_nonfinite=True`` raises as in torch.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from .clippers import AGC, NormClip, ValueClip, _clamp_
from .norms import GradNorms, collect_grads, compute_norms
from .norms import grad_norm as grad_norm  # re-exported: part of the functional API

__all__ = [
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_agc_",
    "grad_norm",
]

Params = Tensor | Iterable[Tensor]


def _check_finite(norms: GradNorms) -> None:
    # A host read: only on request, as in torch.
    if bool(norms.nonfinite):
        raise RuntimeError(
            f"The total norm of order {norms.norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the "
            "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )


def _warn_if_exhausted(parameters: Params) -> Params:
    """``parameters`` as a list when it is a generator, warning as torch's clip_grad_norm_
    does when that generator is empty (often one already consumed, e.g. by an earlier
    clip of ``model.parameters()``)."""
    if not isinstance(parameters, types.GeneratorType):
        return parameters
    params = list(parameters)
    if not params:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.",
                      UserWarning, stacklevel=3)
    return params


def clip_grad_norm_(parameters: Params, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None, *,
                    process_group: Any = None, pp_group: Any = None) -> Tensor:
    """Scale all gradients together so their joint p-norm is at most ``max_norm``.

    ``g <- g * min(1, max_norm / (||g||_p + 1e-6))``; returns ``||g||_p`` before clipping as
    a 0-d tensor on the gradients' device: float32, float64 when a gradient is float64 (as
    torch). An empty generator warns as in torch. ``foreach`` is accepted for torch
    compatibility; the multi-tensor path is always used. DTensor gradients (FSDP2, TP) are
    clipped by their global norm; ``process_group`` (plain tensors under DDP-style groups) and
    ``pp_group`` (the pipeline stages' norms added) as in ``gradguard.norms.compute_norms``.
    """
    clipper = NormClip(max_norm, norm_type)
    params, grads = collect_grads(_warn_if_exhausted(parameters))
    norms = compute_norms(grads, clipper.norm_type, process_group=process_group,
                          pp_group=pp_group)
    if error_if_nonfinite and grads:
        _check_finite(norms)
    clipper.clip_(params, grads, norms)
    return norms.total


def clip_grad_value_(parameters: Params, clip_value: float | None = None, *,
                     min_value: float | None = None, max_value: float | None = None,
                     foreach: bool | None = None) -> None:
    """Clamp every gradient element into ``[-clip_value, clip_value]`` or
    ``[min_value, max_value]`` (either bound may be omitted). Same results as
    ``torch.nn.utils.clip_grad_value_`` for the symmetric form."""
    lo_hi = ValueClip(clip_value, min_value=min_value, max_value=max_value)
    _, grads = collect_grads(parameters)
    if grads:
        _clamp_(grads, lo_hi.min_value, lo_hi.max_value)


def clip_grad_norm_per_tensor_(parameters: Params, max_norm: float,
                               norm_type: float = 2.0) -> Tensor:
    """Scale each gradient tensor on its own: ``g_i <- g_i * max_norm / max(||g_i||_p, max_norm)``.

    The semantics of ``tf.clip_by_norm`` applied per variable and of Keras ``clipnorm``.
    Returns the per-tensor norms before clipping (1-d float32).
    """
    clipper = NormClip(max_norm, norm_type, per_tensor=True)
    params, grads = collect_grads(parameters)
    norms = compute_norms(grads, clipper.norm_type)
    clipper.clip_(params, grads, norms)
    return norms.per_tensor


def clip_grad_agc_(parameters: Params, clipping: float = 0.01, eps: float = 1e-3) -> None:
    """Unit-wise adaptive gradient clipping (NFNets); see :class:`gradguard.AGC`."""
    clipper = AGC(clipping, eps)
    params, grads = collect_grads(parameters)
    norms = compute_norms(grads, 2.0)
    clipper.clip_(params, grads, norms)
