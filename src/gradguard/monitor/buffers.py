"""The Monitor's buffers: where a step's numbers wait for the next flush, on the device.

Three buffers, allocated at the first ``record`` on the statistics' device:

* the **step buffer**, ``flush_every`` rows of float32: ``STEP_COLS``, then three cells per
  detector (``fired``, ``value``, ``baseline``), then ``has_loss``; plus host arrays for what
  the host already knows (step number, wall time, a float learning rate) and, when a step has
  several param groups, their learning rates (``lrs``: a float64 numpy array when they are
  numbers or CPU tensors, a float64 device tensor, stacked on the device, when one of them is
  a device tensor: read at the flush, never in the step);
* the **layer buffer**, one ``(LAYER_STATS, layers)`` float64 slab per layer step of the
  interval (filled by ``layer_stats``);
* the **flight recorder**, a ring of ``recorder_steps + flush_every`` rows of per-layer
  gradient norms, one row per step, so that the ``recorder_steps`` steps before an event are
  still there when the flush that sees the event runs.

One row builder, :func:`step_row`, writes a step's row in either of two forms chosen once per
run: **device cells** (0-d tensors stacked into the buffer row by one ``torch.stack``, no host
read) or **host cells** (numpy scalars written into a numpy view of a CPU buffer, no torch
operation: reading a CPU tensor waits for nothing). The same expressions in the same order
produce both, so the two forms cannot drift apart.

``snapshot`` copies the filled part to the host (non-blocking into pinned memory on CUDA,
with an event the writer thread waits on) and empties the buffers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _xp
from .layers import LayerMap, layer_l2, layer_l2_host

STEP_COLS = ("loss", "lr", "total_norm", "total_norm_after", "clip_coef", "threshold",
             "clipped", "skipped", "nonfinite", "loss_scale")
LAYER_STATS = ("grad_norm", "grad_max_abs", "nonfinite_count", "param_norm", "update_ratio")


class DeviceCells:
    """Row cells as 0-d tensors on ``device`` (stacked into the buffer row; no host read)."""

    host = False

    def __init__(self, device: torch.device):
        self.device = device
        self.nan = torch.full((), math.nan, dtype=torch.float32, device=device)
        self._flags = (torch.zeros((), dtype=torch.bool, device=device),
                       torch.ones((), dtype=torch.bool, device=device))

    def value(self, x: Any) -> Any:
        return x

    def first(self, x: Any) -> Any:
        """An optional scalar (None, a tensor's first element, a number) as float32."""
        if x is None:
            return self.nan
        if isinstance(x, Tensor):
            t = x.detach().reshape(-1)[0] if x.numel() else self.nan
            return t.to(self.device, torch.float32, non_blocking=True)
        return torch.full((), float(x), dtype=torch.float32, device=self.device)

    def optional(self, x: Tensor | None) -> Any:
        return self.nan if x is None else x.to(self.device)

    def flag(self, b: bool) -> Tensor:
        return self._flags[bool(b)]


class HostCells:
    """Row cells as numpy scalars read from CPU tensors without a copy."""

    host = True
    nan = math.nan

    value = staticmethod(_xp.host_value)

    def first(self, x: Any) -> Any:
        if x is None:
            return math.nan
        if isinstance(x, Tensor):
            return _xp.host_value(x.reshape(-1)[0]) if x.numel() else math.nan
        return float(x)

    def optional(self, x: Tensor | None) -> Any:
        return math.nan if x is None else _xp.host_value(x)

    def flag(self, b: bool) -> bool:
        return bool(b)


def step_row(cells: DeviceCells | HostCells, stats: Any, total: Any, loss: Any, skipped: Any,
             lr: Any, loss_scale: Any, detector_cells: list[Any]) -> list[Any]:
    """The buffer row of one step, in the column order of ``StepBuffer.columns``.

    ``total`` and ``loss`` are the step's total norm and loss in the cells' form (0-d tensors,
    or float32 numpy scalars; ``loss`` None when the step has none), ``detector_cells`` the
    ``(fired, value, baseline)`` of every detector, flattened in detector order.
    """
    coef = cells.value(stats.clip_coef)
    own_after = getattr(stats, "norm_after", None)  # AGC: finite where total overflowed
    after = total * coef if own_after is None else cells.value(own_after)
    row = [cells.nan if loss is None else loss,
           cells.first(lr) if isinstance(lr, Tensor) else cells.nan,  # a float lr goes to the host array
           total, after, coef,  # ClipStats.total_norm_after
           cells.optional(getattr(stats, "threshold", None)),
           cells.value(stats.clipped), cells.value(skipped), cells.value(stats.nonfinite),
           cells.first(loss_scale)]
    row += [cells.value(v) for v in detector_cells]
    row.append(cells.flag(loss is not None))
    return row


class StepBuffer:
    """Step buffer, layer buffer and flight recorder of one run on one device."""

    def __init__(self, device: torch.device, columns: list[str], flush_every: int,
                 layer_every: int, recorder_steps: int, layer_map: LayerMap, host: bool):
        F, L = flush_every, layer_map.n_layers
        self.device = device
        self.columns = columns
        self.flush_every = flush_every
        self.layer_map = layer_map
        self.cells: DeviceCells | HostCells = HostCells() if host else DeviceCells(device)
        nan = math.nan
        self.buf = torch.full((F, len(columns)), nan, dtype=torch.float32, device=device)
        self.step = np.zeros(F, dtype=np.int64)
        self.time = np.zeros(F, dtype=np.float64)
        self.lr = np.full(F, nan, dtype=np.float64)
        self.lrs: list[Any] = [None] * F
        self.n = 0
        self.layer_cap = F // layer_every + 2
        self.lbuf = torch.full((self.layer_cap, len(LAYER_STATS), L), nan, dtype=torch.float64,
                               device=device)
        self.lsteps: list[int] = []
        self.ring_cap = recorder_steps + F
        self.ring = torch.full((self.ring_cap, L), nan, dtype=torch.float32, device=device)
        self.ring_steps = np.full(self.ring_cap, -1, dtype=np.int64)
        self.ring_pos = 0
        if host:  # numpy views of the CPU buffers: rows written without torch operations
            self._buf_h = self.buf.numpy()
            self._ring_h = self.ring.numpy()

    @property
    def host(self) -> bool:
        return self.cells.host

    @property
    def full(self) -> bool:
        return self.n >= self.flush_every

    def layer_norms(self, step: int, per_tensor: Tensor, mask: tuple[bool, ...] | None) -> Tensor:
        """Per-layer gradient norms of this step (from the per-tensor norms), written into the
        flight recorder; a tensor (on the CPU path it shares the recorder row's memory)."""
        L = self.layer_map.n_layers
        slot = self.ring_pos % self.ring_cap
        if self.host:
            h = layer_l2_host(_xp.host_value(per_tensor), self.layer_map.host_index(mask), L)
            self._ring_h[slot] = h
            lnorm = torch.from_numpy(h)
        else:
            lnorm = layer_l2(per_tensor, self.layer_map.device_index(self.device, mask), L)
            self.ring[slot].copy_(lnorm)
        self.ring_steps[slot] = step
        self.ring_pos += 1
        return lnorm

    def put(self, row: list[Any], step: int, time: float, lr: Any, lrs: Any = None) -> None:
        """Write ``row`` (from :func:`step_row`) as the next step row; ``lrs``: every param
        group's learning rate (kept only when there are several)."""
        i = self.n
        if self.host:
            self._buf_h[i] = row
        else:
            # one stack into the buffer row; it promotes bool / float64 entries to float32
            torch.stack(row, out=self.buf[i])
        self.step[i] = step
        self.time[i] = time
        self.lr[i] = float(lr) if (lr is not None and not isinstance(lr, Tensor)) else math.nan
        self.lrs[i] = self._group_lrs(lrs)
        self.n += 1

    def _group_lrs(self, lrs: Any) -> Any:
        """The learning rates of several groups as this buffer keeps them (no host read of a
        device tensor: those are stacked on the device, a copy, so a scheduler writing into
        the optimizer's lr tensor later cannot change what was recorded)."""
        if lrs is None:
            return None
        lrs = tuple(lrs)
        if len(lrs) < 2:
            return None
        if not any(isinstance(x, Tensor) for x in lrs):
            return np.array([math.nan if x is None else float(x) for x in lrs], np.float64)
        on_device = any(isinstance(x, Tensor) and not x.is_cpu for x in lrs)
        if self.host or (not on_device and self.device.type != "cpu"):
            # CPU tensors: reading them waits for nothing
            return np.array([_host_lr(x) for x in lrs], np.float64)
        return torch.stack([_device_lr(x, self.device) for x in lrs])

    def layer_slot(self, step: int) -> Tensor | None:
        """The layer-buffer slab for layer step ``step``; None when the interval is full."""
        if len(self.lsteps) >= self.layer_cap:
            return None
        self.lsteps.append(step)
        return self.lbuf[len(self.lsteps) - 1]

    def snapshot(self) -> dict[str, Any]:
        """Copies of the filled rows (host tensors, possibly still being copied: wait on
        ``events``), the ring and the host arrays; the buffers are then empty."""
        n, nl = self.n, len(self.lsteps)
        buf, ev1 = _copy_host(self.buf[:n])
        lbuf, ev2 = _copy_host(self.lbuf[:nl])
        ring, ev3 = _copy_host(self.ring)
        lrs = self.lrs[:n]
        on_dev = [k for k, v in enumerate(lrs) if isinstance(v, Tensor)]
        lrs_dev, ev4 = _copy_host(torch.cat([lrs[k] for k in on_dev])) if on_dev else (None, None)
        payload = {
            "n": n, "buf": buf, "lbuf": lbuf, "ring": ring, "events": [ev1, ev2, ev3, ev4],
            "lrs": [None if isinstance(v, Tensor) else v for v in lrs],
            "lrs_dev": (on_dev, [int(lrs[k].numel()) for k in on_dev], lrs_dev),
            "step": self.step[:n].copy(), "time": self.time[:n].copy(),
            "lr": self.lr[:n].copy(), "lsteps": list(self.lsteps),
            "ring_steps": self.ring_steps.copy(),
        }
        self.n = 0
        self.lsteps = []
        self.lrs = [None] * self.flush_every
        return payload


def group_lrs(payload: dict[str, Any]) -> np.ndarray:
    """The ``lrs`` column of a snapshot (after its copies finished): an object array, each
    entry None or a list of floats."""
    out = np.empty(payload["n"], dtype=object)
    for k, v in enumerate(payload["lrs"]):
        out[k] = None if v is None else v.tolist()
    on_dev, sizes, host = payload["lrs_dev"]
    if on_dev:
        vals = host.numpy()
        for k, part in zip(on_dev, np.split(vals, np.cumsum(sizes)[:-1])):
            out[k] = part.tolist()
    return out


def _host_lr(x: Any) -> float:
    if x is None:
        return math.nan
    if isinstance(x, Tensor):
        v = _xp.host_value(x.detach().reshape(-1)[0]) if x.numel() else math.nan
        return float(v)
    return float(x)


def _device_lr(x: Any, device: torch.device) -> Tensor:
    if isinstance(x, Tensor) and x.numel():
        return x.detach().reshape(-1)[0].to(device, torch.float64, non_blocking=True)
    v = math.nan if x is None or isinstance(x, Tensor) else float(x)
    return torch.full((), v, dtype=torch.float64, device=device)


def _copy_host(t: Tensor) -> tuple[Tensor, Any]:
    if t.device.type == "cuda":
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        return h, ev
    return t.detach().to("cpu", copy=True), None
