"""Multi-tensor norm and scale kernels behind one dispatcher.

Size: the dispatcher, the Triton chunk tables and their launches stay together (tests patch
``CHUNK``, ``BLOCK``, ``_layout`` and ``_cpu_scale_`` here); the kernels live in ``cpu.py``,
``_triton.py`` and ``_torch.py``.

Implementations: ``kernels.cpu`` (CPU: chunked L2 norms, max |g|, the threaded scale; its
inner loops in ``kernels._native``, a C kernel compiled on first use, numpy/BLAS without it),
``kernels._triton`` (CUDA: a persistent multi-tensor norm and scale), ``kernels._torch``
(``torch._foreach_norm``, everywhere else and while ``torch.compile`` traces).

``Groups(tensors)``
    The tensors of one call grouped once by dtype (on one device), built by
    ``norms.compute_norms`` and handed on in ``GradNorms.groups``: the norm pass and the
    scale of the same list share it and each group's Triton chunk table.

``group_norms(groups, p, with_max_abs)``
    The one norm dispatcher: per group the CPU kernel (p = 2), the Triton kernel (CUDA, p in
    {1, 2, inf}, float16/bfloat16/float32 contiguous tensors: two launches, a persistent
    chunked pass writing float64 partials, then a segmented reduction) or ``torch._foreach_norm``.
    ``multi_tensor_norms(tensors, p)`` is the Triton kernel alone (None where it does not apply).

``multi_tensor_scale_(tensors, coef, groups=None)``
    ``t <- t * coef`` for every tensor, ``coef`` a 0-d float32 tensor on their device, never
    read on the host on CUDA. On CUDA with Triton: one launch per group that returns at once
    when ``coef == 1``. On the CPU: ``coef`` is read (a CPU tensor: no device to wait for),
    the pass is skipped when it is 1, and otherwise ``kernels.cpu.scale_`` (numpy chunks on
    the thread pool, small tensors and half dtypes through ``torch._foreach_mul_``).
    Elsewhere ``torch._foreach_mul_``. The result is the same on every path: ``x * coef``
    computed in float32, rounded to the tensor's dtype. DTensors (FSDP2, TP) are scaled
    through their local shards.

Chunk sizes are each kernel's unit of work and stay two: ``cpu.CHUNK`` (256K elements, one
thread's share) and ``CHUNK`` here (64K, one Triton program iteration); changing either
changes the float32 partial sums, so the norms' last bits.

No host synchronisation happens on CUDA: the chunk tables the kernels read are built once
per gradient layout (data pointers, sizes, dtype), copied to the device from pinned memory
without blocking, and cached (``_LAYOUTS``, a few entries, least recently used dropped).
Set ``GRADGUARD_TRITON=0`` to force the ``torch._foreach_*`` paths.
"""

from __future__ import annotations

import math
import operator
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from . import _torch
from . import cpu as _cpu

#: elements per chunk (the unit of work of one program iteration) and per tile
CHUNK = int(os.environ.get("GRADGUARD_TRITON_CHUNK", 1 << 16))
BLOCK = int(os.environ.get("GRADGUARD_TRITON_BLOCK", 16384))
#: persistent programs per streaming multiprocessor
PROGRAMS_PER_SM = int(os.environ.get("GRADGUARD_TRITON_PROGRAMS_PER_SM", 4))
NUM_WARPS = int(os.environ.get("GRADGUARD_TRITON_WARPS", 16))
RBLOCK = 1024
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_P_CODE = {2.0: 2, 1.0: 1, math.inf: 0}
_MAX_LAYOUTS = 8

_triton_mod: ModuleType | None = None
_triton_error: str | None = None


