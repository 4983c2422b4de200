"""Finding run folders: ``gradguard report runs`` on a folder of runs reports every run below it.

A folder is a run when it holds ``meta.json``, ``events.jsonl`` or a Parquet shard directly;
its subfolders are not searched (a run folder holds no runs). Any other folder is searched
down to ``max_depth`` levels, in sorted order, so the demo's ``runs/<experiment>/<strategy>``
layout is found from ``runs``.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Folder levels searched below a given path that is not itself a run.
MAX_DEPTH = 4


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` directly holds a run's files (meta.json, events.jsonl or shards)."""
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name in ("meta.json", "events.jsonl") or (
                    e.name.endswith(".parquet") and e.is_file()
                ):
                    return True
    except OSError:
        return False
    return False


def find_runs(path: str | Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """The run folders at or below ``path`` (``[path]`` itself when it is a run, or when it is
    not a folder at all, so that reading it gives the reader's own error)."""
    root = Path(path)
    if not root.is_dir() or is_run_folder(root):
        return [root]
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        try:
            subs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return
        for sub in subs:
            if is_run_folder(sub):
                found.append(sub)
            elif depth < max_depth:
                walk(sub, depth + 1)

    walk(root, 1)
    return found or [root]


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
