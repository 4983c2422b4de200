"""The torch fallback of the norm kernels: ``torch._foreach_norm`` where no faster kernel
applies (other devices, p not 2 on the CPU, non-Triton dtypes, and while ``torch.compile``
traces).

Accumulation is float32 (float64 for float64 gradients). p-norms other than 1, 2 and inf are
max-normalised per tensor (``||g||_p = m ||g/m||_p``, m = max |g|), so ``|x|**p`` neither
overflows nor underflows; empty tensors get 0 (torch refuses their inf-norm).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: p-norms computed max-normalised here: every p but 1, 2 (rescued by the other kernels) and
#: inf (a max cannot overflow); |x|**p leaves float32's range for |x| > 3e4 at p = 8, and
#: underflows for |x| < 1e-6
PLAIN_P = (1.0, 2.0, math.inf)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient of ``dtype`` is normed in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scaled_norms(full: list[Tensor], norm_type: float, out: torch.dtype) -> list[Tensor]:
    """p-norms of non-empty tensors, max-normalised: ``||g||_p = m * ||g / m||_p`` with
    ``m = max |g|`` (exact, cannot overflow), so ``|g/m|**p <= 1`` neither overflows nor
    (for the elements that matter) underflows; the scaled norms accumulate in float64 where
    the device has it. NaN and Inf propagate (m non-finite: the norm of g itself)."""
    m = torch._foreach_norm(full, math.inf)
    scale = [torch.where((x > 0) & torch.isfinite(x), x, torch.ones_like(x)).to(acc_dtype(g.dtype))
             for x, g in zip(m, full)]
    scaled = torch._foreach_div([g.to(acc_dtype(g.dtype)) for g in full], scale)
    wide = torch.float32 if full[0].device.type == "mps" else torch.float64
    got = torch._foreach_norm(scaled, norm_type, dtype=wide)
    return [(n * s.to(wide)).to(out) for n, s in zip(got, scale)]


def foreach_norms(group: list[Tensor], norm_type: float) -> list[Tensor]:
    """``torch._foreach_norm`` in float32 (float64 for float64) of same-dtype tensors; p not
    in {1, 2, inf} max-normalised (``scaled_norms``); empty tensors get 0."""
    full = [g for g in group if g.numel()]
    out = acc_dtype(group[0].dtype)
    if not full:
        got: list[Tensor] = []
    elif norm_type in PLAIN_P:
        got = list(torch._foreach_norm(full, norm_type, dtype=out))
    else:
        got = scaled_norms(full, norm_type, out)
    if len(full) == len(group):
        return got
    it = iter(got)
    zero = torch.zeros((), dtype=out, device=group[0].device)
    return [next(it) if g.numel() else zero for g in group]
