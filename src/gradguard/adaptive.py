"""Adaptive clipping: thresholds that follow the run instead of a number the user tunes.

``AutoClip``       the p-th percentile of past global norms (Seetharaman et al. 2020)
``ZClip``          EMA z-score of the global norm with the reciprocal threshold (Kumar et al. 2025)
``SpikeSkip``      a Guard skip rule: refuse the update when the norm (or loss) spikes
``OvershootClip``  the threshold-free default of ``Guard``: the threshold shrinks when an update
                   overshoots (the next gradient points back against it) and grows while
                   updates keep agreeing; see ``docs/adaptive.md``

Shared guarantees (tested in ``tests/test_adaptive*.py``):

* state lives on the gradients' device in fixed-size tensors (O(1) or O(window) memory); the
  per-step cost does not grow with the number of steps;
* nothing here reads a tensor on the host in the per-step path (no ``.item()``, ``bool()``,
  ``float()``, ``tolist()``): thresholds and decisions stay device tensors;
* non-finite or skipped steps never enter the statistics: every update is
  ``torch.where(accept, new, old)``;
* ``state_dict()`` / ``load_state_dict()`` hold tensors and plain numbers only (loadable with
  ``torch.load(weights_only=True)``) and a resumed run continues bit-for-bit;
* a bad hyperparameter raises ``ValueError`` naming the argument.

Norms are float32 gradient norms (the units of the gradients, p-norm of the clipper's
``norm_type``, 2 by default); thresholds are in the same units.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._validate import int_at_least as _int_at_least
from ._validate import nonneg_finite as _nonneg
from ._validate import number as _number
from ._validate import open_unit as _open_unit
from .clippers import Clipper, ClipStats, norm_clip_coef
from .kernels import multi_tensor_scale_
from .norms import GradNorms
from .sketch import LogHistogram, RingWindow

__all__ = ["AutoClip", "OvershootClip", "SpikeSkip", "ZClip", "default_clipper"]


def _scalar(value: float, like: Tensor) -> Tensor:
    return torch.full((), value, dtype=torch.float32, device=like.device)


def _keep(accept: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where the step is accepted, else ``old`` (the statistics' only update path)."""
    return torch.where(accept, new, old)


class _ThresholdClipper(Clipper):
    """A scalar global-norm clipper whose max norm is a device tensor: ``threshold_for(total)``.

    The coefficient is ``norm_clip_coef(total, threshold_for(total))``, the one formula of norm
    clipping, and ``ClipStats.threshold`` reports the threshold used for this step's norm.
    """

    scalar = True
    norm_type = 2.0

    def threshold_for(self, total: Tensor) -> Tensor:
        raise NotImplementedError

    def coefficient(self, norms: GradNorms) -> Tensor:
        return norm_clip_coef(norms.total, self.threshold_for(norms.total))

    def clip_(self, params, grads, norms, *, apply=True, propagate_nonfinite=False) -> ClipStats:
        nonfinite = norms.nonfinite
        thr = self.threshold_for(norms.total)
        coef = norm_clip_coef(norms.total, thr)
        if not propagate_nonfinite:
            coef = torch.where(nonfinite, torch.ones_like(coef), coef)
        if apply and grads:
            # the shared scale kernel: also scales DTensor (FSDP2 / TP) gradients on any mesh
            multi_tensor_scale_(grads, coef)
        return ClipStats(norms.total, coef, coef < 1.0, nonfinite, norms.per_tensor, thr)


