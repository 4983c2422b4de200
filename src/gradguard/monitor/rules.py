"""The detector runner: which rule runs where, on what inputs, and when.

A detector (``detectors.py``) turns a step into ``(fired, value, baseline)``. The runner
decides for each one:

* **in the step** run the rules that may refuse it (action ``"skip"``: the Guard needs the
  flag before the optimizer steps) and rules that do their own torch arithmetic
  (``host_math = False`` on the detector); with ``Monitor(host_math=False)`` every rule;
* **at the flush** (the default for every other rule): on the host copies of the buffered
  rows, on numpy scalars, in step order: each rule's ``evaluate`` then ``update`` per row,
  with the inputs it had in the step (total norm, loss, accepted = neither skipped nor
  non-finite; per-layer norms from the flight recorder). Their events come at the flush
  anyway; a GPU step then launches no detector kernel, a CPU step no torch operation.

In the step the inputs are torch tensors on the statistics' device, or, when the statistics
live on the CPU (and ``host_math`` is on), float32 numpy scalars read from them without a
copy: reading a CPU tensor waits for nothing, and numpy scalar arithmetic is ~50x cheaper
than torch's on 0-d tensors. The same objects go to a rule's ``evaluate`` and ``update``
(rules cache work by identity).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _xp
from .buffers import STEP_COLS
from .detectors import Detector, StepDetector, Vanishing


class RuleRunner:
    """The Monitor's detectors, run in the step or at the flush.

    Args:
        detectors: the rules, in the order of their buffer columns.
        host_math: True: rules that cannot refuse a step run at the flush on the host; False:
            every rule runs in the step as torch tensors.
        host_inputs: False forces tensor inputs in the step even on the CPU (the GPU's path).
    """

    def __init__(self, detectors: Sequence[Detector], host_math: bool, host_inputs: bool = True):
        for d in detectors:
            if not isinstance(d, Detector):
                raise TypeError(f"detectors: {d!r} is not a gradguard Detector")
        self.detectors = list(detectors)
        self.host_math = host_math
        self.host_inputs = host_inputs and host_math
        self.step_detectors = [d for d in self.detectors if isinstance(d, StepDetector)]
        self.layer_detectors = [d for d in self.detectors if isinstance(d, Vanishing)]
        self.columns = [f"{d.rule}#{i}:{k}" for i, d in enumerate(self.detectors)
                        for k in ("fired", "value", "baseline")]
        col = {id(d): len(STEP_COLS) + 3 * k for k, d in enumerate(self.detectors)}
        if host_math:
            self.now = [d for d in self.step_detectors if d.action == "skip" or not d.host_math]
            self.later = [(col[id(d)], d) for d in self.step_detectors
                          if d.action != "skip" and d.host_math]
            self.later_layers = [(col[id(d)], d) for d in self.layer_detectors if d.host_math]
        else:
            self.now, self.later, self.later_layers = list(self.step_detectors), [], []
        self._deferred = {id(d) for _, d in self.later + self.later_layers}
        self.can_skip = any(d.action == "skip" for d in self.step_detectors)
        self._pending: list | None = None
        self._observed = False
        self._cache: tuple | None = None

    # -- inputs -------------------------------------------------------------------------------
    def on_host(self, t: Tensor) -> bool:
        """True when this step's inputs are numpy scalars (CPU statistics, host math)."""
        return self.host_inputs and t.is_cpu

    def inputs(self, total_norm: Tensor, loss: Any) -> list:
        """``[loss_t, total_norm_h, loss_h]`` of this step, built once: on the host the norm
        and the loss as float32 numpy scalars (``loss_t`` made only if asked, see ``loss_t``);
        otherwise the loss as a 0-d tensor on the norm's device."""
        c = self._cache
        if c is not None and c[0] is total_norm and c[1] is loss:
            return c[2]
        if self.on_host(total_norm):
            out = [None, np.float32(_xp.host_value(total_norm)), _loss_host(loss)]
        else:
            out = [_loss_tensor(loss, total_norm.device), None, None]
        self._cache = (total_norm, loss, out)
        return out

    def loss_t(self, total_norm: Tensor, loss: Any) -> Tensor | None:
        inp = self.inputs(total_norm, loss)
        if inp[0] is None and loss is not None:
            inp[0] = _loss_tensor(loss, total_norm.device)
        return inp[0]

    def _args(self, d: Detector, total_norm: Tensor, loss: Any) -> tuple[Any, Any]:
        _, tn_h, loss_h = self.inputs(total_norm, loss)
        if tn_h is not None and d.host_math:
            return tn_h, loss_h
        return total_norm, self.loss_t(total_norm, loss)

    # -- in the step ----------------------------------------------------------------------------
    def results(self, total_norm: Tensor, loss: Any) -> list:
        """``(fired, value, baseline)`` of the in-step rules for this step, evaluated once."""
        if self._pending is None:
            self._pending = [d.evaluate(*self._args(d, total_norm, loss)) for d in self.now]
        return self._pending

    def check(self, total_norm: Tensor, loss: Any) -> Tensor:
        """0-d bool, True when a ``"skip"`` rule fires (on the norm's device)."""
        results = self.results(total_norm, loss)
        host = self.on_host(total_norm)
        skip: Any = np.bool_(False) if host else torch.zeros((), dtype=torch.bool,
                                                             device=total_norm.device)
        for d, (fired, _, _) in zip(self.now, results):
            if d.action == "skip":
                skip = skip | (_xp.host_value(fired) if host else fired)
        return torch.from_numpy(np.array(skip)) if host else skip

    def observe(self, total_norm: Tensor, loss: Any, accept: Any) -> None:
        """Each in-step rule's ``update`` (once per step), ``accept`` in its inputs' kind."""
        if self._observed:
            return
        results = self.results(total_norm, loss)
        acc_h = acc_t = None
        for d, (fired, _, _) in zip(self.now, results):
            args = self._args(d, total_norm, loss)
            if isinstance(args[0], Tensor):
                if acc_t is None:
                    acc_t = accept if isinstance(accept, Tensor) else torch.from_numpy(np.array(accept))
                d.update(*args, acc_t, fired)
            else:
                if acc_h is None:
                    acc_h = np.bool_(_xp.host_value(accept))
                d.update(*args, acc_h, fired)
        self._observed = True

    def cells(self, total_norm: Tensor, loss: Any, layer_norms: Tensor, accept: Any,
              host: bool, nan: Any) -> list[Any]:
        """The detectors' buffer cells of this step, flattened in detector order: in-step
        results, NaN placeholders for the rules run at the flush, layer rules run now."""
        vals: dict[int, Any] = {id(d): r for d, r in zip(self.now, self.results(total_norm, loss))}
        out: list[Any] = []
        for d in self.detectors:
            if id(d) in vals:
                out += vals[id(d)]
            elif id(d) in self._deferred:
                out += (nan, nan, nan)  # filled in at the flush by run_deferred
            else:  # a layer rule in the step
                acc = torch.from_numpy(np.array(accept)) if host else accept
                out += d.evaluate_layers(layer_norms, acc)[:3]  # type: ignore[attr-defined]
        return out

    def end_step(self) -> None:
        self._pending = None
        self._observed = False
        self._cache = None

    # -- at the flush ---------------------------------------------------------------------------
    def run_deferred(self, buf: np.ndarray, columns: list[str], ring: np.ndarray,
                     ring_steps: np.ndarray, steps: np.ndarray) -> None:
        """The rules deferred to the flush, over one flush's rows ``buf`` (float64 host copy,
        written in place) in step order; per-layer norms from the flight recorder ``ring``."""
        later, layers = self.later, self.later_layers
        if not (later or layers):
            return
        j = {c: k for k, c in enumerate(columns)}
        tn_c, loss_c, has_c = j["total_norm"], j["loss"], j["has_loss"]
        sk_c, nf_c = j["skipped"], j["nonfinite"]
        where = {int(st): k for k, st in enumerate(ring_steps)} if layers else {}
        with np.errstate(all="ignore"):
            for i in range(buf.shape[0]):
                row = buf[i]
                tn = np.float32(row[tn_c])
                loss = np.float32(row[loss_c]) if row[has_c] > 0.5 else None
                acc = np.bool_(not (row[sk_c] > 0.5 or row[nf_c] > 0.5))
                for c, d in later:
                    fired, value, base = d.evaluate(tn, loss)  # type: ignore[attr-defined]
                    d.update(tn, loss, acc, fired)  # type: ignore[attr-defined]
                    row[c], row[c + 1], row[c + 2] = fired, value, base
                k = where.get(int(steps[i]))
                if k is not None:
                    for c, d in layers:
                        fired, value, base, _ = d.evaluate_layers(ring[k], acc)  # type: ignore[attr-defined]
                        row[c], row[c + 1], row[c + 2] = fired, value, base

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> list[dict[str, Any]]:
        return [d.state_dict() for d in self.detectors]

    def load_state_dict(self, states: Sequence[dict[str, Any]]) -> None:
        for d, s in zip(self.detectors, states):
            d.load_state_dict(s)


def _loss_host(loss: Any) -> np.float32 | None:
    if loss is None:
        return None
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            loss = loss.detach().float().mean()
        a = _xp.host_value(loss)
        return np.float32(a.reshape(-1)[0] if isinstance(a, np.ndarray) else a)
    return np.float32(float(loss))


def _loss_tensor(loss: Any, device: torch.device) -> Tensor | None:
    if loss is None:
        return None
    if isinstance(loss, Tensor):
        t = loss.detach()
        if t.numel() != 1:
            t = t.float().mean()
        t = t.reshape(())
        return t.to(device, non_blocking=True) if t.device != device else t
    return torch.full((), float(loss), dtype=torch.float32, device=device)

