"""Grouping parameters into layers by module path.

A *layer* is the module that owns a parameter: the parameter name as
``model.named_parameters()`` spells it, less its last component::

    encoder.layer.0.attn.weight  ->  encoder.layer.0.attn
    encoder.layer.0.attn.bias    ->  encoder.layer.0.attn
    scale                        ->  scale          (a top-level parameter is its own layer)

The per-layer gradient norm is the L2 norm of all the layer's gradients taken together,
``||g_layer||_2 = sqrt(sum_i ||g_i||_2^2)`` over its parameters i (float64 accumulation on
the device, so squares of float32 norms up to ~1e154 do not overflow).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


def layer_of(name: str) -> str:
    """The module path of a parameter name (``a.b.weight`` -> ``a.b``)."""
    return name.rsplit(".", 1)[0] if "." in name else name


@dataclass
class LayerMap:
    """Parameters -> layers, in first-appearance order of the parameters.

    ``param_names[i]`` belongs to ``layers[index[i]]``.
    """

    param_names: list[str]
    layers: list[str]
    index: list[int]
    _device_index: dict[tuple[str, tuple[bool, ...] | None], Tensor | np.ndarray] = field(
        default_factory=dict)

    @classmethod
    def from_names(cls, names: list[str]) -> LayerMap:
        layers: list[str] = []
        pos: dict[str, int] = {}
        index = []
        for n in names:
            lay = layer_of(n)
            if lay not in pos:
                pos[lay] = len(layers)
                layers.append(lay)
            index.append(pos[lay])
        return cls(list(names), layers, index)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def device_index(self, device: torch.device, mask: tuple[bool, ...] | None = None) -> Tensor:
        """int64 layer index of each parameter (only those where ``mask`` is True), cached."""
        key = (str(device), mask)
        idx = self._device_index.get(key)
        if idx is None:
            sel = self.index if mask is None else [j for j, m in zip(self.index, mask) if m]
            idx = torch.tensor(sel, dtype=torch.int64).to(device)
            self._device_index[key] = idx
        return idx

    def host_index(self, mask: tuple[bool, ...] | None = None) -> np.ndarray:
        """``device_index`` as a numpy array (for statistics that live on the CPU), cached."""
        key = ("numpy", mask)
        idx = self._device_index.get(key)
        if idx is None:
            sel = self.index if mask is None else [j for j, m in zip(self.index, mask) if m]
            idx = np.asarray(sel, dtype=np.int64)
            self._device_index[key] = idx
        return idx


def layer_l2(per_tensor: Tensor, index: Tensor, n_layers: int) -> Tensor:
    """Per-layer L2 norms (float32) from per-tensor L2 norms: ``sqrt(segment_sum(n_i^2))``.

    A layer none of whose parameters has a gradient gets 0; a non-finite per-tensor norm
    makes its layer's norm non-finite (NaN stays NaN, Inf stays Inf).
    """
    sq = per_tensor.to(torch.float64).square()
    out = torch.zeros(n_layers, dtype=torch.float64, device=per_tensor.device)
    out.index_add_(0, index, sq)
    return out.sqrt().to(torch.float32)


def layer_l2_host(per_tensor: np.ndarray, index: np.ndarray, n_layers: int) -> np.ndarray:
    """``layer_l2`` on numpy values (the same float64 sums, in the same order)."""
    sq = np.square(per_tensor, dtype=np.float64)
    return np.sqrt(np.bincount(index, weights=sq, minlength=n_layers)).astype(np.float32)


def layer_max(values: Tensor, index: Tensor, n_layers: int) -> Tensor:
    """Per-layer maximum (float32); NaN propagates, a layer with no entry gets 0."""
    out = torch.zeros(n_layers, dtype=torch.float32, device=values.device)
    return out.scatter_reduce(0, index, values.to(torch.float32), reduce="amax", include_self=True)


def layer_sum(values: Tensor, index: Tensor, n_layers: int, dtype: torch.dtype) -> Tensor:
    """Per-layer sum in ``dtype``."""
    out = torch.zeros(n_layers, dtype=dtype, device=values.device)
    out.index_add_(0, index, values.to(dtype))
    return out
