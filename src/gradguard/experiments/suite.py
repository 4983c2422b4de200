"""The demo suite: every experiment x every strategy x seeds, one table, run folders, report.

Size: the suite's plan, runner, verdicts and table share the ``Row`` structure; each function
is short.

``plan(suite)`` lists the experiments of a suite with their configs; ``run_suite`` trains
them through each experiment's ``run`` (which all use ``loop.train``), shows progress bars,
gives one ``Row`` per experiment and strategy, attaches a ``gradguard.Monitor`` to the first
seed of each (experiment, strategy) when gradguard provides one, and ``print_table`` shows
the rows in the terminal.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gradguard as gg

from . import charlm, pascanu, seed_mlp, seq_lstm
from .loop import RunResult
from .strategies import Strategy, strategies

#: experiment keys, in table order
EXPERIMENTS = ("mlp", "lstm", "temporal", "adding", "charlm")
MODULES: dict[str, Any] = {"mlp": seed_mlp, "lstm": seq_lstm, "temporal": pascanu,
                           "adding": pascanu, "charlm": charlm}
QUICK = ("mlp", "lstm", "temporal", "charlm")


@dataclass(frozen=True)
class Experiment:
    """An experiment ready to run: its key, module (with ``run``) and config."""

    key: str
    module: Any
    cfg: Any
    #: the global / per-tensor norm threshold of the quick suite for this experiment
    norm: float = 1.0

    @property
    def title(self) -> str:
        return self.cfg.name if self.key in ("temporal", "adding") else self.module.NAME

    @property
    def folder(self) -> str:
        """The experiment's part of run folder and run names: ``mlp``, ``temporal-T20``."""
        return f"{self.key}-T{self.cfg.length}" if self.key in ("temporal", "adding") else self.key


def plan(suite: str = "quick", *, only: Sequence[str] | None = None, tiny: bool = False,
         mnist_dir: str | None = None, length: int | None = None,
         broadcast_bug: bool = False, charlm_lr: float | None = None,
         max_steps: int | None = None) -> list[Experiment]:
    """The experiments of ``suite`` ("quick": mlp, lstm, temporal order at the lengths of
    ``pascanu.QUICK_LENGTHS``, charlm; "full": all five at their long sizes), restricted to
    ``only``; ``tiny`` shrinks each to seconds. ``length`` runs the Pascanu tasks at that one
    length; ``max_steps`` sets the step budget of the Pascanu tasks and the character LM."""
    keys = list(only) if only else list(QUICK if suite == "quick" else EXPERIMENTS)
    bad = [k for k in keys if k not in EXPERIMENTS]
    if bad:
        raise ValueError(f"unknown experiment(s) {bad}; choose from {list(EXPERIMENTS)}")
    out = []
    for key in keys:
        if key == "mlp":
            cfg: Any = seed_mlp.MLPConfig.for_suite(suite)
            if broadcast_bug:
                cfg = replace(cfg, broadcast_bug=True)
            mod: Any = seed_mlp
        elif key == "lstm":
            cfg, mod = seq_lstm.LSTMConfig.for_suite(suite, mnist_dir), seq_lstm
        elif key in ("temporal", "adding"):
            lengths = (length,) if length or suite != "quick" or tiny else pascanu.QUICK_LENGTHS
            for n in lengths:
                cfg = pascanu.PascanuConfig.for_suite(suite, key, n)
                if max_steps is not None:
                    cfg = replace(cfg, max_steps=max_steps)
                out.append(Experiment(key, pascanu, cfg.tiny() if tiny else cfg, norm=1.0))
            continue
        else:
            cfg, mod = charlm.CharLMConfig.for_suite(suite), charlm
            if charlm_lr is not None:
                cfg = replace(cfg, lr=charlm_lr)
            if max_steps is not None:
                cfg = replace(cfg, steps=max_steps)
        if tiny:
            cfg = cfg.tiny()
        # Zhang et al. clip their LSTM LM at 0.25; Pascanu and the seed use 1.0
        out.append(Experiment(key, mod, cfg, norm=0.25 if key == "charlm" else 1.0))
    return out


