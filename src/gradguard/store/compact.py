"""Compaction: many small per-flush shards merged into few large ones, never losing a row.

A flush writes one small shard per kind (``flush_every`` steps); a million steps at the
default ``flush_every=100`` would be 10,000 files per kind, and reading a file costs about the
same whether it holds 100 rows or 100,000. The writer therefore merges shards:

* on the writer thread, tiered: when the last ``FANOUT`` shards are of one size class (each
  made of ``FANOUT**k`` flushes) they become one shard of the next class, so a running or
  killed run holds at most about ``FANOUT - 1`` shards per class (a few dozen in all);
* at ``close()``: everything into shards of at most ``MAX_ROWS`` rows.

A merged shard ``KIND-r{rank}-{lo:06d}-{hi:06d}.parquet`` (flushes ``lo..hi``) is written
complete under a temporary name and renamed; only then are its parts removed. Killed in
between, both are on disk and the reader ignores the parts (they lie inside the merged range):
no row is lost or read twice. Shards are never merged across a resume mark (its flush number
decides which rows it supersedes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ._io import write_options, write_parquet_atomic
from .reader import Shard, read_shard
from .schema import SCHEMAS, shard_name

FANOUT = 16
#: Rows of a merged shard at most (about 60 MB of layer rows in memory while merging).
MAX_ROWS = 2_000_000
#: Parquet row group of merged shards (the reader prunes on step statistics per group).
ROW_GROUP = 256 * 1024


@dataclass
class Segment:
    """One shard on disk: flushes ``lo..hi``, ``rows`` rows, made of ``parts`` flushes."""

    lo: int
    hi: int
    rows: int
    parts: int
    path: Path


def level(parts: int) -> int:
    """Size class: ``k`` for ``FANOUT**k <= parts < FANOUT**(k+1)``."""
    k = 0
    while parts >= FANOUT:
        parts //= FANOUT
        k += 1
    return k


def _split(segs: list[Segment], marks: list[int]) -> list[list[Segment]]:
    """``segs`` cut into runs with no resume mark between neighbours."""
    runs: list[list[Segment]] = []
    for s in segs:
        if runs and not any(runs[-1][-1].hi < m <= s.lo for m in marks):
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


def plan_tiered(segs: list[Segment], marks: list[int]) -> list[Segment] | None:
    """The trailing ``FANOUT`` shards to merge now, or None."""
    if len(segs) < FANOUT:
        return None
    tail = segs[-FANOUT:]
    if len(_split(tail, marks)) != 1:
        return None
    k = level(tail[0].parts)
    if all(level(s.parts) == k for s in tail) and sum(s.rows for s in tail) <= MAX_ROWS:
        return tail
    return None


def plan_final(segs: list[Segment], marks: list[int]) -> list[list[Segment]]:
    """Groups of neighbouring shards, each at most ``MAX_ROWS`` rows, to merge at close; a
    shard already at least half that size is left as it is."""
    groups: list[list[Segment]] = []
    for run in _split(segs, marks):
        cur: list[Segment] = []
        rows = 0
        for s in run:
            if s.rows >= MAX_ROWS // 2 or rows + s.rows > MAX_ROWS:
                if len(cur) > 1:
                    groups.append(cur)
                cur, rows = ([], 0) if s.rows >= MAX_ROWS // 2 else ([s], s.rows)
                continue
            cur.append(s)
            rows += s.rows
        if len(cur) > 1:
            groups.append(cur)
    return groups


def merge(folder: Path, kind: str, rank: int, segs: list[Segment]) -> Segment:
    """Write ``segs`` as one shard, then remove them; returns the new segment. Raises (and
    leaves the parts as they are) when a part cannot be read or the merged shard written."""
    schema = SCHEMAS[kind]
    tables = [read_shard(Shard(kind, rank, s.lo, s.hi, s.path), schema) for s in segs]
    table = pa.concat_tables(tables, promote_options="permissive")
    if kind == "layers":
        table = table.unify_dictionaries()
    lo, hi = segs[0].lo, segs[-1].hi
    path = folder / shard_name(kind, rank, lo, hi)
    write_parquet_atomic(path, table, row_group_size=ROW_GROUP, **write_options(table.schema))
    for s in segs:
        if s.path != path:
            try:
                os.unlink(s.path)
            except FileNotFoundError:
                pass
    return Segment(lo, hi, table.num_rows, sum(s.parts for s in segs), path)
