"""Hugging Face: the Guard in ``transformers.Trainer`` and in ``accelerate`` loops.

    import gradguard.huggingface as gghf
    trainer = gghf.GuardTrainer(model=model, args=args, train_dataset=ds)   # a GuardCallback inside
    trainer.train()

Three pieces, one mechanism:

``attach_guard(accelerated_optimizer, guard)``
    replaces the step of an ``accelerate.AcceleratedOptimizer`` (what the Trainer and
    ``accelerator.prepare`` hand out) by ``guard.step(inner_optimizer, scaler=the accelerator's
    GradScaler)`` followed by ``scaler.update()``; the wrapper's ``step_was_skipped`` (hence
    ``accelerator.optimizer_step_was_skipped``, which the Trainer reads before stepping the LR
    scheduler) is the Guard's verdict: NaN/Inf, a spike, or the scaler's own refusal, fused
    optimizers included (accelerate#4242: with ``AdamW(fused=True)`` under fp16 accelerate
    reports False because the Python ``step`` is always called). Deciding whether the scheduler
    steps is a host decision in the Trainer, so this reads the skip flag once per step.
``GuardCallback``
    a ``TrainerCallback`` that builds the Guard over the model in ``on_train_begin``, attaches it
    to the Trainer's optimizer, saves its state next to each checkpoint (``gradguard.pt``) and
    restores it on ``resume_from_checkpoint``. Used in a plain ``Trainer`` it takes over
    ``max_grad_norm`` (sets it to 0 for the run, so the Trainer does not clip first; the
    Trainer's log-only ``clip_grad_norm_(inf)`` pass still runs, and turns finite gradients NaN
    when one is inf: harmless here, that step is refused anyway, but its logged norm reads nan).
``GuardTrainer`` / ``GuardTrainerMixin``
    the smallest Trainer hook: ``_clip_grad_norm`` does nothing (the Guard clips in the step),
    ``_get_grad_norm`` returns a device scalar that the Guard's step fills with the true
    pre-clip norm (no gradient is touched before the Guard reads it), and ``log`` adds
    ``gradguard/grad_norm``, ``gradguard/clip_coef`` and ``gradguard/skipped_steps`` to every
    training log, before any reporter sees it (``logging_nan_inf_filter`` replaces a NaN loss by
    the running mean; ``gradguard/skipped_steps`` still shows the refused step). On a
    transformers release whose Trainer has no ``_clip_grad_norm`` (it clips inline), the
    callback takes over ``max_grad_norm`` as in a plain Trainer instead.

``clip_grad_norm_(accelerator, parameters, max_norm, norm_type=2.0)``
    the drop-in for ``accelerator.clip_grad_norm_``: unscale (AMP fp16), then gradguard's clip
    (float32 norms; a non-finite norm leaves the gradients untouched instead of multiplying
    them by NaN). Returns the pre-clip total norm, a device tensor. DeepSpeed, XLA and FSDP1
    keep accelerate's own path (their engines own the gradients).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from .guard import Guard

__all__ = ["GuardCallback", "GuardTrainer", "GuardTrainerMixin", "attach_guard", "clip_grad_norm_"]

_STATE_FILE = "gradguard.pt"


# -- accelerate ---------------------------------------------------------------------------
def clip_grad_norm_(accelerator: Any, parameters: Any, max_norm: float,
                    norm_type: float = 2.0) -> Any:
    """``accelerator.clip_grad_norm_(parameters, max_norm, norm_type)`` with gradguard's clip.

    ``g <- g * min(1, max_norm / (||g|| + 1e-6))`` after ``accelerator.unscale_gradients()``;
    returns ``||g||`` before clipping (0-d float32 device tensor). Where accelerate's engines own
    clipping (DeepSpeed, XLA, FSDP1) their path is used unchanged.
    """
    from . import functional
    dist = getattr(accelerator, "distributed_type", None)
    kind = getattr(dist, "value", str(dist)).upper() if dist is not None else ""
    fsdp1 = kind == "FSDP" and getattr(getattr(accelerator.state, "fsdp_plugin", None),
                                       "fsdp_version", 1) == 1
    if kind in ("DEEPSPEED", "XLA") or fsdp1:
        return accelerator.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)
    accelerator.unscale_gradients()
    return functional.clip_grad_norm_(list(parameters), max_norm, norm_type=norm_type)


def attach_guard(optimizer: Any, guard: Guard) -> Any:
    """Route ``optimizer.step()`` of an ``AcceleratedOptimizer`` through ``guard.step``.

    Returns a function that undoes it. ``optimizer.step_was_skipped`` is then the Guard's
    verdict (see the module docstring). Outside a sync step of gradient accumulation
    (``gradient_state.sync_gradients`` False) the step does nothing, as accelerate's does.
    """
    inner = getattr(optimizer, "optimizer", None)
    if not isinstance(inner, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be an accelerate AcceleratedOptimizer (from "
                        f"accelerator.prepare or the Trainer), got {type(optimizer).__name__}")
    if not isinstance(guard, Guard):
        raise TypeError(f"guard must be a gradguard.Guard, got {type(guard).__name__} {guard!r}")
    had_own = "step" in vars(optimizer)
    previous = vars(optimizer).get("step")

    def step(closure: Any = None) -> None:
        state = getattr(optimizer, "gradient_state", None)
        if state is not None and not state.sync_gradients:
            return
        scaler = getattr(optimizer, "scaler", None)
        loss = closure() if closure is not None else None
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        stats = guard.step(inner, loss=loss, scaler=scaler)
        if scaler is not None and scaler.is_enabled():
            scaler.update()
        # the Trainer decides on the host whether the LR scheduler steps: one read of the flag
        optimizer._is_overflow = bool(stats.skipped)
        optimizer.gradguard_stats = stats

    optimizer.step = step

    def undo() -> None:
        if had_own:
            optimizer.step = previous
        else:
            vars(optimizer).pop("step", None)
    return undo


# -- transformers -------------------------------------------------------------------------
try:
    from transformers import Trainer, TrainerCallback
except ImportError:  # pragma: no cover - without transformers only the accelerate part works
    Trainer = TrainerCallback = object  # type: ignore[misc,assignment]


class GuardCallback(TrainerCallback):  # type: ignore[misc,valid-type]
    """The Guard in a ``transformers.Trainer``.

    Args:
        clipper: a gradguard clipper, ``"auto"`` (the threshold-free default), None (no
            clipping), or ``"max_grad_norm"``: ``gg.NormClip(args.max_grad_norm)``, the
            Trainer's own threshold with gradguard's norms and skip (None when it is 0).
        skip: a skip rule (``gg.SpikeSkip()``) or None.
        monitor: a ``gg.Monitor`` or None.
        on_nonfinite: the Guard's policy (``"skip"`` by default).
        prefix: the logged names' prefix (``"gradguard/"``).
        **guard_kwargs: further ``gg.Guard`` keywords.

    ``guard`` is the Guard once training has begun.
    """

    def __init__(self, clipper: Any = "auto", skip: Any = None, monitor: Any = None,
                 on_nonfinite: str = "skip", prefix: str = "gradguard/", **guard_kwargs: Any):
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {type(prefix).__name__} {prefix!r}")
        if not (isinstance(clipper, str) and clipper == "max_grad_norm"):
            Guard([torch.nn.Parameter(torch.zeros(1))], clipper=copy.deepcopy(clipper),
                  skip=copy.deepcopy(skip), on_nonfinite=on_nonfinite, **guard_kwargs)
        self.clipper, self.skip, self.monitor = clipper, skip, monitor
        self.on_nonfinite, self.prefix, self.guard_kwargs = on_nonfinite, prefix, guard_kwargs
        self.guard: Guard | None = None
        self.owner_clips = False      # set by GuardTrainer: the Trainer itself never clips
        self.owner_logs = False       # set by GuardTrainer: its log() adds the gradguard fields
        self.resume_from: str | None = None
        self._undo: Any = None
        self._saved_max_grad_norm: float | None = None
        self._norm_slot: torch.Tensor | None = None
        self._optimizer: Any = None

    # -- Trainer events ----------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if getattr(args, "deepspeed", None):
            raise ValueError("GuardCallback: DeepSpeed clips and steps inside its engine, so the "
                             "Guard cannot refuse its updates; use DeepSpeed's gradient_clipping")
        if model is None or optimizer is None:
            raise ValueError("GuardCallback.on_train_begin needs the Trainer's model and optimizer")
        if self.guard is None:
            clipper = self.clipper
            if isinstance(clipper, str) and clipper == "max_grad_norm":
                clipper = _norm_clip(args.max_grad_norm)
            self.guard = Guard(model, clipper=clipper, skip=self.skip, monitor=self.monitor,
                               on_nonfinite=self.on_nonfinite, **self.guard_kwargs)
        elif {id(p) for p in self.guard.params} != {id(p) for p in model.parameters()}:
            raise ValueError("GuardCallback: this callback already guards another model (its "
                             "Guard holds that model's parameters and statistics); give each "
                             "Trainer its own GuardCallback")
        self._restore(args, state)
        if not self.owner_clips and args.max_grad_norm and args.max_grad_norm > 0:
            # the Guard clips; the Trainer clipping first would be a second clip
            self._saved_max_grad_norm = args.max_grad_norm
            args.max_grad_norm = 0.0
        self._optimizer = optimizer
        self._undo = attach_guard(optimizer, self.guard)
        wrapped = optimizer.step

        def step(closure: Any = None) -> None:
            wrapped(closure)
            stats = getattr(optimizer, "gradguard_stats", None)
            if self._norm_slot is not None and stats is not None:
                self._norm_slot.copy_(stats.total_norm.detach())
                self._norm_slot = None
        optimizer.step = step

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.guard is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.guard.state_dict(), os.path.join(folder, _STATE_FILE))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs or self.owner_logs:
            return  # eval metrics, or GuardTrainer.log already added the fields
        # A plain Trainer appended its copy of ``logs`` to the history before this event and
        # ran the reporters listed before this callback: add to both what is still reachable.
        fields = self.log_fields()
        history = state.log_history[-1] if state.log_history else None
        for k, v in fields.items():
            logs.setdefault(k, v)
            if history is not None and history.get("loss") == logs.get("loss"):
                history.setdefault(k, v)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None
        if self._saved_max_grad_norm is not None:
            args.max_grad_norm = self._saved_max_grad_norm
            self._saved_max_grad_norm = None
        if self.guard is not None and self.guard.monitor is not None:
            self.guard.close()

    # -- what the Trainer hook uses -----------------------------------------------------------
    def norm_slot(self, model: Any) -> torch.Tensor:
        """A 0-d float32 tensor that this step's Guard fills with the pre-clip norm."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._norm_slot = torch.full((), float("nan"), dtype=torch.float32, device=device)
        return self._norm_slot

    def log_fields(self) -> dict[str, float]:
        """The last step's pre-clip norm and clip coefficient and the refused-update count
        (read on the host here, at logging time, never per step)."""
        if self.guard is None:
            return {}
        out: dict[str, float] = {}
        stats = getattr(self._optimizer, "gradguard_stats", None)
        if stats is not None:
            out[f"{self.prefix}grad_norm"] = float(stats.total_norm)
            out[f"{self.prefix}clip_coef"] = float(stats.clip_coef)
        out[f"{self.prefix}skipped_steps"] = float(self.guard.skipped_steps)
        return out

    def _restore(self, args: Any, state: Any) -> None:
        folder = self.resume_from
        if folder is None and state.global_step > 0:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self.resume_from = None  # used once: a later train() without resume starts from here
        if folder is None:
            return
        path = os.path.join(folder, _STATE_FILE)
        if os.path.exists(path):
            self.guard.load_state_dict(torch.load(path, weights_only=True))  # type: ignore[union-attr]
        else:
            from .errors import warn
            warn(f"GuardCallback: resuming at step {state.global_step} but {path} does not exist; "
                 f"the Guard starts afresh (clipper statistics and skip counts reset)",
                 RuntimeWarning)


