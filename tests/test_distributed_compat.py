"""Single-process checks of gradguard.distributed: torch 2.4 compatibility of the code path,
argument errors, and the mesh-slice logic (the multi-rank behaviour: test_distributed.py)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

import gradguard as gg
from gradguard import distributed as ggd

SRC = Path(gg.__file__).parent


def test_code_path_uses_no_torch_26_api():
    """get_total_norm / clip_grads_with_norm_ appeared in torch 2.6; gradguard supports 2.4.
    (The multi-rank tests also replace them with functions that raise.)"""
    files = [SRC / "distributed.py", SRC / "norms.py", SRC / "functional.py", SRC / "clippers.py",
             SRC / "adaptive.py", SRC / "guard.py", *sorted((SRC / "kernels").glob("*.py"))]
    banned = {"get_total_norm", "clip_grads_with_norm_", "_NormPartial"}
    for f in files:
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):  # code, not docstrings: names, attributes, imports
            used = {getattr(node, "attr", None), getattr(node, "id", None)}
            if isinstance(node, ast.ImportFrom | ast.Import):
                used |= {a.name for a in node.names}
            assert not used & banned, f"{f.name}:{getattr(node, 'lineno', '?')} uses {used & banned}"


def test_single_process_path_does_not_import_distributed(monkeypatch):
    monkeypatch.delitem(sys.modules, "gradguard.distributed", raising=False)
    p = torch.nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    n = gg.grad_norm([p])
    assert "gradguard.distributed" not in sys.modules
    assert n.plan is None and n.reduced_nonfinite is None and n.loss is None
    assert torch.allclose(n.total, p.grad.norm())


def test_bad_groups_name_the_argument():
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.ones(3)
    with pytest.raises(TypeError, match="pp_group"):
        gg.grad_norm([p], pp_group=42)
    with pytest.raises(TypeError, match="process_group"):
        gg.grad_norm([p], process_group="world")


def test_a_group_without_init_process_group_is_refused():
    import torch.distributed as dist
    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is initialised in this process")

    class FakeMesh:  # a 1-D DeviceMesh as far as _as_group looks
        ndim = 1
        mesh = torch.arange(1)

        def get_group(self, dim):
            return object()

    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        gg.grad_norm([p], pp_group=FakeMesh())


class _Mesh:
    """What _lift reads of a DeviceMesh: ranks, dimension names, this rank's coordinate."""

    def __init__(self, ranks, names, me):
        self.mesh = torch.as_tensor(ranks)
        self.mesh_dim_names = names
        self.ndim = self.mesh.ndim
        self.device_type = "cpu"
        where = (self.mesh == me).nonzero()
        self._coord = [int(c) for c in where[0]] if len(where) else None

    def get_coordinate(self):
        return self._coord


@pytest.mark.parametrize("me", range(4))
def test_lift_maps_the_dp_slice_onto_the_2d_mesh(me):
    big = _Mesh([[0, 1], [2, 3]], ("dp", "tp"), me)
    tp = me % 2
    dp_slice = _Mesh([tp, 2 + tp], ("dp",), me)  # mesh["dp"] through this rank
    assert ggd._lift(dp_slice, big) == {0: 0}
    tp_slice = _Mesh([me - tp, me - tp + 1], ("tp",), me)
    assert ggd._lift(tp_slice, big) == {0: 1}
    other = _Mesh([1 - tp, 3 - tp], ("dp",), me)  # the other column: not this rank's slice
    assert ggd._lift(other, big) is None
    assert ggd._lift(_Mesh([0, 1], ("pp",), me), big) is None  # a name the big mesh lacks


