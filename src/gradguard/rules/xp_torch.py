"""The torch backend of ``gradguard.rules.xp``: tensors on any device, no host reads.

Implements exactly the operation list of ``gradguard.rules.xp``. Every operation is a torch
kernel on the tensors' device; nothing here calls ``.item()``, ``bool()`` or ``float()`` on a
tensor, so rules run on CUDA without a synchronisation and trace under ``torch.compile``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .xp import register

__all__ = ["TORCH", "TorchOps"]

_DTYPES = {"f32": torch.float32, "f64": torch.float64, "i64": torch.int64, "bool": torch.bool}


def _device(like: Any) -> torch.device | None:
    return like.device if isinstance(like, Tensor) else None


def _as_tensor(v: Any, like: Tensor) -> Tensor:
    return v if isinstance(v, Tensor) else torch.full((), v, dtype=like.dtype, device=like.device)


class TorchOps:
    """torch tensors on any device."""

    name = "torch"

    @staticmethod
    def full(shape: tuple, value: Any, dtype: str, like: Any = None) -> Tensor:
        dt = _DTYPES[dtype]
        if dt.is_floating_point and math.isfinite(value) and abs(value) > torch.finfo(dt).max:
            value = math.inf if value > 0 else -math.inf
        return torch.full(shape, value, dtype=dt, device=_device(like))

    @staticmethod
    def arange(n: int, dtype: str, like: Any = None) -> Tensor:
        return torch.arange(n, dtype=_DTYPES[dtype], device=_device(like))

    @staticmethod
    def astype(x: Tensor, dtype: str) -> Tensor:
        dt = _DTYPES[dtype]
        return x if x.dtype == dt else x.to(dt)

    @staticmethod
    def concat(xs: Any) -> Tensor:
        return torch.cat([x.reshape(-1) for x in xs])

    @staticmethod
    def where(c: Tensor, a: Any, b: Any) -> Tensor:
        return torch.where(c, a, b)

    @staticmethod
    def minimum(a: Any, b: Any) -> Tensor:
        if not isinstance(a, Tensor):
            a = _as_tensor(a, b)
        elif not isinstance(b, Tensor):
            b = _as_tensor(b, a)
        return torch.minimum(a, b)

    @staticmethod
    def maximum(a: Any, b: Any) -> Tensor:
        if not isinstance(a, Tensor):
            a = _as_tensor(a, b)
        elif not isinstance(b, Tensor):
            b = _as_tensor(b, a)
        return torch.maximum(a, b)

    @staticmethod
    def clamp(x: Tensor, lo: float | None = None, hi: float | None = None) -> Tensor:
        return torch.clamp(x, min=lo, max=hi)

    log = staticmethod(torch.log)
    exp = staticmethod(torch.exp)
    sqrt = staticmethod(torch.sqrt)
    abs = staticmethod(torch.abs)
    floor = staticmethod(torch.floor)
    isfinite = staticmethod(torch.isfinite)
    isnan = staticmethod(torch.isnan)

    @staticmethod
    def sum(x: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
        if x.dtype == torch.bool:
            x = x.to(torch.int64)
        if axis is None:
            return x.sum().reshape([1] * x.dim()) if keepdims else x.sum()
        return x.sum(dim=axis, keepdim=keepdims)

    @staticmethod
    def amax(x: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
        if axis is None:
            return x.amax().reshape([1] * x.dim()) if keepdims else x.amax()
        return x.amax(dim=axis, keepdim=keepdims)

    @staticmethod
    def cumsum(x: Tensor) -> Tensor:
        return torch.cumsum(x, 0)

    @staticmethod
    def sort(x: Tensor) -> Tensor:
        return torch.sort(x).values

    @staticmethod
    def take(x: Tensor, i: Tensor) -> Tensor:
        if isinstance(i, Tensor) and i.dim() == 0 and x.dim() == 1:
            # x[i] with a 0-d index tensor calls .item() (a host sync); a gather does not
            return x.index_select(0, i.reshape(1)).reshape(())
        return x[i]

    @staticmethod
    def searchsorted(s: Tensor, v: Tensor, right: bool = False) -> Tensor:
        return torch.searchsorted(s, v.reshape(1).to(s.dtype), right=right).reshape(())


TORCH = TorchOps()
register(Tensor, TORCH)
