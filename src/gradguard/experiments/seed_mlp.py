"""The seed article's experiment: an MLP on unscaled ``make_regression`` data.

fc 20 -> 25 -> 1 with ReLU, xavier-uniform weights and bias 0.01, SGD lr 0.07 momentum 0.8,
MSE, batch 128, 50 epochs, on make_regression(1000 x 20, noise 0.1, random_state 1). The
target is unscaled (values of a few hundred), which is what makes the unclipped run explode.

The seed's own code compares an (N, 1) output with an (N,) target; MSELoss then broadcasts to
(N, N) and trains a constant predictor. Here the target is shaped like the output (N, 1)
unless ``broadcast_bug=True`` reproduces the original.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..clippers import Clipper, NormClip, ValueClip
from ..guard import Guard
from .loop import History, train


@dataclass(frozen=True)
class MLPConfig:
    epochs: int = 50
    batch_size: int = 128
    lr: float = 0.07
    momentum: float = 0.8
    n_samples: int = 1000
    broadcast_bug: bool = False


def make_data(cfg: MLPConfig) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import make_regression

    X, y = make_regression(n_samples=cfg.n_samples, n_features=20, noise=0.1, random_state=1)
    X = torch.tensor(X, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.float32)
    return X, (y if cfg.broadcast_bug else y.unsqueeze(1))


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(20, 25), torch.nn.ReLU(), torch.nn.Linear(25, 1))
    for m in model:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(m.weight)
            m.bias.data.fill_(0.01)
    return model


#: the issue's first strategies; the experiments issue grows this list
STRATEGIES: dict[str, Callable[[], Clipper | None]] = {
    "none": lambda: None,
    "value 1.0": lambda: ValueClip(1.0),
    "global norm 1.0": lambda: NormClip(1.0),
}


def run(strategy: str, seed: int = 0, cfg: MLPConfig | None = None) -> History:
    """Train the seed MLP with one clipping strategy; the epoch loss is the train-set MSE."""
    cfg = cfg or MLPConfig()
    X, y = make_data(cfg)
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    clipper = STRATEGIES[strategy]()
    # Strategy "none" still runs through a Guard so its norms are measured the same way,
    # with torch's behaviour on non-finite gradients (nothing skipped).
    guard = Guard(model, clipper, on_nonfinite="propagate", max_consecutive_skips=None)
    loss_fn = torch.nn.MSELoss()
    gen = torch.Generator().manual_seed(seed)

    def batches(epoch: int):
        perm = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            yield X[idx], y[idx]

    def evaluate() -> float:
        with torch.no_grad():
            return float(loss_fn(model(X), y))

    return train(model, batches, loss_fn, opt, guard, cfg.epochs, evaluate=evaluate)
