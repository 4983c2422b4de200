"""The flush: from the device buffers to the run store, the sinks and the user's warnings.

Every ``flush_every`` steps (and at ``flush()``, ``state_dict()``, ``close()``, the end of a
``with`` block, garbage collection of an unclosed Monitor and interpreter exit) the buffers
are snapshotted (``buffers.StepBuffer.snapshot``) and handed to the host side, on a
background writer thread by default:

1. wait for the copies of the snapshot (CUDA events);
2. run the rules deferred to the flush (``rules.RuleRunner.run_deferred``);
3. build the ``steps`` and ``layers`` columns and the events (``events.py``), dump the
   flight-recorder windows;
4. write the Parquet shards and ``events.jsonl`` (``store``), then feed the sinks.

At most one snapshot is in flight: a flush waits for the previous one to be written before
it hands over the next, so a SIGKILL loses at most the steps of one flush interval plus the
write in progress (milliseconds: the writer thread starts with the Monitor and loads what the
first write needs while training starts, instead of during the first flush).

The run folder is claimed at the first write (``run_store``): a Monitor built and
then given a checkpoint (``load_state_dict``) before training resumes the folder it was
created for instead of claiming a new one.
"""

from __future__ import annotations

import platform
import queue
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .buffers import StepBuffer, group_lrs
from .events import build_events, window_columns
from .layers import LayerMap
from .notices import Notices
from .rules import RuleRunner
from .run_store import lazy_writer, moved_message


class Batch:
    """What one flush hands to the sinks: numpy columns of steps and layers, and events."""

    def __init__(self, steps: dict[str, np.ndarray], layers: dict[str, np.ndarray],
                 layer_names: list[str], events: list[dict[str, Any]]):
        self.steps = steps
        self.layers = layers
        self.layer_names = layer_names
        self.events = events


def _versions() -> dict[str, str]:
    import torch

    from .. import __version__
    return {"gradguard": __version__, "torch": torch.__version__,
            "python": platform.python_version()}


class RunInfo:
    """What ``meta.json`` says about the run (no reference to the Monitor itself)."""

    def __init__(self, name: str, config: dict[str, Any], world: int):
        self.name = name
        self.config = config
        self.world = world
        self.layer_map: LayerMap | None = None
        self.started = datetime.now(timezone.utc).isoformat()
        self.finished: str | None = None

    def meta(self, notes: list[str]) -> dict[str, Any]:
        lm = self.layer_map
        return {
            "name": self.name,
            "layers": [] if lm is None else list(lm.layers),
            "parameters": [] if lm is None else [[n, lm.layers[i]] for n, i in
                                                 zip(lm.param_names, lm.index)],
            "config": self.config, "versions": _versions(), "started": self.started,
            "notes": list(notes), "ranks": list(range(self.world)), "finished": self.finished,
        }


