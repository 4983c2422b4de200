"""gradguard: gradient clipping, bad-step skipping and gradient-health monitoring."""

from .adaptive import AutoClip, OvershootClip, SpikeSkip, ZClip, default_clipper
from .clippers import AGC, Clipper, ClipStats, NormClip, ValueClip
from .errors import GradientExplosionError, NonFiniteGradientError
from .functional import (
    clip_grad_agc_,
    clip_grad_norm_,
    clip_grad_norm_per_tensor_,
    clip_grad_value_,
    grad_norm,
)
from .guard import Guard
from .monitor import Monitor, load_run
from .norms import GradNorms

__version__ = "0.1.0"

__all__ = [
    "AGC",
    "AutoClip",
    "OvershootClip",
    "SpikeSkip",
    "ZClip",
    "default_clipper",
    "ClipStats",
    "Clipper",
    "GradNorms",
    "GradientExplosionError",
    "Guard",
    "NonFiniteGradientError",
    "NormClip",
    "ValueClip",
    "clip_grad_agc_",
    "clip_grad_norm_",
    "clip_grad_norm_per_tensor_",
    "clip_grad_value_",
    "grad_norm",
    "load_run",
    "Monitor",
]
