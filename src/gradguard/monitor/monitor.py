"""The Monitor: per-step and per-layer gradient statistics, detectors and a flight recorder.

    monitor = gg.Monitor("runs/exp1", layer_every=10, flush_every=100)
    guard = gg.Guard(model, clipper=gg.NormClip(1.0), monitor=monitor)
    ...
    guard.close()                      # flushes, closes the sinks
    run = gg.load_run("runs/exp1")     # .steps .layers .events .meta

What is recorded
----------------
Every step (one row of ``steps``): loss, learning rate, total norm before and after
clipping, clip coefficient, threshold, clipped / skipped / non-finite flags, AMP loss scale.

Every ``layer_every`` steps, per layer (parameters grouped by module path, see
``gradguard.monitor.layers``), one row of ``layers``:

* ``grad_norm``: ``||g_l||_2`` before clipping, from the Guard's per-tensor norms (no extra
  read of the gradients);
* ``grad_max_abs``: ``max |g|`` over the layer's gradient elements before clipping, like
  ``grad_norm``: under a Guard it comes out of the Guard's own norm pass on layer steps
  (``ClipStats.per_tensor_max_abs``; on the CPU the same read of memory); used alone,
  ``record`` reads the gradients as they are when it is called;
* ``nonfinite_count``: NaN/Inf elements (counted only in tensors whose norm is not finite:
  a finite norm proves the count is 0); -1 when the parameters are unknown (standalone use);
* ``param_norm``: ``||w_l||_2`` after the step;
* ``update_ratio``: ``||w_l(t) - w_l(t-1)||_2 / ||w_l(t-1)||_2`` over a fixed sample of at
  most ``update_sample`` elements per tensor (``gradguard.monitor.update_sample``); exact when
  ``update_sample=None``. Karpathy's rule of thumb: ~1e-3 is healthy.

Flight recorder: the per-layer gradient norms of every step, ``recorder_steps`` of them, stay
in a ring buffer on the device; when a detector fires, the ``recorder_steps`` steps up to and
including the event's are written to ``window-r{rank}-step{step:08d}.parquet``.

Cost and synchronisation
------------------------
Per step the Monitor launches a few small kernels and makes **no host read**: the row of
statistics goes into a device buffer, ``skip`` rules run on the device. Every
``flush_every`` steps the buffers are copied to the host (non-blocking into pinned memory
on CUDA, with an event) and a background thread turns them into Parquet shards, events and
sink writes. Warnings, callbacks and ``"raise"`` actions reach the training thread at the
next ``record`` after that (``flush_every=1`` for immediate delivery, at one host read per
step). A detector with ``action="skip"`` decides on the device in the step itself, through
the Guard (``Monitor.check``).

Rules that cannot refuse a step (actions ``warn``, ``callback``, ``raise``) produce events
at the flush in any case, so by default (``host_math=None``) they run there, on the host, on
numpy scalars (``_xp``), over the buffered rows (``_run_deferred``: the same calls in the same
order as step by step), whatever the device: a step then costs a buffer row and a
flight-recorder row, not a hundred tiny kernels (or, on the CPU, torch operations at 5-30 us
each right after the clip has streamed the gradients through the caches). ``skip`` rules run
in the step: as kernels on a GPU, on numpy scalars on the CPU. ``state_dict()`` flushes first
so that a checkpoint holds every recorded step. ``host_math=False`` runs every rule in the
step as torch tensors (the behaviour before).

Per-layer statistics on a layer step read the parameters once (``param_norm``); ``max |g|``
comes with the Guard's norm pass (``wants_max_abs``); see ``docs/performance.md``.

Monitoring never takes training down: every failure (disk full, read-only folder, a sink
that raises, a callback that raises) gives one warning per source and a note in
``meta.json`` (``meta["notes"]``, also ``monitor.notes``), and training continues. The only
exception the Monitor raises into training is :class:`AnomalyError`, for a rule whose action
is ``"raise"``.
"""

from __future__ import annotations

import math
import os
import platform
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..norms import _max_abs, per_tensor_norms
from . import _xp
from .detectors import AnomalyError, Detector, StepDetector, Vanishing, default_detectors
from .layers import LayerMap, layer_l2, layer_l2_host, layer_max, layer_sum
from .update_sample import UpdateSample

STEP_COLS = ("loss", "lr", "total_norm", "total_norm_after", "clip_coef", "threshold",
             "clipped", "skipped", "nonfinite", "loss_scale")
LAYER_STATS = ("grad_norm", "grad_max_abs", "nonfinite_count", "param_norm", "update_ratio")


def _versions() -> dict[str, str]:
    from .. import __version__
    return {"gradguard": __version__, "torch": torch.__version__,
            "python": platform.python_version()}




def _rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class _Batch:
    """What one flush hands to the host side: numpy columns, layer rows, events."""

    def __init__(self, steps: dict[str, np.ndarray], layers: dict[str, np.ndarray],
                 layer_names: list[str], events: list[dict[str, Any]]):
        self.steps = steps
        self.layers = layers
        self.layer_names = layer_names
        self.events = events


