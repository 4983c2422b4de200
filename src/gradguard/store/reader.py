"""Reading a run folder: every finished shard, each step once, nothing dropped in silence.

Size: the tolerant reader is one job (every shard, each step once, each tolerance warned);
splitting the dedup/supersede logic from the shard reading would spread one rule over two
files.

The reader is tolerant and says what it tolerated: a damaged or foreign shard is skipped, a bad
``meta.json`` or events line is repaired or skipped, rows written twice are reduced to the
newest copy; each of these is a :class:`RunStoreWarning` from :func:`load_run` (and a line of
``Run.notes``). A path that is not a run folder raises :class:`RunNotFoundError`.

Superseding: a writer resumed from a checkpoint at step ``S`` writes a mark
(``resume-r{rank}.jsonl``: ``{"step": S, "seq": N, "events_bytes": B, ...}``). Rows of that
rank in shards numbered below ``N`` with a step after ``S``, and its events written before byte
``B`` with a step after ``S``, belong to the abandoned continuation and are not returned.
Compaction: a shard ``KIND-r{rank}-{lo}-{hi}.parquet`` holds the flushes ``lo..hi``; the
per-flush shards it contains (left behind by a compaction killed before it removed them) are
ignored.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import RunNotFoundError, RunStoreWarning
from .schema import (
    EVENT_FIELDS,
    EVENTS_RE,
    FILL,
    LEGACY_EVENTS,
    META,
    RESUME_RE,
    SCHEMAS,
    SHARD_RE,
    WINDOW_RE,
    WINDOW_SCHEMA,
    is_store_file,
    resume_name,
)


class ForeignShard(ValueError):
    """A file named like a shard whose columns are not a run-store shard's."""


@dataclass(frozen=True)
class Shard:
    kind: str
    rank: int
    lo: int
    hi: int
    path: Path


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _want(ranks: Iterable[int] | None, rank: int) -> bool:
    return ranks is None or rank in ranks


def shards(folder: Path, kind: str, ranks: Iterable[int] | None = None,
           names: list[str] | None = None) -> list[Shard]:
    """The shards of ``kind`` to read, by rank then flush number; a per-flush shard inside a
    compacted one's range (a compaction killed midway) is left out."""
    found = []
    for n in _names(folder) if names is None else names:
        m = SHARD_RE.match(n)
        if m and m.group(1) == kind and _want(ranks, int(m.group(2))):
            lo = int(m.group(3))
            hi = int(m.group(4)) if m.group(4) is not None else lo
            found.append(Shard(kind, int(m.group(2)), lo, max(lo, hi), folder / n))
    found.sort(key=lambda s: (s.rank, s.lo, -s.hi))
    out: list[Shard] = []
    for s in found:
        if out and out[-1].rank == s.rank and s.hi <= out[-1].hi:
            continue  # contained in the larger shard before it
        out.append(s)
    return out


def read_marks(folder: Path, rank: int) -> list[dict[str, int]]:
    """The resume marks of ``rank``, oldest first (a cut last line is ignored)."""
    try:
        text = (folder / resume_name(rank)).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    marks = []
    for line in text.splitlines():
        try:
            m = json.loads(line)
            marks.append({"step": int(m["step"]), "seq": int(m["seq"]),
                          "events_bytes": int(m.get("events_bytes", 0)),
                          "legacy_bytes": int(m.get("legacy_bytes", 0))})
        except (ValueError, KeyError, TypeError):
            continue
    return marks


def _cutoff(marks: list[dict[str, int]], key: str, position: int) -> float:
    """The last valid step of data written at ``position`` (a flush number or a byte offset):
    the smallest step of the marks written after it."""
    return min((m["step"] for m in marks if m[key] > position), default=math.inf)


