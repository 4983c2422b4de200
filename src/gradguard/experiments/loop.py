"""One small training loop shared by every experiment: model, batches, loss, optimizer, Guard.

An "epoch" here is whatever the experiment calls one: a pass over a data set (the seed MLP,
the digits LSTM) or a fixed number of freshly generated batches between two evaluations
(the Pascanu tasks, the character LM). ``batches(epoch)`` yields the (inputs, targets) of one
epoch; after it, ``evaluate()`` gives the epoch's loss and ``metric()`` an optional second
number (accuracy, error rate); ``stop(history)`` may end training early (task solved).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..guard import Guard


@dataclass
class History:
    """What a run did: per-epoch loss (and metric) and per-step clip/skip counts."""

    epoch_loss: list[float] = field(default_factory=list)
    epoch_metric: list[float] = field(default_factory=list)
    #: optimizer steps taken (or refused) at the end of each epoch
    epoch_steps: list[int] = field(default_factory=list)
    steps: int = 0
    clipped_steps: int = 0
    skipped_steps: int = 0
    max_grad_norm: float = 0.0
    first_nonfinite_epoch: int | None = None
    stopped_early: bool = False

    @property
    def final_loss(self) -> float:
        return self.epoch_loss[-1] if self.epoch_loss else math.nan

    @property
    def final_metric(self) -> float:
        return self.epoch_metric[-1] if self.epoch_metric else math.nan

    @property
    def clip_rate(self) -> float:
        return self.clipped_steps / self.steps if self.steps else 0.0


@dataclass
class RunResult:
    """One run of one experiment: the number the table shows (``value``, named
    ``metric_name``), the run's History, and for tasks with a success criterion the step at
    which it was met (None: never)."""

    experiment: str
    strategy: str
    seed: int
    metric_name: str
    value: float
    history: History
    success_step: int | None = None
    extra: dict[str, float] = field(default_factory=dict)
    #: the metric of a model that learned nothing (the constant predictor's MSE, chance
    #: accuracy, the uniform predictor's cross-entropy); a loss above it has diverged
    chance: float | None = None
    #: the metric a run must beat to count as having learned (half the target's variance, twice
    #: chance accuracy, the unigram model's cross-entropy); None: no such bar (solved tasks)
    learned: float | None = None
    higher_is_better: bool = False

    @property
    def verdict(self) -> str:
        """``"diverged"`` (non-finite, or a loss worse than learning nothing), ``"did not
        learn"`` (did not beat ``learned``) or ``""``."""
        v = self.value
        if not math.isfinite(v) or self.history.first_nonfinite_epoch is not None:
            return "diverged"
        if self.higher_is_better:
            return "did not learn" if self.learned is not None and v <= self.learned else ""
        if self.chance is not None and v > self.chance:
            return "diverged"
        return "did not learn" if self.learned is not None and v >= self.learned else ""


def train(model: torch.nn.Module, batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
          loss_fn: Callable[[Tensor, Tensor], Tensor], optimizer: torch.optim.Optimizer,
          guard: Guard | None, epochs: int,
          evaluate: Callable[[], float] | None = None,
          metric: Callable[[], float] | None = None,
          stop: Callable[[History], bool] | None = None,
          on_step: Callable[[], None] | None = None,
          stop_on_nonfinite: bool = True) -> History:
    """Train for up to ``epochs`` epochs; ``batches(epoch)`` yields (inputs, targets).

    The epoch loss is ``evaluate()`` when given (e.g. the full-train-set MSE after the epoch),
    else the mean batch loss. ``metric()`` (optional) is recorded after each epoch, then
    ``stop(history)`` (optional) may end the run. ``on_step()`` is called after every step
    (a progress bar). Training stops at the first epoch whose loss is not finite unless
    ``stop_on_nonfinite`` is False. Counting clipped/skipped steps and the largest gradient
    norm reads three numbers per step on the host: an experiment wants them exactly, a
    production training step does not need them.
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
                norm = float(stats.total_norm)  # pre-clip; NaN counts as infinite
                hist.max_grad_norm = max(hist.max_grad_norm, math.inf if math.isnan(norm) else norm)
            else:
                optimizer.step()
            hist.steps += 1
            total += float(loss.detach())
            n += 1
            if on_step is not None:
                on_step()
        value = evaluate() if evaluate is not None else total / max(n, 1)
        hist.epoch_loss.append(value)
        hist.epoch_steps.append(hist.steps)
        if metric is not None:
            hist.epoch_metric.append(metric())
        if not math.isfinite(value) and hist.first_nonfinite_epoch is None:
            hist.first_nonfinite_epoch = epoch
            if stop_on_nonfinite:
                break
        if stop is not None and stop(hist):
            hist.stopped_early = True
            break
    return hist
