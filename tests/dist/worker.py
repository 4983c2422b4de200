"""One rank of a distributed test: ``python worker.py CASE OUT_DIR`` with RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT set (see tests/test_distributed.py, which launches the ranks).

Each case asserts on this rank and writes ``OUT_DIR/CASE-r{rank}.json``: ``{"ok": true}`` or
the traceback. The references are single-process runs of the same model on the same global
batch, recomputed on every rank (the models are tiny).
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # FSDP2 + gloo with a GPU visible segfaults
sys.path.insert(0, os.environ.get("GRADGUARD_SRC") or os.path.join(os.path.dirname(__file__), "..", "..", "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

torch.set_num_threads(1)

import gradguard as gg  # noqa: E402
from gradguard import distributed as ggd  # noqa: E402

RANK = int(os.environ["RANK"])
WS = int(os.environ["WORLD_SIZE"])


# -- helpers -----------------------------------------------------------------------------
def ref_norms(grads: list[Tensor]) -> tuple[float, np.ndarray]:  # noqa: F821
    """float64 numpy reference: per-tensor 2-norms and the total."""
    per = np.array([np.sqrt(np.sum(g.detach().double().numpy() ** 2)) for g in grads])
    return float(np.sqrt(np.sum(per ** 2))), per


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def check_close(name: str, got, want, tol: float) -> None:
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    want = np.asarray(want, dtype=np.float64).reshape(-1)
    assert got.shape == want.shape, f"{name}: shape {got.shape} vs {want.shape}"
    nan = np.isnan(want)  # a NaN must be where the reference has one, and only there
    assert np.array_equal(np.isnan(got), nan), f"{name}: NaN at {np.isnan(got)}, want {nan}"
    got, want = got[~nan], want[~nan]
    err = np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-30)) if got.size else 0.0
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}\n got {got}\n want {want}"


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if ggd.is_dtensor(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if ggd.is_dtensor(t) else t


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """This rank's parameters and optimizer state, local shards, cloned (bitwise compares)."""
    out = [local(p.detach()).clone() for p in model.parameters()]
    for p in model.parameters():
        for k in sorted(opt.state.get(p, {})):
            v = opt.state[p][k]
            if isinstance(v, torch.Tensor):
                out.append(local(v).clone())
    return out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def identical_across_ranks(tensors: list[torch.Tensor], group=None) -> bool:
    """True when every rank holds bit-identical tensors (compared as int64 bit patterns)."""
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors]) if tensors else torch.zeros(1)
    bits = flat.view(torch.int64)
    n = dist.get_world_size(group)
    got = [torch.empty_like(bits) for _ in range(n)]
    dist.all_gather(got, bits, group=group)
    return all(torch.equal(g, bits) for g in got)


def clipper_state(guard: gg.Guard) -> list[torch.Tensor]:
    sd = guard.clipper.state_dict()
    return [v for k, v in sorted(sd.items()) if isinstance(v, torch.Tensor)]


def tensors_of(sd) -> list[torch.Tensor]:
    """Every tensor in a (nested) state dict, in key order."""
    if isinstance(sd, torch.Tensor):
        return [sd]
    if isinstance(sd, dict):
        return [t for k in sorted(sd, key=str) for t in tensors_of(sd[k])]
    if isinstance(sd, (list, tuple)):
        return [t for v in sd for t in tensors_of(v)]
    return []


class CountHostReads:
    """Counts host reads of tensor values (Tensor.item, __bool__, __float__, __int__, tolist)."""

    NAMES = ("item", "__bool__", "__float__", "__int__", "tolist")

    def __enter__(self):
        self.n = 0
        self._orig = {k: getattr(torch.Tensor, k) for k in self.NAMES}
        for k, fn in self._orig.items():
            def wrapped(t, *a, _fn=fn, **kw):
                self.n += 1
                return _fn(t, *a, **kw)
            setattr(torch.Tensor, k, wrapped)
        return self

    def __exit__(self, *exc):
        for k, fn in self._orig.items():
            setattr(torch.Tensor, k, fn)