def conform(table: pa.Table, schema: pa.Schema, rank: int) -> pa.Table:
    """``table`` with ``schema``'s columns in its order. Shards of earlier versions are
    converted (layer as plain strings, float64 statistics kept as they are: never rounded); a
    column they lack is filled (``FILL``, the file's rank, NaN). Raises :class:`ForeignShard`
    when the table is not a shard of this kind at all."""
    names = table.column_names
    if "step" not in names:
        raise ForeignShard(f"no step column (columns {names[:8]})")
    if "layer" in schema.names and "layer" not in names:
        raise ForeignShard(f"no layer column (columns {names[:8]})")
    data = [f.name for f in schema if f.name not in ("step", "rank")]
    if data and not any(c in names for c in data):
        raise ForeignShard(f"none of the run-store columns (columns {names[:8]})")
    if table.schema.equals(schema):
        return table
    n = table.num_rows
    cols, fields = [], []
    for f in schema:
        if f.name not in names:
            if f.name == "rank":
                c = pa.array(np.full(n, rank, np.int32))
            elif f.name in FILL:
                c = pa.array(np.full(n, FILL[f.name]), f.type)
            else:
                c = pa.nulls(n, f.type)
        else:
            c = table.column(f.name)
            try:
                if c.type == f.type or (pa.types.is_floating(f.type) and pa.types.is_floating(c.type)):
                    pass
                elif pa.types.is_dictionary(f.type):
                    c = c.cast(pa.string()).dictionary_encode()
                    c = c.cast(f.type) if c.type != f.type else c
                else:
                    c = c.cast(f.type, safe=False)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ForeignShard(f"column {f.name} of type {c.type} ({exc})") from None
        cols.append(c)
        fields.append(pa.field(f.name, c.type))
    return pa.table(cols, schema=pa.schema(fields))


def read_shard(s: Shard, schema: pa.Schema) -> pa.Table:
    """One shard, the columns of ``schema`` it has, conformed to ``schema``."""
    pf = pq.ParquetFile(s.path)
    try:
        have = pf.schema_arrow.names
        # a small shard decodes faster on this thread than through Arrow's thread pool
        t = pf.read(columns=[c for c in schema.names if c in have],
                    use_threads=pf.metadata.num_rows > _THREADED_ROWS)
    finally:
        pf.close()
    return conform(t, schema, s.rank)


#: Shards above this many rows are decoded with Arrow's threads; smaller ones are read several
#: at a time by the reader's own threads (``_READERS``), one each.
_THREADED_ROWS = 100_000
_READERS = min(8, os.cpu_count() or 1)


def _try_read(s: Shard, schema: pa.Schema) -> tuple[pa.Table | None, BaseException | None]:
    try:
        return read_shard(s, schema), None
    except Exception as exc:  # reported by the caller, in shard order
        return None, exc


def _read_all(listed: list[Shard], schema: pa.Schema):
    if len(listed) <= 16 or _READERS < 2:
        return [_try_read(s, schema) for s in listed]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(_READERS) as ex:
        return list(ex.map(lambda s: _try_read(s, schema), listed))


def _problem(problems: list[str], msg: str) -> None:
    if msg not in problems:
        problems.append(msg)


def read_kind(folder: Path, kind: str, *, ranks: Iterable[int] | None = None,
              columns: Iterable[str] | None = None, problems: list[str] | None = None,
              marks: dict[int, list[dict[str, int]]] | None = None) -> pa.Table:
    """All rows of ``kind`` (the ``columns`` asked for, default all), superseded rows removed,
    rows stored twice reduced to the newest copy; by rank then flush order, not sorted."""
    problems = [] if problems is None else problems
    full = SCHEMAS[kind]
    schema = full if columns is None else pa.schema([f for f in full if f.name in set(columns)
                                                      or f.name in ("step", "rank")])
    for _attempt in range(3):  # a compaction may remove a listed shard: list again
        listed = shards(folder, kind, ranks)
        tables: list[pa.Table] = []
        vanished = False
        for s, (t, exc) in zip(listed, _read_all(listed, schema)):
            if isinstance(exc, FileNotFoundError):
                vanished = True
                break
            if isinstance(exc, ForeignShard):
                _problem(problems, f"{s.path.name}: foreign schema, not a gradguard {kind} shard; "
                                   f"skipped ({exc})")
                continue
            if isinstance(exc, (OSError, pa.ArrowException, ValueError)):
                _problem(problems, f"{s.path.name}: unreadable shard skipped (damaged or "
                                   f"half-written: {exc})")
                continue
            if exc is not None:
                raise exc
            assert t is not None
            rank_marks = (marks or {}).get(s.rank) or []
            cut = _cutoff(rank_marks, "seq", s.hi)
            if cut != math.inf and t.num_rows:
                t = t.filter(pc.less_equal(t.column("step"), pa.scalar(int(cut), pa.int64())))
            if t.num_rows:
                tables.append(t)
        if not vanished:
            break
    if not tables:
        return schema.empty_table()
    table = pa.concat_tables(tables, promote_options="permissive")  # float32 + float64 -> float64
    del tables
    if "layer" in table.column_names:
        table = table.unify_dictionaries()
    return _newest_copy(table, kind, problems)


