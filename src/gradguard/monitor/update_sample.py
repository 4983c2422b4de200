"""The fixed parameter sample behind the update-to-weight ratio.

    ratio_l = ||w_l(t) - w_l(t-1)||_2 / ||w_l(t-1)||_2

is estimated on a fixed sample of each parameter: a tensor of at most ``sample`` elements is
taken whole; a larger one contributes runs of 16 consecutive elements (one 64-byte cache
line of float32), every k-th run, ``k = ceil((numel // 16) / (sample // 16))`` (a tail of
fewer than 16 elements is left out). ``sample=None`` takes every element (exact).

The sample is copied out with one ``torch.cat`` per kind of view (the strided runs, the whole
small tensors) instead of one copy per tensor, and the per-tensor sums of squares come from
one segment sum, so a layer step costs a handful of operations whatever the number of
parameters.

DTensor parameters (FSDP2, TP) are sampled on the shard each rank holds; the per-tensor sums
are this rank's, added over the job by ``LayerStats`` (``gradguard.distributed``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..norms import per_tensor_norms

RUN = 16  # elements per run of the sample
# Whole tensors up to this many elements in total are summed with one index_add over a
# per-element owner index; beyond (update_sample=None on a big model) per tensor.
_OWNER_INDEX_MAX = 1 << 20


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard (no import of torch.distributed needed); other tensors as is."""
    return t.to_local() if type(t) is not Tensor and type(t).__name__ == "DTensor" else t


class UpdateSample:
    """Views of a fixed sample of ``params``, rebuilt when a parameter's memory changes."""

    def __init__(self, params: list[Tensor], sample: int | None):
        self.params = params
        self.sample = sample
        self._key: tuple[int, ...] | None = None
        self._runs: list[Tensor] = []    # (rows, RUN) strided views
        self._whole: list[Tensor] = []   # 1-d views of whole tensors
        self._run_owner: Tensor | None = None
        self._whole_owner: Tensor | None = None
        self._whole_sizes: list[int] = []
        self._whole_index: list[int] = []

    def _build(self) -> None:
        local = [_local(p) for p in self.params]
        key = tuple(p.data_ptr() for p in local)
        if key == self._key:
            return
        runs, whole, run_owner, whole_owner, sizes = [], [], [], [], []
        us = self.sample
        for i, p in enumerate(local):
            flat = p.detach().reshape(-1)
            n = flat.numel()
            if us is None or n <= us:
                whole.append(flat)
                whole_owner.append(i)
                sizes.append(n)
                continue
            r = n // RUN
            k = max(1, -(-r // max(1, us // RUN)))
            v = flat[: r * RUN].view(r, RUN)[::k]
            runs.append(v)
            run_owner += [i] * v.shape[0]
        dev = self.params[0].device if self.params else torch.device("cpu")
        self._runs, self._whole, self._whole_sizes = runs, whole, sizes
        self._run_owner = torch.tensor(run_owner, dtype=torch.int64).to(dev)
        if sum(sizes) <= _OWNER_INDEX_MAX:
            owners = torch.tensor(whole_owner, dtype=torch.int64)
            self._whole_owner = owners.repeat_interleave(torch.tensor(sizes, dtype=torch.int64)).to(dev)
        else:
            self._whole_owner = None
        self._whole_index = whole_owner
        # a non-contiguous parameter was copied by reshape: such views go stale, rebuild each time
        self._key = key if all(p.is_contiguous() for p in local) else None

    def take(self) -> tuple[Tensor | None, Tensor | None]:
        """A copy of the sample now: ``(runs (rows, 16), whole (elements,))``."""
        self._build()
        runs = torch.cat(self._runs) if self._runs else None
        whole = torch.cat(self._whole) if self._whole else None
        return runs, whole

    def sumsq(self, taken: tuple[Tensor | None, Tensor | None]) -> Tensor:
        """Per-parameter sums of squares (float64, on the parameters' device) of a sample."""
        runs, whole = taken
        dev = self.params[0].device
        out = torch.zeros(len(self.params), dtype=torch.float64, device=dev)
        if runs is not None:
            out.index_add_(0, self._run_owner, runs.double().square().sum(1))
        if whole is not None:
            if self._whole_owner is not None:
                out.index_add_(0, self._whole_owner, whole.double().square())
            else:
                parts = whole.split(self._whole_sizes)
                norms = per_tensor_norms(list(parts)).to(dev, torch.float64)
                out.index_add_(0, torch.tensor(self._whole_index, device=dev), norms.square())
        return out

    def change_sumsq(self, before: tuple[Tensor | None, Tensor | None]) -> Tensor:
        """Per-parameter ``||sample(now) - before||^2`` (float64)."""
        now = self.take()
        diff = tuple(None if a is None else a - b for a, b in zip(now, before))
        return self.sumsq(diff)  # type: ignore[arg-type]
