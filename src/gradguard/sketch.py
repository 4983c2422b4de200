"""Bounded, device-resident percentile structures over many values at once (torch).

The per-step structures of ``AutoClip`` are in ``gradguard.rules.autoclip`` (one value a
step, pure functions). This module offers the same two structures as stateful torch objects
that also take a whole tensor of values in one call (bulk ``index_add_`` / ``scatter_reduce_``,
the multi-value form of ``rules.autoclip``'s counting), for analysis code and tests:

``LogHistogram``  the full history in ``bins`` log-spaced bins over ``[lo, hi]``, with each
                  bin's count, smallest and largest value. Memory O(bins).
``RingWindow``    the last ``size`` values exactly (a ring buffer); percentiles are exact.

Percentiles follow ``numpy.percentile``'s default ("linear") definition. The histogram's
estimate is ``rules.autoclip.histogram_percentile``: for values in ``[lo, hi]`` it lies within
a factor ``r = (hi / lo) ** (1 / bins)`` of the exact percentile (``r - 1`` = 0.68 % with the
defaults), and is exact where the neighbouring order statistics are the extremes of their bins.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .rules import _ring
from .rules import autoclip as _autoclip
from .rules.xp_torch import TORCH


class LogHistogram:
    """Counts, smallest and largest value per log-spaced bin over ``[lo, hi]`` (on the device).

    Bin ``b`` holds values in ``[lo * r**b, lo * r**(b + 1))``; values below ``lo``
    (including 0) go to bin 0 and values at or above ``hi`` to the last bin. Non-finite
    values are never counted.
    """

    def __init__(self, bins: int = 8192, lo: float = 1e-12, hi: float = 1e12):
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ValueError(f"bins must be an int >= 2, got {bins!r}")
        self.cfg = _autoclip.config(50.0, bins=bins, lo=lo, hi=hi)
        self.bins, self.lo, self.hi = bins, self.cfg.lo, self.cfg.hi
        self.counts: Tensor | None = None
        self.bin_min: Tensor | None = None
        self.bin_max: Tensor | None = None

    @property
    def ratio(self) -> float:
        """``r``, the ratio of neighbouring bin edges; ``r - 1`` bounds the relative error."""
        return _autoclip.ratio(self.cfg)

    def _ensure(self, device: torch.device) -> None:
        if self.counts is None:
            st = _autoclip.init(self.cfg, TORCH, torch.empty(0, device=device))
            self.counts, self.bin_min, self.bin_max = st.counts, st.bin_min, st.bin_max
        elif self.counts.device != device:
            self.counts = self.counts.to(device)
            self.bin_min = self.bin_min.to(device)  # type: ignore[union-attr]
            self.bin_max = self.bin_max.to(device)  # type: ignore[union-attr]

    def bin_of(self, value: Tensor) -> Tensor:
        """int64 bin index of each value (clamped into ``[0, bins - 1]``; NaN goes to 0)."""
        return _autoclip.bin_of(self.cfg, value, TORCH)

    def add(self, value: Tensor, accept: Tensor | None = None) -> None:
        """Count the values (any shape) that are finite and, per element, ``accept``-ed."""
        self._ensure(value.device)
        value = value.reshape(-1)
        keep = torch.isfinite(value)
        if accept is not None:
            keep = keep & accept.reshape(-1).to(value.device)
        idx = self.bin_of(value)
        v = value.to(torch.float32)
        self.counts.index_add_(0, idx, keep.to(torch.int64))  # type: ignore[union-attr]
        self.bin_min.scatter_reduce_(0, idx, torch.where(keep, v, math.inf), "amin")  # type: ignore[union-attr]
        self.bin_max.scatter_reduce_(0, idx, torch.where(keep, v, -math.inf), "amax")  # type: ignore[union-attr]

    def total(self, device: torch.device | None = None) -> Tensor:
        """int64 0-d count of values seen."""
        if self.counts is None:
            return torch.zeros((), dtype=torch.int64, device=device)
        return self.counts.sum()

    def percentile(self, percentile: float, extra: Tensor | None = None) -> Tensor:
        """The p-th percentile (float32 0-d) of the counted values plus ``extra`` (a 0-d value
        counted for this query only, when finite); NaN when there is no value."""
        device = extra.device if extra is not None else (
            self.counts.device if self.counts is not None else torch.device("cpu"))
        self._ensure(device)
        cfg = self.cfg._replace(percentile=float(percentile))
        return _autoclip.histogram_percentile(cfg, self.counts, self.bin_min, self.bin_max, TORCH,
                                              extra)

    def state_dict(self) -> dict[str, Any]:
        return {"bins": self.bins, "lo": self.lo, "hi": self.hi,
                "counts": None if self.counts is None else self.counts.clone(),
                "bin_min": None if self.bin_min is None else self.bin_min.clone(),
                "bin_max": None if self.bin_max is None else self.bin_max.clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if (int(sd["bins"]), float(sd["lo"]), float(sd["hi"])) != (self.bins, self.lo, self.hi):
            raise ValueError(
                f"histogram layout differs: saved bins={sd['bins']} lo={sd['lo']} hi={sd['hi']}, "
                f"this one bins={self.bins} lo={self.lo} hi={self.hi}")
        c = sd["counts"]
        if c is None:
            self.counts = self.bin_min = self.bin_max = None
            return
        self.counts = c.clone().to(torch.int64)
        if sd.get("bin_min") is None:  # saved before the per-bin extremes: the edges stand in
            lower, upper = _autoclip.bin_edges(self.cfg, TORCH, self.counts)
            seen = self.counts > 0
            self.bin_min = torch.where(seen, lower, math.inf)
            self.bin_max = torch.where(seen, upper, -math.inf)
        else:
            self.bin_min, self.bin_max = sd["bin_min"].clone(), sd["bin_max"].clone()


class RingWindow:
    """The last ``size`` accepted finite values, exactly (float32 ring buffer on the device)."""

    def __init__(self, size: int):
        if isinstance(size, bool) or not isinstance(size, int) or size < 2:
            raise ValueError(f"window must be an int >= 2, got {size!r}")
        self.size = size
        self.values: Tensor | None = None  # float32 [size]; unused slots hold NaN
        self.count: Tensor | None = None   # int64 0-d, values written so far (not capped)

    def _ensure(self, device: torch.device) -> None:
        if self.values is None:
            self.values = torch.full((self.size,), math.nan, dtype=torch.float32, device=device)
            self.count = torch.zeros((), dtype=torch.int64, device=device)
        elif self.values.device != device:
            self.values = self.values.to(device)
            self.count = self.count.to(device)  # type: ignore[union-attr]

    def add(self, value: Tensor, accept: Tensor) -> None:
        """Append ``value`` (0-d) when ``accept`` and finite; otherwise leave all as it was."""
        self._ensure(value.device)
        self.values, self.count = _ring.append(self.values, self.count, value, accept, TORCH)

    def filled(self, device: torch.device) -> Tensor:
        """int64 0-d number of valid values (at most ``size``)."""
        self._ensure(device)
        return self.count.clamp(max=self.size)  # type: ignore[union-attr]

    def valid(self, device: torch.device) -> Tensor:
        """bool [size]: which slots hold a value."""
        self._ensure(device)
        return torch.isfinite(self.values)  # type: ignore[arg-type]

    def percentile(self, percentile: float, extra: Tensor | None = None) -> Tensor:
        """Exact p-th percentile (numpy "linear") of the window plus ``extra`` when finite."""
        device = extra.device if extra is not None else (
            self.values.device if self.values is not None else torch.device("cpu"))
        self._ensure(device)
        if extra is None:
            extra = torch.full((), math.nan, dtype=torch.float32, device=device)
        return _ring.percentile(self.values, extra, float(percentile), TORCH)

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size,
                "values": None if self.values is None else self.values.clone(),
                "count": None if self.count is None else self.count.clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if int(sd["size"]) != self.size:
            raise ValueError(f"window size differs: saved {sd['size']}, this one {self.size}")
        self.values = None if sd["values"] is None else sd["values"].clone()
        self.count = None if sd["count"] is None else sd["count"].clone()