def interpret_mode() -> bool:
    """True when Triton runs its kernels in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_kernels() -> ModuleType | None:
    """The Triton kernel module, or None when Triton is missing, broken or disabled."""
    global _triton_mod, _triton_error
    if _triton_mod is not None or _triton_error is not None:
        return _triton_mod
    if os.environ.get("GRADGUARD_TRITON", "1") == "0":
        _triton_error = "disabled by GRADGUARD_TRITON=0"
        return None
    try:
        from . import _triton
    except Exception as exc:  # noqa: BLE001  (ImportError, or a broken install)
        _triton_error = f"{type(exc).__name__}: {exc}"
        return None
    _triton_mod = _triton
    return _triton_mod


def load_bench() -> ModuleType:
    """The benchmark harness ``benchmarks/clip_bench.py`` of a source checkout, for
    ``gradguard bench`` (the harness is not part of the installed package). Set
    ``GRADGUARD_BENCHMARKS`` to the folder holding it when running elsewhere."""
    import importlib.util
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    folder = os.environ.get("GRADGUARD_BENCHMARKS") or os.path.join(here, "..", "..", "..", "benchmarks")
    path = os.path.normpath(os.path.join(folder, "clip_bench.py"))
    if "gradguard_clip_bench" in sys.modules:
        return sys.modules["gradguard_clip_bench"]
    if not os.path.isfile(path):
        raise ImportError(f"gradguard bench needs benchmarks/clip_bench.py from a source checkout "
                          f"(looked for {path}); set GRADGUARD_BENCHMARKS to its folder")
    spec = importlib.util.spec_from_file_location("gradguard_clip_bench", path)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules["gradguard_clip_bench"] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def backend(device: torch.device | str) -> str:
    """Which path the norm and scale take on ``device``: ``"triton"`` or ``"torch"``."""
    dev = torch.device(device)
    ok = dev.type == "cuda" or (dev.type == "cpu" and interpret_mode())
    return "triton" if ok and triton_kernels() is not None else "torch"


def is_compiling() -> bool:
    """True while torch.compile / dynamo traces; the fast paths then take pure-torch ops."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


_is_compiling = is_compiling  # the old private name


@dataclass
class _Layout:
    """Chunk table of one list of same-dtype tensors, resident on their device.

    ``base``: index of the tensor with the lowest address; chunk ``c`` covers ``lens[c]``
    elements from element offset ``starts[c]`` past that tensor's first element; tensor ``t``
    owns chunks ``tstart[t] .. tstart[t+1]-1``.
    """

    base: int
    starts: Tensor  # int64 [n_chunks]
    lens: Tensor  # int32 [n_chunks]
    tstart: Tensor  # int32 [n_tensors + 1]
    n_chunks: int
    align: int
    grid: int
    host: tuple[Tensor, ...]  # pinned sources of the copies, kept alive with the layout


_LAYOUTS: OrderedDict[tuple, _Layout] = OrderedDict()
_DTYPE = operator.attrgetter("dtype")
_SM_COUNT: dict[int, int] = {}


def _grid(device: torch.device, n_chunks: int) -> int:
    if device.type != "cuda":
        return max(1, min(n_chunks, 4))
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return max(1, min(n_chunks, _SM_COUNT[idx] * PROGRAMS_PER_SM))


