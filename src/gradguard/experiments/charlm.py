"""A character-level LSTM language model: where clipping speeds training (Zhang et al. 2019).

Zhang, He, Sra & Jadbabaie ("Why gradient clipping accelerates training", ICLR 2020) train
AWD-LSTM on PTB with plain SGD at lr 30 and the gradient norm clipped at 0.25, and show
clipped SGD reaching a lower training loss sooner than unclipped SGD at the largest lr where
it still trains. This is the same comparison at a size that fits a laptop: an embedding, a
one-layer LSTM and a linear read-out, trained with plain SGD on text that ships with Python
itself (the docstrings of a fixed list of standard-library modules), loss against steps.

The epoch loss is the mean cross-entropy (nats per character) on a held-out tenth of the
text; an "epoch" is ``eval_every`` steps on random windows of the training part.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
import warnings
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import torch

from .loop import RunResult, train
from .strategies import Strategy

NAME = "char LSTM LM"

#: standard-library modules whose docstrings make the corpus (all pure-Python, always present)
CORPUS_MODULES = ("argparse", "collections", "functools", "itertools", "json", "logging",
                  "pathlib", "random", "re", "string", "textwrap", "typing", "unittest",
                  "dataclasses", "contextlib", "subprocess", "threading", "email", "decimal",
                  "fractions", "statistics", "inspect", "shutil", "tarfile", "zipfile")


@cache
def corpus(max_chars: int = 400_000) -> str:
    """Docstrings of ``CORPUS_MODULES`` and their public members, in a fixed order.

    The text depends on the Python version (``sys.version`` names it in docs/results.md);
    under ``python -OO`` docstrings are stripped and the corpus would be empty, so the
    modules' source is used instead.
    """
    parts: list[str] = []
    with warnings.catch_warnings():  # typing.io / typing.re announce their deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in CORPUS_MODULES:
            parts.extend(_docstrings(name))
    text = "\n\n".join(parts)
    if len(text) < 10_000:  # docstrings stripped (-OO): fall back on source text
        text = "\n".join(inspect.getsource(importlib.import_module(n)) for n in CORPUS_MODULES)
    return text[:max_chars]


def _docstrings(name: str) -> list[str]:
    """The docstring of module ``name`` and of its public members defined there, by name."""
    mod = importlib.import_module(name)
    docs = [inspect.getdoc(mod) or ""]
    for attr in sorted(vars(mod)):
        obj = getattr(mod, attr)
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        docs.append(inspect.getdoc(obj) or "")
    return [d for d in docs if d]


def encode(text: str) -> tuple[torch.Tensor, list[str]]:
    """Characters as int64 ids (ids in sorted character order) and the vocabulary."""
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index[c] for c in text], dtype=torch.int64), vocab


@dataclass(frozen=True)
class CharLMConfig:
    """Model and schedule; ``lr`` is plain SGD's step size (no momentum, no decay).

    lr 10 is about the largest where unclipped SGD still trains this model (lr 20-30 makes
    the unclipped loss jump around 3-7 nats while clipped runs keep falling): the setting of
    Zhang et al.'s comparison.
    """

    steps: int = 3000
    eval_every: int = 100
    batch_size: int = 32
    bptt: int = 64
    embed: int = 32
    hidden: int = 128
    lr: float = 10.0
    max_chars: int = 400_000
    eval_windows: int = 64

    @classmethod
    def for_suite(cls, suite: str) -> CharLMConfig:
        """quick: Zhang et al.'s lr 30 with their clip 0.25 on a small model for 200 steps,
        where unclipped SGD is thrown above the uniform predictor's loss and clipped SGD
        trains (at lr 10 both train alike in 200 steps: nothing to see); full: lr 10, the
        largest where unclipped SGD still trains, for 3000 steps."""
        if suite == "quick":
            return cls(steps=200, eval_every=25, hidden=64, bptt=32, batch_size=16,
                       max_chars=100_000, lr=30.0)
        return cls()

    def tiny(self) -> CharLMConfig:
        return replace(self, steps=40, eval_every=20, hidden=32, bptt=16, batch_size=8,
                       max_chars=20_000, eval_windows=8)

    def total_steps(self) -> int:
        return self.steps

    def describe(self) -> str:
        return (f"stdlib docstrings ({self.max_chars // 1000}k chars, Python "
                f"{sys.version_info.major}.{sys.version_info.minor}), embed {self.embed}, "
                f"LSTM {self.hidden}, SGD lr {self.lr:g}, batch {self.batch_size}x{self.bptt}, "
                f"{self.steps} steps")


class CharLSTM(torch.nn.Module):
    """Embedding -> one-layer LSTM -> linear over the vocabulary, at every position."""

    def __init__(self, vocab: int, embed: int, hidden: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, embed)
        self.lstm = torch.nn.LSTM(embed, hidden, batch_first=True)
        self.out = torch.nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(x))
        return self.out(h).flatten(0, 1)


def run(strategy: Strategy, seed: int = 0, cfg: CharLMConfig | None = None, *,
        monitor: Any = None, on_step: Any = None) -> RunResult:
    """Train the character LM; value = final held-out loss (nats/char); ``epoch_loss`` is
    the loss-versus-steps curve (one point per ``eval_every`` steps)."""
    cfg = cfg or CharLMConfig()
    ids, vocab = encode(corpus(cfg.max_chars))
    split = int(0.9 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    torch.manual_seed(seed)
    model = CharLSTM(len(vocab), cfg.embed, cfg.hidden)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    guard = strategy.guard(model, monitor)
    ce = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    span = cfg.bptt + 1
    starts = torch.linspace(0, len(val_ids) - span - 1, cfg.eval_windows).long()
    val = torch.stack([val_ids[s:s + span] for s in starts.tolist()])

    def windows(data: torch.Tensor, n: int) -> torch.Tensor:
        s = torch.randint(len(data) - span, (n,), generator=gen)
        return torch.stack([data[i:i + span] for i in s.tolist()])

    def batches(epoch: int):
        for _ in range(min(cfg.eval_every, cfg.steps - epoch * cfg.eval_every)):
            w = windows(train_ids, cfg.batch_size)
            yield w[:, :-1], w[:, 1:].flatten()

    def evaluate() -> float:
        with torch.no_grad():
            return float(ce(model(val[:, :-1]), val[:, 1:].flatten()))

    epochs = -(-cfg.steps // cfg.eval_every)
    hist = train(model, batches, ce, opt, guard, epochs, evaluate=evaluate, on_step=on_step)
    return RunResult(NAME, strategy.name, seed, "held-out loss", hist.final_loss, hist,
                     chance=math.log(len(vocab)), learned=unigram_loss(train_ids, len(vocab)))


def unigram_loss(ids: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats/char) of the character frequencies of ``ids`` on ``ids`` itself:
    the loss of a model that learned which characters are common and nothing else."""
    p = torch.bincount(ids, minlength=vocab).double() / len(ids)
    p = p[p > 0]
    return float(-(p * p.log()).sum())
