"""Adaptive clipping: thresholds that follow the run instead of a number the user tunes.

Size: three façades (AutoClip, ZClip, OvershootClip) share the threshold-clipper base and their
optimizer binding; the math is in ``gradguard.rules``, one file per rule.

``AutoClip``       the p-th percentile of past global norms (Seetharaman et al. 2020)
``ZClip``          EMA z-score of the global norm with the reciprocal threshold (Kumar et al. 2025)
``OvershootClip``  the threshold-free default of ``Guard``: the threshold shrinks when an update
                   overshoots (the next gradient points back against it) and grows while
                   updates keep agreeing; see ``docs/adaptive.md``
``SpikeSkip``      the Guard's skip rule (``gradguard.skip``; importable from here too)

Each class is a torch façade over its pure rule in ``gradguard.rules`` (the math and the paper
citation are there): it holds the rule's state (a NamedTuple of tensors on the gradients'
device), asks the rule for this step's threshold (``step_threshold``, from the committed
state alone, so ``coefficient()`` and ``clip_(apply=False)`` agree), applies it through the
shared ``ScalarClipper.clip_`` path, and in ``observe`` commits the rule's proposed state where
the step was accepted.

Shared guarantees (tested in ``tests/test_adaptive*.py`` and ``tests/test_rules.py``):

* state lives on the gradients' device in fixed-size tensors (O(1) or O(window) memory); the
  per-step cost does not grow with the number of steps;
* nothing here reads a tensor on the host in the per-step path (no ``.item()``, ``bool()``,
  ``float()``, ``tolist()``): thresholds and decisions stay device tensors;
* non-finite or skipped steps never enter the statistics (``rules.commit``);
* ``state_dict()`` / ``load_state_dict()`` hold tensors and plain numbers only (loadable with
  ``torch.load(weights_only=True)``), states saved by earlier versions load, and a resumed run
  continues bit-for-bit;
* a bad hyperparameter raises ``ValueError`` (``TypeError`` for a non-number) naming it.

Norms are float32 gradient norms (the units of the gradients, p-norm of the clipper's
``norm_type``, 2 by default); thresholds are in the same units.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._validate import int_at_least as _int_at_least
from .clippers import ScalarClipper
from .norms import GradNorms
from .rules import autoclip as _autoclip
from .rules import overshoot as _overshoot
from .rules import zclip as _zclip
from .rules.xp_torch import TORCH
from .skip import SpikeSkip

__all__ = ["AutoClip", "OvershootClip", "SpikeSkip", "ZClip", "default_clipper"]


def _to(state: Any, device: torch.device) -> Any:
    return type(state)(*(t.to(device) for t in state))


class _RuleClipper(ScalarClipper):
    """A ``ScalarClipper`` whose state is a rule's NamedTuple, created on first use on the
    norms' device (and moved with them)."""

    strict = True
    _state: Any = None

    def _init_state(self, like: Tensor) -> Any:
        raise NotImplementedError

    def _ensure(self, like: Tensor) -> Any:
        st = self._state
        if st is None:
            st = self._state = self._init_state(like)
        elif st[0].device != like.device:
            st = self._state = _to(st, like.device)
        return st


