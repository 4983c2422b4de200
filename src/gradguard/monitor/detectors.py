"""Detectors: small stateful rules, one step at a time, on torch tensors or numpy values.

Size: five detectors against one small namespace; each class is short and documents its math.

Every detector turns one step into three values, ``(fired, value, baseline)``; the Monitor
writes them into its buffer, and the host turns the fired rows into events when it flushes
(every ``flush_every`` steps). Nothing here reads a tensor on the host: on a device a
detector costs a handful of small kernels per step and no synchronisation.

Step-level detectors read ``(total_norm, loss)``:

* :class:`NonFinite` fires when the total gradient norm or the loss is NaN or Inf.
* :class:`Spike` fires on a z-score of the log norm against an EMA, and on a hard guard:
  with ``y = ln ||g||``, EMA mean ``m`` and variance ``v`` (decay ``alpha``) over accepted,
  unflagged steps, ``z = (y - m) / max(sqrt(v), min_std)``; it fires when
  ``n >= warmup and z > z_threshold`` or, from the first accepted step on,
  ``||g|| > hard_factor * max(accepted ||g||)`` (Megatron's 10x guard). Flagged steps never
  enter the baseline.
* :class:`LossSpike` is the same EMA z-score on the loss itself (no log, no hard guard), with
  a std floor relative to the mean: ``z = (L - m) / max(sqrt(v), rel_floor * |m|, 1e-12)``.
* :class:`Growth` fits a least-squares line to the last ``window`` accepted log norms and
  fires when the fitted growth over the window, ``exp(slope * (window - 1))``, reaches
  ``factor`` with ``r^2 >= min_r2`` (steady exponential growth, the seed article's warning
  sign); it fires on the rising edge only, once per episode.

The layer-level detector reads the per-layer gradient norms, every step:

* :class:`Vanishing`: each layer against its own early baseline, the geometric mean of its
  first ``baseline_steps`` accepted, positive, finite norms ``b_l``, and against the other
  layers: with ``r_l = ||g_l|| / b_l`` and ``r_max`` the largest finite ``r`` of the step, a
  layer is low when ``r_l < factor`` and ``r_l < factor * r_max`` (its gradient has fallen
  ``1/factor`` times further than the best-kept layer's: the signal stops reaching it). It
  fires (rising edge) when some layer stays low for ``patience`` consecutive accepted steps.
  A run that converges shrinks every layer's gradient together (a tiny LSTM at loss 1e-7:
  ``r`` ~ 1e-4 in every layer) and fires nothing; a model of one layer never fires.
  ``value`` is the smallest ratio ``r_l`` of the step.

The EMA uses a bias-free start: the decay at the n-th accepted value (n = 0, 1, ...) is
``a_n = min(alpha, n / (n + 1))``, so the first value sets the mean, and
``m <- m + (1 - a_n) d``, ``v <- a_n (v + (1 - a_n) d^2)`` with ``d = y - m`` (West's
exponentially weighted variance). State is float32 on the device, O(1) per rule (O(window)
for Growth, O(layers) for Vanishing), saved by ``state_dict()``.

Inputs are torch tensors, or numpy scalars/arrays when the Monitor runs the rules on the
host (at each flush, or in the step on the CPU; see ``_xp`` and the Monitor): the arithmetic
is written once against ``_xp.TorchOps`` / ``_xp.NumpyOps`` and the state follows the inputs'
kind. A subclass that does its own torch arithmetic sets ``host_math = False`` and always
receives tensors.

Actions (``action=``): ``"warn"`` (a rate-limited ``RuntimeWarning``), ``"callback"``
(``callback(event)`` on the host at flush time), ``"skip"`` (deprecated: the Guard refuses
the update; only step-level rules, decided on the device in the same step; the one public
spike skip is ``gradguard.SpikeSkip``, the Guard's ``skip=`` rule) and ``"raise"``
(:class:`AnomalyError` raised into the training loop at the next step after the flush that
saw the event; ``flush_every=1`` makes it immediate, at one host read per step). Every action
taken is written to ``events.jsonl``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import _xp

ACTIONS = ("warn", "callback", "skip", "raise")


class AnomalyError(RuntimeError):
    """A detector whose action is ``"raise"`` fired. ``event`` is the event's dict.

    The Guard lets this exception through (it swallows every other monitor error).
    """

    gradguard_propagate = True

    def __init__(self, message: str, event: dict[str, Any] | None = None):
        super().__init__(message)
        self.event = event


class Detector:
    """Base class: ``evaluate`` (pure) then ``update`` (state), on tensors or numpy values.

    Args:
        action: ``"warn"``, ``"callback"``, ``"skip"`` or ``"raise"``.
        callback: called as ``callback(event_dict)`` on the host when the rule fires (any
            action; required for ``"callback"``).
    """

    rule = "detector"
    level = "step"  # "step": reads (total_norm, loss); "layer": reads per-layer norms

    def __init__(self, action: str = "warn", callback: Callable[[dict], Any] | None = None):
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        if action == "callback" and callback is None:
            raise ValueError("action='callback' needs callback=")
        if action == "skip" and self.level != "step":
            raise ValueError(f"{type(self).__name__} reads per-layer norms and cannot skip a step")
        if action == "skip":
            from .notices import warn
            warn(f"{type(self).__name__}(action='skip') is deprecated: skipping steps is the "
                 "Guard's skip rule, gradguard.SpikeSkip (gg.Guard(model, skip=gg.SpikeSkip())); "
                 "a detector records and warns. It still skips for now.", DeprecationWarning)
        self.action = action
        self.callback = callback
        self._key: tuple | None = None  # ("torch", device) or ("numpy",): where the state lives
        self._xp: Any = _xp.TORCH

    host_math = True  # the arithmetic goes through ``_xp``: numpy inputs are fine

    # -- state ----------------------------------------------------------------------------
    def _ensure(self, x: Any) -> Any:
        """The namespace of input ``x``; moves the state there first if it lives elsewhere."""
        xp = _xp.namespace(x)
        key = xp.key(x)
        if self._key != key:
            self._xp = xp
            self._init_state(xp, x)
            self._key = key
        return xp

    def _init_state(self, xp: Any, like: Any) -> None:
        """Create the state in ``xp`` next to ``like`` (converting values that exist)."""

    def _state_names(self) -> tuple[str, ...]:
        return ()

    def _convert_state(self, xp: Any, like: Any) -> None:
        for n in self._state_names():
            cur = getattr(self, n, None)
            if cur is not None:
                setattr(self, n, xp.convert(cur, like))

    def state_dict(self) -> dict[str, Any]:
        return {n: _xp.to_torch(getattr(self, n)) for n in self._state_names()
                if getattr(self, n, None) is not None}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for n in self._state_names():
            if n in sd:
                setattr(self, n, torch.as_tensor(sd[n]).clone())
        # the next input decides where the state lives (``_ensure`` converts it)
        self._key = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(action={self.action!r})"


class StepDetector(Detector):
    """A rule on ``(total_norm, loss)``; ``loss`` is a 0-d tensor or None."""

    def evaluate(self, total_norm: Tensor, loss: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(fired: 0-d bool, value: 0-d float32, baseline: 0-d float32)``; no state change."""
        raise NotImplementedError

    def update(self, total_norm: Tensor, loss: Tensor, accept: Tensor, fired: Tensor) -> None:
        """Fold this step into the state when ``accept`` (0-d bool)."""


