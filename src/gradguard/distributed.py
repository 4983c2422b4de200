"""Gradient-norm reductions over process groups and device meshes (DDP, FSDP2, TP, PP).

Size: one planner and one reduction for every placement and group (DDP, FSDP2, TP, PP);
splitting them would separate the counting rule from the plan it relies on.

Every rank computes the p-th powers of its *local* per-tensor norms (the gradient shards it
holds, read once by ``gradguard.norms``), and ``reduce_partials`` (the one function where
norm partials cross ranks) adds them up so that each distinct piece of every gradient is
counted exactly once:

    ||g_i||_p^p = sum over the distinct shards s of g_i of ||s||_p^p           (p < inf)
    ||g_i||_inf = max over the distinct shards s of g_i of ||s||_inf
    ||g||_p^p   = sum_i ||g_i||_p^p   (+ the pipeline stages' sums, ``pp_group``)

What is reduced over which group:

* a DTensor gradient on mesh M: summed over the mesh dimensions where it is ``Shard``; on a
  ``Replicate`` dimension only the rank at coordinate 0 contributes (replicas counted once,
  exactly, with no division); a ``Partial`` gradient is first redistributed to
  ``Replicate`` on those dimensions (one collective per such tensor, the only way to get the
  norm of a sum; FSDP2 and TP do not produce them for gradients);
* meshes that are slices of a larger mesh in the same call (FSDP2 + TP: a LayerNorm sharded
  only over ``dp`` lives on ``mesh["dp"]``, a slice of the ``(dp, tp)`` mesh of the
  tensor-parallel weights) are lifted onto it, the missing dimensions being ``Replicate``,
  so the whole call is **one** all-reduce over the largest mesh. This is the grouping by
  mesh of transformers/accelerate (pytorch#180346, where torch's own clip raises), with the
  groups combined in the same collective instead of one per mesh;
* a plain-tensor gradient is complete on this rank and replicated across the data-parallel
  ranks (DDP has all-reduced it): it is not reduced; with ``process_group`` (DDP's group) the
  non-finite flag and the loss are reduced over that group;
* ``pp_group``: the ranks of the other pipeline stages hold *different* parameters: each
  stage's total and flag are summed over it (the per-tensor norms stay those of the stage's
  own parameters, already complete).

The vector all-reduced over a mesh is float64: ``[n_1^p (masked), ..., n_k^p, nonfinite,
loss_sum, loss_count]``; the norms are accumulated in float32 or wider *before* the
collective (a bfloat16 all-reduce of norms loses the result, NeMo Automodel #825), and the
squares of float32 norms cannot overflow float64. The non-finite flag counts every local
non-finite norm, masked replica or not, so a NaN on one rank or one shard makes every rank
skip. All ranks issue the same collectives in the same order with vectors of the same
length (a stage or rank without a loss sends ``loss_count = 0``), so nobody waits on a
collective another rank skipped. Nothing here reads a value on the host on a step (one read
at the first call under ``pp_group``, see ``reduce_partials``): the result stays on the
gradients' device (no synchronisation on CUDA with NCCL).

Uses only APIs present since torch 2.4 (``DTensor.to_local``, ``DeviceMesh.mesh``,
``get_coordinate``, ``get_group``, ``Placement.is_shard``/``is_replicate``/``is_partial``,
``dist.all_reduce``); not ``torch.nn.utils.get_total_norm`` (2.6) nor DTensor's own
``_NormPartial`` dispatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch 2.4
    try:
        from torch.distributed._tensor import DTensor  # type: ignore[no-redef]
    except ImportError:
        DTensor = None  # type: ignore[assignment,misc]

__all__ = ["DistPlan", "Reduced", "all_reduce_loss", "is_dtensor", "per_tensor_sums_over_job",
           "plan", "reduce_partials", "sample_dot_norms", "sums_over_job"]


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``."""
    return DTensor is not None and isinstance(t, DTensor)


def _as_group(group: Any, name: str) -> Any:
    """A ProcessGroup from a ProcessGroup or a 1-D DeviceMesh; None stays None."""
    if group is None:
        return None
    if hasattr(group, "get_group") and hasattr(group, "mesh"):
        if group.ndim != 1:
            raise ValueError(f"{name} must be a ProcessGroup or a 1-D DeviceMesh, got a "
                             f"{group.ndim}-D mesh {group}")
        return group.get_group(0)
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{name} must be a torch.distributed ProcessGroup or a 1-D DeviceMesh, "
                        f"got {type(group).__name__}")
    return group