#: Schema metadata key set on a table already sorted by (step, rank[, layer]): one rank's rows
#: written in order are not checked or sorted again.
_SORTED = b"gradguard.sorted"


def _newest_copy(table: pa.Table, kind: str, problems: list[str]) -> pa.Table:
    """``table`` (rows by rank, then in the order written) with each step of a rank once: the
    last copy written. A rank's rows written once have increasing steps (and, for layers, at
    most one row per layer of a step): checked in one pass, and only then deduplicated."""
    rank = table.column("rank").to_numpy()
    step = table.column("step").to_numpy()
    layer = None
    if kind == "layers":
        col = table.column("layer").combine_chunks()
        layer = col.indices.to_numpy(zero_copy_only=False) if pa.types.is_dictionary(col.type) \
            else None
    same_rank = rank[1:] == rank[:-1]
    d = np.diff(step)
    if layer is None:
        clean = not np.any(same_rank & (d <= 0))
    else:
        clean = not np.any(same_rank & (d < 0))
        if clean and len(step):  # a step rewritten right after itself: more rows than layers
            starts = np.flatnonzero(np.r_[True, ~same_rank | (d != 0), True])
            clean = int(np.diff(starts).max()) <= max(1, len(col.dictionary))
    if clean:
        if len(step) < 2 or not same_rank.all():
            return table
        ordered = bool(np.all(d > 0)) if layer is None else (
            layer is not None and bool(np.all(np.diff(layer)[d == 0] > 0)))
        return table.replace_schema_metadata({_SORTED: b"1"}) if ordered else table
    import pandas as pd

    keys = {"rank": rank, "step": step}
    if layer is not None:
        keys["layer"] = layer
    dup = pd.DataFrame(keys).duplicated(keep="last").to_numpy()
    gone = pd.DataFrame({"rank": rank[dup], "step": step[dup]})
    for r, g in gone.groupby("rank"):
        st = g["step"]
        _problem(problems, f"rank {r}: {kind} of {st.nunique()} step(s) ({st.min()}-{st.max()}) "
                           "were stored twice (a resume without resume_from?); the newest copy "
                           "is kept")
    return table.filter(pa.array(~dup))


def _as_step(x: Any) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return None


def read_events(folder: Path, *, ranks: Iterable[int] | None = None,
                problems: list[str] | None = None,
                marks: dict[int, list[dict[str, int]]] | None = None) -> list[dict[str, Any]]:
    """The events of the chosen ranks (``events.jsonl`` of earlier versions first, then each
    rank's ``events-r{rank}.jsonl``), superseded ones removed, an event stored twice once."""
    problems = [] if problems is None else problems
    marks = marks or {}
    files = [(None, LEGACY_EVENTS)] + sorted(
        (int(m.group(1)), n) for n in _names(folder) if (m := EVENTS_RE.match(n)))
    out: list[dict[str, Any]] = []
    for file_rank, name in files:
        if file_rank is not None and not _want(ranks, file_rank):
            continue
        try:
            data = (folder / name).read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            _problem(problems, f"{name} unreadable ({exc}); its events are missing")
            continue
        pos, bad, undecodable = 0, [], []
        lines = data.split(b"\n")
        for i, raw in enumerate(lines, 1):
            offset, pos = pos, pos + len(raw) + 1
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace")
                undecodable.append(i)
            try:
                ev = json.loads(text)
            except ValueError:
                bad.append(i)
                continue
            step = _as_step(ev.get("step")) if isinstance(ev, dict) else None
            if step is None:
                bad.append(i)
                continue
            r = file_rank if file_rank is not None else _as_step(ev.get("rank")) or 0
            if not _want(ranks, r):
                continue
            key = "events_bytes" if file_rank is not None else "legacy_bytes"
            if step > _cutoff(marks.get(r) or [], key, offset):
                continue  # superseded by a resume
            ev = dict(ev)
            ev["step"] = step
            ev["rank"] = r
            out.append(ev)
        if bad:
            cut = " (the last one cut short: a kill or a write in progress)" if (
                bad[-1] == len(lines) and not data.endswith(b"\n")) else ""
            _problem(problems, f"{name} line(s) {', '.join(map(str, bad[:5]))}"
                               f"{' ...' if len(bad) > 5 else ''} not a valid event "
                               f"(JSON object with an integer step){cut}; skipped")
        if undecodable:
            _problem(problems, f"{name} line(s) {', '.join(map(str, undecodable[:5]))} not UTF-8; "
                               "undecodable bytes replaced")
    seen: dict[tuple, int] = {}
    for i, ev in enumerate(out):
        seen[(ev["rank"], ev["step"], str(ev.get("rule")), str(ev.get("action")),
              str(ev.get("message")))] = i
    if len(seen) < len(out):
        keep = set(seen.values())
        _problem(problems, f"{len(out) - len(keep)} event(s) were stored twice (a resume without "
                           "resume_from?); the newest copy is kept")
        out = [ev for i, ev in enumerate(out) if i in keep]
    out.sort(key=lambda e: (e["step"], e["rank"]))
    return out