class Flusher:
    """Snapshots, the writer thread, the run store and the sinks of one Monitor.

    Holds no reference to the Monitor, so that a ``weakref.finalize`` on the Monitor can
    close it (``close``) when the Monitor is collected or the interpreter exits.
    """

    def __init__(self, run_dir: Path | None, rank: int, mode: str, sinks: list[Any],
                 notices: Notices, rules: RuleRunner, info: RunInfo, *, top_k: int,
                 recorder_steps: int, async_flush: bool):
        self.requested_dir = run_dir
        self.rank = rank
        self.mode = mode
        self.sinks = sinks
        self.notices = notices
        self.rules = rules
        self.info = info
        self.top_k = top_k
        self.recorder_steps = recorder_steps
        self.async_flush = async_flush
        self.buffers: StepBuffer | None = None
        self.closed = False
        self._writer: Any = None if run_dir is None else lazy_writer(run_dir, rank, mode)
        self._claimed = False
        self._meta_lock = threading.Lock()
        self._claim_lock = threading.Lock()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        notices.on_note = self.write_meta
        notices.in_worker = self.in_worker
        if async_flush:
            self._start(warm=run_dir is not None)
        for s in self.sinks:
            self.safe_sink(s, "open", self.info.meta(self.notices.notes))

    # -- the run folder ---------------------------------------------------------------------
    @property
    def run_dir(self) -> Path | None:
        """The folder written (known once claimed), else the one asked for."""
        w = self._writer
        return Path(w.path) if w is not None else self.requested_dir

    def resume(self, step: int) -> None:
        """Continue the run from ``step`` (a checkpoint): rows after it are superseded."""
        if self._writer is not None:
            try:
                self._writer.resume_from(int(step))
            except OSError as exc:
                self.notices.fail("store", exc)

    def _claimed_writer(self) -> Any:
        """The writer, claiming the folder at the first call; None without a store."""
        if self._claimed:
            return self._writer
        with self._claim_lock:
            if self._claimed or self._writer is None:
                self._claimed = True
                return self._writer
            try:
                self._writer.open()
            except OSError as exc:
                self._writer = None
                from ..store import RunLockedError

                what = "cannot write to the run folder" if isinstance(exc, RunLockedError) \
                    else "cannot create the run folder"
                self.notices.fail(
                    "store", exc, f"gradguard monitor: {what} {self.requested_dir}: {exc}; the "
                    "run store is off, sinks still get the statistics")
            self._claimed = True
            if self._writer is not None:
                used = Path(self._writer.path)
                if self.requested_dir is not None and used != self.requested_dir:
                    self.notices.note(moved_message(self.requested_dir, used), write=False)
                self.write_meta()
        return self._writer

    def write_meta(self) -> None:
        """``meta.json`` (rank 0), once the folder is claimed; a failure notes once."""
        w = self._writer
        if w is None or self.rank != 0 or not self._claimed:
            return
        with self._meta_lock:
            try:
                w.write_meta(self.info.meta(self.notices.notes))
            except OSError as exc:
                # same source as the shards: a read-only or full disk warns once
                if not self.notices.failed("store"):
                    self.notices.fail("store", exc, f"gradguard monitor: cannot write the run "
                                      f"store ({exc}); training continues")

    # -- flushing ---------------------------------------------------------------------------
    def flush(self, wait: bool = False) -> None:
        """Hand the buffered steps to the host side; ``wait`` for every write to finish."""
        try:
            b = self.buffers
            if b is not None and b.n > 0:
                payload = b.snapshot()
                if self._thread is not None and self._thread.is_alive() and not self.in_worker():
                    self.join()  # at most one snapshot in flight (the SIGKILL promise)
                    assert self._queue is not None
                    self._queue.put(payload)
                else:
                    self.process(payload)
            if wait:
                self.join()
        except Exception as exc:  # noqa: BLE001
            self.notices.fail("flush", exc)
        if wait and not self.in_worker():
            self.notices.deliver(allow_raise=False)

    def _start(self, warm: bool) -> None:
        self._queue = queue.Queue()
        self._thread = threading.Thread(target=self._worker, name="gradguard-monitor", daemon=True)
        self._thread.start()
        if warm:
            self._queue.put(_warm_up)

    def in_worker(self) -> bool:
        return threading.current_thread() is self._thread

    def _worker(self) -> None:
        assert self._queue is not None
        while True:
            payload = self._queue.get()
            try:
                if payload is None:
                    return
                if callable(payload):
                    payload()
                else:
                    self.process(payload)
            except Exception as exc:  # noqa: BLE001
                self.notices.fail("flush", exc)
            finally:
                self._queue.task_done()

    def join(self) -> None:
        if (self._queue is not None and self._thread is not None and self._thread.is_alive()
                and not self.in_worker()):
            self._queue.join()

    def process(self, payload: dict[str, Any]) -> None:
        """Host side of a flush: rules, rows, events, the store, the sinks."""
        for ev in payload["events"]:
            if ev is not None:
                ev.synchronize()
        lm = self.info.layer_map
        assert lm is not None
        names = lm.layers
        L = len(names)
        b = self.buffers
        assert b is not None
        columns = b.columns
        buf = payload["buf"].numpy().astype(np.float64)
        n = payload["n"]
        ring = payload["ring"].numpy()
        ring_steps = payload["ring_steps"]
        try:
            self.rules.run_deferred(buf, columns, ring, ring_steps, payload["step"])
        except Exception as exc:  # noqa: BLE001
            self.notices.fail("detectors", exc)
        col = {c: buf[:, j] for j, c in enumerate(columns)}
        lr = np.where(np.isnan(payload["lr"]), col["lr"], payload["lr"])
        steps = {
            "step": payload["step"], "time": payload["time"], "loss": col["loss"], "lr": lr,
            "lrs": group_lrs(payload),
            "total_norm": col["total_norm"], "total_norm_after": col["total_norm_after"],
            "clip_coef": col["clip_coef"], "threshold": col["threshold"],
            "clipped": col["clipped"] > 0.5, "skipped": col["skipped"] > 0.5,
            "nonfinite": col["nonfinite"] > 0.5, "loss_scale": col["loss_scale"],
            "rank": np.full(n, self.rank, dtype=np.int32),
        }
        lsteps = payload["lsteps"]
        lb = payload["lbuf"].numpy()
        nl = len(lsteps)
        layers = {
            "step": np.repeat(np.asarray(lsteps, dtype=np.int64), L),
            "layer": np.tile(np.asarray(names, dtype=object), nl),
            "grad_norm": lb[:, 0, :].reshape(-1), "grad_max_abs": lb[:, 1, :].reshape(-1),
            "nonfinite_count": np.nan_to_num(lb[:, 2, :].reshape(-1), nan=-1).astype(np.int64),
            "param_norm": lb[:, 3, :].reshape(-1), "update_ratio": lb[:, 4, :].reshape(-1),
            "rank": np.full(nl * L, self.rank, dtype=np.int32),
        }
        found = build_events(self.rules.detectors, steps, col, ring, ring_steps, names,
                             rank=self.rank, top_k=self.top_k, recorder_steps=self.recorder_steps,
                             dump_window=lambda s: self._dump_window(s, ring, ring_steps, names))
        for d, e in found:
            self.notices.event(d, e)
        batch = Batch(steps, layers, names, [e for _, e in found])
        self._store(batch)
        for s in self.sinks:
            self.safe_sink(s, "write", batch)

    def _dump_window(self, step: int, ring: np.ndarray, ring_steps: np.ndarray,
                     names: list[str]) -> str | None:
        w = self._claimed_writer()
        if w is None:
            return None
        import pyarrow as pa
        table = pa.table(window_columns(step, ring, ring_steps, names, self.recorder_steps))
        try:
            return w.write_window(step, table)
        except OSError as exc:
            self.notices.fail("store", exc)
            return None

    def _store(self, batch: Batch) -> None:
        w = self._claimed_writer()
        if w is None:
            return
        import pyarrow as pa

        from .store import LAYERS_SCHEMA, STEPS_SCHEMA, layer_column
        try:
            w.write_shard("steps", pa.table(batch.steps, schema=STEPS_SCHEMA))
            n = len(batch.layers["step"])
            if n:
                cols = {k: v.astype(np.float32) if v.dtype == np.float64 else v
                        for k, v in batch.layers.items()}
                cols["layer"] = layer_column(batch.layer_names, n // len(batch.layer_names))
                w.write_shard("layers", pa.table(cols, schema=LAYERS_SCHEMA))
            w.next_seq()
            w.append_events(batch.events)
        except OSError as exc:
            w.next_seq()
            self.notices.fail("store", exc)

    def safe_sink(self, sink: Any, method: str, *args: Any) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception as exc:  # noqa: BLE001
            self.notices.fail(f"sink {getattr(sink, 'name', type(sink).__name__)}", exc,
                              f"gradguard monitor: sink {type(sink).__name__}.{method}() failed "
                              f"({exc!r}); training continues")

    # -- the end ----------------------------------------------------------------------------
    def close(self) -> None:
        """Flush everything, stop the writer thread, close the sinks, finish the meta.
        Idempotent; never raises (it also runs from a finalizer and at interpreter exit)."""
        if self.closed:
            return
        try:
            self.flush(wait=True)
            self.closed = True
            self._claimed_writer()  # a run that recorded nothing still gets its meta
            t = self._thread
            if t is not None and t.is_alive() and not self.in_worker():
                assert self._queue is not None
                self._queue.put(None)
                t.join(timeout=60)
            for s in self.sinks:
                self.safe_sink(s, "close")
            self.info.finished = datetime.now(timezone.utc).isoformat()
            self.write_meta()
            close = getattr(self._writer, "close", None)
            if close is not None:
                close()
            if not self.in_worker():
                self.notices.deliver(allow_raise=False)
        except Exception:  # noqa: BLE001 - closing never raises into the user's program
            self.closed = True


def _warm_up() -> None:
    """Load what the first write needs (pyarrow builds tables through pandas, ~1 s to import)
    on the writer thread while training starts, so that the first flush takes milliseconds."""
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    from . import store  # noqa: F401


def close_quietly(flusher: Flusher) -> None:
    """The finalizer of a Monitor (garbage collection, interpreter exit): never raises."""
    try:
        flusher.close()
    except BaseException:  # noqa: BLE001
        pass

