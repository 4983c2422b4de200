"""The Monitor: per-step and per-layer gradient statistics, detectors and a flight recorder.

    with gg.Monitor("runs/exp1", layer_every=10, flush_every=100) as monitor:
        guard = gg.Guard(model, clipper=gg.NormClip(1.0), monitor=monitor)
        ...                            # an exception here still leaves every step on disk
    run = gg.load_run(monitor.run_dir) # .steps .layers .events .meta

What is recorded: every step one row of ``steps`` (loss, learning rate(s), total norm before
and after clipping, clip coefficient, threshold, clipped / skipped / non-finite flags, AMP
loss scale); every ``layer_every`` steps one row of ``layers`` per layer (``layer_stats``);
every step the per-layer gradient norms into the flight recorder, dumped around each event
(``buffers``, ``events``).

How, in parts (each module's docstring says more):

``buffers``      the step buffer, the layer buffer and the flight recorder on the device, and
                 the one row builder
``layer_stats``  the per-layer statistics of a layer step and the update-ratio snapshot
``rules``        the detector runner: skip rules in the step, the others at the flush
``flush``        snapshot, writer thread, events, run store, sinks, ``meta.json``
``notices``      failures and events delivered in the training thread as warnings,
                 callbacks or ``AnomalyError``, attributed to the user's line
``run_store``    the run-folder policy (``mode``)

Per step the Monitor makes no host read (on a GPU a few small kernels, on the CPU numpy
scalars read from the statistics without a copy); every ``flush_every`` steps the buffers go
to the host and a background thread writes them. Warnings, callbacks and ``"raise"`` actions
reach the training thread at the next ``record`` after that flush.

Durability: an exception leaving a ``with Monitor(...)`` (or ``with Guard(...)``) block, a
``close()``, garbage collection of an unclosed Monitor and interpreter exit all flush every
recorded step, event and flight-recorder window; a SIGKILL loses at most the steps of the
current flush interval and the one being written (see ``flush``).

Monitoring never takes training down: every failure gives one warning per source and a
note in ``meta["notes"]`` (also ``monitor.notes``). The only exception the Monitor raises
into training is :class:`AnomalyError`, for a rule whose action is ``"raise"``.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _xp
from .buffers import STEP_COLS, StepBuffer, step_row
from .detectors import Detector, default_detectors
from .flush import Batch, Flusher, RunInfo, close_quietly
from .layer_stats import LayerStats
from .layers import LayerMap
from .notices import Notices
from .rules import RuleRunner
from .run_store import MODES

__all__ = ["Batch", "Monitor"]


def _rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


class Monitor:
    """Gradient-health monitor: statistics, detectors, flight recorder, run store, sinks.

    Args:
        run_dir: folder of the run store, or None for no store (sinks only). Claimed at the
            first write; ``monitor.run_dir`` is the folder actually written.
        layer_every: per-layer statistics every this many steps (steps divisible by it).
        flush_every: copy the device buffers to the host and write every this many steps.
        recorder_steps: steps of full per-layer norms kept on the device (flight recorder).
        detectors: detector objects (default: one of each rule, action ``"warn"``); ``[]``
            for none.
        sinks: sink objects (``TensorBoardSink``, ``CSVSink``, ...) fed at every flush.
        name: run name in the meta (default: the folder name).
        config: anything JSON-serialisable to keep in ``meta["config"]``.
        top_k: layers named in each event.
        update_sample: elements per tensor sampled for the update ratio (None: all).
        warn_interval: seconds between two warnings of the same rule.
        async_flush: write on a background thread (default); False writes in ``record``.
        host_math: True (default): rules that cannot refuse a step run at each flush on the
            host copies, on numpy scalars, and ``skip`` rules in the step (as tensors on a
            GPU, numpy scalars on the CPU); False: every rule runs in the step as tensors.
        mode: ``"new"`` (default: a folder holding a run gets a fresh versioned sibling, with
            a warning naming it), ``"resume"`` or ``"overwrite"`` (see ``run_store``).
            ``load_state_dict`` before the first write turns ``"new"`` into ``"resume"``.
        _device_path: for tests: run the per-step path with tensor inputs and device cells
            even on the CPU, as it runs on a GPU (same results, slower).
    """

    def __init__(self, run_dir: str | os.PathLike | None = None, *, layer_every: int = 10,
                 flush_every: int = 100, recorder_steps: int = 64,
                 detectors: Sequence[Detector] | None = None, sinks: Iterable[Any] = (),
                 name: str | None = None, config: dict[str, Any] | None = None,
                 top_k: int = 5, update_sample: int | None = 4096, warn_interval: float = 60.0,
                 async_flush: bool = True, host_math: bool = True, mode: str = "new",
                 _device_path: bool = False):
        self.layer_every = _positive_int("layer_every", layer_every)
        self.flush_every = _positive_int("flush_every", flush_every)
        self.recorder_steps = _positive_int("recorder_steps", recorder_steps)
        self.top_k = _positive_int("top_k", top_k)
        if update_sample is not None and (isinstance(update_sample, bool)
                                          or not isinstance(update_sample, int) or update_sample < 1):
            raise ValueError(f"update_sample must be a positive int or None, got {update_sample!r}")
        if not isinstance(host_math, (bool, np.bool_)):
            raise ValueError(f"host_math must be True or False, got {host_math!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.host_math = bool(host_math)
        self.update_sample = update_sample
        self.async_flush = bool(async_flush)
        self._rules = RuleRunner(default_detectors() if detectors is None else detectors,
                                 self.host_math, host_inputs=not _device_path)
        self.detectors = self._rules.detectors
        self.can_skip = self._rules.can_skip
        self.sinks = list(sinks)
        path = None if run_dir is None else Path(run_dir)
        self.name = name or (path.name if path is not None else "run")
        self.rank, self.world = _rank_world()
        config = {"layer_every": layer_every, "flush_every": flush_every,
                  "recorder_steps": recorder_steps, "update_sample": update_sample,
                  "top_k": top_k, "detectors": [repr(d) for d in self.detectors],
                  "sinks": [type(s).__name__ for s in self.sinks], **dict(config or {})}
        self._info = RunInfo(self.name, config, self.world)
        self._notices = Notices(warn_interval)
        self._layers = LayerStats(layer_every, update_sample)
        self._flusher = Flusher(path, self.rank, mode, self.sinks, self._notices, self._rules,
                                self._info, top_k=top_k, recorder_steps=recorder_steps,
                                async_flush=self.async_flush)
        # flushes and closes an unclosed Monitor when it is collected or at interpreter exit;
        # holds the Flusher, never the Monitor (which stays collectable)
        self._finalizer = weakref.finalize(self, close_quietly, self._flusher)
        self.step = 0
        self._buf: StepBuffer | None = None

    # -- what the run is ------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path | None:
        """The run folder: the one written once claimed, else the one asked for."""
        return self._flusher.run_dir

    @property
    def notes(self) -> list[str]:
        """Failures noted so far (also in ``meta["notes"]``)."""
        return self._notices.notes

    @property
    def closed(self) -> bool:
        return self._flusher.closed

    @property
    def layer_map(self) -> LayerMap | None:
        return self._info.layer_map

    @property
    def params(self) -> list[Tensor] | None:
        return self._layers.params

    # -- the Guard's interface (``gradguard.protocols.Recorder``) ------------------------------
    def attach(self, names: list[str], params: list[Tensor]) -> None:
        """Name the parameters (``model.named_parameters()`` order, requiring grad)."""
        if len(names) != len(params):
            raise ValueError("attach: names and params differ in length")
        if self._buf is not None:
            self._flusher.flush(wait=True)  # rows recorded under the old names go first
        self._info.layer_map = LayerMap.from_names(list(names))
        self._layers.attach(params)
        self._buf = None
        self._flusher.write_meta()

    def check(self, total_norm: Tensor, loss: Any = None) -> Tensor:
        """Skip rule for the Guard: 0-d bool, True when a ``"skip"`` detector fires."""
        try:
            with np.errstate(all="ignore"):
                return self._rules.check(total_norm, loss)
        except Exception as exc:  # noqa: BLE001
            self._notices.fail("detectors", exc)
            self._rules.end_step()
            return torch.zeros((), dtype=torch.bool, device=total_norm.device)

    def observe(self, total_norm: Tensor, loss: Any, accept: Tensor) -> None:
        """Fold an accepted step into the detectors' baselines (flagged steps excluded)."""
        try:
            with np.errstate(all="ignore"):
                self._rules.observe(total_norm, loss, accept)
        except Exception as exc:  # noqa: BLE001
            self._notices.fail("detectors", exc)

    def wants_max_abs(self, step: int) -> bool:
        """True on layer steps: the Guard then hands over ``max |g|`` per tensor from its own
        norm pass (``ClipStats.per_tensor_max_abs``)."""
        return self._layers.wants_max_abs(step)

    def before_step(self, step: int | None = None) -> None:
        """Snapshot the sampled parameters on layer steps (for the update ratio)."""
        try:
            self._layers.before_step(self.step + 1 if step is None else int(step))
        except Exception as exc:  # noqa: BLE001
            self._notices.fail("record", exc)

    def record(self, stats: Any, step: int | None = None, loss: Any = None, lr: Any = None,
               loss_scale: Any = None, lrs: Any = None) -> None:
        """Record one step (``stats``: a ``ClipStats``); never raises except AnomalyError.

        ``lr``: the learning rate to plot (the first param group's); ``lrs``: every param
        group's, in order (stored as the ``lrs`` column when there are several). Numbers or
        tensors; a device tensor is copied on the device and read at the flush."""
        self._notices.deliver()
        if self.closed:
            return
        try:
            with torch.no_grad(), np.errstate(all="ignore"):  # inf - inf is NaN, as in torch
                self._record(stats, step, loss, lr, loss_scale, lrs)
        except Exception as exc:  # noqa: BLE001
            self._notices.fail("record", exc)
        finally:
            self._rules.end_step()

    def _buffers(self, stats: Any) -> StepBuffer:
        buf = self._buf
        dev = stats.total_norm.device
        if buf is None or buf.device != dev:
            if self._info.layer_map is None:  # standalone use: one layer per tensor
                n = stats.per_tensor_norms.numel()
                self._info.layer_map = LayerMap.from_names([f"param{i}" for i in range(n)])
                self._flusher.write_meta()
            buf = StepBuffer(dev, list(STEP_COLS) + self._rules.columns + ["has_loss"],
                             self.flush_every, self.layer_every, self.recorder_steps,
                             self._info.layer_map, host=self._rules.on_host(stats.total_norm))
            self._flusher.flush(wait=True)  # rows of another device go first
            self._buf = self._flusher.buffers = buf
        return buf

    def _record(self, stats: Any, step: int | None, loss: Any, lr: Any, loss_scale: Any,
                lrs: Any = None) -> None:
        buf = self._buffers(stats)
        self.step = s = self.step + 1 if step is None else int(step)
        rules, cells = self._rules, buf.cells
        total = stats.total_norm
        _, tn_h, loss_h = rules.inputs(total, loss)
        skipped = stats.skipped if getattr(stats, "skipped", None) is not None \
            else torch.zeros_like(stats.nonfinite)
        if buf.host:
            accept: Any = ~np.bool_(_xp.host_value(stats.nonfinite) | _xp.host_value(skipped))
        else:
            accept = ~stats.nonfinite & ~skipped
        rules.observe(total, loss, accept)
        # per-layer norms of this step, from the per-tensor norms (no read of the gradients)
        mask = self._layers.grad_mask(stats.per_tensor_norms.numel())
        lnorm = buf.layer_norms(s, stats.per_tensor_norms, mask)
        det = rules.cells(total, loss, lnorm, accept, buf.host, cells.nan)
        if buf.host:
            row = step_row(cells, stats, tn_h, loss_h, skipped, lr, loss_scale, det)
        else:
            row = step_row(cells, stats, total, rules.loss_t(total, loss), skipped, lr,
                           loss_scale, det)
        buf.put(row, s, time.time(), lr, lrs)
        if self._layers.is_layer_step(s):
            out = buf.layer_slot(s)
            if out is not None:  # more layer steps than planned in one interval: dropped
                self._layers.fill(out, s, lnorm, buf.layer_map, mask,
                                  getattr(stats, "per_tensor_max_abs", None))
        if buf.full:
            self._flusher.flush()

    # -- flushing, state, the end ---------------------------------------------------------------
    def flush(self, wait: bool = False) -> None:
        """Hand the buffered steps to the host side now; ``wait`` for the writes to finish."""
        self._flusher.flush(wait)

    def state_dict(self) -> dict[str, Any]:
        """Step counter and detector states. Flushes first (the rules that run at the flush
        then hold every recorded step) and waits for it: call at checkpoints only."""
        self.flush(wait=True)
        return {"step": self.step, "detectors": self._rules.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume from ``sd``: the detectors' states and the step counter; the run folder
        continues from that step (rows of later steps are superseded, not duplicated)."""
        self.flush(wait=True)  # buffered steps belong to the state being replaced
        self.step = int(sd.get("step", 0))
        self._rules.load_state_dict(sd.get("detectors", []))
        self._flusher.resume(self.step)

    def close(self) -> None:
        """Flush everything, stop the writer thread, close the sinks, finish the meta."""
        self._finalizer()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Monitor({str(self.run_dir)!r}, layer_every={self.layer_every}, "
                f"flush_every={self.flush_every}, recorder_steps={self.recorder_steps})")