@dataclass
class _Root:
    """One mesh and the gradients reduced over it (in one collective when possible)."""

    mesh: Any
    index: list[int] = field(default_factory=list)  # positions in the grads list
    counted: list[bool] = field(default_factory=list)  # False: a replica on this rank
    groups: list[Any] = field(default_factory=list)  # all-reduce over each in turn
    mask: Tensor | None = None  # bool [len(index)] on the device
    idx: Tensor | None = None  # int64 [len(index)] on the device (built once: no copy per step)


@dataclass
class DistPlan:
    """How the gradients of one call are reduced; built from their layout, cached.

    ``roots``: the meshes (largest first) with the gradients reduced over each; ``plain``:
    positions of plain-tensor gradients; ``partial``: positions of ``Partial`` gradients
    (redistributed before their norm is taken); ``process_group`` / ``pp_group``: see the
    module docstring.
    """

    roots: list[_Root]
    plain: list[int]
    partial: list[int]
    process_group: Any
    pp_group: Any
    n: int
    # every mesh and group of the key, held so that their ids in the cache key stay theirs
    keep: tuple = ()
    # pp_group: whether some stage passes a loss (read on the host once, at the first call)
    pp_loss: bool | None = None

    def localize(self, grads: list[Tensor]) -> list[Tensor]:
        """The tensors whose norms are this rank's partials: DTensors' local shards."""
        out = []
        for i, g in enumerate(grads):
            if is_dtensor(g):
                if i in self.partial:
                    pl = [_replicate() if p.is_partial() else p for p in g.placements]
                    g = g.redistribute(g.device_mesh, pl)
                g = g.to_local()
            out.append(g)
        return out


def _replicate() -> Any:
    try:
        from torch.distributed.tensor import Replicate
    except ImportError:  # pragma: no cover - torch 2.4
        from torch.distributed._tensor import Replicate  # type: ignore[no-redef]
    return Replicate()


def _lift(small: Any, big: Any) -> dict[int, int] | None:
    """Map ``small``'s dimensions onto ``big``'s when ``small`` is the slice of ``big``
    through this rank (same ranks, dimension names a subset); else None."""
    if small is big:
        return {d: d for d in range(small.ndim)}
    ns, nb = small.mesh_dim_names, big.mesh_dim_names
    if not ns or not nb or not set(ns) <= set(nb) or small.device_type != big.device_type:
        return None
    coord = big.get_coordinate()
    if coord is None:
        return None
    idx = tuple(slice(None) if n in ns else coord[j] for j, n in enumerate(nb))
    sub = big.mesh[idx]
    kept = [n for n in nb if n in ns]
    sub = sub.permute([kept.index(n) for n in ns]) if len(ns) > 1 else sub
    if tuple(sub.shape) != tuple(small.mesh.shape) or not torch.equal(sub, small.mesh):
        return None
    return {d: nb.index(n) for d, n in enumerate(ns)}


def _mesh_groups(mesh: Any) -> list[Any]:
    """Process groups whose successive SUMs add over every rank of ``mesh``: one group
    when it is 1-D or spans the world, else one per dimension."""
    if mesh.ndim == 1:
        return [mesh.get_group(0)]
    if mesh.size() == dist.get_world_size():
        return [None]  # the default (world) group
    return [mesh.get_group(d) for d in range(mesh.ndim)]


_PLANS: dict[tuple, DistPlan] = {}
_MAX_PLANS = 16


