"""Reading runs for the report: a thin adapter over ``gradguard.load_run`` with a tolerant fallback.

The report must never show a traceback for a run folder that is empty, half-written (training is
still going) or missing a file. :func:`open_run` therefore tries the run store's own reader
(``gradguard.load_run``) first and, when it is missing or fails, reads the folder itself, shard by
shard, skipping what cannot be read and writing down why in :attr:`RunData.notes`. A folder that
holds nothing usable raises :class:`RunError`, whose message is meant for the person at the
terminal.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

STEP_COLUMNS: dict[str, str] = {
    "step": "int64",
    "time": "float64",
    "loss": "float64",
    "lr": "float64",
    "total_norm": "float64",
    "total_norm_after": "float64",
    "clip_coef": "float64",
    "threshold": "float64",
    "clipped": "bool",
    "skipped": "bool",
    "nonfinite": "bool",
    "loss_scale": "float64",
    "rank": "int32",
}
LAYER_COLUMNS: dict[str, str] = {
    "step": "int64",
    "layer": "object",
    "grad_norm": "float64",
    "grad_max_abs": "float64",
    "nonfinite_count": "int64",
    "param_norm": "float64",
    "update_ratio": "float64",
    "rank": "int32",
}
WINDOW_COLUMNS: dict[str, str] = {"step": "int64", "layer": "object", "grad_norm": "float64"}

_SHARD = re.compile(r"^(steps|layers)-r(\d+)-(\d+)\.parquet$")


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
            for n in pd.unique(self.layers["layer"].astype(str)):
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


def _empty(columns: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=t) for c, t in columns.items()})


def _conform(df: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Give a table every schema column with the schema dtype (absent columns become NaN/False)."""
    out = {}
    n = len(df)
    for col, dtype in columns.items():
        if col in df.columns:
            s = df[col]
            if dtype == "object":
                out[col] = s.astype(str).to_numpy(dtype=object)
            elif dtype == "bool":
                out[col] = s.fillna(False).to_numpy(dtype=bool)
            else:
                out[col] = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64)
                if dtype.startswith("int"):
                    vals = out[col]
                    out[col] = np.where(np.isfinite(vals), vals, 0).astype(dtype)
        elif dtype == "bool":
            out[col] = np.zeros(n, dtype=bool)
        elif dtype.startswith("int"):
            out[col] = np.zeros(n, dtype=dtype)
        elif dtype == "object":
            out[col] = np.full(n, "", dtype=object)
        else:
            out[col] = np.full(n, np.nan)
    return pd.DataFrame(out)


def _read_shards(
    folder: Path, kind: str, columns: dict[str, str], notes: list[str]
) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(
        (p for p in folder.iterdir() if (m := _SHARD.match(p.name)) and m.group(1) == kind),
        key=lambda p: (int(_SHARD.match(p.name).group(2)), int(_SHARD.match(p.name).group(3))),
    )
    tables = []
    for f in files:
        try:
            t = pq.read_table(f)
            keep = [c for c in columns if c in t.column_names]
            t = t.select(keep)
            if "layer" in keep:
                t = t.set_column(keep.index("layer"), "layer", t.column("layer").cast(pa.string()))
            tables.append(t)
        except Exception as exc:
            notes.append(f"{f.name}: unreadable shard skipped (half-written or damaged: {exc})")
    if not tables:
        return _empty(columns)
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except Exception:
        return _conform(pd.concat([t.to_pandas() for t in tables], ignore_index=True), columns)
    return _conform(table.to_pandas(), columns)


def _read_events(folder: Path, notes: list[str]) -> list[dict[str, Any]]:
    path = folder / "events.jsonl"
    if not path.exists():
        return []
    events = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        notes.append(f"events.jsonl unreadable: {exc}")
        return []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            notes.append(f"events.jsonl line {i} is not valid JSON (half-written?); skipped")
            continue
        if isinstance(ev, dict):
            events.append(ev)
    return events


def _read_meta(folder: Path, notes: list[str]) -> dict[str, Any]:
    path = folder / "meta.json"
    if not path.exists():
        notes.append("meta.json missing: layer order and configuration are unknown")
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, json.JSONDecodeError) as exc:
        notes.append(f"meta.json unreadable ({exc}); run shown without it")
        return {}
    if not isinstance(meta, dict):
        notes.append("meta.json does not hold a JSON object; ignored")
        return {}
    return meta


