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


MODELS = ("lstm", "rnn", "transformer")
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class CharLMConfig:
    """Model and schedule; ``lr`` is plain SGD's step size (no momentum, no decay) or AdamW's
    peak lr.

    lr 10 is about the largest where unclipped SGD still trains the LSTM (lr 20-30 makes
    the unclipped loss jump around 3-7 nats while clipped runs keep falling): the setting of
    Zhang et al.'s comparison. ``model`` "rnn" is a vanilla tanh RNN (Elman), the model of
    Pascanu et al.'s exploding-gradient analysis; "transformer" a small pre-LayerNorm causal
    transformer (``layers`` blocks of ``heads``-head attention and a 4x MLP, width ``embed``).
    With ``optimizer="adamw"`` the lr rises linearly from 0 over ``warmup`` steps, then
    follows a half cosine down to 10 % of the peak at the last step.

    ``tail_mean``: the run's value is the mean training loss over its last ``tail_mean``
    steps (0: the held-out loss after the last step, the suite's metric).
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
    model: str = "lstm"
    optimizer: str = "sgd"
    warmup: int = 0
    weight_decay: float = 0.1
    layers: int = 2
    heads: int = 4
    post_ln: bool = False
    tail_mean: int = 0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.tail_mean < 0 or self.tail_mean > self.steps:
            raise ValueError(f"tail_mean must be in [0, steps={self.steps}], got {self.tail_mean!r}")

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

    @classmethod
    def rnn(cls, lr: float, steps: int = 1000) -> CharLMConfig:
        """A vanilla tanh RNN 128 trained with plain SGD at ``lr``: exploding gradients."""
        return cls(model="rnn", lr=lr, steps=steps, eval_every=50, batch_size=32, bptt=48,
                   max_chars=200_000, tail_mean=50)

    @classmethod
    def transformer(cls, lr: float, steps: int = 600, warmup: int = 30) -> CharLMConfig:
        """A 2-block transformer, width 64, AdamW at peak ``lr`` after a short warmup."""
        return cls(model="transformer", optimizer="adamw", lr=lr, steps=steps, warmup=warmup,
                   eval_every=50, batch_size=16, bptt=64, embed=64, max_chars=200_000,
                   tail_mean=50)

    def tiny(self) -> CharLMConfig:
        return replace(self, steps=40, eval_every=20, hidden=32, bptt=16, batch_size=8,
                       max_chars=20_000, eval_windows=8, tail_mean=min(self.tail_mean, 20),
                       warmup=min(self.warmup, 5), embed=min(self.embed, 32))

    def total_steps(self) -> int:
        return self.steps

    def describe(self) -> str:
        if self.model == "transformer":
            net = f"transformer {self.layers}x{self.embed} ({self.heads} heads)"
        else:
            net = f"embed {self.embed}, {'LSTM' if self.model == 'lstm' else 'tanh RNN'} {self.hidden}"
        opt = (f"SGD lr {self.lr:g}" if self.optimizer == "sgd" else
               f"AdamW peak lr {self.lr:g}, warmup {self.warmup}, cosine to 10 %")
        return (f"stdlib docstrings ({self.max_chars // 1000}k chars, Python "
                f"{sys.version_info.major}.{sys.version_info.minor}), {net}, "
                f"{opt}, batch {self.batch_size}x{self.bptt}, {self.steps} steps")


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


class CharRNN(torch.nn.Module):
    """Embedding -> one-layer tanh RNN -> linear over the vocabulary, at every position."""

    def __init__(self, vocab: int, embed: int, hidden: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, embed)
        self.rnn = torch.nn.RNN(embed, hidden, nonlinearity="tanh", batch_first=True)
        self.out = torch.nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.embed(x))
        return self.out(h).flatten(0, 1)


class Block(torch.nn.Module):
    """Transformer block: causal self-attention, then a 4x GELU MLP; LayerNorm before each
    (pre-LN) or after each residual sum (``post_ln``: the original transformer's, which
    needs a warmup: Xiong et al. 2020)."""

    def __init__(self, width: int, heads: int, post_ln: bool = False):
        super().__init__()
        self.heads, self.post_ln = heads, post_ln
        self.ln1, self.ln2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        pre = (lambda ln, h: h) if self.post_ln else (lambda ln, h: ln(h))
        post = (lambda ln, h: ln(h)) if self.post_ln else (lambda ln, h: h)
        q, k, v = self.qkv(pre(self.ln1, x)).view(b, t, 3, self.heads, w // self.heads).unbind(2)
        a = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = post(self.ln1, x + self.proj(a.transpose(1, 2).reshape(b, t, w)))
        return post(self.ln2, x + self.mlp(pre(self.ln2, x)))


class CharTransformer(torch.nn.Module):
    """Token + learned position embeddings -> ``layers`` blocks -> LayerNorm -> linear."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int,
                 post_ln: bool = False):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.pos = torch.nn.Parameter(torch.zeros(context, width))
        torch.nn.init.normal_(self.pos, std=0.02)
        self.blocks = torch.nn.Sequential(*[Block(width, heads, post_ln) for _ in range(layers)])
        self.ln = torch.nn.Identity() if post_ln else torch.nn.LayerNorm(width)
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.embed(x) + self.pos[: x.shape[1]])
        return self.out(self.ln(h)).flatten(0, 1)


