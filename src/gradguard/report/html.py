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
from .views import DEFAULT_BUCKETS, RunViews, build_views, floats


def _asset(*parts: str) -> str:
    return resources.files("gradguard.report").joinpath(*parts).read_text(encoding="utf-8")


def _run_json(v: RunViews) -> dict[str, Any]:
    return {
        "name": v.name,
        "path": v.path,
        "summary": v.summary,
        "norm": v.norm,
        "rate": v.rate,
        "heatmap": v.heatmap.to_json() if v.heatmap is not None else None,
        "flow": v.flow,
        "ratio": v.ratio,
        "events": v.events,
        "events_total": v.events_total,
        "meta": v.meta,
        "notes": v.notes,
    }


def compare_json(views: list[RunViews], buckets: int = DEFAULT_BUCKETS) -> dict[str, Any] | None:
    """Norm and loss of several runs on one shared step axis (each run downsampled min/max first)."""
    if len(views) < 2:
        return None
    picked = []
    for v in views:
        step, norm, loss = v.norm_series
        idx = select_indices(len(step), [norm, loss], buckets=buckets)
        picked.append((step[idx], norm[idx], loss[idx]))
    xs = (
        np.unique(np.concatenate([p[0] for p in picked])) if picked else np.zeros(0, dtype=np.int64)
    )
    norms, losses = [], []
    all_loss = []
    for st, nm, ls in picked:
        pos = np.searchsorted(xs, st)
        n = np.full(len(xs), np.nan)
        lv = np.full(len(xs), np.nan)
        n[pos] = np.where(nm > 0, nm, np.nan)
        lv[pos] = ls
        norms.append(floats(n))
        losses.append(floats(lv))
        all_loss.append(ls[np.isfinite(ls)])
    fl = np.concatenate(all_loss) if all_loss else np.zeros(0)
    return {
        "x": [int(x) for x in xs],
        "norm": norms,
        "loss": losses,
        "loss_log": bool(len(fl) and (fl > 0).all()),
    }


def _json_for_script(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False, default=str)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(
    runs: list[RunData], failed: list[str] | None = None, *, buckets: int = DEFAULT_BUCKETS
) -> str:
    """The whole report page for ``runs`` (``failed``: messages for runs that could not be read)."""
    views = [build_views(r, buckets=buckets) for r in runs]
    from .. import __version__ as version  # type: ignore[attr-defined]

    payload = {
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "version": str(version),
        "runs": [_run_json(v) for v in views],
        "compare": compare_json(views, buckets),
        "failed": list(failed or []),
    }
    nonce = secrets.token_urlsafe(18)
    names = [v.name for v in views]
    title = "gradguard report: " + (", ".join(names) if names else "no runs")
    nav = "".join(f'<a href="#run{i}">{html.escape(n)}</a>' for i, n in enumerate(names)) + (
        '<a href="#compare">comparison</a>' if len(views) > 1 else ""
    )
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
            f"<header><h1>gradguard report</h1><p>{html.escape(', '.join(names) or 'no runs')}"
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