def _layout(tensors: list[Tensor]) -> _Layout | None:
    """The cached chunk table of ``tensors``, or None if they don't suit the kernels."""
    t0 = tensors[0]
    if t0.dtype not in _TRITON_DTYPES:
        return None
    size = t0.element_size()
    ptrs = []
    for t in tensors:
        if not t.is_contiguous() or t.dtype != t0.dtype or t.device != t0.device:
            return None
        ptrs.append(t.data_ptr())
    numels = [t.numel() for t in tensors]
    key = (t0.device, t0.dtype, CHUNK, tuple(ptrs), tuple(numels))
    hit = _LAYOUTS.get(key)
    if hit is not None:
        _LAYOUTS.move_to_end(key)
        return hit
    base = min(range(len(tensors)), key=ptrs.__getitem__)
    starts: list[int] = []
    lens: list[int] = []
    tstart = [0]
    for p, n in zip(ptrs, numels):
        off, rem = divmod(p - ptrs[base], size)
        if rem:
            return None
        for s in range(0, n, CHUNK):
            starts.append(off + s)
            lens.append(min(CHUNK, n - s))
        tstart.append(len(starts))
    if len(starts) >= 2**31:
        return None
    vec = max(1, 16 // size)  # elements per 16-byte vector load
    align = vec if all(s % vec == 0 for s in starts) and ptrs[base] % 16 == 0 else 1
    host = (torch.tensor(starts or [0], dtype=torch.int64), torch.tensor(lens or [0], dtype=torch.int32),
            torch.tensor(tstart, dtype=torch.int32))
    if t0.device.type == "cuda":
        host = tuple(h.pin_memory() for h in host)
        dev = tuple(h.to(t0.device, non_blocking=True) for h in host)
    else:
        dev = host
    lay = _Layout(base, dev[0], dev[1], dev[2], len(starts), align,
                  _grid(t0.device, len(starts)), host)
    _LAYOUTS[key] = lay
    while len(_LAYOUTS) > _MAX_LAYOUTS:
        _LAYOUTS.popitem(last=False)
    return lay


def _usable(tensors: list[Tensor], allow_cpu: bool) -> bool:
    if not tensors or _is_compiling():
        return False
    dev = tensors[0].device
    if dev.type == "cpu" and not (allow_cpu and interpret_mode()):
        return False
    return backend(dev) == "triton"


class Groups:
    """The tensors of one call grouped once by dtype (on one device), reused by every pass.

    ``compute_norms`` builds it for the norm pass and hands it on in ``GradNorms.groups``;
    the scale of the same list (``ScalarClipper.clip_``) takes it instead of grouping again.
    Group ``i`` is ``members[i]`` (the whole list when ``single``), at positions ``index[i]``
    of ``tensors``, all of dtype ``dtypes[i]``. ``layout(i)`` is that group's Triton chunk
    table, looked up once per ``Groups`` (the tables themselves are cached across steps by
    data pointers and sizes, ``_LAYOUTS``: a training loop whose gradients stay where they are
    builds none after its first step). The device is the first tensor's: the callers'
    tensors share one (``norms.collect_grads`` checks), and a chunk table refuses a list that
    does not (its group then takes the torch path).
    """

    def __init__(self, tensors: list[Tensor]):
        self.tensors = tensors
        self._held = tuple(tensors)  # what the list held: ``of`` sees a tensor replaced in it
        self.device = tensors[0].device if tensors else torch.device("cpu")
        dtypes = [t.dtype for t in tensors] if _is_compiling() else list(map(_DTYPE, tensors))
        self.single = bool(tensors) and dtypes.count(dtypes[0]) == len(dtypes)
        if self.single or not tensors:
            self.dtypes = dtypes[:1]
            self.index: list[Sequence[int]] = [range(len(tensors))] if tensors else []
            self.members: list[list[Tensor]] = [tensors] if tensors else []
        else:
            at: dict[torch.dtype, list[int]] = {}
            for i, dt in enumerate(dtypes):
                at.setdefault(dt, []).append(i)
            self.dtypes = list(at)
            self.index = list(at.values())  # type: ignore[arg-type]
            self.members = [[tensors[i] for i in idx] for idx in self.index]
        self._layouts: dict[int, _Layout | None] = {}
        self._order: Tensor | None = None

    def of(self, tensors: list[Tensor]) -> bool:
        """True when these are the tensors this was built from (the same list, unchanged)."""
        return (tensors is self.tensors and len(tensors) == len(self._held)
                and all(a is b for a, b in zip(tensors, self._held)))

    def order(self) -> Tensor:
        """int64 CPU tensor: where tensor ``i``'s result sits in the groups' results joined."""
        if self._order is None:
            at = torch.empty(len(self.tensors), dtype=torch.int64)
            at[torch.tensor([i for idx in self.index for i in idx], dtype=torch.int64)] = (
                torch.arange(len(self.tensors)))
            self._order = at
        return self._order

    def layout(self, i: int) -> _Layout | None:
        """Group ``i``'s Triton chunk table, or None if it does not suit the kernels."""
        if i not in self._layouts:
            self._layouts[i] = _layout(self.members[i])
        return self._layouts[i]


def _triton_norms(tensors: list[Tensor], lay: _Layout, p: int) -> tuple[Tensor, Tensor]:
    k = triton_kernels()
    dev = tensors[0].device
    n_t = len(tensors)
    partials = torch.empty(max(lay.n_chunks, 1), dtype=torch.float64, device=dev)
    out = torch.empty(n_t + 1, dtype=torch.float32, device=dev)
    if lay.n_chunks:
        k._norm_partials[(lay.grid,)](tensors[lay.base], lay.starts, lay.lens, partials, lay.n_chunks,
                                      P=p, BLOCK=BLOCK, ALIGN=lay.align,
                                      num_warps=NUM_WARPS)
    k._norm_reduce[(n_t + 1,)](partials, lay.tstart, out, out[n_t:], n_t, P=p, RBLOCK=RBLOCK,
                               num_warps=4)
    return out[:n_t], out[n_t]


def multi_tensor_norms(tensors: list[Tensor], norm_type: float = 2.0, *,
                       allow_cpu: bool = False) -> tuple[Tensor, Tensor] | None:
    """``(per_tensor, total)`` float32 p-norms of same-dtype tensors, or None (no kernel).

    ``per_tensor[i] = ||t_i||_p`` and ``total = ||concat(t)||_p`` for p in {1, 2, inf},
    accumulated in float32 per chunk and in float64 across chunks; finite whenever the true
    norm is representable (see ``_triton``). ``allow_cpu`` lets the Triton interpreter run on
    CPU tensors (tests).
    """
    p = _P_CODE.get(float(norm_type))
    if p is None or not _usable(tensors, allow_cpu):
        return None
    lay = _layout(tensors)
    return None if lay is None else _triton_norms(tensors, lay, p)


def _group_triton_norms(groups: Groups, i: int, norm_type: float,
                        allow_cpu: bool) -> tuple[Tensor, Tensor] | None:
    p = _P_CODE.get(float(norm_type))
    if (p is None or (groups.device.type != "cuda" and not allow_cpu)
            or not _usable(groups.members[i], allow_cpu)):
        return None
    lay = groups.layout(i)
    return None if lay is None else _triton_norms(groups.members[i], lay, p)


def max_abs(tensors: list[Tensor]) -> Tensor:
    """``max |t_i|`` per tensor of one dtype (float32; float64 for float64), 0 when empty."""
    if tensors[0].device.type == "cpu" and not _is_compiling():
        return _cpu.max_abs(tensors)
    return torch.stack(_torch.foreach_norms(tensors, math.inf))


def group_norms(groups: Groups, norm_type: float = 2.0, *, with_max_abs: bool = False,
                allow_cpu: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(per_tensor, total, max_abs)`` of ``groups.tensors``: the one norm dispatcher.

    Per group: on the CPU, p = 2, ``kernels.cpu.l2_norms`` (and ``max |g|`` in the same
    pass); on CUDA with Triton, p in {1, 2, inf}, float16/bfloat16/float32: the Triton
    kernel; otherwise ``torch._foreach_norm`` (``kernels._torch``). ``total`` is the Triton
    kernel's own (reduced in float64 from its partials) or the CPU kernel's (from its
    float64 sums of squares) when one group took it, else None
    (the caller forms it from ``per_tensor``). Norms are float32, float64 when a gradient is
    float64; ``max_abs`` only when asked for. ``allow_cpu``: the Triton interpreter takes CPU
    tensors (tests), in place of the CPU kernel.
    """
    tensors = groups.tensors
    if not tensors:
        empty = torch.zeros(0, dtype=torch.float32)
        return empty, None, (empty if with_max_abs else None)
    if groups.single:
        res = _group_triton_norms(groups, 0, norm_type, allow_cpu)
        if res is not None:
            mx = None
            if with_max_abs:
                mx = res[0] if math.isinf(norm_type) else max_abs(tensors)
            return res[0], res[1], mx
    cpu_l2 = (norm_type == 2.0 and groups.device.type == "cpu" and not _is_compiling()
              and not allow_cpu)
    per: list[Tensor] = []
    maxes: list[Tensor | None] = []
    total: Tensor | None = None
    for i, (dtype, group) in enumerate(zip(groups.dtypes, groups.members)):
        norms: Tensor | list[Tensor] | None = None
        mx: Tensor | None = None
        if cpu_l2 and dtype in _cpu.DTYPES:
            norms, mx, total = _cpu.l2_norms_total(group, with_max_abs)
        elif groups.device.type == "cuda" or allow_cpu:
            res = _group_triton_norms(groups, i, norm_type, allow_cpu)
            norms = None if res is None else res[0]
        if norms is None:
            norms = _torch.foreach_norms(group, norm_type)
        if not isinstance(norms, Tensor):
            norms = torch.stack(norms)
        if with_max_abs and mx is None:
            mx = norms if math.isinf(norm_type) else max_abs(group)
        per.append(norms)
        maxes.append(mx)
    if groups.single:
        # the CPU kernel's total comes from its float64 sums of squares (None: float64)
        return per[0], total if cpu_l2 else None, maxes[0]
    # float64 if any gradient is float64 (torch's total is then float64 too), else float32
    out_dtype = torch.float64 if torch.float64 in groups.dtypes else torch.float32
    return (_scatter(per, groups, out_dtype), None,
            _scatter(maxes, groups, out_dtype) if with_max_abs else None)  # type: ignore[arg-type]


def _scatter(parts: list[Tensor], groups: Groups, dtype: torch.dtype) -> Tensor:
    """The groups' 1-d results back in the tensors' order, as ``dtype``."""
    if parts[0].device.type == "cpu":
        # one gather (the positions are host data: no copy to a device)
        return torch.cat([part.to(dtype) for part in parts])[groups.order()]
    out: list[Tensor | None] = [None] * len(groups.tensors)
    for part, idx in zip(parts, groups.index):
        for j, i in enumerate(idx):
            out[i] = part[j]
    return torch.stack([t.to(dtype) for t in out])  # type: ignore[union-attr]


def multi_tensor_scale_(tensors: list[Tensor], coef: Tensor, *, allow_cpu: bool = False,
                        groups: Groups | None = None) -> None:
    """``t <- t * coef`` in place for every tensor; see the module docstring for the paths.
    ``groups``: the ``Groups`` of this same list from the norm pass (rebuilt when it is of
    another list)."""
    if not tensors:
        return
    if any(t.__name__ == "DTensor" for t in {type(t) for t in tensors}):
        # FSDP2 / TP gradients: scale each rank's local shard in place (the same factor on
        # every rank: ``coef`` comes from the global norm, gradguard.distributed)
        tensors = [t.to_local() if type(t).__name__ == "DTensor" else t for t in tensors]
        if type(coef).__name__ == "DTensor":
            coef = coef.to_local()
    dev = tensors[0].device
    if _usable(tensors, allow_cpu):
        coef32 = coef.reshape(1).to(torch.float32)
        if groups is None or not groups.of(tensors):
            groups = Groups(tensors)  # (a stale chunk table would write where a tensor was)
        rest: list[Tensor] = []
        k = triton_kernels()
        for i, group in enumerate(groups.members):
            lay = groups.layout(i)
            if lay is None:
                rest.extend(group)
            elif lay.n_chunks:
                k._scale[(lay.grid,)](group[lay.base], lay.starts, lay.lens, coef32, lay.n_chunks,
                                      BLOCK=BLOCK, ALIGN=lay.align,
                                      num_warps=NUM_WARPS)
        if rest:
            torch._foreach_mul_(rest, coef)
        return
    if dev.type == "cpu" and coef.device.type == "cpu" and not _is_compiling():
        # A CPU tensor: reading it waits for nothing. x * 1 == x exactly, so skip the pass.
        # float64 gradients clipped by a float64 norm get the float64 factor (as torch)
        cdt = torch.float64 if coef.dtype == torch.float64 else torch.float32
        c = coef.detach().reshape(-1).to(cdt).numpy()[0]
        if c == 1.0:
            return
        _cpu_scale_(tensors, coef, c)
        return
    torch._foreach_mul_(tensors, coef)


_cpu_scale_ = _cpu.scale_  # the CPU scale (a module attribute: tests spy on it)