class NonFinite(StepDetector):
    """Fires when the total gradient norm or the loss is NaN or +-Inf.

    value: the non-finite quantity (the norm, else the loss); baseline: NaN.
    """

    rule = "nonfinite"

    def evaluate(self, total_norm, loss):
        xp = _xp.namespace(total_norm)
        fired = ~xp.isfinite(total_norm)
        value = xp.f32(total_norm)
        if loss is not None:
            bad_loss = ~xp.isfinite(loss)
            value = xp.where(fired, value, xp.f32(loss))
            fired = fired | bad_loss
        return fired, value, xp.full_like(value, math.nan)


class _EMAZ(StepDetector):
    """Shared machinery of Spike and LossSpike (see the module docstring)."""

    log = True
    hard_factor: float | None = None

    def __init__(self, z_threshold: float, alpha: float, warmup: int, action: str = "warn",
                 callback=None):
        super().__init__(action, callback)
        if not z_threshold > 0:
            raise ValueError(f"z_threshold must be > 0, got {z_threshold!r}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if int(warmup) < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup!r}")
        self.z_threshold = float(z_threshold)
        self.alpha = float(alpha)
        self.warmup = int(warmup)
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self.count: Tensor | None = None
        self.max: Tensor | None = None
        self._prep: tuple[Tensor, tuple[Tensor, Tensor, Tensor]] | None = None

    def _state_names(self):
        return ("mean", "var", "count", "max")

    def _init_state(self, xp, like):
        self._convert_state(xp, like)
        for n, dt in (("mean", "f32"), ("var", "f32"), ("count", "i64"), ("max", "f32")):
            if getattr(self, n) is None:
                setattr(self, n, xp.full((), 0, dt, like))

    def _y(self, xp, x):
        return xp.log(xp.clamp_min(x, 1e-30)) if self.log else x

    def _scale(self, xp):
        raise NotImplementedError

    def _x(self, total_norm, loss):
        raise NotImplementedError

    def _prepared(self, total_norm, loss):
        """``(x, y, finite)`` for this step's input, computed once for evaluate and update."""
        x = self._x(total_norm, loss)
        if x is None:
            return None
        cached = self._prep
        if cached is not None and cached[0] is x:
            return cached[1]
        xp = self._ensure(x)
        x32 = xp.f32(x)
        out = (x32, self._y(xp, x32), xp.isfinite(x32))
        self._prep = (x, out)
        return out

    def evaluate(self, total_norm, loss):
        prep = self._prepared(total_norm, loss)
        if prep is None:
            xp = _xp.namespace(total_norm)
            nan = xp.full((), math.nan, "f32", total_norm)
            return xp.full((), False, "bool", total_norm), nan, nan
        xp = self._xp
        x, y, finite = prep
        z = (y - self.mean) / self._scale(xp)
        fired = finite & (self.count >= self.warmup) & (z > self.z_threshold)
        if self.hard_factor is not None:
            fired = fired | (finite & (self.count >= 1) & (x > self.hard_factor * self.max))
        baseline = xp.exp(self.mean) if self.log else xp.copy(self.mean)
        return fired, x, baseline

    def update(self, total_norm, loss, accept, fired):
        prep = self._prepared(total_norm, loss)
        self._prep = None  # the next step brings new inputs
        if prep is None:
            return
        xp = self._xp
        x, y, finite = prep
        ok = accept & ~fired & finite
        n = xp.f32(self.count)
        a = xp.clamp_max(n / (n + 1.0), self.alpha)
        b = 1.0 - a
        d = xp.where(ok, y - self.mean, 0.0)  # a refused step moves nothing
        self.mean = xp.f32(self.mean + b * d)
        self.var = xp.f32(xp.where(ok, a * (self.var + b * d * d), self.var))
        self.max = xp.f32(xp.maximum(self.max, xp.where(ok, x, self.max)))
        self.count = self.count + ok