def plan(grads: list[Tensor], *, process_group: Any = None, pp_group: Any = None) -> DistPlan | None:
    """The reduction plan of ``grads``, or None when nothing is distributed (no DTensor, no
    group given): then the single-process path applies unchanged."""
    process_group = _as_group(process_group, "process_group")
    pp_group = _as_group(pp_group, "pp_group")
    has_dt = any(is_dtensor(g) for g in grads)
    if not has_dt and process_group is None and pp_group is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gradguard: DTensor gradients or a process group need an initialised "
                           "torch.distributed (dist.init_process_group)")
    key = (tuple((id(g.device_mesh), tuple(g.placements)) if is_dtensor(g) else None
                 for g in grads), id(process_group), id(pp_group),
           grads[0].device if grads else None)
    hit = _PLANS.get(key)
    if hit is not None:
        return hit
    meshes: list[Any] = []
    for g in grads:
        if is_dtensor(g) and all(g.device_mesh is not m for m in meshes):
            meshes.append(g.device_mesh)
    meshes.sort(key=lambda m: (-m.ndim, -m.size()))
    roots: list[_Root] = []
    lifts: dict[int, tuple[_Root, dict[int, int]]] = {}
    for m in meshes:
        for r in roots:
            mp = _lift(m, r.mesh)
            if mp is not None:
                lifts[id(m)] = (r, mp)
                break
        else:
            r = _Root(m, groups=_mesh_groups(m))
            roots.append(r)
            lifts[id(m)] = (r, {d: d for d in range(m.ndim)})
    plain: list[int] = []
    partial: list[int] = []
    for i, g in enumerate(grads):
        if not is_dtensor(g):
            plain.append(i)
            continue
        r, mp = lifts[id(g.device_mesh)]
        coord = r.mesh.get_coordinate()
        on_big = {mp[d]: pl for d, pl in enumerate(g.placements)}
        if any(pl.is_partial() for pl in g.placements):
            partial.append(i)
        # counted once: coordinate 0 on every dimension where the gradient is replicated
        # (a dimension of the big mesh the gradient's mesh lacks is a replicated one);
        # every other placement splits the data (Shard, FSDP2's _StridedShard, which is not
        # is_shard() in torch 2.13). A Partial dimension is redistributed to Replicate before
        # the norm (``localize``), so it counts as replicated.
        counted = all(coord[j] == 0 for j in range(r.mesh.ndim)
                      if j not in on_big or on_big[j].is_replicate() or on_big[j].is_partial())
        r.index.append(i)
        r.counted.append(counted)
    dev = grads[0].device if grads else torch.device("cpu")
    for r in roots:
        r.mask = torch.tensor(r.counted, dtype=torch.bool, device=dev)
        r.idx = torch.tensor(r.index, dtype=torch.long, device=dev)
    out = DistPlan(roots, plain, partial, process_group, pp_group, len(grads),
                   keep=(tuple(meshes), process_group, pp_group))
    _PLANS[key] = out
    while len(_PLANS) > _MAX_PLANS:
        _PLANS.pop(next(iter(_PLANS)))
    return out


@dataclass(frozen=True)
class Reduced:
    """Global results of one reduction (device tensors, identical on every rank of the job
    except ``per_tensor``/``max_abs`` under ``pp_group``, which are the stage's own)."""

    per_tensor: Tensor  # float32 [n], in the order of the grads
    total: Tensor  # float32 0-d
    nonfinite: Tensor  # bool 0-d
    loss: Tensor | None  # float32 0-d mean of the given losses, or None
    max_abs: Tensor | None  # float32 [n]


def _loss_pair(loss: Any, device: torch.device) -> Tensor:
    """``[loss, 1]`` (float64) for a loss, ``[0, 0]`` without one."""
    if loss is None:
        return torch.zeros(2, dtype=torch.float64, device=device)
    if isinstance(loss, Tensor):
        t = loss.detach()
        if is_dtensor(t):
            t = t.full_tensor()
        t = t.reshape(-1).to(device=device, dtype=torch.float64).mean().reshape(1)
    else:
        t = torch.full((1,), float(loss), dtype=torch.float64, device=device)
    return torch.cat([t, torch.ones(1, dtype=torch.float64, device=device)])


def _sum(vec: Tensor, groups: list[Any]) -> Tensor:
    for g in groups:
        dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=g)
    return vec


def _max(vec: Tensor, groups: list[Any]) -> Tensor:
    """MAX all-reduce of ``vec`` over each group in turn that keeps NaN: a backend's max may
    drop it (gloo's does: max(NaN, 1) is 1 there). A NaN entry goes as -inf with a 0/1 mark
    in the same vector (one collective, twice the length) and comes back as NaN."""
    nan = torch.isnan(vec)
    both = torch.cat([torch.where(nan, torch.full_like(vec, -math.inf), vec), nan.to(vec.dtype)])
    for g in groups:
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=g)
    k = vec.numel()
    return torch.where(both[k:] > 0, torch.full_like(vec, math.nan), both[:k])


#: ``loss`` default of ``reduce_partials``: the caller handles no loss (``grad_norm``), as
#: opposed to None, "this rank has none" (a pipeline stage before the last)
NO_LOSS: Any = object()


