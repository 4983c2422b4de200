"""The ``gradguard`` command line: ``gradguard demo``, ``gradguard report``, ``gradguard inspect``."""

from __future__ import annotations

import argparse
import os
import sys


def _demo(args: argparse.Namespace) -> int:
    """``gradguard demo``: every experiment x every clipping strategy x seeds, as a table."""
    import json
    import time
    import warnings

    import torch
    from rich.console import Console

    from .experiments import suite as S

    # Small models train fastest on one thread; several threads on a busy machine are slower.
    torch.set_num_threads(args.threads)
    console = Console()
    if not console.is_terminal:  # piped or captured: room for the table
        console = Console(width=110)
    try:
        experiments = S.plan(args.suite, only=args.only, tiny=args.tiny, mnist_dir=args.mnist_dir,
                             length=args.length, broadcast_bug=args.broadcast_bug,
                             charlm_lr=args.charlm_lr, max_steps=args.max_steps)
    except (ValueError, FileNotFoundError) as exc:
        print(f"gradguard demo: error: {exc}", file=sys.stderr)
        return 2
    if args.strategies and not any(S.suite_strategies(args.suite, args.strategies)(e)
                                   for e in experiments):
        print(f"gradguard demo: error: no strategy named {args.strategies}", file=sys.stderr)
        return 2
    for exp in experiments:
        console.print(f"[bold]{exp.title}[/bold]: {exp.cfg.describe()}")
    run_dir = None if args.no_runs else args.runs_dir
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # detector warnings of exploding runs would bury the table; they stay in the runs
            warnings.filterwarnings("ignore", message="gradguard")
            rows, folders = S.run_suite(experiments, args.suite, args.seeds,
                                        names=args.strategies, run_dir=run_dir,
                                        progress=not args.no_progress, console=console,
                                        jobs=args.jobs or min(2, os.cpu_count() or 1))
    except (ValueError, FileNotFoundError) as exc:
        print(f"gradguard demo: error: {exc}", file=sys.stderr)
        return 2
    S.print_table(rows, console, title=f"gradguard demo --suite {args.suite}: {args.seeds} seeds, "
                                       f"{time.perf_counter() - t0:.0f} s")
    console.print("result: mean ± sample sd over the seeds whose result is finite (solved tasks: "
                  "k/n seeds solved, at these steps); non-finite at epoch: per seed, '-' never; "
                  "clipped: share of steps where the clipper changed a gradient; skipped: updates "
                  "refused (non-finite gradient), all seeds.")
    if args.markdown:
        print(S.markdown_table(rows))
    if args.curves:
        S.print_curves(rows, console)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in rows], f, indent=1, default=str)
        console.print(f"wrote {args.json}")
    if folders:
        console.print(f"run folders: {len(folders)} under {run_dir}/")
        if not args.no_report:
            try:
                from .report import make_report
            except ImportError:
                make_report = None
            if make_report is not None:
                try:
                    out, failed = make_report([str(f) for f in folders], args.report)
                    console.print(f"report: {out}" + (f" ({len(failed)} runs unreadable)" if failed else ""))
                except Exception as exc:  # noqa: BLE001 - the table is the demo's result
                    console.print(f"[yellow]report not written: {exc}[/yellow]")
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


def _bench(args: argparse.Namespace) -> int:
    from .kernels import bench

    return bench.main_from_args(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradguard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the seed article's before/after clipping study")
    demo.add_argument("--suite", choices=("quick", "full"), default="quick",
                      help="quick (default, about 2 minutes on 2 cores) or full (long versions)")
    demo.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    demo.add_argument("--only", nargs="+", metavar="EXP",
                      help="experiments to run: mlp lstm temporal adding charlm")
    demo.add_argument("--strategies", nargs="+", metavar="NAME",
                      help="strategy names to keep, as the table spells them (e.g. none 'global norm 1')")
    demo.add_argument("--mnist-dir", metavar="PATH",
                      help="train the LSTM on real MNIST read from IDX files in PATH")
    demo.add_argument("--length", type=int, help="sequence length of the Pascanu tasks")
    demo.add_argument("--max-steps", type=int,
                      help="step budget of the Pascanu tasks and the character LM")
    demo.add_argument("--charlm-lr", type=float, help="SGD learning rate of the character LM")
    demo.add_argument("--broadcast-bug", action="store_true",
                      help="seed MLP: reproduce the seed's (N,1)-vs-(N,) broadcast loss")
    demo.add_argument("--tiny", action="store_true", help="every experiment at a seconds-long size")
    demo.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    demo.add_argument("--jobs", type=int, default=0,
                      help="runs in parallel processes (default 0: one per CPU core, at most 2; "
                           "1 runs in this process with per-step progress); the results do not "
                           "depend on it")
    demo.add_argument("--runs-dir", default="runs", help="where run folders go (default runs/)")
    demo.add_argument("--no-runs", action="store_true", help="write no run folders")
    demo.add_argument("--report", default="runs/report.html", help="HTML report path")
    demo.add_argument("--no-report", action="store_true", help="write no HTML report")
    demo.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    demo.add_argument("--curves", action="store_true", help="also print loss against steps")
    demo.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
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
    bench = sub.add_parser("bench", help="clipping speed against torch, and the memory floor")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        # its options live in the benchmark module, which imports torch: only load it when
        # asked, so report/inspect start without torch
        from .kernels.bench import add_arguments as _bench_arguments
        _bench_arguments(bench)
    bench.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