@dataclass
class Row:
    """One line of the results table: an experiment and a strategy over all seeds."""

    experiment: str
    strategy: str
    metric_name: str
    results: list[RunResult] = field(default_factory=list)
    #: the run name of seed 0's run folder, ``<experiment folder>/<strategy slug>``
    run: str = ""

    @property
    def values(self) -> list[float]:
        return [r.value for r in self.results]

    @property
    def mean(self) -> float:
        finite = [v for v in self.values if math.isfinite(v)]
        return statistics.fmean(finite) if finite else math.nan

    @property
    def spread(self) -> float:
        """Sample standard deviation of the finite values (0 for one value)."""
        finite = [v for v in self.values if math.isfinite(v)]
        return statistics.stdev(finite) if len(finite) > 1 else 0.0

    @property
    def nonfinite_epochs(self) -> list[int | None]:
        return [r.history.first_nonfinite_epoch for r in self.results]

    @property
    def clip_rate(self) -> float:
        steps = sum(r.history.steps for r in self.results)
        return sum(r.history.clipped_steps for r in self.results) / steps if steps else 0.0

    @property
    def skipped(self) -> int:
        return sum(r.history.skipped_steps for r in self.results)

    @property
    def verdicts(self) -> list[str]:
        """Per seed: "diverged", "did not learn" or "" (see ``RunResult.verdict``)."""
        return [r.verdict for r in self.results]

    def verdict_text(self) -> str:
        """The table's flag: which seeds diverged or did not learn (empty when all learned)."""
        n = len(self.results)
        parts = []
        for word in ("diverged", "did not learn"):
            k = self.verdicts.count(word)
            if k:
                parts.append(word if k == n else f"{word} {k}/{n}")
        return ", ".join(parts)

    def result_text(self) -> str:
        """The table's result cell: mean +- spread (non-finite seeds counted apart), or for
        success tasks "k/n solved" and the steps each took."""
        if self.metric_name == "solved":
            steps = [r.success_step for r in self.results if r.success_step is not None]
            k, n = len(steps), len(self.results)
            at = f" at {','.join(str(s) for s in sorted(steps))}" if steps else ""
            return f"{k}/{n}{at}"
        bad = sum(not math.isfinite(v) for v in self.values)
        if bad == len(self.values):
            return "nan"
        finite = len(self.values) - bad
        text = f"{_num(self.mean)} ± {_num(self.spread)}" if finite > 1 else _num(self.mean)
        return text + (f" ({bad} nan)" if bad else "")

    def to_dict(self) -> dict[str, Any]:
        """The row as plain data (``--json``)."""
        return {
            "experiment": self.experiment, "strategy": self.strategy,
            "metric": self.metric_name, "values": self.values, "mean": self.mean,
            "spread": self.spread, "first_nonfinite_epoch": self.nonfinite_epochs,
            "clip_rate": self.clip_rate, "skipped_steps": self.skipped,
            "success_steps": [r.success_step for r in self.results],
            "max_grad_norm": [r.history.max_grad_norm for r in self.results],
            "final_metric": [r.history.final_metric for r in self.results],
            "epoch_loss": [r.history.epoch_loss for r in self.results],
            "epoch_steps": [r.history.epoch_steps for r in self.results],
            "extra": [r.extra for r in self.results],
            "verdict": self.verdicts, "chance": [r.chance for r in self.results],
            "learned": [r.learned for r in self.results],
        }

    def report_entry(self) -> dict[str, Any]:
        """What the HTML report shows of this row next to the run folder of seed 0."""
        first = self.results[0] if self.results else None
        return {
            "experiment": self.experiment, "strategy": self.strategy, "metric": self.metric_name,
            "seeds": len(self.results), "result": self.result_text(),
            "summary": "k/n seeds solved (at these steps)" if self.metric_name == "solved"
            else "mean ± sample sd over the seeds whose result is finite",
            "verdict": self.verdict_text(),
            "seed0": None if first is None else (
                ("solved" if first.success_step is not None else "not solved")
                if self.metric_name == "solved" else _num(first.value)),
            "seed0_verdict": "" if first is None else first.verdict,
            "chance": None if first is None else first.chance,
            "learned": None if first is None else first.learned,
        }


