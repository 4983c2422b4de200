"""Norm clipping: the clip coefficient, computed here and nowhere else.

Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural networks"
(arXiv 1211.5063), Algorithm 1; the formula of ``torch.nn.utils.clip_grad_norm_``:

    coef = min(1, threshold / (total + 1e-6))          g <- coef * g

``total`` is the p-norm of all gradients (units of the gradients), ``threshold`` the max norm
in the same units. The coefficient is always multiplied in (1.0 when nothing is clipped), so
the decision is never read on the host.

Non-finite policy (``nonfinite``: some gradient element is NaN or Inf): the coefficient is 1.0
and the gradients are left as they are, unless ``propagate`` (torch's behaviour: NaN or 0).

``strict``: the adaptive clippers use ``coef = 1`` exactly whenever ``total <= threshold`` (a
norm at its own percentile, or at a threshold it set, is not shrunk by the 1e-6); the fixed
``NormClip`` keeps torch's formula bit for bit (a norm within 1e-6 below ``max_norm`` gets a
coefficient just below 1, as in torch).

Per tensor (``tf.clip_by_norm``, Keras ``clipnorm``): ``coef_i = max_norm / max(n_i, max_norm)``,
written so that an unclipped tensor gets exactly 1.0.

As a rule: ``Config(max_norm)``, an empty ``State``, ``update`` returns the fixed threshold.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import _core

#: added to the norm before dividing, as torch.nn.utils.clip_grad_norm_ does
EPS = 1e-6


class Config(NamedTuple):
    """``max_norm``: the threshold, a Python float in [0, inf]."""

    max_norm: float


class State(NamedTuple):
    """Norm clipping keeps no statistics."""


def config(max_norm: Any) -> Config:
    """Checked configuration (``ValueError``/``TypeError`` naming ``max_norm``)."""
    return Config(_core.threshold(max_norm, "max_norm"))


def init(cfg: Config, xp: Any, like: Any = None) -> State:
    return State()


def threshold(cfg: Config, xp: Any, like: Any) -> Any:
    """0-d float32 threshold on ``like``'s device (a value beyond float32 becomes inf)."""
    return xp.full((), cfg.max_norm, "f32", like)


def update(cfg: Config, state: State, total: Any, xp: Any) -> tuple[Any, State]:
    """``(threshold, state)``: the fixed max norm; nothing to learn."""
    return threshold(cfg, xp, total), state


def coefficient(total: Any, threshold: Any, xp: Any, *, nonfinite: Any = None,
                propagate: bool = False, strict: bool = False, eps: float = EPS) -> Any:
    """The global clip coefficient ``min(1, threshold / (total + 1e-6))`` (see the module
    docstring for ``nonfinite``, ``propagate`` and ``strict``); same dtype as ``total``.

    ``threshold`` is an array or a Python number; ``nonfinite`` a 0-d bool array or None.
    ``eps`` replaces the 1e-6 (``eps=0`` is ``tf.clip_by_global_norm``'s ``min(1, c / n)``).
    """
    coef = xp.clamp(threshold / (total + eps), hi=1.0)
    if strict:
        coef = xp.where(total > threshold, coef, 1.0)
    if nonfinite is not None and not propagate:
        coef = xp.where(nonfinite, 1.0, coef)
    return coef


def per_tensor_coefficients(per_tensor: Any, max_norm: Any, xp: Any, *, nonfinite: Any = None,
                            propagate: bool = False) -> Any:
    """1-d coefficients ``max_norm / max(n_i, max_norm)``: exactly 1.0 where ``n_i <=
    max_norm``; all 1.0 under ``nonfinite`` unless ``propagate``."""
    coefs = xp.where(per_tensor > max_norm, max_norm / xp.clamp(per_tensor, lo=1e-30), 1.0)
    if nonfinite is not None and not propagate:
        coefs = xp.where(nonfinite, 1.0, coefs)
    return coefs
