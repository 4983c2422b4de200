"""Triton kernels: a persistent multi-tensor norm and a multi-tensor scale.

Imported only when Triton is importable (``gradguard.kernels`` checks). Both kernels walk a
*chunk table* built once per gradient layout (see ``gradguard.kernels._Layout``): chunk ``c``
covers elements ``[start_c, start_c + len_c)`` of the tensor ``owner_c``, and ``start_c`` is
an element offset from a *base* tensor's data pointer (all tensors share one dtype, so
``(ptr_i - ptr_base) / itemsize`` is an exact integer). A persistent grid of ``G`` programs
takes chunks ``pid, pid + G, pid + 2G, ...``.

Norm, pass 1 (``_norm_partials``): for each chunk, in float32,

    s_c = sum_k x_k**2  (p = 2),   sum_k |x_k|  (p = 1),   max_k |x_k|  (p = inf)

written to ``partials[c]`` as float64. When s_c overflowed to inf, or (p = 2) is below
``len_c * 2**-125`` so that underflowed squares could matter, and the chunk's largest
magnitude is finite and non-zero, the chunk is summed again in float64 (whose range holds the
square of any float32); NaN stays NaN. The rare second read keeps the result finite and
correct whenever the true norm is.

Norm, pass 2 (``_norm_reduce``): programs ``0..T-1`` add (max, for inf) the partials of tensor
``t`` in a fixed order, so results are deterministic run to run; program ``T``
reduces all partials into the total. Outputs: ``per_tensor[t]`` and ``total[0]``, float32,
``sqrt`` taken for p = 2.

Scale (``_scale``): ``x <- x * coef`` with ``coef`` read from a 1-element float32 device
tensor (no host read), computed in float32 and rounded once to the tensor dtype. For float32
this is bit for bit ``torch._foreach_mul_``; for float16/bfloat16 gradients and a float32
coefficient torch's CUDA multiply first rounds the coefficient to the gradient dtype (up to
0.4% off for bfloat16, so its clipped norm can exceed ``max_norm``), and the results differ
by at most two units in the last place where that rounding matters. When ``coef == 1``
every program returns at once: no clip, no pass over the gradients, and no host
synchronisation to decide it.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _accumulate(x, acc, amax, P: tl.constexpr):
    ax = tl.abs(x)
    if P == 2:
        acc += x * x
    elif P == 1:
        acc += ax
    else:
        acc += tl.where(x != x, x, 0.0)  # NaN marker: NaN iff a NaN was read
    return acc, tl.maximum(amax, ax)


@triton.jit
def _norm_partials(base_ptr, starts_ptr, lens_ptr, partials_ptr, n_chunks,
                   P: tl.constexpr, BLOCK: tl.constexpr,
                   ALIGN: tl.constexpr):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    for c in range(pid, n_chunks, n_prog):
        start = tl.multiple_of(tl.load(starts_ptr + c), ALIGN)
        length = tl.load(lens_ptr + c)
        # Whole tiles load without a mask: a mask of unknown alignment stops Triton from
        # issuing 16-byte vector loads, which cost half the bandwidth (more for 2-byte types).
        n_full = (length // BLOCK) * BLOCK
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, n_full, BLOCK):
            x = tl.load(base_ptr + start + k + offs).to(tl.float32)
            acc, amax = _accumulate(x, acc, amax, P)
        if n_full < length:
            idx = n_full + offs
            x = tl.load(base_ptr + start + idx, mask=idx < length, other=0.0).to(tl.float32)
            acc, amax = _accumulate(x, acc, amax, P)
        m = tl.max(amax, axis=0)
        s = tl.sum(acc, axis=0)
        if P == 0:
            tl.store(partials_ptr + c, (m + s).to(tl.float64))
        else:
            bad = s == float("inf")
            if P == 2:
                bad = bad | (s < length.to(tl.float32) * 2.350988701644575e-38)
            if bad & (m > 0.0) & (m < float("inf")):
                acc64 = tl.zeros([BLOCK], dtype=tl.float64)
                for k in range(0, length, BLOCK):
                    idx = k + offs
                    x64 = tl.load(base_ptr + start + idx, mask=idx < length,
                                  other=0.0).to(tl.float64)
                    if P == 2:
                        acc64 += x64 * x64
                    else:
                        acc64 += tl.abs(x64)
                tl.store(partials_ptr + c, tl.sum(acc64, axis=0))
            else:
                tl.store(partials_ptr + c, s.to(tl.float64))


@triton.jit
def _norm_reduce(partials_ptr, tstart_ptr, per_ptr, total_ptr, n_tensors,
                 P: tl.constexpr, RBLOCK: tl.constexpr):
    # tstart has n_tensors + 1 entries: tensor t owns chunks [tstart[t], tstart[t + 1]);
    # program n_tensors reduces [tstart[0], tstart[n_tensors]) = all chunks: the total.
    pid = tl.program_id(0)
    is_total = pid >= n_tensors
    lo = tl.load(tstart_ptr + tl.where(is_total, 0, pid))
    hi = tl.load(tstart_ptr + tl.where(is_total, n_tensors, pid + 1))
    offs = tl.arange(0, RBLOCK)
    acc = tl.zeros([RBLOCK], dtype=tl.float64)
    nan = tl.zeros([RBLOCK], dtype=tl.float64)
    for k in range(lo, hi, RBLOCK):
        idx = k + offs
        v = tl.load(partials_ptr + idx, mask=idx < hi, other=0.0)
        if P == 0:
            acc = tl.maximum(acc, v)
            nan += tl.where(v != v, v, 0.0)
        else:
            acc += v
    if P == 0:
        r = tl.max(acc, axis=0) + tl.sum(nan, axis=0)
    else:
        r = tl.sum(acc, axis=0)
    if P == 2:
        r = tl.sqrt(r)
    r = r.to(tl.float32)
    if is_total:
        tl.store(total_ptr, r)
    else:
        tl.store(per_ptr + pid, r)


@triton.jit
def _scale(base_ptr, starts_ptr, lens_ptr, coef_ptr, n_chunks,
           BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    coef = tl.load(coef_ptr).to(tl.float32)
    if coef != 1.0:
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        offs = tl.arange(0, BLOCK)
        for c in range(pid, n_chunks, n_prog):
            start = tl.multiple_of(tl.load(starts_ptr + c), ALIGN)
            length = tl.load(lens_ptr + c)
            n_full = (length // BLOCK) * BLOCK
            for k in range(0, n_full, BLOCK):  # unmasked: vector loads and stores
                ptr = base_ptr + start + k + offs
                x = tl.load(ptr)
                tl.store(ptr, (x.to(tl.float32) * coef).to(x.dtype))
            if n_full < length:
                idx = n_full + offs
                mask = idx < length
                ptr = base_ptr + start + idx
                x = tl.load(ptr, mask=mask)
                tl.store(ptr, (x.to(tl.float32) * coef).to(x.dtype), mask=mask)