def build(cfg: CharLMConfig, vocab: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """The model, its optimizer and its lr scheduler (None: constant lr)."""
    if cfg.model == "lstm":
        model: torch.nn.Module = CharLSTM(vocab, cfg.embed, cfg.hidden)
    elif cfg.model == "rnn":
        model = CharRNN(vocab, cfg.embed, cfg.hidden)
    else:
        model = CharTransformer(vocab, cfg.embed, cfg.layers, cfg.heads, cfg.bptt, cfg.post_ln)
    if cfg.optimizer == "sgd":
        return model, torch.optim.SGD(model.parameters(), lr=cfg.lr), None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:  # the lr of step ``step`` (0-based) over the peak
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0)))

    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def run(strategy: Strategy, seed: int = 0, cfg: CharLMConfig | None = None, *,
        monitor: Any = None, on_step: Any = None) -> RunResult:
    """Train the character LM; value = final held-out loss (nats/char); ``epoch_loss`` is
    the loss-versus-steps curve (one point per ``eval_every`` steps)."""
    cfg = cfg or CharLMConfig()
    ids, vocab = encode(corpus(cfg.max_chars))
    split = int(0.9 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    torch.manual_seed(seed)
    model, opt, sched = build(cfg, len(vocab))
    guard = strategy.guard(model, monitor)
    ce = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    span = cfg.bptt + 1
    starts = torch.linspace(0, len(val_ids) - span - 1, cfg.eval_windows).long()
    val = torch.stack([val_ids[s:s + span] for s in starts.tolist()])
    tail: list[float] = []  # training losses of the last ``tail_mean`` steps

    def windows(data: torch.Tensor, n: int) -> torch.Tensor:
        s = torch.randint(len(data) - span, (n,), generator=gen)
        return torch.stack([data[i:i + span] for i in s.tolist()])

    def batches(epoch: int):
        for _ in range(min(cfg.eval_every, cfg.steps - epoch * cfg.eval_every)):
            w = windows(train_ids, cfg.batch_size)
            yield w[:, :-1], w[:, 1:].flatten()

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = ce(out, y)
        if cfg.tail_mean:
            tail.append(loss.detach())  # read once at the end, not per step
        return loss

    def evaluate() -> float:
        with torch.no_grad():
            return float(ce(model(val[:, :-1]), val[:, 1:].flatten()))

    def on_each_step() -> None:
        if sched is not None:
            sched.step()
        if on_step is not None:
            on_step()

    epochs = -(-cfg.steps // cfg.eval_every)
    hist = train(model, batches, loss_fn, opt, guard, epochs, evaluate=evaluate,
                 on_step=on_each_step)
    value, name = hist.final_loss, "held-out loss"
    if cfg.tail_mean and hist.first_nonfinite_epoch is None and len(tail) >= cfg.steps:
        value = float(torch.stack(tail[-cfg.tail_mean:]).mean())
        name = f"train loss, mean of the last {cfg.tail_mean} steps"
    elif cfg.tail_mean:
        value = math.nan
    return RunResult(NAME, strategy.name, seed, name, value, hist,
                     chance=math.log(len(vocab)), learned=unigram_loss(train_ids, len(vocab)),
                     extra={"held_out_loss": hist.final_loss})


def unigram_loss(ids: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats/char) of the character frequencies of ``ids`` on ``ids`` itself:
    the loss of a model that learned which characters are common and nothing else."""
    p = torch.bincount(ids, minlength=vocab).double() / len(ids)
    p = p[p > 0]
    return float(-(p * p.log()).sum())