def _file_window_reader(folder: Path) -> Callable[[dict[str, Any]], pd.DataFrame | None]:
    def read(event: dict[str, Any]) -> pd.DataFrame | None:
        name = Path(str(event.get("window"))).name  # never leave the run folder
        path = folder / name
        if not path.exists():
            return None
        import pyarrow.parquet as pq

        return _conform(pq.read_table(path).to_pandas(), WINDOW_COLUMNS)

    return read


def read_run_folder(folder: Path) -> RunData:
    """Read a run folder directly and tolerantly (the fallback when ``load_run`` fails)."""
    notes: list[str] = []
    meta = _read_meta(folder, notes)
    steps = _read_shards(folder, "steps", STEP_COLUMNS, notes)
    layers = _read_shards(folder, "layers", LAYER_COLUMNS, notes)
    events = _read_events(folder, notes)
    return RunData(
        name=str(meta.get("name") or folder.name),
        path=folder,
        meta=meta,
        steps=steps,
        layers=layers,
        events=events,
        notes=notes,
        window_reader=_file_window_reader(folder),
    )


def _events_from_frame(df: Any) -> list[dict[str, Any]]:
    if df is None:
        return []
    if isinstance(df, list):
        return [e for e in df if isinstance(e, dict)]
    records = df.to_dict(orient="records")
    out = []
    for r in records:
        clean = {}
        for k, v in r.items():
            if isinstance(v, float) and math.isnan(v) and k in ("window", "first_nonfinite_layer"):
                v = None
            elif isinstance(v, np.ndarray):
                v = v.tolist()
            clean[k] = v
        out.append(clean)
    return out


def _from_load_run(run: Any, folder: Path) -> RunData:
    meta = dict(getattr(run, "meta", None) or {})
    steps = getattr(run, "steps", None)
    layers = getattr(run, "layers", None)
    steps = (
        _empty(STEP_COLUMNS)
        if steps is None
        else _conform(steps.reset_index(drop=True), STEP_COLUMNS)
    )
    layers = (
        _empty(LAYER_COLUMNS)
        if layers is None
        else _conform(layers.reset_index(drop=True), LAYER_COLUMNS)
    )
    events = _events_from_frame(getattr(run, "events", None))
    file_reader = _file_window_reader(folder)

    def read(event: dict[str, Any]) -> pd.DataFrame | None:
        win = getattr(run, "window", None)
        if callable(win) and event.get("step") is not None:
            try:
                df = win(int(event["step"]))
                if df is not None and len(df):
                    return _conform(df.reset_index(drop=True), WINDOW_COLUMNS)
            except Exception:
                pass
        return file_reader(event)

    notes = [str(n) for n in getattr(run, "notes", None) or []]
    return RunData(
        name=str(meta.get("name") or folder.name),
        path=folder,
        meta=meta,
        steps=steps,
        layers=layers,
        events=events,
        notes=notes,
        window_reader=read,
    )


def open_run(path: str | Path, *, use_load_run: bool = True) -> RunData:
    """Open one run folder for reporting.

    Uses ``gradguard.load_run`` when it exists and succeeds, else the tolerant reader. Raises
    :class:`RunError` with a plain message when the folder is missing, not a folder, or holds no
    run data at all.
    """
    folder = Path(path)
    if not folder.exists():
        raise RunError(f"{folder}: no such run folder")
    if not folder.is_dir():
        raise RunError(f"{folder}: not a folder (a run is a folder with meta.json and shards)")
    data: RunData | None = None
    fallback_note = None
    if use_load_run:
        try:
            from gradguard import load_run  # type: ignore[attr-defined]
        except ImportError:
            load_run = None
        if load_run is not None:
            try:
                data = _from_load_run(load_run(folder), folder)
            except Exception as exc:
                fallback_note = f"load_run failed ({type(exc).__name__}: {exc}); read file by file"
    if data is None:
        data = read_run_folder(folder)
        if fallback_note:
            data.notes.insert(0, fallback_note)
    if not data.meta and not len(data.steps) and not len(data.layers) and not data.events:
        detail = "; ".join(
            data.notes[1:] if data.notes and "meta.json missing" in data.notes[0] else data.notes
        )
        raise RunError(
            f"{folder}: no run data (no meta.json, no readable steps-*.parquet or layers-*.parquet "
            f"shards, no events.jsonl)" + (f"; {detail}" if detail else "")
        )
    if not len(data.steps):
        data.notes.append("no step records yet (training just started, or steps shards missing)")
    if not len(data.layers):
        data.notes.append("no per-layer records (layers shards missing or not written yet)")
    data.steps = data.steps.sort_values(["rank", "step"], kind="stable").reset_index(drop=True)
    return data
