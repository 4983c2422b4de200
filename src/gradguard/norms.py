"""Multi-tensor gradient norms: per tensor and total, from one read of the gradients.

Every norm here is a float32 tensor on the gradients' device, whatever the gradient
dtype: float16/bfloat16 gradients are accumulated in float32, so a float16 gradient whose
true norm is 1e6 has the finite norm 1e6 here (torch and optax return inf). The total
norm is formed from the per-tensor norms with a max-rescaling, so it does not overflow
when the per-tensor norms are finite:

    ||g||_p = m * || (n_1/m, ..., n_k/m) ||_p,   n_i = ||g_i||_p,   m = max_i n_i

For p = inf, ``n_i = max |g_i|`` and the total is ``max_i n_i``.

Fast paths (same results, more accurate than torch's):

* CPU, p = 2: BLAS dot products of 256K-element chunks, sums added in float64
  (``_cpu_l2_norms``), and on request ``max |g|`` of each chunk while it is in the cache;
  float16 and bfloat16 are converted to float32 through a small buffer first (torch's own
  CPU norm of them is 8x slower with ``dtype=float32`` and off by 1-10% without). A chunk whose squares overflow or underflow float32 is recomputed in float64,
  so the result stays finite and correct when the norm is.
* CUDA with Triton: one persistent multi-tensor kernel plus one small reduction
  (``gradguard.kernels``), for p in {1, 2, inf}, float16/bfloat16/float32.
* Otherwise, and while ``torch.compile`` traces: ``torch._foreach_norm(dtype=float32)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _pool, _validate


@dataclass(frozen=True)
class GradNorms:
    """Norms of a set of gradients, all float32 device tensors.

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
    _validate.check_grads(grads)
    return params, grads


# Elements per chunk on the CPU (1 MiB of float32). torch's CPU norm kernel adds the squares
# of a tensor in one float32 stream: on a 38M-element tensor it is off by ~1e-3 (relative).
# Taken over chunks this size and added in float64 the error is ~1e-6. (torch.dot, MKL, was
# 2-6x slower when other processes compete for the cores, through MKL's threading; numpy's
# OpenBLAS dot is not threaded at this size and is unaffected.)
_CHUNK = 1 << 18
# float16/bfloat16 chunks are converted into a float32 staging buffer of this many elements
# (16 MiB: stays in the last-level cache) and normed there: torch's own float16/bfloat16 CPU
# norm with dtype=float32 is ~8x slower, and without it the result is off by 1-10%.
_STAGE = 1 << 22
_HALF = (torch.float16, torch.bfloat16)
# Below this many elements one thread reads the chunks (handing work to the pool costs ~50 us).
_PARALLEL_MIN = 1 << 22
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


def _quiet() -> np.errstate:
    # float32 sums of squares may overflow (rescued below) and NaN may meet NaN: no warnings
    return np.errstate(over="ignore", invalid="ignore")


