"""Per-step overhead of gradguard on a small model (issue 15).

A 330K-parameter, 2-block pre-norm transformer (d 96, 4 heads, MLP 4x, vocabulary 512,
context 64, batch 8) on the CPU with one thread, AdamW (foreach). Each candidate runs the
same forward + backward + step; the table gives the median step time over ``--steps`` steps
(interleaved rounds, so load on a shared machine hits every candidate alike) and its ratio to
torch's ``clip_grad_norm_`` + ``step``:

* ``torch``: ``clip_grad_norm_(params, 1.0)`` then ``opt.step()``
* ``Guard(NormClip(1.0))``: ``guard.step(opt)`` with the fixed clip
* ``Guard(model)``: the default clipper and skip rule
* ``Guard(model) + Monitor``: the same, recording to a temporary run folder

The Guards get the loss (``guard.step(opt, loss=loss)``), as in a training loop that records it.

    python benchmarks/small_model_bench.py              # 100 steps after 10 warm-up
    python benchmarks/small_model_bench.py --steps 20   # a quick check
    python benchmarks/small_model_bench.py --model gpt2-small --steps 20   # the 1 % target

``--model gpt2-small`` is GPT-2 small's shape (124M parameters: d 768, 12 heads, 12 blocks,
vocabulary 50257) on one batch of 1 x 32 tokens, so the step is mostly the optimizer's and
the clip's passes over the parameters: the worst case for a relative overhead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

try:
    import gradguard as gg
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    import gradguard as gg

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 512, d: int = 96, heads: int = 4, layers: int = 2, ctx: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", torch.triu(torch.full((ctx, ctx), float("-inf")), 1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x, self.mask[: idx.shape[1], : idx.shape[1]])
        return self.head(self.ln(x))


#: (TinyLM arguments, batch, tokens per row) per ``--model``
MODELS = {"tiny": (dict(), 8, 64),
          "gpt2-small": (dict(vocab=50257, d=768, heads=12, layers=12, ctx=64), 1, 32)}


def _setup(seed: int = 0, kind: str = "tiny"):
    torch.manual_seed(seed)
    model = TinyLM(**MODELS[kind][0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    return model, opt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="timed steps per candidate")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny",
                    help="tiny (330K parameters, default) or gpt2-small (124M)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(1)
    kw, batch, tokens = MODELS[args.model]
    vocab = kw.get("vocab", 512)
    batches = [torch.randint(0, vocab, (batch, tokens + 1), generator=g) for _ in range(8)]
    tmp = tempfile.TemporaryDirectory()

    cands = {}
    guards = []
    model, opt = _setup(kind=args.model)
    n_params = sum(p.numel() for p in model.parameters())

    def torch_step(loss, model=model, opt=opt):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    cands["torch clip + step"] = (model, opt, torch_step)
    for name, make in (
        ("Guard(NormClip(1.0))", lambda m: gg.Guard(m, clipper=gg.NormClip(1.0))),
        ("Guard(model)", lambda m: gg.Guard(m)),
        ("Guard(model) + Monitor", lambda m: gg.Guard(m, monitor=gg.Monitor(os.path.join(tmp.name, "run")))),
    ):
        m, o = _setup(kind=args.model)
        guard = make(m)
        guards.append(guard)
        cands[name] = (m, o, lambda loss, guard=guard, o=o: guard.step(o, loss=loss))

    times: dict[str, list[float]] = {k: [] for k in cands}
    names = list(cands)
    for r in range(args.warmup + args.steps):
        x = batches[r % len(batches)]
        for name in (names if r % 2 == 0 else names[::-1]):
            model, opt, step = cands[name]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            logits = model(x[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            loss.backward()
            step(loss)
            dt = time.perf_counter() - t0
            if r >= args.warmup:
                times[name].append(dt * 1e3)
    for guard in guards:
        guard.close()
    tmp.cleanup()
    base = statistics.median(times[names[0]])
    print(f"# {n_params / 1e3:.0f}K parameters, {args.threads} thread(s), AdamW foreach, "
          f"median of {args.steps} steps after {args.warmup} warm-up, torch {torch.__version__}")
    print("| candidate | step ms | vs torch |")
    print("| --- | ---: | ---: |")
    for name in names:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.2f} | {med / base:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
