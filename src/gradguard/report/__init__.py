"""Reports on runs: the offline HTML dashboard, static figures and the terminal summary.

``gradguard report RUN [RUN ...] -o report.html`` and ``gradguard inspect RUN`` are thin wrappers
over :func:`make_report`, :func:`write_figures` and :func:`inspect_run`.
"""

from __future__ import annotations

from pathlib import Path

from .data import RunData, RunError, open_run
from .html import render_html, write_html

__all__ = ["RunData", "RunError", "make_report", "open_run", "render_html", "write_html"]


def make_report(paths: list[str | Path], out: str | Path, **kw: object) -> tuple[Path, list[str]]:
    """Write the HTML report for the runs at ``paths`` to ``out``.

    Runs that cannot be read are listed in the page (and returned as messages) instead of
    stopping the report; raises :class:`RunError` only when no run at all can be read.
    """
    runs, failed = [], []
    for p in paths:
        try:
            runs.append(open_run(p))
        except RunError as exc:
            failed.append(str(exc))
    if not runs:
        raise RunError("; ".join(failed) if failed else "no run given")
    return write_html(runs, out, failed, **kw), failed
