"""Bounded, device-resident structures for percentiles of a stream of gradient norms.

Two structures, both fixed-size tensors on the norms' device, updated and queried without any
host read:

``LogHistogram``  the full history in ``bins`` log-spaced bins over ``[lo, hi]``. Memory and
                  per-step cost are O(bins), whatever the number of values seen.
``RingWindow``    the last ``size`` values exactly (a ring buffer); percentiles are exact.

Percentiles follow ``numpy.percentile``'s default ("linear") definition: for ``n`` values sorted
as ``x_(0) <= ... <= x_(n-1)`` the p-th percentile is ``x_(k) + f * (x_(k+1) - x_(k))`` with
``k + f = p / 100 * (n - 1)``.

Error bound of ``LogHistogram`` (proved in the method docstring, tested against
``np.percentile`` on 1e5 lognormal, Pareto and trending norms): with ``r = (hi / lo) ** (1 /
bins)`` the ratio of neighbouring bin edges (``r - 1`` = 0.68 % with the defaults), and ``q``
the exact percentile of values that all lie in ``[lo, hi]``,

    q / r * x_(k) / x_(k+1)  <=  estimate  <=  q * r,

so the relative error is at most ``r - 1`` plus the relative gap between the two order
statistics around the percentile (negligible for 1e5 values from a continuous distribution).
Values outside ``[lo, hi]`` are counted in the first or last bin (their percentile is reported
as ``lo`` or ``hi``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def _percentile_position(n: Tensor, percentile: float) -> Tensor:
    """0-based fractional rank ``p / 100 * (n - 1)`` as float64 (n: int64 0-d tensor)."""
    return (n.to(torch.float64) - 1.0).clamp(min=0.0) * (percentile / 100.0)


class LogHistogram:
    """Counts of values in ``bins`` log-spaced bins over ``[lo, hi]`` (int64, on the device).

    Bin ``b`` holds values in ``[lo * r**b, lo * r**(b + 1))`` with ``r = (hi / lo) ** (1 /
    bins)``; values below ``lo`` (including 0) go to bin 0 and values at or above ``hi`` to the
    last bin. Non-finite values are never counted.
    """

    def __init__(self, bins: int = 8192, lo: float = 1e-12, hi: float = 1e12):
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ValueError(f"bins must be an int >= 2, got {bins!r}")
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float))) or not (
                0 < lo < hi < math.inf):
            raise ValueError(f"lo and hi must satisfy 0 < lo < hi < inf, got lo={lo!r}, hi={hi!r}")
        self.bins = bins
        self.lo = float(lo)
        self.hi = float(hi)
        self.log_lo = math.log(self.lo)
        self.log_step = (math.log(self.hi) - self.log_lo) / bins
        self.counts: Tensor | None = None

    @property
    def ratio(self) -> float:
        """``r``, the ratio of neighbouring bin edges; ``r - 1`` bounds the relative error."""
        return math.exp(self.log_step)

    def _ensure(self, device: torch.device) -> Tensor:
        if self.counts is None:
            self.counts = torch.zeros(self.bins, dtype=torch.int64, device=device)
        elif self.counts.device != device:
            self.counts = self.counts.to(device)
        return self.counts

    def bin_of(self, value: Tensor) -> Tensor:
        """int64 bin index of each value (clamped into ``[0, bins - 1]``; NaN goes to 0)."""
        v = value.to(torch.float64)
        idx = torch.floor((torch.log(v.clamp(min=self.lo * 0.5)) - self.log_lo) / self.log_step)
        idx = torch.nan_to_num(idx, nan=0.0, posinf=self.bins - 1, neginf=0.0)
        return idx.clamp(0, self.bins - 1).to(torch.int64)

    def add(self, value: Tensor, accept: Tensor | None = None) -> None:
        """Count the values (any shape) that are finite and, per element, ``accept``-ed."""
        counts = self._ensure(value.device)
        value = value.reshape(-1)
        keep = torch.isfinite(value)
        if accept is not None:
            keep = keep & accept.reshape(-1).to(value.device)
        counts.index_add_(0, self.bin_of(value), keep.to(torch.int64))

    def total(self, device: torch.device | None = None) -> Tensor:
        """int64 0-d count of values seen."""
        if self.counts is None:
            return torch.zeros((), dtype=torch.int64, device=device)
        return self.counts.sum()

    def percentile(self, percentile: float, extra: Tensor | None = None) -> Tensor:
        """The p-th percentile (float32 0-d) of the counted values plus ``extra`` (a 0-d value
        counted for this query only, when finite); NaN when there is no value.

        Method: the bin ``b`` that holds the order statistic ``x_(k)``, ``k = floor(pos)``,
        ``pos = p / 100 * (n - 1)``; inside it the estimate is placed log-linearly by rank.
        Proof of the bound in the module docstring: the estimate lies in bin ``b``, so
        ``x_(k) / r <= estimate <= x_(k) * r``; and ``x_(k) <= q <= x_(k+1)``. Hence
        ``estimate <= q * r`` and ``estimate >= q / r * x_(k) / x_(k+1)``.
        """
        device = extra.device if extra is not None else (
            self.counts.device if self.counts is not None else torch.device("cpu"))
        counts = self._ensure(device)
        if extra is not None:
            ok = torch.isfinite(extra)
            add = torch.zeros_like(counts)
            add.index_add_(0, self.bin_of(extra).reshape(1), ok.reshape(1).to(torch.int64))
            counts = counts + add
        cum = torch.cumsum(counts, 0)
        n = cum[-1]
        pos = _percentile_position(n, percentile)
        k = torch.floor(pos)
        # first bin whose cumulative count exceeds k (the bin of x_(k))
        b = torch.searchsorted(cum, k.to(torch.int64), right=True).clamp(max=self.bins - 1)
        in_bin = counts[b].to(torch.float64)
        before = cum[b].to(torch.float64) - in_bin
        frac = ((pos - before + 0.5) / in_bin.clamp(min=1.0)).clamp(0.0, 1.0)
        est = torch.exp(self.log_lo + (b.to(torch.float64) + frac) * self.log_step)
        est = est.clamp(self.lo, self.hi)
        return torch.where(n > 0, est, torch.full_like(est, math.nan)).to(torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"bins": self.bins, "lo": self.lo, "hi": self.hi,
                "counts": None if self.counts is None else self.counts.clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if (int(sd["bins"]), float(sd["lo"]), float(sd["hi"])) != (self.bins, self.lo, self.hi):
            raise ValueError(
                f"histogram layout differs: saved bins={sd['bins']} lo={sd['lo']} hi={sd['hi']}, "
                f"this one bins={self.bins} lo={self.lo} hi={self.hi}")
        c = sd["counts"]
        self.counts = None if c is None else c.clone().to(torch.int64)


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
        keep = accept & torch.isfinite(value)
        slot = torch.remainder(self.count, self.size).reshape(1)  # type: ignore[arg-type]
        old = self.values.index_select(0, slot)  # type: ignore[union-attr]
        new = torch.where(keep, value.to(torch.float32).reshape(1), old)
        self.values.index_copy_(0, slot, new)  # type: ignore[union-attr]
        self.count = self.count + keep.to(torch.int64)  # type: ignore[operator]

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
        vals = self.values.to(torch.float64)  # type: ignore[union-attr]
        if extra is not None:
            vals = torch.cat([vals, extra.to(torch.float64).reshape(1)])
        ok = torch.isfinite(vals)
        n = ok.sum()
        srt = torch.sort(torch.where(ok, vals, math.inf)).values
        pos = _percentile_position(n, percentile)
        k = torch.floor(pos)
        f = pos - k
        k = k.to(torch.int64)
        k1 = torch.minimum(k + 1, (n - 1).clamp(min=0))
        lo_v = srt[k]
        hi_v = srt[k1]
        est = lo_v + f * (hi_v - lo_v)
        return torch.where(n > 0, est, torch.full_like(est, math.nan)).to(torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size,
                "values": None if self.values is None else self.values.clone(),
                "count": None if self.count is None else self.count.clone()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if int(sd["size"]) != self.size:
            raise ValueError(f"window size differs: saved {sd['size']}, this one {self.size}")
        self.values = None if sd["values"] is None else sd["values"].clone()
        self.count = None if sd["count"] is None else sd["count"].clone()
