"""Per-layer statistics of a layer step (every ``layer_every`` steps).

For each layer ``l`` (parameters grouped by module path, ``layers.LayerMap``):

* ``grad_norm``: ``||g_l||_2`` before clipping, from the step's per-tensor norms;
* ``grad_max_abs``: ``max |g|`` over the layer's gradient elements before clipping: the
  Guard's own norm pass hands it over on layer steps (``ClipStats.per_tensor_max_abs``);
  otherwise it is read from the gradients as they are when ``record`` runs;
* ``nonfinite_count``: NaN/Inf elements, counted only in tensors whose ``max |g|`` is not
  finite (a finite one proves the count is 0); -1 when the parameters are unknown;
* ``param_norm``: ``||w_l||_2`` after the step;
* ``update_ratio``: ``||w_l(t) - w_l(t-1)||_2 / ||w_l(t-1)||_2`` over the sample of
  ``update_sample`` elements per tensor snapshotted by ``before_step``; exact when
  ``update_sample`` is None.

DTensor parameters (FSDP2, TP): each rank reads its local shards, and the non-finite counts,
the parameters' sums of squares and the update ratio's sums are added over the job in one
SUM all-reduce per mesh (``gradguard.distributed.per_tensor_sums_over_job``), on layer steps
only; ``max |g|`` comes reduced from the Guard. Every rank then holds the global statistics.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..norms import _any_dtensor, _max_abs, compute_norms, per_tensor_norms
from .layers import LayerMap, layer_l2, layer_max, layer_sum
from .update_sample import UpdateSample


class LayerStats:
    """The parameters a Monitor is attached to, and the statistics read from them."""

    def __init__(self, layer_every: int, update_sample: int | None):
        self.layer_every = layer_every
        self.update_sample = update_sample
        self.params: list[Tensor] | None = None
        self._sample: UpdateSample | None = None
        self._snap: tuple[Tensor | None, Tensor | None] | None = None
        self._snap_step = -1

    def attach(self, params: list[Tensor]) -> None:
        self.params = list(params)
        self._sample = None

    def is_layer_step(self, step: int) -> bool:
        return step % self.layer_every == 0

    def wants_max_abs(self, step: int) -> bool:
        return self.params is not None and self.is_layer_step(step)

    def sample(self) -> UpdateSample:
        assert self.params is not None
        if self._sample is None:
            self._sample = UpdateSample(self.params, self.update_sample)
        return self._sample

    def before_step(self, step: int) -> None:
        """Snapshot the sampled parameters before the optimizer moves them (layer steps)."""
        if self.params is not None and self.is_layer_step(step):
            with torch.no_grad():
                self._snap = self.sample().take()
            self._snap_step = step

    def grad_mask(self, n: int) -> tuple[bool, ...] | None:
        """Which attached parameters have a gradient (None: all of them), checked against
        the ``n`` per-tensor norms of the step."""
        if self.params is None or n == len(self.params):
            # every attached parameter has its norm: no need to look at 100s of .grad fields
            return None
        mask: tuple[bool, ...] | None = tuple(p.grad is not None for p in self.params)
        if all(mask):
            mask = None
        count = len(self.params) if mask is None else sum(mask)
        if count != n:
            raise ValueError(f"per_tensor_norms has {n} entries, {count} attached parameters "
                             "have a gradient")
        return mask

    def fill(self, out: Tensor, step: int, lnorm: Tensor, layer_map: LayerMap,
             mask: tuple[bool, ...] | None, given_max: Tensor | None) -> None:
        """Write the ``LAYER_STATS`` of layer step ``step`` into ``out`` (5 x layers)."""
        L = layer_map.n_layers
        dev = out.device
        idx = layer_map.device_index(dev, mask)
        out[0].copy_(lnorm)
        if self.params is None:
            out[1:].fill_(math.nan)
            out[2].fill_(-1)
            return
        params = self.params if mask is None else [p for p, m in zip(self.params, mask) if m]
        grads = [p.grad for p in params]
        dplan = None
        if _any_dtensor(self.params):  # sharded: local reads, then one sum over the job
            from .. import distributed
            dplan = distributed.plan(list(self.params))
        if given_max is not None and given_max.numel() == len(grads):
            per_max = given_max.to(dev, torch.float32)
        elif grads and dplan is not None:
            per_max = compute_norms(grads, with_max_abs=True).max_abs.to(dev)
        elif grads:
            per_max = _max_abs(grads).to(dev)
        else:
            per_max = torch.zeros(0, dtype=torch.float32, device=dev)
        if dplan is not None:
            grads = [g.to_local() if _any_dtensor([g]) else g for g in grads]
        if dev.type == "cpu":
            # a CPU tensor is read without waiting for anything: count only where needed
            # (per_max is global: every rank counts in the same tensors)
            counts = torch.zeros(len(grads), dtype=torch.int64)
            for j in np.flatnonzero(~np.isfinite(per_max.numpy())):
                counts[j] = torch.count_nonzero(~torch.isfinite(grads[j]))
        elif grads:
            counts = torch.stack([torch.count_nonzero(~torch.isfinite(g)) for g in grads])
        else:
            counts = torch.zeros(0, dtype=torch.int64, device=dev)
        out[1].copy_(layer_max(per_max, idx, L))
        full_idx = layer_map.device_index(dev, None)
        snap = self._snap is not None and self._snap_step == step
        if dplan is not None:
            # one [n, 4] sum over the job: counts, ||w_i||^2, the sample's change and sum of squares
            n_all = len(self.params)
            parts = torch.zeros(n_all, 4, dtype=torch.float64, device=dev)
            pos = torch.arange(n_all, device=dev) if mask is None else \
                torch.tensor([i for i, m in enumerate(mask) if m], dtype=torch.long, device=dev)
            parts[pos, 0] = counts.to(dev, torch.float64)
            local = [p.detach().to_local() if _any_dtensor([p]) else p.detach() for p in self.params]
            parts[:, 1] = per_tensor_norms(local).to(dev, torch.float64).square()
            if snap:
                sample = self.sample()
                parts[:, 2] = sample.change_sumsq(self._snap).to(dev)
                parts[:, 3] = sample.sumsq(self._snap).to(dev)
            tot = distributed.per_tensor_sums_over_job(parts, dplan)
            counts = tot[pos, 0]
            pn = tot[:, 1].sqrt()
        else:
            pn = per_tensor_norms([p.detach() for p in self.params])
        out[2].copy_(layer_sum(counts, idx, L, torch.float64))
        out[3].copy_(layer_l2(pn.to(dev), full_idx, L))
        if snap:
            if dplan is not None:
                num = layer_sum(tot[:, 2], full_idx, L, torch.float64).sqrt()
                den = layer_sum(tot[:, 3], full_idx, L, torch.float64).sqrt()
            else:
                sample = self.sample()
                num = layer_sum(sample.change_sumsq(self._snap).to(dev), full_idx, L, torch.float64).sqrt()
                den = layer_sum(sample.sumsq(self._snap).to(dev), full_idx, L, torch.float64).sqrt()
            out[4].copy_(torch.where(den > 0, num / torch.where(den > 0, den, 1.0),
                                     torch.full_like(den, math.nan)))
        else:
            out[4].fill_(math.nan)
        self._snap = None