class CountAllReduce:
    """Counts dist.all_reduce calls (the collectives gradguard issues)."""

    def __init__(self):
        self.n = 0
        self._orig = dist.all_reduce

    def __enter__(self):
        def counted(*a, **k):
            self.n += 1
            return self._orig(*a, **k)
        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def no_new_torch_apis() -> None:
    """torch 2.4 compatibility: make the torch >= 2.6 helpers fail if gradguard calls them."""
    def boom(*a, **k):
        raise AssertionError("gradguard called a torch >= 2.6 API")
    import torch.nn.utils as nnu
    import torch.nn.utils.clip_grad as cg
    for mod in (nnu, cg):
        for name in ("get_total_norm", "clip_grads_with_norm_", "clip_grad_norm_"):
            if hasattr(mod, name):
                setattr(mod, name, boom)


def mlp(seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    # odd sizes: FSDP2 shards unevenly (33 rows over 2 ranks: 17 + 16)
    return nn.Sequential(nn.Linear(15, 33), nn.Tanh(), nn.LayerNorm(33), nn.Linear(33, 7)).to(dtype)


def batch(n: int, seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 15, generator=g, dtype=dtype), torch.randn(n, 7, generator=g, dtype=dtype)


def shard_rows(t: torch.Tensor, rank: int, ws: int) -> torch.Tensor:
    n = t.shape[0] // ws
    return t[rank * n:(rank + 1) * n]


# -- cases -------------------------------------------------------------------------------
def case_fsdp2() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    no_new_torch_apis()
    mesh = init_device_mesh("cpu", (WS,))
    ref = mlp()
    model = mlp()
    for m in model:
        if isinstance(m, (nn.Linear, nn.LayerNorm)):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, y = batch(8 * WS)
    nn.functional.mse_loss(ref(x), y).backward()
    r_total, r_per = ref_norms([p.grad for p in ref.parameters()])
    nn.functional.mse_loss(model(shard_rows(x, RANK, WS)), shard_rows(y, RANK, WS)).backward()
    assert ggd.is_dtensor(next(model.parameters()).grad)

    # 1. norms: total and per tensor equal the single-process float64 reference; one
    #    all-reduce of a small vector per call
    with CountAllReduce() as c:
        n = gg.grad_norm(model.parameters())
    assert c.n == 1, f"grad_norm issued {c.n} all-reduces, want 1"
    assert not ggd.is_dtensor(n.total) and n.total.dtype == torch.float32
    check_close("fsdp2 total", n.total, r_total, 1e-6)
    check_close("fsdp2 per-tensor", n.per_tensor, r_per, 1e-6)
    # float32 gradients of the same (float32) shards: the fast float32 path, same numbers
    g32 = [p.grad.to(torch.float32) for p in model.parameters()]
    n32 = gg.norms.compute_norms(g32)
    check_close("fsdp2 float32 total", n32.total, r_total, 1e-6)
    # p = 1 and inf take the same reduction (SUM of n^p; MAX)
    for p in (1.0, math.inf):
        want = [np.sum(np.abs(q.grad.numpy())) if p == 1 else np.max(np.abs(q.grad.numpy()))
                for q in ref.parameters()]
        got = gg.grad_norm(model.parameters(), norm_type=p)
        check_close(f"fsdp2 p={p} per-tensor", got.per_tensor, want, 1e-6)
        check_close(f"fsdp2 p={p} total", got.total,
                    sum(want) if p == 1 else max(want), 1e-6)

    # bfloat16 gradients: accumulated in float32 before the collective; equal to the float64
    # norm of the same bfloat16 values
    gb = [p.grad.to(torch.bfloat16) for p in model.parameters()]
    nb = gg.norms.compute_norms(gb)
    check_close("fsdp2 bfloat16 total", nb.total, ref_norms([full(g).double() for g in gb])[0], 1e-6)
    # mixed DTensor and plain tensors (torch's foreach raises "mixed torch.Tensor and
    # DTensor"): a plain tensor is replicated, counted once
    extra = torch.arange(5, dtype=torch.float64)
    nm = gg.norms.compute_norms([p.grad for p in model.parameters()] + [extra])
    check_close("fsdp2 mixed DTensor + plain", nm.per_tensor, list(r_per) + [float(extra.norm())], 1e-6)
    # a Partial DTensor (its value is the sum of the ranks' locals) and a shard that is empty
    # on the last rank (1 element over WS ranks): no hang, exact
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    loc = torch.full((3,), float(RANK + 1), dtype=torch.float64)
    part = DTensor.from_local(loc, mesh, [Partial()])
    tiny = distribute_tensor(torch.tensor([2.5], dtype=torch.float64), mesh, [Shard(0)])
    assert tiny.to_local().numel() == (1 if RANK == 0 else 0)
    # and a Replicate DTensor: counted once, not once per rank
    rep = distribute_tensor(torch.arange(4, dtype=torch.float64), mesh, [Replicate()])
    npt = gg.norms.compute_norms([part, tiny, rep])
    s = sum(range(1, WS + 1))
    check_close("fsdp2 Partial + empty shard + Replicate", npt.per_tensor,
                [math.sqrt(3) * s, 2.5, math.sqrt(14)], 1e-6)
    check_close("fsdp2 Partial + empty shard + Replicate total", npt.total,
                math.sqrt(3 * s * s + 2.5 ** 2 + 14), 1e-6)
    # a NaN in the last rank's shard: NaN on every rank for p = 2 and inf (a MAX all-reduce
    # that dropped it, as gloo's max does, would give a finite norm) and in max |g|
    bad = distribute_tensor(torch.ones(2 * WS, dtype=torch.float64), mesh, [Shard(0)])
    if RANK == WS - 1:
        bad.to_local()[0] = float("nan")
    for p in (2.0, math.inf):
        nn_ = gg.norms.compute_norms([bad, tiny], p, with_max_abs=True)
        assert bool(nn_.nonfinite) and math.isnan(float(nn_.total)), (p, nn_.total)
        assert math.isnan(float(nn_.per_tensor[0])) and float(nn_.per_tensor[1]) == 2.5, nn_.per_tensor
        assert math.isnan(float(nn_.max_abs[0])) and float(nn_.max_abs[1]) == 2.5, nn_.max_abs

    # 2. clip_grad_norm_: returns the global norm, clips every shard by the same factor
    total = gg.clip_grad_norm_(model.parameters(), 0.01)
    check_close("fsdp2 clip_grad_norm_ total", total, r_total, 1e-6)
    post, _ = ref_norms([full(p.grad) for p in model.parameters()])
    check_close("fsdp2 post-clip norm", post, 0.01, 1e-5)
    # per-tensor clipping (tf.clip_by_norm semantics) reads the global per-tensor norms
    before = gg.grad_norm(model.parameters()).per_tensor
    per = gg.clip_grad_norm_per_tensor_(model.parameters(), 0.002)
    check_close("fsdp2 per-tensor clip returns the global norms", per, before, 1e-6)
    _, post_per = ref_norms([full(p.grad) for p in model.parameters()])
    check_close("fsdp2 post per-tensor clip", post_per, np.minimum(before.numpy(), 0.002), 1e-5)
    write_ok()


def train_fsdp2_or_ddp(kind: str, sgd: bool = False) -> None:
    """Guard(model) with the default clipper: K steps on the global batch match a
    single-process run; NaN on one rank/shard skips on every rank, state bit-identical.
    ``sgd``: SGD with momentum, where the default clipper's step-size control reads the
    cosine between gradient and momentum (reduced over the shards), else AdamW (fused on
    FSDP2: the sync-free grad_scale / found_inf path)."""
    from torch.distributed.device_mesh import init_device_mesh

    K = 6
    dtype = torch.float64
    ref = mlp(dtype=dtype)
    model = mlp(dtype=dtype)
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, gradient_as_bucket_view=True)
        wrapped = model
        inner = model.module
    else:
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (WS,))
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(model, mesh=mesh)
        wrapped = inner = model
    fused = kind == "fsdp2" and not sgd  # fused AdamW: the sync-free grad_scale / found_inf path
    if sgd:
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9, foreach=False)
        ropt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=False)
    else:
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2, fused=fused or None,
                                foreach=None if fused else False)
        ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    guard = gg.Guard(wrapped, clipper="auto", skip=gg.SpikeSkip(threshold=50.0, window=4),
                     **({"process_group": dist.group.WORLD} if kind == "ddp" else {}))
    rguard = gg.Guard(ref, clipper="auto", skip=gg.SpikeSkip(threshold=50.0, window=4))
    if kind == "ddp":
        assert guard.names == [n for n, _ in inner.named_parameters()], guard.names
    for step in range(K):
        x, y = batch(8 * WS, seed=10 + step, dtype=dtype)
        totals = []
        for m, o, g, xs, ys in ((wrapped, opt, guard, shard_rows(x, RANK, WS), shard_rows(y, RANK, WS)),
                                (ref, ropt, rguard, x, y)):
            o.zero_grad()
            loss = nn.functional.mse_loss(m(xs), ys)
            loss.backward()
            if m is wrapped and fused and step > 0:
                # the fused path (state exists after step 0): no host read in the step
                with CountHostReads() as reads, CountAllReduce() as c:
                    totals.append(g.step(o, loss=loss).total_norm)
                assert reads.n == 0, f"{reads.n} host reads in a fused FSDP2 Guard.step"
            elif m is wrapped:
                with CountAllReduce() as c:
                    totals.append(g.step(o, loss=loss).total_norm)
            else:
                totals.append(g.step(o, loss=loss).total_norm)
            if m is wrapped and step > 0:
                # one all-reduce (norms, flag, loss together); with SGD momentum the default
                # clipper's cosine adds one (FSDP2; DDP's gradients are complete on every rank)
                want_n = 2 if sgd and kind == "fsdp2" else 1
                assert c.n == want_n, f"{kind} step {step}: {c.n} all-reduces, want {want_n}"
        check_close(f"{kind} step {step} total norm", totals[0], totals[1], 1e-6)
    # parameters after K steps: same as the single-process run of the same global batch
    # (float64; what differs is only the order of the float additions)
    # (float64 models. With AdamW the clip threshold is the default's spike cap and the
    # parameters agree to 1e-9. With SGD the step-size control also reads a float32 cosine
    # whose sums are added per shard, in another order: ~1e-7 in the threshold, 1e-8 here.)
    got = [full(p.detach()) for p in inner.parameters()]
    want = [p.detach() for p in ref.parameters()]
    tol = 1e-6 if sgd else 1e-9
    for i, (a, b) in enumerate(zip(got, want)):
        err = float((a - b).abs().max() / b.abs().max())
        assert err < tol, f"{kind}: parameter {i} differs from the single-process run by {err:.3g}"
    assert guard.skipped_steps == 0 and rguard.skipped_steps == 0
    assert guard.clipper.mode == ("momentum" if sgd else "level"), guard.clipper.mode
    if sgd:  # the step-size control acted: thresholds were finite and some steps clipped
        assert math.isfinite(float(guard.clipper.threshold(torch.zeros(()))))
    assert identical_across_ranks(clipper_state(guard)), "clipper state differs across ranks"
    assert identical_across_ranks(tensors_of(guard.skip_rule.state_dict())), "SpikeSkip state differs"
    for a, b in zip(tensors_of(guard.skip_rule.state_dict()), tensors_of(rguard.skip_rule.state_dict())):
        check_close(f"{kind} SpikeSkip state vs the single-process run", a, b, 1e-6)

    # NaN on one rank only -> every rank skips; params, optimizer and clipper state unchanged
    before = snapshot(inner, opt)
    cs_before = [t.clone() for t in clipper_state(guard)]
    ss_before = [t.clone() for t in tensors_of(guard.skip_rule.state_dict())]
    opt.zero_grad()
    x, y = batch(8 * WS, seed=99, dtype=dtype)
    xs, ys = shard_rows(x, RANK, WS).clone(), shard_rows(y, RANK, WS)
    if kind == "ddp" and RANK == 1:
        xs[0, 0] = float("nan")  # DDP's all-reduce spreads it: the flag is global anyway
    loss = nn.functional.mse_loss(wrapped(xs), ys)
    loss.backward()
    if kind == "fsdp2" and RANK == WS - 1:
        local(next(inner.parameters()).grad).view(-1)[0] = float("nan")  # one shard only
    st = guard.step(opt, loss=loss)
    assert bool(st.skipped), f"rank {RANK} did not skip"
    assert guard.skipped_steps == 1
    assert same(before, snapshot(inner, opt)), "a skipped step changed params / optimizer state"
    assert same(cs_before, clipper_state(guard)), "a skipped step changed the clipper state"
    assert same(ss_before, tensors_of(guard.skip_rule.state_dict())), "a skipped step changed SpikeSkip"
    assert identical_across_ranks(clipper_state(guard)), "clipper state differs across ranks"
    write_ok()