def reduce_partials(local_norms: Tensor, norm_type: float, p: DistPlan, *,
                    local_max_abs: Tensor | None = None, loss: Any = NO_LOSS) -> Reduced:
    """Turn this rank's per-tensor norms (of its local shards, float32, in grads order)
    into the job's per-tensor norms, total norm, non-finite flag and mean loss.

    Collectives, in this order on every rank (vectors float64):

    * over each root mesh, one SUM all-reduce of ``[masked n_i^p..., flag, loss_sum,
      loss_count]`` (the loss slots on the first root only, and only without ``pp_group``);
      for p = inf a MAX all-reduce of ``[masked n_i..., flag]`` (twice the length: NaN
      marks, see ``_max``) and the loss in a SUM of its own;
    * with ``pp_group``: one all-reduce of ``[stage_sum, flag, loss_sum, loss_count]`` over
      it (SUM; MAX of ``[stage_max, flag]`` for p = inf);
    * with ``process_group`` and no DTensor (DDP): one SUM all-reduce of ``[flag, loss_sum,
      loss_count]`` over it;
    * with ``local_max_abs`` (the Monitor's layer steps): one MAX all-reduce of it (and its
      NaN marks) per root.

    ``Reduced.loss``: the mean of the losses given on the ranks that gave one, or None when
    this rank gave none; with ``pp_group`` a stage without a loss gets the mean of the
    stages' that have one (whether any stage has one is read on the host once per layout,
    at the first call: the only host read here).
    """
    dev = local_norms.device
    inf = math.isinf(norm_type)
    f64 = torch.float64
    norms64 = local_norms.to(f64)
    flag = (~torch.isfinite(norms64)).any().to(f64).reshape(1)
    parts = norms64 if inf else norms64 ** norm_type  # n_i^p; NaN/inf stay so
    glob = parts.clone()  # becomes the global per-tensor partials
    wants_loss = loss is not NO_LOSS
    loss = None if loss is NO_LOSS else loss
    lp = _loss_pair(loss, dev)
    loss_done = False
    for k, r in enumerate(p.roots):
        idx = r.idx
        mine = parts.index_select(0, idx)
        mine = torch.where(r.mask, mine, torch.zeros_like(mine))  # where: NaN * 0 is NaN
        if inf:
            vec = _max(torch.cat([mine, flag]), r.groups)
        else:
            carry = k == 0 and p.pp_group is None
            vec = _sum(torch.cat([mine, flag] + ([lp] if carry else [])), r.groups)
            if carry:
                lp, loss_done = vec[-2:], True
                vec = vec[:-2]
        glob = glob.index_copy(0, idx, vec[:-1])
        flag = vec[-1:]
    if inf:
        total_p = glob.max() if glob.numel() else torch.zeros((), dtype=f64, device=dev)
    else:
        total_p = glob.sum()
    if p.pp_group is not None:
        if inf:
            vec = _max(torch.cat([total_p.reshape(1), flag]), [p.pp_group])
        else:
            vec = torch.cat([total_p.reshape(1), flag, lp])
            dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=p.pp_group)
            lp, loss_done = vec[2:], True
        total_p, flag = vec[0], vec[1:2]
    if not loss_done:
        # DDP: flag and loss over its group; p = inf on meshes: the loss over the first root
        if p.process_group is not None and not p.roots:
            vec = _sum(torch.cat([flag, lp]), [p.process_group])
            flag, lp = vec[:1], vec[1:]
        elif p.roots:
            lp = _sum(lp, p.roots[0].groups)
        elif p.process_group is not None:  # pragma: no cover - roots and a DDP group
            lp = _sum(lp, [p.process_group])
    per = glob if inf else glob ** (1.0 / norm_type)
    total = total_p if inf else total_p ** (1.0 / norm_type)
    max_abs = None
    if local_max_abs is not None:
        mx = local_max_abs.to(dev, torch.float32).clone()
        for r in p.roots:
            idx = r.idx
            mx = mx.index_copy(0, idx, _max(mx.index_select(0, idx), r.groups))
        max_abs = mx
    mean_loss = None
    if wants_loss and loss is None and p.pp_group is not None and p.pp_loss is None:
        # once per layout: does any stage pass a loss? (a stage without one then gets the
        # last stage's; if none does, every stage gets None rather than a NaN "loss")
        p.pp_loss = bool(lp[1].cpu() > 0)
    if loss is not None or (wants_loss and p.pp_group is not None and p.pp_loss):
        mean_loss = (lp[0] / lp[1]).to(torch.float32)
    return Reduced(per.to(torch.float32), total.reshape(()).to(torch.float32),
                   flag.reshape(()) > 0, mean_loss, max_abs)