class Spike(_EMAZ):
    """Gradient-norm spike: z of ``ln ||g||`` vs its EMA, plus ``hard_factor`` x running max.

    Args:
        z_threshold: z above which a step is flagged (default 6, OLMo-core's sigma).
        alpha: EMA decay (default 0.97, ZClip's).
        warmup: accepted steps before the z rule arms (default 25).
        min_std: floor of the std of ``ln ||g||`` (default 0.05: a 5% wobble is one sigma at
            most), so a near-constant norm does not make every tiny change a spike.
        hard_factor: fire when ``||g|| > hard_factor * max accepted ||g||`` (default 10;
            None disables), armed from the first accepted step.
    """

    rule = "spike"

    def __init__(self, z_threshold: float = 6.0, alpha: float = 0.97, warmup: int = 25,
                 min_std: float = 0.05, hard_factor: float | None = 10.0, action: str = "warn",
                 callback=None):
        super().__init__(z_threshold, alpha, warmup, action, callback)
        self.min_std = float(min_std)
        self.hard_factor = None if hard_factor is None else float(hard_factor)

    def _x(self, total_norm, loss):
        return total_norm

    def _scale(self, xp):
        return xp.clamp_min(xp.sqrt(self.var), self.min_std)


class LossSpike(_EMAZ):
    """Loss spike: z of the loss against its EMA (no log), armed after ``warmup`` steps.

    ``z = (L - m) / max(sqrt(v), rel_floor * |m|, 1e-12)``; only upward spikes fire.
    Steps without a loss are ignored.
    """

    rule = "loss_spike"
    log = False

    def __init__(self, z_threshold: float = 6.0, alpha: float = 0.97, warmup: int = 25,
                 rel_floor: float = 0.01, action: str = "warn", callback=None):
        super().__init__(z_threshold, alpha, warmup, action, callback)
        self.rel_floor = float(rel_floor)

    def _x(self, total_norm, loss):
        return loss

    def _scale(self, xp):
        return xp.clamp_min(xp.maximum(xp.sqrt(self.var), self.rel_floor * abs(self.mean)), 1e-12)


