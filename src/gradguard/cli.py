"""The ``gradguard`` command line: ``gradguard demo`` (more subcommands come with their issues)."""

from __future__ import annotations

import argparse
import sys
import warnings


def _demo(args: argparse.Namespace) -> int:
    from .experiments import seed_mlp

    warnings.filterwarnings("ignore", message=".*target size.*")
    seeds = list(range(args.seeds))
    print(f"seed MLP (make_regression 1000x20, SGD lr 0.07 momentum 0.8, 50 epochs), seeds {seeds}")
    header = f"{'strategy':<18} {'final train MSE':>32} {'first non-finite epoch':>24} {'clipped':>8}"
    print(header)
    print("-" * len(header))
    for name in seed_mlp.STRATEGIES:
        finals, firsts, rates = [], [], []
        for seed in seeds:
            h = seed_mlp.run(name, seed)
            finals.append(h.final_loss)
            firsts.append(h.first_nonfinite_epoch)
            rates.append(h.clip_rate)
        mse = " ".join(f"{v:.4g}" for v in finals)
        first = " ".join("-" if f is None else str(f) for f in firsts)
        rate = sum(rates) / len(rates)
        print(f"{name:<18} {mse:>32} {first:>24} {rate:>8.0%}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradguard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the seed article's before/after clipping study")
    demo.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
