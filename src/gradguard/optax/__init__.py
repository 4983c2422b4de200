"""gradguard for JAX / optax: clipping and bad-step refusal as ``GradientTransformation`` s.

    import gradguard.optax as ggo
    tx = ggo.skip_nonfinite(optax.chain(ggo.auto(), optax.adam(1e-3)))

Every transformation is jit-able (no host callback), keeps its state as a NamedTuple of
fixed-shape arrays (checkpoint it as any pytree) and records the step's statistics in that
state, readable under ``jit`` with ``optax.tree.get(state, "total_norm")`` or ``ggo.stats``.
Norms are float32 L2 norms accumulated in float32 whatever the update dtype. See
``docs/optax.md`` for the measured differences from optax's own transforms.
"""

from __future__ import annotations

from ._adaptive import AutoState, auto, autoclip, spike_skip, zclip
from ._clip import (
    AGCState,
    ClipState,
    PerLeafClipState,
    ValueClipState,
    agc,
    clip_by_global_norm,
    clip_by_norm_per_leaf,
    clip_by_value,
)
from ._record import HistoryState, Recorder, history, stats
from ._skip import SkipState, check_skips, skip_microstep, skip_nonfinite
from ._tree import TreeNorms, leaf_names, tree_norms

__all__ = [
    "AGCState",
    "AutoState",
    "HistoryState",
    "Recorder",
    "history",
    "stats",
    "auto",
    "autoclip",
    "spike_skip",
    "zclip",
    "ClipState",
    "PerLeafClipState",
    "SkipState",
    "TreeNorms",
    "ValueClipState",
    "agc",
    "check_skips",
    "clip_by_global_norm",
    "clip_by_norm_per_leaf",
    "clip_by_value",
    "leaf_names",
    "skip_microstep",
    "skip_nonfinite",
    "tree_norms",
]
