"""The seed article's LSTM classifier: images read row by row by a 2-layer LSTM.

The seed trains ``nn.LSTM(28, 128, num_layers=2)`` + a linear head on MNIST (28 rows of 28
pixels), Adam lr 0.01, batch 100, 2 epochs, with ``clip_grad_value_(1.0)``. MNIST cannot be
downloaded here, so by default the images are sklearn's bundled 8x8 handwritten digits
(1797 images, 8 rows of 8 pixels, a fixed 80/20 train/test split); ``mnist_dir`` points at
local MNIST IDX files instead. Pixels are scaled to [0, 1] and standardised with the train
set's mean and spread (the seed's ``Normalize((0.1307,), (0.3081,))``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import numpy as np
import torch

from .loop import RunResult, train
from .strategies import Strategy

NAME = "seed LSTM"


@dataclass(frozen=True)
class LSTMConfig:
    """The seed's settings; ``mnist_dir`` switches from the 8x8 digits to real MNIST."""

    epochs: int = 2
    batch_size: int = 100
    hidden: int = 128
    layers: int = 2
    lr: float = 0.01
    optimizer: str = "adam"  # the seed's PyTorch code; "sgd" is its Keras SGD(0.01, 0.9)
    mnist_dir: str | None = None
    max_train: int | None = None  # use only the first N train images (tests, quick MNIST)
    #: 0: the last epoch's loss is the test CE after the last step. N > 0: it is the mean test
    #: CE over evaluations after each of the run's last N steps (the last one included): the
    #: same training, a less noisy reading of where it ended (Adam at lr 0.01 bounces)
    tail_evals: int = 0
    #: "constant" (the seed's) or "cosine": the lr decays to 0 along a half cosine over the run
    lr_schedule: str = "constant"

    @classmethod
    def for_suite(cls, suite: str, mnist_dir: str | None = None) -> LSTMConfig:
        return cls(epochs=2 if suite == "quick" else 10, mnist_dir=mnist_dir)

    def tiny(self) -> LSTMConfig:
        return replace(self, epochs=3, hidden=32, max_train=500)

    def total_steps(self) -> int:
        n = self.max_train or (60000 if self.mnist_dir else 1437)
        return self.epochs * -(-n // self.batch_size)

    def describe(self) -> str:
        data = f"MNIST from {self.mnist_dir}" if self.mnist_dir else "sklearn 8x8 digits"
        opt = f"Adam lr {self.lr:g}" if self.optimizer == "adam" else f"SGD lr {self.lr:g} momentum 0.9"
        return (f"{data}, rows as a sequence, {self.layers}-layer LSTM {self.hidden}, {opt}, "
                f"batch {self.batch_size}, {self.epochs} epochs")


@cache
def load_data(cfg: LSTMConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test); x as float32 (N, rows, cols), standardised.

    Cached per config (every strategy and seed reads the same data); don't modify them."""
    if cfg.mnist_dir:
        from .idx import load_mnist

        xtr, ytr, xte, yte = load_mnist(cfg.mnist_dir)
        xtr, xte = xtr.astype(np.float32) / 255.0, xte.astype(np.float32) / 255.0
    else:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = digits.images.astype(np.float32) / 16.0
        xtr, xte, ytr, yte = train_test_split(x, digits.target.astype(np.int64), test_size=0.2,
                                              random_state=0, stratify=digits.target)
    if cfg.max_train is not None:
        xtr, ytr = xtr[:cfg.max_train], ytr[:cfg.max_train]
    mean, std = float(xtr.mean()), float(xtr.std())
    return (torch.tensor((xtr - mean) / std), torch.tensor(ytr),
            torch.tensor((xte - mean) / std), torch.tensor(yte))


class RowLSTM(torch.nn.Module):
    """``nn.LSTM`` over the rows of an image, a linear head on the last step (the seed's Net)."""

    def __init__(self, input_size: int, hidden: int, layers: int, classes: int = 10):
        super().__init__()
        self.lstm = torch.nn.LSTM(input_size, hidden, layers, batch_first=True)
        self.fc = torch.nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1, :])


def run(strategy: Strategy, seed: int = 0, cfg: LSTMConfig | None = None, *,
        monitor: Any = None, on_step: Any = None) -> RunResult:
    """Train the row LSTM with one strategy. Epoch loss: test cross-entropy; metric and the
    table's value: test accuracy."""
    cfg = cfg or LSTMConfig()
    xtr, ytr, xte, yte = load_data(cfg)
    torch.manual_seed(seed)
    model = RowLSTM(xtr.shape[2], cfg.hidden, cfg.layers)
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    guard = strategy.guard(model, monitor)
    ce = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)

    def batches(epoch: int):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            yield xtr[idx], ytr[idx]

    def test_outputs() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(xte[i:i + 2000]) for i in range(0, len(xte), 2000)])

    last: list[torch.Tensor] = []
    point: list[float] = []  # the test CE after the last step, whatever tail_evals says
    total = cfg.epochs * -(-len(xtr) // cfg.batch_size)
    done = [0]
    tail: list[float] = []

    sched = None
    if cfg.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, total) / total)))

    def step_hook() -> None:
        done[0] += 1
        if sched is not None:
            sched.step()
        if cfg.tail_evals > 0 and done[0] > total - cfg.tail_evals:
            tail.append(float(ce(test_outputs(), yte)))
        if on_step is not None:
            on_step()

    def evaluate() -> float:
        last[:] = [test_outputs()]
        value = float(ce(last[0], yte))
        point[:] = [value]
        if cfg.tail_evals > 0 and done[0] == total and tail:
            return sum(tail) / len(tail)  # ends with this same evaluation
        return value

    def accuracy() -> float:  # called right after evaluate(): reuse its outputs
        return float((last[0].argmax(1) == yte).float().mean())

    hist = train(model, batches, ce, opt, guard, cfg.epochs, evaluate=evaluate,
                 metric=accuracy, on_step=step_hook)
    acc = hist.final_metric if hist.first_nonfinite_epoch is None else float("nan")
    extra = {"final_point_loss": point[0]} if point else {}
    # 10 balanced classes: chance is 0.1; twice chance counts as having learned
    return RunResult(NAME, strategy.name, seed, "test accuracy", acc, hist, extra=extra,
                     chance=0.1, learned=0.2, higher_is_better=True)
