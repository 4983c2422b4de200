"""Multi-tensor gradient norms: per tensor and total, from one read of the gradients.

Every norm here is a float32 tensor on the gradients' device, whatever the gradient
dtype: float16/bfloat16 gradients are accumulated in float32, so a float16 gradient whose
true norm is 1e6 has the finite norm 1e6 here (torch and optax return inf). The total
norm is formed from the per-tensor norms with a max-rescaling, so it does not overflow
when the per-tensor norms are finite:

    ||g||_p = m * || (n_1/m, ..., n_k/m) ||_p,   n_i = ||g_i||_p,   m = max_i n_i

For p = inf, ``n_i = max |g_i|`` and the total is ``max_i n_i``.

On the CPU the squared L2 norms of float32/float64 gradients come from BLAS dot products,
about twice as fast as ``torch._foreach_norm``; a tensor whose squared norm overflows
float32 is recomputed with a rescaling, so the result stays finite when the norm is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _validate


@dataclass(frozen=True)
class GradNorms:
    """Norms of a set of gradients, all float32 device tensors.

    ``total``: 0-d, the p-norm of all gradients taken together (what ``clip_grad_norm_``
    returns). ``per_tensor``: 1-d, one p-norm per gradient, in parameter order (parameters
    whose ``grad`` is None are left out). ``norm_type``: p.
    """

    total: Tensor
    per_tensor: Tensor
    norm_type: float

    @property
    def nonfinite(self) -> Tensor:
        """0-d bool tensor: True when some gradient element is NaN or Inf."""
        return ~torch.isfinite(self.total)


def collect_grads(parameters: Tensor | Iterable[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """Return ``(params, grads)`` for the parameters that have a gradient, checked."""
    params = [p for p in _validate.as_param_list(parameters) if p.grad is not None]
    grads = [p.grad for p in params]
    _validate.check_grads(grads)
    return params, grads


def _cpu_dot_norms(grads: list[Tensor]) -> Tensor:
    """L2 norms of contiguous float32/float64 CPU tensors via BLAS dot, as float32."""
    flats = [g.view(-1) for g in grads]
    return torch.stack([torch.dot(f, f) for f in flats]).float().sqrt()


def _rescue_overflow_(grads: list[Tensor], norms: Tensor, norm_type: float) -> None:
    """Recompute in place, with a rescaling, the CPU norms whose float32 accumulation overflowed.

    ``||g||_p = m * ||g / m||_p`` with ``m = max |g|``, in float64. Only CPU norms are rescued:
    reading a CPU tensor costs no device synchronisation.
    """
    if norms.device.type != "cpu" or math.isinf(norm_type):
        return
    over = torch.isinf(norms)
    if not over.numpy().any():
        return
    for i in over.nonzero().flatten().numpy().tolist():
        f = grads[i].detach().double().reshape(-1)
        m = f.abs().max()
        if torch.isfinite(m).numpy() and m.numpy() > 0:
            norms[i] = (m * torch.linalg.vector_norm(f / m, norm_type)).float()


def per_tensor_norms(grads: list[Tensor], norm_type: float = 2.0) -> Tensor:
    """One float32 p-norm per gradient tensor, in order; see the module docstring."""
    if not grads:
        return torch.zeros(0, dtype=torch.float32)
    device = grads[0].device
    out: list[Tensor | None] = [None] * len(grads)
    # Group indices by dtype so each foreach call gets a homogeneous list.
    groups: dict[tuple[torch.dtype, bool], list[int]] = {}
    zero = None
    for i, g in enumerate(grads):
        if g.numel() == 0:
            # The norm of nothing is 0 (torch's inf-norm kernel refuses empty tensors).
            if zero is None:
                zero = torch.zeros((), dtype=torch.float32, device=device)
            out[i] = zero
            continue
        fast = (
            device.type == "cpu"
            and norm_type == 2.0
            and g.dtype in (torch.float32, torch.float64)
            and g.is_contiguous()
        )
        groups.setdefault((g.dtype, fast), []).append(i)
    for (dtype, fast), idx in groups.items():
        group = [grads[i] for i in idx]
        if fast:
            norms = list(_cpu_dot_norms(group).unbind())
        elif dtype == torch.float64:
            norms = [n.float() for n in torch._foreach_norm(group, norm_type)]
        else:
            norms = list(torch._foreach_norm(group, norm_type, dtype=torch.float32))
        for i, n in zip(idx, norms):
            out[i] = n
    norms = torch.stack(out)  # type: ignore[arg-type]
    _rescue_overflow_(grads, norms, norm_type)
    return norms


def total_from_per_tensor(per_tensor: Tensor, norm_type: float = 2.0) -> Tensor:
    """The p-norm of the concatenation, from the per-tensor p-norms, without overflow."""
    if per_tensor.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=per_tensor.device)
    if math.isinf(norm_type):
        return per_tensor.max()
    m = per_tensor.max()
    scale = torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m))
    return torch.linalg.vector_norm(per_tensor / scale, norm_type) * scale


def compute_norms(grads: list[Tensor], norm_type: float = 2.0) -> GradNorms:
    """Per-tensor and total norms of ``grads`` from one read of each gradient."""
    per = per_tensor_norms(grads, norm_type)
    if grads:
        per = per.to(grads[0].device)
    return GradNorms(total=total_from_per_tensor(per, norm_type), per_tensor=per, norm_type=norm_type)


def grad_norm(parameters: Tensor | Iterable[Tensor], norm_type: float = 2.0) -> GradNorms:
    """Read-only gradient norms: ``.total`` and ``.per_tensor`` (float32), nothing mutated.

    Use this to log the norm instead of ``clip_grad_norm_(..., max_norm=inf)``, which
    multiplies every gradient and can turn an Inf into NaN.
    """
    p = _validate.norm_type(norm_type)
    _, grads = collect_grads(parameters)
    return compute_norms(grads, p)
