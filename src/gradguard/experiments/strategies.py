"""The clipping strategies every experiment compares, as one table.

A strategy is a name and how to build the Guard's parts for one run: a clipper (or None), a
skip rule (or None) and the non-finite policy. ``"none"`` is plain torch: no clipping and
torch's behaviour on non-finite gradients (``on_nonfinite="propagate"``), so a run that
explodes shows it. Every other strategy runs under gradguard's default policy
(``on_nonfinite="skip"``: a non-finite update is refused and counted in "steps skipped").

Adaptive strategies (AutoClip, ZClip, ``"default"``: the threshold-free clipper Guard uses
when given none, ``gradguard.default_clipper()``) come from
``gradguard.adaptive``; each is one line below and appears as soon as gradguard exports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradguard as gg

from ..clippers import AGC, Clipper, NormClip, ValueClip

#: the global-norm thresholds of the full suite (the quick suite uses ``NORM_QUICK``)
NORM_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
NORM_QUICK = 1.0


@dataclass(frozen=True)
class Strategy:
    """One row of the comparison: how to build the clipper and skip rule of a run."""

    name: str
    clipper: Callable[[], Clipper | None]
    skip: Callable[[], Any] | None = None
    on_nonfinite: str = "skip"

    @property
    def slug(self) -> str:
        """The name as a folder name: ``global norm 0.3`` -> ``global-norm-0.3``."""
        return "-".join(self.name.replace("(", "").replace(")", "").split())

    def guard(self, model: Any, monitor: Any = None) -> gg.Guard:
        """A Guard for ``model`` with this strategy (never raises on consecutive skips:
        an experiment wants to see how a run ends, not stop at the tenth refused step)."""
        return gg.Guard(model, self.clipper(), skip=self.skip() if self.skip else None,
                        monitor=monitor, on_nonfinite=self.on_nonfinite,
                        max_consecutive_skips=None)


def _fmt(x: float) -> str:
    return f"{x:g}"


def _adaptive() -> list[Strategy]:
    """AutoClip, ZClip and the threshold-free default, for those gradguard exports."""
    out = []
    if hasattr(gg, "AutoClip"):
        out.append(Strategy("AutoClip", lambda: gg.AutoClip()))
    if hasattr(gg, "ZClip"):
        out.append(Strategy("ZClip", lambda: gg.ZClip()))
    default = getattr(gg, "default_clipper", None)
    if default is not None:
        out.append(Strategy("default", default))
    return out


def strategies(suite: str = "quick", *, value: float = 1.0, norm: float | None = None,
               norm_grid: tuple[float, ...] | None = None) -> list[Strategy]:
    """The strategies of a suite, in table order.

    ``value`` is the clip-by-value bound; ``norm`` the threshold of the quick suite's global
    and per-tensor norm rows (default 1.0, Pascanu's threshold); the full suite has global
    norm at every value of ``norm_grid`` (default ``NORM_GRID``) and at ``norm``.
    """
    if suite not in ("quick", "full"):
        raise ValueError(f"suite must be 'quick' or 'full', got {suite!r}")
    n = NORM_QUICK if norm is None else norm
    grid = (n,) if suite == "quick" else tuple(sorted({*(norm_grid or NORM_GRID), n}))
    table = [
        Strategy("none", lambda: None, on_nonfinite="propagate"),
        Strategy(f"value {_fmt(value)}", lambda: ValueClip(value)),
    ]
    table += [Strategy(f"global norm {_fmt(c)}", (lambda c=c: NormClip(c))) for c in grid]
    table.append(Strategy(f"per-tensor norm {_fmt(n)}", lambda: NormClip(n, per_tensor=True)))
    table.append(Strategy("AGC 0.01", lambda: AGC(0.01)))
    table += _adaptive()
    return table
