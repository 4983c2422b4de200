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

Fast paths (same results, more accurate than torch's):

* CPU, p = 2: ``gradguard.kernels.cpu.l2_norms``: small tensors packed together and summed
  in float64, large ones as BLAS dot products of 256K-element chunks on the thread pool
  (float16/bfloat16 widened per chunk by the same worker), sums added in float64, and on
  request ``max |g|`` of each chunk while it is in the cache. A chunk whose squares overflow
  or underflow float32 is recomputed in float64 (exact zeros are not), so the result stays
  finite and correct when the norm is.
* CUDA with Triton: one persistent multi-tensor kernel plus one small reduction
  (``gradguard.kernels``), for p in {1, 2, inf}, float16/bfloat16/float32.
* Otherwise, and while ``torch.compile`` traces: ``torch._foreach_norm(dtype=float32)``
  (float64 for float64).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _validate
from .kernels import cpu as _cpu
from .kernels import is_compiling


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
    if grads:
        # the common case checked in one pass of cheap attribute reads (thousands of small
        # tensors: this is a third of the step); check_grads then names what is wrong
        dev = grads[0].device
        ok = all(g.layout == torch.strided and g.is_floating_point() and g.device == dev
                 for g in grads)
        if not ok:
            _validate.check_grads(grads)
    return params, grads


# The CPU kernel's chunk and dtypes live with it (gradguard.kernels.cpu); one is_compiling.
_FAST_CPU_DTYPES = _cpu.DTYPES
#: p-norms computed max-normalised on the torch path: every p but 1, 2 (rescued by the
#: kernels) and inf (a max cannot overflow); |x|**p leaves float32's range for |x| > 3e4 at
#: p = 8, and underflows for |x| < 1e-6
_PLAIN_P = (1.0, 2.0, math.inf)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient of ``dtype`` is normed in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _use_cpu_fast_path(grads: list[Tensor], norm_type: float) -> bool:
    return (norm_type == 2.0 and grads[0].device.type == "cpu" and not is_compiling())


def _scaled_norms(full: list[Tensor], norm_type: float, out: torch.dtype) -> list[Tensor]:
    """p-norms of non-empty tensors, max-normalised: ``||g||_p = m * ||g / m||_p`` with
    ``m = max |g|`` (exact, cannot overflow), so ``|g/m|**p <= 1`` neither overflows nor
    (for the elements that matter) underflows; the scaled norms accumulate in float64 where
    the device has it. NaN and Inf propagate (m non-finite: the norm of g itself)."""
    m = torch._foreach_norm(full, math.inf)
    scale = [torch.where((x > 0) & torch.isfinite(x), x, torch.ones_like(x)).to(_acc_dtype(g.dtype))
             for x, g in zip(m, full)]
    scaled = torch._foreach_div([g.to(_acc_dtype(g.dtype)) for g in full], scale)
    wide = torch.float32 if full[0].device.type == "mps" else torch.float64
    got = torch._foreach_norm(scaled, norm_type, dtype=wide)
    return [(n * s.to(wide)).to(out) for n, s in zip(got, scale)]


def _foreach_norms(group: list[Tensor], norm_type: float) -> list[Tensor]:
    """``torch._foreach_norm`` in float32 (float64 for float64); p not in {1, 2, inf}
    max-normalised (``_scaled_norms``); empty tensors get 0 (torch refuses their inf-norm)."""
    full = [g for g in group if g.numel()]
    out = _acc_dtype(group[0].dtype)
    if not full:
        got: list[Tensor] = []
    elif norm_type in _PLAIN_P:
        got = list(torch._foreach_norm(full, norm_type, dtype=out))
    else:
        got = _scaled_norms(full, norm_type, out)
    if len(full) == len(group):
        return got
    it = iter(got)
    zero = torch.zeros((), dtype=out, device=group[0].device)
    return [next(it) if g.numel() else zero for g in group]


def _max_abs_cpu(grads: list[Tensor]) -> Tensor:
    """``max |g|`` per CPU tensor (float32; float64 for float64), block by block through numpy's ``max`` and ``min``
    (4x faster than ``torch.aminmax``; ``_foreach_norm(inf)`` is 20x slower on the CPU)."""
    out = np.zeros(len(grads), dtype=np.float64)
    for j, g in enumerate(grads):
        if g.numel() == 0:
            continue
        if g.dtype in (torch.float32, torch.float64, torch.float16) and g.layout == torch.strided:
            a = g.detach().reshape(-1).numpy()
            # block by block: min reads what max just brought into the cache
            blocks = [a[s: s + _cpu.CHUNK] for s in range(0, a.size, _cpu.CHUNK)]
            ext = np.array([(b.max(), -b.min()) for b in blocks], dtype=np.float64)
            with np.errstate(invalid="ignore"):
                out[j] = ext.max()  # numpy's max propagates NaN
        else:
            lo_t, hi_t = torch.aminmax(g.detach().reshape(-1))
            out[j] = float(torch.maximum(hi_t, -lo_t).double())
    wide = bool(grads) and grads[0].dtype == torch.float64
    return torch.from_numpy(out.astype(np.float64 if wide else np.float32))


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
    dtypes = [g.dtype for g in grads]
    groups: dict[torch.dtype, list[int]] = {}
    if dtypes.count(dtypes[0]) == len(dtypes):
        groups[dtypes[0]] = list(range(len(grads)))
    else:
        for i, dt in enumerate(dtypes):
            groups.setdefault(dt, []).append(i)
    # float64 if any gradient is float64 (torch's total is then float64 too), else float32
    out_dtype = torch.float64 if torch.float64 in groups else torch.float32
    for dtype, idx in groups.items():
        group = grads if len(groups) == 1 else [grads[i] for i in idx]
        norms: Tensor | list[Tensor] | None = None
        mx: Tensor | None = None
        if dtype in _FAST_CPU_DTYPES and _use_cpu_fast_path(group, norm_type):
            norms, mx = _cpu.l2_norms(group, with_max_abs)
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
    stacked = torch.stack([t.to(out_dtype) for t in out])  # type: ignore[union-attr]
    return stacked, (torch.stack([t.to(out_dtype) for t in out_max])  # type: ignore[union-attr]
                     if with_max_abs else None)


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
    if norm_type in _PLAIN_P or per_tensor.device.type == "mps":
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
