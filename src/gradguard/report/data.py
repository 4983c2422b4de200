"""Reading runs for the report: a thin adapter over the run store's reader.

The format (columns, file names, shards, resume marks, compaction) and the tolerant reading
belong to :mod:`gradguard.store`; this module turns what it reads into a :class:`RunData`
(frames with float64 statistics, events as dicts, notes in plain words) and never shows a
traceback for a run folder that is empty, half-written (training is still going) or missing a
file: what the store's reader skipped or repaired becomes :attr:`RunData.notes`, and a folder
that holds nothing usable raises :class:`RunError`, whose message is meant for the person at
the terminal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..store import schema as _schema


def _dtype(t: Any) -> str:
    import pyarrow as pa

    if pa.types.is_dictionary(t) or pa.types.is_string(t):
        return "category"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_list(t):
        return "object"  # ``lrs``: None or a list of floats per step
    if pa.types.is_floating(t):
        return "float64"  # the report computes in float64 (statistics are float32 on disk)
    return str(t)  # int64, int32


#: The report's column dtypes, taken from the run-store schema.
STEP_DTYPES: dict[str, str] = {f.name: _dtype(f.type) for f in _schema.STEPS_SCHEMA}
LAYER_DTYPES: dict[str, str] = {f.name: _dtype(f.type) for f in _schema.LAYERS_SCHEMA}
WINDOW_DTYPES: dict[str, str] = {f.name: _dtype(f.type) for f in _schema.WINDOW_SCHEMA}
#: The layer columns the report draws; grad_max_abs and param_norm stay on disk.
REPORT_LAYER_COLUMNS: tuple[str, ...] = tuple(
    c for c in _schema.LAYER_COLUMNS if c not in ("grad_max_abs", "param_norm"))


class RunError(Exception):
    """A run folder that cannot be reported on at all; the message says why, in plain words."""


@dataclass
class RunData:
    """One run as the report sees it: the run store's tables plus notes about what was missing."""

    name: str
    path: Path
    meta: dict[str, Any]
    steps: pd.DataFrame
    layers: pd.DataFrame
    events: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    window_reader: Callable[[dict[str, Any]], pd.DataFrame | None] | None = None

    @property
    def layer_names(self) -> list[str]:
        """Layer names in the order of ``meta.json``, then any others seen in the layer shards."""
        names = [str(n) for n in self.meta.get("layers") or []]
        seen = set(names)
        if len(self.layers):
            col = self.layers["layer"]
            seen_names = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else pd.unique(col.astype(str))
            for n in map(str, seen_names):
                if n not in seen:
                    names.append(n)
                    seen.add(n)
        return names

    def window(self, event: dict[str, Any]) -> pd.DataFrame | None:
        """The flight-recorder window (step, layer, grad_norm) of an event, or None if absent."""
        if self.window_reader is None or not event.get("window"):
            return None
        try:
            return self.window_reader(event)
        except Exception as exc:  # a broken dump must not take the report down
            self.notes.append(f"flight-recorder window {event.get('window')!s} unreadable: {exc}")
            return None


def _conform(df: pd.DataFrame, dtypes: dict[str, str]) -> pd.DataFrame:
    """The frame with the columns of ``dtypes`` it has, in that order, with the report's dtypes
    (columns that already have them are not copied; strings become a category)."""
    out = df[[c for c in dtypes if c in df.columns]]
    for col in out.columns:
        s, want = out[col], dtypes[col]
        if want == "category":
            if not isinstance(s.dtype, pd.CategoricalDtype):
                out = out.assign(**{col: s.astype(str).astype("category")})
        elif want == "object":
            continue
        elif s.dtype != np.dtype(want):
            vals = s.to_numpy()
            if want == "bool":
                vals = pd.Series(vals).fillna(False).to_numpy(dtype=bool)
            else:
                vals = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64)
                if want.startswith("int"):
                    vals = np.where(np.isfinite(vals), vals, 0).astype(want)
            out = out.assign(**{col: vals})
    return out.reset_index(drop=True)


def _file_window_reader(folder: Path) -> Callable[[dict[str, Any]], pd.DataFrame | None]:
    def read(event: dict[str, Any]) -> pd.DataFrame | None:
        name = Path(str(event.get("window"))).name  # never leave the run folder
        path = folder / name
        if not path.exists():
            return None
        import pyarrow.parquet as pq

        return _conform(pq.read_table(path).to_pandas(), WINDOW_DTYPES)

    return read


def _temp_note(folder: Path) -> list[str]:
    temps = sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))
    if not temps:
        return []
    return [f"{len(temps)} file(s) still being written, ignored: {', '.join(temps[:3])}"]


#: Kept for callers of earlier versions: every run is now read by the run store's reader.
FAST_READ_ROWS = 1_000_000


def open_run(path: str | Path, *, use_load_run: bool = True, fast_read_rows: int = FAST_READ_ROWS) -> RunData:
    """Open one run folder for reporting (all ranks merged, each step once).

    The run store's reader (:func:`gradguard.store.read_run`) reads it; the per-layer columns
    the report does not draw are left on disk. ``use_load_run`` and ``fast_read_rows`` are
    accepted for earlier callers and change nothing. Damaged shards, cut event lines and a
    missing or broken ``meta.json`` become :attr:`RunData.notes`. Raises :class:`RunError`
    with a plain message when the folder is missing, not a folder, or holds no run data.
    """
    del use_load_run, fast_read_rows
    from ..store import RunNotFoundError, read_run

    folder = Path(path)
    if not folder.exists():
        raise RunError(f"{folder}: no such run folder")
    if not folder.is_dir():
        raise RunError(f"{folder}: not a folder (a run is a folder with meta.json and shards)")
    try:
        t = read_run(folder, layer_columns=REPORT_LAYER_COLUMNS)
    except RunNotFoundError as exc:
        raise RunError(f"{folder}: no run data (no meta.json, no readable steps-*.parquet or "
                       f"layers-*.parquet shards, no events) [{exc}]") from None
    except OSError as exc:
        raise RunError(f"{folder}: cannot be read ({exc})") from None
    notes = list(t.notes) + _temp_note(folder)
    steps = _conform(t.steps, STEP_DTYPES)
    layers = _conform(t.layers, LAYER_DTYPES)
    if not t.meta_ok and not len(steps) and not len(layers) and not t.events:
        detail = "; ".join(n for n in notes if not n.startswith("meta.json missing"))
        raise RunError(
            f"{folder}: no run data (no meta.json, no readable steps-*.parquet or layers-*.parquet "
            "shards, no events)" + (f"; {detail}" if detail else "")
        )
    if not len(steps):
        notes.append("no step records yet (training just started, or steps shards missing)")
    if not len(layers):
        notes.append("no per-layer records (layers shards missing or not written yet)")
    meta = t.meta if t.meta_ok else {}
    steps = steps.sort_values(["rank", "step"], kind="stable").reset_index(drop=True)
    return RunData(name=str(meta.get("name") or folder.name), path=folder, meta=meta,
                   steps=steps, layers=layers, events=t.events, notes=notes,
                   window_reader=_file_window_reader(folder))
