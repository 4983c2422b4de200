"""PyTorch Lightning: ``GuardCallback`` gives ``Trainer.fit`` the Guard (clip, skip, record).

    import gradguard.lightning as ggl
    trainer = pl.Trainer(callbacks=[ggl.GuardCallback()])     # clipper="auto", NaN/Inf skip

Why a callback alone is not enough, and what this one does instead. Lightning runs
``training_step`` and ``backward`` inside ``optimizer.step(closure)`` and has no way to refuse
a step from a hook (Lightning#5152). So the callback, in ``on_fit_start``, wraps the step of
each optimizer the Trainer built (an instance attribute over the class method; nothing else
of the optimizer changes):

    optimizer.step(closure)            Lightning's call (automatic and manual optimization)
      loss = closure()                 training_step, backward, on_before_optimizer_step hooks
      guard.step(optimizer, loss)      norms -> clip -> skip decision -> the real step or none

With a GradScaler (``precision="16-mixed"``, CUDA) the scaler, not the optimizer, calls
``step``; there the callback replaces the precision plugin's ``optimizer_step`` for the fit:
closure, ``scaler.unscale_`` (so ``on_before_optimizer_step`` sees true gradients, as in
Lightning), the hooks, then ``guard.step(optimizer, loss, scaler=scaler)`` (which unscales
never twice, counts the scaler's own refusals as skipped steps and combines its verdict with
the Guard's), then ``scaler.update()``. ``bf16-mixed`` has no scaler and takes the plain path.

A skipped step leaves parameters and optimizer state bit-for-bit unchanged (the Guard's
contract); Lightning's step counter still advances (the batch was consumed), but a scheduler
with ``interval="step"`` is held on a refused step (``hold_scheduler=True``), as the GradScaler
recipe does. Epoch schedulers and, in manual optimization, the user's own scheduler calls are
left alone (see ``docs/integrations.md``).

``Trainer(gradient_clip_val=...)`` is refused with a ValueError: Lightning would clip first
and the Guard would see already-clipped gradients (and discard nothing: a double clip).
Pass ``clipper=gg.NormClip(value)`` instead. A LightningModule that overrides
``configure_gradient_clipping`` gets a warning for the same reason (it may clip without
``gradient_clip_val``).

Logged through ``pl_module.log`` after each optimizer step (on_step, not on_epoch):
``gradguard/grad_norm`` (the pre-clip global norm, float32 accumulation), ``gradguard/clip_coef``
(``||g after|| / ||g before||``), ``gradguard/skipped`` (1.0 when the step was refused) and
``gradguard/skipped_steps`` (the running count). All four are device tensors; Lightning reads
them when its logger writes (every ``log_every_n_steps``), not per step.

With several optimizers (manual optimization) each gets its own Guard over its own
parameters; the ``monitor`` records the first one's steps.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch

from . import _apply
from .guard import Guard

try:  # the unified package first, then the standalone one: subclass the Callback in use
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the environment
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError("gradguard.lightning needs PyTorch Lightning: pip install "
                          "'gradguard[lightning]' (or lightning / pytorch-lightning)") from exc

__all__ = ["GuardCallback"]

_LOG_KEYS = ("grad_norm", "clip_coef", "skipped", "skipped_steps")


def _overrides(pl_module: Any, name: str) -> bool:
    """Whether a class below Lightning's LightningModule defines ``name`` (either package's
    LightningModule: the module may come from ``pytorch_lightning`` or ``lightning.pytorch``)."""
    for cls in type(pl_module).__mro__:
        if name in vars(cls):
            return not (cls.__name__ == "LightningModule"
                        and cls.__module__.split(".")[0] in ("lightning", "pytorch_lightning"))
    return False


class GuardCallback(pl.Callback):
    """The Guard inside Lightning's ``Trainer.fit``.

    Args:
        clipper: a gradguard clipper (``gg.NormClip(1.0)``, ``gg.ZClip()``, ...), ``"auto"``
            (the threshold-free default, ``OvershootClip``) or None (no clipping).
        skip: a skip rule (``gg.SpikeSkip()``) or None.
        monitor: a ``gg.Monitor`` (the run store) or None.
        on_nonfinite: the Guard's policy: ``"skip"`` (default), ``"raise"``, ``"zero"``,
            ``"propagate"``.
        log: log ``gradguard/*`` through ``pl_module.log`` (default True).
        prefix: the logged names' prefix (default ``"gradguard/"``).
        hold_scheduler: in automatic optimization, a learning-rate scheduler with
            ``interval="step"`` does not step after a refused update (default True; one host
            read of the skip flag per step, only when there is such a scheduler).
        **guard_kwargs: further ``gg.Guard`` keywords (``max_consecutive_skips``, ...).

    ``guards`` holds one Guard per optimizer once the fit has started; ``skipped_steps`` sums
    their refused updates. The Guards' states are saved in Lightning's checkpoints (the
    callback's ``state_dict``) and restored on ``fit(ckpt_path=...)``.
    """

    def __init__(self, clipper: Any = "auto", skip: Any = None, monitor: Any = None,
                 on_nonfinite: str = "skip", log: bool = True, prefix: str = "gradguard/",
                 hold_scheduler: bool = True, **guard_kwargs: Any):
        for name, value in (("log", log), ("hold_scheduler", hold_scheduler)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {type(prefix).__name__} {prefix!r}")
        # Build a throwaway Guard now so that a bad argument raises here, where it is written.
        Guard([torch.nn.Parameter(torch.zeros(1))], clipper=copy.deepcopy(clipper),
              skip=copy.deepcopy(skip), on_nonfinite=on_nonfinite, **guard_kwargs)
        self.clipper, self.skip, self.monitor = clipper, skip, monitor
        self.on_nonfinite, self.log, self.prefix = on_nonfinite, log, prefix
        self.hold_scheduler = hold_scheduler
        self.guard_kwargs = guard_kwargs
        self.guards: list[Guard] = []
        self._pending_state: dict[str, Any] | None = None
        self._patched: list[tuple[Any, str, bool, Any]] = []  # (object, attribute, had_own, own)
        self._inside = False
        self._last: dict[int, Any] = {}     # optimizer index -> last ClipStats, not yet logged
        self._skipped_dev: dict[int, torch.Tensor] = {}
        self._skipped_last: dict[int, torch.Tensor] = {}

    # -- Lightning hooks --------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.gradient_clip_val is not None and trainer.gradient_clip_val > 0:
            raise ValueError(
                f"GuardCallback clips the gradients itself; Trainer(gradient_clip_val="
                f"{trainer.gradient_clip_val!r}) would clip them first (a double clip, and the "
                f"Guard would record already-clipped norms). Remove gradient_clip_val and pass "
                f"GuardCallback(clipper=gg.NormClip({trainer.gradient_clip_val!r})) for the "
                f"same threshold, or keep the threshold-free default clipper='auto'.")
        if pl_module.automatic_optimization and _overrides(pl_module, "configure_gradient_clipping"):
            from .errors import warn
            warn(f"GuardCallback: {type(pl_module).__name__} overrides configure_gradient_clipping, "
                 f"which Lightning runs before the optimizer step: if it clips, the Guard sees (and "
                 f"records) the clipped gradients, a double clip. Pass the clipper to "
                 f"GuardCallback(clipper=...) instead, or clipper=None to keep only yours.",
                 UserWarning)
        optimizers = list(trainer.optimizers)
        if not optimizers:
            raise ValueError("GuardCallback: the Trainer has no optimizer (configure_optimizers "
                             "returned none), so there is no step to guard")
        if not self.guards:
            self.guards = [self._build_guard(pl_module, o, i) for i, o in enumerate(optimizers)]
        else:
            same = len(self.guards) == len(optimizers) and all(
                {id(p) for p in g.params} == {id(p) for grp in o.param_groups for p in grp["params"]}
                for g, o in zip(self.guards, optimizers))
            if not same:
                raise ValueError("GuardCallback: this callback guards the optimizers of an earlier "
                                 "fit (other parameters); use a new GuardCallback for this one")
        if self._pending_state is not None:
            self._load_guards(self._pending_state)
            self._pending_state = None
        for i, (g, o) in enumerate(zip(self.guards, optimizers)):
            self._patch_optimizer(o, g, i)
        precision = trainer.strategy.precision_plugin
        if getattr(precision, "scaler", None) is not None:
            self._patch_precision(precision, optimizers)
        if self.hold_scheduler and pl_module.automatic_optimization:
            index = {id(o): i for i, o in enumerate(optimizers)}
            for config in trainer.lr_scheduler_configs:
                i = index.get(id(getattr(config.scheduler, "optimizer", None)))
                if config.interval == "step" and i is not None:
                    self._patch_scheduler(config.scheduler, i)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.log or not self._last:
            return
        multi = len(self.guards) > 1
        for i, stats in sorted(self._last.items()):
            tail = f"_{i}" if multi else ""
            values = {"grad_norm": stats.total_norm, "clip_coef": stats.clip_coef,
                      "skipped": stats.skipped.float(),
                      "skipped_steps": self._skipped_dev[i].float()}
            for key in _LOG_KEYS:
                pl_module.log(f"{self.prefix}{key}{tail}", values[key].detach(), on_step=True,
                              on_epoch=False, prog_bar=False, logger=True, batch_size=1)
        self._last.clear()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._unpatch()
        if stage == "fit":
            for g in self.guards:
                g.close()

    # -- state (saved in Lightning's checkpoint under this callback's key) ------------------
    def state_dict(self) -> dict[str, Any]:
        if not self.guards:
            return dict(self._pending_state or {})
        return {"guards": [g.state_dict() for g in self.guards]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if "guards" not in state_dict:
            raise ValueError(f"GuardCallback.load_state_dict: not a GuardCallback state (keys "
                             f"{sorted(state_dict)}; expected 'guards')")
        if self.guards:
            self._load_guards(state_dict)
        else:  # Lightning restores callbacks before the optimizers (and our Guards) exist
            self._pending_state = dict(state_dict)

    @property
    def skipped_steps(self) -> int:
        """Refused updates over every guarded optimizer (reads the device once)."""
        return sum(g.skipped_steps for g in self.guards)

    # -- pieces ----------------------------------------------------------------------------
    def _build_guard(self, pl_module: Any, optimizer: Any, index: int) -> Guard:
        ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
        named = {n: p for n, p in pl_module.named_parameters() if id(p) in ids}
        if len(named) != len(ids):  # parameters outside the module: keep them, numbered
            known = {id(p) for p in named.values()}
            for group in optimizer.param_groups:
                for j, p in enumerate(group["params"]):
                    if id(p) not in known:
                        named[f"optimizer{index}.param{j}"] = p
        first = index == 0
        return Guard(named, clipper=self.clipper if first else copy.deepcopy(self.clipper),
                     skip=self.skip if first else copy.deepcopy(self.skip),
                     monitor=self.monitor if first else None, on_nonfinite=self.on_nonfinite,
                     **self.guard_kwargs)

    def _load_guards(self, state_dict: dict[str, Any]) -> None:
        states = state_dict["guards"]
        if len(states) != len(self.guards):
            raise ValueError(f"GuardCallback.load_state_dict: the checkpoint holds {len(states)} "
                             f"Guard states, this fit has {len(self.guards)} optimizers")
        for g, sd in zip(self.guards, states):
            g.load_state_dict(sd)

    def _guard_step(self, index: int, optimizer: Any, loss: Any, scaler: Any = None) -> Any:
        guard = self.guards[index]
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
        elif not isinstance(loss, (int, float)) or isinstance(loss, bool):
            loss = None
        self._inside = True
        try:
            stats = guard.step(optimizer, loss=loss, scaler=scaler)
        finally:
            self._inside = False
        prev = self._skipped_dev.get(index)
        skipped = stats.skipped.to(torch.int64)
        self._skipped_dev[index] = skipped if prev is None else prev + skipped
        self._last[index] = stats
        self._skipped_last[index] = stats.skipped
        return stats

    def _patch_optimizer(self, optimizer: Any, guard: Guard, index: int) -> None:
        had_own = "step" in vars(optimizer)
        original = optimizer.step  # bound: the class's step (with torch's hooks) or the user's

        @functools.wraps(original)
        def step(closure: Any = None, **kwargs: Any) -> Any:
            if self._inside:  # the Guard (or a GradScaler it drives) taking the real step
                return original(closure, **kwargs) if closure is not None else original(**kwargs)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if loss is None and not any(p.grad is not None for p in guard.params):
                return None  # training_step returned None: nothing to step (as torch would)
            self._guard_step(index, optimizer, loss)
            return loss

        optimizer.step = step
        self._patched.append((optimizer, "step", had_own, original if had_own else None))

    def _patch_precision(self, precision: Any, optimizers: list[Any]) -> None:
        index = {id(o): i for i, o in enumerate(optimizers)}
        had_own = "optimizer_step" in vars(precision)
        original = precision.optimizer_step

        def optimizer_step(optimizer: Any, model: Any, closure: Any, **kwargs: Any) -> Any:
            if id(optimizer) not in index:
                return original(optimizer, model=model, closure=closure, **kwargs)
            scaler = precision.scaler
            closure_result = closure()
            automatic = getattr(model, "automatic_optimization", True)
            if closure_result is None and automatic:
                return None  # backward skipped (training_step returned None): Lightning's rule
            _apply.unscale_once(scaler, optimizer)  # the hooks below see unscaled gradients
            precision._after_closure(model, optimizer)
            self._guard_step(index[id(optimizer)], optimizer, closure_result, scaler=scaler)
            scaler.update()
            return closure_result

        precision.optimizer_step = optimizer_step
        self._patched.append((precision, "optimizer_step", had_own, original if had_own else None))

    def _patch_scheduler(self, scheduler: Any, index: int) -> None:
        had_own = "step" in vars(scheduler)
        original = scheduler.step

        @functools.wraps(original)
        def step(*args: Any, **kwargs: Any) -> Any:
            skipped = self._skipped_last.get(index)
            # one host read, only for per-step schedulers: the update was refused, so the
            # schedule does not move on (as torch's GradScaler + scheduler recipe intends)
            if skipped is not None and bool(skipped):
                return None
            return original(*args, **kwargs)

        scheduler.step = step
        self._patched.append((scheduler, "step", had_own, original if had_own else None))

    def _unpatch(self) -> None:
        while self._patched:
            obj, attr, had_own, original = self._patched.pop()
            if had_own:
                setattr(obj, attr, original)
            else:
                try:
                    delattr(obj, attr)
                except AttributeError:
                    pass
