"""Per-step cost of the clippers in dispatched aten operations (issue 13).

On small models a clipper's step is dominated by per-op dispatch (on the CPU a few
microseconds an op, on CUDA a kernel launch each), so the number of operations one
``clip_`` + ``observe`` dispatches is the cost that can regress unnoticed. It is counted with
a ``TorchDispatchMode``: deterministic for a given torch version, not a timing test. The
bounds are the counts measured when they were set (docs/performance.md, "AutoClip per-step
operations") plus a little headroom for torch's own decompositions changing between versions.

A ``_local_scalar_dense`` is a host read of a tensor value (``x[t]`` with a 0-d index tensor
calls ``.item()`` in C++, unseen by ``tests/conftest.py``'s ``SyncCounter``): on CUDA each is a
synchronisation, so the per-step path must dispatch none.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradguard as gg
from gradguard.norms import collect_grads, compute_norms


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _step_ops(clipper, steps: int = 5) -> collections.Counter[str]:
    """Ops of one ``clip_`` + ``observe`` after ``steps`` steps (the state exists already)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    def one(count: _Count | None):
        model.zero_grad()
        model(torch.randn(4, 8)).pow(2).sum().backward()
        params, grads = collect_grads(model.parameters())
        norms = compute_norms(grads)
        if count is None:
            stats = clipper.clip_(params, grads, norms)
            clipper.observe(norms, ~stats.nonfinite)
            return
        with count:
            stats = clipper.clip_(params, grads, norms)
            clipper.observe(norms, ~stats.nonfinite)

    for _ in range(steps):
        one(None)
    c = _Count()
    one(c)
    return c.ops


# measured with torch 2.13: AutoClip full history 151 (207 before the pair gathers), window
# 77, NormClip 18
BOUNDS = [
    ("autoclip-full-history", lambda: gg.AutoClip(), 160),
    ("autoclip-window", lambda: gg.AutoClip(window=100), 85),
    ("autoclip-small-exact", lambda: gg.AutoClip(90.0, bins=64), 160),
    ("normclip", lambda: gg.NormClip(1.0), 20),
]


@pytest.mark.parametrize("name,make,bound", BOUNDS, ids=[b[0] for b in BOUNDS])
def test_per_step_op_count_is_bounded(name, make, bound):
    ops = _step_ops(make())
    total = sum(ops.values())
    assert total <= bound, f"{name}: {total} ops per step (bound {bound}): {dict(ops)}"
    assert ops["aten._local_scalar_dense"] == 0, f"{name}: a host read per step: {dict(ops)}"


def test_op_count_does_not_grow_with_the_history():
    """Past the exact buffer (1024 norms) the histogram answers: the same ops as before."""
    clip = gg.AutoClip()
    early = sum(_step_ops(clip).values())
    g = torch.ones(3)
    norms = compute_norms([g])
    yes = torch.ones((), dtype=torch.bool)
    for _ in range(1100):
        clip.observe(norms, yes)
    assert int(clip.count()) == 1106 and int(clip._state.n_exact) == 1024  # histogram phase
    assert sum(_step_ops(clip, steps=0).values()) == early


def test_ring_window_percentile_reads_nothing_on_the_host():
    """``sketch.RingWindow.percentile`` (the exact window quantile of ``rules._ring``, used by
    the monitor's window detectors) gathers its two order statistics on the device: no
    ``_local_scalar_dense`` (``x[t]`` with a 0-d index tensor made two per call)."""
    import numpy as np

    from gradguard.sketch import RingWindow

    w = RingWindow(16)
    vals = [1.0 + 0.37 * ((7 * i) % 11) for i in range(20)]
    for v in vals:
        w.add(torch.tensor(v), torch.ones((), dtype=torch.bool))
    mode = _Count()
    with mode:
        got = w.percentile(30.0, torch.tensor(2.5))
    assert mode.ops["_local_scalar_dense"] == 0, dict(mode.ops)
    want = np.percentile(np.asarray(vals[-16:] + [2.5], np.float64), 30.0)
    assert float(got) == pytest.approx(want, rel=1e-6)
