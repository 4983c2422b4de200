"""gradguard: gradient clipping, bad-step skipping and gradient-health monitoring.

Public names are imported lazily, on first use, so that ``gradguard report`` and
``gradguard inspect`` (which never touch torch) start without importing it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "AGC": "clippers",
    "Clipper": "clippers",
    "ClipStats": "clippers",
    "NormClip": "clippers",
    "PerTensorNormClip": "clippers",
    "ValueClip": "clippers",
    "AutoClip": "adaptive",
    "OvershootClip": "adaptive",
    "SpikeSkip": "adaptive",
    "ZClip": "adaptive",
    "default_clipper": "adaptive",
    "GradientExplosionError": "errors",
    "NonFiniteGradientError": "errors",
    "clip_grad_agc_": "functional",
    "clip_grad_norm_": "functional",
    "clip_grad_norm_per_tensor_": "functional",
    "clip_grad_value_": "functional",
    "grad_norm": "functional",
    "Guard": "guard",
    "Monitor": "monitor.monitor",
    "load_run": "store",
    "GradNorms": "norms",
}

__all__ = [
    "AGC",
    "AutoClip",
    "ClipStats",
    "Clipper",
    "GradNorms",
    "GradientExplosionError",
    "Guard",
    "Monitor",
    "NonFiniteGradientError",
    "NormClip",
    "OvershootClip",
    "PerTensorNormClip",
    "SpikeSkip",
    "ValueClip",
    "ZClip",
    "clip_grad_agc_",
    "clip_grad_norm_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_value_",
    "default_clipper",
    "grad_norm",
    "load_run",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .adaptive import AutoClip, OvershootClip, SpikeSkip, ZClip, default_clipper
    from .clippers import AGC, Clipper, ClipStats, NormClip, PerTensorNormClip, ValueClip
    from .errors import GradientExplosionError, NonFiniteGradientError
    from .functional import (
        clip_grad_agc_,
        clip_grad_norm_,
        clip_grad_norm_per_tensor_,
        clip_grad_value_,
        grad_norm,
    )
    from .guard import Guard
    from .monitor import Monitor
    from .norms import GradNorms
    from .store import load_run
