"""Exceptions gradguard raises into a training loop (only where the user asked for them)."""

from __future__ import annotations


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or Inf and the policy is ``on_nonfinite="raise"``.

    ``parameter`` names the first offending parameter by its module path
    (``model.named_parameters()`` spelling) and ``step`` the Guard step.
    """

    def __init__(self, message: str, parameter: str | None = None, step: int | None = None):
        super().__init__(message)
        self.parameter = parameter
        self.step = step


class GradientExplosionError(RuntimeError):
    """Too many updates in a row were refused (non-finite or spiking gradients).

    Raised by the Guard after ``max_consecutive_skips`` consecutive skipped steps: at that
    point skipping no longer protects the run, it only hides that training has diverged.
    """
