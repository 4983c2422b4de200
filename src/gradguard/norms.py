"""Multi-tensor gradient norms: per tensor and total, from one read of the gradients.

Every norm here is a float32 tensor on the gradients' device, whatever the gradient
dtype: float16/bfloat16 gradients are accumulated in float32, so a float16 gradient whose
true norm is 1e6 has the finite norm 1e6 here (torch and optax return inf). The total
norm is formed from the per-tensor norms with a max-rescaling, so it does not overflow
when the per-tensor norms are finite:

    ||g||_p = m * || (n_1/m, ..., n_k/m) ||_p,   n_i = ||g_i||_p,   m = max_i n_i

For p = inf, ``n_i = max |g_i|`` and the total is ``max_i n_i``.

Fast paths (same results, more accurate than torch's):

* CPU, p = 2: ``torch._foreach_norm`` of 256K-element chunks, squares added in float64
  (``_cpu_l2_norms``); float16 and bfloat16 are converted to float32 through a small buffer
  first (torch's own CPU norm of them is 8x slower with ``dtype=float32`` and off by 1-10%
  without). A chunk whose squares overflow or underflow float32 is recomputed in float64,
  so the result stays finite and correct when the norm is.
* CUDA with Triton: one persistent multi-tensor kernel plus one small reduction
  (``gradguard.kernels``), for p in {1, 2, inf}, float16/bfloat16/float32.
* Otherwise, and while ``torch.compile`` traces: ``torch._foreach_norm(dtype=float32)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
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


# Elements per chunk on the CPU (1 MiB of float32). torch's CPU norm kernel adds the squares
# of a tensor in one float32 stream: on a 38M-element tensor it is off by ~1e-3 (relative).
# Taken over chunks this size and added in float64 the error is ~1e-6. (BLAS dot products
# per chunk were tried: as fast when the machine is idle, 2-6x slower when other processes
# compete for the cores, through MKL's threading and the number of calls.)
_CHUNK = 1 << 18
# float16/bfloat16 chunks are converted into a float32 staging buffer of this many elements
# (16 MiB: stays in the last-level cache) and normed there: torch's own float16/bfloat16 CPU
# norm with dtype=float32 is ~8x slower, and without it the result is off by 1-10%.
_STAGE = 1 << 22
_HALF = (torch.float16, torch.bfloat16)
_FAST_CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# A float32 (float64) sum of squares below n * _TINY[dtype] may have lost contributions to
# underflow (squares below the smallest normal number); such chunks are recomputed exactly.
# n * 2**-125 bounds the absolute error of n denormal squares (each off by <= 2**-150) at
# 2**-24 relative, i.e. float32 rounding.
_TINY = {torch.float32: 2.0 ** -125, torch.float64: 2.0 ** -968}


def is_compiling() -> bool:
    """True while torch.compile / dynamo traces; the fast paths then take pure-torch ops."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def _exact_sumsq(chunk: Tensor) -> float:
    """Sum of squares of one chunk in float64 without overflow or underflow.

    float16/bfloat16/float32 values squared fit the float64 range exactly (|x| <= 3.4e38
    gives x**2 <= 1.2e77; the smallest float32 denormal 1.4e-45 gives 2e-90), so a float64
    dot product is enough. float64 chunks are rescaled by their largest magnitude m:
    sum(x**2) = m**2 * sum((x/m)**2).
    """
    if chunk.dtype != torch.float64:
        c = chunk.double()
        return float(torch.dot(c, c).numpy())
    m = float(torch.linalg.vector_norm(chunk, math.inf).numpy())
    if m == 0.0 or not math.isfinite(m):
        return m
    c = chunk / m
    return m * m * float(torch.dot(c, c).numpy())


