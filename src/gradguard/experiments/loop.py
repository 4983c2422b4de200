"""One small training loop shared by every experiment: model, batches, loss, optimizer, Guard."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..guard import Guard


@dataclass
class History:
    """What a run did: per-epoch mean loss and per-step clip/skip counts."""

    epoch_loss: list[float] = field(default_factory=list)
    steps: int = 0
    clipped_steps: int = 0
    skipped_steps: int = 0
    first_nonfinite_epoch: int | None = None

    @property
    def final_loss(self) -> float:
        return self.epoch_loss[-1] if self.epoch_loss else math.nan

    @property
    def clip_rate(self) -> float:
        return self.clipped_steps / self.steps if self.steps else 0.0


def train(model: torch.nn.Module, batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
          loss_fn: Callable[[Tensor, Tensor], Tensor], optimizer: torch.optim.Optimizer,
          guard: Guard | None, epochs: int,
          evaluate: Callable[[], float] | None = None,
          stop_on_nonfinite: bool = True) -> History:
    """Train for ``epochs`` epochs; ``batches(epoch)`` yields (inputs, targets).

    The epoch loss is ``evaluate()`` when given (e.g. the full-train-set MSE after the epoch),
    else the mean batch loss. Counting clipped/skipped steps reads two flags per step on the
    host: an experiment wants the exact counts, a training run does not need them.
    """
    hist = History()
    for epoch in range(epochs):
        total, n = 0.0, 0
        for x, y in batches(epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            if guard is not None:
                stats = guard.step(optimizer, loss=loss.detach())
                hist.clipped_steps += int(stats.clipped)
                hist.skipped_steps += int(stats.skipped)
            else:
                optimizer.step()
            hist.steps += 1
            total += float(loss.detach())
            n += 1
        value = evaluate() if evaluate is not None else total / max(n, 1)
        hist.epoch_loss.append(value)
        if not math.isfinite(value) and hist.first_nonfinite_epoch is None:
            hist.first_nonfinite_epoch = epoch
            if stop_on_nonfinite:
                break
    return hist