def default_meta(folder: Path) -> dict[str, Any]:
    return {"name": folder.name, "layers": [], "config": {}, "versions": {}, "started": None,
            "notes": ["meta.json missing or unreadable"], "ranks": []}


def read_meta(folder: Path, problems: list[str] | None = None) -> tuple[dict[str, Any], bool]:
    """The parsed ``meta.json`` (checked: ``layers`` a list of names, ``config`` and
    ``versions`` objects, ``notes`` a list) and whether it could be read; defaults otherwise."""
    problems = [] if problems is None else problems
    path = folder / META
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        _problem(problems, "meta.json missing: layer order and configuration are unknown")
        return default_meta(folder), False
    except OSError as exc:
        _problem(problems, f"meta.json unreadable ({exc}); run shown without it")
        return default_meta(folder), False
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", errors="replace")
        _problem(problems, f"meta.json is not UTF-8 ({exc}); undecodable bytes replaced")
    try:
        meta = json.loads(text)
    except ValueError as exc:
        _problem(problems, f"meta.json unreadable ({exc}); run shown without it")
        return default_meta(folder), False
    if not isinstance(meta, dict):
        _problem(problems, f"meta.json unreadable (holds a {type(meta).__name__}, not a JSON "
                           "object); run shown without it")
        return default_meta(folder), False
    layers = meta.get("layers", [])
    if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
        _problem(problems, f"meta.json: \"layers\" is {str(layers)[:60]}, not a list of layer "
                           "names; ignored (names taken from the layer shards)")
        meta["layers"] = None
    for key, typ, empty in (("config", dict, {}), ("versions", dict, {}), ("notes", list, [])):
        if key in meta and not isinstance(meta[key], typ):
            _problem(problems, f"meta.json: \"{key}\" is not a JSON {'object' if typ is dict else 'list'}; "
                               "ignored")
            meta[key] = empty
        meta.setdefault(key, empty)
    meta["notes"] = [str(n) for n in meta["notes"]]
    meta.setdefault("name", folder.name)
    return meta, True


def is_run(folder: str | os.PathLike) -> bool:
    """True when ``folder`` is a folder holding run-store files (meta.json, shards, events)."""
    p = Path(folder)
    return p.is_dir() and any(is_store_file(n) and not n.startswith(".") for n in _names(p))


def find_runs(root: str | os.PathLike, max_depth: int = 3) -> list[Path]:
    """``root`` if it is a run, else the run folders below it (at most ``max_depth`` levels),
    sorted by path."""
    root = Path(root)
    if is_run(root):
        return [root]
    found: list[Path] = []
    level = [root]
    for _ in range(max_depth):
        nxt = []
        for d in level:
            try:
                subs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            for p in subs:
                (found if is_run(p) else nxt).append(p)
        level = nxt
    return sorted(found)


def check_run_folder(p: Path) -> None:
    """Raise :class:`RunNotFoundError` unless ``p`` is a run folder; the message says what is
    there instead."""
    if not p.exists():
        raise RunNotFoundError(f"no run folder at {p}")
    if not p.is_dir():
        raise RunNotFoundError(f"{p} is a file, not a run folder (a run is a folder with "
                               "meta.json and steps-*/layers-* shards)")
    if not is_run(p):
        below = find_runs(p)
        hint = (f"; it holds {len(below)} run folder(s): "
                + ", ".join(str(b.relative_to(p)) for b in below[:5])) if below else ""
        raise RunNotFoundError(f"{p} is not a gradguard run folder (no meta.json, no "
                               f"steps-*/layers-* shards, no events){hint}")


