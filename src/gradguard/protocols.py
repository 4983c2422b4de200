"""The collaborators of the Guard, as typed protocols.

The Guard (``gradguard.guard``) talks to four kinds of objects. Each is a structural
``typing.Protocol``: an object qualifies by having the methods, not by subclassing a gradguard
class, so a user-written clipper, skip rule or recorder works in the Guard as long as it has
the shape below. The Guard checks its arguments against these protocols once, when it is
built (or when a scaler is first passed), and raises a ``TypeError`` naming what is missing.

``Clipper``
    turns the norms of one step into a clip and applies it. ``clip_`` returns a ``ClipStats``
    whose ``clip_coef`` (0-d float32 device tensor) the Guard hands to a fused optimizer as
    ``grad_scale = 1 / clip_coef`` when ``scalar`` is True and ``apply`` is False; ``observe``
    folds an *accepted* step into adaptive statistics (``accept`` is a 0-d bool tensor, so
    the clipper must not read it on the host). ``gradguard.Clipper`` is a base class that
    implements this protocol; clippers may also offer ``coefficient(norms)`` (scalar clippers,
    see ``ScalarClipper``) and ``bind_optimizer(optimizer)`` (see ``OptimizerAware``).
``SkipRule``
    refuses an update: ``check(total_norm, loss)`` is a pure 0-d bool device tensor (True:
    skip), ``observe(total_norm, loss, accept)`` updates the rule's statistics with accepted
    steps only. ``gradguard.SpikeSkip`` is one.
``Recorder``
    the monitor's interface (``gradguard.Monitor`` is one). A recorder that can refuse a step
    sets ``can_skip`` and is then also run as a ``SkipRule``. An object with only ``record``
    is accepted by the Guard, which fills in the other hooks as no-ops (``as_recorder``).
``LossScaler``
    ``torch.amp.GradScaler`` and anything with its step interface.

None of these protocols imports torch at run time: they are cheap to import.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover - type checkers only
    from torch import Tensor

    from .clippers import ClipStats
    from .norms import GradNorms

__all__ = ["Clipper", "GroupAware", "LossScaler", "OptimizerAware", "Recorder", "ScalarClipper", "SkipRule",
           "as_recorder", "missing"]


@runtime_checkable
class Clipper(Protocol):
    """A clipper as the Guard uses it.

    norm_type   p of the norms it reads (the Guard computes the norms once, with this p)
    scalar      True when the clip is one global factor ``clip_coef`` in [0, 1]; the Guard may
                then call ``clip_(..., apply=False)`` and fold the factor into a fused step
    """

    norm_type: float
    scalar: bool

    def clip_(self, params: list[Tensor], grads: list[Tensor], norms: GradNorms, *,
              apply: bool = True, propagate_nonfinite: bool = False) -> ClipStats:
        """Clip ``grads`` in place (unless ``apply`` is False) and describe what was done.

        A non-finite norm leaves the gradients as they are unless ``propagate_nonfinite``."""
        ...

    def observe(self, norms: GradNorms, accept: Tensor) -> None:
        """Update adaptive statistics with this step when ``accept`` (0-d bool tensor)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@runtime_checkable
class ScalarClipper(Clipper, Protocol):
    """A scalar clipper that can also give its coefficient without clipping (pure)."""

    def coefficient(self, norms: GradNorms) -> Tensor:
        """0-d float32 factor in [0, 1]; no state change."""
        ...


@runtime_checkable
class OptimizerAware(Protocol):
    """A clipper that reads the optimizer (its kind, learning rate, state); the Guard calls
    ``bind_optimizer`` with the first optimizer of every ``step`` before clipping."""

    def bind_optimizer(self, optimizer: Any) -> None: ...


@runtime_checkable
class GroupAware(Protocol):
    """A clipper whose own statistics need the job's groups (e.g. the default clipper's
    starting limit from the whole model's parameter norm under pipeline parallelism); the
    Guard calls ``bind_groups`` once, at construction, with its ``process_group`` and
    ``pp_group``."""

    def bind_groups(self, process_group: Any = None, pp_group: Any = None) -> None: ...


