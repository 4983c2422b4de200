"""How a step's decision reaches the optimizers: fused ``grad_scale`` / ``found_inf``, the
GradScaler's own verdict, and the count of refused updates.

Everything here stays on the device unless said otherwise: the skip flag and the counts are
tensors, read on the host late (CUDA: through pinned memory once a copy has landed) or where
the Guard reads the flag anyway. The GradScaler helpers read ``torch.amp.GradScaler``'s
per-optimizer state (``_per_optimizer_states``: ``stage``, ``found_inf_per_device``), the only
place the scaler keeps its verdict as a device tensor; each falls back to the public API when
that state is missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from . import _validate


def supports_device_scaling(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers whose step reads ``grad_scale`` / ``found_inf`` device tensors."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def has_state(optimizer: torch.optim.Optimizer) -> bool:
    """True when every parameter with a gradient already has optimizer state."""
    state = optimizer.state
    return all(p in state and state[p] for g in optimizer.param_groups for p in g["params"]
               if p.grad is not None)


def fused_step(optimizer: torch.optim.Optimizer, grad_scale: Tensor | None,
               found_inf: Tensor) -> None:
    """``optimizer.step()`` with the fused kernel's ``grad_scale`` / ``found_inf`` set."""
    if grad_scale is not None and grad_scale.dtype != torch.float32:
        # the fused kernels take a float32 scale (a float64 norm of float64 gradients gives a
        # float64 coefficient)
        grad_scale = grad_scale.to(torch.float32)
    optimizer.grad_scale = grad_scale  # type: ignore[attr-defined]
    optimizer.found_inf = found_inf  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        optimizer.grad_scale = None  # type: ignore[attr-defined]
        optimizer.found_inf = None  # type: ignore[attr-defined]
        del optimizer.grad_scale, optimizer.found_inf


class SkipCounter:
    """Refused updates: how many in all, and how many in a row (for ``max_consecutive_skips``).

    Where the skip flag stays on the device (fused optimizers, a GradScaler's own skip) the
    counts are kept as device tensors; on CUDA the run length is copied to pinned host memory
    without waiting and read once that copy has completed (one or two steps later); on the CPU
    it is read at once (reading a CPU tensor waits for nothing). Where the Guard read the flag
    on the host anyway, the counts are plain ints.
    """

    def __init__(self) -> None:
        self.total = 0          # host part of the total
        self.host_count = 0     # consecutive skips as last known on the host
        self._total_dev: Tensor | None = None   # skips counted on the device, not yet in total
        self._run_dev: Tensor | None = None     # consecutive skips, on the device
        self._pinned: Tensor | None = None
        self._event: Any = None

    def update_device(self, skip: Tensor) -> None:
        skip = skip.detach()
        if self._run_dev is None:
            self._run_dev = torch.full((), self.host_count, dtype=torch.int64, device=skip.device)
            self._total_dev = torch.zeros((), dtype=torch.int64, device=skip.device)
        self._run_dev = torch.where(skip, self._run_dev + 1, torch.zeros_like(self._run_dev))
        self._total_dev = self._total_dev + skip  # type: ignore[operator]
        if skip.device.type == "cuda":
            if self._event is None or self._event.query():
                if self._event is not None:
                    self.host_count = int(self._pinned.numpy())  # type: ignore[union-attr]
                if self._pinned is None:
                    self._pinned = torch.zeros((), dtype=torch.int64).pin_memory()
                self._pinned.copy_(self._run_dev, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record()
        else:
            self.host_count = int(self._run_dev.numpy())

    def update_host(self, skipped: bool) -> None:
        self._settle()
        self.host_count = self.host_count + 1 if skipped else 0
        self.total += int(skipped)

    def _settle(self) -> None:
        """Fold the device counts into the host ones (waits for the device once)."""
        if self._run_dev is not None:
            self.host_count = int(self._run_dev.cpu())
            self.total += int(self._total_dev.cpu())  # type: ignore[union-attr]
            self._run_dev = self._total_dev = None
            self._event = None

    @property
    def skipped_steps(self) -> int:
        pending = 0 if self._total_dev is None else int(self._total_dev.cpu())
        return self.total + pending

    def state_dict(self) -> dict[str, Any]:
        self._settle()
        return {"skipped_steps": self.total, "consecutive_skips": self.host_count}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.total = _validate.int_at_least(sd.get("skipped_steps", 0), "state_dict['skipped_steps']", 0)
        self.host_count = _validate.int_at_least(sd.get("consecutive_skips", 0),
                                                 "state_dict['consecutive_skips']", 0)
        self._run_dev = self._total_dev = None
        self._event = None


def scaler_found_inf(scaler: Any, optimizers: list[torch.optim.Optimizer]) -> Tensor | None:
    """The scaler's verdict on this step as a 0-d bool device tensor (no host read): True when
    ``unscale_`` found an inf or NaN in any of the optimizers' gradients.

    Read from ``torch.amp.GradScaler``'s per-optimizer state (``found_inf_per_device``, float
    tensors of shape (1,) that ``scaler.step`` and ``scaler.update`` read). With several
    optimizers every optimizer's entries are set to the combined verdict, so that
    ``scaler.step`` skips all of them or none (``update`` sums them: the scale backs off
    exactly as before). None when the scaler keeps no such state.
    """
    try:
        per = [scaler._per_optimizer_states[id(o)]["found_inf_per_device"] for o in optimizers]
    except (AttributeError, KeyError, TypeError):
        return None
    flags = [t for d in per for t in d.values()]
    if not flags:
        return None
    dev = flags[0].device
    total = flags[0].reshape(())
    for t in flags[1:]:
        total = total + t.to(dev, non_blocking=True).reshape(())
    found = total > 0
    if len(optimizers) > 1:
        combined = found.float().reshape(1)
        for d in per:
            for k, t in list(d.items()):
                d[k] = combined.to(t.device, non_blocking=True)
    return found


def unscale_once(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """``scaler.unscale_(optimizer)`` unless already done for this step (it raises if twice)."""
    try:
        from torch.amp.grad_scaler import OptState
        state = scaler._per_optimizer_states[id(optimizer)]["stage"]
        if state is OptState.UNSCALED:
            return
    except (ImportError, AttributeError, KeyError):
        pass
    scaler.unscale_(optimizer)
