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
