"""The ``gradguard`` command line: ``gradguard demo``, ``gradguard report``, ``gradguard inspect``."""

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


def _report(args: argparse.Namespace) -> int:
    """``gradguard report``: the HTML dashboard, or static figures with ``--format png|svg``."""
    from .report import RunError, make_report, open_run
    from .report.static import write_figures

    try:
        if args.format == "html":
            out, failed = make_report(args.runs, args.output or "report.html")
            for msg in failed:
                print(f"gradguard report: skipped: {msg}", file=sys.stderr)
            print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
            return 0
        runs = []
        for p in args.runs:
            try:
                runs.append(open_run(p))
            except RunError as exc:
                print(f"gradguard report: skipped: {exc}", file=sys.stderr)
        if not runs:
            print("gradguard report: error: no run could be read", file=sys.stderr)
            return 2
        files = write_figures(runs, args.output or "report-figures", args.format)
        print(f"wrote {len(files)} {args.format} figures to {args.output or 'report-figures'}")
        return 0
    except RunError as exc:
        print(f"gradguard report: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"gradguard report: error: cannot write the report: {exc}", file=sys.stderr)
        return 2


def _inspect(args: argparse.Namespace) -> int:
    """``gradguard inspect``: a terminal summary of one run."""
    from .report import RunError, open_run
    from .report.inspect import inspect_run

    try:
        run = open_run(args.run)
    except RunError as exc:
        print(f"gradguard inspect: error: {exc}", file=sys.stderr)
        return 2
    inspect_run(run, top=args.top)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradguard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the seed article's before/after clipping study")
    demo.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    demo.set_defaults(func=_demo)
    report = sub.add_parser("report", help="an offline HTML report (or static figures) of runs")
    report.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    report.add_argument("-o", "--output", help="report.html, or a folder for --format png|svg")
    report.add_argument("--format", choices=("html", "png", "svg"), default="html")
    report.set_defaults(func=_report)
    insp = sub.add_parser("inspect", help="a terminal summary of a run")
    insp.add_argument("run", metavar="RUN", help="run folder")
    insp.add_argument("--top", type=int, default=10, help="events and layers listed (default 10)")
    insp.set_defaults(func=_inspect)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
