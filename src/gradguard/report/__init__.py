"""Reports on runs: the offline HTML dashboard, static figures and the terminal summary.

``gradguard report RUN [RUN ...] -o report.html`` and ``gradguard inspect RUN`` are thin wrappers
over :func:`make_report`, :func:`write_figures` and :func:`inspect_run`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .data import RunData, RunError, open_run
from .discover import expand, find_runs
from .html import build_all, render_html, render_views, write_html

__all__ = [
    "RunData", "RunError", "find_runs", "make_report", "open_run", "render_html", "write_html",
]

#: The demo's results next to its run folders (``gradguard demo`` writes it into ``runs/``).
RESULTS_FILE = "demo-results.json"


def load_results(paths: list[str | Path], runs: list[Path]) -> dict[str, dict[str, Any]]:
    """The demo's results for these runs: every ``demo-results.json`` in the given folders or
    up to two levels above a run folder (``runs/<experiment>/<strategy>``), by run name."""
    out: dict[str, dict[str, Any]] = {}
    seen: set[Path] = set()
    candidates = [Path(p) for p in paths] + [q for r in runs for q in (r.parent, r.parent.parent)]
    for folder in candidates:
        f = (folder / RESULTS_FILE).resolve()
        if f in seen or not f.is_file():
            continue
        seen.add(f)
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a results file is an extra: without it the report shows the runs alone
        if isinstance(data, dict):
            out.update({str(k): v for k, v in data.items() if isinstance(v, dict)})
    return out


def make_report(
    paths: list[str | Path], out: str | Path, *, results: dict[str, dict[str, Any]] | None = None,
    **kw: Any,
) -> tuple[Path, list[str]]:
    """Write the HTML report for the runs at (or below) ``paths`` to ``out``.

    A path that is not itself a run folder is searched for runs (``gradguard report runs``).
    Runs that cannot be read or reported are listed in the page (and returned as messages)
    instead of stopping the report; raises :class:`RunError` only when no run at all can be
    read. ``results`` (run name -> the demo's result) defaults to the ``demo-results.json``
    found next to the runs.
    """
    folders = expand(list(paths))
    runs, failed = [], []
    for p in folders:
        try:
            runs.append(open_run(p))
        except RunError as exc:
            failed.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - a damaged run is a line in the page, not a crash
            failed.append(f"{p}: cannot be read ({type(exc).__name__}: {exc})")
    if results is None:
        results = load_results(list(paths), folders)
    if results:  # the demo's table order (experiments as planned), then any other runs
        order = {name: k for k, name in enumerate(results)}
        runs.sort(key=lambda r: order.get(r.name, len(order)))
    views = build_all(runs, failed, kw.get("buckets", 2000)) if runs else []
    if not views:
        raise RunError("; ".join(failed) if failed else "no run given")
    text = render_views(views, failed, results=results, **kw)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out, failed
