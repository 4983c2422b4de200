"""Pascanu, Mikolov & Bengio 2013 pathological tasks with a vanilla tanh RNN.

Setup of the paper (section 4.1): 50 tanh hidden units, minibatch SGD, constant lr 0.01, no
momentum, batches of 20 freshly generated sequences, clipping threshold 1.0; a run succeeds
when under 1% of 10000 fresh sequences are misclassified (regression tasks: squared error
over 0.04 counts as a miss). The paper allows up to 5M updates; here the budget is
``max_steps`` and the check runs every ``eval_every`` steps on ``eval_size`` sequences.

Tasks, as the authors' generators define them:

* **temporal order** (``"temporal"``): a sequence of one-hot symbols from {A, B, c, d, e, f};
  A or B appears at one position in [0.1 L, 0.2 L) and one in [0.5 L, 0.6 L), distractors
  elsewhere; classify the order (AA, AB, BA, BB) at the last step. Cross-entropy.
* **adding** (``"adding"``): two channels, uniform [0, 1] values and a marker; the length is
  L plus up to 10%; markers at one position in [0, 0.1 l) and one in [0.1 l, 0.5 l); predict
  the mean of the two marked values at the last step. MSE.

Initialisations (paper's names): ``"basic"`` tanh, every weight ~ N(0, 0.1), biases 0;
``"smart"`` tanh, input and output weights ~ N(0, 0.01), recurrent weights sparse (15
non-zero incoming connections per unit) rescaled to spectral radius 0.95.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .loop import History, RunResult, train
from .strategies import Strategy

TASKS = ("adding", "temporal")
#: sequence lengths of the quick suite: one plain SGD solves, one where it needs clipping
QUICK_LENGTHS = (10, 20)


@dataclass(frozen=True)
class PascanuConfig:
    """One task at one length; the defaults are the paper's, the budget is ours."""

    task: str = "temporal"
    length: int = 50
    max_steps: int = 20000
    eval_every: int = 500
    eval_size: int = 10000
    lr: float = 0.01
    batch_size: int = 20
    hidden: int = 50
    init: str = "basic"

    @classmethod
    def for_suite(cls, suite: str, task: str, length: int | None = None) -> PascanuConfig:
        """quick: lr 0.2 (the paper: 0.01 over up to 5M updates) and 800 steps, where on
        temporal order plain SGD solves T=10 and fails at T=20 while clipping at 1.0 solves
        both (the paper's "clipping matters more as sequences grow", in seconds); full: the
        paper's lr 0.01 at T=50, 20000 steps."""
        if suite == "quick":
            return cls(task=task, length=length or QUICK_LENGTHS[0], max_steps=800,
                       eval_every=100, eval_size=500, lr=0.2)
        return cls(task=task, length=length or 50)

    def tiny(self) -> PascanuConfig:
        return replace(self, length=10, max_steps=60, eval_every=30, eval_size=200)

    def total_steps(self) -> int:
        return self.max_steps

    @property
    def name(self) -> str:
        return f"{'adding' if self.task == 'adding' else 'temporal order'} T={self.length}"

    def describe(self) -> str:
        return (f"tanh RNN {self.hidden}, {self.init} init, SGD lr {self.lr:g}, "
                f"batch {self.batch_size}, up to {self.max_steps} steps, success = <1% errors on "
                f"{self.eval_size} fresh sequences (checked every {self.eval_every} steps)")