def marks_of(folder: Path, ranks: Iterable[int] | None = None) -> dict[int, list[dict[str, int]]]:
    out = {}
    for n in _names(folder):
        m = RESUME_RE.match(n)
        if m and _want(ranks, int(m.group(1))):
            out[int(m.group(1))] = read_marks(folder, int(m.group(1)))
    return out


def _ranks(rank: int | Iterable[int] | None) -> set[int] | None:
    if rank is None:
        return None
    if isinstance(rank, (int, np.integer)) and not isinstance(rank, bool):
        return {int(rank)}
    try:
        out = {int(r) for r in rank}  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(f"load_run: rank must be None, an int or ints, got {rank!r}") from None
    return out


def _frame(table: pa.Table, kind: str, layer_order: list[str] | None):
    """A pandas frame sorted by step, rank (and layer order): only out-of-order frames (several
    ranks, rows of a resume) are sorted (stable, on integer keys)."""
    import pandas as pd

    ordered = (table.schema.metadata or {}).get(_SORTED) == b"1"
    df = table.to_pandas(split_blocks=True, self_destruct=True)
    if "layer" in df.columns and layer_order is not None:
        cats = list(df["layer"].cat.categories)
        order = list(layer_order) + [c for c in cats if c not in set(layer_order)]
        if cats != order:
            df["layer"] = df["layer"].cat.set_categories(order)
            ordered = False  # the codes changed: check again
    elif "layer" in df.columns and not isinstance(df["layer"].dtype, pd.CategoricalDtype):
        df["layer"] = df["layer"].astype("category")
    keys = ["step", "rank"] + (["layer"] if kind == "layers" and "layer" in df.columns else [])
    if not ordered and not _ordered(df, keys):
        df = df.take(np.lexsort([_sort_key(df, k) for k in reversed(keys)]))
    return df.reset_index(drop=True)


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


@dataclass
class RunTables:
    """A run read as frames, before it is a :class:`Run` (the report reads this)."""

    path: Path
    meta: dict[str, Any]
    meta_ok: bool
    steps: Any
    layers: Any
    events: list[dict[str, Any]]
    notes: list[str]


def read_run(path: str | os.PathLike, *, rank: int | Iterable[int] | None = None,
             layer_columns: Iterable[str] | None = None) -> RunTables:
    """Read a run folder without warning: what was skipped or repaired is in ``notes``."""
    ranks = _ranks(rank)
    p = Path(path)
    check_run_folder(p)
    notes: list[str] = []
    meta, ok = read_meta(p, notes)
    marks = marks_of(p, ranks)
    steps = read_kind(p, "steps", ranks=ranks, problems=notes, marks=marks)
    layers = read_kind(p, "layers", ranks=ranks, columns=layer_columns, problems=notes, marks=marks)
    events = read_events(p, ranks=ranks, problems=notes, marks=marks)
    layer_order = meta.get("layers")
    if layer_order is None:  # meta's list was unusable: the names as the shards store them
        layer_order = [str(x) for x in layers.column("layer").combine_chunks().dictionary.to_pylist()] \
            if layers.num_rows else []
        meta["layers"] = layer_order
    return RunTables(path=p, meta=meta, meta_ok=ok, steps=_frame(steps, "steps", None),
                     layers=_frame(layers, "layers", layer_order), events=events, notes=notes)


def events_frame(events: list[dict[str, Any]]):
    """The events as a DataFrame with the EVENT_FIELDS columns (value, baseline, time floats)."""
    import pandas as pd

    df = pd.DataFrame([{k: e.get(k) for k in EVENT_FIELDS} for e in events], columns=list(EVENT_FIELDS))
    if len(df):
        df["step"] = df["step"].astype("int64")
        for c in ("value", "baseline", "time"):
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
        df["rank"] = df["rank"].astype("int64")
    else:
        df = df.astype({"step": "int64", "value": "float64", "baseline": "float64",
                        "time": "float64"})
    return df


