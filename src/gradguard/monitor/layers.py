"""Grouping parameters into layers by module path.

A *layer* is the module that owns a parameter: the parameter name as
``model.named_parameters()`` spells it, less its last component::

    encoder.layer.0.attn.weight  ->  encoder.layer.0.attn
    encoder.layer.0.attn.bias    ->  encoder.layer.0.attn
    scale                        ->  scale          (a top-level parameter is its own layer)
    rnn.weight_hh_l1_reverse     ->  rnn.l1_reverse (each stacked layer and direction of an
                                                     nn.LSTM / nn.GRU / nn.RNN)

The per-layer gradient norm is the L2 norm of all the layer's gradients taken together,
``||g_layer||_2 = sqrt(sum_i ||g_i||_2^2)`` over its parameters i (float64 accumulation on
the device, so squares of float32 norms up to ~1e154 do not overflow).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

# torch's recurrent modules (nn.RNN, nn.LSTM, nn.GRU) keep every stacked layer and direction
# in one module: weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0, weight_hr_l0 (LSTM
# projections), with a _reverse suffix for the backward direction
_RECURRENT = re.compile(r"^(?:weight|bias)_(?:ih|hh|hr)_l(\d+)(_reverse)?$")


def layer_of(name: str) -> str:
    """The module path of a parameter name (``a.b.weight`` -> ``a.b``); a stacked recurrent
    layer of an ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` is a layer of its own
    (``lstm.weight_hh_l1`` -> ``lstm.l1``, ``lstm.bias_ih_l0_reverse`` -> ``lstm.l0_reverse``)."""
    module, _, leaf = name.rpartition(".")
    m = _RECURRENT.match(leaf)
    if m:
        part = f"l{m.group(1)}{m.group(2) or ''}"
        return f"{module}.{part}" if module else part
    return module if module else name


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