def _cpu_l2_norms(grads: list[Tensor], with_max_abs: bool = False) -> tuple[Tensor, Tensor | None]:
    """L2 norms (float32) of CPU tensors of one floating dtype, each read once.

    Every tensor is cut into chunks of ``_CHUNK`` elements; a BLAS dot product (numpy's
    ``dot``, OpenBLAS) gives each chunk's sum of squares s_j, accumulated in the chunk's
    float32 (float64) precision; float16/bfloat16 tensors are first converted ``_STAGE``
    elements at a time into a reused float32 buffer, one copy per slice. The chunk sums are
    added per tensor in float64:

        ||g_i||_2 = sqrt( sum_{j in chunks(i)} s_j )

    A chunk whose sum of squares overflowed float32 (s_j = inf), or is so small that
    underflowed squares could matter (s_j < n_j * _TINY), is recomputed exactly
    (``_exact_sumsq``); NaN stays NaN. Reading these flags costs nothing: they are CPU
    values, there is no device to wait for. Non-contiguous tensors are read through
    ``reshape`` (one copy). (The dot products stream memory 15-20% faster than
    ``torch._foreach_norm`` on the development machine, with or without load on the other
    core.)

    ``with_max_abs``: also ``max |g_i|`` per tensor (float32), from numpy's ``max`` and
    ``min`` of each chunk right after its dot product, while the chunk is still in the
    cache (one read of memory for all three). The norms do not depend on it, bit for bit: a
    monitored step clips exactly like an unmonitored one.
    """
    dtype = grads[0].dtype
    k = _CHUNK
    meta: list[tuple[int, Tensor, int, int]] = []  # per chunk: tensor, source, start, length
    if dtype in _HALF:
        # one staging buffer, filled slice by slice: one thread
        sq_l: list[float] = []
        hi_l: list[float] = []
        lo_l: list[float] = []
        buf = torch.empty(min(_STAGE, sum(g.numel() for g in grads)), dtype=torch.float32)
        nbuf = buf.numpy()
        with _quiet():
            for i, g in enumerate(grads):
                for src in g.detach().reshape(-1).split(_STAGE):
                    n = src.numel()
                    buf[:n].copy_(src)
                    for start in range(0, n, k):
                        a = nbuf[start: min(start + k, n)]
                        sq_l.append(np.dot(a, a))
                        if with_max_abs:  # while the chunk is in the cache
                            hi_l.append(a.max())
                            lo_l.append(a.min())
                        meta.append((i, src, start, min(k, n - start)))
        sq = np.array(sq_l, dtype=np.float64)
        his = np.array(hi_l, dtype=np.float64)
        los = np.array(lo_l, dtype=np.float64)
    else:
        arrays: list[np.ndarray] = []
        for i, g in enumerate(grads):
            flat = g.detach().reshape(-1).resolve_neg()
            a = flat.numpy()
            for start in range(0, a.size, k):
                arrays.append(a[start: start + k])
                meta.append((i, flat, start, min(k, a.size - start)))
        sq = np.empty(len(arrays), dtype=np.float64)
        his = np.empty(len(arrays) if with_max_abs else 0, dtype=np.float64)
        los = np.empty_like(his)

        def work(j: int) -> None:
            # sum of squares, then max and min while the chunk is in this core's cache
            a = arrays[j]
            sq[j] = np.dot(a, a)
            if with_max_abs:
                his[j] = a.max()
                los[j] = a.min()

        total = sum(a.size for a in arrays)
        _pool.run_indexed(len(arrays), work, _pool.threads() if total >= _PARALLEL_MIN else 1,
                          context=_quiet)
    if not len(sq):
        zeros = torch.zeros(len(grads), dtype=torch.float32)
        return zeros, (zeros.clone() if with_max_abs else None)
    vals = sq
    tiny = _TINY[torch.float64 if dtype == torch.float64 else torch.float32]
    sizes = np.fromiter((m[3] for m in meta), dtype=np.float64, count=len(meta))
    # NaN compares False on both sides: left alone. inf > anything finite: recomputed.
    suspect = (vals < sizes * tiny) | (vals == np.inf)
    if suspect.any():
        for j in np.flatnonzero(suspect).tolist():
            _, src, start, length = meta[j]
            vals[j] = _exact_sumsq(src[start: start + length])
    owner = np.fromiter((m[0] for m in meta), dtype=np.int64, count=len(meta))
    sums = np.bincount(owner, weights=vals, minlength=len(grads))
    max_abs = None
    if with_max_abs:
        with np.errstate(invalid="ignore"):  # NaN in, NaN out: that is the point
            chunk_max = np.maximum(his, -los)
            per = np.zeros(len(grads), dtype=np.float64)
            np.maximum.at(per, owner, chunk_max)  # np.maximum propagates NaN
        max_abs = torch.from_numpy(per.astype(np.float32))
    with np.errstate(over="ignore"):  # a norm beyond float32's range is inf, silently (as torch)
        norms = np.sqrt(sums).astype(np.float32)
    return torch.from_numpy(norms), max_abs


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


def _max_abs_cpu(grads: list[Tensor]) -> Tensor:
    """``max |g|`` per CPU tensor (float32), block by block through numpy's ``max`` and ``min``
    (4x faster than ``torch.aminmax``; ``_foreach_norm(inf)`` is 20x slower on the CPU)."""
    out = np.zeros(len(grads), dtype=np.float64)
    for j, g in enumerate(grads):
        if g.numel() == 0:
            continue
        if g.dtype in (torch.float32, torch.float64, torch.float16) and g.layout == torch.strided:
            a = g.detach().reshape(-1).numpy()
            # block by block: min reads what max just brought into the cache
            blocks = [a[s: s + _CHUNK] for s in range(0, a.size, _CHUNK)]
            ext = np.array([(b.max(), -b.min()) for b in blocks], dtype=np.float64)
            with np.errstate(invalid="ignore"):
                out[j] = ext.max()  # numpy's max propagates NaN
        else:
            lo_t, hi_t = torch.aminmax(g.detach().reshape(-1))
            out[j] = float(torch.maximum(hi_t, -lo_t).double())
    return torch.from_numpy(out.astype(np.float32))


