"""RunWriter: one rank's writer of a run folder, with an explicit run-folder policy.

Size: ``RunWriter``'s folder policy, lock, resume marks and compaction trigger are one object's
state machine.

``mode`` says what happens when the folder already holds a run (a re-run never appends
silently):

* ``"new"`` (default): the run goes to the first free sibling ``NAME``, ``NAME-2``,
  ``NAME-3``, ...; ``writer.path`` is the folder actually used.
* ``"resume"``: append to the run in the folder (shard numbering continues); call
  :meth:`RunWriter.resume_from` with the checkpoint's step so rows written after it by the
  abandoned continuation are superseded.
* ``"overwrite"``: remove the run-store files in the folder (only those: meta.json, shards,
  events, windows, marks; never other files) and start afresh.

For rank 0, a folder "holds a run" when it has meta.json or files of rank 0, or files of a
rank that no live writer holds; for rank ``r > 0``, when it has files of rank ``r`` (so the
ranks of one job meet in one folder whichever flushes first). A lock file ``writer-r{rank}.lock`` (pid, host) refuses a second live
writer of the same rank on the same folder (:class:`RunLockedError`); a lock whose process is
gone is taken over. In ``"new"`` mode a locked folder counts as holding a run.

Claiming (choosing the folder, taking the lock, listing the existing shards) happens in
:meth:`open`, at construction unless ``lazy=True``, else at the first write. A lazy writer can
still be turned into a resume (:meth:`resume_from`) before anything is written, e.g. when a
Monitor's state is loaded from a checkpoint before training resumes.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import compact as _compact
from ._io import append_bytes, jsonable, write_bytes_atomic, write_options, write_parquet_atomic
from .errors import RunLockedError, StoreError
from .lock import Lock, live_lock
from .reader import read_marks, shards
from .schema import (
    KINDS,
    LEGACY_EVENTS,
    LOCK_RE,
    META,
    SHARD_RE,
    SUPERSEDED_DIR,
    WINDOW_RE,
    events_name,
    file_rank,
    is_store_file,
    lock_name,
    resume_name,
    shard_name,
    window_name,
)

MODES = ("new", "resume", "overwrite")
COMPACT = ("auto", "close", "off")
#: Versioned siblings tried in mode "new" before giving up.
MAX_VERSIONS = 10_000


def _data_names(folder: Path) -> list[str]:
    """Run-store files in ``folder`` other than locks and temporary files."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [n for n in names if not n.startswith(".") and is_store_file(n) and not LOCK_RE.match(n)]


def holds_run(folder: Path, rank: int, *, own_lock: bool = True) -> bool:
    """True when ``folder`` holds a run for a writer of ``rank`` (see the module docstring).

    Rank 0: meta.json or any file of rank 0, or files of a rank no live writer holds (a live
    rank of the same job that flushed first is joined, not fled). Rank ``r > 0``: files of
    rank ``r``. ``own_lock``: a live lock of ``rank`` counts too."""
    if not folder.is_dir():
        return False
    for n in _data_names(folder):
        r = file_rank(n)
        if r == rank or (rank == 0 and (r is None or not live_lock(folder / lock_name(r)))):
            return True
    return own_lock and live_lock(folder / lock_name(rank))


def version_path(path: Path, n: int) -> Path:
    """``path`` for ``n == 1``, else its sibling ``NAME-n``."""
    return path if n == 1 else path.with_name(f"{path.name}-{n}")