def case_ddp() -> None:
    no_new_torch_apis()
    # norms under DDP: grads are already all-reduced (no norm collective); the loss and
    # the flag go in one all-reduce over DDP's group
    from torch.nn.parallel import DistributedDataParallel as DDP
    ref = mlp()
    model = DDP(mlp(), gradient_as_bucket_view=True)
    x, y = batch(8 * WS)
    nn.functional.mse_loss(ref(x), y).backward()
    r_total, r_per = ref_norms([p.grad for p in ref.parameters()])
    nn.functional.mse_loss(model(shard_rows(x, RANK, WS)), shard_rows(y, RANK, WS)).backward()
    # the gradients really are views into DDP's buckets (fewer storages than tensors), and each
    # is read once: one norm per parameter, none for the bucket buffers themselves
    grads = [p.grad for p in model.parameters()]
    assert len({g.untyped_storage().data_ptr() for g in grads}) < len(grads), "no bucket views"
    n = gg.grad_norm(model.parameters())
    assert n.per_tensor.shape == (len(grads),), n.per_tensor.shape
    check_close("ddp total", n.total, r_total, 1e-6)
    check_close("ddp per-tensor", n.per_tensor, r_per, 1e-6)
    with CountAllReduce() as c:
        n = gg.norms.compute_norms([p.grad for p in model.parameters()],
                                   process_group=model.process_group, loss=torch.tensor(float(RANK)))
    assert c.n == 1, c.n
    check_close("ddp mean loss", n.loss, sum(range(WS)) / WS, 1e-7)
    train_fsdp2_or_ddp("ddp")