def generate(task: str, batch: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of ``task`` sequences: inputs (batch, time, channels) and targets."""
    rows = torch.arange(batch)
    if task == "temporal":
        lo0, lo1, width = int(0.1 * length), int(0.5 * length), max(int(0.1 * length), 1)
        p0 = torch.randint(width, (batch,), generator=gen) + lo0
        p1 = torch.randint(width, (batch,), generator=gen) + lo1
        v0 = torch.randint(2, (batch,), generator=gen)
        v1 = torch.randint(2, (batch,), generator=gen)
        symbols = torch.randint(4, (batch, length), generator=gen) + 2
        symbols[rows, p0] = v0
        symbols[rows, p1] = v1
        return torch.nn.functional.one_hot(symbols, 6).float(), v0 + 2 * v1
    if task == "adding":
        n = length + int(torch.randint(max(int(0.1 * length), 1), (1,), generator=gen))
        x = torch.rand(batch, n, 2, generator=gen)
        x[:, :, 0] = 0.0
        p0 = torch.randint(max(int(0.1 * n), 1), (batch,), generator=gen)
        p1 = torch.randint(max(int(0.4 * n), 1), (batch,), generator=gen) + int(0.1 * n)
        x[rows, p0, 0] = 1.0
        x[rows, p1, 0] = 1.0
        return x, ((x[rows, p0, 1] + x[rows, p1, 1]) / 2).unsqueeze(1)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


class TanhRNN(torch.nn.Module):
    """Vanilla tanh RNN with a linear read-out of the last hidden state."""

    def __init__(self, n_in: int, n_out: int, hidden: int = 50, init: str = "basic"):
        super().__init__()
        self.rnn = torch.nn.RNN(n_in, hidden, nonlinearity="tanh", batch_first=True)
        self.out = torch.nn.Linear(hidden, n_out)
        with torch.no_grad():
            for b in (self.rnn.bias_ih_l0, self.rnn.bias_hh_l0, self.out.bias):
                b.zero_()
            if init == "basic":
                for w in (self.rnn.weight_ih_l0, self.rnn.weight_hh_l0, self.out.weight):
                    w.normal_(0.0, 0.1)
            elif init == "smart":
                self.rnn.weight_ih_l0.normal_(0.0, 0.01)
                self.out.weight.normal_(0.0, 0.01)
                w = torch.zeros(hidden, hidden)
                for i in range(hidden):
                    cols = torch.randperm(hidden)[:min(15, hidden)]
                    w[i, cols] = torch.randn(len(cols))
                radius = torch.linalg.eigvals(w).abs().max()
                self.rnn.weight_hh_l0.copy_(w * (0.95 / radius))
            else:
                raise ValueError(f"init must be 'basic' or 'smart', got {init!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(x)[0][:, -1])


def error_rate(model: torch.nn.Module, task: str, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of misclassified sequences (adding: squared error over 0.04)."""
    with torch.no_grad():
        out = model(x)
    if task == "temporal":
        return float((out.argmax(1) != y).float().mean())
    return float(((out - y) ** 2 > 0.04).float().mean())


def run(strategy: Strategy, seed: int = 0, cfg: PascanuConfig | None = None, *,
        monitor: Any = None, on_step: Any = None) -> RunResult:
    """Train until the task is solved or ``max_steps``; value = 1.0 solved, 0.0 not."""
    cfg = cfg or PascanuConfig()
    torch.manual_seed(seed)
    n_in, n_out = (6, 4) if cfg.task == "temporal" else (2, 1)
    model = TanhRNN(n_in, n_out, cfg.hidden, cfg.init)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    guard = strategy.guard(model, monitor)
    loss_fn = torch.nn.CrossEntropyLoss() if cfg.task == "temporal" else torch.nn.MSELoss()
    gen = torch.Generator().manual_seed(10_000 + seed)
    eval_gen = torch.Generator().manual_seed(20_000 + seed)
    epochs = -(-cfg.max_steps // cfg.eval_every)

    def batches(epoch: int):
        for _ in range(min(cfg.eval_every, cfg.max_steps - epoch * cfg.eval_every)):
            yield generate(cfg.task, cfg.batch_size, cfg.length, gen)

    def errors() -> float:
        # fresh sequences every check, in chunks of 1000 as the paper's 10000 would be
        chunks = [generate(cfg.task, min(1000, cfg.eval_size - i), cfg.length, eval_gen)
                  for i in range(0, cfg.eval_size, 1000)]
        return sum(error_rate(model, cfg.task, x, y) * len(y) for x, y in chunks) / cfg.eval_size

    def solved(h: History) -> bool:
        return h.epoch_metric[-1] < 0.01

    hist = train(model, batches, loss_fn, opt, guard, epochs, metric=errors, stop=solved,
                 on_step=on_step)
    success = hist.stopped_early
    return RunResult(cfg.name, strategy.name, seed, "solved", 1.0 if success else 0.0, hist,
                     success_step=hist.steps if success else None,
                     extra={"final error": hist.final_metric})