# -- AutoClip -----------------------------------------------------------------------------
class AutoClip(_RuleClipper):
    """Clip the global norm to the p-th percentile of the norms seen so far (AutoClip).

    Seetharaman et al. 2020 (``rules.autoclip``): clip to ``percentile(H + [||g_t||], p)``,
    H the accepted norms so far. The current norm takes part in its own percentile, so the
    first step is never clipped and ``percentile=100`` never clips.

    Args:
        percentile: p in (0, 100]; 10 is the paper's "set-and-forget" value (about 90 % of the
            steps get clipped); 100 never clips.
        window: None (default) keeps the **full history**: the first 1024 accepted norms
            exactly (the percentile is exact while they are all there), and every norm in a
            log-binned histogram on the device that records each bin's count, smallest and
            largest value (``bins`` bins over ``[lo, hi]``; memory O(bins)). Past 1024 norms
            the estimate ``q_hat`` of the exact percentile ``q`` satisfies ``q / r <= q_hat
            <= q * r``, ``r = (hi / lo) ** (1 / bins)`` (a relative error below 0.68 % with
            the defaults 8192, 1e-12, 1e12; proof in ``rules.autoclip``). An int >= 2 keeps
            the last ``window`` accepted norms exactly.

    Note: percentile rules follow the norms wherever they go: if training starts to diverge,
    the norms and the threshold grow together (see ``docs/adaptive.md``).
    """

    def __init__(self, percentile: float = 10.0, window: int | None = None, *,
                 bins: int = 8192, lo: float = 1e-12, hi: float = 1e12):
        self.cfg = _autoclip.config(percentile, window, bins=bins, lo=lo, hi=hi)
        self.percentile = self.cfg.percentile
        self.window = self.cfg.window

    def __repr__(self) -> str:
        return f"AutoClip(percentile={self.percentile}, window={self.window})"

    def _init_state(self, like: Tensor) -> Any:
        return _autoclip.init(self.cfg, TORCH, like)

    def step_threshold(self, total: Tensor) -> Tensor:
        return _autoclip.threshold(self.cfg, self._ensure(total), total, TORCH)

    def threshold(self, like: Tensor) -> Tensor:
        """The percentile of the history alone (inf before the first accepted norm)."""
        nan = torch.full((), math.nan, dtype=torch.float32, device=like.device)
        return _autoclip.threshold(self.cfg, self._ensure(like), nan, TORCH)

    def observe(self, norms: GradNorms, accept: Tensor) -> None:
        total = norms.total.detach()
        st = self._ensure(total)
        # propose(..., accept) is the committed state (no extra pass over the bins)
        self._state = _autoclip.propose(self.cfg, st, total, TORCH, accept=accept)

    def count(self) -> Tensor:
        """int64 0-d tensor: norms in the history (capped at ``window`` in window mode)."""
        st = self._state
        if st is None:
            return torch.zeros((), dtype=torch.int64)
        if self.window is not None:
            return st.count.clamp(max=self.window)
        return st.n

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"percentile": self.percentile, "window": self.window}
        st = self._state
        c = self.cfg
        if self.window is not None:
            sd["store"] = {"size": self.window,
                           "values": None if st is None else st.values.clone(),
                           "count": None if st is None else st.count.clone()}
            return sd
        sd["store"] = {"bins": c.bins, "lo": c.lo, "hi": c.hi,
                       "counts": None if st is None else st.counts.clone()}
        if st is not None:
            sd["exact"] = {"values": st.exact.clone(), "count": st.n_exact.clone()}
            sd["bin_min"], sd["bin_max"] = st.bin_min.clone(), st.bin_max.clone()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("window") != self.window:
            raise ValueError(f"AutoClip state has window={state_dict.get('window')}, "
                             f"this clipper window={self.window}")
        store = state_dict["store"]
        c = self.cfg
        if self.window is not None:
            if int(store["size"]) != self.window:
                raise ValueError(f"window size differs: saved {store['size']}, "
                                 f"this one {self.window}")
            self._state = None if store["values"] is None else _autoclip.WindowState(
                store["values"].clone(), store["count"].clone())
            return
        if (int(store["bins"]), float(store["lo"]), float(store["hi"])) != (c.bins, c.lo, c.hi):
            raise ValueError(
                f"histogram layout differs: saved bins={store['bins']} lo={store['lo']} "
                f"hi={store['hi']}, this one bins={c.bins} lo={c.lo} hi={c.hi}")
        counts = store["counts"]
        if counts is None:
            self._state = None
            return
        counts = counts.clone().to(torch.int64)
        fresh = _autoclip.init(c, TORCH, counts)
        exact = state_dict.get("exact")
        if exact is None:
            # saved before the exact buffer and the per-bin extremes: the exact history is
            # unknown (the histogram answers from now on) and the bin edges stand in
            lower, upper = _autoclip.bin_edges(c, TORCH, counts)
            seen = counts > 0
            bmin = torch.where(seen, lower, fresh.bin_min)
            bmax = torch.where(seen, upper, fresh.bin_max)
            ex, n_ex = fresh.exact, fresh.n_exact
        else:
            ex, n_ex = exact["values"].clone(), exact["count"].clone()
            bmin, bmax = state_dict["bin_min"].clone(), state_dict["bin_max"].clone()
        self._state = _autoclip.HistoryState(ex, n_ex, counts, bmin, bmax, counts.sum())