class Growth(StepDetector):
    """Steady exponential growth of the gradient norm over the last ``window`` accepted steps.

    With ``y_j = ln ||g||`` for the window's steps ``j = 0..W-1`` (oldest first), the
    least-squares slope is ``s = sum (j - jbar)(y_j - ybar) / sum (j - jbar)^2`` and
    ``r^2 = S_jy^2 / (S_jj S_yy)``. The rule holds when ``exp(s (W - 1)) >= factor`` and
    ``r^2 >= min_r2``; it fires on the step where it starts to hold. value: the fitted growth
    ``exp(s (W - 1))``; baseline: the window's geometric mean norm ``exp(ybar)``.
    """

    rule = "growth"

    def __init__(self, window: int = 50, factor: float = 10.0, min_r2: float = 0.8,
                 action: str = "warn", callback=None):
        super().__init__(action, callback)
        if int(window) < 3:
            raise ValueError(f"window must be >= 3, got {window!r}")
        if not factor > 1.0:
            raise ValueError(f"factor must be > 1, got {factor!r}")
        self.window = int(window)
        self.factor = float(factor)
        self.min_r2 = float(min_r2)
        self.ring: Tensor | None = None
        self.count: Tensor | None = None
        self.active: Tensor | None = None
        self._jc: Tensor | None = None

    def _state_names(self):
        return ("ring", "count", "active")

    def _init_state(self, xp, like):
        self._convert_state(xp, like)
        W = self.window
        if self.ring is None:
            self.ring = xp.full((W,), 0.0, "f32", like)
        if self.count is None:
            self.count = xp.full((), 0, "i64", like)
        if self.active is None:
            self.active = xp.full((), False, "bool", like)
        jc = np.arange(W, dtype=np.float32)
        self._jc = xp.convert(jc - jc.mean(), like)

    def _shifted(self, xp, total_norm):
        y = xp.log(xp.clamp_min(xp.f32(total_norm), 1e-30))
        return xp.shift_in(self.ring, y)

    def evaluate(self, total_norm, loss):
        xp = self._ensure(total_norm)
        ring = self._shifted(xp, total_norm)
        finite = xp.isfinite(total_norm)
        self._next = (total_norm, ring, finite)
        ybar = xp.mean(ring)
        yc = ring - ybar
        W = self.window
        sjj = W * (W * W - 1) / 12.0  # sum of (j - jbar)^2 over j = 0..W-1
        sjy = xp.dot(self._jc, yc)
        syy = xp.dot(yc, yc)
        slope = sjy / sjj
        # S_yy = 0 means y is constant, so S_jy = 0 too and r^2 = 0 (not 0/0)
        r2 = sjy * sjy / (sjj * xp.clamp_min(syy, 1e-30))
        growth = xp.exp(slope * (W - 1))
        full = self.count >= W - 1  # this step would complete the window
        cond = full & finite & (growth >= self.factor) & (r2 >= self.min_r2)
        self._cond = cond
        return cond & ~self.active, xp.f32(growth), xp.f32(xp.exp(ybar))

    def update(self, total_norm, loss, accept, fired):
        xp = self._ensure(total_norm)
        nxt = getattr(self, "_next", None)
        if nxt is not None and nxt[0] is total_norm:
            shifted, finite = nxt[1], nxt[2]
        else:
            shifted, finite = self._shifted(xp, total_norm), xp.isfinite(total_norm)
        self._next = None
        ok = accept & finite
        self.ring = xp.where(ok, shifted, self.ring)
        self.count = self.count + ok
        cond = getattr(self, "_cond", None)
        if cond is not None:
            self.active = xp.where(ok, cond, self.active)