# -- AutoClip -----------------------------------------------------------------------------
class AutoClip(_ThresholdClipper):
    """Clip the global norm to the p-th percentile of the norms seen so far (AutoClip).

    Seetharaman et al. 2020: at step t, append ||g_t|| to the history H, then clip to
    ``eta_t = percentile(H, p)``. As in the paper's code, the current norm takes part in its own
    percentile (the first step is therefore never clipped); only accepted (finite, not skipped)
    norms stay in the history.

    Args:
        percentile: p in (0, 100]; 10 is the paper's "set-and-forget" value (about 90 % of the
            steps get clipped); 100 never clips.
        window: None (default) keeps the **full history** in a log-binned histogram on the device
            (``bins`` bins over ``[lo, hi]``; memory O(bins), whatever the number of steps);
            an int >= 2 keeps the last ``window`` accepted norms exactly.
        bins, lo, hi: histogram layout. The estimate ``q_hat`` of the exact percentile ``q``
            satisfies ``q / r * x_(k) / x_(k+1) <= q_hat <= q * r`` with ``r = (hi / lo) **
            (1 / bins)`` (0.68 % with the defaults 8192, 1e-12, 1e12) and ``x_(k) <= q <=
            x_(k+1)`` the neighbouring order statistics (see ``gradguard.sketch``).

    Note: percentile rules follow the norms wherever they go: if training starts to diverge,
    the norms and the threshold grow together (see ``docs/adaptive.md``).
    """

    def __init__(self, percentile: float = 10.0, window: int | None = None, *,
                 bins: int = 8192, lo: float = 1e-12, hi: float = 1e12):
        p = _number(percentile, "percentile")
        if not 0.0 < p <= 100.0:
            raise ValueError(f"percentile must lie in (0, 100], got {percentile!r}")
        self.percentile = p
        self.window = None if window is None else _int_at_least(window, "window", 2)
        self._store: LogHistogram | RingWindow = (
            LogHistogram(bins, lo, hi) if self.window is None else RingWindow(self.window))

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile}, window={self.window})"

    def threshold_for(self, total: Tensor) -> Tensor:
        thr = self._store.percentile(self.percentile, extra=total.detach())
        return torch.where(torch.isnan(thr), torch.full_like(thr, math.inf), thr)

    def threshold(self, like: Tensor) -> Tensor:
        """The percentile of the history alone (inf before the first accepted norm)."""
        thr = self._store.percentile(self.percentile, extra=torch.full_like(like, math.nan))
        return torch.where(torch.isnan(thr), torch.full_like(thr, math.inf), thr)

    def observe(self, norms: GradNorms, accept: Tensor) -> None:
        total = norms.total.detach()
        self._store.add(total, accept)

    def count(self) -> Tensor:
        """int64 0-d tensor: norms in the history (capped at ``window`` in window mode)."""
        if isinstance(self._store, LogHistogram):
            return self._store.total()
        dev = self._store.values.device if self._store.values is not None else torch.device("cpu")
        return self._store.filled(dev)

    def state_dict(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "window": self.window,
                "store": self._store.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("window") != self.window:
            raise ValueError(f"AutoClip state has window={state_dict.get('window')}, "
                             f"this clipper window={self.window}")
        self._store.load_state_dict(state_dict["store"])


# -- ZClip --------------------------------------------------------------------------------
class ZClip(_ThresholdClipper):
    """EMA z-score clipping of the global norm (Kumar et al. 2025, "ZClip").

    State: EMA mean ``mu`` and variance ``var`` of the (clipped) global norm, ``sigma =
    sqrt(var)``. The first ``warmup_steps`` accepted norms only fill a buffer; then ``mu`` and
    ``var`` are their mean and population variance. After warm-up, for a norm ``g``:

        z   = (g - mu) / (sigma + eps)
        thr = mu + z_threshold**2 * sigma / z      if z > z_threshold   (the reciprocal rule:
            = inf                                  otherwise             bigger spikes are
        thr = min(thr, max_norm)                   when max_norm is set   clipped harder)

    and the gradient is clipped to ``thr`` with ``norm_clip_coef``. Example: mu 1.0, sigma 0.1,
    g 2.0 give z 10 and thr 1.0625. The statistics are then fed the clipped value
    ``x = min(g, thr)``: ``mu <- alpha mu + (1 - alpha) x``, then ``var <- alpha var + (1 -
    alpha) (x - mu)**2`` with the *updated* mean (as the paper's code). During warm-up the
    threshold is ``max_norm`` (no clipping when None). Non-finite and skipped steps are not fed.

    Unlike the reference code, ``max_norm`` defaults to None (no fixed cap) and a NaN never
    enters the statistics.
    """

    def __init__(self, alpha: float = 0.97, z_threshold: float = 2.5, warmup_steps: int = 25,
                 max_norm: float | None = None, eps: float = 1e-6):
        self.alpha = _open_unit(alpha, "alpha")
        self.z_threshold = _nonneg(z_threshold, "z_threshold")
        self.warmup_steps = _int_at_least(warmup_steps, "warmup_steps", 1)
        self.max_norm = None if max_norm is None else _nonneg(max_norm, "max_norm", positive=True)
        self.eps = _nonneg(eps, "eps")
        self._mean: Tensor | None = None
        self._var: Tensor | None = None
        self._count: Tensor | None = None     # int64: accepted norms so far
        self._buffer: Tensor | None = None    # float32 [warmup_steps]

    def __repr__(self) -> str:
        return (f"ZClip(alpha={self.alpha}, z_threshold={self.z_threshold}, "
                f"warmup_steps={self.warmup_steps}, max_norm={self.max_norm})")

    def _ensure(self, like: Tensor) -> None:
        dev = like.device
        if self._mean is None:
            self._mean = torch.zeros((), dtype=torch.float32, device=dev)
            self._var = torch.zeros((), dtype=torch.float32, device=dev)
            self._count = torch.zeros((), dtype=torch.int64, device=dev)
            self._buffer = torch.zeros(self.warmup_steps, dtype=torch.float32, device=dev)
        elif self._mean.device != dev:
            self._mean, self._var = self._mean.to(dev), self._var.to(dev)  # type: ignore[union-attr]
            self._count, self._buffer = self._count.to(dev), self._buffer.to(dev)  # type: ignore[union-attr]

    @property
    def mean(self) -> Tensor | None:
        """EMA mean of the clipped norm (meaningful once warm-up is over)."""
        return self._mean

    @property
    def std(self) -> Tensor | None:
        """EMA standard deviation of the clipped norm."""
        return None if self._var is None else torch.sqrt(self._var)

    def _cap(self, thr: Tensor) -> Tensor:
        if self.max_norm is None:
            return thr
        return torch.clamp(thr, max=self.max_norm)

    def threshold_for(self, total: Tensor) -> Tensor:
        self._ensure(total)
        total = total.detach()
        sigma = torch.sqrt(self._var)  # type: ignore[arg-type]
        z = (total - self._mean) / (sigma + self.eps)
        zt = self.z_threshold
        safe_z = torch.where(z > zt, z, torch.ones_like(z))
        adaptive = torch.where(z > zt, self._mean + (zt * zt) * sigma / safe_z,
                               torch.full_like(z, math.inf))
        warm = self._count >= self.warmup_steps  # type: ignore[operator]
        thr = torch.where(warm, adaptive, torch.full_like(adaptive, math.inf))
        return self._cap(thr)

    def threshold(self, like: Tensor) -> Tensor:
        """Where clipping starts for the next step: ``mu + z_threshold * sigma`` (capped by
        ``max_norm``); ``max_norm`` or inf during warm-up."""
        self._ensure(like)
        onset = self._mean + self.z_threshold * torch.sqrt(self._var)  # type: ignore[operator]
        warm = self._count >= self.warmup_steps  # type: ignore[operator]
        return self._cap(torch.where(warm, onset, torch.full_like(onset, math.inf)))

    def observe(self, norms: GradNorms, accept: Tensor) -> None:
        total = norms.total.detach()
        self._ensure(total)
        accept = accept & torch.isfinite(total)
        x = torch.minimum(total, self.threshold_for(total))
        count = self._count
        # warm-up: write x into the buffer; on the last warm-up value set mean/var from it
        slot = count.clamp(max=self.warmup_steps - 1).reshape(1)  # type: ignore[union-attr]
        in_warmup = count < self.warmup_steps  # type: ignore[operator]
        write = accept & in_warmup
        old = self._buffer.index_select(0, slot)  # type: ignore[union-attr]
        buf = self._buffer.index_copy(0, slot, torch.where(write, x.reshape(1), old))  # type: ignore[union-attr]
        buf_mean = buf.mean()
        buf_var = ((buf - buf_mean) ** 2).mean()
        a = self.alpha
        ema_mean = a * self._mean + (1.0 - a) * x
        ema_var = a * self._var + (1.0 - a) * (x - ema_mean) ** 2
        finishing = count == self.warmup_steps - 1
        new_mean = torch.where(in_warmup, torch.where(finishing, buf_mean, self._mean), ema_mean)
        new_var = torch.where(in_warmup, torch.where(finishing, buf_var, self._var), ema_var)
        self._buffer = buf
        self._mean = _keep(accept, new_mean, self._mean)  # type: ignore[arg-type]
        self._var = _keep(accept, new_var, self._var)  # type: ignore[arg-type]
        self._count = count + accept.to(torch.int64)  # type: ignore[operator]

    def state_dict(self) -> dict[str, Any]:
        if self._mean is None:
            return {"initialized": False}
        return {"initialized": True, "mean": self._mean.clone(), "var": self._var.clone(),  # type: ignore[union-attr]
                "count": self._count.clone(), "buffer": self._buffer.clone()}  # type: ignore[union-attr]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict.get("initialized", False):
            self._mean = self._var = self._count = self._buffer = None
            return
        if state_dict["buffer"].numel() != self.warmup_steps:
            raise ValueError(f"ZClip state has warmup_steps={state_dict['buffer'].numel()}, "
                             f"this clipper warmup_steps={self.warmup_steps}")
        self._mean = state_dict["mean"].clone()
        self._var = state_dict["var"].clone()
        self._count = state_dict["count"].clone()
        self._buffer = state_dict["buffer"].clone()


# -- SpikeSkip ----------------------------------------------------------------------------
class _Stream:
    """One watched value (norm or loss): a window of accepted values and its spike test."""

    def __init__(self, window: int):
        self.ring = RingWindow(window)

    def limit(self, like: Tensor, threshold: float, min_history: int) -> tuple[Tensor, Tensor]:
        """(armed, mean + threshold * std) of the window; std is the sample std (n - 1), with a
        floor of 1e-3 * |mean| so that a constant history does not make every change a spike."""
        dev = like.device
        valid = self.ring.valid(dev)
        n = valid.sum()
        vals = torch.where(valid, self.ring.values, torch.zeros_like(self.ring.values))  # type: ignore[arg-type]
        nf = n.to(torch.float32).clamp(min=1.0)
        mean = vals.sum() / nf
        dev2 = torch.where(valid, (vals - mean) ** 2, torch.zeros_like(vals))
        std = torch.sqrt(dev2.sum() / (nf - 1.0).clamp(min=1.0))
        std = torch.maximum(std, 1e-3 * mean.abs())
        return n >= min_history, mean + threshold * std


class SpikeSkip:
    """Guard skip rule: refuse the update when the total norm, or the loss when it is passed,
    exceeds ``mean + threshold * std`` of the last ``window`` accepted values.

        skip_t = armed and (g_t > mean(G) + threshold * std(G)   or   L_t > mean(L) + threshold * std(L))

    G and L are the last ``window`` *accepted* norms and losses (a skipped or non-finite value
    never enters them, so one NaN cannot poison the statistics and suppress the steps after
    it); std is the sample standard deviation, floored at ``1e-3 * |mean|``. The rule is armed
    once ``min_history`` values are in the window (default ``window // 2``, at least 2; OLMo-core
    uses the same). A non-finite loss is a spike. After ``max_consecutive_skips`` refused steps
    in a row the Guard raises ``GradientExplosionError`` (a Guard argument, default 10).

    ``check`` is pure; ``observe`` appends the accepted values. All on the device, O(window).
    """

    def __init__(self, threshold: float = 6.0, window: int = 128, *,
                 min_history: int | None = None, watch_loss: bool = True):
        self.threshold = _nonneg(threshold, "threshold")
        self.window = _int_at_least(window, "window", 2)
        mh = max(2, self.window // 2) if min_history is None else _int_at_least(
            min_history, "min_history", 2)
        if mh > self.window:
            raise ValueError(f"min_history must not exceed window ({self.window}), got {mh}")
        self.min_history = mh
        self.watch_loss = bool(watch_loss)
        self._norm = _Stream(self.window)
        self._loss = _Stream(self.window)

    def __repr__(self) -> str:
        return (f"SpikeSkip(threshold={self.threshold}, window={self.window}, "
                f"min_history={self.min_history})")

    @staticmethod
    def _as_tensor(loss: Any, like: Tensor) -> Tensor | None:
        if loss is None:
            return None
        if isinstance(loss, Tensor):
            return loss.detach().reshape(()).to(device=like.device, dtype=torch.float32)
        return torch.full((), float(loss), dtype=torch.float32, device=like.device)

    def check(self, total_norm: Tensor, loss: Any = None) -> Tensor:
        """0-d bool device tensor: True when this step's update should be refused (pure)."""
        armed, limit = self._norm.limit(total_norm, self.threshold, self.min_history)
        spike = armed & (total_norm.detach() > limit)
        lt = self._as_tensor(loss, total_norm) if self.watch_loss else None
        if lt is not None:
            armed_l, limit_l = self._loss.limit(lt, self.threshold, self.min_history)
            spike = spike | (armed_l & (lt > limit_l)) | ~torch.isfinite(lt)
        return spike

    def limits(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """(norm limit, loss limit) for the next step; inf while not armed."""
        out = []
        for s in (self._norm, self._loss):
            armed, limit = s.limit(like, self.threshold, self.min_history)
            out.append(torch.where(armed, limit, torch.full_like(limit, math.inf)))
        return out[0], out[1]

    def observe(self, total_norm: Tensor, loss: Any, accept: Tensor) -> None:
        """Append the norm (and loss) when ``accept`` and finite."""
        self._norm.ring.add(total_norm.detach(), accept)
        lt = self._as_tensor(loss, total_norm) if self.watch_loss else None
        if lt is not None:
            self._loss.ring.add(lt, accept)

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "norm": self._norm.ring.state_dict(),
                "loss": self._loss.ring.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._norm.ring.load_state_dict(state_dict["norm"])
        self._loss.ring.load_state_dict(state_dict["loss"])


# -- OvershootClip: the threshold-free default ---------------------------------------------
_SGD_MOMENTUM = "momentum"   # update direction: SGD's momentum buffer
_SGD_PLAIN = "sgd"           # update direction: the last accepted gradient (a sample of it)
_ADAPTIVE = "adaptive"       # optimizer_scale with Adam & co.: the cap follows the optimizer's v
_CAP_ONLY = "cap"            # no step-size control, geometric spike cap only

#: optimizers that divide the update by a running RMS of the gradient (a global gradient scale
#: does not change their step); any optimizer whose defaults have ``betas`` counts too
_ADAPTIVE_OPTIMIZERS = tuple(getattr(torch.optim, n) for n in (
    "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "SparseAdam",
    "Adafactor") if hasattr(torch.optim, n))


def _second_moment_decay(optimizer: torch.optim.Optimizer) -> float:
    """The decay of the optimizer's running mean of squared gradients: Adam's ``betas[1]``,
    RMSprop's ``alpha``, Adadelta's ``rho``; 0.999 (Adam's default) when it has none."""
    group = optimizer.param_groups[0] if optimizer.param_groups else {}
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and len(betas) > 1:
        cand = betas[1]
    else:
        cand = group.get("alpha", group.get("rho", 0.999))
    try:
        b = float(cand)
    except (TypeError, ValueError):
        return 0.999
    return b if 0.0 < b < 1.0 else 0.999


class OvershootClip(_ThresholdClipper):
    """The threshold-free default: clip the global norm to ``min(S, spike_factor * level)``.

    **Step-size control S** (for ``torch.optim.SGD``, where the clip threshold *is* the step
    length ``lr * min(||g||, S)``). At each step the new gradient ``g_t`` is compared with the
    direction of the last update ``u_{t-1}`` (SGD's momentum buffer; without momentum only
    with ``use_last_gradient=True``, the last gradient): ``c_t = cos(g_t, u_{t-1})``. ``-g_t . u_{t-1}`` is the derivative of the
    loss with respect to the last step's length (the "hypergradient" of Baydin et al. 2018), so

        c_t < 0 (the step overshot):        S <- min(S, ||g_{t-1}||) * exp(beta * c_t)
        c_t > 0 and the last step clipped:  S <- S * exp(beta * c_t)
        otherwise                           S unchanged
        always                              S >= floor * geometric-mean level of raw norms

    S starts at ``init_step * ||theta_0|| / lr``, a first step that moves the parameters by
    ``init_step`` (1 %) of their norm, and finds the edge of stability from below. The floor
    keeps S from collapsing to 0 in the noise-dominated end of training.

    **Spike cap** (every optimizer): ``level`` is the EMA (``ema``) of the log of accepted,
    clipped norms, so a norm above ``spike_factor * exp(level)`` is clipped; feeding the
    clipped value keeps an explosion from dragging the cap up with it. With adaptive
    optimizers (Adam, RMSprop, ...; the update does not scale with the gradient), with SGD
    without momentum (unless ``use_last_gradient``) and when no optimizer is known
    (``Guard.clip``), only the cap acts.

    **Opt-in, adaptive optimizers** (``optimizer_scale=True``; Adam, AdamW, RMSprop, ...):
    the cap is measured in the optimizer's own scale instead, ``spike_factor * sqrt(v)``,
    where ``v`` is the bias-corrected EMA of the squared accepted, clipped global norm with the
    optimizer's second-moment decay (Adam's ``betas[1]``), the global-norm counterpart of
    Adam's ``v`` (which also sees the clipped gradient). It follows the early rise of the norms
    as Adam's ``v`` does, so it clips almost no normal step, and still holds a spike to
    ``spike_factor`` times what ``v`` holds. Measured, it is no better than the default
    geometric cap (``docs/adaptive.md``), so it is not the default.

    The rule needs the optimizer: the Guard hands it over through ``bind_optimizer``. Cost per
    step: one cosine over at most ``sample`` strided gradient elements (the whole gradient for
    models below that size) and O(1) scalar updates; memory O(sample). See
    ``docs/adaptive.md`` for why it works, the measurements, and where it does not.
    """

    def __init__(self, *, beta: float = 0.1, init_step: float = 1e-2, floor: float = 0.02,
                 spike_factor: float = 3.0, ema: float = 0.95, sample: int = 65536,
                 use_last_gradient: bool = False, optimizer_scale: bool = False):
        self.beta = _nonneg(beta, "beta", positive=True)
        self.init_step = _nonneg(init_step, "init_step", positive=True)
        self.floor = _nonneg(floor, "floor")
        self.spike_factor = _nonneg(spike_factor, "spike_factor", positive=True)
        if self.spike_factor < 1.0:
            raise ValueError(f"spike_factor must be >= 1, got {spike_factor!r}")
        self.ema = _open_unit(ema, "ema")
        self.sample = _int_at_least(sample, "sample", 1)
        self.use_last_gradient = bool(use_last_gradient)
        self.optimizer_scale = bool(optimizer_scale)
        self._optimizer: torch.optim.Optimizer | None = None
        self._mode = _CAP_ONLY
        self._beta2 = 0.999
        self._lr: Any = None
        self._state: dict[str, Tensor] | None = None
        self._pending: dict[str, Tensor] | None = None
        self._layout: tuple[int, tuple[int, ...]] | None = None
        self._have_init = False
        self._S_now: Tensor | None = None

    def __repr__(self) -> str:
        return (f"OvershootClip(beta={self.beta}, init_step={self.init_step}, floor={self.floor}, "
                f"spike_factor={self.spike_factor}, ema={self.ema}, mode={self._mode!r})")

    # -- optimizer ------------------------------------------------------------------------
    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Learn the optimizer's kind and learning rate (called by ``Guard.step``; cheap)."""
        groups = optimizer.param_groups
        self._lr = groups[0].get("lr") if groups else None
        if optimizer is self._optimizer:
            return
        self._optimizer = optimizer
        if isinstance(optimizer, torch.optim.SGD):
            momenta = [g.get("momentum", 0.0) for g in groups]
            if all(m > 0 for m in momenta):
                self._mode = _SGD_MOMENTUM
            else:
                # without momentum the only direction is the last minibatch gradient, a noisy
                # proxy: measured on the adding problem it over-clips, so it is opt-in
                self._mode = _SGD_PLAIN if self.use_last_gradient else _CAP_ONLY
        elif self.optimizer_scale and (isinstance(optimizer, _ADAPTIVE_OPTIMIZERS)
                                       or "betas" in getattr(optimizer, "defaults", {})):
            self._mode = _ADAPTIVE
            self._beta2 = _second_moment_decay(optimizer)
        else:
            self._mode = _CAP_ONLY

    @property
    def mode(self) -> str:
        """"momentum", "sgd" (step-size control on), "adaptive" (``optimizer_scale``: cap at
        ``spike_factor`` times the RMS level of the optimizer's second moment) or "cap"
        (geometric spike cap only)."""
        return self._mode

    # -- state ----------------------------------------------------------------------------
    def _init_state(self, like: Tensor) -> dict[str, Tensor]:
        f = torch.float32
        dev = like.device
        return {
            "step_limit": torch.full((), math.inf, dtype=f, device=dev),   # S
            "log_level": torch.zeros((), dtype=f, device=dev),             # EMA log clipped norm
            "log_raw": torch.zeros((), dtype=f, device=dev),               # EMA log raw norm
            "sq_level": torch.zeros((), dtype=f, device=dev),              # adaptive: v-hat
            "prev_norm": torch.zeros((), dtype=f, device=dev),             # ||g_{t-1}||
            "count": torch.zeros((), dtype=torch.int64, device=dev),       # accepted steps
            "started": torch.zeros((), dtype=torch.bool, device=dev),      # S initialised
            "init_limit": torch.full((), math.inf, dtype=f, device=dev),   # S_0
            "prev_sample": torch.zeros(0, dtype=f, device=dev),            # plain SGD: g_{t-1}
        }

    def _ensure(self, like: Tensor) -> dict[str, Tensor]:
        if self._state is None:
            self._state = self._init_state(like)
        elif self._state["count"].device != like.device:
            self._state = {k: v.to(like.device) for k, v in self._state.items()}
        return self._state

    def threshold_for(self, total: Tensor) -> Tensor:
        return self.threshold(total)

    def threshold(self, like: Tensor) -> Tensor:
        """``min(S, spike_factor * exp(level))``; in the "adaptive" mode (``optimizer_scale``
        with an adaptive optimizer) ``spike_factor * sqrt(v)``; inf before the first accepted step (unless S was set from
        the parameter norm)."""
        st = self._ensure(like)
        inf = torch.full_like(st["log_level"], math.inf)
        if self._mode == _ADAPTIVE:
            return torch.where(st["count"] > 0, self.spike_factor * torch.sqrt(self._v(st)), inf)
        S = self._S_now if self._S_now is not None else st["step_limit"]
        cap = torch.where(st["count"] > 0, self.spike_factor * torch.exp(st["log_level"]), inf)
        return torch.minimum(S, cap)

    @staticmethod
    def _v(st: dict[str, Tensor]) -> Tensor:
        """The adaptive mode's v; 0 means never updated (a state from another mode or an older
        version): then the square of the geometric level stands in."""
        return torch.where(st["sq_level"] > 0, st["sq_level"], torch.exp(2 * st["log_level"]))

    def _flat_sample(self, tensors: list[Tensor]) -> Tensor:
        total = sum(t.numel() for t in tensors)
        stride = max(1, -(-total // self.sample))
        parts = [t.detach().reshape(-1)[::stride] for t in tensors]
        return torch.cat(parts).to(torch.float32) if parts else torch.zeros(0)

    def clip_(self, params, grads, norms, *, apply=True, propagate_nonfinite=False) -> ClipStats:
        st = self._ensure(norms.total)
        pending = dict(st)
        if self._mode != _CAP_ONLY and grads:
            layout = (len(grads), tuple(g.numel() for g in grads))
            g_s = self._flat_sample(grads)
            if self._mode == _SGD_MOMENTUM:
                state = self._optimizer.state if self._optimizer is not None else {}
                bufs = [state.get(p, {}).get("momentum_buffer") for p in params]
                if any(b is None for b in bufs):
                    u_s = torch.zeros_like(g_s)
                else:
                    u_s = self._flat_sample(bufs)  # type: ignore[arg-type]
            else:
                prev = st["prev_sample"]
                u_s = prev if (layout == self._layout and prev.numel() == g_s.numel()) \
                    else torch.zeros_like(g_s)
                pending["prev_sample"] = g_s
            self._layout = layout
            cos = torch.dot(g_s, u_s) / (torch.linalg.vector_norm(g_s)
                                         * torch.linalg.vector_norm(u_s))
            cos = torch.nan_to_num(cos, nan=0.0, posinf=0.0, neginf=0.0).clamp(-1.0, 1.0)
            if not self._have_init:
                # once: S_0 = init_step * ||theta|| / lr (inf if that is 0, not finite, or no lr)
                s0 = torch.full_like(st["step_limit"], math.inf)
                if self._lr is not None:
                    pnorm = torch.linalg.vector_norm(torch.stack(
                        torch._foreach_norm([p.detach() for p in params]))).to(torch.float32)
                    s0 = self.init_step * pnorm / self._lr
                    s0 = torch.where(torch.isfinite(s0) & (s0 > 0), s0,
                                     torch.full_like(s0, math.inf))
                st["init_limit"] = s0  # a constant of the run, set on the first step
                self._have_init = True
            S = torch.where(st["started"], st["step_limit"], st["init_limit"])
            prev_n = st["prev_norm"]
            grow = torch.where((st["count"] > 0) & (prev_n > S), S * torch.exp(self.beta * cos), S)
            shrink = torch.minimum(S, prev_n) * torch.exp(self.beta * cos)
            new_S = torch.where(cos < 0, shrink, grow)
            floor = torch.where(st["count"] > 0, self.floor * torch.exp(st["log_raw"]),
                                torch.zeros_like(new_S))
            pending["step_limit"] = torch.maximum(new_S, floor)
            # this step is clipped with the S in force before it (S from step t-1's evidence)
            self._S_now = S
            pending["S_now"] = S
            pending["started"] = torch.ones_like(st["started"])
        self._pending = pending
        try:
            return super().clip_(params, grads, norms, apply=apply,
                                 propagate_nonfinite=propagate_nonfinite)
        finally:
            self._S_now = None

    def observe(self, norms: GradNorms, accept: Tensor) -> None:
        st = self._ensure(norms.total)
        pending = self._pending if self._pending is not None else dict(st)
        self._pending = None
        total = norms.total.detach()
        accept = accept & torch.isfinite(total) & (total > 0)
        self._S_now = pending.get("S_now")
        thr = self.threshold(total)
        self._S_now = None
        clipped = torch.minimum(total, thr)
        first = st["count"] == 0
        a = self.ema
        log_level = torch.where(first, torch.log(clipped),
                                a * st["log_level"] + (1 - a) * torch.log(clipped))
        log_raw = torch.where(first, torch.log(total), a * st["log_raw"] + (1 - a) * torch.log(total))
        sq_level = st["sq_level"]
        if self._mode == _ADAPTIVE:  # the default modes do not pay for it
            sq_level = torch.where(st["count"] > 0, self._v(st), sq_level)
            # bias-corrected EMA of the squared clipped norm, in the incremental form
            # v_t = v_{t-1} + w_t (x^2 - v_{t-1}),  w_t = (1 - b) / (1 - b^t)  (w_1 = 1)
            b = torch.full_like(sq_level, self._beta2)
            n = (st["count"] + 1).to(torch.float32)
            w = (1 - b) / (1 - torch.pow(b, n))
            sq_level = sq_level + w * (clipped * clipped - sq_level)
        new = {
            "step_limit": _keep(accept, pending["step_limit"], st["step_limit"]),
            "log_level": _keep(accept, log_level, st["log_level"]),
            "log_raw": _keep(accept, log_raw, st["log_raw"]),
            "sq_level": _keep(accept, sq_level, st["sq_level"]),
            "prev_norm": _keep(accept, total, st["prev_norm"]),
            "count": st["count"] + accept.to(torch.int64),
            "started": _keep(accept, pending["started"], st["started"]),
            "init_limit": st["init_limit"],
        }
        ps, old = pending["prev_sample"], st["prev_sample"]
        new["prev_sample"] = _keep(accept, ps, old) if ps.shape == old.shape else (
            torch.where(accept, ps, torch.zeros_like(ps)))
        self._state = new

    def state_dict(self) -> dict[str, Any]:
        if self._state is None:
            return {"initialized": False}
        sd: dict[str, Any] = {k: v.clone() for k, v in self._state.items()}
        sd["initialized"] = True
        sd["layout"] = list(self._layout[1]) if self._layout is not None else None
        sd["have_init"] = self._have_init
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict.get("initialized", False):
            self._state, self._layout, self._have_init = None, None, False
            return
        self._state = {k: state_dict[k].clone() for k in (
            "step_limit", "log_level", "log_raw", "prev_norm", "count", "started", "init_limit",
            "prev_sample")}
        sq = state_dict.get("sq_level")  # absent in states saved before the adaptive mode
        self._state["sq_level"] = sq.clone() if sq is not None else torch.zeros_like(
            self._state["log_level"])
        self._have_init = bool(state_dict.get("have_init", False))
        lay = state_dict.get("layout")
        self._layout = None if lay is None else (len(lay), tuple(int(n) for n in lay))


def default_clipper() -> OvershootClip:
    """The clipper ``Guard`` uses when none is given (``clipper="auto"``): ``OvershootClip()``."""
    return OvershootClip()
