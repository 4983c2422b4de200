"""The Monitor's side of the run-folder policy (the policy itself: ``gradguard.store.writer``).

``Monitor(run_dir, mode=...)``:

* ``"new"`` (default): a fresh run. A folder that already holds a run is never mixed into:
  the run goes to the first free versioned sibling (``runs/x-2``, ``runs/x-3``, ...), and the
  Monitor warns, naming it; ``monitor.run_dir`` is the folder written;
* ``"resume"``: continue the run in the folder;
* ``"overwrite"``: replace the run in the folder (only run-store files are removed).

The folder is claimed at the first write, not when the Monitor is built, so that
``monitor.load_state_dict(checkpoint)`` (directly or through ``guard.load_state_dict``)
before training turns the run into a resume of the folder asked for, from the checkpoint's
step: rows and events of later steps written by the abandoned continuation are superseded
(``load_run`` returns each step once), not duplicated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODES = ("new", "resume", "overwrite")


def lazy_writer(path: Path, rank: int, mode: str) -> Any:
    """A ``gradguard.store.RunWriter`` for ``path`` that claims its folder at the first write."""
    from ..store import RunWriter

    return RunWriter(path, rank, mode=mode, lazy=True)


def moved_message(asked: Path, used: Path) -> str:
    return (f"gradguard monitor: {asked} already holds a run; this run is written to {used} "
            "(Monitor(mode='resume') continues the old one, mode='overwrite' replaces it)")
