"""Exceptions gradguard raises into a training loop (only where the user asked for them), and
``warn``: a warning attributed to the user's line, not to gradguard's."""

from __future__ import annotations

import os
import sys
import warnings

#: This package's folder: frames in it are gradguard's, the first one outside is the user's.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


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


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the user's line: the first stack
    frame outside the gradguard package (so ``-W error`` filters, IDEs and logs point at the
    training loop, not at ``guard.py`` or ``monitor.py``)."""
    frame = sys._getframe(1)
    level = 2  # stacklevel 2 is our caller
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level if frame is not None else 1)


def close_at_exit(ref) -> None:
    """``weakref.finalize`` hook of a recorder: close the object behind the weak reference
    ``ref`` if it is still alive; an exit hook never raises."""
    obj = ref()
    if obj is not None:
        try:
            obj.close()
        except BaseException:  # noqa: BLE001 - an exit hook never raises
            pass