def _num(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if abs(x) < 1e5 else f"{x:.2e}"


def _monitor(folder: Path, exp: Experiment, strategy: Strategy, seed: int) -> Any:
    """A ``gradguard.Monitor`` writing to ``folder``, or None when gradguard has none (yet)."""
    monitor_cls = getattr(gg, "Monitor", None)
    if monitor_cls is None:
        return None
    config = {"experiment": exp.title, "strategy": strategy.name, "seed": seed,
              **{k: v for k, v in exp.cfg.__dict__.items() if isinstance(v, (int, float, str))}}
    # per-layer statistics every 50 steps keep the monitor's cost small next to these tiny models;
    # a demo run replaces the same run of the previous demo (mode "overwrite"), so re-running
    # `make demo` neither mixes two runs nor leaves versioned siblings for the report to find
    import inspect

    kw = {"mode": "overwrite"} if "mode" in inspect.signature(monitor_cls).parameters else {}
    return monitor_cls(str(folder), name=f"{exp.folder}/{strategy.slug}", config=config,
                       layer_every=50, **kw)


def suite_strategies(suite: str, names: Sequence[str] | None = None) -> Callable[[Experiment], list[Strategy]]:
    """Per experiment, the strategies of ``suite`` at the experiment's norm threshold, kept
    to ``names`` when given (names may leave out the threshold: ``"global norm"``)."""
    def pick(exp: Experiment) -> list[Strategy]:
        table = strategies(suite, norm=exp.norm)
        if not names:
            return table
        return [s for s in table if any(s.name == n or s.name.startswith(n + " ") for n in names)]
    return pick


@dataclass(frozen=True)
class _Job:
    """One run, as plain data a worker process can receive."""

    key: str
    cfg: Any
    norm: float
    suite: str
    strategy: str
    seed: int
    folder: str | None  # run folder for the monitor, or None
    exp_index: int = 0  # which experiment of the plan (progress lines)


def _execute(job: _Job, on_step: Callable[[], None] | None = None) -> RunResult:
    exp = Experiment(job.key, MODULES[job.key], job.cfg, job.norm)
    strategy = next(s for s in strategies(job.suite, norm=job.norm) if s.name == job.strategy)
    monitor = _monitor(Path(job.folder), exp, strategy, job.seed) if job.folder else None
    try:
        return exp.module.run(strategy, job.seed, job.cfg, monitor=monitor, on_step=on_step)
    finally:
        if monitor is not None and hasattr(monitor, "close"):
            monitor.close()


def _worker(job: _Job) -> RunResult:
    """Entry point of a worker process: one torch thread, detector warnings silenced."""
    import warnings

    import torch

    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="gradguard")
        return _execute(job)