def all_reduce_loss(loss: Any, group: Any = None) -> Tensor:
    """The mean of ``loss`` over ``group`` (float32 0-d; ranks without a loss pass None and
    are not counted): what a spike rule must compare so that every rank decides alike."""
    grp = _as_group(group, "group")
    dev = loss.device if isinstance(loss, Tensor) else torch.device("cpu")
    vec = _loss_pair(loss, dev)
    dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=grp)
    return (vec[0] / vec[1]).to(torch.float32)


def sums_over_job(parts: Tensor, p: DistPlan) -> Tensor:
    """``[k]``: per-tensor partial sums ``parts`` (``[n, k]``, this rank's local elements of
    the plan's tensors, in its order) added over the job, each distinct element once.

    The same counting as the norms (masked replicas, one SUM all-reduce per root mesh, then
    ``pp_group``); for rules that need more than norms, e.g. the default clipper's cosine
    between the gradient and the momentum (``sample_dot_norms``).
    """
    parts = parts.to(torch.float64)
    rows = torch.ones(parts.shape[0], dtype=torch.bool, device=parts.device)
    out = torch.zeros(parts.shape[1], dtype=torch.float64, device=parts.device)
    for r in p.roots:
        rows = rows.index_fill(0, r.idx, False)
        mine = parts.index_select(0, r.idx)
        mine = torch.where(r.mask.unsqueeze(1), mine, torch.zeros_like(mine))
        out = out + _sum(mine.sum(0), r.groups)
    out = out + torch.where(rows.unsqueeze(1), parts, torch.zeros_like(parts)).sum(0)  # plain
    if p.pp_group is not None:
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=p.pp_group)
    return out


def per_tensor_sums_over_job(parts: Tensor, p: DistPlan) -> Tensor:
    """``[n, k]`` float64: per-tensor partial sums ``parts`` (``[n, k]``, this rank's local
    elements of the plan's tensors, in its order) added over the shards of each tensor, each
    distinct element once (masked replicas; one SUM all-reduce of the root's rows per root
    mesh). Plain tensors' rows are complete on this rank and stay as they are; ``pp_group`` is
    not reduced over (each stage's tensors are its own). For the Monitor's layer statistics
    on its layer steps (non-finite counts, parameter norms, the update ratio's sums)."""
    out = parts.to(torch.float64).clone()
    for r in p.roots:
        mine = out.index_select(0, r.idx)
        mine = torch.where(r.mask.unsqueeze(1), mine, torch.zeros_like(mine))
        out = out.index_copy(0, r.idx, _sum(mine, r.groups))
    return out


def sample_dot_norms(a: list[Tensor], b: list[Tensor], sample: int,
                     like: DistPlan) -> tuple[Tensor, Tensor, Tensor]:
    """``(a . b, ||a||_2, ||b||_2)`` (float32, global) over a strided sample of at most about
    ``sample`` elements of the tensors ``a`` and ``b`` (same shapes and placements, e.g.
    gradients and momentum buffers), from each rank's local shards: the stride is
    ``ceil(sum of global sizes / sample)``, the same on every rank, applied to every local
    shard (all elements when the model has at most ``sample``). Reduced with
    ``sums_over_job`` over the groups of ``like`` (the gradients' plan)."""
    p = plan(a, process_group=like.process_group, pp_group=like.pp_group) or like
    total = sum(t.numel() for t in a)  # a DTensor's numel is its global size
    stride = max(1, -(-total // sample))
    la, lb = p.localize(a), p.localize(b)
    rows = []
    for x, y in zip(la, lb):
        xs = x.detach().reshape(-1)[::stride].to(torch.float32)
        ys = y.detach().reshape(-1)[::stride].to(torch.float32)
        rows.append(torch.stack([torch.dot(xs, ys), torch.dot(xs, xs), torch.dot(ys, ys)]))
    dev = la[0].device if la else torch.device("cpu")
    parts = torch.stack(rows) if rows else torch.zeros(0, 3, dtype=torch.float32, device=dev)
    s = sums_over_job(parts, p)
    return s[0].float(), s[1].sqrt().float(), s[2].sqrt().float()
