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
#: The layer columns the report draws; the fast reader leaves grad_max_abs and param_norm on disk.
REPORT_LAYER_COLUMNS: dict[str, str] = {
    k: v for k, v in LAYER_COLUMNS.items() if k not in ("grad_max_abs", "param_norm")
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


def _empty(columns: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=t) for c, t in columns.items()})


def _conform(df: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Give a table every schema column with the schema dtype (absent columns become NaN/False).

    Columns that already have the right dtype are kept as they are (no copy); the layer column
    becomes a pandas category.
    """
    n = len(df)
    out = df[[c for c in columns if c in df.columns]]
    for col, dtype in columns.items():
        if col in df.columns:
            s = df[col]
            if dtype == "object":
                if not isinstance(s.dtype, pd.CategoricalDtype):
                    out = out.assign(**{col: s.astype(str).astype("category")})
            elif dtype == "bool":
                if s.dtype != np.bool_:
                    out = out.assign(**{col: s.fillna(False).to_numpy(dtype=bool)})
            elif s.dtype != np.dtype(dtype):
                vals = pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64)
                if dtype.startswith("int"):
                    vals = np.where(np.isfinite(vals), vals, 0).astype(dtype)
                out = out.assign(**{col: vals})
        elif dtype == "bool":
            out = out.assign(**{col: np.zeros(n, dtype=bool)})
        elif dtype.startswith("int"):
            out = out.assign(**{col: np.zeros(n, dtype=dtype)})
        elif dtype == "object":
            out = out.assign(**{col: pd.Categorical([""] * n)})
        else:
            out = out.assign(**{col: np.full(n, np.nan)})
    return out[list(columns)].reset_index(drop=True)


def _shard_files(folder: Path, kind: str) -> list[Path]:
    found = [(p, _SHARD.match(p.name)) for p in folder.iterdir()]
    files = [(int(m.group(2)), int(m.group(3)), p) for p, m in found if m and m.group(1) == kind]
    return [p for _r, _q, p in sorted(files)]


def _read_shards(folder: Path, kind: str, columns: dict[str, str], notes: list[str]) -> pd.DataFrame:
    """All readable shards of one kind, the layer column dictionary-encoded (a pandas category)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for f in _shard_files(folder, kind):
        try:
            names = pq.read_schema(f).names
            keep = [c for c in columns if c in names]
            t = pq.read_table(f, columns=keep, read_dictionary=["layer"] if "layer" in keep else None)
            if "layer" in keep and not pa.types.is_dictionary(t.schema.field("layer").type):
                i = keep.index("layer")
                t = t.set_column(i, "layer", t.column("layer").cast(pa.string()).dictionary_encode())
            tables.append(t)
        except Exception as exc:
            note = f"{f.name}: unreadable shard skipped (half-written or damaged: {exc})"
            if not any(n.startswith(f"{f.name}:") for n in notes):
                notes.append(note)
    if not tables:
        return _empty(columns)
    try:
        table = pa.concat_tables(tables, promote_options="permissive").unify_dictionaries()
        df = table.to_pandas(split_blocks=True, self_destruct=True)
    except Exception:
        df = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    return _conform(df, columns)


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
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue  # diagnose() reports it
        if isinstance(ev, dict):
            events.append(ev)
    return events


@dataclass
class Diagnosis:
    """What a look at a run folder found: plain-language notes, the parsed meta (None when
    missing or unreadable) and the number of per-layer rows the readable shards hold."""

    notes: list[str]
    meta: dict[str, Any] | None
    layer_rows: int


def diagnose(folder: Path) -> Diagnosis:
    """Check a run folder without reading its data: meta.json, shard footers, events lines."""
    import pyarrow.parquet as pq

    notes: list[str] = []
    meta: dict[str, Any] | None = None
    path = folder / "meta.json"
    if not path.exists():
        notes.append("meta.json missing: layer order and configuration are unknown")
    else:
        try:
            loaded = json.loads(path.read_text(encoding="utf-8", errors="replace"))
            if isinstance(loaded, dict):
                meta = loaded
            else:
                notes.append("meta.json does not hold a JSON object; ignored")
        except (OSError, json.JSONDecodeError) as exc:
            notes.append(f"meta.json unreadable ({exc}); run shown without it")
    layer_rows = 0
    for kind in ("steps", "layers"):
        for f in _shard_files(folder, kind):
            try:
                rows = pq.read_metadata(f).num_rows
            except Exception as exc:
                notes.append(f"{f.name}: unreadable shard skipped (half-written or damaged: {exc})")
                continue
            if kind == "layers":
                layer_rows += rows
    temps = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    if temps:
        notes.append(f"{len(temps)} file(s) still being written, ignored: {', '.join(sorted(temps)[:3])}")
    ev = folder / "events.jsonl"
    if ev.exists():
        bad = []
        try:
            with open(ev, encoding="utf-8", errors="replace") as fh:
                for i, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            json.loads(line)
                        except json.JSONDecodeError:
                            bad.append(i)
        except OSError as exc:
            notes.append(f"events.jsonl unreadable: {exc}")
        if bad:
            notes.append(f"events.jsonl line(s) {', '.join(map(str, bad[:5]))} not valid JSON (half-written?); skipped")
    return Diagnosis(notes=notes, meta=meta, layer_rows=layer_rows)


def _file_window_reader(folder: Path) -> Callable[[dict[str, Any]], pd.DataFrame | None]:
    def read(event: dict[str, Any]) -> pd.DataFrame | None:
        name = Path(str(event.get("window"))).name  # never leave the run folder
        path = folder / name
        if not path.exists():
            return None
        import pyarrow.parquet as pq

        return _conform(pq.read_table(path).to_pandas(), WINDOW_COLUMNS)

    return read


def read_run_folder(
    folder: Path, diagnosis: Diagnosis | None = None, layer_columns: dict[str, str] = LAYER_COLUMNS
) -> RunData:
    """Read a run folder directly: tolerant of damaged shards and cut event lines, and fast on
    large runs (columns read as stored, the layer column dictionary-encoded, no sorting of strings).

    ``layer_columns`` picks the per-layer columns read (the report passes REPORT_LAYER_COLUMNS).
    """
    diag = diagnosis or diagnose(folder)
    notes = list(diag.notes)
    meta = diag.meta or {}
    steps = _read_shards(folder, "steps", STEP_COLUMNS, notes)
    layers = _read_shards(folder, "layers", layer_columns, notes)
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


def _from_load_run(run: Any, folder: Path, diag: Diagnosis) -> RunData:
    # load_run fills in a default meta for a missing meta.json; the diagnosis already says so
    meta = dict(getattr(run, "meta", None) or {}) if diag.meta is not None else {}
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

    notes = list(diag.notes) + [str(n) for n in getattr(run, "notes", None) or []]
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


#: Above this many per-layer rows the report reads the shards itself (dictionary-encoded, unsorted):
#: ``load_run`` materialises and sorts every layer name, about 10 s for 5e6 rows on 2 cores.
FAST_READ_ROWS = 1_000_000


def open_run(path: str | Path, *, use_load_run: bool = True, fast_read_rows: int = FAST_READ_ROWS) -> RunData:
    """Open one run folder for reporting.

    Uses ``gradguard.load_run`` (the run store's reader) when it exists and the run has at most
    ``fast_read_rows`` per-layer rows, else reads the shards directly (same schema, same result).
    Damaged shards, cut event lines and a missing ``meta.json`` become :attr:`RunData.notes`.
    Raises :class:`RunError` with a plain message when the folder is missing, not a folder, or
    holds no run data at all.
    """
    folder = Path(path)
    if not folder.exists():
        raise RunError(f"{folder}: no such run folder")
    if not folder.is_dir():
        raise RunError(f"{folder}: not a folder (a run is a folder with meta.json and shards)")
    try:
        diag = diagnose(folder)
    except OSError as exc:
        raise RunError(f"{folder}: cannot be read ({exc})") from None
    data: RunData | None = None
    if use_load_run and diag.layer_rows <= fast_read_rows:
        try:
            from gradguard import load_run  # type: ignore[attr-defined]
        except ImportError:
            load_run = None
        if load_run is not None:
            try:
                data = _from_load_run(load_run(folder), folder, diag)
            except Exception as exc:
                diag.notes.insert(0, f"load_run failed ({type(exc).__name__}: {exc}); read file by file")
    if data is None:
        data = read_run_folder(folder, diag, REPORT_LAYER_COLUMNS)
    if diag.meta is None and not len(data.steps) and not len(data.layers) and not data.events:
        detail = "; ".join(n for n in data.notes if not n.startswith("meta.json missing"))
        raise RunError(
            f"{folder}: no run data (no meta.json, no readable steps-*.parquet or layers-*.parquet "
            "shards, no events.jsonl)" + (f"; {detail}" if detail else "")
        )
    if not len(data.steps):
        data.notes.append("no step records yet (training just started, or steps shards missing)")
    if not len(data.layers):
        data.notes.append("no per-layer records (layers shards missing or not written yet)")
    data.steps = data.steps.sort_values(["rank", "step"], kind="stable").reset_index(drop=True)
    return data