@runtime_checkable
class SkipRule(Protocol):
    """A rule that refuses updates (``gradguard.SpikeSkip``)."""

    def check(self, total_norm: Tensor, loss: Any = None) -> Tensor:
        """0-d bool device tensor, True to refuse this step's update. Pure: no state change."""
        ...

    def observe(self, total_norm: Tensor, loss: Any, accept: Tensor) -> None:
        """Fold this step into the rule's statistics when ``accept`` (0-d bool tensor)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@runtime_checkable
class Recorder(Protocol):
    """The monitor's interface, in the order the Guard calls it.

    attach(names, params)        once, at Guard construction: the parameters and their names
    wants_max_abs(step) -> bool  before the norm pass: also compute max |g| per tensor?
    check / observe              as a ``SkipRule``, only when ``can_skip`` is True
    before_step(step)            just before the optimizer steps (snapshot for update ratios)
    record(stats, step=, loss=, lr=, loss_scale=, [lrs=])   after the step, every step
    flush(wait)                  before the Guard raises, so the divergence is on disk
    state_dict / load_state_dict with the Guard's
    close()                      ``guard.close()`` and the end of ``with Guard(...)``

    ``record`` may also accept ``lrs`` (the learning rate of every param group of every
    optimizer stepped, in order); the Guard passes it only to a ``record`` that takes it.
    Every method must not raise into the training loop; the Guard guards each call anyway.
    """

    can_skip: bool

    def attach(self, names: list[str], params: list[Tensor]) -> None: ...

    def wants_max_abs(self, step: int) -> bool: ...

    def check(self, total_norm: Tensor, loss: Any = None) -> Tensor: ...

    def observe(self, total_norm: Tensor, loss: Any, accept: Tensor) -> None: ...

    def before_step(self, step: int | None = None) -> None: ...

    def record(self, stats: ClipStats, step: int | None = None, loss: Any = None,
               lr: Any = None, loss_scale: Any = None) -> None: ...

    def flush(self, wait: bool = False) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, sd: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class LossScaler(Protocol):
    """``torch.amp.GradScaler``'s step interface."""

    def is_enabled(self) -> bool: ...

    def unscale_(self, optimizer: Any) -> None: ...

    def step(self, optimizer: Any, *args: Any, **kwargs: Any) -> Any: ...

    def update(self, new_scale: Any = None) -> None: ...


def missing(obj: Any, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``obj`` lacks, sorted (for error messages)."""
    attrs = getattr(protocol, "__protocol_attrs__", None)  # Python >= 3.12
    if attrs is None:
        attrs = typing._get_protocol_attrs(protocol)  # type: ignore[attr-defined]
    return sorted(n for n in attrs if not hasattr(obj, n))


class _PartialRecorder:
    """A ``Recorder`` made from an object that has ``record`` and perhaps some other hooks;
    the missing hooks do nothing. Built once, so the Guard never asks per step what its
    recorder can do."""

    can_skip = False

    def __init__(self, obj: Any):
        self.wrapped = obj
        self.record: Callable[..., None] = obj.record
        for name in ("attach", "wants_max_abs", "check", "observe", "before_step", "flush",
                     "state_dict", "load_state_dict", "close"):
            if hasattr(obj, name):
                setattr(self, name, getattr(obj, name))
        self.can_skip = bool(getattr(obj, "can_skip", False)) and hasattr(obj, "check") \
            and hasattr(obj, "observe")

    def attach(self, names: list[str], params: list[Any]) -> None:
        pass

    def check(self, total_norm: Any, loss: Any = None) -> Any:
        import torch  # only reached for an object that has no check of its own: never skip
        return torch.zeros((), dtype=torch.bool, device=total_norm.device)

    def observe(self, total_norm: Any, loss: Any, accept: Any) -> None:
        pass

    def wants_max_abs(self, step: int) -> bool:
        return False

    def before_step(self, step: int | None = None) -> None:
        pass

    def flush(self, wait: bool = False) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def as_recorder(obj: Any, name: str = "monitor") -> Recorder:
    """``obj`` as a full ``Recorder``: itself when it is one, otherwise (it has ``record``)
    wrapped so that its missing hooks do nothing. TypeError when it cannot record."""
    if isinstance(obj, Recorder):
        return obj
    if not callable(getattr(obj, "record", None)):
        raise TypeError(f"{name} must be a gradguard Monitor or an object with "
                        f"record(stats, **fields), got {type(obj).__name__} {obj!r}")
    return _PartialRecorder(obj)  # type: ignore[return-value]
