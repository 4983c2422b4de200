"""``gradguard inspect RUN``: a terminal summary of a run through ``rich``.

Shows the step count, clip rate, skips, the learning rate (every param group's at the last
step, and a sparkline when it changes), the events with their top layers, the worst layers and a
sparkline of the gradient norm. Every name from the run is printed as plain text (``rich.text.Text``),
never as markup, so a layer called ``[bold]x`` prints as written, and with its control characters
escaped (:func:`gradguard.report.text.printable`), so a name cannot move the cursor, clear the
screen or set the terminal's title.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .data import RunData
from .downsample import bucket_edges
from .text import printable
from .views import build_views, layer_table

BLOCKS = "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"


def sparkline(values: np.ndarray, width: int = 60) -> str:
    """Unicode sparkline of log10 ``values`` (bucket maximum, so spikes show); ``!`` marks a
    bucket with a non-finite value, a space one with no value."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return ""
    edges = bucket_edges(len(v), width)
    out = []
    pos = np.isfinite(v) & (v > 0)
    logs = np.where(pos, np.log10(np.where(pos, v, 1.0)), np.nan)
    fin = logs[np.isfinite(logs)]
    lo, hi = (float(fin.min()), float(fin.max())) if len(fin) else (0.0, 1.0)
    span = hi - lo if hi > lo else 1.0
    for a, b in zip(edges[:-1], edges[1:]):
        seg = v[a:b]
        if (~np.isfinite(seg)).any():
            out.append("!")
            continue
        ls = logs[a:b]
        ls = ls[np.isfinite(ls)]
        if not len(ls):
            out.append(" ")
            continue
        out.append(BLOCKS[min(7, int((ls.max() - lo) / span * 7.999))])
    return "".join(out)


def _f(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return printable(x)
    try:
        f = float(x)
    except (TypeError, ValueError):
        return printable(x)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "inf" if f > 0 else "-inf"
    if f != 0 and (abs(f) >= 1e5 or abs(f) < 1e-3):
        return f"{f:.2e}"
    return f"{f:.4g}"


def _lr_text(lr: dict[str, Any]) -> str:
    """The last step's learning rate(s): ``1e-3`` or ``2 groups: 0.1, 0.01``; ``constant``
    when it never changed."""
    last = ", ".join(_f(x) for x in lr["last"])
    head = last if lr["groups"] == 1 else f"{lr['groups']} groups: {last}"
    return f"{head} (last step{', constant' if lr['constant'] else ''})"


def inspect_run(run: RunData, *, console: Any = None, top: int = 10, width: int = 60) -> None:
    """Print the summary of ``run`` to ``console`` (a ``rich.console.Console``; stdout if None)."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    v = build_views(run)
    s = v.summary
    head = Text()
    head.append("run ", style="bold")
    head.append(printable(run.name))
    head.append("\n")
    head.append(printable(run.path), style="dim")
    console.print(Panel(head, title="gradguard inspect", expand=False))

    stats = Table.grid(padding=(0, 2))
    stats.add_column(style="bold")
    stats.add_column()
    rng = "-" if s["first_step"] is None else f"{s['first_step']}-{s['last_step']}"
    rate = "-" if s["clip_rate"] is None else f"{100 * s['clip_rate']:.1f}%"
    for k, val in (
        ("steps", f"{s['steps']} (steps {rng})"),
        ("clip rate", f"{rate} ({s['clipped']} clipped)"),
        ("skipped", str(s["skipped"])),
        ("non-finite", str(s["nonfinite"])),
        ("norm", f"median {_f(s['median_norm'])}, max {_f(s['max_norm'])}"),
        ("last-step loss", _f(s["final_loss"])),
        ("layers", str(s["layers"])),
        ("events", str(s["events"])),
    ):
        stats.add_row(k, Text(val))
    if v.lr is not None:
        stats.add_row("lr", Text(_lr_text(v.lr)))
    console.print(stats)

    step, norm, _loss = v.norm_series
    if len(norm):
        line = Text("norm  ", style="bold")
        line.append(sparkline(norm, width), style="cyan")
        fin = norm[np.isfinite(norm) & (norm > 0)]
        if len(fin):
            line.append(f"  log scale {_f(fin.min())}..{_f(fin.max())}", style="dim")
        console.print(line)
    if v.lr is not None and not v.lr["constant"]:
        line = Text("lr    ", style="bold")
        rate = np.asarray(v.lr["series"][0], dtype=np.float64)
        line.append(sparkline(rate, width), style="green")
        fin = rate[np.isfinite(rate) & (rate > 0)]
        span = f" {_f(fin.min())}..{_f(fin.max())}" if len(fin) else ""
        line.append(f"  {v.lr['labels'][0]}, log scale{span}", style="dim")
        console.print(line)

    for note in v.notes + v.meta["notes"]:
        console.print(Text("note: " + printable(note), style="yellow"))

    if v.events:
        t = Table(title=f"events ({v.events_total})", title_justify="left")
        for col in ("step", "rule", "value", "baseline", "action", "top layers"):
            t.add_column(col)
        for ev in v.events[:top]:
            tops = ", ".join(
                f"{printable(x['layer'])} ({_f(x['norm'])})" for x in ev["top_layers"][:3]
            )
            if ev["first_nonfinite_layer"]:
                tops = f"first non-finite: {printable(ev['first_nonfinite_layer'])}" + (
                    f"; {tops}" if tops else ""
                )
            t.add_row(
                *(
                    Text(_f(c))
                    for c in (ev["step"], ev["rule"], ev["value"], ev["baseline"], ev["action"])
                ),
                Text(tops),
            )
        if v.events_total > top:
            t.caption = f"{v.events_total - top} more; see gradguard report"
        console.print(t)
    else:
        console.print(Text("no events", style="dim"))

    lt = layer_table(run)
    if len(lt):
        t = Table(
            title="worst layers (non-finite first, then largest max norm)", title_justify="left"
        )
        for col in ("layer", "max norm", "mean norm", "non-finite", "update/weight"):
            t.add_column(col)
        for r in lt.head(top).itertuples(index=False):
            t.add_row(
                Text(printable(r.layer)),
                _f(r.max_norm),
                _f(r.mean_norm),
                str(int(r.nonfinite)),
                _f(r.update_ratio),
            )
        console.print(t)
