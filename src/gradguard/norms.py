"""Multi-tensor gradient norms: per tensor and total, from one read of the gradients.

Every norm here is a float32 tensor on the gradients' device, float64 when a gradient is
float64 (as torch): float16/bfloat16 gradients are accumulated in float32, so a float16
gradient whose true norm is 1e6 has the finite norm 1e6 here (torch and optax return inf),
and float64 ones in float64. p-norms other than 1, 2 and inf are max-normalised per tensor
(``||g||_p = m ||g/m||_p``, m = max |g|), so ``|x|**p`` neither overflows nor underflows.
The total norm is formed from the per-tensor norms with a max-rescaling, so it does not
overflow when the per-tensor norms are finite:

    ||g||_p = m * || (n_1/m, ..., n_k/m) ||_p,   n_i = ||g_i||_p,   m = max_i n_i

For p = inf, ``n_i = max |g_i|`` and the total is ``max_i n_i``.

The norms come from ``gradguard.kernels`` (``Groups`` + ``group_norms``, the one dispatcher:
the CPU kernel for p = 2, Triton on CUDA for p in {1, 2, inf}, ``torch._foreach_norm``
otherwise and while ``torch.compile`` traces; same results, more accurate than torch's). This
module forms the total, reduces across ranks (``gradguard.distributed``) and checks inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _validate, kernels
from .kernels import _torch as _torch_kernels


@dataclass(frozen=True)
class GradNorms:
    """Norms of a set of gradients, all float32 device tensors (float64 when a gradient is
    float64).

    ``total``: 0-d, the p-norm of all gradients taken together (what ``clip_grad_norm_``
    returns). ``per_tensor``: 1-d, one p-norm per gradient, in parameter order (parameters
    whose ``grad`` is None are left out). ``norm_type``: p. ``max_abs``: 1-d, ``max |g_i|``
    per gradient (NaN when it holds a NaN, 0 when empty), only when asked for
    (``compute_norms(..., with_max_abs=True)``), else None.

    In a distributed run (DTensor gradients, ``process_group`` or ``pp_group``; see
    ``gradguard.distributed``) every field is global, identical on every rank:
    ``reduced_nonfinite`` is the job-wide non-finite flag (a NaN on any rank or shard) and
    ``loss`` the mean of the losses handed to ``compute_norms``, reduced in the same
    collective as the norms; both None in a single process.
    """

    total: Tensor
    per_tensor: Tensor
    norm_type: float
    max_abs: Tensor | None = None
    reduced_nonfinite: Tensor | None = None
    loss: Tensor | None = None
    #: ``gradguard.distributed.DistPlan`` of a distributed call (the groups the norms were
    #: reduced over, for rules that reduce more, e.g. the default clipper's cosine), else None
    plan: Any = None
    #: ``gradguard.kernels.Groups`` of the gradients the norms were read from (the scale of
    #: the same list reuses it), None for a distributed call
    groups: Any = None

    @property
    def nonfinite(self) -> Tensor:
        """0-d bool tensor: True when some gradient element is NaN or Inf (on any rank)."""
        # (not a cached_property: torch.compile(fullgraph=True) cannot trace one)
        if self.reduced_nonfinite is not None:
            return self.reduced_nonfinite
        return ~torch.isfinite(self.total)


def collect_grads(parameters: Tensor | Iterable[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Return ``(params, grads)`` for the parameters that have a gradient, checked."""
    params = [p for p in _validate.as_param_list(parameters) if p.grad is not None]
    grads = [p.grad for p in params]
    if grads and not _validate.grads_ok(grads):
        _validate.check_grads(grads)  # names what is wrong
    return params, grads


# The torch fallback (``kernels._torch``) and the CPU max |g| under their old names here
# (``monitor.layer_stats`` and tests import them)
_foreach_norms = _torch_kernels.foreach_norms
_max_abs = kernels.max_abs


def per_tensor_norms(grads: list[Tensor], norm_type: float = 2.0) -> Tensor:
    """One float32 p-norm per gradient tensor, in order; see the module docstring.

    Paths, chosen per call: on the CPU, p = 2, float16/bfloat16/float32/float64: packed
    small tensors and chunked BLAS dot products with float64 sums (``kernels.cpu``); on CUDA with Triton
    importable, p in {1, 2, inf}, float16/bfloat16/float32: one persistent multi-tensor Triton
    kernel (``gradguard.kernels``); otherwise ``torch._foreach_norm`` with float32
    accumulation.
    """
    if _any_dtensor(grads):
        return compute_norms(grads, norm_type).per_tensor  # the global norms
    return kernels.group_norms(kernels.Groups(grads), norm_type)[0]