def case_fsdp2_train() -> None:
    train_fsdp2_or_ddp("fsdp2")
    train_fsdp2_or_ddp("fsdp2", sgd=True)


def case_tp2d() -> None:
    """FSDP2 on dp + TP on tp (2 x 2, 4 ranks) with a LayerNorm sharded only over dp: the
    mixed-mesh case where torch's own clip raises (pytorch#180346)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    no_new_torch_apis()

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.up = nn.Linear(16, 32)
            self.down = nn.Linear(32, 16)

        def forward(self, x):
            return self.down(torch.relu(self.up(self.norm(x))))

    torch.manual_seed(0)
    ref = M().double()
    model = M().double()
    model.load_state_dict(ref.state_dict())
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"up": ColwiseParallel(), "down": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, generator=g, dtype=torch.float64)
    y = torch.randn(8, 16, generator=g, dtype=torch.float64)
    dp = mesh["dp"].get_local_rank()
    nn.functional.mse_loss(model(x[dp * 4:(dp + 1) * 4]), y[dp * 4:(dp + 1) * 4]).backward()
    nn.functional.mse_loss(ref(x), y).backward()
    r_total, r_per = ref_norms([p.grad for p in ref.parameters()])
    meshes = {p.grad.device_mesh.mesh_dim_names for p in model.parameters()}
    assert meshes == {("dp",), ("dp", "tp")}, meshes  # really two meshes
    with CountAllReduce() as c:
        n = gg.grad_norm(model.parameters())
    assert c.n == 1, f"{c.n} all-reduces for two meshes lifted onto one, want 1"
    check_close("tp2d total", n.total, r_total, 1e-6)
    check_close("tp2d per-tensor", n.per_tensor, r_per, 1e-6)

    # Guard: NaN in one shard on one rank -> all four ranks skip, state bit-identical
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    guard = gg.Guard(model)
    for step in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x[dp * 4:(dp + 1) * 4]), y[dp * 4:(dp + 1) * 4] * (step + 1)).backward()
        assert not bool(guard.step(opt).skipped)
    before = snapshot(model, opt)
    cs = [t.clone() for t in clipper_state(guard)]
    opt.zero_grad()
    nn.functional.mse_loss(model(x[dp * 4:(dp + 1) * 4]), y[dp * 4:(dp + 1) * 4]).backward()
    if RANK == 3:
        local(model.up.weight.grad).view(-1)[5] = float("inf")
    st = guard.step(opt)
    assert bool(st.skipped) and bool(st.nonfinite), f"rank {RANK} did not skip"
    assert same(before, snapshot(model, opt))
    assert same(cs, clipper_state(guard))
    assert identical_across_ranks(clipper_state(guard))
    write_ok()


def case_pipeline() -> None:
    """Two pipeline stages (rank 0: Linear-Tanh, rank 1: LayerNorm-Linear), activations
    sent point to point; ``pp_group`` adds the stages' norms."""
    no_new_torch_apis()
    assert WS == 2
    ref = mlp()
    full_model = mlp()
    stage = nn.Sequential(*list(full_model)[:2]) if RANK == 0 else nn.Sequential(*list(full_model)[2:])
    rstage = list(ref)[:2] if RANK == 0 else list(ref)[2:]
    opt = torch.optim.SGD(stage.parameters(), lr=1e-2, momentum=0.0)
    guard = gg.Guard(stage, clipper=gg.NormClip(0.5), skip=gg.SpikeSkip(threshold=50.0, window=4),
                     pp_group=dist.group.WORLD)

    def fwd_bwd(x, y, nan=False):
        loss = None
        if RANK == 0:
            h = stage(x)
            dist.send(h.detach(), 1)
            gh = torch.empty_like(h)
            dist.recv(gh, 1)
            h.backward(gh)
            if nan:
                stage[0].bias.grad[3] = float("nan")
        else:
            h = torch.empty(x.shape[0], 33, dtype=torch.float64)
            dist.recv(h, 0)
            h.requires_grad_(True)
            loss = nn.functional.mse_loss(stage(h), y)
            loss.backward()
            dist.send(h.grad, 0)
        return loss

    x, y = batch(8)
    loss = fwd_bwd(x, y)
    nn.functional.mse_loss(ref(x), y).backward()
    r_total, _ = ref_norms([p.grad for p in ref.parameters()])
    _, r_per_stage = ref_norms([p.grad for m in rstage for p in m.parameters()])
    with CountAllReduce() as c:
        n = gg.grad_norm(stage.parameters(), pp_group=dist.group.WORLD)
    assert c.n == 1, c.n
    check_close("pipeline total", n.total, r_total, 1e-6)
    check_close("pipeline per-tensor (this stage)", n.per_tensor, r_per_stage, 1e-6)
    # the functional clip adds the stages' norms too (max_norm above the norm: nothing scaled)
    check_close("pipeline clip_grad_norm_ total",
                gg.clip_grad_norm_(stage.parameters(), 1e9, pp_group=dist.group.WORLD), r_total, 1e-6)
    st = guard.step(opt, loss=loss)
    check_close("pipeline Guard total", st.total_norm, r_total, 1e-6)
    assert not bool(st.skipped)
    for _ in range(3):
        opt.zero_grad()
        loss = fwd_bwd(x, y)
        assert not bool(guard.step(opt, loss=loss).skipped)
    # NaN on stage 0 only -> both stages skip; stage 1's skip rule saw stage 1's loss on both
    before = snapshot(stage, opt)
    opt.zero_grad()
    loss = fwd_bwd(x, y, nan=True)
    st = guard.step(opt, loss=loss)
    assert bool(st.skipped), f"stage {RANK} did not skip"
    assert same(before, snapshot(stage, opt))
    assert identical_across_ranks([guard.skip_rule.limits(st.total_norm)[1]]), "loss limits differ"
    # the default clipper with SGD momentum: every stage starts from the whole model's S_0 and
    # keeps the same state (the cosine's sums come from both stages)
    opt2 = torch.optim.SGD(stage.parameters(), lr=1e-2, momentum=0.9)
    g2 = gg.Guard(stage, pp_group=dist.group.WORLD)
    for _ in range(3):
        opt2.zero_grad()
        loss = fwd_bwd(x, y)
        g2.step(opt2, loss=loss)
    assert identical_across_ranks(clipper_state(g2)), "default clipper state differs across stages"
    # on_nonfinite="raise": a NaN on stage 0 only raises on both stages (stage 1's own norms
    # are finite; had it not raised, it would wait in the next step's collective for ever)
    g3 = gg.Guard(stage, clipper=gg.NormClip(1.0), on_nonfinite="raise", pp_group=dist.group.WORLD)
    opt.zero_grad()
    loss = fwd_bwd(x, y, nan=True)
    try:
        g3.step(opt, loss=loss)
    except gg.NonFiniteGradientError as e:
        assert (e.parameter == "0.bias") if RANK == 0 else (e.parameter is None), e.parameter
    else:
        raise AssertionError(f"stage {RANK} did not raise")
    write_ok()


