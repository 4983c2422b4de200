"""Finding run folders: ``gradguard report runs`` on a folder of runs reports every run below it.

What counts as a run folder, and the search below a folder that is not one, are the run
store's (:func:`gradguard.store.is_run`, :func:`gradguard.store.find_runs`): one rule for the
reader and the report. This module adds what the command line needs on top: a path that holds
no run at all is kept as given, so that reading it gives the reader's own error ("no run
data", "no such run folder"), and several paths are expanded in order, each run once.
"""

from __future__ import annotations

from pathlib import Path

#: Folder levels searched below a given path that is not itself a run (the demo's
#: ``runs/<experiment>/<strategy>`` is two).
MAX_DEPTH = 4


def is_run_folder(folder: str | Path) -> bool:
    """Whether ``folder`` directly holds a run's files (meta.json, shards, events)."""
    from ..store import is_run

    return is_run(folder)


def find_runs(path: str | Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """The run folders at or below ``path`` (``[path]`` itself when it is a run, or when it
    holds none, so that reading it gives the reader's own error)."""
    from ..store import find_runs as store_find_runs

    root = Path(path)
    if not root.is_dir():
        return [root]
    return store_find_runs(root, max_depth) or [root]


def expand(paths: list[str | Path]) -> list[Path]:
    """Every run found below each of ``paths``, in order, each once."""
    out: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        for run in find_runs(p):
            key = run.resolve()
            if key not in seen:
                seen.add(key)
                out.append(run)
    return out
