"""Run folders for the store tests, written through the real writer (``RunWriter``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from gradguard.store import LAYERS_SCHEMA, STEPS_SCHEMA, RunWriter, layer_column

NAMES = ["enc", "mid", "head"]


def steps_table(steps, rank: int = 0, tag: float = 0.0) -> pa.Table:
    """Step rows for ``steps``; ``total_norm = step + tag`` tells which write a row came from."""
    s = np.asarray(steps, dtype=np.int64)
    n = len(s)
    return pa.table({
        "step": s, "time": s * 0.5, "loss": 1.0 / (s + 1), "lr": np.full(n, 1e-3),
        "lrs": pa.nulls(n, STEPS_SCHEMA.field("lrs").type),
        "total_norm": s + tag, "total_norm_after": s + tag, "clip_coef": np.ones(n),
        "threshold": np.full(n, np.nan), "clipped": np.zeros(n, bool), "skipped": np.zeros(n, bool),
        "nonfinite": np.zeros(n, bool), "loss_scale": np.full(n, np.nan),
        "rank": np.full(n, rank, np.int32)}, schema=STEPS_SCHEMA)


def layers_table(steps, rank: int = 0, tag: float = 0.0, names=NAMES) -> pa.Table:
    s = np.asarray(steps, dtype=np.int64)
    k = len(s) * len(names)
    g = (np.repeat(s, len(names)) + tag + np.tile(np.arange(len(names)) / 10, len(s)))
    return pa.table({
        "step": np.repeat(s, len(names)), "layer": layer_column(list(names), len(s)),
        "grad_norm": g.astype(np.float32), "grad_max_abs": np.ones(k, np.float32),
        "nonfinite_count": np.zeros(k, np.int64), "param_norm": np.ones(k, np.float32),
        "update_ratio": np.full(k, 1e-3, np.float32), "rank": np.full(k, rank, np.int32)},
        schema=LAYERS_SCHEMA)


def flush(w: RunWriter, steps, *, tag: float = 0.0, layers: bool = True, events=None) -> None:
    """One flush as the Monitor writes it: steps shard, layers shard, next number, events."""
    w.write_shard("steps", steps_table(steps, w.rank, tag))
    if layers:
        w.write_shard("layers", layers_table(steps, w.rank, tag))
    w.next_seq()
    w.append_events(events or [])


def write_run(path: Path, first: int, last: int, *, every: int = 10, tag: float = 0.0,
              events_at=(), rank: int = 0, close: bool = True, **kw) -> RunWriter:
    """Steps ``first..last`` in flushes of ``every`` steps; an event at each of ``events_at``."""
    w = RunWriter(path, rank, **kw)
    if rank == 0:
        w.write_meta({"name": Path(path).name, "layers": NAMES, "config": {}, "notes": []})
    for lo in range(first, last + 1, every):
        chunk = list(range(lo, min(last, lo + every - 1) + 1))
        evs = [{"step": s, "rule": "spike", "value": s + tag, "action": "warn", "message": "m",
                "rank": rank} for s in events_at if s in chunk]
        flush(w, chunk, tag=tag, events=evs)
    if close:
        w.close()
    return w