def _trainer_has_clip_hooks() -> bool:
    """Whether ``transformers.Trainer`` clips through ``_clip_grad_norm`` / ``_get_grad_norm``
    (the methods ``GuardTrainerMixin`` overrides)."""
    return all(callable(getattr(Trainer, name, None)) for name in ("_clip_grad_norm", "_get_grad_norm"))


def _norm_clip(max_norm: float) -> Any:
    from .clippers import NormClip
    return NormClip(max_norm) if max_norm and max_norm > 0 else None


class GuardTrainerMixin:
    """Mix into any ``transformers.Trainer`` subclass (``class T(GuardTrainerMixin, SFTTrainer)``).

    Keyword ``guard``: the ``GuardCallback`` to use (default: the one among ``callbacks``, else
    ``GuardCallback()``)."""

    def __init__(self, *args: Any, guard: GuardCallback | None = None, **kwargs: Any):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        found = [c for c in callbacks if isinstance(c, GuardCallback)]
        if guard is not None and found and found[0] is not guard:
            raise ValueError("GuardTrainer: pass the GuardCallback once, as guard= or in callbacks")
        if guard is None:
            guard = found[0] if found else GuardCallback()
        if not isinstance(guard, GuardCallback):
            raise TypeError(f"guard must be a gradguard.huggingface.GuardCallback, got "
                            f"{type(guard).__name__} {guard!r}")
        if guard not in callbacks:
            callbacks.append(guard)
        # The two overrides below replace Trainer methods that older transformers releases do
        # not have (they clip inline in the training loop): there the callback takes over
        # max_grad_norm instead, as in a plain Trainer, so the Trainer never clips first.
        guard.owner_clips = _trainer_has_clip_hooks()
        guard.owner_logs = True
        self.guard_callback = guard
        super().__init__(*args, callbacks=callbacks, **kwargs)  # type: ignore[call-arg]

    def _clip_grad_norm(self, model: Any) -> Any:
        return None  # the Guard clips inside the optimizer step, on untouched gradients

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        return self.guard_callback.norm_slot(model)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        self.guard_callback.resume_from = checkpoint

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            logs.update(self.guard_callback.log_fields())
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


class GuardTrainer(GuardTrainerMixin, Trainer):  # type: ignore[misc,valid-type]
    """``transformers.Trainer`` with the Guard: ``GuardTrainer(model=..., args=..., ...)``."""