def _max_abs(group: list[Tensor]) -> Tensor:
    if group[0].device.type == "cpu" and not is_compiling():
        return _max_abs_cpu(group)
    return torch.stack(_foreach_norms(group, math.inf))


def _per_tensor(grads: list[Tensor], norm_type: float,
                with_max_abs: bool) -> tuple[Tensor, Tensor | None]:
    if not grads:
        empty = torch.zeros(0, dtype=torch.float32)
        return empty, (empty if with_max_abs else None)
    device = grads[0].device
    out: list[Tensor | None] = [None] * len(grads)
    out_max: list[Tensor | None] = [None] * len(grads)
    # Group indices by dtype so each multi-tensor call gets a homogeneous list.
    groups: dict[torch.dtype, list[int]] = {}
    for i, g in enumerate(grads):
        groups.setdefault(g.dtype, []).append(i)
    for dtype, idx in groups.items():
        group = [grads[i] for i in idx]
        norms: Tensor | list[Tensor] | None = None
        mx: Tensor | None = None
        if dtype in _FAST_CPU_DTYPES and _use_cpu_fast_path(group, norm_type):
            norms, mx = _cpu_l2_norms(group, with_max_abs)
        elif device.type == "cuda":
            from . import kernels
            res = kernels.multi_tensor_norms(group, norm_type)
            norms = None if res is None else res[0]
        if norms is None:
            norms = _foreach_norms(group, norm_type)
        if not isinstance(norms, Tensor):
            norms = torch.stack(norms)
        if with_max_abs and mx is None:
            mx = norms if math.isinf(norm_type) else _max_abs(group)
        if len(groups) == 1:
            return norms, mx
        for j, i in enumerate(idx):
            out[i] = norms[j]
            out_max[i] = None if mx is None else mx[j]
    return torch.stack(out), (torch.stack(out_max) if with_max_abs else None)  # type: ignore[arg-type]


def per_tensor_norms(grads: list[Tensor], norm_type: float = 2.0) -> Tensor:
    """One float32 p-norm per gradient tensor, in order; see the module docstring.

    Paths, chosen per call: on the CPU, p = 2, float16/bfloat16/float32/float64: chunked
    BLAS dot products with float64 sums (``_cpu_l2_norms``); on CUDA with Triton
    importable, p in {1, 2, inf}, float16/bfloat16/float32: one persistent multi-tensor Triton
    kernel (``gradguard.kernels``); otherwise ``torch._foreach_norm`` with float32
    accumulation.
    """
    if _any_dtensor(grads):
        return compute_norms(grads, norm_type).per_tensor  # the global norms
    return _per_tensor(grads, norm_type, False)[0]


def _any_dtensor(grads: list[Tensor]) -> bool:
    # DTensor is a Tensor subclass: a type check, no import of torch.distributed needed
    return any(type(g) is not Tensor and type(g).__name__ == "DTensor" for g in grads)


def total_from_per_tensor(per_tensor: Tensor, norm_type: float = 2.0) -> Tensor:
    """The p-norm of the concatenation, from the per-tensor p-norms, without overflow."""
    if per_tensor.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=per_tensor.device)
    if math.isinf(norm_type):
        return per_tensor.max()
    m = per_tensor.max()
    scale = torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m))
    return torch.linalg.vector_norm(per_tensor / scale, norm_type) * scale


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
    if grads and grads[0].device.type == "cuda" and all(g.dtype == grads[0].dtype for g in grads):
        from . import kernels
        res = kernels.multi_tensor_norms(grads, norm_type)
        if res is not None:
            mx = None
            if with_max_abs:
                mx = res[0] if math.isinf(norm_type) else _max_abs(grads)
            return GradNorms(total=res[1], per_tensor=res[0], norm_type=norm_type, max_abs=mx)
    per, mx = _per_tensor(grads, norm_type, with_max_abs)
    if grads:
        per = per.to(grads[0].device)
        mx = None if mx is None else mx.to(grads[0].device)
    return GradNorms(total=total_from_per_tensor(per, norm_type), per_tensor=per,
                     norm_type=norm_type, max_abs=mx)


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