def run_suite(experiments: list[Experiment], suite: str = "quick", seeds: int = 3, *,
              names: Sequence[str] | None = None, run_dir: str | Path | None = "runs",
              progress: bool = True, console: Any = None, jobs: int = 1) -> tuple[list[Row], list[Path]]:
    """Run every experiment with every strategy of ``suite`` (kept to ``names``) and
    ``seeds`` seeds, in ``jobs`` processes (1: in this process, with per-step progress).

    Progress: bars on a terminal; when ``console`` writes to a pipe or a file (``make demo |
    tee log``) bars would only appear at the end, so one line is printed per finished
    experiment instead.

    Returns the rows, in table order whatever order the runs finish in, and the run folders
    written (one per experiment and strategy, for seed 0, when gradguard has a Monitor and
    ``run_dir`` is not None).
    """
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    pick = suite_strategies(suite, names)
    monitored = run_dir is not None and hasattr(gg, "Monitor")
    plan_: list[tuple[int, _Job]] = []  # (index of the row, job)
    rows: list[Row] = []
    folders: list[Path] = []
    for e, exp in enumerate(experiments):
        for strategy in pick(exp):
            folder = Path(run_dir) / exp.folder / strategy.slug if monitored else None  # type: ignore[arg-type]
            if folder is not None:
                folders.append(folder)
            rows.append(Row(exp.title, strategy.name, "", run=f"{exp.folder}/{strategy.slug}"))
            for seed in range(seeds):
                plan_.append((len(rows) - 1, _Job(exp.key, exp.cfg, exp.norm, suite, strategy.name,
                                                  seed, str(folder) if seed == 0 and folder else None,
                                                  exp_index=e)))
    results: dict[int, RunResult] = {}
    lines = progress and not console.is_terminal
    left = [sum(1 for _, j in plan_ if j.exp_index == e) for e in range(len(experiments))]
    t0 = time.perf_counter()

    def finished(job: _Job) -> None:
        left[job.exp_index] -= 1
        if lines and left[job.exp_index] == 0:
            done = sum(1 for n in left if n == 0)
            exp = experiments[job.exp_index]
            n = sum(1 for _, j in plan_ if j.exp_index == job.exp_index)
            console.print(f"[{done}/{len(experiments)}] {exp.title}: {n} runs done, "
                          f"{time.perf_counter() - t0:.0f} s", highlight=False)

    columns = (TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, disable=not progress or lines, transient=False) as bar:
        tasks = []
        for e, exp in enumerate(experiments):
            n = sum(1 for _, j in plan_ if j.exp_index == e)
            tasks.append(bar.add_task(exp.title, total=n * exp.cfg.total_steps()))
        if jobs <= 1:
            for i, (row_index, job) in enumerate(plan_):
                task = tasks[job.exp_index]
                bar.update(task, description=f"{rows[row_index].experiment}: {job.strategy}"[:34])
                done = bar.tasks[[t.id for t in bar.tasks].index(task)].completed
                results[i] = _execute(job, on_step=lambda t=task: bar.advance(t))
                # a run that stopped early (solved, or diverged) leaves its share of the bar
                bar.update(task, completed=done + job.cfg.total_steps())
                finished(job)
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # forkserver: workers fork from a clean server that imported gradguard and torch
            # once (cheap to start, and no fork of this process's threads); spawn elsewhere
            if "forkserver" in multiprocessing.get_all_start_methods():
                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload([__name__])
            else:
                ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                futures = {pool.submit(_worker, job): i for i, (_, job) in enumerate(plan_)}
                for fut in as_completed(futures):
                    i = futures[fut]
                    job = plan_[i][1]
                    results[i] = fut.result()
                    bar.update(tasks[job.exp_index], advance=job.cfg.total_steps(),
                               description=f"{rows[plan_[i][0]].experiment}: {job.strategy}"[:34])
                    finished(job)
    for i, (row_index, _) in enumerate(plan_):
        rows[row_index].results.append(results[i])
        rows[row_index].metric_name = results[i].metric_name
    return rows, folders


#: Printed under the demo's table: what each column means.
TABLE_NOTE = (
    "result: the experiment's metric (named after it), mean ± sample sd over the seeds whose "
    "result is finite (solved tasks: k/n seeds solved, at these steps); flag: seeds that "
    "diverged (non-finite, or a loss worse than a model that learned nothing: the constant "
    "predictor's MSE, the uniform predictor's cross-entropy) or did not learn (MSE above half "
    "the target's variance, accuracy under twice chance, cross-entropy above the character "
    "frequencies' own); non-finite at epoch: per seed, '-' never; clipped: share of steps "
    "where the clipper changed a gradient; skipped: updates refused (non-finite gradient), "
    "all seeds. The HTML report shows the same result next to each run (seed 0)."
)