class Monitor:
    """Gradient-health monitor: statistics, detectors, flight recorder, run store, sinks.

    Args:
        run_dir: folder of the run store (created), or None for no store (sinks only).
        layer_every: per-layer statistics every this many steps (steps divisible by it).
        flush_every: copy the device buffers to the host and write every this many steps.
        recorder_steps: steps of full per-layer norms kept on the device (flight recorder).
        detectors: detector objects (default: one of each rule, action ``"warn"``); ``[]``
            for none.
        sinks: sink objects (``TensorBoardSink``, ``CSVSink``, ``WandbSink``,
            ``MLflowSink``, ``NeptuneSink``) fed at every flush.
        name: run name in the meta (default: the folder name).
        config: anything JSON-serialisable to keep in ``meta["config"]``.
        top_k: layers named in each event.
        update_sample: elements per tensor sampled for the update ratio (None: all).
        warn_interval: seconds between two warnings of the same rule.
        async_flush: write on a background thread (default); False writes in ``record``.
        host_math: None (default): rules that cannot refuse a step run at each flush on
            the host copies, on numpy scalars, and ``skip`` rules run in the step (as tensors
            on a GPU, on numpy scalars on the CPU, where reading a tensor waits for nothing);
            False: every rule runs in the step as torch tensors. True is the same as None.
    """

    def __init__(self, run_dir: str | os.PathLike | None = None, *, layer_every: int = 10,
                 flush_every: int = 100, recorder_steps: int = 64,
                 detectors: Sequence[Detector] | None = None, sinks: Iterable[Any] = (),
                 name: str | None = None, config: dict[str, Any] | None = None,
                 top_k: int = 5, update_sample: int | None = 4096, warn_interval: float = 60.0,
                 async_flush: bool = True, host_math: bool | None = None):
        for arg, v in (("layer_every", layer_every), ("flush_every", flush_every),
                       ("recorder_steps", recorder_steps), ("top_k", top_k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        if update_sample is not None and (not isinstance(update_sample, int) or update_sample < 1):
            raise ValueError(f"update_sample must be a positive int or None, got {update_sample!r}")
        if host_math not in (None, True, False):
            raise ValueError(f"host_math must be None, True or False, got {host_math!r}")
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.layer_every = layer_every
        self.flush_every = flush_every
        self.recorder_steps = recorder_steps
        self.detectors: list[Detector] = list(default_detectors() if detectors is None else detectors)
        for d in self.detectors:
            if not isinstance(d, Detector):
                raise TypeError(f"detectors: {d!r} is not a gradguard Detector")
        self.step_detectors = [d for d in self.detectors if isinstance(d, StepDetector)]
        self.layer_detectors = [d for d in self.detectors if isinstance(d, Vanishing)]
        # Rules that cannot refuse a step run at each flush on the host over the buffered rows
        # (``_run_deferred``): the same calls in the same order, warm; their events come at
        # the flush anyway.
        col = {id(d): len(STEP_COLS) + 3 * k for k, d in enumerate(self.detectors)}
        self._host_now = [d for d in self.step_detectors if d.action == "skip" or not d.host_math]
        self._host_later = [(col[id(d)], d) for d in self.step_detectors
                            if d.action != "skip" and d.host_math]
        self._host_later_layers = [(col[id(d)], d) for d in self.layer_detectors if d.host_math]
        self.sinks = list(sinks)
        self.top_k = top_k
        self.update_sample = update_sample
        self.warn_interval = float(warn_interval)
        self.async_flush = bool(async_flush)
        self.host_math = host_math
        self.name = name or (self.run_dir.name if self.run_dir is not None else "run")
        self.user_config = dict(config or {})
        self.rank, self.world = _rank_world()
        self.notes: list[str] = []
        self.can_skip = any(d.action == "skip" for d in self.step_detectors)
        self.closed = False
        self.started = datetime.now(timezone.utc).isoformat()

        self.layer_map: LayerMap | None = None
        self.params: list[Tensor] | None = None
        self.step = 0
        self._dev: torch.device | None = None
        self._cols = list(STEP_COLS) + [f"{d.rule}#{i}:{k}" for i, d in enumerate(self.detectors)
                                        for k in ("fired", "value", "baseline")] + ["has_loss"]
        self._pending: tuple[int, list[tuple[Tensor, Tensor, Tensor]]] | None = None
        self._observed = False
        self._host_rows = False
        self._host_ok = True  # tests set False: a CPU run takes the per-step path of a GPU
        self._inputs_cache: tuple | None = None
        self._snap: tuple[Tensor | None, Tensor | None] | None = None
        self._update_sample: UpdateSample | None = None
        self._snap_step = -1
        self._failed: set[str] = set()
        self._deliveries: deque[tuple[str, Any]] = deque()
        self._delivering = False
        self._last_warn: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._meta_lock = threading.Lock()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._writer = None
        self._layer_names_meta: list[str] = []
        if self.run_dir is not None:
            try:
                from .store import RunWriter
                self._writer = RunWriter(self.run_dir, self.rank)
            except OSError as exc:
                self._fail("store", exc, f"cannot create the run folder {self.run_dir}: {exc}; "
                           "the run store is off, sinks still get the statistics")
        self._write_meta()
        for s in self.sinks:
            self._safe_sink(s, "open", self._meta())

    # -- Guard interface ---------------------------------------------------------------------
    def attach(self, names: list[str], params: list[Tensor]) -> None:
        """Name the parameters (``model.named_parameters()`` order, requiring grad)."""
        if len(names) != len(params):
            raise ValueError("attach: names and params differ in length")
        self.layer_map = LayerMap.from_names(list(names))
        self.params = list(params)
        self._update_sample = None
        self._dev = None
        self._write_meta()

    def check(self, total_norm: Tensor, loss: Any = None) -> Tensor:
        """Skip rule for the Guard: 0-d bool, True when a ``"skip"`` detector fires."""
        try:
            with np.errstate(all="ignore"):
                results = self._evaluate(total_norm, loss)
            self._pending = (id(total_norm), results)
            host = self._on_host(total_norm)
            skip: Any = np.bool_(False) if host else torch.zeros(
                (), dtype=torch.bool, device=total_norm.device)
            for d, (fired, _, _) in zip(self._now(total_norm), results):
                if d.action == "skip":
                    skip = skip | (_xp.host_value(fired) if host else fired)
            return torch.from_numpy(np.array(skip)) if host else skip
        except Exception as exc:  # noqa: BLE001
            self._fail("detectors", exc)
            self._pending = None
            return torch.zeros((), dtype=torch.bool, device=total_norm.device)

    def observe(self, total_norm: Tensor, loss: Any, accept: Tensor) -> None:
        """Fold an accepted step into the detectors' baselines (flagged steps excluded)."""
        try:
            if self._pending is None:
                self.check(total_norm, loss)
            with np.errstate(all="ignore"):
                self._update(total_norm, loss, accept)
            self._observed = True
        except Exception as exc:  # noqa: BLE001
            self._fail("detectors", exc)

    # -- the step detectors' inputs: torch tensors, or numpy on the host -------------------------
    def _on_host(self, t: Tensor) -> bool:
        return t.is_cpu and self.host_math is not False and self._host_ok

    def _inputs(self, total_norm: Tensor, loss: Any) -> list:
        """``[loss_t, total_norm_h, loss_h]`` of this step, built once: on the host the norm
        and the loss as float32 numpy scalars (``loss_t``, the 0-d loss tensor, is then made
        only if something asks for it, see ``_loss_t``); elsewhere the loss tensor on the
        norm's device. The same objects go to a detector's ``evaluate`` and ``update`` (they
        cache work by identity)."""
        c = self._inputs_cache
        if c is not None and c[0] is total_norm and c[1] is loss:
            return c[2]
        if self._on_host(total_norm):
            out = [None, np.float32(_xp.host_value(total_norm)), self._loss_host(loss)]
        else:
            out = [self._loss_tensor(loss, total_norm.device), None, None]
        self._inputs_cache = (total_norm, loss, out)
        return out

    def _loss_t(self, total_norm: Tensor, loss: Any) -> Tensor | None:
        inp = self._inputs(total_norm, loss)
        if inp[0] is None and loss is not None:
            inp[0] = self._loss_tensor(loss, total_norm.device)
        return inp[0]

    @staticmethod
    def _loss_host(loss: Any) -> np.float32 | None:
        if loss is None:
            return None
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                loss = loss.detach().float().mean()
            a = _xp.host_value(loss)
            return np.float32(a.reshape(-1)[0] if isinstance(a, np.ndarray) else a)
        return np.float32(float(loss))

    def _args(self, d: Detector, total_norm: Tensor, loss: Any) -> tuple[Any, Any]:
        _, tn_h, loss_h = self._inputs(total_norm, loss)
        if tn_h is not None and d.host_math:
            return tn_h, loss_h
        return total_norm, self._loss_t(total_norm, loss)

    def _now(self, total_norm: Tensor) -> list[Detector]:
        """The step rules evaluated during the step: those that may refuse it (or do their own
        torch arithmetic); all of them with ``host_math=False``. The rest run at the flush."""
        return self.step_detectors if self.host_math is False else self._host_now

    def _evaluate(self, total_norm: Tensor, loss: Any) -> list:
        return [d.evaluate(*self._args(d, total_norm, loss)) for d in self._now(total_norm)]

    def _update(self, total_norm: Tensor, loss: Any, accept: Any) -> None:
        """Each step detector's ``update``, ``accept`` handed over as it takes its inputs."""
        assert self._pending is not None
        acc_h = acc_t = None
        for d, (fired, _, _) in zip(self._now(total_norm), self._pending[1]):
            args = self._args(d, total_norm, loss)
            if isinstance(args[0], Tensor):
                if acc_t is None:
                    acc_t = accept if isinstance(accept, Tensor) else torch.from_numpy(np.array(accept))
                d.update(*args, acc_t, fired)
            else:
                if acc_h is None:
                    acc_h = np.bool_(_xp.host_value(accept))
                d.update(*args, acc_h, fired)

    def before_step(self, step: int | None = None) -> None:
        """Snapshot the sampled parameters on layer steps (for the update ratio)."""
        try:
            s = self.step + 1 if step is None else int(step)
            if self.params is not None and s % self.layer_every == 0:
                with torch.no_grad():
                    self._snap = self._sample().take()
                self._snap_step = s
        except Exception as exc:  # noqa: BLE001
            self._fail("record", exc)

    def record(self, stats: Any, step: int | None = None, loss: Any = None, lr: Any = None,
               loss_scale: Any = None) -> None:
        """Record one step (``stats``: a ``ClipStats``); never raises except AnomalyError."""
        self._deliver()
        if self.closed:
            return
        try:
            with torch.no_grad(), np.errstate(all="ignore"):  # inf - inf is NaN, as in torch
                self._record(stats, step, loss, lr, loss_scale)
        except Exception as exc:  # noqa: BLE001
            self._fail("record", exc)
        finally:
            self._pending = None
            self._observed = False
            self._inputs_cache = None

    # -- the per-step work ------------------------------------------------------------------
    def _loss_tensor(self, loss: Any, device: torch.device) -> Tensor | None:
        if loss is None:
            return None
        if isinstance(loss, Tensor):
            t = loss.detach()
            if t.numel() != 1:
                t = t.float().mean()
            t = t.reshape(())
            return t.to(device, non_blocking=True) if t.device != device else t
        return torch.full((), float(loss), dtype=torch.float32, device=device)

    def _scalar(self, x: Any, device: torch.device) -> Tensor:
        if x is None:
            return self._nan
        if isinstance(x, Tensor):
            t = x.detach().reshape(-1)[0] if x.numel() else self._nan
            return t.to(device, torch.float32, non_blocking=True)
        return torch.full((), float(x), dtype=torch.float32, device=device)

    def _setup(self, stats: Any) -> None:
        dev = stats.total_norm.device
        n = stats.per_tensor_norms.numel()
        if self.layer_map is None:
            self.layer_map = LayerMap.from_names([f"param{i}" for i in range(n)])
            self._write_meta()
        L = self.layer_map.n_layers
        F, R = self.flush_every, self.recorder_steps
        self._dev = dev
        self._nan = torch.full((), math.nan, dtype=torch.float32, device=dev)
        self._buf = torch.full((F, len(self._cols)), math.nan, dtype=torch.float32, device=dev)
        self._host_step = np.zeros(F, dtype=np.int64)
        self._host_time = np.zeros(F, dtype=np.float64)
        self._host_lr = np.full(F, math.nan, dtype=np.float64)
        self._n = 0
        self._nl_cap = F // self.layer_every + 2
        self._lbuf = torch.full((self._nl_cap, len(LAYER_STATS), L), math.nan, dtype=torch.float64, device=dev)
        self._lsteps: list[int] = []
        self._ring_cap = R + F
        self._ring = torch.full((self._ring_cap, L), math.nan, dtype=torch.float32, device=dev)
        self._ring_steps = np.full(self._ring_cap, -1, dtype=np.int64)
        self._ring_pos = 0
        self._host_rows = self._on_host(stats.total_norm)
        if self._host_rows:  # numpy views of the CPU buffers: rows written without torch ops
            self._buf_h = self._buf.numpy()
            self._ring_h = self._ring.numpy()
        self._true = torch.ones((), dtype=torch.bool, device=dev)
        self._false = torch.zeros((), dtype=torch.bool, device=dev)

    def _record(self, stats, step, loss, lr, loss_scale) -> None:
        if self._dev is None or self._dev != stats.total_norm.device:
            self._setup(stats)
        dev = self._dev
        host = self._host_rows
        self.step = self.step + 1 if step is None else int(step)
        s = self.step
        total = stats.total_norm
        self._inputs(total, loss)
        if self._pending is None:
            self._pending = (id(total), self._evaluate(total, loss))
        results = self._pending[1]
        skipped = stats.skipped if getattr(stats, "skipped", None) is not None else torch.zeros_like(stats.nonfinite)
        if host:
            accept: Any = ~np.bool_(_xp.host_value(stats.nonfinite) | _xp.host_value(skipped))
        else:
            accept = ~stats.nonfinite & ~skipped
        if not self._observed:
            self._update(total, loss, accept)

        # per-layer norms of this step, from the per-tensor norms (no read of the gradients)
        assert self.layer_map is not None
        L = self.layer_map.n_layers
        mask = self._grad_mask(stats.per_tensor_norms.numel())
        idx = self.layer_map.device_index(dev, mask)
        slot_r = self._ring_pos % self._ring_cap
        if host:
            lnorm_h = layer_l2_host(_xp.host_value(stats.per_tensor_norms),
                                    self.layer_map.host_index(mask), L)
            self._ring_h[slot_r] = lnorm_h
            lnorm = torch.from_numpy(lnorm_h)  # shares the memory: no copy
        else:
            lnorm = layer_l2(stats.per_tensor_norms, idx, L)
            self._ring[slot_r].copy_(lnorm)
        self._ring_steps[slot_r] = s
        self._ring_pos += 1

        i = self._n
        det_vals: dict[int, tuple[Any, Any, Any]] = {}
        for d, r in zip(self._now(total), results):
            det_vals[id(d)] = r
        if self.host_math is not False:
            later = (math.nan, math.nan, math.nan) if host else (self._nan, self._nan, self._nan)
            for _, d in self._host_later:  # filled in at the flush by _run_deferred
                det_vals[id(d)] = later
            for _, d in self._host_later_layers:
                det_vals[id(d)] = later
        for d in self.layer_detectors:
            if id(d) in det_vals:
                continue
            acc_t = torch.from_numpy(np.array(accept)) if host else accept
            fired, value, base, _ = d.evaluate_layers(lnorm, acc_t)
            det_vals[id(d)] = (fired, value, base)

        thr = getattr(stats, "threshold", None)
        if host:
            self._buf_h[i] = self._host_row(stats, thr, skipped, lr, loss_scale, det_vals)
        else:
            f32 = torch.float32
            loss_t = self._loss_t(total, loss)
            row = [
                self._nan if loss_t is None else loss_t,
                lr.detach().reshape(-1)[0].to(dev, f32) if isinstance(lr, Tensor) else self._nan,
                total, stats.total_norm_after, stats.clip_coef,
                self._nan if thr is None else thr.to(dev),
                stats.clipped, skipped, stats.nonfinite,
                self._scalar(loss_scale, dev),
            ]
            for d in self.detectors:
                row += det_vals[id(d)]
            row.append(self._false if loss is None else self._true)
            # one stack into the buffer row; it promotes bool / float64 entries to float32 itself
            torch.stack(row, out=self._buf[i])
        self._host_step[i] = s
        self._host_time[i] = time.time()
        self._host_lr[i] = float(lr) if (lr is not None and not isinstance(lr, Tensor)) else math.nan
        self._n += 1

        if s % self.layer_every == 0:
            self._layer_stats(s, lnorm, mask, idx, getattr(stats, "per_tensor_max_abs", None))
        if self._n >= self.flush_every:
            self.flush()

    def _host_row(self, stats, thr, skipped, lr, loss_scale, det_vals) -> list:
        """The buffer row of ``_record``'s torch branch, from numpy views of CPU tensors."""
        hv = _xp.host_value
        _, tn, loss = self._inputs_cache[2]  # type: ignore[index]
        coef = hv(stats.clip_coef)

        def scalar(x):
            if x is None:
                return math.nan
            if isinstance(x, Tensor):
                return hv(x.reshape(-1)[0]) if x.numel() else math.nan
            return float(x)

        row = [math.nan if loss is None else loss,
               hv(lr.reshape(-1)[0]) if isinstance(lr, Tensor) else math.nan,
               tn, tn * coef, coef, math.nan if thr is None else hv(thr),
               hv(stats.clipped), hv(skipped), hv(stats.nonfinite), scalar(loss_scale)]
        for d in self.detectors:
            row += [hv(v) for v in det_vals[id(d)]]
        row.append(loss is not None)
        return row

    def _grad_mask(self, n: int) -> tuple[bool, ...] | None:
        if self.params is None or n == len(self.params):
            # every attached parameter has its norm: no need to look at 100s of .grad fields
            return None
        mask = tuple(p.grad is not None for p in self.params)
        if all(mask):
            mask = None
        count = len(self.params) if mask is None else sum(mask)
        if count != n:
            raise ValueError(f"per_tensor_norms has {n} entries, {count} attached parameters "
                             "have a gradient")
        return mask

    def _sample(self) -> UpdateSample:
        assert self.params is not None
        if self._update_sample is None:
            self._update_sample = UpdateSample(self.params, self.update_sample)
        return self._update_sample

    def wants_max_abs(self, step: int) -> bool:
        """True when ``step`` is a layer step: the Guard then hands over ``max |g|`` per
        tensor from its own norm pass (``ClipStats.per_tensor_max_abs``)."""
        return self.params is not None and step % self.layer_every == 0

    def _layer_stats(self, s: int, lnorm: Tensor, mask, idx: Tensor,
                     given_max: Tensor | None = None) -> None:
        assert self.layer_map is not None
        L = self.layer_map.n_layers
        dev = lnorm.device
        slot = len(self._lsteps)
        if slot >= self._nl_cap:  # more layer steps than planned in one flush interval
            return
        out = self._lbuf[slot]
        out[0].copy_(lnorm)
        if self.params is None:
            out[1:].fill_(math.nan)
            out[2].fill_(-1)
        else:
            params = self.params if mask is None else [p for p, m in zip(self.params, mask) if m]
            grads = [p.grad for p in params]
            if given_max is not None and given_max.numel() == len(grads):
                per_max = given_max.to(dev, torch.float32)
            elif grads:
                per_max = _max_abs(grads).to(dev)
            else:
                per_max = torch.zeros(0, dtype=torch.float32, device=dev)
            if dev.type == "cpu":
                # a CPU tensor is read without waiting for anything: count only where needed
                counts = torch.zeros(len(grads), dtype=torch.int64)
                for j in np.flatnonzero(~np.isfinite(per_max.numpy())):
                    counts[j] = torch.count_nonzero(~torch.isfinite(grads[j]))
            elif grads:
                counts = torch.stack([torch.count_nonzero(~torch.isfinite(g)) for g in grads])
            else:
                counts = torch.zeros(0, dtype=torch.int64, device=dev)
            out[1].copy_(layer_max(per_max, idx, L))
            out[2].copy_(layer_sum(counts, idx, L, torch.float64))
            full_idx = self.layer_map.device_index(dev, None)
            pn = per_tensor_norms([p.detach() for p in self.params])
            out[3].copy_(layer_l2(pn.to(dev), full_idx, L))
            if self._snap is not None and self._snap_step == s:
                sample = self._sample()
                num = layer_sum(sample.change_sumsq(self._snap).to(dev), full_idx, L, torch.float64).sqrt()
                den = layer_sum(sample.sumsq(self._snap).to(dev), full_idx, L, torch.float64).sqrt()
                out[4].copy_(torch.where(den > 0, num / torch.where(den > 0, den, 1.0),
                                         torch.full_like(den, math.nan)))
            else:
                out[4].fill_(math.nan)
            self._snap = None
        self._lsteps.append(s)

    # -- flushing ----------------------------------------------------------------------------
    def flush(self, wait: bool = False) -> None:
        """Hand the buffered steps to the host side now; ``wait`` for the writes to finish."""
        try:
            if self._dev is not None and self._n > 0:
                payload = self._snapshot()
                if self.async_flush:
                    self._submit(payload)
                else:
                    self._process(payload)
            if wait:
                self._join()
        except Exception as exc:  # noqa: BLE001
            self._fail("flush", exc)
        if wait:
            self._deliver(allow_raise=False)

    def _run_deferred(self, buf: np.ndarray, ring: np.ndarray, ring_steps: np.ndarray,
                      steps: np.ndarray) -> None:
        """The rules that cannot refuse a step, over one flush's rows (host copies), in step
        order: each rule's ``evaluate`` then ``update`` per step, on numpy scalars, with the
        inputs it had in the step (total norm, loss, accepted = neither skipped nor
        non-finite; per-layer norms from the flight recorder); ``(fired, value, baseline)``
        are written into ``buf``."""
        later, layers = self._host_later, self._host_later_layers
        if self.host_math is False or not (later or layers):
            return
        j = {c: k for k, c in enumerate(self._cols)}
        tn_c, loss_c, has_c = j["total_norm"], j["loss"], j["has_loss"]
        sk_c, nf_c = j["skipped"], j["nonfinite"]
        where = {int(st): k for k, st in enumerate(ring_steps)} if layers else {}
        try:
            with np.errstate(all="ignore"):
                for i in range(buf.shape[0]):
                    row = buf[i]
                    tn = np.float32(row[tn_c])
                    loss = np.float32(row[loss_c]) if row[has_c] > 0.5 else None
                    acc = np.bool_(not (row[sk_c] > 0.5 or row[nf_c] > 0.5))
                    for c, d in later:
                        fired, value, base = d.evaluate(tn, loss)
                        d.update(tn, loss, acc, fired)
                        row[c], row[c + 1], row[c + 2] = fired, value, base
                    k = where.get(int(steps[i]))
                    if k is not None:
                        for c, d in layers:
                            fired, value, base, _ = d.evaluate_layers(ring[k], acc)
                            row[c], row[c + 1], row[c + 2] = fired, value, base
        except Exception as exc:  # noqa: BLE001
            self._fail("detectors", exc)

    def _copy_host(self, t: Tensor) -> tuple[Tensor, Any]:
        if t.device.type == "cuda":
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            return h, ev
        return t.detach().to("cpu", copy=True), None

    def _snapshot(self) -> dict[str, Any]:
        n, nl = self._n, len(self._lsteps)
        buf, ev1 = self._copy_host(self._buf[:n])
        lbuf, ev2 = self._copy_host(self._lbuf[:nl])
        ring, ev3 = self._copy_host(self._ring)
        payload = {
            "n": n, "buf": buf, "lbuf": lbuf, "ring": ring, "events": [ev1, ev2, ev3],
            "step": self._host_step[:n].copy(), "time": self._host_time[:n].copy(),
            "lr": self._host_lr[:n].copy(), "lsteps": list(self._lsteps),
            "ring_steps": self._ring_steps.copy(),
        }
        self._n = 0
        self._lsteps = []
        return payload

    def _submit(self, payload: dict[str, Any]) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._queue = queue.Queue()
            self._thread = threading.Thread(target=self._worker, name="gradguard-monitor", daemon=True)
            self._thread.start()
        assert self._queue is not None
        self._queue.put(payload)

    def _worker(self) -> None:
        assert self._queue is not None
        while True:
            payload = self._queue.get()
            try:
                if payload is None:
                    return
                self._process(payload)
            except Exception as exc:  # noqa: BLE001
                self._fail("flush", exc)
            finally:
                self._queue.task_done()

    def _join(self) -> None:
        if self._queue is not None and self._thread is not None and self._thread.is_alive():
            self._queue.join()

    def _process(self, payload: dict[str, Any]) -> None:
        """Host side of a flush: build rows and events, write the store, feed the sinks."""
        for ev in payload["events"]:
            if ev is not None:
                ev.synchronize()
        assert self.layer_map is not None
        names = self.layer_map.layers
        L = len(names)
        buf = payload["buf"].numpy().astype(np.float64)
        n = payload["n"]
        ring = payload["ring"].numpy()
        ring_steps = payload["ring_steps"]
        self._run_deferred(buf, ring, ring_steps, payload["step"])
        col = {c: buf[:, j] for j, c in enumerate(self._cols)}
        lr = np.where(np.isnan(payload["lr"]), col["lr"], payload["lr"])
        steps = {
            "step": payload["step"], "time": payload["time"], "loss": col["loss"], "lr": lr,
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
        events = self._events(steps, col, ring, ring_steps, names)
        batch = _Batch(steps, layers, names, events)
        self._store(batch)
        for s in self.sinks:
            self._safe_sink(s, "write", batch)

    def _events(self, steps, col, ring, ring_steps, names) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        windows: dict[int, str | None] = {}
        for i, d in enumerate(self.detectors):
            key = f"{d.rule}#{i}"
            fired = np.flatnonzero(col[f"{key}:fired"] > 0.5)
            for r in fired:
                step = int(steps["step"][r])
                value, base = float(col[f"{key}:value"][r]), float(col[f"{key}:baseline"][r])
                top, first_bad = self._localise(step, ring, ring_steps, names, d.rule == "vanishing")
                if step not in windows:
                    windows[step] = self._dump_window(step, ring, ring_steps, names)
                skipped = bool(steps["skipped"][r])
                action = d.action
                msg = f"step {step}: {d.rule} (value {value:.4g}, baseline {base:.4g})"
                if top:
                    msg += "; top layers " + ", ".join(f"{t['layer']} ({t['ratio']:.3g}x)" for t in top[:3])
                if first_bad is not None:
                    msg += f"; first non-finite layer {first_bad}"
                if action == "skip":
                    msg += "; update skipped" if skipped else "; skip requested but no Guard applied it"
                events.append({
                    "step": step, "rule": d.rule, "value": value, "baseline": base,
                    "action": action, "top_layers": top, "first_nonfinite_layer": first_bad,
                    "window": windows[step], "message": msg, "time": float(steps["time"][r]),
                    "rank": self.rank,
                })
                self._deliveries.append(("event", (d, events[-1])))
        events.sort(key=lambda e: e["step"])
        return events

    def _localise(self, step, ring, ring_steps, names, low: bool):
        hit = np.flatnonzero(ring_steps == step)
        if hit.size == 0:
            return [], None
        x = ring[hit[0]].astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(x))
        first_bad = names[int(bad[0])] if bad.size else None
        prior = (ring_steps >= step - self.recorder_steps) & (ring_steps < step) & (ring_steps >= 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            if prior.any():
                h = ring[prior].astype(np.float64)
                ok = np.isfinite(h) & (h > 0)
                logs = np.where(ok, np.log(np.where(ok, h, 1.0)), 0.0)
                cnt = ok.sum(axis=0)
                base = np.where(cnt > 0, np.exp(logs.sum(axis=0) / np.maximum(cnt, 1)), np.nan)
            else:
                base = np.full_like(x, np.nan)
            ratio = x / base
        key = np.where(np.isnan(ratio), -np.inf if not low else np.inf, ratio)
        key = np.where(np.isnan(x) | np.isposinf(x), np.inf if not low else -np.inf, key)
        order = np.argsort(key if low else -key, kind="stable")[: self.top_k]
        top = [{"layer": names[int(j)], "norm": float(x[j]), "baseline": float(base[j]),
                "ratio": float(ratio[j])} for j in order]
        return top, first_bad

    def _dump_window(self, step, ring, ring_steps, names) -> str | None:
        if self._writer is None:
            return None
        sel = np.flatnonzero((ring_steps > step - self.recorder_steps) & (ring_steps <= step) & (ring_steps >= 0))
        sel = sel[np.argsort(ring_steps[sel])]
        L = len(names)
        import pyarrow as pa
        table = pa.table({
            "step": np.repeat(ring_steps[sel], L).astype(np.int64),
            "layer": np.tile(np.asarray(names, dtype=object), len(sel)),
            "grad_norm": ring[sel].astype(np.float64).reshape(-1),
        })
        try:
            return self._writer.write_window(step, table)
        except OSError as exc:
            self._fail("store", exc)
            return None

    def _store(self, batch: _Batch) -> None:
        if self._writer is None:
            return
        import pyarrow as pa

        from .store import LAYERS_SCHEMA, STEPS_SCHEMA, layer_column
        try:
            self._writer.write_shard("steps", pa.table(batch.steps, schema=STEPS_SCHEMA))
            n = len(batch.layers["step"])
            if n:
                cols = {k: v.astype(np.float32) if v.dtype == np.float64 else v
                        for k, v in batch.layers.items()}
                cols["layer"] = layer_column(batch.layer_names, n // len(batch.layer_names))
                self._writer.write_shard("layers", pa.table(cols, schema=LAYERS_SCHEMA))
            self._writer.next_seq()
            self._writer.append_events(batch.events)
        except OSError as exc:
            self._writer.next_seq()
            self._fail("store", exc)

    # -- failures, warnings, actions -----------------------------------------------------------
    def _fail(self, source: str, exc: BaseException, message: str | None = None) -> None:
        """One warning per source, a note in the meta; never raises."""
        try:
            if source in self._failed:
                return
            self._failed.add(source)
            msg = message or f"gradguard monitor: {source} failed ({exc!r}); training continues"
            if isinstance(exc, OSError) and exc.errno is not None and message is None:
                msg = (f"gradguard monitor: cannot write the run store ({os.strerror(exc.errno)}: "
                       f"{exc}); training continues, statistics of this flush are lost")
            self.notes.append(msg)
            self._deliveries.append(("warn", msg))
            self._write_meta()
            if threading.current_thread() is not self._thread and not self._delivering:
                self._deliver(allow_raise=False)
        except Exception:  # noqa: BLE001
            pass

    def _deliver(self, allow_raise: bool = True) -> None:
        """Warnings, callbacks and raises queued by the host side, in the training thread."""
        error: AnomalyError | None = None
        if self._delivering:
            return
        self._delivering = True
        try:
            error = self._drain()
        finally:
            self._delivering = False
        if error is not None:
            if allow_raise:
                raise error
            warnings.warn(f"{error} (raised after training ended: reported only)", RuntimeWarning, stacklevel=3)

    def _drain(self) -> AnomalyError | None:
        error: AnomalyError | None = None
        while self._deliveries:
            try:
                kind, item = self._deliveries.popleft()
            except IndexError:
                break
            if kind == "warn":
                warnings.warn(item, RuntimeWarning, stacklevel=3)
                continue
            d, event = item
            if d.callback is not None:
                try:
                    d.callback(event)
                except Exception as exc:  # noqa: BLE001
                    self._fail(f"callback of {d.rule}", exc)
            if d.action == "warn":
                now = time.monotonic()
                last = self._last_warn.get(d.rule)
                if last is None or now - last >= self.warn_interval:
                    extra = self._suppressed.pop(d.rule, 0)
                    tail = f" ({extra} more {d.rule} events since the last warning)" if extra else ""
                    warnings.warn(f"gradguard: {event['message']}{tail}", RuntimeWarning, stacklevel=3)
                    self._last_warn[d.rule] = now
                else:
                    self._suppressed[d.rule] = self._suppressed.get(d.rule, 0) + 1
            elif d.action == "raise" and error is None:
                error = AnomalyError(f"gradguard: {event['message']}", event)
        return error

    def _safe_sink(self, sink: Any, method: str, *args: Any) -> None:
        try:
            getattr(sink, method)(*args)
        except Exception as exc:  # noqa: BLE001
            self._fail(f"sink {getattr(sink, 'name', type(sink).__name__)}", exc,
                       f"gradguard monitor: sink {type(sink).__name__}.{method}() failed ({exc!r}); "
                       "training continues")

    # -- meta, state, close --------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        lm = self.layer_map
        return {
            "name": self.name,
            "layers": [] if lm is None else list(lm.layers),
            "parameters": [] if lm is None else [[n, lm.layers[i]] for n, i in zip(lm.param_names, lm.index)],
            "config": {"layer_every": self.layer_every, "flush_every": self.flush_every,
                       "recorder_steps": self.recorder_steps, "update_sample": self.update_sample,
                       "top_k": self.top_k,
                       "detectors": [repr(d) for d in self.detectors],
                       "sinks": [type(s).__name__ for s in self.sinks], **self.user_config},
            "versions": _versions(), "started": self.started, "notes": list(self.notes),
            "ranks": list(range(self.world)), "finished": None if not self.closed else
            datetime.now(timezone.utc).isoformat(),
        }

    def _write_meta(self) -> None:
        if self._writer is None or self.rank != 0:
            return
        with self._meta_lock:
            try:
                self._writer.write_meta(self._meta())
            except OSError as exc:
                # same source as the shards: a read-only or full disk warns once
                if "store" not in self._failed:
                    self._failed.add("store")
                    msg = (f"gradguard monitor: cannot write the run store ({exc}); training "
                           "continues")
                    self.notes.append(msg)
                    self._deliveries.append(("warn", msg))

    def state_dict(self) -> dict[str, Any]:
        """Step counter and detector states. Flushes first (the rules that run at the flush
        then hold every recorded step) and reads the device: call at checkpoints only."""
        if self.host_math is not False:
            self.flush(wait=True)
        return {"step": self.step, "detectors": [d.state_dict() for d in self.detectors]}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self.host_math is not False:
            self.flush(wait=True)  # buffered steps belong to the state being replaced
        self.step = int(sd.get("step", 0))
        for d, s in zip(self.detectors, sd.get("detectors", [])):
            d.load_state_dict(s)

    def close(self) -> None:
        """Flush everything, stop the writer thread, close the sinks, finish the meta."""
        if self.closed:
            return
        self.flush(wait=True)
        self.closed = True
        if self._thread is not None and self._thread.is_alive():
            assert self._queue is not None
            self._queue.put(None)
            self._thread.join(timeout=60)
        for s in self.sinks:
            self._safe_sink(s, "close")
        self._write_meta()
        self._deliver(allow_raise=False)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Monitor({str(self.run_dir)!r}, layer_every={self.layer_every}, "
                f"flush_every={self.flush_every}, recorder_steps={self.recorder_steps})")