# -- the reduction's arithmetic, N simulated ranks in threads -------------------------------
class _ThreadCollective:
    """``dist.all_reduce`` for N threads standing in for N ranks (one group: all of them)."""

    def __init__(self, n: int):
        import threading
        self.n = n
        self.slots: list = [None] * n
        self.barrier = threading.Barrier(n, timeout=20)
        self.local = threading.local()

    def all_reduce(self, vec, op=None, group=None):
        import torch.distributed as dist
        r = self.local.rank
        self.slots[r] = vec.clone()
        self.barrier.wait()
        stack = torch.stack(self.slots)
        out = stack.amax(0) if op == dist.ReduceOp.MAX else stack.sum(0)
        self.barrier.wait()
        vec.copy_(out)


def _simulate(n_ranks, layouts, values, losses, norm_type):
    """Run reduce_partials on n_ranks threads. layouts[i]: "shard" (tensor i split in
    n_ranks chunks) or "replicate" (every rank holds all of it); values[i]: the full tensor."""
    import threading

    from gradguard.distributed import DistPlan, _Root, reduce_partials
    coll = _ThreadCollective(n_ranks)
    out: list = [None] * n_ranks
    errors: list = []

    def rank_main(r):
        try:
            coll.local.rank = r
            local = []
            for lay, v in zip(layouts, values):
                local.append(v.tensor_split(n_ranks)[r] if lay == "shard" else v)
            norms = torch.stack([torch.linalg.vector_norm(t.double(), norm_type) for t in local]).float()
            k = len(values)
            root = _Root(mesh=None, index=list(range(k)),
                         counted=[lay == "shard" or r == 0 for lay in layouts], groups=[None])
            root.mask = torch.tensor(root.counted)
            root.idx = torch.arange(k)
            plan = DistPlan([root], [], [], None, None, k)
            out[r] = reduce_partials(norms, norm_type, plan, loss=losses[r])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
            coll.barrier.abort()

    import torch.distributed as dist
    orig = dist.all_reduce
    dist.all_reduce = coll.all_reduce
    try:
        threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(n_ranks)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        dist.all_reduce = orig
    assert not errors, errors
    return out


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(n_ranks=st.integers(2, 4), seed=st.integers(0, 2**31 - 1),
       layouts=st.lists(st.sampled_from(["shard", "replicate"]), min_size=1, max_size=5),
       norm_type=st.sampled_from([1.0, 2.0, 3.0, float("inf")]),
       scale=st.sampled_from([1e-30, 1.0, 1e30]), nan_rank=st.integers(-1, 3))
def test_reduce_partials_equals_the_float64_norm_of_the_whole(n_ranks, seed, layouts, norm_type,
                                                             scale, nan_rank):
    """Every distinct element counted once, whatever the mix of shards and replicas; float32
    norms of 1e+-30 scale do not over- or underflow; a NaN on one rank's shard is seen by all."""
    import numpy as np
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(int(torch.randint(0, 9, (), generator=g)) + n_ranks, generator=g,
                          dtype=torch.float64) * scale for _ in layouts]
    if 0 <= nan_rank < n_ranks and "shard" in layouts:
        i = layouts.index("shard")
        values[i] = values[i].clone()
        values[i].tensor_split(n_ranks)[nan_rank][0] = float("nan")  # a view: one rank's shard
    losses = [float(r + 1) if r % 2 == 0 else None for r in range(n_ranks)]
    got = _simulate(n_ranks, layouts, values, losses, norm_type)
    want_per = np.array([np.linalg.norm(v.numpy(), norm_type) for v in values])
    want_total = np.linalg.norm(want_per, norm_type)
    given_losses = [x for x in losses if x is not None]
    for r, red in enumerate(got):
        np.testing.assert_allclose(red.per_tensor.double().numpy(), want_per, rtol=2e-6)
        np.testing.assert_allclose(float(red.total), want_total, rtol=2e-6)
        assert bool(red.nonfinite) == bool(np.isnan(want_total))
        if losses[r] is None:
            assert red.loss is None
        else:
            assert float(red.loss) == pytest.approx(sum(given_losses) / len(given_losses))
        assert torch.equal(red.per_tensor, got[0].per_tensor) or bool(red.nonfinite)
