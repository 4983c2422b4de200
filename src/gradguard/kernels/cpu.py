"""CPU kernels: L2 norms of many tensors of one dtype, each read once; max |g|; the scale.

Accumulation is float32 or wider whatever the gradient dtype, and float64 for float64
gradients (the result is then a float64 norm, as torch's):

* **With the native kernel** (``kernels._native``, a C loop compiled on first use; float32,
  bfloat16, float16) every tensor is read in place from a chunk table cached by the tensors'
  sizes (``_Plan``: a tensor is one chunk, a large one ``CHUNK``-element chunks): each chunk
  widened in registers, squared and added in float32 within 512-element blocks per stream,
  in float64 across them, max |g| on request in the same pass. On one thread the whole pass
  (per-tensor norms, and the total from the float64 sums) is one C call, else the chunks are
  handed to the thread pool (``gradguard._pool``) one at a time. A chunk whose float32 sum
  overflowed (``s_j = inf``) or is below ``n_j * TINY`` (underflowed squares could matter: n
  denormal squares are each off by at most 2**-150, so below n * 2**-125 the error could
  exceed float32 rounding; exact zeros included) is summed again exactly in float64 by the
  kernel (a float32 square fits float64's range and mantissa).
* **Without it** (no compiler, ``GRADGUARD_NATIVE=0``) and for float64: small tensors (at
  most ``SMALL`` elements each; thousands of biases and norms' scales) are packed ``CHUNK``
  elements at a time into one flat buffer by one C++ call (``torch.cat`` when all are 1-D,
  else ``torch._C._nn.flatten_dense_tensors``), widened to float64 and squared there, and
  summed per tensor by ``np.add.reduceat``. Large tensors are cut into ``CHUNK``-element
  chunks handed to the pool one at a time; each worker widens its own chunk into a per-thread
  float32 buffer (float16: torch's F16C conversion in 32K blocks, which torch runs on the
  calling thread; bfloat16: the 16 bits shifted into a float32's high half; both exact) and
  takes the BLAS dot product ``s_j = sum x**2`` in float32 (float64), plus on request the
  chunk's max and min while it is in the cache. A chunk whose sum overflowed or is tiny is
  recomputed exactly by the same worker: float32 and narrower in float64, float64 rescaled
  by its largest magnitude m, ``s = m**2 * sum((x/m)**2)``; a chunk of exact zeros (the
  common case of a frozen or unused layer) is not recomputed.

Per tensor the ``s_j`` are added in float64: ``||g_i||_2 = sqrt(sum_j s_j)``. NaN stays NaN.
The flags are CPU values: reading them waits for no device.

A float64 tensor whose sum of squares overflows float64 (norm above ~1.3e154; torch gives
inf) is normed again whole, max-normalised, so its norm is finite when it fits float64.
"""

from __future__ import annotations

import operator
import threading

import numpy as np
import torch
from torch import Tensor

from .. import _pool
from . import _native

#: elements per CPU chunk (1 MiB of float32): the unit of work of the norm and scale passes.
#: torch's CPU norm adds a tensor's squares in one float32 stream (off by ~1e-3 relative on
#: a 38M-element tensor); over chunks this size added in float64 the error is ~1e-6.
CHUNK = 1 << 18
#: below this many elements in all one thread works (handing work to the pool costs ~50 us)
PARALLEL_MIN = 1 << 22
#: tensors of at most this many elements are packed together (the small-tensor path)
SMALL = 1 << 12
#: dtypes this kernel takes
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: a float32 (float64) sum of squares below n * TINY may have lost underflowed squares
TINY = {torch.float32: 2.0 ** -125, torch.float64: 2.0 ** -968}
#: the dtypes the native kernel (``kernels._native``) takes, by its kind codes
_KIND = {torch.float32: _native.F32, torch.bfloat16: _native.BF16, torch.float16: _native.F16}



def _quiet() -> np.errstate:
    # float32 sums of squares may overflow (rescued) and NaN may meet NaN: no warnings
    return np.errstate(over="ignore", invalid="ignore", under="ignore")


def _numpy(flat: Tensor) -> np.ndarray:
    """A numpy view of a flat contiguous CPU tensor (bfloat16: its bits as uint16)."""
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


_DTYPE = operator.attrgetter("dtype")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")

_local = threading.local()  # per thread: float32 / uint32 buffers the widening writes into
_BLOCK = 1 << 15  # torch's copy runs on the calling thread (no OpenMP team) below its grain