def _any_dtensor(grads: list[Tensor]) -> bool:
    # DTensor is a Tensor subclass: a type check, no import of torch.distributed needed
    return any(t is not Tensor and t.__name__ == "DTensor" for t in {type(g) for g in grads})


def total_from_per_tensor(per_tensor: Tensor, norm_type: float = 2.0) -> Tensor:
    """The p-norm of the concatenation, from the per-tensor p-norms, without overflow."""
    if per_tensor.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=per_tensor.device)
    if math.isinf(norm_type):
        return per_tensor.max()
    m = per_tensor.max()
    scale = torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m))
    if norm_type in _torch_kernels.PLAIN_P or per_tensor.device.type == "mps":
        return torch.linalg.vector_norm(per_tensor / scale, norm_type) * scale
    # other p: (n_i/m)**p summed and raised to 1/p in float64 (for p < 1 the sum exceeds 1)
    wide = torch.linalg.vector_norm(per_tensor.double() / scale.double(), norm_type)
    return (wide * scale.double()).to(per_tensor.dtype)


_NO_LOSS: Any = object()  # compute_norms(loss=...) not given (gradguard.distributed.NO_LOSS)


def compute_norms(grads: list[Tensor], norm_type: float = 2.0, *,
                  with_max_abs: bool = False, process_group: Any = None,
                  pp_group: Any = None, loss: Any = _NO_LOSS) -> GradNorms:
    """Per-tensor and total norms of ``grads`` from one read of each gradient.

    On CUDA, when every gradient has one dtype and the Triton kernels apply, both come from
    the same two launches (the total reduced in float64 from the kernel's partial sums).
    ``with_max_abs``: also ``max |g_i|`` per tensor (``GradNorms.max_abs``); on the CPU in the
    same pass over memory, elsewhere one more multi-tensor launch. The norms do not depend on
    it.

    Distributed (``gradguard.distributed``): DTensor gradients (FSDP2, TP) are read through
    their local shards, every path above applies to those, and the partials are reduced
    over the gradients' meshes; ``process_group``: the data-parallel group over which plain
    gradients are replicated (DDP: the flag and ``loss`` are reduced over it);
    ``pp_group``: the pipeline group (ProcessGroup or 1-D DeviceMesh) whose stages' totals
    add up. ``loss``: this rank's loss (None: it has none, e.g. a pipeline stage before the
    last), reduced in the same collective, see ``GradNorms.loss``; not given: no loss.
    """
    if process_group is not None or pp_group is not None or _any_dtensor(grads):
        from . import distributed
        plan = distributed.plan(grads, process_group=process_group, pp_group=pp_group)
        if plan is not None:
            local = compute_norms(plan.localize(grads), norm_type, with_max_abs=with_max_abs)
            red = distributed.reduce_partials(
                local.per_tensor, norm_type, plan, local_max_abs=local.max_abs,
                loss=distributed.NO_LOSS if loss is _NO_LOSS else loss)
            return GradNorms(total=red.total, per_tensor=red.per_tensor, norm_type=norm_type,
                             max_abs=red.max_abs, reduced_nonfinite=red.nonfinite,
                             loss=red.loss, plan=plan)
    groups = kernels.Groups(grads)
    per, total, mx = kernels.group_norms(groups, norm_type, with_max_abs=with_max_abs)
    if total is None:
        if grads:
            per = per.to(grads[0].device)
            mx = None if mx is None else mx.to(grads[0].device)
        total = total_from_per_tensor(per, norm_type)
    return GradNorms(total=total, per_tensor=per, norm_type=norm_type, max_abs=mx,
                     groups=groups)


def grad_norm(parameters: Tensor | Iterable[Tensor], norm_type: float = 2.0, *,
              process_group: Any = None, pp_group: Any = None) -> GradNorms:
    """Read-only gradient norms: ``.total`` and ``.per_tensor`` (float32), nothing mutated.

    Use this to log the norm instead of ``clip_grad_norm_(..., max_norm=inf)``, which
    multiplies every gradient and can turn an Inf into NaN. DTensor gradients (FSDP2, TP)
    give the global norms; ``process_group`` / ``pp_group``: see ``compute_norms``.
    """
    p = _validate.norm_type(norm_type)
    _, grads = collect_grads(parameters)
    return compute_norms(grads, p, process_group=process_group, pp_group=pp_group)
