"""Opening the run store's writer for a Monitor, with the run-folder policy.

``mode`` (``Monitor(mode=...)``):

* ``"new"`` (default): a fresh run. A folder that already holds a run is not mixed into:
  the writer picks a fresh versioned folder next to it and the Monitor warns, naming it;
* ``"resume"``: continue the run in the folder; after ``resume_from(step)`` rows of later
  steps are superseded by the new ones (a checkpoint older than the last flush);
* ``"overwrite"``: replace the run in the folder.

The policy itself belongs to the run store (``gradguard.store``); this module only calls it,
and falls back to the plain append-only writer of ``monitor.store`` where that is all there is.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from .notices import Notices

MODES = ("new", "resume", "overwrite")


def open_writer(path: Path, rank: int, mode: str, resume_step: int | None,
                notices: Notices) -> Any:
    """The writer of ``path`` for ``rank`` under ``mode``; its ``.path`` is the folder used."""
    writer_cls = _store_writer()
    if writer_cls is None:
        from .store import RunWriter
        writer = RunWriter(path, rank)
    else:
        kw: dict[str, Any] = {}
        params = inspect.signature(writer_cls).parameters
        if "mode" in params:
            kw["mode"] = mode
        writer = writer_cls(path, rank=rank, **kw)
    actual = Path(getattr(writer, "path", path))
    if actual != Path(path):
        notices.note(f"gradguard monitor: {path} already holds a run; this run is written to "
                     f"{actual} (mode='resume' continues the old one, mode='overwrite' replaces "
                     "it)", write=False)
    if resume_step is not None and hasattr(writer, "resume_from"):
        writer.resume_from(int(resume_step))
    return writer


def _store_writer() -> Any:
    try:
        from ..store import RunWriter  # type: ignore[attr-defined]
    except ImportError:
        return None
    return RunWriter