# -- ZClip --------------------------------------------------------------------------------
class ZClip(_RuleClipper):
    """EMA z-score clipping of the global norm (Kumar et al. 2025, "ZClip"; ``rules.zclip``).

    State: EMA mean ``mu`` and variance ``var`` of the norm, ``sigma = sqrt(var)``. The first
    ``warmup_steps`` accepted norms fill a buffer **raw**; then ``mu`` and ``var`` are their
    mean and population variance. After warm-up, for a norm ``g``:

        z        = (g - mu) / (sigma + eps)
        adaptive = mu + z_threshold**2 * sigma / z     if z > z_threshold   (the reciprocal
                 = inf                                 otherwise            rule)
        thr      = min(adaptive, max_norm)             when max_norm is set

    and the gradient is clipped to ``thr``. Example: mu 1.0, sigma 0.1, g 2.0 give z 10 and
    thr 1.0625. The statistics are fed the adaptive clip value ``x = min(g, adaptive)``:
    ``mu <- alpha mu + (1 - alpha) x``, then ``var <- alpha var + (1 - alpha) (x - mu)**2``
    with the *updated* mean (as the paper's code). During warm-up the threshold is
    ``max_norm`` (no clipping when None).

    ``max_norm`` bounds what is applied, never what is learnt, as in the paper's code: the
    warm-up buffer holds raw norms and the EMA the adaptive value, not ``min(g, max_norm)``
    (a cap below the typical norm would otherwise make the mean ``max_norm``, the std 0, and
    every later step a spike). Unlike the reference code, ``max_norm`` defaults to None (no
    fixed cap) and a NaN never enters the statistics.
    """

    def __init__(self, alpha: float = 0.97, z_threshold: float = 2.5, warmup_steps: int = 25,
                 max_norm: float | None = None, eps: float = 1e-6):
        self.cfg = _zclip.config(alpha, z_threshold, warmup_steps, max_norm, eps)
        self.alpha, self.z_threshold, self.warmup_steps, self.max_norm, self.eps = self.cfg

    def __repr__(self) -> str:
        return (f"ZClip(alpha={self.alpha}, z_threshold={self.z_threshold}, "
                f"warmup_steps={self.warmup_steps}, max_norm={self.max_norm})")

    def _init_state(self, like: Tensor) -> Any:
        return _zclip.init(self.cfg, TORCH, like)

    @property
    def mean(self) -> Tensor | None:
        """EMA mean of the fed norms (meaningful once warm-up is over)."""
        return None if self._state is None else self._state.mean

    @property
    def std(self) -> Tensor | None:
        """EMA standard deviation of the fed norms."""
        return None if self._state is None else torch.sqrt(self._state.var)

    def step_threshold(self, total: Tensor) -> Tensor:
        return _zclip.threshold(self.cfg, self._ensure(total), total, TORCH)

    def threshold(self, like: Tensor) -> Tensor:
        """Where clipping starts for the next step: ``mu + z_threshold * sigma`` (capped by
        ``max_norm``); ``max_norm`` or inf during warm-up."""
        return _zclip.onset(self.cfg, self._ensure(like), TORCH)

    def observe(self, norms: GradNorms, accept: Tensor) -> None:
        total = norms.total.detach()
        st = self._ensure(total)
        _, self._state = _zclip.update(self.cfg, st, total, TORCH, accept=accept)

    def state_dict(self) -> dict[str, Any]:
        st = self._state
        if st is None:
            return {"initialized": False}
        return {"initialized": True, "mean": st.mean.clone(), "var": st.var.clone(),
                "count": st.count.clone(), "buffer": st.buffer.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict.get("initialized", False):
            self._state = None
            return
        if state_dict["buffer"].numel() != self.warmup_steps:
            raise ValueError(f"ZClip state has warmup_steps={state_dict['buffer'].numel()}, "
                             f"this clipper warmup_steps={self.warmup_steps}")
        self._state = _zclip.State(*(state_dict[k].clone()
                                     for k in ("mean", "var", "count", "buffer")))


# -- OvershootClip: the threshold-free default ---------------------------------------------
_SGD_MOMENTUM = "momentum"   # update direction: SGD's momentum buffer
_SGD_PLAIN = "sgd"           # update direction: the last accepted gradient (a sample of it)
_ADAPTIVE = "adaptive"       # optimizer_scale with Adam & co.: the cap follows the optimizer's v
_CAP_ONLY = "cap"            # no step-size control, geometric spike cap only
_TRUST = "trust"             # plain SGD: no step longer than trust * ||theta_0||
_LEVEL = "level"             # Adam & co.: cap at level_factor x the recent raw level

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


class _Direction(NamedTuple):
    """What ``OvershootClip.clip_`` measures for the ``observe`` of the same step:
    ``cos(g_t, u_{t-1})`` (0-d) and, in mode "sgd", the strided sample of ``g_t`` (else None)."""

    cos: Tensor
    sample: Tensor | None


class OvershootClip(_RuleClipper):
    """The threshold-free default: a global-norm clip whose threshold no user sets, chosen by
    the optimizer (``rules.overshoot`` has the math, ``docs/adaptive.md`` the measurements).

    * **SGD with momentum: step-size control S.** The clip threshold sets the step length
      ``lr * min(||g||, S)``. At each step the new gradient ``g_t`` is compared with the
      direction of the last update ``u_{t-1}`` (SGD's momentum buffer):
      ``c_t = cos(g_t, u_{t-1})``; ``-g_t . u_{t-1}`` is the derivative of the loss with
      respect to the last step's length (the "hypergradient" of Baydin et al. 2018), so

          c_t < -c0 (the step overshot):      S <- S * exp(beta * c_t)
          c_t >= -c0, last step clipped:      S <- S * exp(beta * (c_t + c0))
          otherwise                           S unchanged
          always                              S >= floor * geometric-mean level of raw norms

      ``c0 = deadband`` (0.3): a weakly negative cosine is minibatch noise, not overshoot.
      S starts at ``init_step * ||theta_0|| / lr`` (a first step that moves the parameters
      by 1 % of their norm) and finds the edge of stability from below.
    * **SGD without momentum: a relative trust region.** No step moves the parameters by more
      than ``trust`` (3 %) of their initial norm: ``S_t = trust * ||theta_0|| / lr_t`` with
      the learning rate of each step (schedules and warmup included). Successive minibatch
      gradients are too noisy a direction to learn S from (``use_last_gradient=True`` keeps
      that older controller, opt-in). No spike cap on top: at a small lr the region is far
      above the norms and lets a recurrent net's gradient burst through.
    * **Adam, AdamW, RMSprop, ... (the update does not scale with the gradient): the level
      cap.** ``threshold = level_factor * exp(level_raw)``, twice the geometric mean of the
      recent raw norms (EMA ``ema`` of their log): a batch far above the others is held to
      twice the level, so it cannot dominate the first moment nor inflate the second; a rise
      of all norms is followed at the EMA's pace.

    **Spike cap** (momentum SGD and unknown optimizers; plain SGD only while the parameter
    norm is unknown): ``level`` is the EMA (``ema``) of the log of
    accepted, clipped norms, so a norm above ``spike_factor * exp(level)`` is clipped;
    feeding the clipped value keeps an explosion from dragging the cap up with it. When no
    optimizer is known (``Guard.clip``) only this cap acts.

    **Opt-in, adaptive optimizers** (``optimizer_scale=True``): instead of the level cap,
    ``spike_factor * sqrt(v)``, ``v`` the bias-corrected EMA of the squared accepted, clipped
    global norm with the optimizer's second-moment decay (Adam's ``betas[1]``).

    The S in force at a step comes from the evidence of the step before, so the threshold of
    a step depends on the state alone (``coefficient()`` and ``clip_(apply=False)`` agree).
    The rule needs the optimizer: the Guard hands it over through ``bind_optimizer`` at every
    step (which also reads the current learning rate). Cost per step: with momentum one cosine
    over at most ``sample`` strided gradient elements; O(1) scalar updates otherwise.
    """

    def __init__(self, *, beta: float = 0.1, init_step: float = 1e-2, floor: float = 0.02,
                 spike_factor: float = 3.0, ema: float = 0.95, sample: int = 65536,
                 use_last_gradient: bool = False, optimizer_scale: bool = False,
                 trust: float = 0.03, level_factor: float = 2.0, deadband: float = 0.3):
        self._kw = {"beta": beta, "init_step": init_step, "floor": floor,
                    "spike_factor": spike_factor, "ema": ema, "trust": trust,
                    "level_factor": level_factor, "deadband": deadband}
        self.cfg = _overshoot.config(_CAP_ONLY, **self._kw)
        self.beta, self.init_step, self.floor = self.cfg.beta, self.cfg.init_step, self.cfg.floor
        self.spike_factor, self.ema = self.cfg.spike_factor, self.cfg.ema
        self.trust, self.level_factor = self.cfg.trust, self.cfg.level_factor
        self.deadband = self.cfg.deadband
        self.sample = _int_at_least(sample, "sample", 1)
        self.use_last_gradient = bool(use_last_gradient)
        self.optimizer_scale = bool(optimizer_scale)
        self._optimizer: torch.optim.Optimizer | None = None
        self._lr: Any = None
        self._state: _overshoot.State | None = None
        self._prev_sample: Tensor | None = None   # mode "sgd": sample of the last gradient
        self._layout: tuple[int, tuple[int, ...]] | None = None
        self._have_init = False
        self._pp_group: Any = None  # pipeline stages: S_0 from the whole model's parameters
        # the direction of the step in progress: measured by clip_ from the gradients before
        # they are scaled, consumed by the observe that follows (one step; never saved)
        self._measured: _Direction | None = None

    def __repr__(self) -> str:
        return (f"OvershootClip(beta={self.beta}, init_step={self.init_step}, floor={self.floor}, "
                f"spike_factor={self.spike_factor}, ema={self.ema}, trust={self.trust}, "
                f"level_factor={self.level_factor}, deadband={self.deadband}, "
                f"mode={self.mode!r})")

    @property
    def mode(self) -> str:
        """"momentum", "sgd" (step-size control on), "trust" (plain SGD: relative trust
        region), "level" (Adam & co.: cap at ``level_factor`` times the raw level), "adaptive"
        (``optimizer_scale``: cap at ``spike_factor`` times the RMS level of the optimizer's
        second moment) or "cap" (geometric spike cap only)."""
        return self.cfg.mode

    @property
    def _beta2(self) -> float:
        return self.cfg.beta2

    # -- optimizer ------------------------------------------------------------------------
    def bind_groups(self, process_group: Any = None, pp_group: Any = None) -> None:
        """The Guard's groups (``gradguard.protocols.GroupAware``): under pipeline parallelism
        ``S_0`` is taken from the parameter norm of every stage together, so that every stage
        starts from the same limit. Data-parallel replicas hold the same parameters already."""
        self._pp_group = pp_group

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Learn the optimizer's kind and learning rate (called by ``Guard.step``; cheap).

        The first time step-size control is on, ``S_0 = init_step * ||theta|| / lr`` is set
        from the parameters that have a gradient (all of them when none has)."""
        groups = optimizer.param_groups
        self._lr = _step_lr(groups)
        if optimizer is not self._optimizer:
            self._optimizer = optimizer
            self.cfg = _overshoot.config(self._mode_for(optimizer), beta2=self._beta2_for(
                optimizer), **self._kw)
        if self.mode in (*_overshoot.STEP_CONTROL, _TRUST) and not self._have_init:
            params = [p for g in groups for p in g["params"]]
            with_grad = [p for p in params if p.grad is not None]
            params = with_grad or params
            if params:
                if self._pp_group is not None or any(type(p).__name__ == "DTensor" for p in params):
                    from .norms import compute_norms  # FSDP2 / TP / PP: the global norm
                    pnorm = compute_norms([p.detach() for p in params],
                                          pp_group=self._pp_group).total.to(torch.float32)
                else:
                    pnorm = torch.linalg.vector_norm(torch.stack(
                        torch._foreach_norm([p.detach() for p in params]))).to(torch.float32)
                st = self._ensure(pnorm)
                s0 = _overshoot.initial_limit(self.cfg, pnorm, self._lr, TORCH)
                # constants of the run
                self._state = st._replace(init_limit=s0, param_norm=pnorm.reshape(()))
                self._have_init = True

    def _mode_for(self, optimizer: torch.optim.Optimizer) -> str:
        if isinstance(optimizer, torch.optim.SGD):
            if all(g.get("momentum", 0.0) > 0 for g in optimizer.param_groups):
                return _SGD_MOMENTUM
            # without momentum the only direction is the last minibatch gradient, a noisy
            # proxy biased towards "shorter": measured, it over-clips, so it is opt-in
            return _SGD_PLAIN if self.use_last_gradient else _TRUST
        if isinstance(optimizer, _ADAPTIVE_OPTIMIZERS) or "betas" in getattr(
                optimizer, "defaults", {}):
            return _ADAPTIVE if self.optimizer_scale else _LEVEL
        return _CAP_ONLY

    def _beta2_for(self, optimizer: torch.optim.Optimizer) -> float:
        if self._mode_for(optimizer) == _ADAPTIVE:
            return _second_moment_decay(optimizer)
        return 0.999

    # -- the rule -------------------------------------------------------------------------
    def _init_state(self, like: Tensor) -> _overshoot.State:
        return _overshoot.init(self.cfg, TORCH, like)

    def step_threshold(self, total: Tensor) -> Tensor:
        return _overshoot.threshold(self.cfg, self._ensure(total), TORCH, self._lr)

    def threshold(self, like: Tensor) -> Tensor:
        """``min(S, spike_factor * exp(level))`` (mode "trust": ``trust * ||theta_0|| / lr``
        alone); "level": ``level_factor * exp(level_raw)``; "adaptive": ``spike_factor *
        sqrt(v)``; inf before the first accepted step (unless S was set from the parameter
        norm)."""
        return _overshoot.threshold(self.cfg, self._ensure(like), TORCH, self._lr)

    def _flat_sample(self, tensors: list[Tensor]) -> Tensor:
        total = sum(t.numel() for t in tensors)
        stride = max(1, -(-total // self.sample))
        parts = [t.detach().reshape(-1)[::stride] for t in tensors]
        return torch.cat(parts).to(torch.float32) if parts else torch.zeros(0)

    def _direction(self, like: Tensor, params: list[Tensor], grads: list[Tensor],
                   plan: Any = None) -> _Direction:
        """Measure ``cos(g_t, u_{t-1})`` from these gradients (and, in mode "sgd", the sample
        of ``g_t`` that becomes the next step's direction). ``plan``: the norms'
        ``gradguard.distributed`` plan (FSDP2, TP, pipeline): the cosine's sums come from every
        rank's shards, reduced over the same groups, so every rank gets the same."""
        if not grads:
            return _Direction(torch.zeros((), dtype=torch.float32, device=like.device), None)
        opt_state = self._optimizer.state if self._optimizer is not None else {}
        if plan is not None and (plan.roots or plan.pp_group is not None):
            if self.mode != _SGD_MOMENTUM:
                raise NotImplementedError("OvershootClip(use_last_gradient=True) does not support "
                                          "sharded or pipelined gradients; use SGD with momentum")
            from . import distributed
            bufs = [opt_state.get(p, {}).get("momentum_buffer") for p in params]
            if any(b is None for b in bufs):
                return _Direction(torch.zeros((), dtype=torch.float32, device=like.device), None)
            dot, gn, un = distributed.sample_dot_norms(grads, bufs, self.sample, plan)
            return _Direction(_overshoot.cosine(dot, gn, un, TORCH), None)
        layout = (len(grads), tuple(g.numel() for g in grads))
        g_s = self._flat_sample(grads)
        new_prev = None
        if self.mode == _SGD_MOMENTUM:
            bufs = [opt_state.get(p, {}).get("momentum_buffer") for p in params]
            u_s = torch.zeros_like(g_s) if any(b is None for b in bufs) else \
                self._flat_sample(bufs)  # type: ignore[arg-type]
        else:
            prev = self._prev_sample
            u_s = prev if (prev is not None and layout == self._layout
                           and prev.numel() == g_s.numel()) else torch.zeros_like(g_s)
            new_prev = g_s
        self._layout = layout
        cos = _overshoot.cosine(torch.dot(g_s, u_s), torch.linalg.vector_norm(g_s),
                                torch.linalg.vector_norm(u_s), TORCH)
        return _Direction(cos, new_prev)

    def clip_(self, params, grads, norms, *, apply=True, propagate_nonfinite=False):
        """Clip with the threshold in force (from the committed state alone), after measuring
        the step's direction from the gradients as they are, before they are scaled."""
        self._measured = (self._direction(norms.total, params, grads,
                                          getattr(norms, "plan", None))
                          if self.mode in _overshoot.STEP_CONTROL else None)
        return super().clip_(params, grads, norms, apply=apply,
                             propagate_nonfinite=propagate_nonfinite)

    def observe(self, norms: GradNorms, accept: Tensor) -> None:
        """Commit this step: the rule's update with the direction ``clip_`` measured (an
        ``observe`` without a ``clip_`` before it measures from the bound optimizer's
        parameters now)."""
        total = norms.total.detach()
        st = self._ensure(total)
        measured, self._measured = self._measured, None
        if self.mode in _overshoot.STEP_CONTROL and measured is None:
            opt = self._optimizer
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None] \
                if opt is not None else []
            measured = self._direction(total, params, [p.grad for p in params],
                                       getattr(norms, "plan", None))
        cos = None if measured is None else measured.cos
        _, self._state = _overshoot.update(self.cfg, st,
                                           _overshoot.Observation(total, cos, self._lr),
                                           TORCH, accept=accept)
        new_prev = None if measured is None else measured.sample
        if new_prev is not None:
            ok = accept & torch.isfinite(total) & (total > 0)
            old = self._prev_sample
            self._prev_sample = torch.where(ok, new_prev, old) if (
                old is not None and old.shape == new_prev.shape) else torch.where(
                ok, new_prev, torch.zeros_like(new_prev))

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        st = self._state
        if st is None:
            return {"initialized": False}
        sd: dict[str, Any] = {k: v.clone() for k, v in st._asdict().items()}
        sd["prev_sample"] = (self._prev_sample.clone() if self._prev_sample is not None
                             else torch.zeros(0, dtype=torch.float32, device=st.count.device))
        sd["initialized"] = True
        sd["layout"] = list(self._layout[1]) if self._layout is not None else None
        sd["have_init"] = self._have_init
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict.get("initialized", False):
            self._state, self._layout, self._have_init = None, None, False
            self._prev_sample = None
            return
        late = ("sq_level", "param_norm")  # absent in states saved before those modes
        fields = {k: state_dict[k].clone() for k in _overshoot.State._fields if k not in late}
        for k in late:
            v = state_dict.get(k)
            fields[k] = v.clone() if v is not None else torch.zeros_like(fields["log_level"])
        self._state = _overshoot.State(**fields)
        ps = state_dict.get("prev_sample")
        self._prev_sample = ps.clone() if ps is not None and ps.numel() else None
        self._have_init = bool(state_dict.get("have_init", False))
        lay = state_dict.get("layout")
        self._layout = None if lay is None else (len(lay), tuple(int(n) for n in lay))


def _step_lr(groups: list[dict[str, Any]]) -> Any:
    """The learning rate the rule reads: the largest over the groups when they are numbers
    (the fastest group bounds the step), else the first group's (a tensor lr)."""
    lrs = [g.get("lr") for g in groups]
    if lrs and all(isinstance(v, (int, float)) for v in lrs):
        return max(lrs)
    return lrs[0] if lrs else None


def default_clipper() -> OvershootClip:
    """The clipper ``Guard`` uses when none is given (``clipper="auto"``): ``OvershootClip()``."""
    return OvershootClip()
