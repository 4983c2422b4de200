"""The gradguard command line.

  gradguard demo              the seed article's before/after clipping study (quick by default)
  gradguard report RUN ...    an offline HTML report of run folders (or of every run below a folder)
  gradguard inspect RUN       a terminal summary of one run
  gradguard bench             clipping speed against torch, and the memory floor
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

#: ``gradguard demo --framework NAME``: the module (relative to this package) whose
#: ``demo(args) -> int`` runs the demo in that framework; "torch" is the suite in this file.
DEMO_FRAMEWORKS: dict[str, str] = {"torch": "", "jax": ".experiments.jax_seed",
                                   "keras": ".experiments.keras_seed",
                                   "tensorflow": ".experiments.tf_seed"}

#: What ``report --format png|svg`` needs that the core install lacks.
FIGURES_NEED = "matplotlib (pip install 'gradguard[report]' or pip install matplotlib)"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("gradguard")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout)
        from . import __version__

        return str(__version__)


def _err(cmd: str, msg: object) -> int:
    """Print ``gradguard CMD: error: MSG`` (control characters escaped) and return 2."""
    from .report.text import printable

    print(f"gradguard {cmd}: error: {printable(msg)}", file=sys.stderr)
    return 2


def _warn_lines(cmd: str, caught: list[warnings.WarningMessage]) -> None:
    """The reader's warnings (a damaged shard, a foreign file) as one line each, no source line."""
    from .report.text import printable

    seen = set()
    for w in caught:
        text = f"{type(w.message).__name__ if isinstance(w.message, Warning) else 'warning'}: {w.message}"
        if text not in seen:
            seen.add(text)
            print(f"gradguard {cmd}: warning: {printable(text)}", file=sys.stderr)


def _guarded(cmd: str, body: Callable[[], int]) -> int:
    """Run ``body``; any error reading a run becomes one line on stderr, never a traceback."""
    from .report import RunError

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rc = body()
        except RunError as exc:
            rc = _err(cmd, exc)
        except OSError as exc:
            rc = _err(cmd, f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}")
        except KeyboardInterrupt:
            rc = 130
        except Exception as exc:  # noqa: BLE001 - a damaged run must give a message, not a traceback
            rc = _err(cmd, f"{type(exc).__name__}: {exc}")
    _warn_lines(cmd, [w for w in caught if not issubclass(w.category, DeprecationWarning)])
    return rc


def _demo(args: argparse.Namespace) -> int:
    """``gradguard demo``: every experiment x every clipping strategy x seeds, as a table."""
    if args.framework != "torch":
        import importlib

        return int(importlib.import_module(DEMO_FRAMEWORKS[args.framework], __package__).demo(args))
    import json
    import time

    import torch
    from rich.console import Console

    from .experiments import suite as S

    # Small models train fastest on one thread; several threads on a busy machine are slower.
    torch.set_num_threads(args.threads)
    console = Console()
    if not console.is_terminal:  # piped or captured: room for the table
        console = Console(width=120)
    try:
        experiments = S.plan(args.suite, only=args.only, tiny=args.tiny, mnist_dir=args.mnist_dir,
                             length=args.length, broadcast_bug=args.broadcast_bug,
                             charlm_lr=args.charlm_lr, max_steps=args.max_steps)
    except (ValueError, FileNotFoundError) as exc:
        return _err("demo", exc)
    if args.strategies and not any(S.suite_strategies(args.suite, args.strategies)(e)
                                   for e in experiments):
        return _err("demo", f"no strategy named {args.strategies}")
    for exp in experiments:
        console.print(f"[bold]{exp.title}[/bold]: {exp.cfg.describe()}", highlight=False)
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
        return _err("demo", exc)
    S.print_table(rows, console, title=f"gradguard demo --suite {args.suite}: {args.seeds} seeds, "
                                       f"{time.perf_counter() - t0:.0f} s")
    console.print(S.TABLE_NOTE, highlight=False)
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
        results = S.write_results(rows, run_dir)
        if not args.no_report:
            try:
                from .report import make_report

                out, failed = make_report([str(f) for f in folders], args.report, results=results)
                console.print(f"report: {out}" + (f" ({len(failed)} runs unreadable)" if failed else ""))
            except Exception as exc:  # noqa: BLE001 - the table is the demo's result
                console.print(f"[yellow]report not written: {exc}[/yellow]")
    return 0


