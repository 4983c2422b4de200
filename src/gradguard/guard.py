"""The Guard: one training step as norms -> clipper -> skip rule -> apply -> optimizer -> monitor.

Size: the Guard's step, clip and state in one class (argument checks live in ``_validate``, the
apply helpers in ``_apply``).

    loss.backward()
    guard.step(optimizer, loss=loss)          # or guard.step([opt_a, opt_b], loss=loss)

What one ``step`` does, in order:

1. unscale: with a ``torch.amp.GradScaler``, ``scaler.unscale_(optimizer)`` unless the caller
   already did (never twice); the scaler's verdict (its per-optimizer ``found_inf`` device
   tensors) becomes part of the skip flag, so a step the scaler refuses is reported as skipped;
2. norms: one multi-tensor read of the gradients gives per-tensor and total norms (float32);
3. clipper: the clip coefficient, a device tensor;
4. skip rule: ``skip = nonfinite | spike`` (with a scaler: ``scaler found_inf | spike``), a
   device tensor;
5. apply + optimizer:
   * fused optimizers (``fused=True`` Adam, AdamW, SGD, Adagrad): the coefficient and the skip
     flag are handed over as the optimizer's ``grad_scale = 1/coef`` and ``found_inf = skip``,
     so clipping costs no extra pass and skipping no host read: the fused kernel divides the
     gradient as it reads it and returns early when ``found_inf`` is set;
   * other optimizers: the gradients are multiplied in place by the coefficient (no host
     read), and when a step can be skipped the skip flag is read on the host once (one
     synchronisation per step: the price of not calling ``optimizer.step()``). With
     ``on_nonfinite="propagate"`` and no skip rule there is no host read at all;
   * with a GradScaler: ``scaler.step(optimizer)``, which skips on its own ``found_inf``
     (a host read for non-fused optimizers, none for fused ones); the Guard adds no read
     unless a skip rule can refuse the step;
6. adaptive statistics are updated with accepted steps only; the monitor records the step;
   after ``max_consecutive_skips`` refused steps in a row the monitor is flushed and
   ``GradientExplosionError`` raised.

Several optimizers (e.g. one per parameter group kind) are stepped together by passing a list
or tuple: one global norm over every guarded parameter, one clip, one skip decision for all
of them, one monitor record (with every param group's learning rate).

A skipped step leaves parameters, optimizer state and clipper state bit-for-bit unchanged.
The Guard's collaborators are typed (``gradguard.protocols``): any object with the
``Clipper`` / ``SkipRule`` / ``Recorder`` shape works, subclass or not.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from . import _apply, _validate
from ._validate import check_grads, grads_ok
from .clippers import ClipStats
from .errors import GradientExplosionError, NonFiniteGradientError, warn
from .norms import GradNorms, compute_norms
from .protocols import (
    Clipper,
    GroupAware,
    LossScaler,
    OptimizerAware,
    Recorder,
    SkipRule,
    as_recorder,
    missing,
)

POLICIES = ("skip", "raise", "zero", "propagate")
_GRAD = operator.attrgetter("grad")


class Guard:
    """Clip, decide, step or skip, and record: the training-step wrapper.

    Args:
        model_or_parameters: an ``nn.Module`` (parameters named by module path, without the
            ``_orig_mod.`` of ``torch.compile`` and the ``module.`` of DDP), an iterable of
            parameters, of ``(name, parameter)`` pairs, or a ``{name: parameter}`` mapping.
        clipper: a clipper (``NormClip``, ``ValueClip``, ``AGC``, an adaptive clipper, or any
            object following :class:`gradguard.protocols.Clipper`); ``"auto"`` (the default)
            for the threshold-free rule :class:`~gradguard.adaptive.OvershootClip` (see
            ``docs/adaptive.md``); None for no clipping.
        skip: a skip rule (:class:`gradguard.protocols.SkipRule`, e.g. ``SpikeSkip``); None for
            none.
        monitor: a ``Monitor`` (:class:`gradguard.protocols.Recorder`), or any object with
            ``record(stats, **fields)``; None for none. Monitoring never raises into training.
        on_nonfinite: ``"skip"`` (no update; default), ``"raise"``
            (:class:`NonFiniteGradientError` naming the first non-finite parameter; one host
            read per step), ``"zero"`` (NaN/Inf elements set to 0, then clip; one host read
            per step), ``"propagate"`` (torch's behaviour).
        max_consecutive_skips: raise :class:`GradientExplosionError` after this many skipped
            steps in a row (None: never). Steps a GradScaler refuses count. On fused
            optimizers and with a GradScaler the count is read from the device late, so on
            CUDA the error may come one or two steps after the limit.
        norm_type: p of the norms recorded when there is no clipper (default 2).
        process_group: distributed data parallel: the group over which the plain-tensor
            gradients are replicated (taken from a ``DistributedDataParallel`` model when not
            given); the non-finite flag and the loss are reduced over it so that every rank
            decides alike. DTensor gradients (FSDP2, TP) need nothing: they carry their mesh.
        pp_group: pipeline parallel: the group (or 1-D DeviceMesh) of the ranks holding the
            other stages; the stages' norms, flags and losses are added over it. See
            ``docs/distributed.md``.
    """

    def __init__(self, model_or_parameters: Any, clipper: Clipper | str | None = "auto", *,
                 skip: SkipRule | None = None, monitor: Recorder | Any = None,
                 on_nonfinite: str = "skip", max_consecutive_skips: int | None = 10,
                 norm_type: float = 2.0, process_group: Any = None, pp_group: Any = None):
        if not isinstance(on_nonfinite, str) or on_nonfinite not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {on_nonfinite!r}")
        if max_consecutive_skips is not None:
            max_consecutive_skips = _validate.int_at_least(max_consecutive_skips,
                                                           "max_consecutive_skips", 1)
        norm_type = _validate.norm_type(norm_type)
        for arg, value in (("clipper", clipper), ("skip", skip), ("monitor", monitor)):
            if isinstance(value, type):
                raise TypeError(f"{arg} is the class {value.__name__}, not an object: pass an "
                                f"instance, e.g. {arg}={value.__name__}(...)")
        self.clipper = _validate.guard_clipper(clipper)
        if skip is not None and not isinstance(skip, SkipRule):
            hint = "; a clipper goes in clipper=" if isinstance(skip, Clipper) else ""
            raise TypeError(f"skip must be a skip rule (e.g. gg.SpikeSkip()) with "
                            f"check(total_norm, loss), observe(total_norm, loss, accept), "
                            f"state_dict() and load_state_dict(), got {type(skip).__name__} "
                            f"{skip!r}, which lacks {', '.join(missing(skip, SkipRule))}{hint}")
        self.names, self.params = _validate.guard_parameters(model_or_parameters)
        self.skip_rule = skip
        if process_group is None and isinstance(model_or_parameters,
                                                torch.nn.parallel.DistributedDataParallel):
            process_group = model_or_parameters.process_group
        # gradguard.distributed: what the norm partials, the flag and the loss are reduced over
        self.process_group, self.pp_group = process_group, pp_group
        self._job_loss: Any = None
        self.monitor = monitor
        self._recorder: Recorder | None = None if monitor is None else as_recorder(monitor)
        self._record_takes_lrs = self._recorder is not None and _accepts(self._recorder.record, "lrs")
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.norm_type = (_validate.norm_type(self.clipper.norm_type, "clipper.norm_type")
                          if self.clipper is not None else norm_type)
        self._binds_optimizer = isinstance(self.clipper, OptimizerAware)
        if isinstance(self.clipper, GroupAware):
            self.clipper.bind_groups(process_group=process_group, pp_group=pp_group)
        self.step_count = 0
        self._skips = _apply.SkipCounter()
        self._scaler_ok: Any = None  # the last scaler checked against LossScaler
        self._warned_no_grads = False
        self._monitor_failed = False
        if self._recorder is not None:
            self._safe_monitor("attach", list(self.names), list(self.params))

    # -- the step ---------------------------------------------------------------------
    def clip(self, loss: Tensor | None = None) -> ClipStats:
        """Clip and record only; the caller steps the optimizer.

        The returned ``ClipStats.skipped`` (device tensor) says whether the update should be
        refused; reading it is the caller's host synchronisation.
        """
        _validate.guard_loss(loss)
        self.step_count += 1
        stats = self._decide(loss, fold=False)
        self._record(stats, loss, (), None)
        return stats

    def step(self, optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] |
             tuple[torch.optim.Optimizer, ...], loss: Tensor | float | None = None,
             scaler: LossScaler | None = None) -> ClipStats:
        """Clip, decide, then ``optimizer.step()`` or skip, and record. Returns ``ClipStats``
        with ``skipped`` set (device tensors: nothing here waits on the device).

        ``optimizer`` may be a list or tuple of optimizers: they are stepped (or all skipped)
        together on one global norm, one clip and one decision, recorded as one step. An
        optimizer-aware clipper (the default ``OvershootClip``) reads the first one."""
        optimizers = _validate.guard_optimizers(optimizer)
        _validate.guard_loss(loss)
        scaler = self._check_scaler(scaler)
        self.step_count += 1
        if self._binds_optimizer:
            # adaptive clippers that read the optimizer (its kind, lr, momentum buffers)
            self.clipper.bind_optimizer(optimizers[0])  # type: ignore[union-attr]
        scaler_skip = None
        if scaler is not None:
            for o in optimizers:
                _apply.unscale_once(scaler, o)
            scaler_skip = _apply.scaler_found_inf(scaler, optimizers)
        # Before the optimizer has state for every parameter, a fused step skipped through
        # found_inf can leave state behind (fused SGD keeps an uninitialised momentum buffer),
        # so those first steps take the host-read path.
        fused = scaler is None and all(_apply.supports_device_scaling(o) and _apply.has_state(o)
                                       for o in optimizers)
        fold = fused and self.clipper is not None and self.clipper.scalar
        stats = self._decide(loss, fold=fold, scaler=scaler is not None, scaler_skip=scaler_skip)
        skip = stats.skipped
        assert skip is not None
        if self._recorder is not None:
            self._safe_monitor("before_step", step=self.step_count)
        rules = self._skip_rules()
        if fused:
            grad_scale = 1.0 / stats.clip_coef if fold else None
            found_inf = skip.float()
            for o in optimizers:
                _apply.fused_step(o, grad_scale, found_inf)
            self._skips.update_device(skip)
        elif scaler is not None and not rules:
            # the scaler skips on its own found_inf (made one verdict for all optimizers), so
            # the skip flag is its verdict and is counted without a host read
            for o in optimizers:
                scaler.step(o)
            self._skips.update_device(skip)
        else:
            can_skip = bool(rules) or (self.on_nonfinite == "skip" and scaler is None)
            skipped = bool(skip) if can_skip else False  # the one documented host read
            if not skipped:
                for o in optimizers:
                    if scaler is not None:
                        scaler.step(o)
                    else:
                        o.step()
            if can_skip:
                self._skips.update_host(skipped)
        self._record(stats, loss, optimizers, scaler)
        self._check_consecutive()
        return stats

    @property
    def skipped_steps(self) -> int:
        """Updates refused so far, a GradScaler's refusals included (reading it waits for the
        device once)."""
        return self._skips.skipped_steps

    # -- pieces -----------------------------------------------------------------------
    def _check_scaler(self, scaler: Any) -> Any:
        """The scaler when it is enabled, else None; TypeError for a non-scaler."""
        if scaler is None:
            return None
        if scaler is not self._scaler_ok:
            if not isinstance(scaler, LossScaler):
                raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got "
                                f"{type(scaler).__name__} {scaler!r}, which lacks "
                                f"{', '.join(missing(scaler, LossScaler))}")
            self._scaler_ok = scaler
        return scaler if scaler.is_enabled() else None

    def _grads(self) -> tuple[list[Tensor], list[Tensor], list[str]]:
        grads = list(map(_GRAD, self.params))
        if any(g is None for g in grads):  # (``None in grads`` would call Tensor.__eq__)
            keep = [i for i, g in enumerate(grads) if g is not None]
            params = [self.params[i] for i in keep]
            names = [self.names[i] for i in keep]
            grads = [grads[i] for i in keep]
        else:
            params, names = list(self.params), list(self.names)
        if not grads and not self._warned_no_grads:
            self._warned_no_grads = True
            warn(f"Guard step {self.step_count}: none of the {len(self.params)} guarded "
                 f"parameters has a gradient (was loss.backward() called before the step?); "
                 f"the norm is recorded as 0 and the optimizer has nothing to apply. "
                 f"This warning is shown once.", RuntimeWarning)
        if grads and not grads_ok(grads):
            check_grads(grads, names)  # names what is wrong
        return params, grads, names

    def _decide(self, loss: Any, *, fold: bool, scaler: bool = False,
                scaler_skip: Tensor | None = None) -> ClipStats:
        """Norms, clip, skip decision and the statistics' updates: the one place where a
        step's numbers are computed. Returns the step's ``ClipStats`` with ``skipped`` set.

        With a scaler, ``skipped`` includes the scaler's verdict (``scaler_skip``; the Guard's
        own non-finite check of the unscaled gradients stands in when the scaler keeps none).
        """
        params, grads, names = self._grads()
        with_max = self._monitor_wants_max_abs()
        dist_kw = {"process_group": self.process_group, "pp_group": self.pp_group, "loss": loss}
        norms = compute_norms(grads, self.norm_type, with_max_abs=with_max, **dist_kw)
        if norms.loss is not None:
            loss = norms.loss  # the job's mean loss: every rank's rules see the same value
        self._job_loss = norms.loss
        nonfinite = norms.nonfinite
        if self.on_nonfinite == "raise":
            self._raise_if_nonfinite(norms, names, loss)
        elif self.on_nonfinite == "zero" and bool(nonfinite):
            for g in grads:
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
            norms = compute_norms(grads, self.norm_type, with_max_abs=with_max, **dist_kw)
            nonfinite = norms.nonfinite
        propagate = self.on_nonfinite == "propagate"
        if self.clipper is not None:
            stats = self.clipper.clip_(params, grads, norms, apply=not fold,
                                       propagate_nonfinite=propagate)
        else:
            one = torch.ones((), dtype=torch.float32, device=norms.total.device)
            stats = ClipStats(norms.total, one, one < 0, nonfinite, norms.per_tensor)
        if scaler:
            # the scaler refuses such a step whatever the policy: report what happens
            skip = (nonfinite if scaler_skip is None
                    else scaler_skip.to(nonfinite.device, non_blocking=True))
        elif self.on_nonfinite == "skip":
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
        return dataclasses.replace(stats, skipped=skip, per_tensor_max_abs=norms.max_abs)

    def _monitor_wants_max_abs(self) -> bool:
        # On the monitor's layer steps max |g| comes out of the norm pass (one read of memory).
        if self._recorder is None:
            return False
        try:
            return bool(self._recorder.wants_max_abs(self.step_count))
        except Exception:  # noqa: BLE001 - monitoring never takes training down
            return False

    def _skip_rules(self) -> list[SkipRule]:
        """The skip rule, and the monitor when its detectors may refuse a step."""
        rules: list[Any] = [self.skip_rule] if self.skip_rule is not None else []
        if self._recorder is not None and self._recorder.can_skip:
            rules.append(self._recorder)
        return rules

    def _raise_if_nonfinite(self, norms: GradNorms, names: list[str], loss: Any) -> None:
        bad = ~torch.isfinite(norms.per_tensor)
        here = bool(bad.any())
        # distributed: a pipeline stage's per-tensor norms are its own, the flag is the job's;
        # every rank raises, so that none is left waiting in the next collective
        if here or (norms.reduced_nonfinite is not None and bool(norms.reduced_nonfinite)):
            if self._recorder is not None:  # the step that raises is on disk before it does
                one = torch.ones((), dtype=torch.float32, device=norms.total.device)
                self._record(ClipStats(norms.total, one, one < 0, norms.nonfinite, norms.per_tensor,
                                       skipped=one > 0, per_tensor_max_abs=norms.max_abs),
                             loss, (), None)
                self._flush_monitor()
            if not here:
                raise NonFiniteGradientError(
                    f"step {self.step_count}: a gradient on another rank (pipeline stage) is "
                    f"not finite; this rank's are finite (that rank's error names the "
                    f"parameter)", parameter=None, step=self.step_count)
            i = int(bad.nonzero()[0, 0])
            raise NonFiniteGradientError(
                f"step {self.step_count}: the gradient of {names[i]!r} is not finite "
                f"(norm {norms.per_tensor[i].item()}); it is the first such parameter",
                parameter=names[i], step=self.step_count)

    def _check_consecutive(self) -> None:
        limit = self.max_consecutive_skips
        if limit is not None and self._skips.host_count >= limit:
            self._flush_monitor()  # the divergence is on disk before the loop ends
            raise GradientExplosionError(
                f"{self._skips.host_count} consecutive updates were refused (limit "
                f"max_consecutive_skips={limit}) at step {self.step_count}: the gradients "
                f"stay non-finite or spiking, training has diverged")

    def _record(self, stats: ClipStats, loss: Any, optimizers: tuple | list, scaler: Any) -> None:
        if self._recorder is None:
            return
        lrs = [g.get("lr") for o in optimizers for g in o.param_groups]
        if self._job_loss is not None:
            loss = self._job_loss  # distributed: the mean over the ranks (gradguard.distributed)
        fields: dict[str, Any] = {"step": self.step_count, "loss": loss,
                                  "lr": lrs[0] if lrs else None,
                                  # the scale this step was taken with (a device tensor; no read)
                                  "loss_scale": getattr(scaler, "_scale", None) if scaler is not None else None}
        if self._record_takes_lrs:
            fields["lrs"] = tuple(lrs)
        self._safe_monitor("record", stats, **fields)

    def _flush_monitor(self) -> None:
        if self._recorder is not None:
            self._safe_monitor("flush", wait=True)

    def _safe_monitor(self, method: str, *args: Any, **kwargs: Any) -> None:
        # Monitoring never takes training down: one warning, then carry on.
        try:
            getattr(self._recorder, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "gradguard_propagate", False):
                raise  # a detector whose action is "raise" (gradguard.monitor.AnomalyError)
            if not self._monitor_failed:
                warn(f"gradguard monitor failed in {method}() and is ignored from now "
                     f"on for this error: {exc!r}", RuntimeWarning)
            self._monitor_failed = True

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``step_count``, ``skipped_steps``, ``consecutive_skips`` and the states of the
        clipper (``"clipper"``), skip rule (``"skip"``) and monitor (``"monitor"``)."""
        sd: dict[str, Any] = {"step_count": self.step_count}
        sd.update(self._skips.state_dict())
        if self.clipper is not None:
            sd["clipper"] = self.clipper.state_dict()
        if self.skip_rule is not None:
            sd["skip"] = self.skip_rule.state_dict()
        if self._recorder is not None:
            sd["monitor"] = self._recorder.state_dict()
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a ``state_dict()``. ValueError when it does not fit this Guard: not a Guard
        state, a clipper or skip rule present on one side only, or a part that its object
        cannot load (a NormClip state into a ZClip)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict from Guard.state_dict(), got "
                            f"{type(state_dict).__name__}")
        if "step_count" not in state_dict:
            raise ValueError(f"state_dict is not a Guard state: no 'step_count' among its keys "
                             f"{sorted(map(str, state_dict))}")
        step_count = _validate.int_at_least(state_dict["step_count"], "state_dict['step_count']", 0)
        for key, obj, what in (("clipper", self.clipper, "clipper"),
                               ("skip", self.skip_rule, "skip rule")):
            if obj is None and key in state_dict:
                raise ValueError(f"state_dict has a {what} state (state_dict[{key!r}]) but this "
                                 f"Guard has no {what}: build it with the same {key}= argument")
            if obj is not None and key not in state_dict:
                raise ValueError(f"state_dict has no {what} state (state_dict[{key!r}]) for this "
                                 f"Guard's {what} {obj!r}: it was saved by a Guard without one")
        parts = [("clipper", self.clipper), ("skip", self.skip_rule)]
        if self._recorder is not None and "monitor" in state_dict:
            parts.append(("monitor", self._recorder))
        for key, obj in parts:
            if obj is None:
                continue
            try:
                obj.load_state_dict(state_dict[key])
            except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
                raise ValueError(f"state_dict[{key!r}] does not fit this Guard's {key} "
                                 f"{type(obj).__name__}: {type(exc).__name__}: {exc}") from exc
        self._skips.load_state_dict(state_dict)
        self.step_count = step_count

    def close(self) -> None:
        """Flush and close the monitor (if any)."""
        if self._recorder is not None:
            self._safe_monitor("close")

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _accepts(fn: Any, name: str) -> bool:
    """True when ``fn`` takes a keyword argument ``name`` (or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
