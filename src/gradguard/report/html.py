"""The self-contained HTML report: one file, scripts, styles and data inlined, no network.

Safety: the data travel as one JSON block whose ``<``, ``>`` and ``&`` are escaped as ``\\u003c``
and so on, so no run, layer or event text can close the script element; the page's script puts
every such text into the page with ``textContent``; the few names written by Python (title, run
list) go through :func:`html.escape`. A Content-Security-Policy allows only the page's own scripts
(by nonce), no inline event handlers, and no network at all, as a second wall.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import secrets
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .data import RunData
from .downsample import select_indices
from .text import printable
from .views import DEFAULT_BUCKETS, RunViews, build_views, floats, spans_decades


def _asset(*parts: str) -> str:
    return resources.files("gradguard.report").joinpath(*parts).read_text(encoding="utf-8")


def _run_json(v: RunViews, group: int, result: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "name": v.name,
        "path": v.path,
        "group": group,
        "result": result,
        "summary": v.summary,
        "norm": v.norm,
        "rate": v.rate,
        "lr": v.lr,
        "heatmap": v.heatmap.to_json() if v.heatmap is not None else None,
        "flow": v.flow,
        "ratio": v.ratio,
        "events": v.events,
        "events_total": v.events_total,
        "incident": v.incident,
        "meta": v.meta,
        "notes": v.notes,
    }


def groups_of(views: list[RunViews]) -> list[tuple[str, list[int]]]:
    """The runs' experiments in order of first appearance: (title, indices into ``views``).
    Runs with no experiment share one group (titled "runs")."""
    order: dict[str, list[int]] = {}
    for i, v in enumerate(views):
        order.setdefault(v.group, []).append(i)
    return [(key or "runs", idx) for key, idx in order.items()]


def compare_json(views: list[RunViews], buckets: int = DEFAULT_BUCKETS) -> dict[str, Any] | None:
    """Norm and loss of several runs on one shared step axis (each run downsampled min/max
    first, its non-finite steps kept). ``norm_nonfinite`` / ``loss_nonfinite`` list, per run,
    the indices into ``x`` where its value is not finite: the page marks them at the top of
    the axis instead of breaking it."""
    if len(views) < 2:
        return None
    picked = []
    for v in views:
        step, norm, loss = v.norm_series
        bad = ~np.isfinite(norm) | ~np.isfinite(loss)
        idx = select_indices(len(step), [norm, loss], buckets=buckets,
                             marks=[(bad, np.ones_like(norm))])
        picked.append((step[idx], norm[idx], loss[idx]))
    xs = (
        np.unique(np.concatenate([p[0] for p in picked])) if picked else np.zeros(0, dtype=np.int64)
    )
    norms, losses, norm_nf, loss_nf = [], [], [], []
    all_loss = []
    for st, nm, ls in picked:
        pos = np.searchsorted(xs, st)
        n = np.full(len(xs), np.nan)
        lv = np.full(len(xs), np.nan)
        n[pos] = np.where(nm > 0, nm, np.nan)
        lv[pos] = ls
        norms.append(floats(n))
        losses.append(floats(lv))
        norm_nf.append([int(p) for p in pos[~np.isfinite(nm)]])
        loss_nf.append([int(p) for p in pos[~np.isfinite(ls)]])
        all_loss.append(ls[np.isfinite(ls)])
    fl = np.concatenate(all_loss) if all_loss else np.zeros(0)
    return {
        "x": [int(x) for x in xs],
        "norm": norms,
        "loss": losses,
        "norm_nonfinite": norm_nf,
        "loss_nonfinite": loss_nf,
        "loss_log": spans_decades(fl),
    }


def _json_for_script(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def build_all(runs: list[RunData], failed: list[str], buckets: int = DEFAULT_BUCKETS) -> list[RunViews]:
    """Views of every run; a run whose data break the views is listed in ``failed`` (with the
    reason in one line) instead of taking the report down."""
    views = []
    for r in runs:
        try:
            views.append(build_views(r, buckets=buckets))
        except Exception as exc:  # noqa: BLE001 - one damaged run must not hide the others
            failed.append(f"{r.path}: cannot be reported ({type(exc).__name__}: {exc})")
    return views


def render_html(
    runs: list[RunData], failed: list[str] | None = None, *, buckets: int = DEFAULT_BUCKETS,
    results: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The whole report page for ``runs`` (``failed``: messages for runs that could not be
    read; ``results``: the demo's result per run name, shown next to the run)."""
    failed = list(failed or [])
    views = build_all(runs, failed, buckets)
    return render_views(views, failed, buckets=buckets, results=results)