def _report(args: argparse.Namespace) -> int:
    """``gradguard report``: the HTML dashboard, or static figures with ``--format png|svg``."""
    from .report import make_report, open_run
    from .report.discover import expand
    from .report.text import printable

    if args.format == "html":
        out, failed = make_report(args.runs, args.output or "report.html")
        for msg in failed:
            print(f"gradguard report: skipped: {printable(msg)}", file=sys.stderr)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
        return 0
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return _err("report", f"--format {args.format} needs {FIGURES_NEED}; "
                              "the HTML report (the default) needs nothing more")
    from .report import RunError
    from .report.static import write_figures

    runs = []
    for p in expand(args.runs):
        try:
            runs.append(open_run(p))
        except RunError as exc:
            print(f"gradguard report: skipped: {printable(exc)}", file=sys.stderr)
    if not runs:
        return _err("report", "no run could be read")
    files = write_figures(runs, args.output or "report-figures", args.format)
    print(f"wrote {len(files)} {args.format} figures to {args.output or 'report-figures'}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    """``gradguard inspect``: a terminal summary of one run."""
    from pathlib import Path

    from .report import open_run
    from .report.discover import find_runs
    from .report.inspect import inspect_run

    below = [p for p in find_runs(args.run) if p != Path(args.run)]
    if below:  # a folder of runs: name them rather than say "no run data"
        names = ", ".join(str(p) for p in below[:3]) + (", ..." if len(below) > 3 else "")
        return _err("inspect", f"{args.run} holds {len(below)} runs, not one; inspect one of them "
                               f"({names}) or report them all: gradguard report {args.run}")
    inspect_run(open_run(args.run), top=args.top)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .kernels import load_bench  # benchmarks/clip_bench.py

    return int(load_bench().main_from_args(args))


def _demo_arguments(demo: argparse.ArgumentParser) -> None:
    """The options of ``gradguard demo`` (one place to add one)."""
    demo.add_argument("--framework", choices=tuple(DEMO_FRAMEWORKS), default="torch",
                      help="framework the demo trains in (default torch)")
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
    demo.add_argument("--no-progress", action="store_true", help="no progress bars or lines")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser (``argv`` decides whether the benchmark's options are loaded)."""
    parser = argparse.ArgumentParser(
        prog="gradguard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="gradguard COMMAND --help shows a command's options.")
    parser.add_argument("--version", action="version", version=f"gradguard {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="the seed article's before/after clipping study")
    _demo_arguments(demo)
    demo.set_defaults(func=_demo)
    report = sub.add_parser("report", help="an offline HTML report (or static figures) of runs")
    report.add_argument("runs", nargs="+", metavar="RUN",
                        help="run folders, or folders to search for runs (e.g. runs/)")
    report.add_argument("-o", "--output", help="report.html, or a folder for --format png|svg")
    report.add_argument("--format", choices=("html", "png", "svg"), default="html",
                        help="html (default; needs nothing more) or static figures (need matplotlib)")
    report.set_defaults(func=_report, guarded=True)
    insp = sub.add_parser("inspect", help="a terminal summary of a run")
    insp.add_argument("run", metavar="RUN", help="run folder")
    insp.add_argument("--top", type=int, default=10, help="events and layers listed (default 10)")
    insp.set_defaults(func=_inspect, guarded=True)
    bench = sub.add_parser("bench", help="clipping speed against torch, and the memory floor")
    if argv is not None and argv[:1] == ["bench"]:
        # its options live in the benchmark module, which imports torch: only load it when
        # asked, so report/inspect start without torch
        from .kernels import load_bench
        load_bench().add_arguments(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args: Any = build_parser(argv).parse_args(argv)
    if getattr(args, "guarded", False):
        return _guarded(args.command, lambda: args.func(args))
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
