"""Argument checks shared by the public functions: clear errors that name the argument.

Numbers are accepted as Python or numpy scalars (``np.float32(1.0)``, ``np.int64(3)``: any
``numbers.Real`` / ``numbers.Integral``) and returned as Python ``float`` / ``int``; booleans
are never numbers here, and flags are ``True`` / ``False`` (or ``np.bool_``) only, so that
``per_tensor="no"`` is refused instead of read as True.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .protocols import Clipper, SkipRule, missing

# one set of number/flag checks for the torch API and the pure rules (adapters use them too)
from .rules._core import flag, int_at_least, number, open_unit  # noqa: F401

#: The largest finite float32: thresholds live in float32 device tensors.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_real(value: Any) -> bool:
    """A real number that is not a bool (Python's or numpy's)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))




def norm_type(value: float | int | str, name: str = "norm_type") -> float:
    """Return ``value`` as a float p in (0, inf]; raise ValueError otherwise."""
    if isinstance(value, str):
        if value.lower() in ("inf", "infinity"):
            return math.inf
        raise ValueError(f"{name} must be a positive number or inf, got {value!r}")
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    p = float(value)
    if math.isnan(p) or p <= 0:
        raise ValueError(f"{name} must be a positive number or inf, got {value!r}")
    return p








def nonneg_finite(value: float, name: str, *, allow_inf: bool = False, positive: bool = False) -> float:
    """Return ``value`` as a float after checking it is a usable threshold: not NaN,
    non-negative (positive with ``positive``), finite (or inf with ``allow_inf``) and within
    float32's range (a finite value beyond it would turn into inf on the device)."""
    if isinstance(value, Tensor):
        raise TypeError(
            f"{name} must be a Python number; for a threshold that changes on the device "
            f"use an adaptive clipper (got a tensor)"
        )
    if not _is_real(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    if math.isinf(v) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {value!r}")
    if math.isfinite(v) and abs(v) > FLOAT32_MAX:
        hint = "; use math.inf for no limit" if allow_inf else ""
        raise ValueError(f"{name}={value!r} is beyond float32's largest value ({FLOAT32_MAX:.4g}), "
                         f"the precision gradguard computes thresholds in{hint}")
    if v < 0 or (positive and v == 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return v


def as_param_list(parameters: Tensor | Iterable[Tensor], name: str = "parameters") -> list[Tensor]:
    """Materialise ``parameters`` (a tensor, a list or a one-shot generator) as a list."""
    if isinstance(parameters, Tensor):
        return [parameters]
    if isinstance(parameters, torch.nn.Module):
        return list(parameters.parameters())
    try:
        params = list(parameters)
    except TypeError:
        raise TypeError(
            f"{name} must be a tensor or an iterable of tensors, got {type(parameters).__name__}"
        ) from None
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(p).__name__}")
    return params


_LAYOUT = operator.attrgetter("layout")
_DEVICE = operator.attrgetter("device")


def grads_ok(grads: list[Tensor]) -> bool:
    """True when ``check_grads`` would accept ``grads`` (one pass of C attribute getters: for
    thousands of small tensors the check is a third of the step); False: call it for the
    error. Under ``torch.compile`` tracing (no attrgetter) the plain loop."""
    from .kernels import is_compiling
    if is_compiling():
        dev = grads[0].device
        return all(g.layout == torch.strided and g.is_floating_point() and g.device == dev
                   for g in grads)
    return (set(map(_LAYOUT, grads)) == {torch.strided} and len(set(map(_DEVICE, grads))) == 1
            and all(map(Tensor.is_floating_point, grads)))


def check_grads(grads: list[Tensor], names: list[str] | None = None) -> None:
    """Refuse gradients gradguard cannot clip correctly: sparse, integer, mixed devices."""
    device = None
    for i, g in enumerate(grads):
        label = names[i] if names is not None else f"parameter {i}"
        if g.is_sparse or g.layout != torch.strided:
            raise ValueError(
                f"gradient of {label} has layout {g.layout}; gradguard clips dense (strided) "
                f"gradients only: call .to_dense() on it or exclude the parameter"
            )
        if not g.is_floating_point():
            raise ValueError(
                f"gradient of {label} has dtype {g.dtype}; gradients must be floating point"
            )
        if device is None:
            device = g.device
        elif g.device != device:
            raise ValueError(
                f"gradients live on more than one device ({device} and {g.device} for {label}); "
                f"call gradguard once per device group, or reduce the norms yourself"
            )


# -- the Guard's arguments ----------------------------------------------------------------------
#: Name segments torch's own wrappers insert (``torch.compile``: ``_orig_mod``; activation
#: checkpointing: ``_checkpoint_wrapped_module``); no user module is called that.
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module"})
#: The attribute DDP, DataParallel, FSDP-style and DeepSpeed-style wrappers keep the model in;
#: stripped when every parameter name starts with it.
_WRAPPER_ATTR = "module."


def user_names(names: list[str]) -> list[str]:
    """Parameter names as the user's model spells them: without ``_orig_mod.`` (torch.compile)
    and ``_checkpoint_wrapped_module.`` anywhere, and without a ``module.`` prefix shared by
    every name (DDP / DataParallel). Unchanged if stripping would make two names equal."""
    out = [".".join(s for s in n.split(".") if s not in _WRAPPER_SEGMENTS) or n for n in names]
    while out and all(n.startswith(_WRAPPER_ATTR) for n in out):
        out = [n[len(_WRAPPER_ATTR):] for n in out]
    return out if len(set(out)) == len(out) else list(names)


def guard_parameters(model_or_parameters: Any) -> tuple[list[str], list[Tensor]]:
    arg = "model_or_parameters"
    obj = model_or_parameters
    if isinstance(obj, torch.optim.Optimizer):
        raise TypeError(f"{arg} is an optimizer ({type(obj).__name__}): build the Guard with the "
                        f"model, gg.Guard(model), and pass the optimizer to guard.step(optimizer)")
    if isinstance(obj, torch.nn.Module):
        pairs = [(n, p) for n, p in obj.named_parameters() if p.requires_grad]
    elif isinstance(obj, Tensor):
        pairs = [("param0", obj)]
    elif isinstance(obj, Mapping):
        pairs = [(str(n), p) for n, p in obj.items()]
    elif isinstance(obj, (str, bytes)) or not isinstance(obj, Iterable):
        raise TypeError(f"{arg} must be an nn.Module, a tensor, or an iterable of parameters or "
                        f"of (name, parameter) pairs, got {type(obj).__name__} {obj!r}")
    else:
        items = list(obj)
        is_pair = [isinstance(x, tuple) for x in items]
        if any(is_pair) and not all(is_pair):
            i = is_pair.index(not is_pair[0])
            raise TypeError(f"{arg} mixes (name, parameter) pairs and bare parameters (item 0 is "
                            f"a {type(items[0]).__name__}, item {i} a {type(items[i]).__name__}): "
                            f"give every item as a pair, or none")
        if items and is_pair[0]:
            for i, it in enumerate(items):
                if len(it) != 2 or not isinstance(it[0], str):
                    raise TypeError(f"{arg}[{i}] must be a (name, parameter) pair with a str "
                                    f"name, got {it!r}")
            pairs = list(items)
        else:
            pairs = [(f"param{i}", p) for i, p in enumerate(items)]
    for name, p in pairs:
        if not isinstance(p, Tensor):
            raise TypeError(f"{arg}: {name} is a {type(p).__name__}, not a tensor")
    if not pairs:
        raise ValueError(f"{arg} holds no parameters that require grad")
    return user_names([n for n, _ in pairs]), [p for _, p in pairs]


def check_optimizer(opt: Any, name: str) -> None:
    if isinstance(opt, torch.optim.Optimizer):
        return
    if isinstance(opt, torch.nn.Module):
        raise TypeError(f"{name} is a model ({type(opt).__name__}), not an optimizer: the model "
                        f"goes to gg.Guard(model), the optimizer to guard.step(optimizer)")
    if opt is None:
        raise TypeError(f"{name} is None: guard.step needs the optimizer to step (to clip and "
                        f"record only, call guard.clip())")
    # optimizer wrappers (Lightning, Accelerate, ...) that are not Optimizer subclasses
    if callable(getattr(opt, "step", None)) and isinstance(getattr(opt, "param_groups", None), list):
        return
    raise TypeError(f"{name} must be a torch.optim.Optimizer (or a list of them), got "
                    f"{type(opt).__name__} {opt!r}")


def guard_clipper(clipper: Any) -> Clipper | None:
    if clipper is None:
        return None
    if isinstance(clipper, str):
        if clipper != "auto":
            raise ValueError(f"clipper must be a clipper, 'auto' or None, got {clipper!r}")
        from .adaptive import default_clipper  # the threshold-free default rule
        return default_clipper()
    if not isinstance(clipper, Clipper):
        hint = "; a skip rule goes in skip=" if isinstance(clipper, SkipRule) else ""
        raise TypeError(f"clipper must be a clipper (gg.NormClip(1.0), ..., or an object with "
                        f"norm_type, scalar, clip_(), observe(), state_dict(), "
                        f"load_state_dict()), 'auto' or None, got {type(clipper).__name__} "
                        f"{clipper!r}, which lacks {', '.join(missing(clipper, Clipper))}{hint}")
    flag(clipper.scalar, "clipper.scalar")
    return clipper


def guard_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    if isinstance(optimizer, (list, tuple)):
        if not optimizer:
            raise ValueError("optimizer: an empty list; pass one optimizer or several")
        for i, o in enumerate(optimizer):
            check_optimizer(o, f"optimizer[{i}]")
        if len({id(o) for o in optimizer}) != len(optimizer):
            raise ValueError("optimizer: the same optimizer is listed twice (it would step twice)")
        return list(optimizer)
    check_optimizer(optimizer, "optimizer")
    return [optimizer]


def guard_loss(loss: Any) -> None:
    if loss is None or isinstance(loss, Tensor):
        return
    if isinstance(loss, numbers.Real) and not isinstance(loss, (bool, np.bool_)):
        return
    raise TypeError(f"loss must be a tensor, a number or None, got {type(loss).__name__} {loss!r}")