def render_views(
    views: list[RunViews], failed: list[str], *, buckets: int = DEFAULT_BUCKETS,
    results: dict[str, dict[str, Any]] | None = None,
) -> str:
    """The page for already built views (see :func:`render_html`)."""
    from .. import __version__ as version  # type: ignore[attr-defined]

    groups = groups_of(views)
    gindex = {i: g for g, (_t, idx) in enumerate(groups) for i in idx}
    res = results or {}
    payload = {
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "version": str(version),
        "runs": [_run_json(v, gindex[i], res.get(v.name)) for i, v in enumerate(views)],
        "groups": [
            {"title": t, "runs": idx, "compare": compare_json([views[i] for i in idx], buckets)}
            for t, idx in groups
        ],
        "failed": list(failed),
    }
    nonce = secrets.token_urlsafe(18)
    names = [printable(v.name) for v in views]  # control characters shown, not sent raw
    n, m = len(views), len(groups)
    many = n > 3
    what = (f"{n} runs" + (f" in {m} experiments" if m > 1 else "")) if many else (", ".join(names) or "no runs")
    title = "gradguard report: " + (
        what + (" (" + ", ".join(printable(t) for t, _ in groups[:6]) + (", ..." if m > 6 else "") + ")" if m > 1 else "")
        if many else what
    )
    if m > 1:
        nav = "".join(f'<a href="#exp{g}">{html.escape(printable(t))} ({len(idx)})</a>'
                      for g, (t, idx) in enumerate(groups))
    else:
        nav = "".join(f'<a href="#run{i}">{html.escape(v)}</a>' for i, v in enumerate(names[:12]))
        nav += f"<span>and {n - 12} more</span>" if n > 12 else ""
    csp = (
        "default-src 'none'; "
        f"script-src 'nonce-{nonce}'; "
        "style-src 'unsafe-inline'; img-src data:; "
        "base-uri 'none'; form-action 'none'"
    )
    uplot_css = _asset("vendor", "uPlot.min.css")
    css = _asset("assets", "report.css")
    uplot_js = _asset("vendor", "uPlot.iife.min.js")
    js = _asset("assets", "report.js")
    return "".join(
        [
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{html.escape(title)}</title>",
            f"<style>{uplot_css}\n{css}</style></head><body>",
            f"<header><h1>gradguard report</h1><p>{html.escape(what)}"
            f" \u00b7 generated {html.escape(payload['generated'])} by gradguard {html.escape(str(version))}</p>",
            f"<nav>{nav}</nav></header>",
            '<main id="gg-root"></main>',
            "<footer>Self-contained: all data and code are in this file; it needs no network. "
            "Charts by uPlot (MIT licence).</footer>",
            f'<script type="application/json" id="gg-data">{_json_for_script(payload)}</script>',
            f'<script nonce="{nonce}">{uplot_js}</script>',
            f'<script nonce="{nonce}">{js}</script>',
            "</body></html>\n",
        ]
    )


def write_html(
    runs: list[RunData], out: str | Path, failed: list[str] | None = None, **kw: Any
) -> Path:
    """Write the report to ``out`` (atomically: a temporary file, then a rename)."""
    out = Path(out)
    text = render_html(runs, failed, **kw)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out
