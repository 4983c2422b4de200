"""The run store: one folder per run, append-only, per-rank files, readable while written.

Layout::

    RUN/meta.json                           name, layers, parameters, config, versions, started,
                                            notes, ranks
    RUN/steps-r{rank}-{seq:06d}.parquet     one row per step (STEPS_SCHEMA)
    RUN/layers-r{rank}-{seq:06d}.parquet    one row per (layer step, layer) (LAYERS_SCHEMA)
    RUN/events.jsonl                        one JSON object per line (EVENT_FIELDS)
    RUN/window-r{rank}-step{step:08d}.parquet  flight-recorder dump (WINDOW_SCHEMA)

Each Parquet shard is written complete under a hidden temporary name (``.NAME.tmp``) and
renamed (``os.replace``, atomic on POSIX), so a reader never sees half a shard and a run
killed with SIGKILL keeps every shard it finished: it loses at most one flush interval.
``events.jsonl`` is appended one flush at a time with ``O_APPEND``; a line cut short by a
kill is skipped by the reader. Sequence numbers continue after the highest existing shard of
the rank, so a resumed run appends to the same folder.

Layers are module paths (see ``gradguard.monitor.layers``); ``meta["parameters"]`` keeps the
parameter-level names and the layer each belongs to.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

STEPS_SCHEMA = pa.schema([
    ("step", pa.int64()), ("time", pa.float64()), ("loss", pa.float64()), ("lr", pa.float64()),
    ("total_norm", pa.float64()), ("total_norm_after", pa.float64()),
    ("clip_coef", pa.float64()), ("threshold", pa.float64()), ("clipped", pa.bool_()),
    ("skipped", pa.bool_()), ("nonfinite", pa.bool_()), ("loss_scale", pa.float64()),
    ("rank", pa.int32()),
])
#: ``layer`` is dictionary-encoded (int32 codes into the layer names; read back as a pandas
#: categorical); the statistics are float32, as computed on the device.
LAYER_TYPE = pa.dictionary(pa.int32(), pa.string())
LAYERS_SCHEMA = pa.schema([
    ("step", pa.int64()), ("layer", LAYER_TYPE), ("grad_norm", pa.float32()),
    ("grad_max_abs", pa.float32()), ("nonfinite_count", pa.int64()),
    ("param_norm", pa.float32()), ("update_ratio", pa.float32()), ("rank", pa.int32()),
])
WINDOW_SCHEMA = pa.schema([("step", pa.int64()), ("layer", pa.string()), ("grad_norm", pa.float64())])
EVENT_FIELDS = ("step", "rule", "value", "baseline", "action", "top_layers",
                "first_nonfinite_layer", "window", "message", "time", "rank")

_SHARD = re.compile(r"^(steps|layers)-r(\d+)-(\d{6})\.parquet$")


class StoreError(OSError):
    """Writing the run store failed (disk full, read-only folder, ...)."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class RunWriter:
    """Writes one rank's shards, its events and (rank 0) ``meta.json``.

    Every method raises ``OSError`` on failure; the Monitor catches it, warns once and
    notes it in the meta (principle 4).
    """

    def __init__(self, path: str | os.PathLike, rank: int = 0):
        self.path = Path(path)
        self.rank = int(rank)
        self.path.mkdir(parents=True, exist_ok=True)
        self.seq = self._next_seq()

    def _next_seq(self) -> int:
        seq = -1
        for p in self.path.iterdir():
            m = _SHARD.match(p.name)
            if m and int(m.group(2)) == self.rank:
                seq = max(seq, int(m.group(3)))
        return seq + 1

    def write_meta(self, meta: dict[str, Any]) -> None:
        _atomic_write_bytes(self.path / "meta.json", json.dumps(meta, indent=1, default=str).encode())

    def write_shard(self, kind: str, table: pa.Table) -> Path:
        """Write ``table`` as the next ``{kind}`` shard of this rank; returns its path."""
        name = f"{kind}-r{self.rank}-{self.seq:06d}.parquet"
        final = self.path / name
        tmp = self.path / f".{name}.tmp"
        try:
            pq.write_table(table, tmp, **_write_options(table.schema))
            os.replace(tmp, final)
        except BaseException:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        return final

    def next_seq(self) -> None:
        self.seq += 1

    def write_window(self, step: int, table: pa.Table) -> str:
        name = f"window-r{self.rank}-step{int(step):08d}.parquet"
        tmp = self.path / f".{name}.tmp"
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, self.path / name)
        return name

    def append_events(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        data = "".join(json.dumps(_jsonable(e), allow_nan=True) + "\n" for e in events).encode()
        fd = os.open(self.path / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            n = os.write(fd, data)
            if n != len(data):
                raise OSError(errno.ENOSPC, "short write to events.jsonl")
        finally:
            os.close(fd)


def _write_options(schema: pa.Schema) -> dict[str, Any]:
    """zstd; dictionary encoding for the integer, boolean and layer columns (steps repeat per
    layer, layers per step), byte-stream-split for the floats (a dictionary of floats costs
    time and saves nothing; split bytes compress well when values change slowly);
    statistics (for row-group pruning) on ``step`` and ``rank`` only."""
    floats = [f.name for f in schema if pa.types.is_floating(f.type)]
    return {"compression": "zstd",
            "use_dictionary": [f.name for f in schema if f.name not in floats],
            "use_byte_stream_split": floats or False,
            "write_statistics": [c for c in ("step", "rank") if c in schema.names]}


def layer_column(names: list[str], n_steps: int) -> pa.DictionaryArray:
    """The ``layer`` column of ``n_steps`` layer steps of all ``names`` (codes, not strings)."""
    codes = np.tile(np.arange(len(names), dtype=np.int32), n_steps)
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32()), pa.array(list(names), pa.string()))


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            return x.item()  # numpy scalars
        except (ValueError, AttributeError):
            return str(x)
    return x