def case_monitor() -> None:
    """A FSDP2 run with a Monitor on every rank (rank 0 gives the folder, the others None: the
    same rules run everywhere on the same global values, one rank writes) against the same
    Guard and Monitor in one process on the global batch (rank 0 writes that run too, in
    OUT/ref): the run folder reads (and reports) as one run whose step rows and layer rows
    (grad norm, max |g|, non-finite count, parameter norm, exact update ratio) are the global
    ones; a NaN in one shard and a norm spike refused by a Monitor ``"skip"`` detector skip the
    same steps on every rank; collectives: one all-reduce on a plain step, three on a layer
    step (the norm's, max |g|, the layer sums)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gradguard.monitor.detectors import NonFinite, Spike
    from gradguard.report import make_report
    from gradguard.report.discover import expand, find_runs

    run_dir = os.path.join(OUT, "run")
    ref_dir = os.path.join(OUT, "ref", "run")
    mesh = init_device_mesh("cpu", (WS,))
    ref = mlp()
    model = mlp()
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)

    def guarded(m, folder):
        mon = gg.Monitor(folder if RANK == 0 else None, layer_every=2, flush_every=3,
                         update_sample=None,
                         detectors=[NonFinite(), Spike(warmup=1000, hard_factor=3.0, action="skip")])
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        return gg.Guard(m, clipper=gg.NormClip(1e9), monitor=mon, max_consecutive_skips=None), opt, mon

    guard, opt, monitor = guarded(model, run_dir)
    rguard, ropt, _ = guarded(ref, ref_dir)
    # first row of the last rank's shard of model[0].weight (FSDP2 shards dim 0 as torch.chunk)
    nan_row = int(torch.arange(33).chunk(WS)[-1][0])
    NAN_STEP, SPIKE_STEP = 4, 5
    skipped, rskipped = [], []
    for step in range(1, 7):
        x, y = batch(8 * WS, seed=20 + step)
        if step == SPIKE_STEP:
            y = y * 50.0  # the norm jumps far above 3x the largest accepted
        opt.zero_grad()
        ropt.zero_grad()
        loss = nn.functional.mse_loss(model(shard_rows(x, RANK, WS)), shard_rows(y, RANK, WS))
        loss.backward()
        rl = nn.functional.mse_loss(ref(x), y)
        rl.backward()
        if step == NAN_STEP:
            if RANK == WS - 1:
                local(model[0].weight.grad)[0, 3] = float("nan")  # one shard of one rank
            ref[0].weight.grad[nan_row, 3] = float("nan")
        with CountAllReduce() as c:
            skipped.append(bool(guard.step(opt, loss=loss).skipped))
        want_n = 3 if step % 2 == 0 else 1
        assert c.n == want_n, f"step {step}: {c.n} all-reduces, want {want_n}"
        rskipped.append(bool(rguard.step(ropt, loss=rl).skipped))
    guard.close()
    rguard.close()
    want_skips = [s in (NAN_STEP, SPIKE_STEP) for s in range(1, 7)]
    assert rskipped == want_skips, rskipped
    assert skipped == want_skips, f"rank {RANK} skipped {skipped}, want {want_skips}"
    assert not monitor.notes, monitor.notes
    # the skipped steps left the parameters as the single-process run's (float64, SGD)
    for i, (a, b) in enumerate(zip(model.parameters(), ref.parameters())):
        err = float((full(a.detach()) - b.detach()).abs().max() / b.detach().abs().max())
        assert err < 1e-9, f"parameter {i} differs from the single-process run by {err:.3g}"
    dist.barrier()
    if RANK == 0:
        # one run folder for the job (no per-rank or versioned sibling), beside the reference's
        assert sorted(map(str, find_runs(OUT))) == sorted([run_dir, ref_dir]), find_runs(OUT)
        run, want = gg.load_run(run_dir), gg.load_run(ref_dir)
        steps, rsteps = run.steps.sort_values("step"), want.steps.sort_values("step")
        assert list(steps["step"]) == list(range(1, 7)), f"{len(steps)} step rows for 6 steps"
        check_close("monitor total_norm column", steps["total_norm"], rsteps["total_norm"], 1e-6)
        check_close("monitor loss column (mean over ranks)", steps["loss"], rsteps["loss"], 1e-6)
        assert list(steps["skipped"]) == list(rsteps["skipped"]) == want_skips
        lay = run.layers.sort_values(["step", "layer"]).reset_index(drop=True)
        rlay = want.layers.sort_values(["step", "layer"]).reset_index(drop=True)
        assert list(lay["step"]) == list(rlay["step"]) and list(lay["layer"]) == list(rlay["layer"])
        assert sorted(set(lay["step"])) == [2, 4, 6], sorted(set(lay["step"]))
        for col in ("grad_norm", "grad_max_abs", "param_norm", "update_ratio"):
            check_close(f"monitor layer {col}", lay[col], rlay[col], 1e-6)
        assert list(lay["nonfinite_count"]) == list(rlay["nonfinite_count"]), \
            (list(lay["nonfinite_count"]), list(rlay["nonfinite_count"]))
        assert lay["nonfinite_count"].sum() == 1
        assert (lay["update_ratio"].fillna(0) > 0).any()  # the ratio was measured, not NaN
        ev = run.events
        assert sorted(ev["rule"]) == sorted(want.events["rule"]) == ["nonfinite", "spike"], \
            list(ev["rule"])
        # the report finds one run in the folder and reads it without a failure
        assert [str(f) for f in expand([run_dir])] == [run_dir]
        _, msgs = make_report([run_dir], os.path.join(OUT, "report.html"))
        assert not msgs, msgs
    write_ok()


# -- main ----------------------------------------------------------------------------------
OUT = ""
CASE = ""


def write_ok(**extra) -> None:
    with open(os.path.join(OUT, f"{CASE}-r{RANK}.json"), "w") as f:
        json.dump({"ok": True, **extra}, f)


if __name__ == "__main__":
    # CASES: comma-separated, run in turn in the same processes (one start-up for all)
    cases, OUT = sys.argv[1].split(","), sys.argv[2]
    dist.init_process_group("gloo")
    for CASE in cases:
        try:
            globals()[f"case_{CASE}"]()
            dist.barrier()
        except BaseException:
            with open(os.path.join(OUT, f"{CASE}-r{RANK}.json"), "w") as f:
                json.dump({"ok": False, "error": traceback.format_exc()}, f)
            # the later cases get no verdict; peers blocked in a collective are ended by the
            # launcher's timeout
            os._exit(1)
    dist.destroy_process_group()
