"""One detector implementation, two array libraries: torch on a device, numpy on the host.

A detector does a few dozen scalar operations per step. As torch kernels on CUDA they cost
nothing the host waits for; as torch operations on CPU tensors they cost 5-30 us each (the
dispatcher's code and tables have just been pushed out of the caches by the clip's pass over
the gradients), about 1 ms a step for the default rules. The same arithmetic on numpy 0-d
arrays costs well under a microsecond per operation. So the detectors are written once
against the small namespace below, and the Monitor hands them numpy values when the
statistics live on the CPU (reading a CPU tensor waits for nothing) and torch tensors
otherwise. State keeps its dtypes (float32, int64, bool) in both, so ``state_dict()`` is the
same either way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

_TORCH_DTYPES = {"f32": torch.float32, "i64": torch.int64, "bool": torch.bool}
_NUMPY_DTYPES = {"f32": np.float32, "i64": np.int64, "bool": np.bool_}


class TorchOps:
    """Tensors on any device: every operation is a kernel, nothing is read on the host."""

    kind = "torch"
    log = staticmethod(torch.log)
    exp = staticmethod(torch.exp)
    sqrt = staticmethod(torch.sqrt)
    isfinite = staticmethod(torch.isfinite)
    isnan = staticmethod(torch.isnan)
    maximum = staticmethod(torch.maximum)
    where = staticmethod(torch.where)
    dot = staticmethod(torch.dot)

    @staticmethod
    def key(x: Tensor) -> tuple:
        return ("torch", x.device)

    @staticmethod
    def clamp_min(x: Tensor, m: float) -> Tensor:
        return torch.clamp(x, min=m)

    @staticmethod
    def clamp_max(x: Tensor, m: float) -> Tensor:
        return torch.clamp(x, max=m)

    @staticmethod
    def f32(x: Tensor) -> Tensor:
        # .to() is a dispatcher call even when nothing changes
        return x if x.dtype == torch.float32 else x.to(torch.float32)

    @staticmethod
    def full(shape: tuple, value: Any, dtype: str, like: Tensor) -> Tensor:
        return torch.full(shape, value, dtype=_TORCH_DTYPES[dtype], device=like.device)

    @staticmethod
    def full_like(x: Tensor, value: float) -> Tensor:
        return torch.full_like(x, value)

    @staticmethod
    def shift_in(ring: Tensor, y: Tensor) -> Tensor:
        """``ring[1:]`` followed by ``y``."""
        return torch.cat([ring[1:], y.reshape(1)])

    @staticmethod
    def mean(x: Tensor) -> Tensor:
        return x.mean()

    @staticmethod
    def any(x: Tensor) -> Tensor:
        return x.any()

    @staticmethod
    def amin(x: Tensor) -> Tensor:
        return x.min()

    @staticmethod
    def amax(x: Tensor) -> Tensor:
        return x.max()

    @staticmethod
    def copy(x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def convert(x: Any, like: Tensor) -> Tensor:
        """``x`` (tensor or numpy) as a tensor on ``like``'s device, same dtype."""
        if not isinstance(x, Tensor):
            x = torch.from_numpy(np.array(x))
        return x.to(like.device)


class NumpyOps:
    """numpy values on the host. Scalars stay numpy scalars (``np.float32``, ``np.int64``,
    ``np.bool_``), whose operators skip the ufunc machinery: a few hundred nanoseconds an
    operation even with cold caches, against several microseconds for 0-d arrays."""

    kind = "numpy"
    log = staticmethod(np.log)
    exp = staticmethod(np.exp)
    sqrt = staticmethod(np.sqrt)
    isfinite = staticmethod(np.isfinite)
    isnan = staticmethod(np.isnan)
    maximum = staticmethod(np.maximum)
    dot = staticmethod(np.dot)

    @staticmethod
    def key(x: Any) -> tuple:
        return ("numpy",)

    @staticmethod
    def where(c: Any, a: Any, b: Any) -> Any:
        if isinstance(c, np.ndarray) or isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            return np.where(c, a, b)
        return a if c else b

    @staticmethod
    def clamp_min(x: Any, m: float) -> Any:
        return np.maximum(x, x.dtype.type(m))

    @staticmethod
    def clamp_max(x: Any, m: float) -> Any:
        return np.minimum(x, x.dtype.type(m))

    @staticmethod
    def f32(x: Any) -> Any:
        if isinstance(x, np.ndarray) and x.ndim:
            return x.astype(np.float32, copy=False)
        return np.float32(x)

    @staticmethod
    def full(shape: tuple, value: Any, dtype: str, like: Any) -> Any:
        if shape == ():
            return _NUMPY_DTYPES[dtype](value)
        return np.full(shape, value, dtype=_NUMPY_DTYPES[dtype])

    @staticmethod
    def full_like(x: Any, value: float) -> Any:
        if isinstance(x, np.ndarray) and x.ndim:
            return np.full_like(x, value)
        return x.dtype.type(value)

    @staticmethod
    def shift_in(ring: np.ndarray, y: Any) -> np.ndarray:
        out = np.empty_like(ring)
        out[:-1] = ring[1:]
        out[-1] = y
        return out

    @staticmethod
    def mean(x: np.ndarray) -> Any:
        return x.mean(dtype=x.dtype)

    @staticmethod
    def any(x: np.ndarray) -> Any:
        return x.any()

    @staticmethod
    def amin(x: np.ndarray) -> Any:
        return x.min()

    @staticmethod
    def amax(x: np.ndarray) -> Any:
        return x.max()

    @staticmethod
    def copy(x: Any) -> Any:
        return np.array(x) if isinstance(x, np.ndarray) else x  # numpy scalars are immutable

    @staticmethod
    def convert(x: Any, like: Any) -> Any:
        a = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
        return a[()] if a.ndim == 0 else a.copy()


TORCH = TorchOps()
NUMPY = NumpyOps()


def namespace(x: Any) -> TorchOps | NumpyOps:
    """The operations for ``x``: numpy for numpy values, torch for tensors."""
    return NUMPY if isinstance(x, (np.ndarray, np.generic)) else TORCH


def to_torch(x: Any) -> Tensor:
    """A CPU tensor copy of a state value (tensor or numpy), for ``state_dict()``."""
    if isinstance(x, Tensor):
        return x.detach().cpu().clone()
    return torch.from_numpy(np.array(x))


def host_value(t: Any) -> Any:
    """A CPU tensor's value as numpy, without a copy (float32 for half dtypes); a 0-d tensor
    gives a numpy scalar."""
    if not isinstance(t, Tensor):
        return t
    if t.requires_grad:
        t = t.detach()
    if not t.is_cpu:  # e.g. a learning-rate tensor on another device
        t = t.cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.to(torch.float32)
    a = t.numpy()
    return a[()] if a.ndim == 0 else a
