"""Time ``gradguard report`` on large synthetic runs and print markdown tables.

    .venv/bin/python benchmarks/report_bench.py            # the cases in docs/performance.md
    .venv/bin/python benchmarks/report_bench.py --quick    # small cases, a few seconds
    .venv/bin/python benchmarks/report_bench.py --flushes  # only the many-flushes table

Each case writes a synthetic run in the run-store format (not timed), then times reading it
(``open_run``), building the page (``render_html``) and the whole command line
(``gradguard report RUN -o FILE`` in a fresh process, torch import included), and reports the
file size and the peak memory of the command.

The many-flushes table writes a run the way a training run does, one flush at a time through
``RunWriter`` (1e6 steps x 500 layers at ``flush_every=100``: 10,000 flushes per kind), and
times ``load_run`` on it after a clean close (compacted), killed before close (only the
merges made on the way), and with compaction off (one file per flush, as before compaction),
then ``compact_run`` on that folder and ``load_run`` again.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = [
    # steps, layers, layer_every
    (100_000, 500, 10),
    (100_000, 100, 1),
    (1_000_000, 500, 100),
]
#: steps, layers, flush_every, layer_every (issue 12: 10,000 shards per kind, < 5 s to read)
FLUSH_CASES = [(1_000_000, 500, 100, 100)]


def run_case(base: Path, steps: int, layers: int, every: int) -> dict[str, float]:
    """Write one synthetic run and time the report on it."""
    from gradguard.report import open_run, render_html
    from gradguard.report.synthetic import write_synthetic_run

    folder = base / f"run-{steps}-{layers}-{every}"
    t = time.perf_counter()
    write_synthetic_run(folder, steps=steps, layers=layers, layer_every=every, shard_steps=max(10_000, steps // 20), spikes=8)
    t_write = time.perf_counter() - t
    t = time.perf_counter()
    run = open_run(folder)
    t_open = time.perf_counter() - t
    rows = len(run.layers)
    t = time.perf_counter()
    text = render_html([run])
    t_render = time.perf_counter() - t
    del run, text
    out = base / "report.html"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "gradguard.cli", "report", str(folder), "-o", str(out)],
        capture_output=True, text=True, check=True,
    )
    t_cli = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_cli = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # the largest child so far: cases run from small to large, so this is the command's own peak
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "steps": steps, "layers": layers, "every": every, "rows": rows, "write": t_write,
        "open": t_open, "render": t_render, "cli": t_cli, "cpu": cpu_cli, "size": out.stat().st_size / 1e6, "peak": peak_mb,
    }


def write_flushes(folder: Path, steps: int, layers: int, flush_every: int, layer_every: int,
                  *, compact: str = "auto", close: bool = True) -> Path:
    """Write ``steps`` steps of ``layers`` layers through ``RunWriter`` as a Monitor does: one
    steps shard (and, when a layer step falls in it, one layers shard) per ``flush_every``
    steps. ``close=False`` leaves the writer open, as a run killed before its end (its lock is
    released so that a reader or a resume can take the folder). Returns the folder."""
    import numpy as np
    import pyarrow as pa

    from gradguard.store import LAYERS_SCHEMA, STEPS_SCHEMA, RunWriter, layer_column

    names = [f"block{i}.weight" for i in range(layers)]
    rng = np.random.default_rng(0)
    w = RunWriter(folder, 0, compact=compact)
    w.write_meta({"name": folder.name, "layers": names, "config": {}, "versions": {}, "notes": []})
    for lo in range(1, steps + 1, flush_every):
        step = np.arange(lo, min(steps + 1, lo + flush_every), dtype=np.int64)
        n = len(step)
        norm = rng.lognormal(0.0, 0.3, n)
        w.write_shard("steps", pa.table({
            "step": step, "time": 1.7e9 + step * 0.05, "loss": 1.0 / step, "lr": np.full(n, 1e-3),
            "total_norm": norm, "total_norm_after": np.minimum(norm, 1.0),
            "clip_coef": np.minimum(1.0, 1.0 / norm), "threshold": np.ones(n),
            "clipped": norm > 1.0, "skipped": np.zeros(n, bool), "nonfinite": np.zeros(n, bool),
            "loss_scale": np.full(n, np.nan), "rank": np.zeros(n, np.int32),
            "lrs": pa.nulls(n, STEPS_SCHEMA.field("lrs").type)}, schema=STEPS_SCHEMA))
        ls = step[step % layer_every == 0]
        if len(ls):
            k = len(ls) * layers
            g = rng.lognormal(-2.0, 0.5, k).astype(np.float32)
            w.write_shard("layers", pa.table({
                "step": np.repeat(ls, layers), "layer": layer_column(names, len(ls)),
                "grad_norm": g, "grad_max_abs": g / 30, "nonfinite_count": np.zeros(k, np.int64),
                "param_norm": np.full(k, 10.0, np.float32), "update_ratio": np.full(k, 1e-3, np.float32),
                "rank": np.zeros(k, np.int32)}, schema=LAYERS_SCHEMA))
        w.next_seq()
    if close:
        w.close()
    else:
        w._release()  # as if killed: the lock would be stale
    return w.path


def flush_case(base: Path, steps: int, layers: int, flush_every: int, layer_every: int) -> list[dict]:
    """``load_run`` times on one many-flushes run, written three ways."""
    from gradguard.store import compact_run, load_run

    def shard_count(p: Path) -> int:
        return sum(1 for n in p.iterdir() if n.name.startswith(("steps-", "layers-")))

    out = []
    for label, kw in (("clean close (compacted)", {}), ("killed before close", {"close": False}),
                      ("compaction off", {"compact": "off"})):
        folder = base / f"flushes-{label.split()[0]}-{steps}"
        t = time.perf_counter()
        folder = write_flushes(folder, steps, layers, flush_every, layer_every, **kw)
        t_write = time.perf_counter() - t
        t = time.perf_counter()
        run = load_run(folder)
        t_read = time.perf_counter() - t
        out.append({"case": label, "files": shard_count(folder), "steps": len(run.steps),
                    "rows": len(run.layers), "write": t_write, "read": t_read})
        if kw.get("compact") == "off":
            t = time.perf_counter()
            compact_run(folder)
            t_c = time.perf_counter() - t
            t = time.perf_counter()
            run = load_run(folder)
            out.append({"case": f"then compact_run ({t_c:.1f} s)", "files": shard_count(folder),
                        "steps": len(run.steps), "rows": len(run.layers), "write": float("nan"),
                        "read": time.perf_counter() - t})
        del run
    return out


def import_time() -> tuple[float, float]:
    """Wall and CPU time of ``import gradguard`` alone in a fresh process (torch comes with it)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import gradguard"], check=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small cases")
    ap.add_argument("--flushes", action="store_true", help="only the many-flushes table")
    args = ap.parse_args()
    cases = [(20_000, 50, 1)] if args.quick else CASES
    flush_cases = [(20_000, 50, 100, 10)] if args.quick else FLUSH_CASES
    with tempfile.TemporaryDirectory() as tmp:
        for steps, layers, every, lev in flush_cases:
            print(f"\n{steps:,} steps x {layers} layers, flush_every={every}, layer_every={lev} "
                  "(written one flush at a time through RunWriter)\n")
            print("| folder | shard files | steps | layer rows | write (s) | load_run (s) |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for r in flush_case(Path(tmp), steps, layers, every, lev):
                print(f"| {r['case']} | {r['files']:,} | {r['steps']:,} | {r['rows']:,} "
                      f"| {r['write']:.1f} | {r['read']:.2f} |", flush=True)
    if args.flushes:
        return
    print()
    wall, cpu = import_time()
    print(f"`import gradguard` alone (fresh process): {wall:.2f} s wall, {cpu:.2f} s CPU\n")
    print("| steps | layers | layer rows every | layer rows | read (s) | build page (s) | `gradguard report` wall (s) | its CPU (s) | file (MB) | peak RSS (MB) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for steps, layers, every in cases:
            r = run_case(Path(tmp), steps, layers, every)
            print(
                f"| {r['steps']:,} | {r['layers']} | {r['every']} | {r['rows']:,} | {r['open']:.2f} | {r['render']:.2f} "
                f"| {r['cli']:.2f} | {r['cpu']:.2f} | {r['size']:.2f} | {r['peak']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