def _cpu_l2_norms(grads: list[Tensor]) -> Tensor:
    """L2 norms (float32) of CPU tensors of one floating dtype, each read once.

    Every tensor is cut into chunks of ``_CHUNK`` elements and ``torch._foreach_norm`` gives
    the chunks' norms r_j (float32 accumulation; float16/bfloat16 tensors are first
    converted ``_STAGE`` elements at a time into a reused float32 buffer, one copy per
    slice). The squares are added per tensor in float64:

        ||g_i||_2 = sqrt( sum_{j in chunks(i)} r_j**2 )

    A chunk whose sum of squares overflowed float32 (r_j = inf), or is so small that
    underflowed squares could matter (r_j**2 < n_j * _TINY), is recomputed exactly
    (``_exact_sumsq``); NaN stays NaN. Reading these flags costs nothing: they are CPU
    tensors, there is no device to wait for. Non-contiguous tensors are read through
    ``reshape`` (one copy).
    """
    dtype = grads[0].dtype
    k = _CHUNK
    norms: list[Tensor] = []
    meta: list[tuple[int, Tensor, int, int]] = []  # per chunk: tensor, source, start, length
    if dtype in _HALF:
        buf = torch.empty(min(_STAGE, sum(g.numel() for g in grads)), dtype=torch.float32)
        views: list[Tensor] = []
        pos = 0
        for i, g in enumerate(grads):
            for src in g.reshape(-1).split(_STAGE):
                n = src.numel()
                if pos + n > buf.numel():
                    norms.extend(torch._foreach_norm(views))
                    views, pos = [], 0
                x = buf[pos: pos + n]
                x.copy_(src)
                pos += n
                for start in range(0, n, k):
                    views.append(x[start: start + k])
                    meta.append((i, src, start, min(k, n - start)))
        if views:
            norms.extend(torch._foreach_norm(views))
    else:
        chunks = []
        for i, g in enumerate(grads):
            flat = g.reshape(-1)
            n = flat.numel()
            for start in range(0, n, k):
                chunks.append(flat[start: start + k])
                meta.append((i, flat, start, min(k, n - start)))
        if chunks:
            norms = list(torch._foreach_norm(chunks))
    sums = torch.zeros(len(grads), dtype=torch.float64)
    if not norms:
        return sums.float()
    sq = torch.stack(norms).double().square_()
    vals = sq.numpy()
    tiny = _TINY[torch.float64 if dtype == torch.float64 else torch.float32]
    sizes = np.fromiter((m[3] for m in meta), dtype=np.float64, count=len(meta))
    # NaN compares False on both sides: left alone. inf > anything finite: recomputed.
    suspect = (vals < sizes * tiny) | (vals == np.inf)
    if suspect.any():
        for j in np.flatnonzero(suspect).tolist():
            _, src, start, length = meta[j]
            vals[j] = _exact_sumsq(src[start: start + length])
    sums.index_add_(0, torch.tensor([m[0] for m in meta]), sq)
    return sums.sqrt_().float()


def _use_cpu_fast_path(grads: list[Tensor], norm_type: float) -> bool:
    return (norm_type == 2.0 and grads[0].device.type == "cpu" and not is_compiling())


def _foreach_norms(group: list[Tensor], norm_type: float) -> list[Tensor]:
    """``torch._foreach_norm`` in float32; empty tensors get 0 (torch refuses their inf-norm)."""
    full = [g for g in group if g.numel()]
    if group[0].dtype == torch.float64:
        got = [n.float() for n in torch._foreach_norm(full, norm_type)] if full else []
    else:
        got = list(torch._foreach_norm(full, norm_type, dtype=torch.float32)) if full else []
    if len(full) == len(group):
        return got
    it = iter(got)
    zero = torch.zeros((), dtype=torch.float32, device=group[0].device)
    return [next(it) if g.numel() else zero for g in group]


def per_tensor_norms(grads: list[Tensor], norm_type: float = 2.0) -> Tensor:
    """One float32 p-norm per gradient tensor, in order; see the module docstring.

    Paths, chosen per call: on the CPU, p = 2, float16/bfloat16/float32/float64: chunked
    BLAS dot products (``_cpu_l2_norms``); on CUDA with Triton importable, p in {1, 2, inf},
    float16/bfloat16/float32: one persistent multi-tensor Triton kernel
    (``gradguard.kernels``); otherwise ``torch._foreach_norm`` with float32 accumulation.
    """
    if not grads:
        return torch.zeros(0, dtype=torch.float32)
    device = grads[0].device
    out: list[Tensor | None] = [None] * len(grads)
    # Group indices by dtype so each multi-tensor call gets a homogeneous list.
    groups: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault(g.dtype, []).append(i)
    for dtype, idx in groups.items():
        group = [grads[i] for i in idx]
        norms: Tensor | list[Tensor] | None = None
        if dtype in _FAST_CPU_DTYPES and _use_cpu_fast_path(group, norm_type):
            norms = _cpu_l2_norms(group)
        elif device.type == "cuda":
            from . import kernels
            res = kernels.multi_tensor_norms(group, norm_type)
            norms = None if res is None else res[0]
        if norms is None:
            norms = _foreach_norms(group, norm_type)
        if len(groups) == 1:
            return norms if isinstance(norms, Tensor) else torch.stack(norms)
        for i, n in zip(idx, norms.unbind() if isinstance(norms, Tensor) else norms):
            out[i] = n
    return torch.stack(out)  # type: ignore[arg-type]


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
    """Per-tensor and total norms of ``grads`` from one read of each gradient.

    On CUDA, when every gradient has one dtype and the Triton kernels apply, both come from
    the same two launches (the total reduced in float64 from the kernel's partial sums).
    """
    if grads and grads[0].device.type == "cuda" and all(g.dtype == grads[0].dtype for g in grads):
        from . import kernels
        res = kernels.multi_tensor_norms(grads, norm_type)
        if res is not None:
            return GradNorms(total=res[1], per_tensor=res[0], norm_type=norm_type)
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