class RunWriter:
    """Writes one rank's shards, events, flight-recorder windows and (rank 0) ``meta.json``.

    Args:
        path: the run folder asked for (created with its parents).
        rank: this writer's rank (its files carry it; ranks never share a file).
        mode: ``"new"`` | ``"resume"`` | ``"overwrite"`` (module docstring).
        lazy: claim the folder at :meth:`open` or the first write, not now.
        compact: ``"auto"`` merges shards on the writer's thread as they accumulate and at
            :meth:`close`; ``"close"`` only at close; ``"off"`` never (one file per flush).

    Every write raises ``OSError`` on failure (:class:`StoreError`, :class:`RunLockedError`
    among them); the Monitor catches it, warns once and notes it in the meta. The methods are
    thread-safe (one lock).
    """

    def __init__(self, path: str | os.PathLike, rank: int = 0, *, mode: str = "new",
                 lazy: bool = False, compact: str = "auto"):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"RunWriter: path must be a str or os.PathLike, got {path!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"RunWriter: rank must be an int >= 0, got {rank!r}")
        if mode not in MODES:
            raise ValueError(f"RunWriter: mode must be one of {MODES}, got {mode!r}")
        if compact not in COMPACT:
            raise ValueError(f"RunWriter: compact must be one of {COMPACT}, got {compact!r}")
        self.requested = Path(path)
        #: The folder written (the requested one until claimed; a versioned sibling in mode
        #: "new" when the requested one held a run).
        self.path = self.requested
        self.rank = rank
        self.mode = mode
        self.compact_mode = compact
        #: What the writer could not do without failing a write (a compaction that failed).
        self.notes: list[str] = []
        self.seq = 0
        self._claimed = False
        self._closed = False
        self._created = False
        self._wrote = False
        self._lock: Lock | None = None
        self._mutex = threading.RLock()
        self._segments: dict[str, list[_compact.Segment]] = {k: [] for k in KINDS}
        self._marks: list[int] = []
        self._pending_resume: int | None = None
        self._last_meta: dict[str, Any] | None = None
        if not lazy:
            self.open()

    # -- claiming --------------------------------------------------------------------------
    @property
    def claimed(self) -> bool:
        return self._claimed

    def open(self) -> RunWriter:
        """Claim the folder now (idempotent): pick it by ``mode``, take the lock, continue the
        shard numbering. Raises ``OSError`` (:class:`RunLockedError` when a live writer holds
        it in mode "resume" or "overwrite")."""
        with self._mutex:
            if self._closed:
                raise StoreError(f"RunWriter for {self.path} is closed")
            if self._claimed:
                return self
            if self.mode == "new":
                self._claim_new()
            else:
                self._take(self.requested)
                if self.mode == "overwrite":
                    self._remove_old()
                else:
                    self._scan()
            self._claimed = True
            if self._pending_resume is not None:
                step, self._pending_resume = self._pending_resume, None
                self._mark(step)
            return self

    def _take(self, folder: Path) -> None:
        existed = folder.is_dir()
        folder.mkdir(parents=True, exist_ok=True)
        lock = Lock(folder / lock_name(self.rank))
        lock.acquire()
        self._lock, self.path, self._created = lock, folder, not existed

    def _claim_new(self) -> None:
        for n in itertools.count(1):
            if n > MAX_VERSIONS:
                raise StoreError(f"{self.requested}: {MAX_VERSIONS} versions of this run exist")
            folder = version_path(self.requested, n)
            if holds_run(folder, self.rank):
                continue
            try:
                self._take(folder)
            except RunLockedError:
                continue  # another writer claimed it a moment ago
            if holds_run(folder, self.rank, own_lock=False):
                self._release()  # written before we locked it: not ours
                continue
            return

    def _scan(self) -> None:
        """Resume: list this rank's shards (removing parts a killed compaction left inside a
        merged shard, and its temporary files) and continue after the highest flush number."""
        top = -1
        names = os.listdir(self.path)
        for kind in KINDS:
            keep = shards(self.path, kind, [self.rank], names)
            kept = {s.path.name for s in keep}
            for n in names:
                m = SHARD_RE.match(n)
                if m and m.group(1) == kind and int(m.group(2)) == self.rank and n not in kept:
                    _unlink(self.path / n)  # inside a merged shard: its rows are there
            segs = []
            for s in keep:
                try:
                    rows = pq.read_metadata(s.path).num_rows
                except (OSError, pa.ArrowException):
                    rows = _compact.MAX_ROWS  # damaged: never merged, the reader reports it
                segs.append(_compact.Segment(s.lo, s.hi, rows, s.hi - s.lo + 1, s.path))
                top = max(top, s.hi)
            self._segments[kind] = segs
        for n in names:
            if n.startswith(".") and n.endswith(".tmp") and file_rank(n[1:-4]) == self.rank:
                _unlink(self.path / n)
        self._marks = [m["seq"] for m in read_marks(self.path, self.rank)]
        self.seq = max([top + 1] + self._marks)

    def _remove_old(self) -> None:
        """Overwrite: remove this rank's run-store files; rank 0 also meta.json, the events of
        earlier versions and the files of ranks no live writer holds. Data first, meta last."""
        names = os.listdir(self.path)
        doomed = []
        for n in names:
            inner = n[1:-4] if n.startswith(".") and n.endswith(".tmp") else n
            if not is_store_file(inner) or LOCK_RE.match(inner):
                continue
            r = file_rank(inner)
            if r == self.rank or (self.rank == 0 and (
                    r is None or not live_lock(self.path / lock_name(r)))):
                doomed.append(n)
        for n in sorted(doomed, key=lambda n: n == META):
            _unlink(self.path / n)
        sup = self.path / SUPERSEDED_DIR
        if sup.is_dir():
            for p in sup.iterdir():
                m = WINDOW_RE.match(p.name.split("~")[0])
                if m and (int(m.group(1)) == self.rank or self.rank == 0):
                    _unlink(p)
        self.seq = 0

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- resume ----------------------------------------------------------------------------
    def resume_from(self, step: int, path: str | os.PathLike | None = None) -> None:
        """Resume the run at ``path`` (default: the folder asked for) from a checkpoint taken
        at ``step``: rows and events of this rank with a step after ``step`` that were written
        before now are superseded (``load_run`` returns each step once, the newest).

        Before the claim this turns the writer into mode "resume". After it, in the same
        folder, it writes the mark; a writer that claimed a fresh versioned folder and wrote
        nothing there but meta.json moves back to the run it resumes (and removes the fresh
        folder). A writer that already wrote rows elsewhere raises :class:`StoreError`.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"resume_from: step must be an int >= 0, got {step!r}")
        target = Path(path) if path is not None else self.requested
        with self._mutex:
            if self._closed:
                raise StoreError(f"RunWriter for {self.path} is closed")
            if not self._claimed:
                self.requested = self.path = target
                self.mode = "resume"
                self._pending_resume = step
                return
            if os.path.realpath(target) == os.path.realpath(self.path):
                self._mark(step)
                return
            if self._wrote:
                raise StoreError(f"resume_from: this writer already wrote rows to {self.path}; "
                                 f"it cannot move to {target}")
            old, created = self.path, self._created
            self._release()
            if created:  # our fresh folder: nothing in it but what we wrote
                for n in (META, resume_name(self.rank)):
                    _unlink(old / n)
                try:
                    old.rmdir()
                except OSError:
                    pass
            self._claimed = False
            self._segments = {k: [] for k in KINDS}
            self._marks = []
            self.seq = 0
            self.requested = self.path = target
            self.mode = "resume"
            self._pending_resume = step
            self.open()
            if self._last_meta is not None:
                self.write_meta(self._last_meta)

    def _mark(self, step: int) -> None:
        """Write the resume mark and move this rank's windows after ``step`` aside."""
        def size(name: str) -> int:
            try:
                return (self.path / name).stat().st_size
            except FileNotFoundError:
                return 0

        mark = {"step": step, "seq": self.seq, "events_bytes": size(events_name(self.rank)),
                "legacy_bytes": size(LEGACY_EVENTS), "time": time.time()}
        append_bytes(self.path / resume_name(self.rank), (json.dumps(mark) + "\n").encode())
        self._marks.append(self.seq)
        for n in os.listdir(self.path):
            m = WINDOW_RE.match(n)
            if m and int(m.group(1)) == self.rank and int(m.group(2)) > step:
                sup = self.path / SUPERSEDED_DIR
                sup.mkdir(exist_ok=True)
                os.replace(self.path / n, sup / f"{n}~{int(mark['time'] * 1e6)}")

    # -- writing ---------------------------------------------------------------------------
    def _ready(self) -> None:
        if self._closed:
            raise StoreError(f"RunWriter for {self.path} is closed")
        if not self._claimed:
            self.open()

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Replace ``meta.json`` (atomically) with ``meta``."""
        with self._mutex:
            self._ready()
            self._last_meta = meta
            write_bytes_atomic(self.path / META, json.dumps(meta, indent=1, default=str).encode())

    def write_shard(self, kind: str, table: pa.Table) -> Path:
        """Write ``table`` as this flush's ``kind`` shard (``"steps"`` or ``"layers"``);
        returns its path. :meth:`next_seq` ends the flush."""
        if kind not in KINDS:
            raise ValueError(f"write_shard: kind must be one of {KINDS}, got {kind!r}")
        with self._mutex:
            self._ready()
            path = self.path / shard_name(kind, self.rank, self.seq)
            write_parquet_atomic(path, table, **write_options(table.schema))
            self._wrote = True
            segs = self._segments[kind]
            if segs and segs[-1].lo == self.seq:  # rewritten within one flush
                segs.pop()
            segs.append(_compact.Segment(self.seq, self.seq, table.num_rows, 1, path))
            return path

    def next_seq(self) -> None:
        """End the flush: the next shards get the next number (merged on the way when
        ``compact="auto"``)."""
        with self._mutex:
            self.seq += 1
            if self.compact_mode == "auto" and self._claimed and not self._closed:
                self._compact(final=False)

    def write_window(self, step: int, table: pa.Table) -> str:
        """Write a flight-recorder dump for ``step``; returns its file name."""
        with self._mutex:
            self._ready()
            name = window_name(self.rank, step)
            write_parquet_atomic(self.path / name, table, compression="zstd")
            self._wrote = True
            return name

    def append_events(self, events: list[dict[str, Any]]) -> None:
        """Append ``events`` (dicts) to this rank's ``events-r{rank}.jsonl`` in one write."""
        if not events:
            return
        data = "".join(json.dumps(jsonable(e), allow_nan=True) + "\n" for e in events).encode()
        with self._mutex:
            self._ready()
            append_bytes(self.path / events_name(self.rank), data)
            self._wrote = True

    # -- compaction and closing ------------------------------------------------------------
    def compact(self, *, final: bool = True) -> int:
        """Merge this rank's small shards now; returns the number of merges. ``final``: all of
        them into shards of at most ``compact.MAX_ROWS`` rows (what :meth:`close` does);
        otherwise only the tiered step (what each flush does with ``compact="auto"``).
        Raises ``OSError`` when a merged shard cannot be written (the parts are kept)."""
        with self._mutex:
            if not self._claimed or self._closed:
                return 0
            return self._compact(final=final, raise_errors=True)

    def _compact(self, *, final: bool, raise_errors: bool = False) -> int:
        done = 0
        for kind in KINDS:
            segs = self._segments[kind]
            try:
                if final:
                    for group in reversed(_compact.plan_final(segs, self._marks)):
                        i = segs.index(group[0])
                        segs[i:i + len(group)] = [_compact.merge(self.path, kind, self.rank, group)]
                        done += 1
                else:
                    while (tail := _compact.plan_tiered(segs, self._marks)) is not None:
                        segs[-len(tail):] = [_compact.merge(self.path, kind, self.rank, tail)]
                        done += 1
            except (OSError, pa.ArrowException, ValueError) as exc:
                msg = f"compaction of {kind} shards failed ({exc}); the shards are kept as they are"
                if msg not in self.notes:
                    self.notes.append(msg)
                if self.compact_mode == "auto":
                    self.compact_mode = "close"  # do not retry at every flush
                if raise_errors:
                    raise
        return done

    def close(self) -> None:
        """Compact (unless ``compact="off"``) and release the lock. Idempotent; writes after
        it raise :class:`StoreError`."""
        with self._mutex:
            if self._closed:
                return
            try:
                if self._claimed and self.compact_mode != "off":
                    self._compact(final=True)
            finally:
                self._closed = True
                self._release()
                if self._created and self._claimed:
                    try:
                        self.path.rmdir()  # a folder this writer made and left empty
                    except OSError:
                        pass

    def __enter__(self) -> RunWriter:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._claimed else "not claimed"
        return f"RunWriter({str(self.path)!r}, rank={self.rank}, mode={self.mode!r}, {state})"


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def compact_run(path: str | os.PathLike, rank: int | None = None) -> int:
    """Compact a run folder written earlier (e.g. by a version without compaction, or killed):
    each rank's shards are merged under that rank's lock. Returns the number of merges."""
    p = Path(path)
    ranks = sorted({int(m.group(2)) for n in os.listdir(p) if (m := SHARD_RE.match(n))}) \
        if rank is None else [rank]
    done = 0
    for r in ranks:
        w = RunWriter(p, r, mode="resume", compact="close")
        try:
            done += w.compact(final=True)
        finally:
            w.close()
    return done