def _buffer(n: int, kind: str) -> np.ndarray:
    buf = getattr(_local, kind, None)
    if buf is None or buf.size < n:
        # one buffer per thread, reused: a fresh 1 MiB array per chunk costs page faults
        buf = np.empty(max(n, CHUNK + SMALL), dtype=np.float32 if kind == "f32" else np.uint32)
        setattr(_local, kind, buf)
    return buf[:n]


def _widen(a: np.ndarray) -> np.ndarray:
    """float16 / bfloat16 -> float32 (exact) into this thread's buffer; wider unchanged.

    bfloat16 (its bits as uint16) is the high half of a float32: one vectorised shift.
    float16 goes through torch's vectorised (F16C) conversion, in blocks small enough that
    torch runs them on this thread (numpy's float16 cast is ~50x slower)."""
    if a.dtype == np.uint16:
        out = _buffer(a.size, "u32")
        np.left_shift(a, 16, out=out, dtype=np.uint32)
        return out.view(np.float32)
    if a.dtype == np.float16:
        out = _buffer(a.size, "f32")
        src, dst = torch.from_numpy(a), torch.from_numpy(out)
        for k in range(0, a.size, _BLOCK):
            dst[k: k + _BLOCK].copy_(src[k: k + _BLOCK])
        return out
    return a


def _exact_sumsq(a: np.ndarray) -> float:
    """Sum of squares of one (widened) chunk without overflow or underflow; 0 for zeros."""
    if not a.any():
        return 0.0
    if a.dtype != np.float64:
        b = a.astype(np.float64)
        return float(np.dot(b, b))
    m = max(float(a.max()), -float(a.min()))
    if not np.isfinite(m):
        return m if m == m else float("nan")
    c = a / m
    return m * m * float(np.dot(c, c))


def _small(grads: list[Tensor], idx: np.ndarray, sizes: np.ndarray, sums: np.ndarray,
           mx: np.ndarray | None, tiny: float, tiny_nz: np.ndarray) -> None:
    """Sums of squares (and max |g|) of the small non-empty tensors ``grads[i], i in idx``
    (``sizes``: their element counts), packed about ``CHUNK`` elements at a time."""
    cum = np.cumsum(sizes)
    batch = (cum - 1) // CHUNK  # a batch ends with the tensor that crosses a CHUNK boundary
    cuts = [0, *(np.flatnonzero(np.diff(batch)) + 1).tolist(), len(idx)]
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        rows = idx[lo:hi]
        batch_t = [grads[i] for i in rows.tolist()]
        with torch.no_grad():  # one C++ call: contiguous, flatten, concatenate
            if all(t.dim() == 1 for t in batch_t):
                flat = torch.cat(batch_t)  # (biases, norm scales: 4x faster, no views made)
            else:
                flat = torch._C._nn.flatten_dense_tensors(batch_t)
        sz = sizes[lo:hi]
        offsets = np.zeros(len(sz), dtype=np.int64)
        np.cumsum(sz[:-1], out=offsets[1:])
        a = _widen(_numpy(flat.resolve_neg()))
        a64 = a.astype(np.float64)
        s = np.add.reduceat(a64 * a64, offsets)
        if a.dtype == np.float64 and ((s == np.inf) | (s < sz * tiny)).any():
            # float64 squares may over/underflow: rescue those rows (zeros are no suspects)
            nonzero = np.add.reduceat(a != 0, offsets) > 0
            for r in np.flatnonzero((s == np.inf) | ((s < sz * tiny) & nonzero)).tolist():
                o = offsets[r]
                s[r] = _exact_sumsq(a[o: o + sz[r]])
                tiny_nz[rows[r]] = s[r] < sz[r] * tiny
        sums[rows] = s
        if mx is not None:
            mx[rows] = np.maximum.reduceat(np.abs(a64), offsets)  # NaN propagates


def l2_norms(grads: list[Tensor], with_max_abs: bool = False) -> tuple[Tensor, Tensor | None]:
    """L2 norms of CPU tensors of one dtype in ``DTYPES``, and on request ``max |g_i|``.

    Returns float64 tensors for float64 gradients, float32 otherwise; see the module
    docstring for the math. The norms do not depend on ``with_max_abs``, bit for bit.
    """
    norms, max_abs, _ = l2_norms_total(grads, with_max_abs)
    return norms, max_abs


