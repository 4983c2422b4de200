"""The threshold-free default on the seed's own experiment: never diverges, and ends within
1.25x of the best global-norm threshold of the grid (one seed here; the 3-seed, 3-task table
is ``python benchmarks/adaptive_bench.py table``, see docs/adaptive.md)."""

from __future__ import annotations

import math

import torch

import gradguard as gg
from gradguard.experiments import seed_mlp
from gradguard.experiments.strategies import Strategy

GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def test_default_within_125_of_best_grid_threshold_on_seed_mlp():
    torch.set_num_threads(1)
    grid = {c: seed_mlp.run(Strategy(f"global norm {c:g}", lambda c=c: gg.NormClip(c)), 0)
            for c in GRID}
    best = min(r.history.final_loss for r in grid.values())
    default = seed_mlp.run(Strategy("default", gg.default_clipper), 0)
    h = default.history
    assert h.first_nonfinite_epoch is None and h.skipped_steps == 0
    assert all(math.isfinite(v) for v in h.epoch_loss)
    assert h.final_loss <= 1.25 * best, (h.final_loss, best)


def test_peers_without_a_tuned_number_fail_here():
    """The problem the default solves: ZClip without a cap and unclipped SGD diverge."""
    torch.set_num_threads(1)
    cfg = seed_mlp.MLPConfig(epochs=3)
    for st in (Strategy("ZClip", lambda: gg.ZClip()),
               Strategy("none", lambda: None, on_nonfinite="propagate")):
        h = seed_mlp.run(st, 0, cfg).history
        assert h.first_nonfinite_epoch is not None or h.skipped_steps > 0 or h.final_loss > 1e4
