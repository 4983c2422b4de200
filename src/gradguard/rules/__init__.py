"""Pure clipping and skip rules: explicit state in, decision and proposed state out.

One implementation of each rule, written against an array namespace ``xp`` so that the same
code runs on numpy, torch (any device), ``jax.numpy`` (under ``jit``) and TensorFlow (under
``tf.function``). The torch classes (``gradguard.NormClip``, ``AutoClip``, ``ZClip``,
``OvershootClip``, ``SpikeSkip``, ``AGC``) and the adapters are façades over these modules;
none of them carries its own copy of the math.

Modules (one per rule; each opens with its paper citation and the math):

    norm_clip    the clip coefficient min(1, threshold / (total + 1e-6)) and its non-finite
                 policy (the ONE place it is computed), per-tensor coefficients
    value_clip   element-wise clamp
    agc          unit-wise adaptive clipping (NFNets), max-normalised unit norms
    autoclip     percentile of the norm history (exact buffer, then a min/max histogram)
    zclip        EMA z-score with the reciprocal threshold
    overshoot    the threshold-free default (step-size control + spike cap)
    spike_skip   refuse an update whose norm or loss spikes
    xp           the array namespace (operation list) and its registry; ``xp_torch`` here,
                 ``xp_jax`` and ``xp_tf`` in the adapters' files

The shape of a rule (``r`` one of the modules):

``r.Config``
    a NamedTuple of Python numbers/strings (hashable, static under jit). Build it with
    ``r.config(...)``, which checks every argument and raises TypeError/ValueError naming it.
``r.init(cfg, xp, like=None) -> r.State``
    a NamedTuple of arrays of fixed shapes and dtypes (float32 values, int64 counts, bool
    flags) on ``like``'s device. ``autoclip`` has two: ``WindowState`` / ``HistoryState``.
``r.update(cfg, state, obs, xp) -> (decision, proposed)``
    ``obs`` is the step's observation: the 0-d float32 global norm for ``norm_clip``,
    ``autoclip``, ``zclip``; ``overshoot.Observation(total, cos)``;
    ``spike_skip.Observation(total, loss)``. The decision is a 0-d float32 **threshold** for
    clippers (turn it into the coefficient with ``norm_clip.coefficient(total, threshold, xp,
    nonfinite=..., propagate=..., strict=True)``; ``strict`` for adaptive thresholds) or a
    0-d bool **skip flag** for ``spike_skip``. ``proposed`` is the state after this step if
    the step is accepted; a rule already keeps the old values for observations it refuses
    itself (a non-finite norm, a zero norm for ``overshoot``).
``commit(accept, proposed, old, xp) -> State``
    the one way statistics change: ``proposed`` where ``accept`` (0-d bool), else ``old``,
    field by field (fields the step left unchanged cost nothing). A skipped or non-finite
    step never enters the statistics.
``accept=`` (keyword of ``zclip.update``, ``overshoot.update``, ``autoclip.propose``,
    ``spike_skip.propose``)
    the same commit folded into the rule's own choice: ``update(cfg, state, obs, xp,
    accept=a)[1] == commit(a, update(cfg, state, obs, xp)[1], state, xp)``, with one ``where``
    per field instead of two (what the torch façades use; tested in ``tests/test_rules.py``).

Two-phase use (the torch façades): ``threshold`` (below) for the decision when the step's
gradients are seen, then ``update`` / ``propose`` with ``accept`` once the skip decision is
known. ``autoclip.propose`` is ``update`` without the threshold (the percentile query is the
expensive part, so it is not computed twice).

Queries without a step: ``autoclip.threshold(cfg, state, total, xp)``,
``zclip.threshold(cfg, state, total, xp)`` / ``zclip.onset(cfg, state, xp)``,
``overshoot.threshold(cfg, state, xp)``, ``spike_skip.check(...)`` / ``limits(...)``.
Stateless helpers: ``value_clip.clip``, ``agc.unit_norm`` / ``agc.coefficient``,
``norm_clip.per_tensor_coefficients``, ``overshoot.cosine``, ``overshoot.initial_limit``.

Rules: no Python branching on array values, no host reads, fixed shapes; Python branches on
the configuration only. A training step with a clipper and a skip rule:

    thr, prop = zclip.update(zcfg, zstate, total, xp)
    coef = norm_clip.coefficient(total, thr, xp, nonfinite=~xp.isfinite(total), strict=True)
    skip, sprop = spike_skip.update(scfg, sstate, spike_skip.Observation(total, loss), xp)
    accept = ~skip & xp.isfinite(total)
    zstate = commit(accept, prop, zstate, xp)
    sstate = commit(accept, sprop, sstate, xp)

Reference vectors every backend must reproduce: ``tests/rule_vectors.py``.
"""

from __future__ import annotations

from . import agc, autoclip, norm_clip, overshoot, spike_skip, value_clip, xp, zclip
from ._core import commit
from .xp import NUMPY, namespace, register

__all__ = ["NUMPY", "agc", "autoclip", "commit", "namespace", "norm_clip", "overshoot",
           "register", "spike_skip", "value_clip", "xp", "zclip"]
