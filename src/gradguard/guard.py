"""The Guard: one training step as norms -> clipper -> skip rule -> apply -> optimizer -> monitor.

    loss.backward()
    guard.step(optimizer, loss=loss)

What one ``step`` does, in order:

1. unscale: with a ``torch.amp.GradScaler``, ``scaler.unscale_(optimizer)`` unless the caller
   already did (never twice);
2. norms: one multi-tensor read of the gradients gives per-tensor and total norms (float32);
3. clipper: the clip coefficient, a device tensor;
4. skip rule: ``skip = nonfinite | spike``, a device tensor;
5. apply + optimizer:
   * fused optimizers (``fused=True`` Adam, AdamW, SGD, Adagrad): the coefficient and the skip
     flag are handed over as the optimizer's ``grad_scale = 1/coef`` and ``found_inf = skip``,
     so clipping costs no extra pass and skipping no host read: the fused kernel divides the
     gradient as it reads it and returns early when ``found_inf`` is set;
   * other optimizers: the gradients are multiplied in place by the coefficient
     (``torch._foreach_mul_``, no host read), and when a step can be skipped the skip flag
     is read on the host once (one synchronisation per step: the price of not calling
     ``optimizer.step()``). With ``on_nonfinite="propagate"`` and no skip rule there is no
     host read at all;
   * with a GradScaler: ``scaler.step(optimizer)``, which makes the scaler's own host read;
6. adaptive statistics are updated with accepted steps only; the monitor records the step.

A skipped step leaves parameters, optimizer state and clipper state bit-for-bit unchanged.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import Tensor

from ._validate import check_grads
from .clippers import Clipper, ClipStats
from .errors import GradientExplosionError, NonFiniteGradientError
from .norms import GradNorms, compute_norms

POLICIES = ("skip", "raise", "zero", "propagate")


def _named_params(model_or_parameters: Any) -> tuple[list[str], list[Tensor]]:
    if isinstance(model_or_parameters, torch.nn.Module):
        pairs = [(n, p) for n, p in model_or_parameters.named_parameters() if p.requires_grad]
    else:
        if isinstance(model_or_parameters, Tensor):
            model_or_parameters = [model_or_parameters]
        items = list(model_or_parameters)
        if items and isinstance(items[0], tuple):
            pairs = [(str(n), p) for n, p in items]
        else:
            pairs = [(f"param{i}", p) for i, p in enumerate(items)]
    for name, p in pairs:
        if not isinstance(p, Tensor):
            raise TypeError(f"model_or_parameters: {name} is a {type(p).__name__}, not a tensor")
    if not pairs:
        raise ValueError("model_or_parameters holds no parameters that require grad")
    return [n for n, _ in pairs], [p for _, p in pairs]


def _supports_device_scaling(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers whose step reads ``grad_scale`` / ``found_inf`` device tensors."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def _has_state(optimizer: torch.optim.Optimizer) -> bool:
    """True when every parameter with a gradient already has optimizer state."""
    state = optimizer.state
    return all(p in state and state[p] for g in optimizer.param_groups for p in g["params"]
               if p.grad is not None)


class _SkipCounter:
    """Consecutive skipped steps, counted on the device and read on the host late.

    On CUDA the count is copied to pinned host memory without waiting, and read once that
    copy has completed (one or two steps later); on the CPU it is read at once.
    """

    def __init__(self) -> None:
        self.device_count: Tensor | None = None
        self.host_count = 0
        self._pinned: Tensor | None = None
        self._event: Any = None

    def update_device(self, skip: Tensor) -> None:
        count = self.device_count if self.device_count is not None else torch.zeros(
            (), dtype=torch.int64, device=skip.device)
        self.device_count = torch.where(skip, count + 1, torch.zeros_like(count))
        if skip.device.type == "cuda":
            if self._event is None or self._event.query():
                if self._event is not None:
                    self.host_count = int(self._pinned.numpy())  # type: ignore[union-attr]
                if self._pinned is None:
                    self._pinned = torch.zeros((), dtype=torch.int64).pin_memory()
                self._pinned.copy_(self.device_count, non_blocking=True)
                self._event = torch.cuda.Event()
                self._event.record()
        else:
            self.host_count = int(self.device_count.numpy())

    def update_host(self, skipped: bool) -> None:
        self.host_count = self.host_count + 1 if skipped else 0
        self.device_count = None

    def state_dict(self) -> dict[str, Any]:
        count = self.host_count if self.device_count is None else int(self.device_count.cpu())
        return {"consecutive_skips": count}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.host_count = int(sd.get("consecutive_skips", 0))
        self.device_count = None
        self._event = None


class Guard:
    """Clip, decide, step or skip, and record: the training-step wrapper.

    Args:
        model_or_parameters: an ``nn.Module`` (parameters named by module path), an iterable
            of parameters, or of ``(name, parameter)`` pairs.
        clipper: a :class:`~gradguard.clippers.Clipper` (``NormClip``, ``ValueClip``, ``AGC``,
            an adaptive clipper); ``"auto"`` (the default) for the threshold-free rule
            :class:`~gradguard.adaptive.OvershootClip` (see ``docs/adaptive.md``); None for
            no clipping.
        skip: a skip rule (e.g. ``SpikeSkip``) with ``check(total_norm, loss) -> bool tensor``
            and ``observe(total_norm, loss, accept)``; None for none.
        monitor: a ``Monitor`` (or anything with ``record(stats, **fields)``); None for none.
        on_nonfinite: ``"skip"`` (no update; default), ``"raise"``
            (:class:`NonFiniteGradientError` naming the first non-finite parameter; one host
            read per step), ``"zero"`` (NaN/Inf elements set to 0, then clip; one host read
            per step), ``"propagate"`` (torch's behaviour).
        max_consecutive_skips: raise :class:`GradientExplosionError` after this many skipped
            steps in a row (None: never). On fused optimizers the count is read from the
            device late, so the error may come one or two steps after the limit.
        norm_type: p of the norms recorded when there is no clipper (default 2).
    """

    def __init__(self, model_or_parameters: Any, clipper: Clipper | str | None = "auto", *,
                 skip: Any = None, monitor: Any = None, on_nonfinite: str = "skip",
                 max_consecutive_skips: int | None = 10, norm_type: float = 2.0):
        if on_nonfinite not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {on_nonfinite!r}")
        if max_consecutive_skips is not None and (
                isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int)
                or max_consecutive_skips < 1):
            raise ValueError(f"max_consecutive_skips must be a positive int or None, got {max_consecutive_skips!r}")
        if isinstance(clipper, str):
            # "auto": the threshold-free default rule of gradguard.adaptive (issue 3)
            if clipper != "auto":
                raise ValueError(f"clipper must be a Clipper, 'auto' or None, got {clipper!r}")
            from .adaptive import default_clipper
            clipper = default_clipper()
        if clipper is not None and not isinstance(clipper, Clipper):
            raise TypeError(f"clipper must be a gradguard Clipper or None, got {type(clipper).__name__}")
        self.names, self.params = _named_params(model_or_parameters)
        self.clipper = clipper
        self.skip_rule = skip
        self.monitor = monitor
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.norm_type = clipper.norm_type if clipper is not None else float(norm_type)
        self.step_count = 0
        self._skipped_host = 0
        self._skipped_device: Tensor | None = None  # counted without host reads (fused path)
        self._skips = _SkipCounter()
        self._monitor_failed = False
        if monitor is not None and hasattr(monitor, "attach"):
            self._safe_monitor("attach", list(self.names), list(self.params))

    # -- the step ---------------------------------------------------------------------
    def clip(self, loss: Tensor | None = None) -> ClipStats:
        """Clip and record only; the caller steps the optimizer.

        The returned ``ClipStats.skipped`` (device tensor) says whether the update should be
        refused; reading it is the caller's host synchronisation.
        """
        self.step_count += 1
        _, grads, names, norms, stats = self._decide(loss, fold=False)
        self._record(stats, loss, None, None)
        return stats

    def step(self, optimizer: torch.optim.Optimizer, loss: Tensor | None = None,
             scaler: Any = None) -> ClipStats:
        """Clip, decide, then ``optimizer.step()`` or skip, and record. Returns ``ClipStats``
        with ``skipped`` set (device tensors: nothing here waits on the device)."""
        self.step_count += 1
        if hasattr(self.clipper, "bind_optimizer"):
            # adaptive clippers that read the optimizer (its kind, lr, momentum buffers)
            self.clipper.bind_optimizer(optimizer)  # type: ignore[union-attr]
        if scaler is not None and scaler.is_enabled():
            _unscale_once(scaler, optimizer)
        else:
            scaler = None
        # Before the optimizer has state for every parameter, a fused step skipped through
        # found_inf can leave state behind (fused SGD keeps an uninitialised momentum buffer),
        # so those first steps take the host-read path.
        fused = (scaler is None and _supports_device_scaling(optimizer)
                 and _has_state(optimizer))
        fold = fused and self.clipper is not None and self.clipper.scalar
        params, grads, names, norms, stats = self._decide(loss, fold=fold,
                                                          scaler_handles_nonfinite=scaler is not None)
        skip = stats.skipped
        if self.monitor is not None and hasattr(self.monitor, "before_step"):
            self._safe_monitor("before_step", step=self.step_count)
        if fused:
            optimizer.grad_scale = 1.0 / stats.clip_coef if fold else None  # type: ignore[attr-defined]
            optimizer.found_inf = skip.float()  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                optimizer.grad_scale = None  # type: ignore[attr-defined]
                optimizer.found_inf = None  # type: ignore[attr-defined]
                del optimizer.grad_scale, optimizer.found_inf
            self._skipped_device = skip.long() if self._skipped_device is None else self._skipped_device + skip
            self._skips.update_device(skip)
            self._check_consecutive()
        else:
            can_skip = bool(self._skip_rules()) or (self.on_nonfinite == "skip" and scaler is None)
            skipped = bool(skip) if can_skip else False  # the one documented host read
            if not skipped:
                if scaler is not None:
                    scaler.step(optimizer)
                else:
                    optimizer.step()
            if can_skip:
                self._skipped_host += int(skipped)
                self._skips.update_host(skipped)
                self._check_consecutive()
        self._record(stats, loss, optimizer, scaler)
        return stats

    @property
    def skipped_steps(self) -> int:
        """Updates refused so far (reading it waits for the device once)."""
        pending = 0 if self._skipped_device is None else int(self._skipped_device.cpu())
        return self._skipped_host + pending

    # -- pieces -----------------------------------------------------------------------
    def _grads(self) -> tuple[list[Tensor], list[Tensor], list[str]]:
        params, grads, names = [], [], []
        for n, p in zip(self.names, self.params):
            if p.grad is not None:
                params.append(p)
                grads.append(p.grad)
                names.append(n)
        check_grads(grads, names)
        return params, grads, names

    def _decide(self, loss, *, fold: bool, scaler_handles_nonfinite: bool = False):
        params, grads, names = self._grads()
        with_max = self._monitor_wants_max_abs()
        norms = compute_norms(grads, self.norm_type, with_max_abs=with_max)
        nonfinite = norms.nonfinite
        if self.on_nonfinite == "raise":
            self._raise_if_nonfinite(norms, names)
        elif self.on_nonfinite == "zero" and bool(nonfinite):
            for g in grads:
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
            norms = compute_norms(grads, self.norm_type, with_max_abs=with_max)
            nonfinite = norms.nonfinite
        propagate = self.on_nonfinite == "propagate"
        if self.clipper is not None:
            stats = self.clipper.clip_(params, grads, norms, apply=not fold,
                                       propagate_nonfinite=propagate)
        else:
            one = torch.ones((), dtype=torch.float32, device=norms.total.device)
            stats = ClipStats(norms.total, one, one < 0, nonfinite, norms.per_tensor)
        if self.on_nonfinite == "skip" and not scaler_handles_nonfinite:
            skip = nonfinite  # read-only from here on: every update below makes a new tensor
        else:
            skip = torch.zeros_like(nonfinite)
        rules = self._skip_rules()
        for rule in rules:
            skip = skip | rule.check(norms.total, loss)
        accept = ~(skip | nonfinite)
        if self.clipper is not None:
            self.clipper.observe(norms, accept)
        for rule in rules:
            rule.observe(norms.total, loss, accept)
        stats = dataclasses.replace(stats, skipped=skip, per_tensor_max_abs=norms.max_abs)
        return params, grads, names, norms, stats

    def _monitor_wants_max_abs(self) -> bool:
        # On the monitor's layer steps max |g| comes out of the norm pass (one read of memory).
        ask = getattr(self.monitor, "wants_max_abs", None)
        if ask is None:
            return False
        try:
            return bool(ask(self.step_count))
        except Exception:  # noqa: BLE001 - monitoring never takes training down
            return False

    def _skip_rules(self) -> list[Any]:
        """The skip rule, and the monitor when its detectors may refuse a step."""
        rules = [self.skip_rule] if self.skip_rule is not None else []
        if self.monitor is not None and getattr(self.monitor, "can_skip", False):
            rules.append(self.monitor)
        return rules

    def _raise_if_nonfinite(self, norms: GradNorms, names: list[str]) -> None:
        bad = ~torch.isfinite(norms.per_tensor)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise NonFiniteGradientError(
                f"step {self.step_count}: the gradient of {names[i]!r} is not finite "
                f"(norm {norms.per_tensor[i].item()}); it is the first such parameter",
                parameter=names[i], step=self.step_count)

    def _check_consecutive(self) -> None:
        limit = self.max_consecutive_skips
        if limit is not None and self._skips.host_count >= limit:
            raise GradientExplosionError(
                f"{self._skips.host_count} consecutive updates were refused (limit "
                f"max_consecutive_skips={limit}) at step {self.step_count}: the gradients "
                f"stay non-finite or spiking, training has diverged")

    def _record(self, stats: ClipStats, loss, optimizer, scaler) -> None:
        if self.monitor is None:
            return
        lr = None
        if optimizer is not None and optimizer.param_groups:
            lr = optimizer.param_groups[0].get("lr")
        loss_scale = getattr(scaler, "_scale", None) if scaler is not None else None
        self._safe_monitor("record", stats, step=self.step_count, loss=loss, lr=lr,
                           loss_scale=loss_scale)

    def _safe_monitor(self, method: str, *args, **kwargs) -> None:
        # Monitoring never takes training down: one warning, then carry on.
        try:
            getattr(self.monitor, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "gradguard_propagate", False):
                raise  # a detector whose action is "raise" (gradguard.monitor.AnomalyError)
            if not self._monitor_failed:
                warnings.warn(f"gradguard monitor failed in {method}() and is ignored from now "
                              f"on for this error: {exc!r}", RuntimeWarning, stacklevel=3)
            self._monitor_failed = True

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"step_count": self.step_count, "skipped_steps": self.skipped_steps}
        sd.update(self._skips.state_dict())
        if self.clipper is not None:
            sd["clipper"] = self.clipper.state_dict()
        if self.skip_rule is not None and hasattr(self.skip_rule, "state_dict"):
            sd["skip"] = self.skip_rule.state_dict()
        if self.monitor is not None and hasattr(self.monitor, "state_dict"):
            sd["monitor"] = self.monitor.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step_count = int(state_dict["step_count"])
        self._skipped_host = int(state_dict.get("skipped_steps", 0))
        self._skipped_device = None
        self._skips.load_state_dict(state_dict)
        if self.clipper is not None and "clipper" in state_dict:
            self.clipper.load_state_dict(state_dict["clipper"])
        if self.skip_rule is not None and "skip" in state_dict:
            self.skip_rule.load_state_dict(state_dict["skip"])
        if self.monitor is not None and "monitor" in state_dict and hasattr(self.monitor, "load_state_dict"):
            self.monitor.load_state_dict(state_dict["monitor"])

    def close(self) -> None:
        """Flush and close the monitor (if any)."""
        if self.monitor is not None and hasattr(self.monitor, "close"):
            self._safe_monitor("close")

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unscale_once(scaler: Any, optimizer: torch.optim.Optimizer) -> None:
    """``scaler.unscale_(optimizer)`` unless already done for this step (it raises if twice)."""
    try:
        from torch.amp.grad_scaler import OptState
        state = scaler._per_optimizer_states[id(optimizer)]["stage"]
        if state is OptState.UNSCALED:
            return
    except (ImportError, AttributeError, KeyError):
        pass
    scaler.unscale_(optimizer)