@dataclass
class Run:
    """A run read back from its folder; DataFrames sorted by step, then rank.

    ``steps``: STEPS_SCHEMA columns; ``layers``: LAYERS_SCHEMA columns (``layer`` a pandas
    categorical of ``meta["layers"]``, layers of a step in that order; float32 statistics, or
    float64 where older shards stored them); ``events``: one row per event (EVENT_FIELDS);
    ``meta``: the parsed ``meta.json`` (defaults when missing); ``notes``: what the reader
    skipped or repaired (each also a :class:`RunStoreWarning`); ``window(step)``: the
    flight-recorder dump written for that step's event.
    """

    path: Path
    meta: dict[str, Any]
    steps: Any
    layers: Any
    events: Any
    notes: list[str] = field(default_factory=list)
    ranks: set[int] | None = field(default=None, repr=False)

    def _window_files(self) -> list[tuple[int, int, Path]]:
        out = []
        for n in _names(self.path):
            m = WINDOW_RE.match(n)
            if m and _want(self.ranks, int(m.group(1))):
                out.append((int(m.group(1)), int(m.group(2)), self.path / n))
        return out

    def window(self, step: int, rank: int | None = None):
        """The flight-recorder dump (columns step, layer, grad_norm) of ``step``'s event."""
        files = sorted(p for r, s, p in self._window_files()
                       if s == int(step) and (rank is None or r == int(rank)))
        if not files:
            raise KeyError(f"no flight-recorder window for step {step} in {self.path}")
        df = pa.concat_tables([pq.read_table(f, schema=WINDOW_SCHEMA) for f in files]).to_pandas()
        return df.sort_values(["step", "layer"], kind="stable").reset_index(drop=True)

    def learning_rates(self):
        """One row per step: ``step``, ``rank`` and every param group's learning rate as
        ``lr0``, ``lr1``, ... (from ``lrs``; a step with a single learning rate has it as
        ``lr0`` and NaN in the others)."""
        return learning_rate_frame(self.steps)

    def windows(self) -> list[int]:
        """Steps that have a flight-recorder dump."""
        return sorted({s for _r, s, _p in self._window_files()})

    def __repr__(self) -> str:
        return (f"Run({str(self.path)!r}, steps={len(self.steps)}, layers={len(self.layers)}, "
                f"events={len(self.events)})")


def load_run(path: str | os.PathLike, rank: int | Iterable[int] | None = None) -> Run:
    """Read a run folder written by :class:`~gradguard.Monitor` (also while it is written).

    ``rank``: None (default) merges every rank's files; an int or several read those ranks
    only. Each step is returned once (rows superseded by a resume, or stored twice, are left
    out); a damaged or foreign shard, an unreadable ``meta.json``, a bad events line each give
    a :class:`~gradguard.store.RunStoreWarning` naming the file (and a line of ``Run.notes``).
    Raises :class:`~gradguard.store.RunNotFoundError` when ``path`` is not a run folder.
    """
    t = read_run(path, rank=rank)
    for n in t.notes:
        warnings.warn(f"gradguard load_run {t.path}: {n}", RunStoreWarning, stacklevel=2)
    return Run(path=t.path, meta=t.meta, steps=t.steps, layers=t.layers,
               events=events_frame(t.events), notes=t.notes, ranks=_ranks(rank))


def learning_rate_matrix(steps) -> np.ndarray:
    """``(steps, groups)`` float64: every param group's learning rate of each row of a steps
    frame (``lrs`` where stored, else ``lr`` as group 0; NaN where a group is absent)."""
    n = len(steps)
    lr = steps["lr"].to_numpy(dtype=np.float64) if "lr" in steps else np.full(n, np.nan)
    lists = steps["lrs"].to_numpy() if "lrs" in steps else np.full(n, None, dtype=object)
    import pandas as pd

    where = np.flatnonzero(pd.notna(lists))
    parts = lists[where]
    lens = np.fromiter(map(len, parts), np.int64, len(parts))
    out = np.full((n, max(1, int(lens.max()) if len(lens) else 1)), np.nan)
    out[:, 0] = lr
    if lens.sum():  # one scatter of every stored list (1e6 steps in a fraction of a second)
        flat = np.concatenate(list(parts)).astype(np.float64, copy=False)
        starts = np.cumsum(lens) - lens
        out[np.repeat(where, lens), np.arange(len(flat)) - np.repeat(starts, lens)] = flat
    return out


def learning_rate_frame(steps):
    import pandas as pd

    m = learning_rate_matrix(steps)
    cols = {"step": steps["step"].to_numpy(), "rank": steps["rank"].to_numpy()}
    cols.update({f"lr{g}": m[:, g] for g in range(m.shape[1])})
    return pd.DataFrame(cols)


def nan_or(x: Any) -> float:
    """``float(x)``, NaN for None."""
    return math.nan if x is None else float(x)