class Vanishing(Detector):
    """Per-layer vanishing gradients against each layer's own early baseline and the others.

    Args:
        factor: a layer is low when ``r_l = ||g_l|| / b_l < factor`` and ``r_l < factor *
            max_k r_k`` (default 1e-3; see the module docstring).
        baseline_steps: accepted steps with a positive finite norm that form ``b_l``
            (geometric mean; default 50).
        patience: consecutive low accepted steps before the rule fires (default 20).
    """

    rule = "vanishing"
    level = "layer"

    def __init__(self, factor: float = 1e-3, baseline_steps: int = 50, patience: int = 20,
                 action: str = "warn", callback=None):
        super().__init__(action, callback)
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must be in (0, 1), got {factor!r}")
        self.factor = float(factor)
        self.baseline_steps = int(baseline_steps)
        self.patience = int(patience)
        self.log_sum: Tensor | None = None
        self.count: Tensor | None = None
        self.low: Tensor | None = None
        self._factor_t: Tensor | None = None

    def _state_names(self):
        return ("log_sum", "count", "low")

    def _init_state(self, xp, like):
        self._convert_state(xp, like)
        self._factor_t = xp.full((), self.factor, "f32", like)  # the baseline column, constant

    def _alloc(self, layer_norms: Any) -> Any:
        xp = self._ensure(layer_norms)
        n = len(layer_norms)
        if self.log_sum is None or len(self.log_sum) != n:
            self.log_sum = xp.full((n,), 0.0, "f32", layer_norms)
            self.count = xp.full((n,), 0, "i64", layer_norms)
            self.low = xp.full((n,), 0, "i64", layer_norms)
        return xp

    def ratios(self, layer_norms: Tensor) -> Tensor:
        """``||g_l|| / b_l`` per layer (NaN while the layer's baseline is incomplete)."""
        xp = self._alloc(layer_norms)
        ready = self.count >= self.baseline_steps
        base = xp.exp(self.log_sum / xp.f32(xp.clamp_min(self.count, 1)))
        return xp.where(ready, xp.f32(layer_norms) / base, math.nan)

    def evaluate_layers(self, layer_norms: Tensor, accept: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Evaluate and update at once: ``(fired, min_ratio, factor, ratios)``."""
        ratios = self.ratios(layer_norms)
        xp = self._xp
        # the layer that kept the most of its gradient: a layer is low only against it too
        # (a converged run, where every layer's gradient shrinks together, is not vanishing)
        peak = xp.amax(xp.where(xp.isfinite(ratios), ratios, -math.inf)) if len(ratios) \
            else xp.full((), -math.inf, "f32", layer_norms)
        is_low = (ratios < self.factor) & (ratios < self.factor * peak) & accept  # NaN: False
        low = xp.where(accept, xp.where(is_low, self.low + 1, 0), self.low)
        fired = xp.any(low == self.patience) & accept
        x = xp.f32(layer_norms)
        take = accept & (self.count < self.baseline_steps) & xp.isfinite(x) & (x > 0)
        self.log_sum = xp.f32(self.log_sum + xp.where(take, xp.log(xp.clamp_min(x, 1e-30)), 0.0))
        self.count = self.count + take
        self.low = low
        finite = xp.where(xp.isnan(ratios), math.inf, ratios)
        value = xp.f32(xp.amin(finite) if len(finite) else xp.full((), math.inf, "f32", x))
        return fired, value, self._factor_t, ratios


def default_detectors() -> list[Detector]:
    """One of each rule, action ``"warn"``."""
    return [NonFinite(), Spike(), LossSpike(), Growth(), Vanishing()]