# -- reading ---------------------------------------------------------------------------------
def _empty(schema: pa.Schema):
    return schema.empty_table().to_pandas()


def _shard_files(path: Path, kind: str) -> list[Path]:
    """The finished shards of ``kind``, by rank then sequence number (numerically)."""
    found = []
    for p in path.glob(f"{kind}-r*-*.parquet"):
        m = _SHARD.match(p.name)
        if m:
            found.append((int(m.group(2)), int(m.group(3)), p))
    return [p for _r, _s, p in sorted(found)]


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns, in its order: shards of older versions (layer as
    plain strings) are converted, a missing column is filled with nulls. Floating columns keep
    their stored precision (older shards hold float64 statistics: never rounded on reading)."""
    if table.schema.equals(schema):
        return table
    cols, fields = [], []
    for f in schema:
        if f.name not in table.column_names:
            c = pa.nulls(table.num_rows, f.type)
        else:
            c = table.column(f.name)
            if c.type == f.type or (pa.types.is_floating(f.type) and pa.types.is_floating(c.type)):
                pass
            elif pa.types.is_dictionary(f.type):
                c = c.cast(pa.string()).dictionary_encode()
                c = c.cast(f.type) if c.type != f.type else c
            else:
                c = c.cast(f.type, safe=False)
        cols.append(c)
        fields.append(pa.field(f.name, c.type))
    return pa.table(cols, schema=pa.schema(fields))


def _ordered(df, keys: list[str]) -> bool:
    """True when the rows are already sorted by ``keys`` (one vectorised pass per key)."""
    n = len(df)
    if n < 2:
        return True
    tied = np.ones(n - 1, dtype=bool)  # consecutive rows equal on the keys so far
    for k in keys:
        d = np.diff(_sort_key(df, k))
        if np.any(tied & (d < 0)):
            return False
        tied &= d == 0
        if not tied.any():
            break
    return True


def _sort_key(df, k: str) -> np.ndarray:
    col = df[k]
    return col.cat.codes.to_numpy() if k == "layer" else col.to_numpy()


def _read_shards(path: Path, kind: str, schema: pa.Schema):
    """All readable shards of ``kind`` in one frame, sorted by step, rank (and, for layers,
    the layer's position in ``meta["layers"]``). Rows of one rank written in order need no
    sort: that is checked, and only out-of-order frames (several ranks, a resumed run) are
    sorted (stable, on integer keys)."""
    tables = []
    for f in _shard_files(path, kind):
        try:
            tables.append(_conform(pq.read_table(f), schema))
        except (OSError, pa.ArrowException):
            continue  # a shard damaged outside gradguard: skip it, keep the rest
    if not tables:
        return _empty(schema)
    table = pa.concat_tables(tables, promote_options="permissive")  # float32 + float64 -> float64
    if kind == "layers":
        table = table.unify_dictionaries()
    del tables
    df = table.to_pandas(split_blocks=True, self_destruct=True)
    del table
    keys = ["step", "rank"] + (["layer"] if kind == "layers" else [])
    if not _ordered(df, keys):
        df = df.take(np.lexsort([_sort_key(df, k) for k in reversed(keys)]))
    return df.reset_index(drop=True)


def _read_events(path: Path):
    import pandas as pd

    rows = []
    f = path / "events.jsonl"
    if f.exists():
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if isinstance(e, dict):
                    rows.append({k: e.get(k) for k in EVENT_FIELDS})
    df = pd.DataFrame(rows, columns=list(EVENT_FIELDS))
    if len(df):
        df["step"] = df["step"].astype("int64")
        for c in ("value", "baseline", "time"):
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
        df = df.sort_values("step", kind="stable").reset_index(drop=True)
    else:
        df = df.astype({"step": "int64", "value": "float64", "baseline": "float64", "time": "float64"})
    return df


@dataclass
class Run:
    """A run read back from its folder; DataFrames sorted by step, then rank.

    ``steps``: STEPS_SCHEMA columns; ``layers``: LAYERS_SCHEMA columns (``layer`` a pandas
    categorical of ``meta["layers"]``, layers of a step in that order; float32 statistics, or
    float64 where older shards stored them); ``events``: one row
    per event (EVENT_FIELDS); ``meta``: the parsed ``meta.json`` (``{}``-like defaults when
    missing); ``window(step)``: the flight-recorder dump written for that step's event.
    """

    path: Path
    meta: dict[str, Any]
    steps: Any
    layers: Any
    events: Any
    _windows: dict[int, list[Path]] = field(default_factory=dict, repr=False)

    def window(self, step: int, rank: int | None = None):
        """The flight-recorder dump (columns step, layer, grad_norm) of ``step``'s event."""
        files = [p for p in self.path.glob(f"window-r*-step{int(step):08d}.parquet")
                 if rank is None or p.name.startswith(f"window-r{int(rank)}-")]
        if not files:
            raise KeyError(f"no flight-recorder window for step {step} in {self.path}")
        df = pa.concat_tables([pq.read_table(f, schema=WINDOW_SCHEMA) for f in sorted(files)]).to_pandas()
        return df.sort_values(["step", "layer"], kind="stable").reset_index(drop=True)

    def windows(self) -> list[int]:
        """Steps that have a flight-recorder dump."""
        out = set()
        for p in self.path.glob("window-r*-step*.parquet"):
            m = re.search(r"step(\d+)\.parquet$", p.name)
            if m:
                out.add(int(m.group(1)))
        return sorted(out)

    def __repr__(self) -> str:
        return (f"Run({str(self.path)!r}, steps={len(self.steps)}, layers={len(self.layers)}, "
                f"events={len(self.events)})")


def load_run(path: str | os.PathLike) -> Run:
    """Read a run folder written by :class:`~gradguard.Monitor` (also while it is written).

    Missing pieces give empty frames with the right columns; a torn last line of
    ``events.jsonl`` is skipped.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no run folder at {p}")
    meta: dict[str, Any] = {}
    try:
        meta = json.loads((p / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        meta = {"name": p.name, "layers": [], "config": {}, "versions": {}, "started": None,
                "notes": ["meta.json missing or unreadable"], "ranks": []}
    return Run(path=p, meta=meta, steps=_read_shards(p, "steps", STEPS_SCHEMA),
               layers=_read_shards(p, "layers", LAYERS_SCHEMA), events=_read_events(p))


def nan_or(x: Any) -> float:
    """``float(x)``, NaN for None."""
    return math.nan if x is None else float(x)
