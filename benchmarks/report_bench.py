"""Time ``gradguard report`` on large synthetic runs and print a markdown table.

    .venv/bin/python benchmarks/report_bench.py            # the cases in docs/performance.md
    .venv/bin/python benchmarks/report_bench.py --quick    # a small case, a few seconds

Each case writes a synthetic run in the run-store format (not timed), then times reading it
(``open_run``), building the page (``render_html``) and the whole command line
(``gradguard report RUN -o FILE`` in a fresh process, torch import included), and reports the
file size and the peak memory of the command.
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
    ap.add_argument("--quick", action="store_true", help="one small case")
    args = ap.parse_args()
    cases = [(20_000, 50, 1)] if args.quick else CASES
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
