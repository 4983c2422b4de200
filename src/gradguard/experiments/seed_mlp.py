"""The seed article's experiment: an MLP on unscaled ``make_regression`` data.

fc 20 -> 25 -> 1 with ReLU, xavier-uniform weights and bias 0.01, SGD lr 0.07 momentum 0.8,
MSE, batch 128, 50 epochs, on make_regression(1000 x 20, noise 0.1, random_state 1). The
target is unscaled (values of a few hundred), which is what makes the unclipped run explode.

The seed's own code compares an (N, 1) output with an (N,) target; MSELoss then broadcasts to
(N, N) and trains a constant predictor. Here the target is shaped like the output (N, 1)
unless ``broadcast_bug=True`` reproduces the original. Either way the reported loss is the
per-sample train-set MSE of the model, so the two can be compared.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch

from .loop import RunResult, train
from .strategies import Strategy

NAME = "seed MLP"


@dataclass(frozen=True)
class MLPConfig:
    """The seed's settings; ``tiny()`` is a seconds-long version for tests."""

    epochs: int = 50
    batch_size: int = 128
    lr: float = 0.07
    momentum: float = 0.8
    n_samples: int = 1000
    broadcast_bug: bool = False

    @classmethod
    def for_suite(cls, suite: str) -> MLPConfig:
        """The seed's own size is quick enough for every suite."""
        return cls()

    def tiny(self) -> MLPConfig:
        return replace(self, epochs=5)

    def total_steps(self) -> int:
        """Optimizer steps of one full run (for a progress bar)."""
        return self.epochs * -(-self.n_samples // self.batch_size)

    def describe(self) -> str:
        bug = ", (N,) target broadcast as in the seed" if self.broadcast_bug else ""
        return (f"make_regression {self.n_samples}x20, fc 20-25-1, SGD lr {self.lr:g} momentum "
                f"{self.momentum:g}, batch {self.batch_size}, {self.epochs} epochs{bug}")


def make_data(cfg: MLPConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (N, 20) and the unscaled target, (N, 1) (or (N,) with ``broadcast_bug``)."""
    from sklearn.datasets import make_regression

    X, y = make_regression(n_samples=cfg.n_samples, n_features=20, noise=0.1, random_state=1)
    X = torch.tensor(X, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.float32)
    return X, (y if cfg.broadcast_bug else y.unsqueeze(1))


def make_model(seed: int) -> torch.nn.Module:
    """fc 20 -> 25 -> 1, ReLU, xavier-uniform weights, biases 0.01, as in the seed."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(20, 25), torch.nn.ReLU(), torch.nn.Linear(25, 1))
    for m in model:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            m.bias.data.fill_(0.01)
    return model


def run(strategy: Strategy, seed: int = 0, cfg: MLPConfig | None = None, *,
        monitor: Any = None, on_step: Any = None) -> RunResult:
    """Train the seed MLP with one strategy; the epoch loss is the per-sample train-set MSE.

    The metric is the spread of the model's predictions over the train set divided by the
    target's (near 0: a constant predictor; near 1: the model follows the target).
    """
    cfg = cfg or MLPConfig()
    X, y = make_data(cfg)
    y2 = y.reshape(-1, 1)
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    guard = strategy.guard(model, monitor)
    mse = torch.nn.MSELoss()
    gen = torch.Generator().manual_seed(seed)

    def batches(epoch: int):
        perm = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            yield X[idx], y[idx]

    def evaluate() -> float:
        with torch.no_grad():
            return float(mse(model(X), y2))

    def spread() -> float:
        with torch.no_grad():
            return float(model(X).std() / y2.std())

    with warnings.catch_warnings():
        # the broadcast reproduction triggers MSELoss's "target size" warning on purpose
        warnings.filterwarnings("ignore", message=".*target size.*")
        hist = train(model, batches, mse, opt, guard, cfg.epochs, evaluate=evaluate,
                     metric=spread, on_step=on_step)
    # a constant predictor's MSE is the target's variance; a model that learned explains at
    # least half of it
    var_y = float(y2.var(unbiased=False))
    return RunResult(NAME, strategy.name, seed, "train MSE", hist.final_loss, hist,
                     chance=var_y, learned=0.5 * var_y)
