"""Multi-tensor norm and scale kernels, chosen per call.

``multi_tensor_norms(tensors, p)``
    Per-tensor and total p-norms (float32) of same-dtype tensors from one read. On CUDA with
    Triton importable, p in {1, 2, inf} and float16/bfloat16/float32 contiguous tensors: two
    Triton launches (a persistent chunked pass writing float64 partials, then a segmented
    reduction; see ``_triton``). Returns None where it does not apply; the caller then uses
    ``torch._foreach_norm``.

``multi_tensor_scale_(tensors, coef)``
    ``t <- t * coef`` for every tensor, ``coef`` a 0-d float32 tensor on their device, never
    read on the host on CUDA. On CUDA with Triton: one launch that returns at once when
    ``coef == 1``. On the CPU: ``coef`` is read (a CPU tensor: no device to wait for), the
    pass is skipped when it is 1, and otherwise float32/float64 tensors are multiplied in
    256K-element chunks by numpy (``_cpu_scale_``) on ``torch.get_num_threads()`` threads
    handed chunks one at a time (an OpenMP region waits for its slowest thread: with the
    other core busy torch's own multiply took 10x longer), in reverse order, so the first
    chunks scaled are the last ones the norm pass read, still in the last-level cache;
    float16/bfloat16 through ``torch._foreach_mul_``. Elsewhere ``torch._foreach_mul_``. The result is the same on
    every path: ``x * coef`` computed in float32, rounded to the tensor's dtype. DTensors
(FSDP2, TP) are scaled through their local shards.

No host synchronisation happens on CUDA: the chunk tables the kernels read are built once
per gradient layout (data pointers, sizes, dtype), copied to the device from pinned memory
without blocking, and cached (``_LAYOUTS``, a few entries, least recently used dropped).
Set ``GRADGUARD_TRITON=0`` to force the ``torch._foreach_*`` paths.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from .cpu import CHUNK as _CPU_CHUNK  # one CPU chunk for the norm and the scale
from .cpu import PARALLEL_MIN as _CPU_PARALLEL_MIN
from .cpu import SMALL as _CPU_SMALL

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
    if lay is None:
        return None
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


def multi_tensor_scale_(tensors: list[Tensor], coef: Tensor, *, allow_cpu: bool = False) -> None:
    """``t <- t * coef`` in place for every tensor; see the module docstring for the paths."""
    if not tensors:
        return
    if any(type(t).__name__ == "DTensor" for t in tensors):
        # FSDP2 / TP gradients: scale each rank's local shard in place (the same factor on
        # every rank: ``coef`` comes from the global norm, gradguard.distributed)
        tensors = [t.to_local() if type(t).__name__ == "DTensor" else t for t in tensors]
        if type(coef).__name__ == "DTensor":
            coef = coef.to_local()
    dev = tensors[0].device
    if _usable(tensors, allow_cpu):
        coef32 = coef.reshape(1).to(torch.float32)
        groups: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            groups.setdefault(t.dtype, []).append(t)
        rest: list[Tensor] = []
        k = triton_kernels()
        for group in groups.values():
            lay = _layout(group)
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




def _cpu_scale_(tensors: list[Tensor], coef: Tensor, c: float) -> None:
    """``t *= c`` for CPU tensors, ``c`` the value of ``coef`` (float32, or float64 when
    ``coef`` is): bit for bit what
    ``torch._foreach_mul_(tensors, coef)`` writes (one IEEE float32/float64 multiply)."""
    import numpy as np

    from .. import _pool

    arrays: list = []
    scalars: list = []
    rest: list[Tensor] = []
    c32 = np.float32(c)
    c64 = np.float64(c)  # c is float32 (then c64 == c32 exactly) or a float64 factor
    done: list[Tensor] = []
    for t in reversed(tensors):
        # small tensors go to one torch._foreach_mul_ (a C++ loop, the same bits): per
        # tensor, numpy's setup costs more than the multiply
        if (t.dtype in (torch.float32, torch.float64) and t.numel() > _CPU_SMALL
                and t.is_contiguous() and not t.is_neg() and not t.requires_grad):
            done.append(t)
            a = t.detach().view(-1).numpy()
            sc = c32 if t.dtype == torch.float32 else c64
            for start in range(((a.size - 1) // _CPU_CHUNK) * _CPU_CHUNK, -1, -_CPU_CHUNK):
                arrays.append(a[start: start + _CPU_CHUNK])
                scalars.append(sc)
        else:
            rest.append(t)

    def work(j: int) -> None:
        np.multiply(arrays[j], scalars[j], out=arrays[j])

    total = sum(a.size for a in arrays)
    _pool.run_indexed(len(arrays), work, _pool.threads() if total >= _CPU_PARALLEL_MIN else 1,
                      context=lambda: np.errstate(all="ignore"))
    if done:
        # as an in-place torch op would: autograd sees that these tensors changed
        from torch.autograd.graph import increment_version
        increment_version(done)
    if rest:
        torch._foreach_mul_(rest[::-1], coef)