def write_results(rows: list[Row], run_dir: str | Path | None,
                  name: str = "demo-results.json") -> dict[str, dict[str, Any]]:
    """The rows' report entries by run name (``<experiment>/<strategy>``, as the monitor names
    seed 0's run), also written to ``run_dir/name`` so that a later ``gradguard report
    runs`` shows the same results; returns the mapping."""
    import json

    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if not r.results:
            continue
        out[r.run or f"{r.experiment}/{r.strategy}"] = r.report_entry()
    if run_dir is not None and out:
        path = Path(run_dir) / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(out, indent=1, default=str), encoding="utf-8")
            tmp.replace(path)
        except OSError:
            pass  # the report still gets the mapping directly
    return out


def print_table(rows: list[Row], console: Any = None, title: str = "gradguard demo") -> None:
    """The results table: one line per experiment and strategy."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or captured: don't squeeze the table into 80
            console = Console(width=110)
    from rich.text import Text

    seeds = max((len(r.results) for r in rows), default=0)
    table = Table(title=title, show_lines=False)
    table.add_column("experiment (metric)", min_width=20)
    table.add_column("strategy", no_wrap=True)
    table.add_column(f"result (mean ± sd,\n{seeds} seeds)", justify="right", no_wrap=True)
    table.add_column("flag", no_wrap=True)
    table.add_column("non-finite\nat epoch", justify="right")
    table.add_column("clipped", justify="right")
    table.add_column("skipped", justify="right")
    last = None
    for i, r in enumerate(rows):
        first = ",".join("-" if e is None else str(e) for e in r.nonfinite_epochs)
        label = f"{r.experiment} ({r.metric_name})" if r.experiment != last else ""
        flag = r.verdict_text()
        style = "bold red" if flag.startswith("diverged") else "yellow"
        table.add_row(label, r.strategy, r.result_text(), Text(flag, style=style), first,
                      f"{r.clip_rate:.0%}", str(r.skipped),
                      end_section=i + 1 < len(rows) and rows[i + 1].experiment != r.experiment)
        last = r.experiment
    console.print(table)


def print_curves(rows: list[Row], console: Any = None, points: int = 8) -> None:
    """Loss against steps (mean over the seeds that reached each point), one line per row:
    the epoch losses at up to ``points`` evenly spaced evaluations."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    by_exp: dict[str, list[Row]] = {}
    for r in rows:
        by_exp.setdefault(r.experiment, []).append(r)
    for exp, group in by_exp.items():
        steps = max((r.history.epoch_steps for r in group[0].results), key=len, default=[])
        if not steps:
            continue
        idx = sorted({round(i * (len(steps) - 1) / max(points - 1, 1)) for i in range(points)})
        table = Table(title=f"{exp}: loss against steps (mean over seeds)")
        table.add_column("strategy", no_wrap=True)
        for i in idx:
            table.add_column(str(steps[i]), justify="right")
        for r in group:
            cells = []
            for i in idx:
                vals = [h.epoch_loss[i] for h in (x.history for x in r.results) if len(h.epoch_loss) > i]
                cells.append(_num(statistics.fmean(vals)) if vals else "")
            table.add_row(r.strategy, *cells)
        console.print(table)


def markdown_table(rows: list[Row]) -> str:
    """The results table as GitHub markdown (``gradguard demo --markdown``)."""
    seeds = max((len(r.results) for r in rows), default=0)
    lines = [f"| experiment (metric) | strategy | result (mean ± sd, {seeds} seeds) | flag | "
             "non-finite at epoch | clipped | skipped |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
    last = None
    for r in rows:
        first = ",".join("-" if e is None else str(e) for e in r.nonfinite_epochs)
        label = f"{r.experiment} ({r.metric_name})" if r.experiment != last else ""
        lines.append(f"| {label} | {r.strategy} | {r.result_text()} | {r.verdict_text()} | "
                     f"{first} | {r.clip_rate:.0%} | {r.skipped} |")
        last = r.experiment
    return "\n".join(lines)