def l2_norms_total(grads: list[Tensor], with_max_abs: bool = False
                   ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``l2_norms`` and the total norm ``sqrt(sum_i ||g_i||**2)`` taken from the float64 sums
    of squares (0-d, float32), or None for float64 gradients (their sums may overflow: the
    caller forms the total from the per-tensor norms, max-rescaled)."""
    dtype = grads[0].dtype
    kind = _KIND.get(dtype)
    native = _native.lib() if kind is not None else None
    if native is not None:
        return _native_norms(native, kind, grads, with_max_abs)  # type: ignore[arg-type]
    tiny = TINY[torch.float64 if dtype == torch.float64 else torch.float32]
    out_np = np.float64 if dtype == torch.float64 else np.float32
    n_t = len(grads)
    sums = np.zeros(n_t, dtype=np.float64)
    mx = np.zeros(n_t, dtype=np.float64) if with_max_abs else None
    numel = np.fromiter(map(Tensor.numel, grads), dtype=np.int64, count=n_t)
    # per tensor: a non-zero chunk whose exact sum of squares is still tiny (float64 only)
    tiny_nz = np.zeros(n_t, dtype=bool)
    small = np.flatnonzero((numel > 0) & (numel <= SMALL))
    big = np.flatnonzero(numel > SMALL)
    with _quiet():
        if len(small):
            _small(grads, small, numel[small], sums, mx, tiny, tiny_nz)
        if len(big):
            arrays: list[np.ndarray] = []
            owner: list[int] = []
            for i in big.tolist():
                a = _numpy(grads[i].detach().reshape(-1).resolve_neg())
                for start in range(0, a.size, CHUNK):
                    arrays.append(a[start: start + CHUNK])
                    owner.append(i)
            _large(arrays, owner, sums, mx, tiny, tiny_nz)
    with np.errstate(over="ignore"):  # beyond float32's range: inf, silently (as torch)
        norms = np.sqrt(sums).astype(out_np)
        total = (None if dtype == torch.float64
                 else torch.from_numpy(np.array(np.sqrt(sums.sum()), dtype=np.float32)))
    if dtype == torch.float64:
        # a float64 norm above ~1.3e154 (below ~1e-146) overflows (underflows) its sum of
        # squares: such a tensor (rare) is normed whole, max-normalised: ||g|| = m ||g / m||
        for i in np.flatnonzero((sums == np.inf) | ((sums < numel * tiny) & tiny_nz)).tolist():
            g = grads[i].detach()
            m = torch.linalg.vector_norm(g, float("inf"))
            if bool(torch.isfinite(m)) and bool(m > 0):
                norms[i] = float(torch.linalg.vector_norm(g / m) * m)
    max_abs = None if mx is None else torch.from_numpy(mx.astype(out_np))
    return torch.from_numpy(norms), max_abs, total


def _large(arrays: list[np.ndarray], owner: list[int], sums: np.ndarray,
           mx: np.ndarray | None, tiny: float, tiny_nz: np.ndarray) -> None:
    k = len(arrays)
    sq = np.empty(k, dtype=np.float64)
    ext = np.empty((k, 2) if mx is not None else (0, 2), dtype=np.float64)
    low = np.zeros(k, dtype=bool)  # a non-zero chunk whose exact sum is still tiny

    def work(j: int) -> None:
        a = _widen(arrays[j])  # this thread's own widened copy (float16 / bfloat16)
        s = float(np.dot(a, a))
        if mx is not None:  # while the chunk is in this core's cache
            ext[j, 0] = a.max()
            ext[j, 1] = -a.min()
        # NaN compares False both ways: left alone; inf or tiny (zeros excepted): exact
        if s == np.inf or (s < a.size * tiny and (s > 0.0 or a.any())):
            s = _exact_sumsq(a)
            low[j] = s < a.size * tiny  # float64 below ~1e-146: the tensor is normed whole
        sq[j] = s

    total = sum(a.size for a in arrays)
    _pool.run_indexed(k, work, _pool.threads() if total >= PARALLEL_MIN else 1, context=_quiet)
    own = np.asarray(owner, dtype=np.int64)
    sums += np.bincount(own, weights=sq, minlength=len(sums))
    tiny_nz[own[low]] = True
    if mx is not None:
        with np.errstate(invalid="ignore"):
            np.maximum.at(mx, own, ext.max(axis=1) + 0.0)  # propagates NaN; -0.0 -> 0.0


class _Plan:
    """The native pass's chunk table for one list of tensor sizes (cached: a training loop's
    gradients keep their sizes): every non-empty tensor is one chunk, a large one is cut into
    ``CHUNK``-element chunks; ``tensor_of[j]``, ``start[j]`` (bytes), ``lens[j]`` of chunk j,
    and ``first``, the first chunk of each non-empty tensor (``nonempty``)."""

    def __init__(self, sizes: tuple[int, ...], itemsize: int):
        numel = np.array(sizes, dtype=np.int64)
        counts = (numel + CHUNK - 1) // CHUNK
        first = np.cumsum(counts) - counts
        self.tensor_of = np.repeat(np.arange(len(numel)), counts)
        starts = (np.arange(int(counts.sum()), dtype=np.int64) - first[self.tensor_of]) * CHUNK
        self.lens = np.minimum(numel[self.tensor_of] - starts, CHUNK)
        self.start_bytes = starts * itemsize
        self.nonempty = np.flatnonzero(counts > 0)
        self.first = first[self.nonempty]
        self.elements = int(numel.sum())


_PLANS: dict[tuple, _Plan] = {}
_PLANS_MAX = 16


def _plan(sizes: tuple[int, ...], itemsize: int) -> _Plan:
    key = (sizes, itemsize, CHUNK)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(sizes, itemsize)
    return plan


def _native_norms(native: _native.Native, kind: str, grads: list[Tensor],
                  with_max_abs: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """``l2_norms_total`` by the native kernel: one pass per chunk, widened in registers;
    on one thread the whole pass (chunk sums, per-tensor norms, total) is one C call (a small
    model: each numpy or torch call after a backward pass costs a cold cache), else chunk by
    chunk on the thread pool. A sign bit (``is_neg``) changes no square nor magnitude: such
    views are read as they lie; a non-contiguous gradient is read from a contiguous copy."""
    if not all(map(Tensor.is_contiguous, grads)):
        # (a strided view: the kernel reads each tensor flat)
        grads = [g if g.is_contiguous() else g.detach().contiguous() for g in grads]
    plan = _plan(tuple(map(Tensor.numel, grads)), grads[0].element_size())
    n_t = len(grads)
    bases = np.fromiter(map(Tensor.data_ptr, grads), dtype=np.int64, count=n_t)
    lens = plan.lens
    k = len(lens)
    sq = np.empty(k, dtype=np.float64)
    ext = np.empty(k, dtype=np.float32) if with_max_abs else None
    norms = np.zeros(n_t, dtype=np.float32)
    total = np.zeros((), dtype=np.float32)
    tiny = TINY[torch.float32]
    # chunks whose float32 sum is inf or tiny (exact zeros too) are summed again exactly in
    # float64 by the kernel itself
    if plan.elements < PARALLEL_MIN or _pool.threads() == 1 or k == 1:
        native.norms_plan(kind, bases, plan.tensor_of, plan.start_bytes, lens, tiny, sq, ext,
                          norms, total)
    else:
        plist = (bases[plan.tensor_of] + plan.start_bytes).tolist()
        nlist = lens.tolist()
        want_max = ext is not None

        def work(j: int) -> None:
            sq[j], m = native.sumsq_checked(kind, plist[j], nlist[j], tiny, want_max)
            if want_max:
                ext[j] = m  # type: ignore[index]

        _pool.run_indexed(k, work, _pool.threads())
        sums = np.zeros(n_t, dtype=np.float64)
        sums[plan.nonempty] = np.add.reduceat(sq, plan.first)
        with _quiet():
            norms = np.sqrt(sums).astype(np.float32)  # beyond float32's range: inf (as torch)
            total = np.array(np.sqrt(sums.sum()), dtype=np.float32)
    max_abs = None
    if ext is not None:
        mx = np.zeros(n_t, dtype=np.float32)
        if k:
            mx[plan.nonempty] = np.maximum.reduceat(ext, plan.first)  # NaN propagates
        max_abs = torch.from_numpy(mx)
    return torch.from_numpy(norms), max_abs, torch.from_numpy(total)


def max_abs(grads: list[Tensor]) -> Tensor:
    """``max |g|`` per CPU tensor (float32; float64 for float64), block by block through
    numpy's ``max`` and ``min`` (4x faster than ``torch.aminmax``; ``_foreach_norm(inf)`` is
    20x slower on the CPU). NaN propagates; empty tensors give 0."""
    out = np.zeros(len(grads), dtype=np.float64)
    for j, g in enumerate(grads):
        if g.numel() == 0:
            continue
        if g.dtype in (torch.float32, torch.float64, torch.float16) and g.layout == torch.strided:
            a = g.detach().reshape(-1).numpy()
            # block by block: min reads what max just brought into the cache
            blocks = [a[s: s + CHUNK] for s in range(0, a.size, CHUNK)]
            ext = np.array([(b.max(), -b.min()) for b in blocks], dtype=np.float64)
            with np.errstate(invalid="ignore"):
                out[j] = ext.max()  # numpy's max propagates NaN
        else:
            lo_t, hi_t = torch.aminmax(g.detach().reshape(-1))
            out[j] = float(torch.maximum(hi_t, -lo_t).double())
    wide = bool(grads) and grads[0].dtype == torch.float64
    return torch.from_numpy(out.astype(np.float64 if wide else np.float32))


def scale_(tensors: list[Tensor], coef: Tensor, c: float) -> None:
    """``t *= c`` for CPU tensors, ``c`` the value of ``coef`` (float32, or float64 when
    ``coef`` is): bit for bit what ``torch._foreach_mul_(tensors, coef)`` writes (one IEEE
    float32/float64 multiply; bfloat16/float16 multiplied in float32, rounded to nearest even).

    float32/bfloat16/float16 tensors (contiguous, no sign-bit view, no autograd history) go
    to the native kernel (``kernels._native``, four streams per chunk) from the cached chunk
    table, last chunk first, so the first chunks scaled are the last ones the norm pass read,
    still in the last-level cache: on one thread in one call; on more, chunks are handed to
    the thread pool one at a time (an OpenMP region waits for its slowest thread: with the
    other core busy torch's own multiply took 10x longer). Large float64 tensors (and float32
    without the native kernel) are multiplied by numpy in ``CHUNK``-element chunks the same
    way. The rest goes to one ``torch._foreach_mul_`` (a C++ loop, the same bits)."""
    if _native_scale(tensors, c):  # the common case: all of them
        return
    groups: dict[str, list[Tensor]] = {}  # native kind -> its tensors
    arrays: list = []
    scalars: list = []
    rest: list[Tensor] = []
    done: list[Tensor] = []
    c32 = np.float32(c)
    c64 = np.float64(c)  # c is float32 (then c64 == c32 exactly) or a float64 factor
    native = _native.lib() if any(t.dtype in _KIND for t in tensors) else None
    for t in tensors:
        plain = t.is_contiguous() and not t.is_neg() and not t.requires_grad
        kind = _KIND.get(t.dtype, "")
        if plain and native is not None and native.can_scale(kind):
            groups.setdefault(kind, []).append(t)
        elif plain and t.numel() > SMALL and t.dtype in (torch.float32, torch.float64):
            done.append(t)
            a = t.detach().view(-1).numpy()
            sc = c32 if t.dtype == torch.float32 else c64
            for start in range(0, a.size, CHUNK):
                arrays.append(a[start: start + CHUNK])
                scalars.append(sc)
        else:
            rest.append(t)
    for group in groups.values():
        _native_scale(group, c)
    if arrays:
        arrays.reverse()
        scalars.reverse()
        total = sum(a.size for a in arrays)
        _pool.run_indexed(len(arrays), lambda j: np.multiply(arrays[j], scalars[j], out=arrays[j]),
                          _pool.threads() if total >= PARALLEL_MIN else 1,
                          context=lambda: np.errstate(all="ignore"))
        # as an in-place torch op would: autograd sees that these tensors changed
        from torch.autograd.graph import increment_version
        increment_version(done)
    if rest:
        torch._foreach_mul_(rest, coef)


def _native_scale(tensors: list[Tensor], c: float) -> bool:
    """``scale_`` of ``tensors`` by the native kernel when every one is of one native dtype,
    contiguous, no sign-bit view and without autograd history: all of them (small ones
    too) from the cached chunk table, last chunk first. False (nothing done) else."""
    kind = _KIND.get(tensors[0].dtype)
    if kind is None or len(set(map(_DTYPE, tensors))) != 1:
        return False
    native = _native.lib()
    if (native is None or not native.can_scale(kind) or not all(map(Tensor.is_contiguous, tensors))
            or any(map(Tensor.is_neg, tensors)) or any(map(_REQUIRES_GRAD, tensors))):
        return False
    plan = _plan(tuple(map(Tensor.numel, tensors)), tensors[0].element_size())
    bases = np.fromiter(map(Tensor.data_ptr, tensors), dtype=np.int64, count=len(tensors))
    c32 = float(np.float32(c))  # torch multiplies float32 and half dtypes by a float32 factor
    if plan.elements < PARALLEL_MIN or _pool.threads() == 1:
        native.scale_plan(kind, bases, plan.tensor_of, plan.start_bytes, plan.lens, c32)
    else:
        plist = (bases[plan.tensor_of] + plan.start_bytes)[::-1].tolist()
        nlist = plan.lens[::-1].tolist()
        _pool.run_indexed(len(plist), lambda j: native.scale(kind, plist[j], nlist[j], c32),
                          _pool.threads())
    # as an in-place torch op would: autograd sees that these tensors changed
    from torch.autograd.graph import increment_version
    increment_version(tensors)
    return True
