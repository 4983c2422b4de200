"""Rare, isolated gradient spikes: a healthy classifier fed an occasional bad batch.

An MLP (64 -> 128 -> 10, tanh) learns sklearn's bundled 8x8 digits (a fixed 80/20 split,
pixels standardised). Training itself is stable at the chosen lr: without bad batches no
clipping is needed. But every ``spike_every``-th batch is corrupted the way a broken reader or
sensor corrupts data: its inputs are multiplied by ``spike_scale`` and its labels shuffled.
The gradient of such a batch is hundreds of times the normal norm and points nowhere useful.
The right answer is to clip or skip that one step and otherwise leave training alone: a rule
that clips normal steps slows training, a rule that lets the spike through throws the weights
(SGD) or inflates the second moment and stalls the steps after it (Adam).

The value is the mean test cross-entropy over the evaluations after each step of the last
epoch (the batches of one pass over the training set).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from .loop import RunResult, train
from .seq_lstm import LSTMConfig, load_data
from .strategies import Strategy

NAME = "digits MLP with bad batches"


@dataclass(frozen=True)
class SpikeConfig:
    """``optimizer`` "sgd" (momentum 0.9) or "adam"; a bad batch every ``spike_every`` steps
    (the first one at step ``spike_every // 2``)."""

    epochs: int = 10
    batch_size: int = 32
    hidden: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    spike_every: int = 97
    spike_scale: float = 300.0

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.spike_every < 2:
            raise ValueError(f"spike_every must be >= 2, got {self.spike_every!r}")

    def tiny(self) -> SpikeConfig:
        return replace(self, epochs=2, spike_every=11)

    def total_steps(self) -> int:
        return self.epochs * -(-1437 // self.batch_size)

    def describe(self) -> str:
        opt = f"SGD lr {self.lr:g} momentum 0.9" if self.optimizer == "sgd" else f"Adam lr {self.lr:g}"
        return (f"sklearn 8x8 digits, MLP {self.hidden} tanh, {opt}, batch {self.batch_size}, "
                f"{self.epochs} epochs, every {self.spike_every}th batch x{self.spike_scale:g} "
                f"with shuffled labels")


def run(strategy: Strategy, seed: int = 0, cfg: SpikeConfig | None = None, *,
        monitor: Any = None, on_step: Any = None) -> RunResult:
    cfg = cfg or SpikeConfig()
    x_tr, y_tr, x_te, y_te = load_data(LSTMConfig())
    x_tr, x_te = x_tr.flatten(1), x_te.flatten(1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, cfg.hidden), torch.nn.Tanh(),
                                torch.nn.Linear(cfg.hidden, 10))
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    guard = strategy.guard(model, monitor)
    ce = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1000 + seed)
    step = [0]
    per_epoch = -(-len(x_tr) // cfg.batch_size)
    tail: list[float] = []

    def batches(epoch: int):
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x, y = x_tr[idx], y_tr[idx]
            if step[0] % cfg.spike_every == cfg.spike_every // 2:
                x = x * cfg.spike_scale
                y = y[torch.randperm(len(y), generator=gen)]
            step[0] += 1
            yield x, y

    def test_loss() -> float:
        with torch.no_grad():
            return float(ce(model(x_te), y_te))

    def each_step() -> None:
        if step[0] > cfg.total_steps() - per_epoch:
            tail.append(test_loss())
        if on_step is not None:
            on_step()

    def evaluate() -> float:
        return sum(tail) / len(tail) if step[0] >= cfg.total_steps() and tail else test_loss()

    hist = train(model, batches, ce, opt, guard, cfg.epochs, evaluate=evaluate, on_step=each_step)
    return RunResult(NAME, strategy.name, seed, "test CE, mean over the last epoch",
                     hist.final_loss, hist, chance=math.log(10))
